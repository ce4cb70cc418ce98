"""Open-loop load: Poisson and bursty arrivals at a fixed request rate, with goodput."""

import pytest


@pytest.mark.sla("goodput_ratio >= 95%", "error_rate < 1%")
def test_poisson_rate(infmax):
    infmax.run("1k1k-mini", rate=8, num_requests=24, goodput="ttft <= 300ms, tpot <= 25ms")


def test_bursty_arrivals_still_meet_ttft(infmax):
    result = infmax.run("1k1k-mini", rate=8, burstiness=0.5, num_requests=24, warmup=4)
    result.check("p90(ttft) < 1s")

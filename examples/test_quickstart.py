"""A first perf test: 1k/1k (scaled down) at fixed concurrency, gated on SLAs."""

import pytest


@pytest.mark.sla("p99(ttft) < 500ms", "p50(tpot) < 20ms", "error_rate < 0.1%")
def test_1k1k_concurrency_8(infmax):
    result = infmax.run("1k1k-mini", concurrency=8)
    assert result.metrics.num_ok == 80  # InferenceMAX's default: 10 requests per unit of concurrency


def test_throughput_per_gpu_floor(infmax):
    # SLAs can also be checked in the body; every violated one is listed.
    infmax.run(
        "8k1k-mini",
        concurrency=4,
        num_requests=16,
        sla=["throughput_per_gpu > 2000 tok/s", "p50(interactivity) > 50 tok/s/user"],
    )

"""Capacity as an assertion: the most concurrent users the server serves within its SLA.

``infmax.capacity`` doubles the load from ``lo`` until a load misses the SLA, then narrows
between the last load that met it and the first that missed it (PCHIP on the SLA margin,
as vLLM's ``bench sweep serve_sla``). Every load it measured is a row of the report.
"""

import pytest

# A simulated server that runs at most 8 sequences at once: a 9th concurrent request waits
# for a whole request (about 100 ms) before its first token, so p99(ttft) < 50ms holds up to
# 8 concurrent users and no further.
SERVER = "--max-num-seqs 8 --decode-step-ms 6"


@pytest.mark.infmax_server(sim_args=SERVER)
def test_users_within_the_ttft_sla(infmax):
    cap = infmax.capacity(isl=64, osl=16, sla=["p99(ttft) < 50ms"], lo=4, hi=16, num_requests=16, warmup=4)
    print(cap.describe())
    assert cap.concurrency >= 6

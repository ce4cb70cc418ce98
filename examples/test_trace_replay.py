"""Replay of a Mooncake-format trace (examples/traces/conversations.jsonl, written by
examples/traces/generate.py): requests at the trace's timestamps, 4 times faster, with
exactly the prefix reuse its hash ids say."""

from pathlib import Path

import pytest

from pytest_infmax import Trace

TRACE = Path(__file__).parent / "traces" / "conversations.jsonl"


@pytest.mark.infmax_server(sim_args="--enable-prefix-caching")
@pytest.mark.sla("error_rate < 1%", "p90(ttft) < 1s")
def test_replay_a_conversation_trace(infmax):
    trace = Trace.load(TRACE, speedup=4.0)
    result = infmax.run(workload=trace)
    assert result.metrics.num_requests == len(trace.entries)
    # the trace's design is the most a cache can find; requests that arrive while the prompt
    # they repeat is still being prefilled miss it
    assert 0 < result.metrics.prefix_cache_hit_rate <= result.metrics.designed_prefix_reuse + 0.01

"""Multi-turn conversations against a server with prefix caching: later turns reuse the
history's KV cache, so their TTFT is below the first turn's, and the server's cache
hit rate is what the workload designed."""

import pytest

from pytest_infmax import Scenario, Sessions

# each turn adds 64 user tokens and asks for a 16-token answer
TURN = Scenario("chat-turn", isl=64, osl=16, range_ratio=1.0)


@pytest.mark.infmax_server(sim_args="--enable-prefix-caching --prefill-ms-per-1k-tokens 100")
@pytest.mark.sla("prefix_cache_hit_rate > 70%", "p99(ttft) < 2s")
def test_conversations_reuse_their_history(infmax):
    # 4 users, 4 turns each, 50 ms of think time; each opens with its own 1024-token document
    sessions = Sessions(turns=4, think_time=0.05, prefixes=1000, prefix_len=1024)
    result = infmax.run(TURN, concurrency=4, num_requests=16, warmup=0, workload=sessions)
    first, last = result.metrics.turn(1), result.metrics.turn(4)
    assert last.ttft.percentile(50) < first.ttft.percentile(50) / 2


@pytest.mark.infmax_server(sim_args="--enable-prefix-caching --prefill-ms-per-1k-tokens 100")
def test_a_shared_system_prompt_is_computed_once(infmax):
    # 2 system prompts of 768 tokens shared by every conversation, on the chat endpoint
    sessions = Sessions(turns=2, prefixes=2, prefix_len=768)
    result = infmax.run(TURN, endpoint="chat", concurrency=4, num_requests=16, warmup=4, workload=sessions)
    assert result.metrics.turn(1).designed_prefix_reuse > 0.9
    result.check("prefix_cache_hit_rate > 80%")

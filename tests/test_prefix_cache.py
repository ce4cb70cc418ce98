"""The simulator's prefix cache: block hashes, skipped prefill, LRU eviction under the KV capacity.

The scheduler is stepped directly (no clock), as ``engine.simulate`` does; the HTTP
wiring and the /metrics counters are checked against a real simulator.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from pytest_infmax.servers.launch import ServerConfig, running_server
from pytest_infmax.sim.engine import EngineConfig, EngineRequest, Scheduler, TokenDelivery
from pytest_infmax.sim.prefixcache import PrefixCache, block_hashes
from pytest_infmax.sim.requests import chat_prompt_tokens, chat_token_sequence


def _run(scheduler: Scheduler, *requests: EngineRequest) -> list[int]:
    """Add the requests, step until they finish; returns the prompt tokens each step prefilled."""
    for request in requests:
        scheduler.add(request)
    prefilled = []
    steps = 0
    while scheduler.has_work:
        plan = scheduler.schedule()
        assert plan is not None
        prefilled.append(plan.prefill_tokens())
        scheduler.complete(plan, float(steps))
        steps += 1
        assert steps < 10_000
    return prefilled


def _request(rid: int, tokens: list[int], block: int = 16, max_tokens: int = 2) -> EngineRequest:
    return EngineRequest(rid, len(tokens), max_tokens, with_queue=False, block_hashes=block_hashes(tokens, block))


def _scheduler(**config: object) -> Scheduler:
    done: list[TokenDelivery] = []
    return Scheduler(EngineConfig(enable_prefix_caching=True, **config), lambda r, d: done.append(d))  # type: ignore[arg-type]


def test_block_hashes_chain_over_the_prefix() -> None:
    a = block_hashes(list(range(40)), 16)
    b = block_hashes([*range(16), 99, *range(17, 40)], 16)
    assert len(a) == 2  # the partial last block has no hash
    assert a[0] == b[0] and a[1] != b[1]
    # the same block after a different prefix is a different block
    assert block_hashes([*range(100, 116), *range(16, 32)], 16)[1] != a[1]


def test_a_repeated_prompt_skips_the_prefill_of_its_cached_blocks() -> None:
    scheduler = _scheduler()
    tokens = list(range(1000, 1100))  # 100 tokens: 6 full blocks
    first = _request(0, tokens)
    assert sum(_run(scheduler, first)) == 100
    second = _request(1, tokens)
    assert sum(_run(scheduler, second)) == 100 - 96  # 6 blocks cached: 4 tokens computed
    assert second.cached_tokens == 96
    cache = scheduler.prefix_cache
    assert cache is not None
    assert (cache.queries, cache.hits) == (200, 96)


def test_a_whole_prompt_of_full_blocks_still_computes_its_last_token() -> None:
    scheduler = _scheduler()
    tokens = list(range(64))
    _run(scheduler, _request(0, tokens))
    again = _request(1, tokens)
    _run(scheduler, again)
    assert again.cached_tokens == 48  # 3 of 4 blocks: the last token (in block 4) is computed


def test_prompts_sharing_a_prefix_hit_only_the_shared_blocks() -> None:
    scheduler = _scheduler()
    prefix = list(range(2000, 2064))
    _run(scheduler, _request(0, [*prefix, *range(10, 50)]))
    other = _request(1, [*prefix, *range(60, 100)])
    _run(scheduler, other)
    assert other.cached_tokens == 64


def test_lru_eviction_under_the_kv_capacity() -> None:
    # 8 blocks of 16 tokens: each request needs 3 (32 prompt + 2 output tokens)
    scheduler = _scheduler(kv_cache_tokens=128)
    prompts = [list(range(100 * i, 100 * i + 32)) for i in range(4)]
    for i, tokens in enumerate(prompts):
        _run(scheduler, _request(i, tokens))
    cache = scheduler.prefix_cache
    assert cache is not None
    # 4 prompts x 2 blocks cached would be 8 blocks; the capacity keeps all (none held now)
    assert scheduler.kv_cache_usage == 0.0  # cached blocks no request uses count as free
    # a fifth prompt needs 3 blocks: the least recently used (prompt 0's) are evicted
    _run(scheduler, _request(4, list(range(5000, 5032))))
    assert cache.cached_blocks <= 8
    again0 = _request(5, prompts[0])
    again3 = _request(6, prompts[3])
    _run(scheduler, again3)
    _run(scheduler, again0)
    assert again3.cached_tokens == 16  # still cached (recently used); 32 tokens: at most 31 hit, one block
    assert again0.cached_tokens == 0  # evicted first
    assert scheduler.free_blocks is not None and 0 <= scheduler.free_blocks <= 8


def test_blocks_in_use_are_never_evicted() -> None:
    cache = PrefixCache(16)
    cache.insert(1)
    cache.insert(2)
    cache.release([2])
    assert cache.evict(5) == 1  # only the unused block goes
    assert cache.match([1], 100) == 1


def test_chat_token_sequence_counts_as_the_prompt() -> None:
    messages = [
        {"role": "system", "content": "you are brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello there, world"}]},
    ]
    assert len(chat_token_sequence(messages)) == chat_prompt_tokens(messages)


def test_sim_exports_prefix_cache_counters_and_a_cached_prompt_is_faster(tmp_path: Path) -> None:
    config = ServerConfig(sim_args=("--enable-prefix-caching", "--prefill-ms-per-1k-tokens", "200"))
    prompt = list(range(1000, 1800))  # 800 tokens: 160 ms of prefill uncached
    with running_server(config, tmp_path) as server:
        base = server.base_url.rstrip("/").removesuffix("/v1")

        async def measure() -> tuple[float, float, str]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(30)) as session:

                async def ttft(tokens: list[int]) -> float:
                    loop = asyncio.get_running_loop()
                    start = loop.time()
                    body = {"model": server.model, "prompt": tokens, "max_tokens": 2, "stream": True}
                    first = None
                    async with session.post(f"{base}/v1/completions", json=body) as resp:
                        assert resp.status == 200
                        async for line in resp.content:
                            if first is None and line.startswith(b"data: {"):
                                first = loop.time() - start
                    assert first is not None
                    return first

                cold = await ttft(prompt)
                warm = await ttft([*prompt, *range(2000, 2040)])
                async with session.get(f"{base}/metrics") as resp:
                    return cold, warm, await resp.text()

        cold, warm, page = asyncio.run(measure())
    assert warm < cold / 2, (cold, warm)
    counters = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith("vllm:prefix_cache_")
    }
    assert counters == {"vllm:prefix_cache_queries_total": 800 + 840, "vllm:prefix_cache_hits_total": 800}

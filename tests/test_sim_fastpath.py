"""The simulator's fast stream writer (``--sse-writer fast``, the default) against the
aiohttp one it replaces for unfaulted streams: the same events on the wire, the same
clean-up when a client goes away, and no unbounded buffering for a client that stops
reading. Real simulators over loopback; the official ``openai`` SDK and our own load
generator read them as a user's test would.

Two simulators with the same seed produce the same text for the n-th request each
receives, so every comparison sends the same requests to both, in the same order.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from _sim_helpers import poll_stats_until

from pytest_infmax.load.generator import LoadGenerator
from pytest_infmax.load.plan import LoadConfig
from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.servers.launch import ServerConfig, running_server
from pytest_infmax.sim.engine import FINISH_LENGTH, PRECISE_TIMER_LEAD_S, Engine, EngineConfig, LinearCostModel
from pytest_infmax.sim.pollclock import poll_clock

WRITERS = ("fast", "aiohttp")
_ID = re.compile(rb'"id":"(chatcmpl|cmpl)-[0-9a-f]{32}"')
_CREATED = re.compile(rb'"created":\d+')


def _sims(workdir: Path, *args: str) -> Iterator[dict[str, str]]:
    """One simulator per writer, same flags otherwise: {writer: base_url}."""
    with running_server(ServerConfig(sim_args=("--sse-writer", "fast", *args)), workdir / "fast") as fast:
        with running_server(ServerConfig(sim_args=("--sse-writer", "aiohttp", *args)), workdir / "aiohttp") as old:
            yield {"fast": fast.base_url, "aiohttp": old.base_url}


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    yield from _sims(tmp_path_factory.mktemp("fastpath"), "--decode-step-ms", "1")


@pytest.fixture(scope="module")
def sims_interval3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Three tokens per event (``--stream-interval 3``): max_tokens 10 ends on a short one."""
    yield from _sims(tmp_path_factory.mktemp("fastpath3"), "--decode-step-ms", "1", "--stream-interval", "3")


def _normalised(body: bytes) -> bytes:
    """The body with what differs per response by design (its random id, its creation second)
    blanked out."""
    return _CREATED.sub(b'"created":0', _ID.sub(rb'"id":"\1-x"', body))


async def _raw_body(base_url: str, path: str, body: dict[str, Any]) -> bytes:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}{path}", json=body) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"] == "text/event-stream"
            return await response.read()


async def _stats(base_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/sim/stats") as response:
            return dict(await response.json())


def _request(chat: bool, usage: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    if chat:
        body["messages"] = [{"role": "user", "content": "Say something, please."}]
    else:
        body["prompt"] = "Say something, please."
    if usage != "none":
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": usage == "continuous"}
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


@pytest.mark.asyncio
@pytest.mark.parametrize("usage", ["none", "include_usage", "continuous"])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("interval", [1, 3])
async def test_the_fast_stream_is_byte_for_byte_the_aiohttp_one(
    sims: dict[str, str], sims_interval3: dict[str, str], interval: int, chat: bool, usage: str
) -> None:
    pair = sims if interval == 1 else sims_interval3
    path, body = _request(chat, usage, max_tokens=10)
    before = {writer: await _stats(url) for writer, url in pair.items()}
    bodies = {writer: await _raw_body(url, path, body) for writer, url in pair.items()}
    after = {writer: await _stats(url) for writer, url in pair.items()}
    for writer in pair:  # each simulator wrote it with its own writer, and timed its writes
        assert after[writer]["sse_streams"][writer] == before[writer]["sse_streams"][writer] + 1
        written = after[writer]["write_lateness_ms"]["count"] - before[writer]["write_lateness_ms"]["count"]
        assert written == -(-10 // interval)
        assert after[writer]["write_lateness_ms"]["max"] >= 0
        # and the stream's first content event, once more, on its own
        firsts = after[writer]["first_write_lateness_ms"]["count"] - before[writer]["first_write_lateness_ms"]["count"]
        assert firsts == 1
    assert _normalised(bodies["fast"]) == _normalised(bodies["aiohttp"])
    events = [line for line in bodies["fast"].split(b"\n\n") if line]
    assert events[-1] == b"data: [DONE]"
    content = [json.loads(e[6:]) for e in events[:-1]]
    words = sum(len((c["choices"][0].get("text") or c["choices"][0]["delta"].get("content") or "").split())
                for c in content if c["choices"])  # fmt: skip
    assert words == 10
    with_text = [
        c for c in content if c["choices"] and (c["choices"][0].get("text") or c["choices"][0]["delta"].get("content"))
    ]
    assert len(with_text) == -(-10 // interval)  # one event per delivery: ceil(10 / interval)
    if chat:
        assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    if usage == "none":
        assert all("usage" not in c for c in content)
    else:
        assert content[-1]["usage"]["completion_tokens"] == 10 and content[-1]["choices"] == []


@pytest.mark.asyncio
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
async def test_the_openai_sdk_reads_the_same_chunks_from_both_writers(sims: dict[str, str], chat: bool) -> None:
    dumps: dict[str, list[dict[str, Any]]] = {}
    for writer, url in sims.items():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        options = {"include_usage": True}
        if chat:
            stream = await client.chat.completions.create(
                model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=7, stream=True,
                stream_options=options,
            )  # fmt: skip
        else:
            stream = await client.completions.create(
                model="sim-model", prompt="hi", max_tokens=7, stream=True, stream_options=options
            )
        dumps[writer] = [{**chunk.model_dump(), "id": "x", "created": 0} async for chunk in stream]
        await client.close()
    assert dumps["fast"] == dumps["aiohttp"]
    assert dumps["fast"][-1]["usage"]["completion_tokens"] == 7


def test_our_load_generator_reads_the_same_from_both_writers(sims: dict[str, str]) -> None:
    config = LoadConfig(Scenario("fastpath", 16, 24), concurrency=4, num_requests=12, warmup=0)
    records = {}
    for writer, url in sims.items():
        run = asyncio.run(LoadGenerator(url, "sim-model").run(config))
        records[writer] = sorted(run.records, key=lambda r: r.index)
    for fast, old in zip(records["fast"], records["aiohttp"], strict=True):
        assert fast.ok and old.ok, (fast.error, old.error)
        assert fast.output_tokens == old.output_tokens == fast.requested_output_tokens
        assert list(fast.chunk_tokens) == list(old.chunk_tokens)


@pytest.mark.asyncio
async def test_a_client_that_goes_away_frees_its_kv_cache(tmp_path: Path) -> None:
    args = ("--sse-writer", "fast", "--decode-step-ms", "1", "--kv-cache-tokens", "200000")
    with running_server(ServerConfig(sim_args=args), tmp_path) as server:
        url = server.base_url
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "x", "max_tokens": 100_000, "stream": True}
            async with session.post(f"{url}/v1/completions", json=body) as response:
                await response.content.readline()  # the first event arrived: it runs, holding its KV blocks
                running = await _stats(url)
                assert running["running"] == 1 and running["kv_cache_usage"] > 0.4
                assert running["sse_streams"]["fast"] == 1
            # leaving the block unread closes the connection
            stats = await poll_stats_until(
                session, url, lambda s: s["running"] == 0 and s["requests_cancelled"] == 1, timeout=10
            )
    assert stats["kv_cache_usage"] == 0.0 and stats["waiting"] == 0


def _generation_tokens(base_url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert match, text
    return int(float(match.group(1)))


def test_a_client_that_stops_reading_does_not_make_the_simulator_buffer_without_bound(tmp_path: Path) -> None:
    # Every event repeats the model's name: a 20 KB name makes 20 MB/s of events at one token
    # a millisecond, which fills any socket buffer in a moment.
    model = "m" * 20_000
    args = ("--sse-writer", "fast", "--decode-step-ms", "1", "--model", model)
    with running_server(ServerConfig(sim_args=args, model=model), tmp_path) as server:
        host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        try:
            sock.connect((host, int(port)))
            body = json.dumps({"prompt": "x", "max_tokens": 10_000_000, "stream": True}).encode()
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
            # The client reads nothing more. What the simulator has written (its token counter
            # counts at the write) must stop growing once the socket buffers and the transport's
            # high-water mark are full, while the engine goes on generating.
            started = time.monotonic()
            previous, written = -1, _generation_tokens(server.base_url)
            while written != previous:
                assert time.monotonic() < started + 30, f"still writing after 30 s: {written} tokens"
                time.sleep(0.5)
                previous, written = written, _generation_tokens(server.base_url)
            held_back_s = time.monotonic() - started
            # 20 KB a token: what was written is a few MB of socket buffers and one catch-up
            # write, not the 20 MB per second the engine generated meanwhile
            assert written < 2_000, (written, held_back_s)
            stats = json.loads(_get(f"{server.base_url}/sim/stats"))
            assert stats["running"] == 1 and stats["sse_streams"]["fast"] == 1
            # reading again, the stream goes on from where it paused
            for _ in range(1000):
                assert sock.recv(65536)
            assert _generation_tokens(server.base_url) > written
        finally:
            sock.close()
        deadline = time.monotonic() + 10
        while json.loads(_get(f"{server.base_url}/sim/stats"))["running"]:
            assert time.monotonic() < deadline, "the request of the closed connection still runs"
            time.sleep(0.05)


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


@pytest.mark.asyncio
async def test_the_engine_holds_a_step_while_its_writer_has_a_backlog() -> None:
    """The fast writer falling behind slows the engine down (the wait is the step's lateness)
    instead of letting the unwritten events pile up."""
    engine = Engine(EngineConfig(), LinearCostModel(decode_step_ms=1.0, decode_ms_per_seq=0.0))
    behind = True
    engine.backlog = lambda: behind
    engine.start()
    try:
        request = engine.submit(prompt_tokens=4, max_tokens=3)
        deadline = time.monotonic() + 5
        while engine.busy_seconds == 0:  # the first step's time has passed
            assert time.monotonic() < deadline, "the engine never ran a step"
            await asyncio.sleep(0.001)
        assert request.deliveries.empty() and engine.stats().lateness_ms["count"] == 0
        submitted_meanwhile = engine.submit(prompt_tokens=4, max_tokens=1)  # must not start a step of its own
        assert not engine.step_running
        behind = False
        engine.output_drained()  # the writer caught up: the held step completes at once
        assert request.deliveries.get_nowait().token_count == 1
        assert engine.stats().lateness_ms["count"] == 1
        deliveries = [await asyncio.wait_for(submitted_meanwhile.deliveries.get(), 5)]
        assert deliveries[0].finish_reason == FINISH_LENGTH
    finally:
        await engine.stop()


@pytest.mark.asyncio
async def test_a_steps_events_are_made_before_its_end_and_handed_out_at_it() -> None:
    """The engine completes a step early, so a sink makes its event before the step's end
    (what is left at the end is the writing); the tokens are handed out (``on_output``, a
    queue) never before it."""
    engine = Engine(EngineConfig(), LinearCostModel(decode_step_ms=5.0, decode_ms_per_seq=0.0))
    loop = asyncio.get_running_loop()
    if poll_clock(loop).precise:  # as the simulator's server does on its loop
        engine.timer_lead_s = PRECISE_TIMER_LEAD_S
    made: list[tuple[float, float]] = []  # (when the sink got it, its step's end)
    released: list[float] = []
    ends: list[float] = []
    engine.on_output = lambda: released.append(loop.time())
    engine.start()
    try:
        sunk = engine.submit(prompt_tokens=4, max_tokens=20)
        sunk.sink = lambda delivery: made.append((loop.time(), delivery.emit_time))
        queued = engine.submit(prompt_tokens=4, max_tokens=20)
        while True:
            delivery = await asyncio.wait_for(queued.deliveries.get(), 10)
            assert loop.time() >= delivery.emit_time  # a queue's consumer never sees it early
            ends.append(delivery.emit_time)
            if delivery.finish_reason is not None:
                break
    finally:
        await engine.stop()
    assert len(made) == 20 and len(ends) == 20
    # Both requests are in every step (submitted before the first one began), so step k's end
    # is ends[k] and the hand-outs are one a step. Each step's output went out at its end or
    # after, never before: before ends[k] at most the k earlier steps have handed out. (A window
    # check before each end flapped on a loaded machine: step k-1's late hand-out fell in it.)
    assert ends == sorted(set(ends)), ends
    for k, emitted in enumerate(ends):
        assert any(r >= emitted for r in released)
        assert sum(1 for r in released if r < emitted) <= k, (k, emitted, released)
    # made ahead of the end: the timer fires early (by the lead, and by the making's own time);
    # a busy machine may fire some late, then they are made and handed out at once
    assert sum(1 for at, end in made if at < end) >= 5, made


def test_a_reader_that_falls_behind_gets_the_same_bytes_from_both_writers(tmp_path: Path) -> None:
    """The fast writer writes straight to the socket while nothing is buffered before it, and
    through the transport once something is (a partial write, a full socket). A client that
    stops reading until the simulator stops writing, then reads all, must get the aiohttp
    writer's body, byte for byte: nothing lost, repeated or reordered at the switch."""
    import http.client

    model = "m" * 20_000  # 20 KB events: the socket buffers fill in a few dozen

    class SmallWindow(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self.sock.settimeout(30)
            self.sock.connect((self.host, self.port))

    bodies = {}
    for writer in WRITERS:
        args = ("--sse-writer", writer, "--decode-step-ms", "1", "--model", model)
        with running_server(ServerConfig(sim_args=args, model=model), tmp_path / writer) as server:
            host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
            connection = SmallWindow(host, int(port))
            try:
                path, body = _request(chat=True, usage="continuous", max_tokens=400)
                connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                response = connection.getresponse()
                assert response.status == 200
                started, previous, written = time.monotonic(), -1, _generation_tokens(server.base_url)
                while written != previous:  # until the simulator holds its writes back
                    assert time.monotonic() < started + 30, f"still writing after 30 s: {written} tokens"
                    time.sleep(0.3)
                    previous, written = written, _generation_tokens(server.base_url)
                assert written < 400  # it did stop for the reader, with events still to come
                bodies[writer] = response.read()
            finally:
                connection.close()
    assert bodies["fast"].endswith(b"data: [DONE]\n\n")
    assert _normalised(bodies["fast"]) == _normalised(bodies["aiohttp"])


async def _long_streams_then_newcomers(url: str, long_streams: int, newcomers: int) -> None:
    """``long_streams`` streams of 200 tokens (1 s at 5 ms a step); once each has its first
    event, ``newcomers`` short streams one after another, each joining the running batch."""
    async with aiohttp.ClientSession() as session:

        async def stream(request_id: str, max_tokens: int, first_event: asyncio.Event | None = None) -> None:
            body = {"prompt": "x", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
            headers = {"X-Request-Id": request_id}
            async with session.post(f"{url}/v1/completions", json=body, headers=headers) as response:
                assert response.status == 200, await response.text()
                async for line in response.content:
                    if first_event is not None and line.startswith(b"data:"):
                        first_event.set()

        firsts = [asyncio.Event() for _ in range(long_streams)]
        running = [asyncio.create_task(stream(f"long-{i}", 200, firsts[i])) for i in range(long_streams)]
        await asyncio.wait_for(asyncio.gather(*(first.wait() for first in firsts)), timeout=30)
        for k in range(newcomers):
            await asyncio.wait_for(stream(f"new-{k}", 3), timeout=30)
        await asyncio.wait_for(asyncio.gather(*running), timeout=60)


def test_a_streams_first_event_goes_out_before_the_other_events_of_its_step(tmp_path: Path) -> None:
    """A stream that joins a running batch gets its first token at the end of the step that
    prefilled it, with every running stream's next token: its event is written first (the
    engine completes a step's prefills before its decodes, and the outbox keeps that order),
    so that the time to first token holds no other stream's write (at 1,000 streams a step's
    writes take milliseconds). Read off the trace, every write of the run in time order: the
    newcomer's first event is followed by one event of each running stream, and is nearer
    to the first of them than to the write before it (the previous step's last: a step is
    5 ms, a write microseconds). Written last in its step instead, the nearer is the one before."""
    long_streams, newcomers = 24, 4
    args = ("--sse-writer", "fast", "--decode-step-ms", "5", "--max-num-seqs", "64")
    with running_server(ServerConfig(sim_args=args), tmp_path) as server:
        asyncio.run(_long_streams_then_newcomers(server.base_url, long_streams, newcomers))
        traces = json.loads(_get(f"{server.base_url}/sim/trace"))["requests"]
    writes = sorted((t, trace["x_request_id"]) for trace in traces for t in trace["chunk_mono"])
    assert len({request_id for _, request_id in writes}) == long_streams + newcomers
    for k in range(newcomers):
        first = min(t for t, request_id in writes if request_id == f"new-{k}")
        index = writes.index((first, f"new-{k}"))
        step = writes[index + 1 : index + 1 + long_streams]
        assert sorted(request_id for _, request_id in step) == sorted(f"long-{i}" for i in range(long_streams))
        after, before = step[0][0] - first, first - writes[index - 1][0]
        assert after < before, f"new-{k}: {after * 1e3:.3f} ms to the next write, {before * 1e3:.3f} since the last"

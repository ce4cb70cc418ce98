"""The simulator's request trip (issue 20, item 4): a request's arrival is stamped at the
loop's poll that found its bytes (pytest_infmax/sim/pollclock.py), not at the later read.

Real parts: asyncio's own selector loop (the simulator's), the simulator's app served on
it over loopback, a raw keep-alive socket. The loop's other work is modelled by spinning
on the clock (work, not a wait); nothing waits on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pytest_infmax.sim import build_parser, config_from_args
from pytest_infmax.sim.pollclock import poll_clock
from pytest_infmax.sim.server import OBS_KEY, build_app


def _spin(seconds: float) -> None:
    """Busy the loop for ``seconds`` of CPU, as a stream writer's slice or a burst of handlers does."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _request(port: int, request_id: str, *, stream: bool) -> bytes:
    body = json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 2, "stream": stream}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"X-Request-Id: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@pytest.mark.asyncio
async def test_a_keep_alive_request_arrives_at_the_poll_that_found_it() -> None:
    """The loop is busy after the poll that found the request (callbacks queued before it
    run first, in the same iteration): the arrival is that poll, not the later read."""
    assert poll_clock(asyncio.get_running_loop()).known, "asyncio's selector loop: its polls are seen"
    config = config_from_args(build_parser().parse_args(["--decode-step-ms", "1", "--model", "m"]))
    runner = web.AppRunner(build_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=10)
    try:

        async def response() -> None:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await asyncio.wait_for(reader.readexactly(length), timeout=10)

        await _second_arrives_at_its_poll(port, writer, response, stream=False)
    finally:
        writer.close()
        await runner.cleanup()


async def _second_arrives_at_its_poll(
    port: int, writer: asyncio.StreamWriter, response: Callable[[], Awaitable[None]], *, stream: bool
) -> None:
    """A first request opens the keep-alive connection; the second is sent (on loopback,
    readable at the loop's next poll) with the loop's work queued before that poll: its
    arrival must be the poll, not the read after the work."""
    writer.write(_request(port, "first", stream=stream))
    await response()
    writer.write(_request(port, "second", stream=stream))  # asyncio sends at once
    sent = time.monotonic()
    asyncio.get_running_loop().call_soon(_spin, 0.05)  # queued before that poll: runs after it, before the read
    await response()
    trace = await _get_json(port, "/sim/trace")
    second = next(t for t in trace["requests"] if t["x_request_id"] == "second")
    trip = second["arrival_mono"] - sent
    assert trip < 0.025, f"arrival {trip * 1e3:.1f} ms after the send: the read, not the poll"
    assert second["arrival_mono"] <= second["handler_mono"]


async def _get_json(port: int, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=10)) as response:
            return dict(await response.json())


@contextlib.asynccontextmanager
async def _front_door() -> AsyncIterator[tuple[web.Application, int]]:
    """The simulator's app behind its front door (sim/frontdoor.py), on this loop: (app, port)."""
    from pytest_infmax.sim.frontdoor import FrontDoors

    config = config_from_args(build_parser().parse_args(["--decode-step-ms", "1", "--model", "m"]))
    app = build_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    doors = FrontDoors(app, runner.server)
    listener = await asyncio.get_running_loop().create_server(doors, "127.0.0.1", 0)
    try:
        yield app, listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        await doors.close(1.0)
        await runner.cleanup()


@pytest.mark.asyncio
async def test_the_front_door_stamps_a_stream_at_the_poll_that_found_it() -> None:
    """The same for a streaming request the front door serves (sim/frontdoor.py)."""
    async with _front_door() as (app, port):
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=10)
        try:

            async def response() -> None:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
                assert head.startswith(b"HTTP/1.1 200"), head
                await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), timeout=10)  # the body's last chunk

            await _second_arrives_at_its_poll(port, writer, response, stream=True)
            assert app[OBS_KEY].front_end_requests == {"fast": 2, "aiohttp": 0}
        finally:
            writer.close()


@pytest.mark.asyncio
async def test_a_request_read_during_a_burst_of_starts_is_stamped_at_its_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """At a burst (every stream sends its first request at once) the front door's starts take
    milliseconds. A request whose bytes come in while they run is stamped at the next poll,
    a slice later, not after the whole burst; its wait for the burst's starts is the front-end
    queue, inside the TTFT the trace records. So the client's TTFT and the trace's agree."""
    from pytest_infmax.sim import frontdoor

    burst, start_cost = 40, 0.002  # 80 ms of starts: a thousand streams' worth at ~0.1 ms each
    late_sent: list[float] = []
    start = frontdoor.FrontDoor._start

    async def first_event(reader: asyncio.StreamReader) -> float:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
        assert head.startswith(b"HTTP/1.1 200"), head
        await asyncio.wait_for(reader.readuntil(b"data: "), timeout=30)
        received = time.monotonic()
        await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), timeout=30)  # the body's last chunk
        return received

    async with _front_door() as (_, port):
        connections = [
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=10) for _ in range(burst + 1)
        ]
        late_writer = connections[-1][1]

        def costly_start(self: frontdoor.FrontDoor, head: Any, raw_body: bytes) -> bool:
            if not late_sent:  # the late request's bytes come in while the burst is being started
                late_writer.write(_request(port, "late", stream=True))  # asyncio sends at once
                late_sent.append(time.monotonic())
            _spin(start_cost)
            return start(self, head, raw_body)

        monkeypatch.setattr(frontdoor.FrontDoor, "_start", costly_start)
        try:
            for index, (_, writer) in enumerate(connections[:-1]):
                writer.write(_request(port, f"burst-{index}", stream=True))
            received = await asyncio.gather(*(first_event(reader) for reader, _ in connections))
            trace = await _get_json(port, "/sim/trace")
        finally:
            for _, writer in connections:
                writer.close()
    late = next(t for t in trace["requests"] if t["x_request_id"] == "late")
    trip = late["arrival_mono"] - late_sent[0]
    queue = late["handler_mono"] - late["arrival_mono"]
    client_ttft = received[-1] - late_sent[0]
    trace_ttft = late["chunk_mono"][0] - late["arrival_mono"]
    assert trip < 0.02, f"arrival {trip * 1e3:.1f} ms after the send: stamped after the burst's starts"
    assert queue > 0.02, f"front-end queue {queue * 1e3:.1f} ms: the burst's starts should show here"
    assert client_ttft - trace_ttft < 0.02, (
        f"client TTFT {client_ttft * 1e3:.1f} ms, trace {trace_ttft * 1e3:.1f} ms: the trace misses the wait"
    )


@pytest.mark.asyncio
async def test_the_simulators_loop_fires_its_timers_without_rounding_them_to_milliseconds() -> None:
    """A step's end is a timer. asyncio's epoll selector waits whole milliseconds, rounded up,
    so a timer 2.3 ms away fires at least 0.7 ms late (there is nothing else to wake the loop);
    the poll clock's wait is ``select(2)`` on the epoll descriptor, to the microsecond."""
    loop = asyncio.get_running_loop()
    if not hasattr(loop, "_selector") or not hasattr(__import__("select"), "epoll"):
        pytest.skip("asyncio's epoll selector loop only (Linux)")
    clock = poll_clock(loop)
    assert clock.precise
    late: list[float] = []
    for _ in range(10):
        fired = loop.create_future()
        due = loop.time() + 0.0023
        loop.call_at(due, lambda f=fired: f.set_result(loop.time()))
        late.append(await fired - due)
    # epoll's rounding puts every one of them >= 0.7 ms late; one on time shows there is none
    assert min(late) < 0.0005, [f"{x * 1e3:.2f} ms" for x in late]

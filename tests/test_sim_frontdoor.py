"""The simulator's request trip (issue 20, item 4): a request's arrival is stamped at the
loop's poll that found its bytes, and a burst of request starts is let in between polls
(pytest_infmax/sim/frontdoor.py), so that the requests after it are not left in the kernel.

Real parts: asyncio's own selector loop (the simulator's), the simulator's app served on
it over loopback, raw keep-alive sockets. A handler's CPU is modelled by spinning on the
clock (work, not a wait); nothing waits on a sleep.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pytest_infmax.sim import build_parser, config_from_args
from pytest_infmax.sim.frontdoor import START_SLICE_S, FrontDoor, poll_clock
from pytest_infmax.sim.server import build_app


def _spin(seconds: float) -> None:
    """Busy the loop for ``seconds`` of CPU, as a handler or a writer slice does."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.asyncio
async def test_a_burst_of_request_starts_is_let_in_between_polls() -> None:
    loop = asyncio.get_running_loop()
    clock = poll_clock(loop)
    assert clock.known, "asyncio's selector loop: the door knows when it polled"
    door = FrontDoor(loop)
    order: list[int] = []
    since_poll: list[float] = []

    async def handler(index: int) -> None:
        await door.enter()
        order.append(index)
        since_poll.append(time.monotonic() - clock.at)
        _spin(100e-6)  # its start: the body checked, the engine's submit, the response's head

    # 300 handlers ready in the same iteration, as after one poll that read 300 requests:
    # without the door the last starts 30 ms after that poll, and no socket is read meanwhile
    tasks = [loop.create_task(handler(index)) for index in range(300)]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    assert order == list(range(300)), "first come, first served"
    late = sorted(since_poll)
    assert late[len(late) // 2] < 0.003, late[len(late) // 2]  # within about a slice (1 ms) of its poll
    assert late[-1] < 0.015, late[-1]  # generous for a busy machine: 30 ms without the door
    assert door.held > 250, door.held


@pytest.mark.asyncio
async def test_a_request_that_goes_away_at_the_door_does_not_hold_the_others() -> None:
    loop = asyncio.get_running_loop()
    door = FrontDoor(loop)
    started: list[int] = []

    async def handler(index: int) -> None:
        await door.enter()
        started.append(index)
        _spin(START_SLICE_S)  # a slice each: every one after the first waits its turn

    tasks = [loop.create_task(handler(index)) for index in range(6)]
    await asyncio.sleep(0)  # let each run to the door (a yield, not a wait for time)
    tasks[2].cancel()  # its client went away while it waited
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
    assert isinstance(results[2], asyncio.CancelledError)
    assert started == [0, 1, 3, 4, 5]


@pytest.mark.asyncio
async def test_a_keep_alive_request_arrives_at_the_poll_that_found_it() -> None:
    """The loop is busy after the poll that found the request (callbacks queued before it
    run first, in the same iteration): the arrival is that poll, not the later read."""
    config = config_from_args(build_parser().parse_args(["--decode-step-ms", "1", "--model", "m"]))
    runner = web.AppRunner(build_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=10)
    try:

        def request(request_id: str) -> bytes:
            body = json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 2, "stream": False}).encode()
            head = (
                f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"X-Request-Id: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            return head.encode() + body

        async def response() -> None:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await asyncio.wait_for(reader.readexactly(length), timeout=10)

        writer.write(request("first"))  # opens the keep-alive connection
        await response()
        writer.write(request("second"))  # asyncio sends at once: on loopback, readable at the next poll
        sent = time.monotonic()
        loop = asyncio.get_running_loop()
        loop.call_soon(_spin, 0.05)  # queued before that poll: runs after it, before the read
        await response()
        trace = await _get_json(port, "/sim/trace")
        second = next(t for t in trace["requests"] if t["x_request_id"] == "second")
        trip = second["arrival_mono"] - sent
        assert trip < 0.025, f"arrival {trip * 1e3:.1f} ms after the send: the read, not the poll"
        assert second["arrival_mono"] <= second["handler_mono"]
    finally:
        writer.close()
        await runner.cleanup()


async def _get_json(port: int, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=10)) as response:
            return dict(await response.json())

"""GET /sim/trace?since=: polling returns every recorded request, whatever order they end in."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from pytest_infmax.servers import ServerConfig, running_server
from pytest_infmax.sim.trace import Clock, RequestTrace, TraceLog

FAST = ("--decode-step-ms", "1", "--decode-ms-per-seq", "0.01")


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_trace_cursor_follows_recording_order_not_arrival_order() -> None:
    log = TraceLog(Clock(), capacity=10)
    assert log.snapshot()["next_since"] == -1  # a cursor before anything was recorded
    first = log.begin("/v1/completions", 1.0, "first")
    second = log.begin("/v1/completions", 2.0, "second")
    log.commit(second)  # the later arrival ends first
    poll = log.snapshot(-1)
    assert [t["x_request_id"] for t in poll["requests"]] == ["second"]
    log.commit(first)
    again = log.snapshot(poll["next_since"])
    assert [(t["x_request_id"], t["seq"], t["commit_seq"]) for t in again["requests"]] == [("first", 0, 1)]
    assert log.snapshot(again["next_since"])["requests"] == []
    assert log.snapshot(again["next_since"])["next_since"] == again["next_since"]
    cleared = log.snapshot(None, clear=True)
    assert len(cleared["requests"]) == 2 and log.snapshot()["next_since"] == 1  # the cursor survives a clear
    assert isinstance(first, RequestTrace)


@pytest.mark.asyncio
async def test_trace_since_polling_returns_a_request_that_ends_after_a_later_one(tmp_path: Path) -> None:
    """The bug: seq is given on arrival, traces are recorded on end, and next_since
    followed seq, so a long request that ended after a later short one was never
    returned by a since poll."""
    with running_server(ServerConfig(sim_args=FAST, startup_timeout=20), tmp_path) as server:
        url = server.base_url
        assert _get_json(f"{url}/sim/trace")["next_since"] == -1  # nothing recorded yet
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            long_body = {"prompt": "a b c", "max_tokens": 200, "stream": True}
            async with session.post(f"{url}/v1/completions", json=long_body,
                                    headers={"X-Request-Id": "long"}) as long_response:
                await asyncio.wait_for(long_response.content.readline(), 10)  # the long one is running
                async with session.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                        headers={"X-Request-Id": "short"}) as short_response:
                    assert short_response.status == 200
                    await short_response.read()
                poll = _get_json(f"{url}/sim/trace?since=-1")
                assert [t["x_request_id"] for t in poll["requests"]] == ["short"]
                await asyncio.wait_for(long_response.read(), 20)
        later = _get_json(f"{url}/sim/trace?since={poll['next_since']}")
    (long_trace,) = later["requests"]
    assert long_trace["x_request_id"] == "long" and long_trace["outcome"] == "ok"
    assert long_trace["seq"] < poll["requests"][0]["seq"]  # it arrived first, and is still returned

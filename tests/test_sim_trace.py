"""GET /sim/trace?since=: polling returns every recorded request, whatever order they end in."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from pytest_infmax.servers.launch import ServerConfig, running_server
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
            async with session.post(
                f"{url}/v1/completions", json=long_body, headers={"X-Request-Id": "long"}
            ) as long_response:
                await asyncio.wait_for(long_response.content.readline(), 10)  # the long one is running
                async with session.post(
                    f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers={"X-Request-Id": "short"}
                ) as short_response:
                    assert short_response.status == 200
                    await short_response.read()
                poll = _get_json(f"{url}/sim/trace?since=-1")
                assert [t["x_request_id"] for t in poll["requests"]] == ["short"]
                await asyncio.wait_for(long_response.read(), 20)
        later = _get_json(f"{url}/sim/trace?since={poll['next_since']}")
    (long_trace,) = later["requests"]
    assert long_trace["x_request_id"] == "long" and long_trace["outcome"] == "ok"
    assert long_trace["seq"] < poll["requests"][0]["seq"]  # it arrived first, and is still returned


def _prom_sum(text: str, name: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"{name}_sum")]
    return float(line.rsplit(" ", 1)[1])


def test_arrival_is_when_the_bytes_came_not_when_the_handler_started(tmp_path: Path) -> None:
    """Two requests pipelined in one write on one connection: both reach the process
    together, but the second's handler only starts once the first response is done.
    Its ``arrival`` is the first (the HTTP layer's data_received), ``handler_mono``
    the second, and TTFT and e2e (trace and /metrics) count from ``arrival``: the
    server's front-end queue is the server's time, as the user sees it."""
    sim = ("--decode-step-ms", "5", "--decode-ms-per-seq", "0")
    with running_server(ServerConfig(sim_args=sim, startup_timeout=20), tmp_path) as server:
        host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
        requests = b""
        for name in ("one", "two"):
            body = json.dumps({"prompt": "a b c", "max_tokens": 10, "stream": True}).encode()
            requests += (
                f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"X-Request-Id: {name}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(requests)  # one write: both requests arrive together
            received = b""
            while received.count(b"data: [DONE]") < 2 or not received.endswith(b"0\r\n\r\n"):
                data = sock.recv(65536)
                assert data, "connection closed before both responses ended"
                received += data
        traces = {t["x_request_id"]: t for t in _get_json(f"{server.base_url}/sim/trace")["requests"]}
        with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
    one, two = traces["one"], traces["two"]
    for trace in (one, two):
        assert trace["outcome"] == "ok"
        assert trace["arrival_mono"] <= trace["handler_mono"] <= trace["first_token_mono"]
        wall_offset = trace["arrival_wall"] - trace["arrival_mono"]
        assert trace["handler_wall"] - trace["handler_mono"] == pytest.approx(wall_offset)
    # the second arrived with the first, and waited for it to end before its handler ran
    assert two["arrival_mono"] < one["first_token_mono"] < one["end_mono"] < two["handler_mono"]
    # TTFT and e2e count from arrival, in the trace and on /metrics
    ttft_sum = sum(t["first_token_mono"] - t["arrival_mono"] for t in (one, two))
    e2e_sum = sum(t["end_mono"] - t["arrival_mono"] for t in (one, two))
    assert _prom_sum(metrics, "vllm:time_to_first_token_seconds") == pytest.approx(ttft_sum, abs=1e-9)
    assert _prom_sum(metrics, "vllm:e2e_request_latency_seconds") == pytest.approx(e2e_sum, abs=1e-9)
    assert ttft_sum > sum(t["first_token_mono"] - t["handler_mono"] for t in (one, two))

"""Endpoints as hosted APIs really are (issue 16, item 6), against tests/_hostile_server.py as
``--infmax-endpoint``: many answer 404 on /health, a wrong key is a 401, and a URL where nothing
listens must fail in seconds, not after the whole wait."""

from __future__ import annotations

import socket
import time

import pytest
from _hostile_client import HostileClient

TEST = """
def test_x(infmax):
    result = infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0)
    assert result.metrics.num_ok == 4
"""


def _run(pytester: pytest.Pytester, url: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_perf=TEST)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-endpoint", url, *args, timeout=120)


def test_an_endpoint_without_a_health_route_is_ready_when_its_models_answer(
    pytester: pytest.Pytester, hostile_server: HostileClient
) -> None:
    """Before: readiness required GET /health = 200, so a hosted API that answers 404 there
    was waited on for 30 s and then refused."""
    hostile_server.script({"GET /health": "not_found"})
    result = _run(pytester, hostile_server.base_url)
    result.assert_outcomes(passed=1)
    paths = [entry["path"] for entry in hostile_server.log()]
    assert "/health" in paths and "/v1/models" in paths


def test_a_refused_key_says_authentication_failed_and_what_to_check(
    pytester: pytest.Pytester, hostile_server: HostileClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    hostile_server.script({"GET /health": "not_found", "GET /v1/models": "unauthorized"})
    monkeypatch.setenv("INFMAX_API_KEY", "sk-wrong-key-1234567890")
    start = time.monotonic()
    result = _run(pytester, hostile_server.base_url)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*authentication failed: *v1/models answered HTTP 401 (the key in $INFMAX_API_KEY was refused);"
            " check INFMAX_API_KEY (or the variable --infmax-api-key-env names)*"
        ]
    )
    assert "sk-wrong-key" not in result.stdout.str()
    assert time.monotonic() - start < 60  # at once, not after retrying


def test_a_refused_connection_to_an_endpoint_fails_in_seconds(pytester: pytest.Pytester) -> None:
    with socket.socket() as sock:  # a port nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        start = time.monotonic()
        result = _run(pytester, f"http://127.0.0.1:{port}", "--infmax-startup-timeout", "120")
        wall = time.monotonic() - start
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*did not answer GET /v1/models with 200 in 3 s of retries*ConnectionRefusedError*"])
    assert wall < 60, f"{wall:.0f} s: a refused connection was waited on"  # before: the whole wait (30 s or more)

"""The load generator against a hostile or broken server, over real HTTP on loopback.

A scripted raw server (``tests/_hostile_server.py``, a subprocess) answers each
request with the behaviour the test assigned to it (by the sha256 of the exact body
the client sends), so one ``LoadGenerator.run`` mixes hostile and good requests.
Each hostile behaviour must end only its own request, with a typed error whose
message names the problem, within the request timeout, with bounded client memory
(tracemalloc, in this process), while the good requests of the same run succeed and
no connection that carried a hostile response is used again. Every test runs twice:
with the C fast lane reading streaming bodies and with the Python path.
"""

from __future__ import annotations

import hashlib
import json
import time
import tracemalloc
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from _hostile_client import hostile_server_port

from pytest_infmax.load.generator import LoadGenerator, encode_body, run_coroutine
from pytest_infmax.load.plan import LoadConfig, RunRecords
from pytest_infmax.load.scenarios import Scenario, plan_request
from pytest_infmax.load.streamclient import DEFAULT_MAX_EVENT_BYTES
from pytest_infmax.records import ErrorKind

SCENARIO = Scenario("hostile", 16, 4)  # 12-16 prompt tokens, 3-4 output tokens
MODEL = "hostile-model"
TIMEOUT = 1.0  # request_timeout of every run here
SLACK = 1.0  # a timed-out request ends within TIMEOUT + SLACK (a loaded 2-core machine)
MIB = 1 << 20


@pytest.fixture(autouse=True, params=["lane", "python"])
def wire(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every case twice: streaming bodies read by the C fast lane, and by the Python path
    (``INFMAX_WIRE=python``, what runs where the extension is not built)."""
    monkeypatch.setenv("INFMAX_WIRE", "" if request.param == "lane" else "python")
    return request.param


@dataclass(frozen=True)
class Case:
    kind: ErrorKind | None  # None: the request succeeds
    message: str  # a substring the error message must contain
    timeout: bool = False  # ends at the request timeout (else: at once, well before it)
    # the HTTP message was whole (only its content lies): its connection may carry the next request
    reusable: bool = False


# behaviour -> what the user sees
CASES: dict[str, Case] = {
    "huge_event": Case(ErrorKind.PROTOCOL, f"an SSE event exceeded {DEFAULT_MAX_EVENT_BYTES} bytes"),
    "endless_events": Case(ErrorKind.PROTOCOL, "an endless stream, ended by the client"),
    "endless_pings": Case(ErrorKind.TIMEOUT, f"no complete response within {TIMEOUT:g} s", timeout=True),
    # the whole answer, then neither [DONE] nor the end of the body: a client reading to the end hangs
    "hang_after_usage": Case(ErrorKind.TIMEOUT, "its finish_reason and usage (", timeout=True),
    "bad_utf8": Case(ErrorKind.PROTOCOL, "not valid UTF-8"),
    "json_body": Case(ErrorKind.PROTOCOL, "answered with a JSON body, not an event stream"),
    "html_body": Case(ErrorKind.PROTOCOL, "not an SSE event stream"),
    "not_object": Case(ErrorKind.PROTOCOL, "Expected `object`, got `int`"),
    "wrong_choices": Case(ErrorKind.PROTOCOL, "at `$.choices`"),
    "garbage_status": Case(ErrorKind.PROTOCOL, "malformed HTTP response"),
    "bad_chunk_size": Case(ErrorKind.PROTOCOL, "malformed HTTP response: Invalid character in chunk size"),
    "huge_500": Case(ErrorKind.HTTP, "HTTP 500: Traceback"),
    "endless_500": Case(ErrorKind.HTTP, "HTTP 500: engine crashed"),
    "slowloris": Case(ErrorKind.TIMEOUT, f"no complete response within {TIMEOUT:g} s", timeout=True),
    "slowloris_head": Case(ErrorKind.TIMEOUT, f"no complete response within {TIMEOUT:g} s", timeout=True),
    "cut_mid_chunk": Case(ErrorKind.DISCONNECT, "connection lost mid-response"),
    "short_body": Case(ErrorKind.DISCONNECT, "connection lost mid-response"),
    "huge_header": Case(ErrorKind.PROTOCOL, "headers exceeded"),
    "huge_error_object": Case(ErrorKind.SERVER, "server error in stream: engine failure: mmm"),
    "endless_after_done": Case(None, ""),  # the answer was complete at [DONE]
    # usage counts that cannot be true: a protocol error naming the field, value and limit
    "usage_huge": Case(
        ErrorKind.PROTOCOL, "usage.completion_tokens=1000000000000000 exceeds the limit max_tokens=", reusable=True
    ),
    "usage_negative": Case(
        ErrorKind.PROTOCOL, "usage.completion_tokens=-5 but content arrived: the limit is >= 1", reusable=True
    ),
    "usage_zero": Case(
        ErrorKind.PROTOCOL, "usage.completion_tokens=0 but content arrived: the limit is >= 1", reusable=True
    ),
    "usage_over_max": Case(ErrorKind.PROTOCOL, "exceeds the limit max_tokens=", reusable=True),
    "usage_below_chunks": Case(
        ErrorKind.PROTOCOL, "content chunks that arrived (each carries at least one token)", reusable=True
    ),
    "prompt_huge": Case(ErrorKind.PROTOCOL, "usage.prompt_tokens=1000000000000000 exceeds the limit", reusable=True),
    "prompt_negative": Case(ErrorKind.PROTOCOL, "usage.prompt_tokens=-1 is negative: the limit is >= 0", reusable=True),
}


class HostileServer:
    def __init__(self, port: int) -> None:
        self.base_url = f"http://127.0.0.1:{port}"

    def _call(self, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(self.base_url + path, data=body, method="POST" if body is not None else "GET")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def script(self, behaviours: dict[int, str], config: LoadConfig) -> None:
        """Assign a behaviour to request indices (the rest are good); clears the log."""
        by_body = {}
        for index, name in behaviours.items():
            body = encode_body(plan_request(config.scenario, index, config.seed), MODEL, config)
            by_body[hashlib.sha256(body).hexdigest()] = name
        self._call("/script", json.dumps(by_body).encode())

    def log(self) -> list[dict[str, Any]]:
        return self._call("/log")


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    with hostile_server_port() as port:
        yield HostileServer(port)


def _config(concurrency: int, num_requests: int) -> LoadConfig:
    return LoadConfig(SCENARIO, concurrency=concurrency, num_requests=num_requests, warmup=0, request_timeout=TIMEOUT)


def _run(server: HostileServer, behaviours: dict[int, str], concurrency: int, num_requests: int) -> RunRecords:
    config = _config(concurrency, num_requests)
    server.script(behaviours, config)
    return run_coroutine(LoadGenerator(server.base_url, MODEL).run(config))


def _check(rec, behaviour: str) -> None:
    """The record of one request: ok if good, else the case's typed error, in time."""
    elapsed = rec.end_time - rec.send_time
    where = f"request {rec.index} ({behaviour}): {rec.error_kind} {rec.error_message!r} after {elapsed:.3f} s"
    if behaviour == "good":
        assert rec.ok, where
        assert rec.output_tokens == rec.requested_output_tokens, where
        return
    case = CASES[behaviour]
    assert rec.error_kind is case.kind, where
    if case.kind is None:
        assert rec.output_tokens == rec.requested_output_tokens, where
        return
    assert case.message in (rec.error_message or ""), where
    assert len(rec.error_message or "") < 600, f"{where}: the message is not bounded"
    if case.timeout:
        assert TIMEOUT - 0.01 <= elapsed < TIMEOUT + SLACK, where
    else:
        assert elapsed < TIMEOUT, f"{where}: a hostile response that can be judged at once waited for the timeout"


def _assert_no_reuse_after_hostile(log: list[dict[str, Any]]) -> None:
    """No request was sent on a connection after it carried a hostile response."""
    last_seq: dict[int, int] = {}
    for entry in log:
        last_seq[entry["conn"]] = max(last_seq.get(entry["conn"], 0), entry["seq"])
    for entry in log:
        if entry["behaviour"] != "good" and not CASES[entry["behaviour"]].reusable:
            assert entry["seq"] == last_seq[entry["conn"]], (
                f"connection {entry['conn']} carried a {entry['behaviour']} response and was used again: {log}"
            )


@pytest.mark.parametrize("behaviour", list(CASES))
def test_hostile_response_ends_only_its_request(server: HostileServer, behaviour: str) -> None:
    """good, hostile, good, hostile, good on one connection slot (concurrency=1): the
    hostile requests get the typed error, the good ones after them succeed on a new
    connection."""
    run = _run(server, {1: behaviour, 3: behaviour}, concurrency=1, num_requests=5)
    assert [r.index for r in run.records] == [0, 1, 2, 3, 4]
    for rec in run.records:
        _check(rec, behaviour if rec.index in (1, 3) else "good")
    log = server.log()
    assert [e["behaviour"] for e in log] == ["good", behaviour, "good", behaviour, "good"]
    _assert_no_reuse_after_hostile(log)


def test_a_stream_that_never_ends_after_its_usage_keeps_its_counts(server: HostileServer) -> None:
    """Issue 17: every token, the finish_reason and the usage arrived, then the stream hung; the
    timeout record had output tokens None. It stays a timeout (a client reading to the end of
    the stream hangs on it), but keeps the server's counts and says what had arrived."""
    run = _run(server, {0: "hang_after_usage"}, concurrency=1, num_requests=1)
    (rec,) = run.records
    assert rec.error_kind is ErrorKind.TIMEOUT
    assert rec.output_tokens == rec.requested_output_tokens and rec.output_tokens_source.value == "usage"
    assert rec.input_tokens == 16 and len(rec.chunk_times) == rec.output_tokens
    assert f"usage ({rec.output_tokens} output tokens) had arrived" in (rec.error_message or "")
    assert "the stream never ended ([DONE] or the end of the body): the counts are kept" in rec.error_message
    assert rec.end_time is not None and rec.end_time - rec.send_time >= TIMEOUT - 0.01


def test_one_run_mixing_every_hostile_behaviour_with_good_requests(server: HostileServer) -> None:
    """Every behaviour and as many good requests at once: each request gets its own
    outcome, and the run ends in about one request timeout."""
    names = list(CASES)
    behaviours = {2 * i: name for i, name in enumerate(names)}  # odd indices are good
    n = 2 * len(names)
    start = time.perf_counter()
    run = _run(server, behaviours, concurrency=n, num_requests=n)
    wall = time.perf_counter() - start
    assert len(run.records) == n
    for rec in run.records:
        _check(rec, behaviours.get(rec.index, "good"))
    assert wall < TIMEOUT + SLACK + 1.0, f"the run took {wall:.2f} s"
    _assert_no_reuse_after_hostile(server.log())


# Hostile payloads that would grow the client without a limit: each is 16 MiB or more
# per request (endless for some), 4 at once.
MEMORY_CASES = [
    "huge_event",
    "huge_header",
    "huge_500",
    "endless_500",
    "endless_events",
    "endless_pings",
    "slowloris",
    "endless_after_done",
]
MEMORY_CONCURRENCY = 4
MEMORY_BOUND = 16 * MIB  # < 1/4 of the 64+ MiB the 4 hostile responses send


@pytest.mark.parametrize("behaviour", MEMORY_CASES)
def test_client_memory_stays_bounded(server: HostileServer, behaviour: str) -> None:
    """Four hostile responses at once, then four good requests: the client's peak
    Python memory (tracemalloc: every allocation in this process, the server being
    another process) grows by less than MEMORY_BOUND."""
    c = MEMORY_CONCURRENCY
    config = _config(c, 2 * c)
    behaviours = {i: behaviour for i in range(c)}
    server.script(behaviours, config)
    generator = LoadGenerator(server.base_url, MODEL)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        run = run_coroutine(generator.run(config))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    for rec in run.records:
        _check(rec, behaviours.get(rec.index, "good"))
    assert peak < MEMORY_BOUND, f"{behaviour}: the client's memory grew by {peak / MIB:.1f} MiB at its peak"

"""Simulator faults, ground-truth trace and Prometheus metrics, over real subprocesses.

Every fault is checked where it matters: it must reach our load generator as the
documented ``ErrorKind`` (docs/simulator.md has the table), and the official
``openai`` SDK must still parse every response that is not broken on purpose.
The trace test measures the load generator's timing error against the server's
own record of when it wrote each chunk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import statistics
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from pytest_infmax.load.generator import encode_body
from pytest_infmax.load.plan import LoadConfig
from pytest_infmax.load.scenarios import Scenario, plan_request
from pytest_infmax.records import ErrorKind, RequestRecord, TokenSource
from pytest_infmax.run.results import LoadResult
from pytest_infmax.run.runner import Infmax
from pytest_infmax.servers.launch import Server, ServerConfig, running_server
from pytest_infmax.sim.faults import NO_FAULT, FaultSpec, FaultSpecError, parse_fault_header

FAULT = "X-Infmax-Fault"
SMALL = Scenario("faults", 16, 8)  # 13-16 prompt tokens, 6-8 output tokens
FAST = ("--decode-step-ms", "1")


@pytest.fixture(scope="module")
def sim_503(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Every request without an X-Infmax-Fault header fails with 503; the header
    replaces that for one request ('none': a normal answer)."""
    config = ServerConfig(sim_args=(*FAST, "--fault-status", "503"))
    with running_server(config, tmp_path_factory.mktemp("sim_503")) as server:
        yield server


def _run(server: Server, scenario: Scenario = SMALL, request_timeout: float = 30.0, **kwargs: Any) -> LoadResult:
    kwargs.setdefault("concurrency", 2)
    kwargs.setdefault("num_requests", 4)
    kwargs.setdefault("warmup", 0)
    return Infmax(server, request_timeout=request_timeout).run(scenario, **kwargs)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _trace(server: Server, query: str = "") -> dict[str, Any]:
    return _get_json(f"{server.base_url}/sim/trace{query}")


def _body_sha256(server: Server, scenario: Scenario, record: RequestRecord, seed: int = 0) -> str:
    """The trace's key for a load-generator request: the sha256 of the exact body
    it sent (the body depends only on scenario, index and seed)."""
    plan = plan_request(scenario, record.index, seed)
    body = encode_body(plan, server.model, LoadConfig(scenario, concurrency=1, seed=seed))
    return hashlib.sha256(body).hexdigest()


def _truth(
    trace: dict[str, dict[str, Any]], server: Server, scenario: Scenario, record: RequestRecord
) -> dict[str, Any]:
    truth = trace.get(_body_sha256(server, scenario, record))
    assert truth is not None, (
        f"no trace entry matches request {record.index}: has the load generator's body (scenarios.request_body, "
        f"load.encode_body) changed? _body_sha256 must rebuild it byte for byte"
    )
    return truth


def _sdk(server: Server, fault: str | None = "none") -> openai.OpenAI:
    headers = {FAULT: fault} if fault is not None else {}
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=30, default_headers=headers
    )


# -- each fault reaches the load generator as its documented error kind -------------------


FAULT_CASES = [
    # (sim flags, expected error kind (None: success), message fragment, the trace's fault)
    (("--fault-status", "503"), ErrorKind.HTTP, "HTTP 503: injected fault: 503 Service Unavailable", "status=503"),
    (("--fault-status", "429"), ErrorKind.HTTP, "HTTP 429: injected fault: 429 Too Many Requests", "status=429"),
    (("--fault-status", "500"), ErrorKind.HTTP, "HTTP 500: injected fault: 500 Internal Server Error", "status=500"),
    (("--fault-reset-after", "3"), ErrorKind.DISCONNECT, "connection lost mid-response", "reset_after=3"),
    (("--fault-reset-after", "0"), ErrorKind.DISCONNECT, "Connection reset by peer", "reset_after=0"),
    (("--fault-malformed", "invalid_json"), ErrorKind.PROTOCOL, "SSE data is not JSON", "malformed=invalid_json"),
    (
        ("--fault-malformed", "no_done+no_finish"),
        ErrorKind.DISCONNECT,
        "stream ended before a finish_reason or [DONE]",
        "malformed=no_done+no_finish",
    ),
    (("--fault-malformed", "no_done"), None, "", "malformed=no_done"),
    (("--fault-malformed", "no_finish"), None, "", "malformed=no_finish"),
    (
        ("--fault-malformed", "split,no_space,comment,empty_choices"),
        None,
        "",
        "malformed=split+no_space+empty_choices+comment",
    ),
]


@pytest.mark.parametrize(
    "flags, kind, message, described", FAULT_CASES, ids=[" ".join(case[0]) for case in FAULT_CASES]
)
def test_fault_reaches_the_load_generator_as_its_error_kind(
    tmp_path: Path, flags: tuple[str, ...], kind: ErrorKind | None, message: str, described: str
) -> None:
    with running_server(ServerConfig(sim_args=(*FAST, *flags)), tmp_path) as server:
        result = _run(server)
        trace = _trace(server)["requests"]
    assert len(result.records) == 4
    for record in result.records:
        assert record.error_kind is kind, record.error_message
        assert message in (record.error_message or ""), record.error_message
        if kind is None:
            assert record.output_tokens_source is TokenSource.USAGE
            assert record.output_tokens == len(record.chunk_times) == record.requested_output_tokens
    # The server's side agrees: every request got the fault, and the trace says so.
    assert len(trace) == 4
    assert {t["fault"] for t in trace} == {described}
    if flags[0] == "--fault-reset-after":
        assert {t["outcome"] for t in trace} == {"reset"}
        assert all(t["completion_tokens"] == int(flags[1]) for t in trace)
        # The client never sees more than the server wrote before the reset.
        assert all(len(r.chunk_times) <= int(flags[1]) for r in result.records)


def test_no_usage_falls_back_to_counted_chunks(tmp_path: Path) -> None:
    with running_server(ServerConfig(sim_args=(*FAST, "--fault-malformed", "no_usage")), tmp_path) as server:
        result = _run(server)
    for record in result.records:
        assert record.ok, record.error_message
        assert record.output_tokens_source is TokenSource.CHUNKS
        assert record.input_tokens_source is TokenSource.REQUEST  # token ids we sent: still exact
        assert record.output_tokens == record.requested_output_tokens


def test_stall_longer_than_the_timeout_is_a_timeout(tmp_path: Path) -> None:
    flags = (*FAST, "--fault-stall-seconds", "60", "--fault-stall-after", "2")
    with running_server(ServerConfig(sim_args=flags), tmp_path) as server:
        result = _run(server, request_timeout=0.5, num_requests=2)
    for record in result.records:
        assert record.error_kind is ErrorKind.TIMEOUT, record.error_message
        assert len(record.chunk_times) == 2  # the tokens before the stall arrived


def test_stall_shorter_than_the_timeout_is_a_gap(tmp_path: Path) -> None:
    flags = (*FAST, "--fault-stall-seconds", "0.3", "--fault-stall-after", "3")
    with running_server(ServerConfig(sim_args=flags), tmp_path) as server:
        result = _run(server, num_requests=2)
        trace = {t["body_sha256"]: t for t in _trace(server)["requests"]}
    for record in result.records:
        assert record.ok, record.error_message
        client_gaps = [b - a for a, b in zip(record.chunk_times, record.chunk_times[1:])]
        # The client stamps a chunk when it reads it; under CPU contention it may read
        # the chunk before the stall late, which shortens the gap it sees a little.
        assert client_gaps[2] >= 0.25, client_gaps
        server_times = _truth(trace, server, SMALL, record)["chunk_mono"]
        assert server_times[3] - server_times[2] >= 0.3


def test_crash_after_n_requests(tmp_path: Path) -> None:
    """Requests up to N succeed, the one that triggers the crash is cut off, later
    ones cannot connect; the trace file still holds every finished request."""
    trace_file = tmp_path / "trace.jsonl"
    flags = (*FAST, "--crash-after", "3", "--trace-file", str(trace_file))
    with running_server(ServerConfig(sim_args=flags), tmp_path) as server:
        result = _run(server, concurrency=1, num_requests=6)
        assert server.process is not None
        assert server.process.wait(timeout=10) == 1
        assert "injected crash (--crash-after 3)" in server.log_tail()
    kinds = [r.error_kind for r in result.records]
    assert kinds[:4] == [None, None, None, ErrorKind.DISCONNECT]
    # Later requests cannot connect. The first one may race the dying process: the
    # client reconnects within microseconds of the drop, and a connection the kernel
    # accepted just before the exit is then reset (disconnected, not refused).
    assert kinds[5] is ErrorKind.CONNECT
    assert kinds[4] in (ErrorKind.CONNECT, ErrorKind.DISCONNECT), result.records[4].error_message
    lines = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert [line["outcome"] for line in lines] == ["ok", "ok", "ok"]
    assert [line["completion_tokens"] for line in lines] == [r.output_tokens for r in result.records[:3]]


def test_fault_rate_hits_a_reproducible_fraction(tmp_path: Path) -> None:
    flags = (*FAST, "--fault-status", "503", "--fault-rate", "0.5", "--seed", "3")
    with running_server(ServerConfig(sim_args=flags), tmp_path) as server:
        result = _run(server, concurrency=1, num_requests=20)
        trace = _trace(server)["requests"]
    failed = [r.index for r in result.records if not r.ok]
    assert 0 < len(failed) < 20
    assert all(r.error_kind is ErrorKind.HTTP for r in result.records if not r.ok)
    # With one request in flight, arrival order is request order: server and client agree.
    assert [t["seq"] for t in trace if t["fault"]] == failed
    assert [t["outcome"] for t in trace if not t["fault"]] == ["ok"] * (20 - len(failed))


# -- per-request header faults, and the openai SDK ------------------------------------------


@pytest.mark.parametrize(
    "modes",
    ["split", "no_space", "comment", "empty_choices", "no_done", "no_usage", "split+no_space+comment+empty_choices"],
)
def test_sdk_parses_tolerable_malformations(sim_503: Server, modes: str) -> None:
    client = _sdk(sim_503, f"malformed={modes}")
    stream = client.completions.create(
        model=sim_503.model, prompt="one two three", max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    texts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert len([t for t in texts if t]) == 6 and finish == "length"
    if "no_usage" in modes:
        assert usage is None
    else:
        assert usage is not None and usage.completion_tokens == 6 and usage.prompt_tokens == 3

    chat = _sdk(sim_503, f"malformed={modes}").chat.completions.create(
        model=sim_503.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    contents = [c.choices[0].delta.content for c in chat if c.choices and c.choices[0].delta.content]
    assert len(contents) == 4


def test_header_none_exempts_a_request_from_the_flag_faults(sim_503: Server) -> None:
    completion = _sdk(sim_503, "none").completions.create(model=sim_503.model, prompt=[1, 2, 3], max_tokens=5)
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    with pytest.raises(openai.InternalServerError) as excinfo:  # no header: the --fault-status 503
        _sdk(sim_503, None).completions.create(model=sim_503.model, prompt=[1], max_tokens=2)
    assert excinfo.value.status_code == 503
    assert "injected fault: 503" in str(excinfo.value)


def test_sdk_sees_429_with_retry_after(sim_503: Server) -> None:
    with pytest.raises(openai.RateLimitError) as excinfo:
        _sdk(sim_503, "status=429; retry_after=7").completions.create(model=sim_503.model, prompt="x", max_tokens=2)
    error = excinfo.value
    assert error.status_code == 429
    assert error.response.headers["Retry-After"] == "7"
    assert isinstance(error.body, dict) and error.body["code"] == "rate_limit_exceeded"


def test_bad_fault_header_is_a_400_naming_the_problem(sim_503: Server) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        _sdk(sim_503, "stal=2").completions.create(model=sim_503.model, prompt="x", max_tokens=2)
    assert "X-Infmax-Fault: unknown key 'stal'" in str(excinfo.value)


@pytest.mark.asyncio
async def test_header_targets_one_request_among_concurrent_ones(sim_503: Server) -> None:
    """Three concurrent requests, one reset after 2 tokens: only that one breaks,
    and the trace (keyed by X-Request-Id, which is echoed) says which."""
    body = {"prompt": "a b c", "max_tokens": 8, "stream": True}
    url = f"{sim_503.base_url}/v1/completions"
    before = _trace(sim_503)["next_since"]

    async def one(session: aiohttp.ClientSession, request_id: str, fault: str) -> str:
        headers = {"X-Request-Id": request_id, FAULT: fault}
        try:
            async with session.post(url, json=body, headers=headers) as response:
                assert response.headers["X-Request-Id"] == request_id
                data = await response.read()
        except aiohttp.ClientPayloadError:
            return "reset"
        return "ok" if data.endswith(b"data: [DONE]\n\n") else "truncated"

    async with aiohttp.ClientSession() as session:
        outcomes = await asyncio.gather(
            one(session, "r-0", "none"), one(session, "r-1", "reset_after=2"), one(session, "r-2", "none")
        )
    assert outcomes == ["ok", "reset", "ok"]
    trace = {t["x_request_id"]: t for t in _trace(sim_503, f"?since={before}")["requests"]}
    assert (trace["r-0"]["outcome"], trace["r-1"]["outcome"], trace["r-2"]["outcome"]) == ("ok", "reset", "ok")
    assert trace["r-1"]["fault"] == "reset_after=2" and trace["r-1"]["chunk_tokens"] == [1, 1]


# -- the trace as ground truth for the load generator's timing --------------------------------


def test_trace_is_ground_truth_for_the_load_generators_timing(tmp_path: Path) -> None:
    """Map every client timestamp to wall-clock time (the run's epoch_origin /
    clock_origin) and compare it with the time the server wrote that chunk. The
    difference is loopback transfer plus the client's own delay in stamping it."""
    scenario = Scenario("trace", 64, 32)
    with running_server(ServerConfig(sim_args=("--decode-step-ms", "2")), tmp_path) as server:
        result = Infmax(server).run(scenario, concurrency=4, num_requests=32, warmup=4)
        trace = {t["body_sha256"]: t for t in _trace(server)["requests"]}
    run = result.run

    def wall(t: float) -> float:
        return run.epoch_origin + (t - run.clock_origin)

    first_errors: list[float] = []
    chunk_errors: list[float] = []
    for record in result.records:
        assert record.ok, record.error_message
        truth = _truth(trace, server, scenario, record)
        assert truth["outcome"] == "ok"
        assert truth["prompt_tokens"] == record.input_tokens
        assert truth["completion_tokens"] == record.output_tokens
        assert truth["chunk_tokens"] == list(record.chunk_tokens)
        assert len(truth["chunk_wall"]) == len(record.chunk_times)
        assert record.first_token_time is not None
        first_errors.append(wall(record.first_token_time) - truth["first_token_wall"])
        chunk_errors += [wall(c) - s for c, s in zip(record.chunk_times, truth["chunk_wall"])]
    first_ms = sorted(e * 1000 for e in first_errors)
    chunk_ms = sorted(e * 1000 for e in chunk_errors)
    p99 = chunk_ms[int(0.99 * (len(chunk_ms) - 1))]
    print(
        f"\nclient - server timing error over {len(first_ms)} first tokens / {len(chunk_ms)} chunks: "
        f"first token p50 {statistics.median(first_ms):.3f} ms, max {first_ms[-1]:.3f} ms; "
        f"chunks p50 {statistics.median(chunk_ms):.3f} ms, p99 {p99:.3f} ms, "
        f"min {chunk_ms[0]:.3f} ms, max {chunk_ms[-1]:.3f} ms"
    )
    # Causality: nothing arrives before it was written (1 ms for clock mapping).
    assert chunk_ms[0] > -1.0 and first_ms[0] > -1.0
    assert statistics.median(first_ms) < 5.0
    assert statistics.median(chunk_ms) < 5.0


def test_trace_since_clear_and_request_ids(sim_503: Server) -> None:
    start = _trace(sim_503)["next_since"]
    client = _sdk(sim_503, "none")
    for n in range(3):
        client.completions.create(
            model=sim_503.model, prompt="x y", max_tokens=2, extra_headers={"X-Request-Id": f"since-{n}"}
        )
    newer = _trace(sim_503, f"?since={start}")
    assert [t["x_request_id"] for t in newer["requests"]] == ["since-0", "since-1", "since-2"]
    assert all(t["stream"] is False and t["completion_tokens"] == 2 for t in newer["requests"])
    last = newer["next_since"]
    assert _trace(sim_503, f"?since={last}")["requests"] == []
    cleared = _trace(sim_503, f"?since={start}&clear=1")
    assert len(cleared["requests"]) == 3
    assert _trace(sim_503)["requests"] == []
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        _trace(sim_503, "?since=abc")
    assert excinfo.value.code == 400


# -- Prometheus /metrics ---------------------------------------------------------------------

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def _scrape(server: Server) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as response:
        content_type = response.headers["Content-Type"]
        text = response.read().decode()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) vllm:\S+ ", line), line
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a valid exposition line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        assert ("model_name", server.model) in labels, line
        samples[(match["name"], frozenset(kv for kv in labels if kv[0] != "model_name"))] = float(match["value"])
    return content_type, samples


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_metrics_use_vllm_names_and_agree_with_the_trace(tmp_path: Path) -> None:
    # One running sequence at a time, two clients: requests queue, so queue time shows.
    with running_server(ServerConfig(sim_args=(*FAST, "--max-num-seqs", "1")), tmp_path) as server:
        result = _run(server, concurrency=2, num_requests=6)
        trace = _trace(server)["requests"]
        content_type, samples = _scrape(server)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert all(r.ok for r in result.records)
    assert _value(samples, "vllm:num_requests_running") == 0
    assert _value(samples, "vllm:num_requests_waiting") == 0
    assert _value(samples, "vllm:kv_cache_usage_perc") == _value(samples, "vllm:gpu_cache_usage_perc") == 0
    assert _value(samples, "vllm:prompt_tokens_total") == sum(t["prompt_tokens"] for t in trace)
    assert _value(samples, "vllm:generation_tokens_total") == sum(t["completion_tokens"] for t in trace)
    assert _value(samples, "vllm:request_success_total", finished_reason="length") == 6
    for histogram in (
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
    ):
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for (name, labels), value in samples.items()
            if name == f"{histogram}_bucket"
        )
        counts = [value for _, value in buckets]
        assert counts == sorted(counts) and buckets[-1][0] == float("inf"), histogram
        assert _value(samples, f"{histogram}_count") == counts[-1]
    assert _value(samples, "vllm:time_to_first_token_seconds_count") == 6
    assert _value(samples, "vllm:e2e_request_latency_seconds_count") == 6
    itl_count = sum(t["completion_tokens"] - t["chunk_tokens"][0] for t in trace)
    assert _value(samples, "vllm:inter_token_latency_seconds_count") == itl_count
    ttft_sum = sum(t["first_token_mono"] - t["arrival_mono"] for t in trace)
    assert _value(samples, "vllm:time_to_first_token_seconds_sum") == pytest.approx(ttft_sum, rel=1e-6)
    queue_times = [t["scheduled_mono"] - t["queued_mono"] for t in trace]
    assert _value(samples, "vllm:request_queue_time_seconds_count") == 6
    assert _value(samples, "vllm:request_queue_time_seconds_sum") == pytest.approx(sum(queue_times), rel=1e-6)
    # A queued request waited for the whole of the other one: at least its 6+ steps of 1 ms.
    assert max(queue_times) >= 0.005


@pytest.mark.asyncio
async def test_metrics_gauge_running_requests(sim_503: Server) -> None:
    body = {"prompt": "x", "max_tokens": 100_000, "stream": True}
    async with aiohttp.ClientSession() as session:
        headers = {FAULT: "none"}
        async with session.post(f"{sim_503.base_url}/v1/completions", json=body, headers=headers) as response:
            await response.content.readline()  # the first token is out: it is running
            _, samples = _scrape(sim_503)
            assert _value(samples, "vllm:num_requests_running") == 1
            assert 0 < _value(samples, "vllm:kv_cache_usage_perc") <= 1


# -- the header grammar and flag validation ---------------------------------------------------


@pytest.mark.parametrize(
    "header, expected",
    [
        ("status=503", FaultSpec(status=503)),
        (" STATUS = 429 ; retry_after=0.5", FaultSpec(status=429, retry_after=0.5)),
        ("stall=2; stall_after=5", FaultSpec(stall_seconds=2, stall_after=5)),
        ("reset_after=5", FaultSpec(reset_after=5)),
        (
            "malformed=no_space+comment, malformed=no_done",
            FaultSpec(malformed=frozenset({"no_space", "comment", "no_done"})),
        ),
        ("none", NO_FAULT),
    ],
)
def test_fault_header_grammar(header: str, expected: FaultSpec) -> None:
    spec = parse_fault_header(header)
    assert spec == expected
    if spec.active:  # what the trace records parses back to the same faults
        assert parse_fault_header(spec.describe() or "") == spec


@pytest.mark.parametrize(
    "header, message",
    [
        ("", "empty value"),
        ("stall", "'stall': expected key=value"),
        ("status=abc", "status: expected an integer, got 'abc'"),
        ("status=200", "status must be an HTTP error status 400-599, got 200"),
        ("malformed=nope", "unknown malformed mode(s) nope"),
        ("none; status=503", "'none' cannot be combined"),
        ("reset_after=-1", "reset_after must be >= 0 tokens"),
        ("stal=2", "unknown key 'stal'"),
    ],
)
def test_fault_header_errors_say_what_is_wrong(header: str, message: str) -> None:
    with pytest.raises(FaultSpecError) as excinfo:
        parse_fault_header(header)
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--fault-status", "200"), "status must be an HTTP error status 400-599"),
        (("--fault-malformed", "no_space+bogus"), "unknown malformed mode(s) bogus"),
        (("--fault-rate", "1.5"), "--fault-rate must be between 0 and 1"),
        (("--crash-after", "-1"), "--crash-after must be >= 0"),
        (("--trace-capacity", "-1"), "--trace-capacity must be >= 0"),
    ],
)
def test_bad_fault_flags_are_usage_errors(flags: tuple[str, ...], message: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "pytest_infmax.sim", *flags], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 2
    assert message in completed.stderr


@pytest.mark.asyncio
async def test_metrics_kv_cache_usage_is_the_engines_when_it_models_one(tmp_path: Path) -> None:
    config = ServerConfig(sim_args=(*FAST, "--kv-cache-tokens", "4096"))
    with running_server(config, tmp_path) as server:
        body = {"prompt": "x", "max_tokens": 1000, "stream": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.base_url}/v1/completions", json=body) as response:
                await response.content.readline()  # running: its KV blocks are held
                _, samples = _scrape(server)
                stats = _get_json(f"{server.base_url}/sim/stats")
    assert stats["running"] == 1 and stats["kv_cache_usage"] > 0
    assert _value(samples, "vllm:kv_cache_usage_perc") == pytest.approx(stats["kv_cache_usage"])

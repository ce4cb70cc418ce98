"""The load generator's parsing and accounting, on recorded streams with recorded times."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import time
import tracemalloc
from array import array
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_infmax.load.generator import ResponseAccumulator, arrival_offsets, read_sse
from pytest_infmax.load.plan import LoadConfig, LoadConfigError
from pytest_infmax.load.scenarios import PRESETS, Scenario, plan_request, request_body
from pytest_infmax.load.streamclient import StreamError
from pytest_infmax.measure.metrics import compute_metrics
from pytest_infmax.records import ITL_EXPANSION_LIMIT, ErrorKind, RequestRecord, TokenSource


def _chunk(text: str, finish: str | None = None, usage: dict | None = None, chat: bool = False) -> str:
    if chat:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        obj = {"id": "c", "object": "chat.completion.chunk", "choices": [choice]}
    else:
        obj = {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    if usage is not None:
        obj["usage"] = usage
    return json.dumps(obj)


def _usage(prompt: int, completion: int) -> str:
    return json.dumps(
        {
            "id": "c",
            "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
    )


def replay(
    events: list[tuple[float, str]],
    send_time: float = 0.0,
    requested_input: int | None = None,
    sep: str = "\n",
    space: str = " ",
) -> RequestRecord:
    """Feed recorded (arrival time, raw SSE data) pairs through the real parser."""
    lines: list[tuple[float, bytes]] = []
    for t, data in events:
        lines.append((t, f"data:{space}{data}{sep}".encode()))
        lines.append((t, sep.encode()))
    times = iter([t for t, _ in lines])

    async def source():
        for _, line in lines:
            yield line

    rec = RequestRecord(index=0, send_time=send_time)
    acc = ResponseAccumulator(rec)
    end = lines[-1][0] if lines else send_time

    async def go():
        await read_sse(source(), acc, clock=lambda: next(times))
        acc.finish(end, requested_input)

    try:
        asyncio.run(go())
    except StreamError as exc:
        rec.error_kind, rec.error_message = exc.kind, str(exc)
    return rec


# A recorded stream: request sent at t=10.000; 5 tokens one per event, then usage and [DONE].
ONE_PER_EVENT = [
    (10.050, _chunk(" a")),
    (10.060, _chunk(" b")),
    (10.072, _chunk(" c")),
    (10.080, _chunk(" d")),
    (10.090, _chunk(" e", finish="length")),
    (10.091, _usage(100, 5)),
    (10.091, "[DONE]"),
]


def test_one_token_per_event_latencies_by_hand() -> None:
    rec = replay(ONE_PER_EVENT, send_time=10.0, requested_input=100)
    assert rec.ok
    assert rec.ttft == pytest.approx(0.050)
    # E2E ends at the last content token (10.090), as InferenceMAX's and vLLM's clients end it,
    # not at the usage chunk and [DONE] after it (10.091)
    assert rec.e2e == pytest.approx(0.090)
    # TPOT = (E2E - TTFT) / (out - 1) = (0.090 - 0.050) / 4: the mean of the per-token gaps
    assert rec.tpot == pytest.approx(0.010)
    assert rec.itls() == pytest.approx([0.010, 0.012, 0.008, 0.010])
    assert (rec.output_tokens, rec.output_tokens_source) == (5, TokenSource.USAGE)
    assert (rec.input_tokens, rec.input_tokens_source) == (100, TokenSource.USAGE)
    assert list(rec.chunk_tokens) == [1] * 5 and rec.chunk_tokens_source is TokenSource.USAGE


def test_a_records_token_counts_are_an_array_the_collector_does_not_walk() -> None:
    """A run keeps every record alive, and each collection that meets a list of counts walks it
    item by item: at 1,000 streams of 256 tokens the young collections' longest was 3.8 ms
    with lists, 1.2 with arrays (docs/load-generator.md, "What the young collections meet")."""
    streamed = replay(ONE_PER_EVENT, send_time=10.0, requested_input=100)
    given = RequestRecord(0, chunk_times=[0.0, 0.1, 0.3], chunk_tokens=[1, 2, 1])
    for rec in (
        streamed,
        given,
        RequestRecord.from_dict(given.to_dict()),
        RequestRecord.from_dict(given.to_dict(arrays=True)),
    ):
        assert isinstance(rec.chunk_tokens, array) and rec.chunk_tokens.typecode == "q"
        assert not any(isinstance(x, int) for x in gc.get_referents(rec.chunk_tokens))
    assert list(RequestRecord.from_dict(given.to_dict(arrays=True)).chunk_tokens) == [1, 2, 1]
    # a count past int64 (a hostile server's) keeps the exact ints, and the figures still come
    hostile = RequestRecord(0, chunk_times=[0.0, 0.1, 0.3], chunk_tokens=[1, 10**20, 1])
    assert hostile.chunk_tokens == [1, 10**20, 1]
    assert RequestRecord.from_dict(hostile.to_dict(arrays=True)).chunk_tokens == [1, 10**20, 1]
    assert len(hostile.itl_array()) > 0


def test_per_token_latencies_stay_bounded_in_memory_whatever_the_counts() -> None:
    """A record whose chunk counts are absurd (a report file, or a server before its usage
    was checked: ``completion_tokens: 10**15`` was an INTERNALERROR MemoryError here) expands
    to at most ITL_EXPANSION_LIMIT gaps (plus one per chunk), with the chunks' weights kept."""
    rec = RequestRecord.from_dict(
        {"index": 0, "send_time": 0.0, "first_token_time": 0.5, "end_time": 3.0,
         "chunk_times": [0.5, 1.0, 3.0], "chunk_tokens": [1, 10**15, 3 * 10**15], "output_tokens": 4 * 10**15 + 1}
    )  # fmt: skip
    tracemalloc.start()
    try:
        gaps = rec.itls()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * (1 << 20), f"itls() peaked at {peak / (1 << 20):.1f} MiB"
    assert len(gaps) <= ITL_EXPANSION_LIMIT + 2
    # chunk 2: 10**15 gaps of 0.5/10**15; chunk 3: three times as many gaps of 2/(3*10**15)
    small, large = gaps.count(0.5 / 10**15), gaps.count(2.0 / (3 * 10**15))
    assert small + large == len(gaps)
    assert large / small == pytest.approx(3.0, rel=1e-3)
    # a record whose counts are within the limit is expanded exactly, as before
    exact = RequestRecord(0, chunk_times=[0.0, 0.1, 0.4], chunk_tokens=[1, 1, 3])
    assert exact.itls() == pytest.approx([0.1, 0.1, 0.1, 0.1])


@settings(max_examples=200, deadline=None)
@given(
    times=st.lists(st.floats(0, 1e3, allow_nan=False), min_size=0, max_size=40),
    tokens=st.lists(st.one_of(st.integers(-3, 50), st.integers(10**5, 10**20)), max_size=45),
)
def test_per_token_latencies_are_the_per_chunk_definition(times: list[float], tokens: list[int]) -> None:
    """itl_array (numpy, for speed) gives what the per-chunk loop it replaced gave: chunk i's
    gap over its count, once per token (a missing or non-positive count: one), and past
    ITL_EXPANSION_LIMIT tokens a number of repeats in proportion to the count."""
    times = sorted(times)
    rec = RequestRecord(0, chunk_times=times, chunk_tokens=tokens)
    counts = [max(tokens[i] if i < len(tokens) else 1, 1) for i in range(1, len(times))]
    total = sum(counts)
    expected: list[float] = []
    for i, k in enumerate(counts, start=1):
        repeats = k if total <= ITL_EXPANSION_LIMIT else max(k * ITL_EXPANSION_LIMIT // total, 1)
        expected.extend([(times[i] - times[i - 1]) / k] * repeats)
    got = rec.itl_array()
    assert got.shape == (len(expected),)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_multi_token_events_apportion_usage_by_text() -> None:
    # stream_interval-style chunks: " aa bb" (6 chars), " cc" (3), " dd ee" (6); usage says 5 tokens.
    rec = replay(
        [
            (1.10, _chunk(" aa bb")),
            (1.16, _chunk(" cc")),
            (1.22, _chunk(" dd ee", finish="length")),
            (1.23, _usage(8, 5)),
            (1.23, "[DONE]"),
        ],
        send_time=1.0,
    )
    assert list(rec.chunk_tokens) == [2, 1, 2]
    assert rec.chunk_tokens_source is TokenSource.APPORTIONED
    # Per-token ITL: chunk 2 (1 token, 60 ms after chunk 1) -> [0.06]; chunk 3 (2 tokens, 60 ms) -> [0.03, 0.03]
    assert rec.itls() == pytest.approx([0.06, 0.03, 0.03])
    assert rec.tpot == pytest.approx((0.22 - 0.10) / 4)  # to the last content chunk, not the usage


def test_continuous_usage_gives_exact_chunk_counts() -> None:
    rec = replay(
        [
            (0.1, _chunk(" x", usage={"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})),
            (0.2, _chunk(" y", finish="length", usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})),
            (0.2, "[DONE]"),
        ]
    )
    assert list(rec.chunk_tokens) == [3, 1] and rec.chunk_tokens_source is TokenSource.USAGE_DELTA
    assert rec.output_tokens == 4


def test_no_usage_counts_chunks_and_says_so() -> None:
    rec = replay(
        [(0.1, _chunk("hi", chat=True)), (0.2, _chunk(" there", "stop", chat=True)), (0.2, "[DONE]")],
        requested_input=12,
    )
    assert rec.ok
    assert (rec.output_tokens, rec.output_tokens_source) == (2, TokenSource.CHUNKS)
    assert (rec.input_tokens, rec.input_tokens_source) == (12, TokenSource.REQUEST)
    assert rec.chunk_tokens_source is TokenSource.CHUNKS


def test_sse_quirks_real_servers_send() -> None:
    # No space after "data:", CRLF line ends: still parsed identically.
    rec = replay(ONE_PER_EVENT, send_time=10.0, sep="\r\n", space="")
    assert rec.ok and rec.output_tokens == 5 and rec.ttft == pytest.approx(0.05)


def test_comment_lines_and_multiline_data_are_handled() -> None:
    obj = json.loads(_chunk(" hi", finish="length"))
    body = [
        b": keep-alive\n",
        b'data: {"id": "c",\n',
        b"data: " + json.dumps(obj)[1:].encode() + b"\n",
        b"\n",
        b"data: [DONE]\n",
        b"\n",
    ]

    async def source():
        for line in body:
            yield line

    rec = RequestRecord(index=0)
    acc = ResponseAccumulator(rec)
    asyncio.run(read_sse(source(), acc, clock=lambda: 1.0))
    acc.finish(1.0, None)
    assert rec.ok and rec.output_tokens == 1


@pytest.mark.parametrize(
    "events, kind",
    [
        ([(0.1, _chunk(" a"))], ErrorKind.DISCONNECT),  # ends with neither finish_reason nor [DONE]
        ([(0.1, _chunk("", finish="length")), (0.1, "[DONE]")], ErrorKind.EMPTY),
        ([(0.1, "{not json")], ErrorKind.PROTOCOL),
        ([(0.1, json.dumps({"error": {"message": "CUDA out of memory"}}))], ErrorKind.SERVER),
    ],
    ids=["no-done", "empty", "not-json", "error-object"],
)
def test_broken_streams_are_typed_errors(events, kind) -> None:
    rec = replay(events)
    assert rec.error_kind is kind and rec.error_message


def test_invalid_utf8_is_named_whichever_msgspec_is_installed() -> None:
    # msgspec < 0.23 raised UnicodeDecodeError for invalid UTF-8 inside a string, 0.23 a
    # DecodeError("Invalid UTF-8 encoded string"); the user is told the same either way.
    acc = ResponseAccumulator(RequestRecord(index=0))
    bad = b'{"choices": [{"index": 0, "text": "\xff\xfe bad", "finish_reason": null}]}'
    with pytest.raises(StreamError, match=r"^SSE data is not valid UTF-8 \(") as info:
        acc.on_event(bad, 1.0)
    assert info.value.kind is ErrorKind.PROTOCOL
    with pytest.raises(StreamError, match=r"^SSE data is not JSON \("):  # valid UTF-8, broken JSON
        acc.on_event(b'{"choices": [', 1.0)


def test_done_without_finish_reason_and_finish_without_done_both_succeed() -> None:
    assert replay([(0.1, _chunk(" a")), (0.2, "[DONE]")]).ok
    assert replay([(0.1, _chunk(" a", finish="length"))]).ok


def test_recorded_run_metrics_by_hand() -> None:
    """Two recorded requests plus a warm-up and a failure, through parser and metrics."""
    warm = replay(ONE_PER_EVENT, send_time=9.0)
    warm.warmup = True
    r1 = replay(ONE_PER_EVENT, send_time=10.0)  # 100 in, 5 out, ends 10.091
    r2 = replay(
        [(10.2, _chunk(" x y")), (10.4, _chunk(" z w", "length")), (10.4, _usage(50, 4)), (10.4, "[DONE]")],
        send_time=10.05,
    )  # 50 in, 4 out, ends 10.4
    failed = RequestRecord(index=3, send_time=10.1, end_time=10.3, error_kind=ErrorKind.HTTP, error_message="HTTP 500")
    m = compute_metrics([warm, r1, r2, failed], num_gpus=2)
    # Measured window: earliest send 10.0 to latest end 10.4 = 0.4 s (the warm-up is excluded).
    assert m.duration == pytest.approx(0.4)
    assert (m.num_requests, m.num_ok, m.num_errors) == (3, 2, 1)
    assert m.error_rate == pytest.approx(1 / 3)
    # Tokens: input 100 + 50 = 150, output 5 + 4 = 9, over 0.4 s and 2 GPUs.
    assert m.input_throughput == pytest.approx(150 / 0.4)
    assert m.output_throughput == pytest.approx(9 / 0.4)
    assert m.throughput_per_gpu == pytest.approx(159 / 0.4 / 2)
    # TTFT: r1 0.050, r2 0.150; TPOT: r1 0.010, r2 (0.35 - 0.15) / 3.
    assert m.ttft.mean == pytest.approx(0.1)
    assert m.tpot.values.tolist() == pytest.approx(sorted([0.010, 0.2 / 3]))
    assert m.interactivity.median == pytest.approx(np.median([1 / 0.010, 3 / 0.2]))
    # ITL: r1 [0.010, 0.012, 0.008, 0.010]; r2: 2 tokens 0.2 s after the first chunk -> [0.1, 0.1].
    assert sorted(m.itl.values.tolist()) == pytest.approx(sorted([0.010, 0.012, 0.008, 0.010, 0.1, 0.1]))


def test_arrival_processes() -> None:
    rng = np.random.default_rng(1)
    poisson = np.diff(arrival_offsets(20000, rate=10.0, burstiness=1.0, rng=rng))
    assert poisson.mean() == pytest.approx(0.1, rel=0.03)
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    bursty = np.diff(arrival_offsets(20000, rate=10.0, burstiness=0.25, rng=rng))
    assert bursty.mean() == pytest.approx(0.1, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.08)  # gamma shape k: CV 1/sqrt(k)
    assert arrival_offsets(3, rate=float("inf"), burstiness=1.0, rng=rng).tolist() == [0, 0, 0]


def test_requests_are_reproducible_and_exact() -> None:
    scenario = PRESETS["1k1k"]
    a = plan_request(scenario, 7, seed=3)
    assert a == plan_request(scenario, 7, seed=3)
    assert a != plan_request(scenario, 8, seed=3)
    assert 819 <= a.input_len <= 1024 and 819 <= a.output_len <= 1024
    assert len(a.token_ids) == a.input_len
    body = request_body(a, "m", "completions")
    assert body["max_tokens"] == a.output_len and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}
    chat = plan_request(Scenario("c", 64, 8, endpoint="chat"), 0, seed=0)
    assert len(chat.text.split()) == chat.input_len
    assert "messages" in request_body(chat, "m", "chat")


def test_presets_follow_inferencemax() -> None:
    assert {k: (v.isl, v.osl) for k, v in PRESETS.items() if "mini" not in k} == {
        "1k1k": (1024, 1024),
        "1k8k": (1024, 8192),
        "8k1k": (8192, 1024),
    }
    assert (PRESETS["1k1k-mini"].isl, PRESETS["1k1k-mini"].osl) == (128, 128)
    cfg = LoadConfig(PRESETS["1k1k"], concurrency=16)
    assert (cfg.effective_num_requests, cfg.effective_warmup) == (160, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # before: accepted, then 10**9 tasks; 2e9 planned arrivals; one request for a 2 s run
        ({"concurrency": 10**9}, "concurrency must be a whole number >= 1 and <= 100000 or None, got 1000000000"),
        ({"rate": 1e9, "duration": 1}, r"plans 1e\+09 requests, more than the 10000000 one run may send"),
        ({"rate": math.inf, "duration": 2}, "rate=math.inf sends every request at once, so duration=2 does not"),
        # before: a TypeError or a numpy error deep in the run
        ({"concurrency": 2.5}, r"concurrency must be a whole number >= 1 .* got 2.5 \(float\)"),
        ({"concurrency": "4"}, r"concurrency must be a whole number >= 1 .* got '4' \(str\)"),
        ({"concurrency": 1, "seed": "abc"}, r"seed must be a whole number >= 0 .* got 'abc' \(str\)"),
        ({"concurrency": 1, "warmup": 1.5}, "warmup must be a whole number >= 0"),
        ({"rate": math.nan, "num_requests": 2}, r"rate must be > 0 requests/s \(a number; math.inf: all at once\)"),
        ({"concurrency": 1, "request_timeout": 0}, r"request_timeout must be > 0 seconds \(a number\), got 0"),
        ({"concurrency": 1, "duration": math.inf}, "duration must be > 0 seconds"),
        ({"concurrency": 1, "extra_body": "x"}, "extra_body must be a mapping"),
    ],
)
def test_bad_run_options_are_refused_up_front_naming_the_option(kwargs, message) -> None:
    with pytest.raises(LoadConfigError, match=message):
        LoadConfig(PRESETS["1k1k-mini"], **kwargs)


def test_tiny_scenarios_never_draw_empty_prompts_or_max_tokens_0() -> None:
    """Before: Scenario(osl=1) (range_ratio 0.8: int(0.8) = 0) drew max_tokens=0 for about half
    the requests, and a tiny range_ratio drew 0-token prompts."""
    for scenario in (Scenario("osl1", 16, 1), Scenario("tiny-ratio", 8, 8, range_ratio=0.01)):
        lengths = [(p.input_len, p.output_len) for p in (plan_request(scenario, i, 0) for i in range(200))]
        assert min(isl for isl, _ in lengths) >= 1 and min(osl for _, osl in lengths) >= 1, scenario
        assert len({osl for _, osl in lengths}) > 1 or scenario.osl == 1  # still a range where there is one
    with pytest.raises(ValueError, match=r"isl must be a whole number of tokens >= 1, got '4'"):
        Scenario("s", "4", 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of concurrency"),
        ({"concurrency": 2, "rate": 1.0}, "exactly one of concurrency"),
        ({"concurrency": 0}, "concurrency must be a whole number >= 1"),
        ({"rate": 5.0}, "needs an end"),
        ({"rate": -1.0, "num_requests": 3}, "rate must be > 0"),
        ({"concurrency": 1, "burstiness": 0}, "burstiness must be > 0"),
    ],
)
def test_bad_load_arguments(kwargs, message) -> None:
    with pytest.raises(LoadConfigError, match=message):
        LoadConfig(PRESETS["1k1k"], **kwargs)


def test_runs_start_on_uvloop_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_infmax.load.generator import run_coroutine
    from pytest_infmax.load.plan import LoadConfigError

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_coroutine(loop_module()).startswith("uvloop")
    monkeypatch.setenv("INFMAX_EVENT_LOOP", "asyncio")
    assert run_coroutine(loop_module()).startswith("asyncio")
    monkeypatch.setenv("INFMAX_EVENT_LOOP", "trio")
    coro = loop_module()
    with pytest.raises(LoadConfigError, match="INFMAX_EVENT_LOOP='trio': allowed are 'uvloop'"):
        run_coroutine(coro)
    coro.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_run_coroutine_never_turns_its_result_into_text(monkeypatch: pytest.MonkeyPatch, loop: str) -> None:
    """Python 3.11's ``asyncio.Runner`` formats ``repr(main_task)`` as it exits, and with
    it the task's result: for a run, every chunk timestamp of every record turned into
    text (0.6 CPU-s per million tokens). The result travels outside the task."""
    from pytest_infmax.load.generator import run_coroutine

    formatted: list[str] = []

    class Result:
        def __repr__(self) -> str:
            formatted.append("repr")
            return "Result()"

    async def produce() -> Result:
        return Result()

    monkeypatch.setenv("INFMAX_EVENT_LOOP", loop)
    assert isinstance(run_coroutine(produce()), Result)
    assert formatted == []

    async def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run_coroutine(fail())


def test_a_duration_bound_closed_loop_measures_at_least_its_duration() -> None:
    """A slot freed before ``duration`` has passed since the first send is filled again, so the
    measured window (first send to last end) is never shorter than asked. The sender here
    stamps each request as written 2 ms after the loop hands it over and answered at once:
    the first send comes after the loop's start, and every slot frees a hair before any
    deadline taken from that start. A deadline from the loop's start measured 2 ms less."""
    import itertools
    import time
    from types import SimpleNamespace

    from pytest_infmax.load.generator import LoadGenerator
    from pytest_infmax.measure.metrics import wall_time

    class LateStampingSender:
        config = SimpleNamespace(
            scenario=Scenario("tiny", 8, 4), seed=0, tokens=LoadConfig(Scenario("t", 8, 4), concurrency=1).tokens
        )

        async def one(self, plan, warmup, scheduled, ready):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0)
            sent = time.perf_counter() + 0.002
            return RequestRecord(index=plan.index, warmup=warmup, ready_time=ready, send_time=sent, end_time=sent)

    records: list[RequestRecord] = []
    loop = LoadGenerator("http://127.0.0.1:9", "m")._closed_loop
    for duration in (0.02, 0.05):
        records.clear()
        asyncio.run(loop(LateStampingSender(), 2, None, duration, itertools.count(), False, records.append))  # type: ignore[arg-type]
        assert wall_time(records) >= duration, (duration, wall_time(records))


def _busy(seconds: float) -> None:
    """CPU work standing in for a request's planning, encoding and write."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _CountingSender:
    """Stands in for ``_Sender``: each request costs 1 ms of CPU before its first await (as a
    real one plans, encodes and writes); all are answered once the last has started, so each
    start is a first request. ``starts`` counts them."""

    def __init__(self, config: LoadConfig, total: int) -> None:
        self.config = config
        self.total = total
        self.starts = 0
        self.all_started = asyncio.Event()

    async def one(self, plan, warmup, scheduled, ready):  # type: ignore[no-untyped-def]
        self.starts += 1
        _busy(0.001)
        sent = time.perf_counter()
        if self.starts == self.total:
            self.all_started.set()
        await self.all_started.wait()
        return RequestRecord(index=plan.index, warmup=warmup, ready_time=ready, send_time=sent, end_time=sent)


async def _most_starts_between_polls(sender: _CountingSender, run: Any) -> int:
    """The most request starts in one event-loop iteration while ``run`` runs: a ticker task
    wakes once per iteration, and notes how many requests started since it last woke."""
    most, seen, running = 0, 0, True

    async def ticker() -> None:
        nonlocal most, seen
        while running:
            most, seen = max(most, sender.starts - seen), sender.starts
            await asyncio.sleep(0)

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    try:
        await run
    finally:
        running = False
        await tick
    return most


@pytest.mark.parametrize("loop", ["closed", "sessions", "open, rate=inf"])
def test_requests_due_at_one_instant_start_in_slices_with_the_loop_polling_between(loop: str) -> None:
    """200 requests due at once (a closed loop's first ones, an open loop's burst) cost 200 ms of
    client CPU before their first await: started in one loop iteration, no response would be
    read for 200 ms, and every first token arriving then would be stamped that late (1,000
    streams of 8k prompts held the loop 580 ms; a first token was stamped 400 ms late). They
    start in slices of about START_SLICE_SECONDS of work, the loop polling between slices."""
    import itertools

    from pytest_infmax.load.generator import LoadGenerator
    from pytest_infmax.load.workloads import Sessions

    generator = LoadGenerator("http://127.0.0.1:9", "m")
    if loop == "closed":
        config = LoadConfig(Scenario("tiny", 8, 4), concurrency=200, num_requests=200)
        sender = _CountingSender(config, 200)
        run = generator._closed_loop(sender, 200, 200, None, itertools.count(), False, lambda r: None)  # type: ignore[arg-type]
    elif loop == "sessions":  # each user's first turn
        config = LoadConfig(Scenario("tiny", 8, 4), concurrency=200, num_requests=200, workload=Sessions(turns=1))
        sender = _CountingSender(config, 200)
        run = generator._session_loop(
            sender, 200, 200, None, itertools.count(), itertools.count(), False, lambda r: None
        )  # type: ignore[arg-type]
    else:
        config = LoadConfig(Scenario("tiny", 8, 4), rate=float("inf"), num_requests=200)
        sender = _CountingSender(config, 200)
        run = generator._open_loop(sender, time.perf_counter(), 0, (0, 1), lambda r: None)  # type: ignore[arg-type]

    most = asyncio.run(_most_starts_between_polls(sender, run))
    assert sender.starts == 200
    # a slice holds about START_SLICE_SECONDS (2 ms) of the 1 ms requests; one block held all 200
    assert most <= 10, most


def test_a_prompt_is_kept_packed_and_posted_as_the_same_ids() -> None:
    """A plan holds its prompt's token ids in 4 bytes each, not a Python int per token (an 8k
    prompt was ~300 KB as a tuple); the ids it posts and shows are those drawn."""
    plan = plan_request(PRESETS["8k1k"], 3, seed=1)
    assert plan.packed_ids is not None and len(plan.packed_ids) == 4 * plan.input_len
    ids = plan.token_ids
    assert ids is not None and len(ids) == plan.input_len and all(type(i) is int for i in ids[:5])
    assert request_body(plan, "m", "completions")["prompt"] == list(ids)
    assert plan == plan_request(PRESETS["8k1k"], 3, seed=1) and hash(plan) == hash(
        plan_request(PRESETS["8k1k"], 3, seed=1)
    )
    assert plan_request(Scenario("c", 16, 4, endpoint="chat"), 0, seed=0).token_ids is None


def test_a_token_window_past_32_bit_ids_is_refused() -> None:
    from pytest_infmax.load.scenarios import TokenWindow

    with pytest.raises(ValueError, match="ids must be below 2147483648"):
        TokenWindow(0, 2**31 + 1)

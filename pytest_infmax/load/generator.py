"""The load generator: streaming requests against an OpenAI-compatible server.

Two arrival models, as in vLLM's and InferenceMAX's benchmark clients:

* closed loop (``concurrency=N``): N workers each keep one request in flight;
* open loop (``rate=R``): arrivals follow a Poisson process (``burstiness=1``)
  or a gamma process (burstiness < 1 is burstier, > 1 smoother), optionally
  capped at ``max_concurrency`` in flight.

Warm-up requests run first, as their own phase at the same concurrency, and
are recorded with ``warmup=True`` so metrics leave them out; the measured phase
then starts on warm connections.

Every request ends with a record: success, or a typed error. Nothing the
server sends can make a request hang past ``request_timeout``.

The client also watches itself (``clientstats``): per-request send lag, event-loop
lag and its CPU use during the measured phase, returned as ``RunRecords.client``;
a run whose client fell behind is marked ``client_bound`` with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import os
import sys
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import msgspec
import numpy as np
import numpy.random  # noqa: F401  numpy loads it at first use (~25 ms): here, not at a worker's first request

from pytest_infmax.collector import CollectorHold
from pytest_infmax.load.clientstats import ClientStats, LoopLagMonitor
from pytest_infmax.load.plan import LoadConfig, LoadConfigError, RunRecords
from pytest_infmax.load.rayworkers import run_on_ray
from pytest_infmax.load.scenarios import Endpoint, PlannedRequest, TokenWindow, plan_request, request_body
from pytest_infmax.load.streamclient import ConnectionPool, SSEDecoder, StreamError, build_request, stream_post
from pytest_infmax.load.workers import Shard, run_sharded, share
from pytest_infmax.load.workloads import Sessions, Trace
from pytest_infmax.records import ErrorKind, RequestRecord, TokenSource, token_counts

__all__ = ["LoadGenerator", "StreamError", "arrival_offsets"]


EVENT_LOOP_ENV = "INFMAX_EVENT_LOOP"


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop runs start on: uvloop's when installed, else asyncio's.

    uvloop cuts the client's CPU per streamed event by about a fifth
    (docs/load-generator.md); ``INFMAX_EVENT_LOOP=asyncio`` opts out.
    """
    choice = os.environ.get(EVENT_LOOP_ENV, "uvloop").strip().lower()
    if choice not in ("uvloop", "asyncio"):
        raise LoadConfigError(f"{EVENT_LOOP_ENV}={choice!r}: allowed are 'uvloop' (the default) and 'asyncio'")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # not installed (e.g. Windows): the standard loop
        return None
    return uvloop.new_event_loop


def run_coroutine(coro: Any) -> Any:
    """``asyncio.run(coro)`` on the loop ``event_loop_factory`` chooses.

    The coroutine's result is handed back through a box, not as the main task's
    result: on Python 3.11, ``asyncio.Runner.run`` ends by calling
    ``signal.getsignal(SIGINT)``, which tries ``signal.Handlers(handler)`` on its
    ``functools.partial(..., main_task=task)`` handler and formats the failure
    with ``repr(task)``, so the repr of the task's result is built and thrown
    away. For a run's records that is every chunk timestamp turned into text:
    about 0.6 CPU-s per million streamed tokens (found with perf; a sixteenth of
    the client's whole cost in benchmarks/client_overhead.py).
    """
    box: list[Any] = []

    async def main() -> None:
        box.append(await coro)

    factory = event_loop_factory()
    if factory is None:
        asyncio.run(main())
    elif sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
    else:
        loop = factory()  # Python 3.10: no Runner
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(main())
        finally:
            asyncio.set_event_loop(None)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    return box[0]


def max_events_for(max_tokens: int | None) -> int | None:
    """The most SSE events a stream of ``max_tokens`` can honestly need.

    One content event per token, plus room for role, usage, finish and
    keep-alive events; beyond that the stream is endless or hostile and ends
    as a protocol error rather than growing the record without bound.
    """
    return None if max_tokens is None else 2 * max_tokens + 64


def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send offsets (seconds from the start) for ``n`` open-loop arrivals.

    Gamma inter-arrival times with shape ``burstiness`` and mean ``1/rate``
    (shape 1 is the exponential, i.e. Poisson arrivals), as vLLM does.
    """
    if math.isinf(rate):
        return np.zeros(n)
    theta = 1.0 / (rate * burstiness)
    gaps = rng.gamma(shape=burstiness, scale=theta, size=n)
    return np.cumsum(gaps) - gaps[0]  # the first request goes at once


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None  # vLLM / SGLang reasoning parsers
    reasoning: str | None = None  # newer vLLM


class _Choice(msgspec.Struct):
    text: str | None = None  # /v1/completions
    delta: _Delta | None = None  # /v1/chat/completions
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Chunk(msgspec.Struct):
    """The fields of a streamed completion chunk a metric needs; the rest are
    skipped unparsed, which is most of why msgspec decodes them in half the time
    of a generic JSON parser (docs/load-generator.md)."""

    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_encode_json = msgspec.json.Encoder().encode


class ResponseAccumulator:
    """Accumulates one SSE response into a record.

    The C lane records plain content events itself (``PLAIN_CONTENT_IN_C``; _lane.c):
    what ``on_event`` does for them -- ``events_left``, ``rec.first_token_time``,
    ``rec.chunk_times``, ``texts`` -- it does on the same fields, so a change here
    must be made there too (tests/test_lane.py compares the two on generated events).
    """

    PLAIN_CONTENT_IN_C = True

    __slots__ = (
        "rec",
        "texts",
        "usage",
        "cumulative",
        "finished",
        "done",
        "complete_at",
        "events_left",
        "max_events",
        "max_tokens",
        "max_prompt_tokens",
    )

    def __init__(
        self,
        rec: RequestRecord,
        max_events: int | None = None,
        *,
        max_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
    ) -> None:
        self.rec = rec
        self.max_events = max_events
        # what was asked: the limits the server's own counts are checked against (check_usage)
        self.max_tokens = max_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.events_left = max_events + 1 if max_events is not None else -1
        # characters per content chunk, for apportioning; an array('q'), which the C lane
        # extends with the lengths it kept, in one call at each write-back (_lane.c)
        self.texts: array[int] = array("q")
        self.usage: _Usage | None = None
        self.cumulative: list[int] = []  # continuous usage: completion tokens so far
        self.finished = False  # a finish_reason was seen
        self.done = False  # [DONE] was seen
        self.complete_at: float | None = None  # when a finish_reason and usage had both arrived

    def on_event(self, data: bytes, t: float) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        self.events_left -= 1
        if not self.events_left:
            raise StreamError(
                ErrorKind.PROTOCOL,
                f"the stream sent more than {self.max_events} events for max_tokens="
                f"{self.rec.requested_output_tokens}; an endless stream, ended by the client",
            )
        try:
            chunk = _decode_chunk(data)
        except msgspec.ValidationError as exc:
            raise StreamError(ErrorKind.PROTOCOL, f"unexpected SSE data ({exc}): {data[:120]!r}") from None
        except UnicodeDecodeError as exc:  # msgspec < 0.23, in a string it decodes (skipped fields are not checked)
            raise StreamError(ErrorKind.PROTOCOL, f"SSE data is not valid UTF-8 ({exc}): {data[:120]!r}") from None
        except msgspec.DecodeError as exc:
            # msgspec >= 0.23 reports invalid UTF-8 as a DecodeError ("Invalid UTF-8 encoded string"):
            # tell that case apart by decoding, on this error path only, so the message does not
            # depend on which release is installed.
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as utf8:
                raise StreamError(ErrorKind.PROTOCOL, f"SSE data is not valid UTF-8 ({utf8}): {data[:120]!r}") from None
            raise StreamError(ErrorKind.PROTOCOL, f"SSE data is not JSON ({exc}): {data[:120]!r}") from None
        if chunk.error is not None:
            err = chunk.error
            msg = str(err.get("message", err) if isinstance(err, dict) else err)
            if len(msg) > 500:  # kept in every record and report: the start says what it is
                msg = f"{msg[:500]}... ({len(msg)} characters)"
            raise StreamError(ErrorKind.SERVER, f"server error in stream: {msg}")
        usage = chunk.usage
        choices = chunk.choices
        if choices:
            choice = choices[0]
            text = choice.text
            if text is None and choice.delta is not None:
                delta = choice.delta
                text = delta.content
                reasoning = delta.reasoning_content or delta.reasoning
                if reasoning:  # a reasoning model's thinking tokens are output tokens too
                    text = text + reasoning if text else reasoning
            if choice.finish_reason:
                self.finished = True
            if text:
                rec = self.rec
                if rec.first_token_time is None:
                    rec.first_token_time = t
                rec.chunk_times.append(t)
                self.texts.append(len(text))
                if usage is not None and usage.completion_tokens is not None:
                    self.cumulative.append(usage.completion_tokens)
        if usage is not None:
            self.usage = usage
        if self.complete_at is None and self.finished and usage is not None and usage.completion_tokens is not None:
            self.complete_at = t

    def keep_counts(self, requested_input: int | None) -> str:
        """A stream that sent its ``finish_reason`` and ``usage``, then never ended ([DONE] or
        the end of the body), and timed out: keep its token counts on the record (it stays a
        timeout: a client reading to the end of the stream, the openai SDK's, hangs on it) and
        say what arrived; an empty string where nothing complete had arrived."""
        rec, at = self.rec, self.complete_at
        if at is None:
            return ""
        try:
            self.finish(at, requested_input)
        except StreamError:
            return ""  # counts that cannot be true are not kept
        finally:
            rec.end_time = None  # the record ends at the timeout
        since = f" {at - rec.send_time:.3g} s after it was sent" if rec.send_time is not None else ""
        return (
            f"; its finish_reason and usage ({rec.output_tokens} output tokens) had arrived{since}, but the "
            "stream never ended ([DONE] or the end of the body): the counts are kept"
        )

    def finish(self, t: float, requested_input: int | None) -> None:
        rec = self.rec
        rec.end_time = t
        if not self.done and not self.finished:
            raise StreamError(ErrorKind.DISCONNECT, "stream ended before a finish_reason or [DONE]")
        if not rec.chunk_times:
            raise StreamError(ErrorKind.EMPTY, "stream ended without any content token")
        n_chunks = len(rec.chunk_times)
        usage = self.usage or _Usage()
        check_usage(usage, self.max_tokens, self.max_prompt_tokens, n_chunks)
        if usage.prompt_tokens is not None:
            rec.input_tokens, rec.input_tokens_source = usage.prompt_tokens, TokenSource.USAGE
        elif requested_input is not None:
            rec.input_tokens, rec.input_tokens_source = requested_input, TokenSource.REQUEST
        if usage.completion_tokens is not None:
            rec.output_tokens, rec.output_tokens_source = usage.completion_tokens, TokenSource.USAGE
        else:
            rec.output_tokens, rec.output_tokens_source = n_chunks, TokenSource.CHUNKS
        rec.chunk_tokens, rec.chunk_tokens_source = _chunk_tokens(
            n_chunks,
            rec.output_tokens,
            self.cumulative,
            self.texts,
            from_usage=rec.output_tokens_source is TokenSource.USAGE,
        )


# A chat template wraps the prompt in tokens of its own (roles, system prompt); a
# tokenizer never makes more tokens of a text than it has bytes. So prompt_tokens is
# at most the request body's size in bytes plus this allowance for the template.
PROMPT_TEMPLATE_ALLOWANCE = 4096


def prompt_tokens_limit(body: bytes) -> int:
    """The most prompt tokens a server can honestly count for a request whose body is ``body``."""
    return len(body) + PROMPT_TEMPLATE_ALLOWANCE


def requested_max_tokens(plan: PlannedRequest, config: LoadConfig) -> int | None:
    """The ``max_tokens`` the request asks for: the plan's, unless ``extra_body`` replaces it
    (an int) or leaves it out (None: not known, so the server's count is only checked for sign)."""
    extra = config.extra_body or {}
    value = extra.get("max_tokens", plan.output_len)
    if value is None:  # left out: a newer OpenAI field may carry the limit instead
        value = extra.get("max_completion_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_usage(
    usage: _Usage, max_tokens: int | None, max_prompt_tokens: int | None, content_chunks: int | None = None
) -> None:
    """Every count in the server's ``usage`` against what was asked; a count that cannot be
    true is a protocol error naming the field, its value and the limit.

    Called once content arrived, so ``completion_tokens`` is at least 1, and at least the
    ``content_chunks`` that arrived (a chunk with content carries at least one token); it is
    at most the ``max_tokens`` the request asked for. ``prompt_tokens`` is non-negative and at most
    :func:`prompt_tokens_limit` of the request. Every figure computed from a record (token
    totals, throughput, per-token latencies) rests on these counts, so a server that reports
    ``completion_tokens: 10**15``, a negative count, or none for a streamed answer must not
    make an "ok" record.
    """
    done = usage.completion_tokens
    if done is not None:
        if done < 1:
            raise StreamError(
                ErrorKind.PROTOCOL,
                f"usage.completion_tokens={done} but content arrived: the limit is >= 1; "
                "the server's token count cannot be true",
            )
        if content_chunks is not None and 1 <= done < content_chunks:
            raise StreamError(
                ErrorKind.PROTOCOL,
                f"usage.completion_tokens={done} is below the {content_chunks} content chunks that arrived "
                "(each carries at least one token): the limit is >= "
                f"{content_chunks}; the server's token count cannot be true",
            )
        if max_tokens is not None and done > max_tokens:
            raise StreamError(
                ErrorKind.PROTOCOL,
                f"usage.completion_tokens={done} exceeds the limit max_tokens={max_tokens} the request asked for; "
                "the server's token count cannot be true",
            )
    prompt = usage.prompt_tokens
    if prompt is not None:
        if prompt < 0:
            raise StreamError(
                ErrorKind.PROTOCOL,
                f"usage.prompt_tokens={prompt} is negative: the limit is >= 0; the server's token count cannot be true",
            )
        if max_prompt_tokens is not None and prompt > max_prompt_tokens:
            raise StreamError(
                ErrorKind.PROTOCOL,
                f"usage.prompt_tokens={prompt} exceeds the limit {max_prompt_tokens} (the request body's "
                f"{max_prompt_tokens - PROMPT_TEMPLATE_ALLOWANCE} bytes + {PROMPT_TEMPLATE_ALLOWANCE} for a "
                "chat template); the server's token count cannot be true",
            )


def _chunk_tokens(
    n_chunks: int, total: int, cumulative: list[int], text_lens: Sequence[int], from_usage: bool
) -> tuple[array[int] | list[int], TokenSource]:
    """How many tokens each content chunk carried, and how we know.

    Exact when the server sent cumulative usage per chunk, or when the usage
    total equals the chunk count (one token per event). Otherwise the total is
    spread over chunks in proportion to their text (largest remainder), and
    flagged as an estimate.
    """
    if len(cumulative) == n_chunks and cumulative and cumulative[-1] == total:
        counts = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]
        if all(c >= 0 for c in counts):
            return token_counts(counts), TokenSource.USAGE_DELTA
    if not from_usage:
        return _ONE_TOKEN * n_chunks, TokenSource.CHUNKS
    if total == n_chunks:
        return _ONE_TOKEN * n_chunks, TokenSource.USAGE
    if total % n_chunks == 0 and min(text_lens) == max(text_lens):
        # equal texts share equally: what the general path below gives, without its sort
        return token_counts([total // n_chunks]) * n_chunks, TokenSource.APPORTIONED
    chars = sum(text_lens) or n_chunks
    shares = [total * (c or 1) / chars for c in text_lens]
    counts = [int(s) for s in shares]
    order = sorted(range(n_chunks), key=lambda i: shares[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return token_counts(counts), TokenSource.APPORTIONED


_ONE_TOKEN = array("q", [1])  # one token an event: the common case, repeated in C


class LoadGenerator:
    """Drives load against one server's OpenAI-compatible API."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self._headers: dict[str, str] = {}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def _url(self, endpoint: Endpoint) -> str:
        return f"{self.base_url}/v1/{'completions' if endpoint == 'completions' else 'chat/completions'}"

    async def run(
        self,
        config: LoadConfig,
        on_record: Callable[[RequestRecord], None] | None = None,
        stop: Callable[[], bool] | None = None,
        *,
        shard: Shard | None = None,
        before_measured: Callable[[], Awaitable[None]] | None = None,
        on_interrupted: Callable[[RunRecords], None] | None = None,
    ) -> RunRecords:
        """Run warm-up then the measured phase; return every record.

        ``stop`` is asked before each measured request is sent: once it answers
        True no new request starts (those in flight finish). Sequential
        comparisons use it to end a run whose verdict is settled.

        ``before_measured`` is awaited after warm-up, right before the measured phase
        starts (one process only): the runner reads the server's metrics there, so
        their baseline holds no measured request.

        A run cancelled (Ctrl-C) during its measured phase hands ``on_interrupted``
        what it has, before the cancellation goes on: every record that ended, and
        each request in flight as a ``cancelled`` record.

        With ``config.workers > 1`` the load is spread over worker processes
        (``pytest_infmax.load.workers``), each running its ``shard`` of it here; with
        ``config.ray`` over Ray actors on that cluster (``pytest_infmax.load.rayworkers``).
        """
        if (config.workers > 1 or config.ray is not None) and shard is None:
            if config.ray is not None:
                run = await run_on_ray(type(self), self.base_url, self.model, self._api_key, config, on_record, stop)
            else:
                run = await run_sharded(self.base_url, self.model, self._api_key, config, on_record, stop)
            return refuse_bad_token_ids(run)
        clock_origin, epoch_origin = time.perf_counter(), time.time()
        records: list[RequestRecord] = []

        def keep(rec: RequestRecord) -> None:
            records.append(rec)
            if on_record is not None:
                on_record(rec)

        # this process's part of the load: all of it, or shard k of n
        k, n = (shard.index, shard.count) if shard is not None else (0, 1)
        concurrency = None if config.concurrency is None else share(config.concurrency, k, n)
        max_concurrency = None if config.max_concurrency is None else share(config.max_concurrency, k, n)
        num_requests = config.effective_num_requests
        if num_requests is not None and config.concurrency is not None:
            num_requests = share(num_requests, k, n)
        width = concurrency or max_concurrency or 0
        url = self._url(config.scenario.endpoint)
        pool = ConnectionPool(url, connect_timeout=min(30.0, config.request_timeout))
        sender = _Sender(pool, urlsplit(url).path, self._headers, self.model, config)
        monitor = LoopLagMonitor()
        monitor.start()
        collector = CollectorHold()  # held over the measured phase: no full scan of the session's objects
        try:
            warmup = share(config.effective_warmup, k, n)
            index = itertools.count(k, n)
            sessions = itertools.count()  # multi-turn: warm-up sessions first, then the measured ones
            if warmup and isinstance(config.workload, Sessions):
                users = min(width, warmup // config.workload.turns)
                await self._session_loop(sender, users, warmup, None, index, sessions, True, keep)
            elif warmup:
                await self._closed_loop(sender, min(width or warmup, warmup), warmup, None, index, True, keep)
            # warm connections: the measured phase pays no TCP handshakes (open loop:
            # as many as max_concurrency allows, else a first batch)
            await pool.prefill(min(width or 64, 4096))
            if before_measured is not None:  # e.g. the server's metrics read at the phase's very start
                await before_measured()
            collector.start()
            if shard is not None:  # every shard starts its measured phase at one instant
                measured_start = await shard.start_time()
                # libuv's timers have millisecond resolution and may wake early: wait out the rest
                while (delay := measured_start - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
            else:
                measured_start = time.perf_counter()
            cpu_start = time.process_time()
            try:
                if concurrency is not None and isinstance(config.workload, Sessions):
                    await self._session_loop(
                        sender, concurrency, num_requests, config.duration, index, sessions, False, keep, stop
                    )
                elif concurrency is not None:
                    await self._closed_loop(
                        sender,
                        concurrency,
                        num_requests,
                        config.duration,
                        index,
                        False,
                        keep,
                        stop,
                    )
                else:
                    await self._open_loop(sender, measured_start, config.effective_warmup, (k, n), keep, stop, sessions)
            except (asyncio.CancelledError, KeyboardInterrupt):
                if on_interrupted is not None:
                    # the tasks are cancelled by now: each request in flight left a cancelled record
                    ended = time.perf_counter(), time.process_time()
                    collector.stop()
                    on_interrupted(
                        self._run_records(
                            [*records, *sender.cancelled],
                            (clock_origin, epoch_origin, measured_start, ended[0]),
                            monitor,
                            ended[1] - cpu_start,
                            config,
                            collector.describe(),
                        )
                    )
                raise
            measured_end = time.perf_counter()
            cpu_end = time.process_time()
        finally:
            collector.stop()
            pool.close()
            await monitor.stop()
        return refuse_bad_token_ids(
            self._run_records(
                records,
                (clock_origin, epoch_origin, measured_start, measured_end),
                monitor,
                cpu_end - cpu_start,
                config,
                collector.describe(),
            )
        )

    @staticmethod
    def _run_records(
        records: list[RequestRecord],
        clocks: tuple[float, float, float, float],
        monitor: LoopLagMonitor,
        cpu_seconds: float,
        config: LoadConfig,
        collector: dict[str, Any] | None = None,
    ) -> RunRecords:
        clock_origin, epoch_origin, measured_start, measured_end = clocks
        records.sort(key=lambda r: r.index)
        client = ClientStats(
            send_lags=[lag for r in records if not r.warmup and (lag := r.send_lag) is not None],
            loop_lags=monitor.lags_between(measured_start, measured_end),
            loop_lag_interval=monitor.interval,
            cpu_seconds=cpu_seconds,
            wall_seconds=measured_end - measured_start,
            collector=collector,
            threshold=config.client_lag_threshold,
            send_lag_reference=(
                "closed loop: from the end of the worker's previous response (its first: the worker's start)"
                if config.concurrency is not None
                else "open loop: from the scheduled arrival (or the max_concurrency slot, if later)"
            ),
        )
        return RunRecords(records, clock_origin, epoch_origin, measured_start, measured_end, client)

    async def _closed_loop(
        self,
        sender: _Sender,
        concurrency: int,
        num_requests: int | None,
        duration: float | None,
        index: itertools.count[int],
        warmup: bool,
        keep: Callable[[RequestRecord], None],
        stop: Callable[[], bool] | None = None,
    ) -> None:
        issued = itertools.count()
        config = sender.config
        # duration: a slot that came free less than ``duration`` after the run's first send is
        # filled again, so the measured window (first send to last end, metrics.wall_time) lasts
        # at least ``duration``. (A deadline taken before the first send, checked after each
        # response, let a run whose slots freed just before it measure a hair less.)
        first_send = math.inf  # the earliest send of a finished request

        async def worker() -> None:
            nonlocal first_send
            previous_end: float | None = None
            freed_at: float | None = None  # when this worker's previous request ended or failed
            while True:
                # ready: the slot is free since the previous response ended (so a
                # slow on_record callback counts as the client's delay), else now
                ready = previous_end if previous_end is not None else time.perf_counter()
                if num_requests is not None and next(issued) >= num_requests:
                    return
                if duration is not None and freed_at is not None and freed_at - first_send >= duration:
                    return
                if stop is not None and stop():
                    return
                plan = plan_request(config.scenario, next(index), config.seed, config.tokens)
                rec = await sender.one(plan, warmup, None, ready)
                previous_end = rec.end_time
                freed_at = previous_end if previous_end is not None else time.perf_counter()
                first_send = min(first_send, rec.send_time)
                keep(rec)

        await _gather_cancelling((worker() for _ in range(concurrency)), StartSlices())

    async def _session_loop(
        self,
        sender: _Sender,
        users: int,
        num_requests: int | None,
        duration: float | None,
        index: itertools.count[int],
        sessions: itertools.count[int],
        warmup: bool,
        keep: Callable[[RequestRecord], None],
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """Multi-turn sessions in a closed loop: ``users`` users, each holding one conversation
        at a time, its turns in order with the think time between a response and the next turn.
        ``num_requests`` (whole sessions) bounds the sessions started; ``duration`` and ``stop``
        end the run before any next turn."""
        config = sender.config
        workload = config.workload
        assert isinstance(workload, Sessions)
        deadline = None if duration is None else time.perf_counter() + duration
        max_sessions = None if num_requests is None else num_requests // workload.turns
        started = itertools.count()

        def over() -> bool:
            return (deadline is not None and time.perf_counter() >= deadline) or (stop is not None and stop())

        async def user() -> None:
            previous_end: float | None = None
            while True:
                if max_sessions is not None and next(started) >= max_sessions:
                    return
                if over():
                    return
                turns = workload.plan(config.scenario, next(sessions), config.seed, config.tokens)
                for plan in turns:
                    ready = previous_end if previous_end is not None else time.perf_counter()
                    if plan.turn != 1 and workload.think_time:
                        ready += workload.think_time
                        # the user's think time: the next turn is due then (libuv timers are ms: never early)
                        while (delay := ready - time.perf_counter()) > 0:
                            await asyncio.sleep(delay)
                    if plan.turn != 1 and over():
                        return
                    rec = await sender.one(dataclasses.replace(plan, index=next(index)), warmup, None, ready)
                    previous_end = rec.end_time
                    keep(rec)

        await _gather_cancelling((user() for _ in range(max(1, users))), StartSlices())

    async def _open_loop(
        self,
        sender: _Sender,
        start: float,
        first_index: int,
        part: tuple[int, int],
        keep: Callable[[RequestRecord], None],
        stop: Callable[[], bool] | None = None,
        sessions: itertools.count[int] | None = None,
    ) -> None:
        """Arrivals from the schedule; with ``part=(k, n)`` only every n-th one, from the k-th
        (every shard computes the same schedule, so together they send exactly it).

        Multi-turn sessions: an arrival starts a session, whose turns follow each other (its
        next turn is due ``think_time`` after a response ends, so that is its schedule)."""
        config = sender.config
        trace = config.workload if isinstance(config.workload, Trace) else None
        conversations = config.workload if isinstance(config.workload, Sessions) else None
        n = config.effective_num_requests if trace is not None else config.num_requests
        if conversations is not None and n is not None:
            n //= conversations.turns  # arrivals are sessions
        if trace is not None:  # a trace's own timestamps, over its speed-up
            offsets = trace.offsets()[:n]
        else:
            assert config.rate is not None
            rng = np.random.default_rng([config.seed, 0x0A77])
            if n is None:  # duration-bound: enough arrivals to outlast the duration
                assert config.duration is not None
                n = max(1, math.ceil(config.rate * config.duration * 2 + 10)) if not math.isinf(config.rate) else 1
            offsets = arrival_offsets(n, config.rate, config.burstiness, rng)
        k, count = part
        width = config.max_concurrency and share(config.max_concurrency, k, count)
        gate = asyncio.Semaphore(width) if width else None
        tasks: list[asyncio.Task[None]] = []

        async def fire(plan: PlannedRequest, scheduled: float, sent: list[RequestRecord] | None = None) -> None:
            if gate is None:
                rec = await sender.one(plan, False, scheduled, scheduled)
            else:
                async with gate:
                    ready = max(scheduled, time.perf_counter())  # a slot is free
                    rec = await sender.one(plan, False, scheduled, ready)
            keep(rec)
            if sent is not None:
                sent.append(rec)

        def over() -> bool:
            late = config.duration is not None and time.perf_counter() - start >= config.duration
            return late or (stop is not None and stop())

        async def converse(turns: list[PlannedRequest], scheduled: float) -> None:
            assert conversations is not None
            previous_end: float | None = None
            for plan in turns:
                if plan.turn != 1:
                    if over():
                        return
                    scheduled = (previous_end or time.perf_counter()) + conversations.think_time
                    while (delay := scheduled - time.perf_counter()) > 0:
                        await asyncio.sleep(delay)
                sent: list[RequestRecord] = []
                await fire(dataclasses.replace(plan, index=next(index)), scheduled, sent)
                previous_end = sent[0].end_time

        index = itertools.count(first_index)
        slices = StartSlices()

        try:
            for j in range(k, len(offsets), count):
                offset = offsets[j]
                if config.duration is not None and offset >= config.duration:
                    break
                if stop is not None and stop():
                    break
                scheduled = start + float(offset)
                while (delay := scheduled - time.perf_counter()) > 0:  # never early (libuv timers are ms)
                    await asyncio.sleep(delay)
                    slices.waited()  # the loop polled while this one waited
                await slices.before_start()  # arrivals due together (a burst, rate=inf) start in slices
                if conversations is not None:
                    assert sessions is not None
                    turns = conversations.plan(config.scenario, next(sessions), config.seed, config.tokens)
                    tasks.append(asyncio.ensure_future(converse(turns, scheduled)))
                    continue
                if trace is not None:
                    plan = trace.plan(j, first_index + j, config.seed, config.scenario.endpoint, config.tokens)
                else:
                    plan = plan_request(config.scenario, first_index + j, config.seed, config.tokens)
                tasks.append(asyncio.ensure_future(fire(plan, scheduled)))
            await _gather_cancelling(tasks)
        finally:
            for task in tasks:
                task.cancel()
            # cancelled while waiting for an arrival: let the requests in flight record their cancellation
            await asyncio.gather(*tasks, return_exceptions=True)


class _Sender:
    """Sends one planned request on the pool and turns whatever happens into a record."""

    def __init__(
        self, pool: ConnectionPool, path: str, headers: dict[str, str], model: str, config: LoadConfig
    ) -> None:
        self.pool = pool
        self.path = path
        self.headers = headers
        self.model = model
        self.config = config
        self.cancelled: list[RequestRecord] = []  # the requests in flight when the run was cancelled

    async def one(
        self,
        plan: PlannedRequest,
        warmup: bool,
        scheduled: float | None,
        ready: float | None = None,
    ) -> RequestRecord:
        """Send one streaming request; always returns a record, never raises (but cancellation)."""
        config = self.config
        rec = RequestRecord(
            index=plan.index,
            warmup=warmup,
            scheduled_time=scheduled,
            ready_time=ready,
            requested_input_tokens=plan.input_len,
            requested_output_tokens=plan.output_len,
            session=plan.session,
            turn=plan.turn,
            shared_prefix_tokens=plan.shared_prefix_tokens,
        )
        body = encode_body(plan, self.model, config)
        request = build_request(self.pool, self.path, body, self.headers)
        exact_input = plan.input_len if plan.packed_ids is not None else None
        state = ResponseAccumulator(
            rec,
            max_events_for(plan.output_len),
            max_tokens=requested_max_tokens(plan, config),
            max_prompt_tokens=prompt_tokens_limit(body),
        )
        decoder = SSEDecoder(state)

        def sent() -> None:
            rec.send_time = time.perf_counter()

        rec.send_time = time.perf_counter()
        try:
            rec.http_status = await stream_post(
                self.pool, request, decoder, on_sent=sent, timeout=config.request_timeout
            )
            # the stream's end: the arrival of [DONE], else of the body's last bytes
            state.finish(decoder.last_time or time.perf_counter(), exact_input)
        except StreamError as exc:
            if exc.status is not None:
                rec.http_status = exc.status
            message = with_vocab_hint(str(exc), plan, config.tokens)
            if exc.kind is ErrorKind.TIMEOUT:
                message += state.keep_counts(exact_input)
            _fail(rec, exc.kind, message)
        except asyncio.CancelledError:
            _fail(rec, ErrorKind.CANCELLED, "the run was stopped before this request ended")
            self.cancelled.append(rec)
            raise
        return rec


VOCAB_SETTING = "--infmax-vocab-size N (env INFMAX_VOCAB_SIZE, ini infmax_vocab_size, or vocab_size=N in @pytest.mark.infmax_server)"


class TokenIdsRefused(LoadConfigError):
    """The server refused the prompts' token ids: the run measured nothing the test asked for."""


def _refuses_token_ids(message: str) -> bool:
    lowered = message.lower()
    return "vocab" in lowered or ("token" in lowered and "out of range" in lowered)


def with_vocab_hint(message: str, plan: PlannedRequest, tokens: TokenWindow) -> str:
    """A server's rejection of the prompt's token ids, with what they were and how to fix them."""
    if plan.packed_ids is None or not _refuses_token_ids(message):
        return message
    if tokens.vocab_known:
        return (
            f"{message} [the prompt's {tokens.describe()}; if that size is wrong, give the right one: {VOCAB_SETTING}]"
        )
    return (
        f"{message} [the prompt's {tokens.describe()}: the model's vocabulary could not be learnt from "
        f"its folder or the server; give its size: {VOCAB_SETTING}]"
    )


def refuse_bad_token_ids(run: RunRecords) -> RunRecords:
    """``run``, unless the server refused prompt token ids: then :class:`TokenIdsRefused`, with
    the server's words and how to give the vocabulary size (its results would measure errors)."""
    refused = [r for r in run.records if r.error_message and VOCAB_SETTING in r.error_message]
    if refused:
        raise TokenIdsRefused(
            f"the server refused the prompt token ids of {len(refused)} of {len(run.records)} requests: "
            f"{refused[0].error_message}"
        )
    return run


def encode_body(plan: PlannedRequest, model: str, config: LoadConfig) -> bytes:
    """The exact bytes the client posts for ``plan`` (the simulator's trace keys requests by their hash)."""
    return _encode_json(request_body(plan, model, config.scenario.endpoint, config.extra_body))


async def read_sse(
    lines: AsyncIterator[bytes],
    acc: ResponseAccumulator,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Feed a byte stream through the client's SSE decoder, stamping each piece.

    The live client feeds the decoder from its socket (``streamclient``); this
    entry point lets tests replay recorded streams with recorded times through
    the same decoder. ``clock`` is read once per piece as it arrives.
    """
    decoder = SSEDecoder(acc)
    t = 0.0
    async for raw in lines:
        t = clock()
        decoder.feed(raw, t)
        if acc.done:
            return
    decoder.close(t)


def _fail(rec: RequestRecord, kind: ErrorKind, message: str) -> None:
    rec.error_kind = kind
    rec.error_message = message
    if rec.end_time is None:
        rec.end_time = time.perf_counter()


# How much of the client's work on requests starting at one instant runs in one event-loop
# iteration before the loop polls its sockets. A closed loop's first requests all start at once:
# at 1,000 streams their planning, encoding and writes took 73-116 ms in one iteration at 1k-token
# prompts (580 ms at 8k), in which no response was read, so a first token that arrived then was
# stamped up to that late: TTFT errors of 53-96 ms against the simulator's own trace (400 ms at
# 8k). docs/load-generator.md, "Requests due at one instant"; benchmarks/start_burst.py.
START_SLICE_SECONDS = 0.002  # benchmarks/start_burst.py sets inf for a run: one block, as before


class StartSlices:
    """Starts many requests due at one instant in slices, the loop polling between them.

    ``await before_start()`` before starting each request: once the slice is full it yields for
    one loop iteration (the slice's requests take their first steps, sending, then the loop polls
    and reads), and sizes the next slice from what this one cost, to about ``START_SLICE_SECONDS`` of work.
    ``waited()`` says the starter slept anyway (an open loop's next arrival was not due yet)."""

    def __init__(self) -> None:
        self.seconds = START_SLICE_SECONDS
        self.size = 1  # the first slice: one request, to learn a request's cost
        self.count = 0
        self.opened = time.perf_counter()

    async def before_start(self) -> None:
        if self.count >= self.size and self.seconds < math.inf:  # inf: one block
            await asyncio.sleep(0)
            spent = time.perf_counter() - self.opened
            # at most 4x larger at once: one fast slice (a cached plan) says little about the next
            self.size = max(1, int(min(4 * self.size, self.size * self.seconds / max(spent, 1e-9))))
            self.waited()
        self.count += 1

    def waited(self) -> None:
        self.count = 0
        self.opened = time.perf_counter()


async def _gather_cancelling(aws: Iterable[Awaitable[Any]], slices: StartSlices | None = None) -> None:
    """Await all; if one raises or we are cancelled, cancel the rest first. With ``slices``
    the awaitables start a slice at a time (pass a generator: each is made when started)."""
    tasks: list[asyncio.Future[Any]] = []
    try:
        for a in aws:
            if slices is not None:
                await slices.before_start()
            tasks.append(asyncio.ensure_future(a))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

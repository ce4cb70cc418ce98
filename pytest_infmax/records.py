"""Per-request records: what the load generator saw, one record per request.

Records are the single source every metric is computed from, and what the JSON
report keeps, so they hold raw observations (timestamps, counts and where each
count came from), never derived figures.

All times are seconds on the load generator's monotonic clock
(``time.perf_counter()``); a run keeps the epoch of its clock origin so records
can be placed in wall-clock time.
"""

from __future__ import annotations

import enum
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from itertools import chain
from typing import TYPE_CHECKING, Any

from pytest_infmax.lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:  # imported at first use, not with this module (pytest_infmax/lazy.py): settings imports it
    np = lazy_module("numpy")

# The most per-token gaps one record expands to (RequestRecord.itls): a chunk's count
# comes from the server (or from a report file), and memory must not follow it.
ITL_EXPANSION_LIMIT = 1 << 17

_TIME_KEYS = ("scheduled_time", "send_time", "first_token_time", "end_time", "ready_time")


class TokenSource(str, enum.Enum):
    """Where a token count came from. Reports keep it beside every count."""

    USAGE = "usage"  # the server's own `usage` object (stream_options.include_usage)
    USAGE_DELTA = "usage_delta"  # per-chunk cumulative usage (vLLM continuous_usage_stats)
    REQUEST = "request"  # what we asked for: the exact token ids we sent
    CHUNKS = "chunks"  # counted content chunks, assuming one token each: an estimate
    APPORTIONED = "apportioned"  # a usage total spread over chunks by text length: an estimate
    NONE = "none"  # nothing known (failed request)


class ErrorKind(str, enum.Enum):
    """Typed request outcomes other than success."""

    HTTP = "http_error"  # non-2xx status
    CONNECT = "connect_error"  # could not connect
    DISCONNECT = "disconnected"  # connection closed or reset mid-stream
    TIMEOUT = "timeout"  # request exceeded its timeout
    PROTOCOL = "protocol_error"  # malformed SSE / JSON / missing fields
    SERVER = "server_error"  # an error object inside a 200 stream
    EMPTY = "empty_response"  # stream ended without any content token
    CANCELLED = "cancelled"  # the run was stopped before the request ended


def token_counts(counts: Iterable[int]) -> array[int] | list[int]:
    """Per-chunk token counts as a record holds them: an ``array('q')``, or, only when a
    count does not fit in int64 (a hostile server's), a list of the exact ints."""
    if isinstance(counts, array) and counts.typecode == "q":
        return counts
    kept = counts if isinstance(counts, (list, tuple, array)) else list(counts)
    try:
        return array("q", kept)
    except (OverflowError, TypeError):  # past int64, or not ints at all: kept as given, for the checks downstream
        return list(kept)


@dataclass(slots=True)
class RequestRecord:
    """One request as observed by the client.

    ``chunk_times[i]`` is when the i-th content-bearing SSE event arrived and
    ``chunk_tokens[i]`` how many output tokens it carried (see
    ``chunk_tokens_source`` for how that was known).

    ``chunk_times`` is held compactly: an ``array('d')``, 8 bytes a stamp where a list
    of floats takes 32, appended to as the stream is read (a list given to the
    constructor becomes one); ``numpy.frombuffer(rec.chunk_times)`` views it without a
    copy. On disk the stamps go to a binary sidecar beside the JSON (``sidecar.py``).
    ``chunk_tokens`` likewise, an ``array('q')`` (:func:`token_counts`): a list of ints is a
    container the garbage collector walks item by item, and a run keeps thousands of
    records alive (at 1,000 streams of 256 tokens the young collections cost a fifth less
    with arrays, their longest 1.2 ms against 3.8: docs/load-generator.md, "What the young
    collections meet"). Only a count past int64 (a hostile server's) keeps the list, exact.
    """

    index: int
    warmup: bool = False
    scheduled_time: float | None = None  # open loop: when the arrival process said to send
    send_time: float = 0.0  # when the request was actually written
    first_token_time: float | None = None  # first event with non-empty content
    end_time: float | None = None  # response fully read (or failure observed)
    chunk_times: array[float] = field(default_factory=lambda: array("d"))
    chunk_tokens: array[int] | list[int] = field(default_factory=lambda: array("q"))
    input_tokens: int | None = None
    input_tokens_source: TokenSource = TokenSource.NONE
    output_tokens: int | None = None
    output_tokens_source: TokenSource = TokenSource.NONE
    chunk_tokens_source: TokenSource = TokenSource.NONE
    requested_input_tokens: int | None = None
    requested_output_tokens: int | None = None
    http_status: int | None = None
    error_kind: ErrorKind | None = None
    error_message: str | None = None
    # when the load model said "send now": closed loop, the worker decided to send
    # its next request; open loop, the scheduled time or, with max_concurrency,
    # the moment a slot was obtained if later. None in records from older reports.
    ready_time: float | None = None
    # multi-turn sessions (load.workloads): the conversation and its turn (1 = the first)
    session: int | None = None
    turn: int | None = None
    # prompt tokens the workload designed to repeat the start of an earlier prompt (None: older reports)
    shared_prefix_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_times, array) or self.chunk_times.typecode != "d":
            self.chunk_times = array("d", self.chunk_times)
        self.chunk_tokens = token_counts(self.chunk_tokens)

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    # -- derived per-request latencies (None when not defined) -------------

    @property
    def ttft(self) -> float | None:
        if not self.ok or self.first_token_time is None:
            return None
        return self.first_token_time - self.send_time

    @property
    def last_token_time(self) -> float | None:
        """When the last content chunk arrived: where E2E ends, as InferenceMAX's and vLLM's clients end
        their latency, not at the stream's end (``end_time``: the usage chunk and ``[DONE]`` after it)."""
        if self.end_time is None:
            return None
        return float(self.chunk_times[-1]) if len(self.chunk_times) else self.end_time

    @property
    def e2e(self) -> float | None:
        end = self.last_token_time
        if not self.ok or end is None:
            return None
        return end - self.send_time

    @property
    def send_lag(self) -> float | None:
        """Actual write minus when the load model said to send (``ready_time``,
        else ``scheduled_time``): the client's own delay, in seconds."""
        ref = self.ready_time if self.ready_time is not None else self.scheduled_time
        return None if ref is None else self.send_time - ref

    @property
    def ttft_from_schedule(self) -> float | None:
        """TTFT measured from the scheduled send time (open loop; no coordinated
        omission: a client that sends late does not hide the wait). Equals
        ``ttft`` when there is no schedule (closed loop)."""
        ttft = self.ttft
        if ttft is None or self.scheduled_time is None or self.first_token_time is None:  # ttft implies the last
            return ttft
        return self.first_token_time - self.scheduled_time

    @property
    def e2e_from_schedule(self) -> float | None:
        """E2E from the scheduled send time (open loop); ``e2e`` without a schedule."""
        e2e, end = self.e2e, self.last_token_time
        if e2e is None or self.scheduled_time is None or end is None:  # e2e implies the last
            return e2e
        return end - self.scheduled_time

    @property
    def tpot(self) -> float | None:
        """InferenceMAX TPOT: (E2E - TTFT) / (output tokens - 1)."""
        ttft, e2e = self.ttft, self.e2e
        if ttft is None or e2e is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (e2e - ttft) / (self.output_tokens - 1)

    def itls(self) -> list[float]:
        """Per-token inter-token latencies (:meth:`itl_array` as a list)."""
        return self.itl_array().tolist()

    def itl_array(self) -> np.ndarray:
        """Per-token inter-token latencies.

        A chunk carrying k tokens that arrived ``dt`` after the previous chunk
        contributes k gaps of ``dt / k``: streaming in chunks must not look like
        one long stall followed by instant tokens.

        Bounded in memory whatever the counts say: when the tokens of a record
        add up to more than ``ITL_EXPANSION_LIMIT``, each chunk's gap is repeated
        in proportion to its count (at least once) instead: the gaps keep their
        weights to within one repeat per chunk.

        numpy over the stamps: a Python loop over them cost 0.5 s of CPU per 128k chunks
        at the end of a run (benchmarks/whole_run.py).
        """
        gaps = len(self.chunk_times) - 1
        if not self.ok or gaps < 1:
            return np.empty(0)
        dts = np.diff(np.asarray(self.chunk_times, dtype=np.float64))
        try:
            tokens = np.maximum(np.asarray(self.chunk_tokens[1 : gaps + 1], dtype=np.int64), 1)
        except OverflowError:  # a count past int64 (a hostile server's): the exact path below
            tokens = None
        if tokens is not None and float(tokens.sum(dtype=np.float64)) + gaps - len(tokens) <= ITL_EXPANSION_LIMIT:
            counts = np.ones(gaps, dtype=np.int64)  # a chunk with no count carries one token
            counts[: len(tokens)] = tokens
            return np.repeat(dts / counts, counts)
        exact = [max(int(k), 1) for k in self.chunk_tokens[1 : gaps + 1]]
        exact += [1] * (gaps - len(exact))
        total = sum(exact)
        repeats = [max(k * ITL_EXPANSION_LIMIT // total, 1) for k in exact]
        return np.repeat(dts / np.asarray(exact, dtype=np.float64), repeats)

    # -- serialisation ----------------------------------------------------

    def to_dict(self, t0: float = 0.0, *, arrays: bool = False) -> dict[str, Any]:
        """JSON-ready dict with times relative to ``t0`` (the run's clock origin), to the
        nanosecond (the stamps rounded at once by numpy: a million in about 20 ms, where a
        deep copy and ``round`` of each took 3 s).

        ``arrays``: the per-chunk stamps stay numpy arrays (``chunk_times`` float64,
        ``chunk_tokens`` int64), the same numbers: for the plugin's own reports, whose stamps
        go to binary files (``sidecar.py``), so they are never made Python floats, one object
        each, only to be turned back into an array (30 ms per 512k stamps each way)."""
        d = {name: getattr(self, name) for name in _FIELDS}  # every field is a scalar but the two lists
        for key in _TIME_KEYS:
            if d.get(key) is not None:
                d[key] = round(d[key] - t0, 9)
        times = np.round(np.frombuffer(self.chunk_times, dtype=np.float64) - t0, 9)
        d["chunk_times"] = times if arrays else times.tolist()
        tokens = self.chunk_tokens
        if not arrays:
            d["chunk_tokens"] = tokens.tolist() if isinstance(tokens, array) else list(tokens)
        elif isinstance(tokens, array):  # a copy: the dict outlives no change to the record, but is its own
            d["chunk_tokens"] = np.frombuffer(tokens, dtype=np.int64).copy()
        else:  # a count past int64 (a hostile server's): kept as a list
            d["chunk_tokens"] = list(tokens)
        for key in ("input_tokens_source", "output_tokens_source", "chunk_tokens_source"):
            d[key] = d[key].value
        d["error_kind"] = self.error_kind.value if self.error_kind else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], t0: float = 0.0) -> RequestRecord:
        d = dict(d)
        for key in _TIME_KEYS:
            if d.get(key) is not None:
                d[key] = d[key] + t0
        times = d.get("chunk_times", [])
        if isinstance(times, (list, tuple, array)):
            d["chunk_times"] = array("d", [t + t0 for t in times])
        else:  # a numpy array, as to_dict(arrays=True) makes it: the same sums, at once
            d["chunk_times"] = array("d", (np.asarray(times, dtype=np.float64) + t0).tobytes())
        tokens = d.get("chunk_tokens")
        if isinstance(tokens, np.ndarray) and tokens.dtype == np.int64:  # as to_dict(arrays=True) makes it
            d["chunk_tokens"] = array("q", tokens.tobytes())
        elif isinstance(tokens, np.ndarray):  # another numpy array: plain ints
            d["chunk_tokens"] = tokens.tolist()
        for key in ("input_tokens_source", "output_tokens_source", "chunk_tokens_source"):
            d[key] = TokenSource(d.get(key, "none"))
        d["error_kind"] = ErrorKind(d["error_kind"]) if d.get("error_kind") else None
        return cls(**d)


_FIELDS = tuple(f.name for f in fields(RequestRecord))


def joined_itls(records: Sequence[RequestRecord]) -> tuple[np.ndarray, int]:
    """Every record's :meth:`RequestRecord.itl_array`, one after another in one array, and how
    many records gave any: the same numbers, computed over every record's stamps at once (a call
    per record cost 20 ms per 512 records at the end of a run). Where a record's counts are not
    one per chunk, or are past the expansion limit or int64, each record is computed on its own."""
    chosen = [r for r in records if r.ok and len(r.chunk_times) > 1]
    if not chosen:
        return np.empty(0), 0
    lengths = np.fromiter((len(r.chunk_times) for r in chosen), dtype=np.int64, count=len(chosen))
    starts = np.cumsum(lengths) - lengths  # each record's first chunk: no gap before it
    total = int(lengths.sum())
    if not all(len(r.chunk_tokens) == len(r.chunk_times) for r in chosen):
        return _each_records_itls(chosen)
    times = np.concatenate([np.frombuffer(r.chunk_times, dtype=np.float64) for r in chosen])
    dts = np.delete(np.diff(times), starts[1:] - 1)  # no gap across two records
    if sum(r.chunk_tokens.count(1) for r in chosen) == total:  # one token an event: each gap is one token's
        return dts, len(chosen)  # (each dt / 1 and repeated once: dt itself)
    try:
        tokens = np.fromiter(chain.from_iterable(r.chunk_tokens for r in chosen), dtype=np.int64, count=total)
    except OverflowError:  # a count past int64 (a hostile server's): each record's exact path
        return _each_records_itls(chosen)
    counts = np.maximum(np.delete(tokens, starts), 1)
    if float(np.add.reduceat(counts.astype(np.float64), starts - np.arange(len(chosen))).max()) > ITL_EXPANSION_LIMIT:
        return _each_records_itls(chosen)
    return np.repeat(dts / counts, counts), len(chosen)


def _each_records_itls(records: Sequence[RequestRecord]) -> tuple[np.ndarray, int]:
    arrays = [r.itl_array() for r in records]
    return np.concatenate(arrays), sum(1 for a in arrays if a.size)

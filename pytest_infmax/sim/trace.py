"""Ground truth: what the simulator sent, and when, request by request.

For every generation request the server keeps a :class:`RequestTrace`: when it
arrived (its first bytes reached the process; the handler start, later by the
server's front-end queue, is kept beside it), was scheduled, and when each content
event was handed to the socket (stamped just before the write, on ``time.monotonic()`` and as a wall-clock epoch),
with the tokens each event carried. A client's timestamps can then be checked
against the server's: the difference is the client's measurement error plus the
loopback transfer.

Finished traces go to a bounded ring buffer (``GET /sim/trace``) and, with
``--trace-file``, to a JSON-lines file, one line per request as it ends (flushed,
so a crashed simulator still leaves every finished request behind).

Wall-clock times are ``monotonic + offset`` with the offset read once at start-up,
the same mapping the load generator uses (``RunRecords.epoch_origin`` /
``clock_origin``), so an NTP step during a run moves neither side.
"""

from __future__ import annotations

import array
import collections
import json
import time
from pathlib import Path
from typing import IO, Any

DEFAULT_TRACE_CAPACITY = 100_000

# Outcomes a trace can end with.
OK = "ok"  # finished normally (finish_reason set)
ERROR = "error"  # answered with an HTTP error (injected or not)
CANCELLED = "cancelled"  # the client went away before the end
ABORTED = "aborted"  # the engine stopped under the request (shutdown)
RESET = "reset"  # an injected connection reset
CRASHED = "crashed"  # the process exited (--crash-after) while the request was open


class Clock:
    """``time.monotonic()`` plus a fixed offset to the wall clock."""

    __slots__ = ("wall_offset",)

    def __init__(self) -> None:
        mono_before = time.monotonic()
        wall = time.time()
        mono_after = time.monotonic()
        self.wall_offset = wall - (mono_before + mono_after) / 2

    def wall(self, mono: float | None) -> float | None:
        return None if mono is None else mono + self.wall_offset


class RequestTrace:
    """One request as the server saw it. Times are ``time.monotonic()`` seconds."""

    __slots__ = (
        "seq",
        "commit_seq",
        "response_id",
        "x_request_id",
        "endpoint",
        "stream",
        "body_sha256",
        "prompt_tokens",
        "max_tokens",
        "arrival",
        "handler",
        "queued",
        "scheduled",
        "first_token",
        "end",
        "chunk_times",
        "chunk_tokens",
        "completion_tokens",
        "status",
        "outcome",
        "finish_reason",
        "fault",
        "error",
        "committed",
    )

    def __init__(
        self, seq: int, endpoint: str, arrival: float, x_request_id: str | None, handler: float | None = None
    ) -> None:
        self.seq = seq  # arrival order
        self.commit_seq: int | None = None  # order of recording (what ?since= counts), set by commit
        self.endpoint = endpoint
        # The request's first bytes reached the process (the HTTP layer's data_received):
        # what TTFT and e2e count from. ``handler``: its handler started (later by the
        # server's front-end queue: the loop parsing and serving everything else).
        self.arrival = arrival
        self.handler = arrival if handler is None else handler
        self.x_request_id = x_request_id
        self.response_id: str | None = None
        self.stream = False
        self.body_sha256: str | None = None
        self.prompt_tokens: int | None = None
        self.max_tokens: int | None = None
        self.queued: float | None = None  # handed to the engine
        self.scheduled: float | None = None  # admitted to the running batch
        self.first_token: float | None = None
        self.end: float | None = None
        # Compact arrays: ~12 bytes per streamed event instead of ~40 for lists of objects.
        self.chunk_times = array.array("d")
        self.chunk_tokens = array.array("I")
        self.completion_tokens = 0
        self.status = 200
        self.outcome: str | None = None
        self.finish_reason: str | None = None
        self.fault: str | None = None
        self.error: str | None = None
        self.committed = False

    def add_chunk(self, t: float, tokens: int) -> None:
        """A content event carrying ``tokens`` output tokens was written at ``t``."""
        if self.first_token is None:
            self.first_token = t
        self.chunk_times.append(t)
        self.chunk_tokens.append(tokens)
        self.completion_tokens += tokens

    def to_dict(self, clock: Clock) -> dict[str, Any]:
        offset = clock.wall_offset
        return {
            "seq": self.seq,
            "commit_seq": self.commit_seq,
            "id": self.response_id,
            "x_request_id": self.x_request_id,
            "endpoint": self.endpoint,
            "stream": self.stream,
            "status": self.status,
            "outcome": self.outcome,
            "finish_reason": self.finish_reason,
            "fault": self.fault,
            "error": self.error,
            "body_sha256": self.body_sha256,
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "completion_tokens": self.completion_tokens,
            "arrival_mono": self.arrival,
            "arrival_wall": clock.wall(self.arrival),
            "handler_mono": self.handler,
            "handler_wall": clock.wall(self.handler),
            "queued_mono": self.queued,
            "queued_wall": clock.wall(self.queued),
            "scheduled_mono": self.scheduled,
            "scheduled_wall": clock.wall(self.scheduled),
            "first_token_mono": self.first_token,
            "first_token_wall": clock.wall(self.first_token),
            "end_mono": self.end,
            "end_wall": clock.wall(self.end),
            "chunk_mono": self.chunk_times.tolist(),
            "chunk_wall": [t + offset for t in self.chunk_times],
            "chunk_tokens": self.chunk_tokens.tolist(),
        }


class TraceLog:
    """Finished traces: a ring buffer of the last ``capacity`` plus an optional
    JSON-lines file that gets every one."""

    def __init__(self, clock: Clock, capacity: int = DEFAULT_TRACE_CAPACITY, path: Path | None = None) -> None:
        if capacity < 0:
            raise ValueError("trace capacity must be >= 0")
        self.clock = clock
        self.capacity = capacity
        self._ring: collections.deque[RequestTrace] = collections.deque(maxlen=capacity or 1)
        self._dropped = 0
        self._path = path
        self._file: IO[str] | None = None
        self._next_seq = 0
        self._next_commit_seq = 0
        self._open: dict[int, RequestTrace] = {}

    def open_file(self) -> None:
        if self._path is not None and self._file is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def close(self) -> None:
        """Flush and close the file (requests still open are committed by their handlers)."""
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None

    def begin(
        self, endpoint: str, arrival: float, x_request_id: str | None, handler: float | None = None
    ) -> RequestTrace:
        trace = RequestTrace(self._next_seq, endpoint, arrival, x_request_id, handler)
        self._next_seq += 1
        self._open[trace.seq] = trace
        return trace

    def commit(self, trace: RequestTrace) -> bool:
        """Record a finished trace; only the first call per trace counts."""
        if trace.committed:
            return False
        trace.committed = True
        trace.commit_seq = self._next_commit_seq
        self._next_commit_seq += 1
        self._open.pop(trace.seq, None)
        if self.capacity:
            if len(self._ring) == self._ring.maxlen:
                self._dropped += 1
            self._ring.append(trace)
        if self._file is not None:
            self._file.write(json.dumps(trace.to_dict(self.clock), separators=(",", ":")) + "\n")
            self._file.flush()
        return True

    def commit_open(self, outcome: str) -> None:
        """Commit every request still open with ``outcome`` (before an abrupt exit)."""
        for trace in list(self._open.values()):
            trace.outcome = trace.outcome or outcome
            self.commit(trace)

    def snapshot(self, since: int | None = None, clear: bool = False) -> dict[str, Any]:
        """The buffer as JSON: traces recorded after the one whose ``commit_seq`` is
        ``since`` (all when None), in the order they were recorded.

        ``since`` and ``next_since`` count in recording order (``commit_seq``), not in
        arrival order (``seq``): requests end out of arrival order, and a cursor in
        arrival order would skip a request that ends after a later-arriving one.
        ``next_since`` is the last recorded trace's ``commit_seq`` (-1 before any),
        so a poll with it returns exactly what was recorded since."""
        traces = [t for t in self._ring if since is None or t.commit_seq > since] if self.capacity else []  # type: ignore[operator]
        if traces:
            next_since: int | None = traces[-1].commit_seq
        elif since is None:
            next_since = self._next_commit_seq - 1
        else:
            next_since = since
        body = {
            "requests": [t.to_dict(self.clock) for t in traces],
            "next_since": next_since,
            "capacity": self.capacity,
            "dropped": self._dropped,
            "open": len(self._open),
            "wall_offset": self.clock.wall_offset,
        }
        if clear:
            self._ring.clear()
        return body

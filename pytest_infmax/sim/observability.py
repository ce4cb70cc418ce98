"""The simulator's per-app bookkeeping, :class:`Observability`: the trace log, the
Prometheus metrics, the fault plan and the request counter behind ``--crash-after``.

It is a module of its own because everything that serves a request records into it: the
app's handlers (:mod:`pytest_infmax.sim.server`), the front door
(:mod:`pytest_infmax.sim.frontdoor`) and the stream writers (:mod:`pytest_infmax.sim.streams`),
which the app imports.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import sys
import time

from aiohttp import web

from pytest_infmax.collector import CollectorWatch
from pytest_infmax.sim.config import SimConfig
from pytest_infmax.sim.engine import EngineRequest, LatenessHistogram
from pytest_infmax.sim.faults import FAULT_HEADER, FaultPlan, FaultSpec, FaultSpecError
from pytest_infmax.sim.metrics import SimMetrics
from pytest_infmax.sim.requests import ApiError, GenerationParams
from pytest_infmax.sim.responses import ResponseShape
from pytest_infmax.sim.trace import CRASHED, OK, Clock, RequestTrace, TraceLog

logger = logging.getLogger("pytest_infmax.sim")


class Observability:
    """Per-app bookkeeping shared by the handlers: the trace log, the Prometheus
    metrics, the fault plan and the request counter behind ``--crash-after``."""

    def __init__(self, config: SimConfig) -> None:
        self.clock = Clock()
        self.traces = TraceLog(self.clock, config.trace_capacity, config.trace_file)
        self.metrics = SimMetrics(config.model)
        self.faults = FaultPlan(config.faults, config.seed)
        self.crash_after = config.faults.crash_after
        self.generation_requests = 0
        # streams written by each writer (--sse-writer; a faulted stream always takes "aiohttp")
        self.sse_streams = {"fast": 0, "aiohttp": 0}
        # generation requests read by each front end (--front-end; sim/frontdoor.py): "fast" counts
        # those the front door served, "aiohttp" the rest (handed over, or every one under
        # --front-end aiohttp)
        self.front_end_requests = {"fast": 0, "aiohttp": 0}
        # content events of unfaulted streams: their write stamp minus the end of the engine step
        # that produced them (the engine's own lateness is its steps'; this is the wire's)
        self.write_lateness = LatenessHistogram()
        # the same for each stream's first content event alone: what the front end adds to the
        # time to first token between the model's first token and the wire
        self.first_write_lateness = LatenessHistogram()
        # the garbage collector's passes and pauses (pytest_infmax/collector.py); counting from serve()'s start
        self.collector = CollectorWatch()

    def on_generation_request(self, front_end: str) -> None:
        """Count a generation request (read by ``front_end``); past ``--crash-after``, exit
        like a crashed process: no response, no graceful shutdown, every connection dropped."""
        self.generation_requests += 1
        self.front_end_requests[front_end] += 1
        if self.crash_after is not None and self.generation_requests > self.crash_after:
            logger.error(
                "infmax-sim: injected crash (--crash-after %d): exiting with status 1 at request %d",
                self.crash_after,
                self.generation_requests,
            )
            self.traces.commit_open(CRASHED)
            self.traces.close()
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            _close_listening_sockets()
            os._exit(1)

    def choose_fault(self, request: web.Request) -> FaultSpec:
        try:
            return self.faults.choose(request.headers.get(FAULT_HEADER))
        except FaultSpecError as exc:
            raise ApiError(400, f"{FAULT_HEADER}: {exc}", param=FAULT_HEADER) from None

    def begin_trace(
        self,
        path: str,
        arrival: float,
        x_request_id: str | None,
        handler_start: float,
        shape: ResponseShape,
        params: GenerationParams,
        raw_body: bytes,
        fault: FaultSpec,
    ) -> RequestTrace:
        """The trace of a generation request, opened with what its request says (aiohttp's
        handler and the front door, sim/frontdoor.py, alike)."""
        trace = self.traces.begin(path, arrival, x_request_id, handler_start)
        trace.response_id = shape.response_id
        trace.stream = params.stream
        trace.prompt_tokens = params.prompt_tokens
        trace.max_tokens = params.max_tokens
        trace.body_sha256 = hashlib.sha256(raw_body).hexdigest()
        trace.fault = fault.describe()
        return trace

    def record_chunk(self, trace: RequestTrace, t: float, tokens: int, emitted: float | None = None) -> None:
        """A content event with ``tokens`` output tokens is being written at ``t``; ``emitted``:
        the end of the engine step that produced them (its write lateness), if known."""
        previous = trace.chunk_times[-1] if trace.chunk_times else None
        trace.add_chunk(t, tokens)
        if previous is None:
            self.metrics.on_first_token(trace.prompt_tokens or 0, t - trace.arrival)
        self.metrics.on_tokens(tokens, None if previous is None else t - previous)
        if emitted is not None:
            self.write_lateness.add(t - emitted)
            if previous is None:
                self.first_write_lateness.add(t - emitted)

    def finish(
        self,
        trace: RequestTrace,
        outcome: str,
        engine_request: EngineRequest | None,
        finish_reason: str | None = None,
    ) -> None:
        """Commit the trace (once) and, for a normal finish, the request metrics."""
        if trace.committed:
            return
        if trace.end is None:
            trace.end = time.monotonic()
        if trace.outcome is None:
            trace.outcome = outcome
        if finish_reason is not None:
            trace.finish_reason = finish_reason
        if engine_request is not None:
            trace.scheduled = getattr(engine_request, "scheduled_time", None)
        self.traces.commit(trace)
        if trace.outcome == OK and trace.finish_reason is not None:
            queue = None if trace.scheduled is None or trace.queued is None else trace.scheduled - trace.queued
            ttft = None if trace.first_token is None else trace.first_token - trace.arrival
            self.metrics.on_finished(
                trace.finish_reason, trace.end - trace.arrival, queue, ttft, trace.completion_tokens
            )


def _close_listening_sockets() -> None:
    """Close our listening sockets before an injected crash. Exit closes every
    descriptor, but in no promised order: a client reconnecting the instant its
    connection drops could still be accepted by the kernel into a listen backlog
    that dies a moment later (a reset instead of a refusal). Closing the listeners
    first makes every later request a clean ``connection refused``. Linux only
    (``/proc/self/fd``); elsewhere the race stays, as with a real crash."""
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            try:
                sock = socket.socket(fileno=int(name))
            except (OSError, ValueError):
                continue  # not a socket (or already gone)
            try:
                listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            except OSError:
                listening = 0
            if listening:
                sock.close()
            else:
                sock.detach()  # not ours to close: leave the descriptor as it was

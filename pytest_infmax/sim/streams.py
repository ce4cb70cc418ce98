"""How a response stream is written: the SSE writers that ``--sse-writer`` chooses between.

* ``aiohttp``, and every stream with a stream fault: the request's handler task makes the
  events (``_stream_response`` in :mod:`pytest_infmax.sim.server`) and :class:`SseWriter`
  writes them through aiohttp's ``StreamResponse``, one by one where a stall, a reset or a
  split must land between two;
* ``fast``: :class:`FastSseStream` writes each event from the engine's step straight to the
  transport, in the slices of an :class:`Outbox` (the comment above it says why).

It is a module of its own because the front door (:mod:`pytest_infmax.sim.frontdoor`) writes
its streams with :class:`FastSseStream` too: the bytes on the wire are the same whichever
front end read the request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from pytest_infmax.sim.engine import FINISH_ABORT, EngineRequest, TokenDelivery
from pytest_infmax.sim.faults import SPLIT, FaultSpec
from pytest_infmax.sim.observability import Observability
from pytest_infmax.sim.requests import GenerationParams, OutputText, encode_json
from pytest_infmax.sim.responses import SSE_DONE, ResponseShape, aborted_error, sse, usage_of
from pytest_infmax.sim.trace import ABORTED, OK, RESET, RequestTrace

# Gap between the pieces of one event under malformed=split, so they leave as
# separate TCP segments rather than being coalesced in the socket buffer.
SPLIT_GAP_S = 0.001


class ConnectionResetInjected(Exception):
    """The injected reset happened; the handler must not touch the transport again."""


def reset_connection(request: web.Request) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0): unsent bytes are dropped."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _split_event(data: bytes) -> list[bytes]:
    """One SSE event in four pieces: inside ``data:``, mid-payload, the first
    newline, the blank line."""
    if len(data) < 8:
        return [data]
    body_end = len(data) - 2
    middle = max(3, body_end // 2)
    return [data[:2], data[2:middle], data[middle : body_end + 1], data[body_end + 1 :]]


async def next_deliveries(engine_request: EngineRequest) -> list[TokenDelivery]:
    """Wait for the next delivery, then take any others already queued, so a
    consumer that fell behind catches up with one write instead of many."""
    queue = engine_request.deliveries
    deliveries = [await queue.get()]
    while not queue.empty():
        deliveries.append(queue.get_nowait())
    return deliveries


class SseWriter:
    """Writes SSE events and stamps each content event in the trace just before
    the write that completes it. Without stream faults a batch of events is one
    write; with them, events go one by one so a stall, a reset or a split can
    land between any two."""

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        fault: FaultSpec,
        trace: RequestTrace,
        obs: Observability,
    ) -> None:
        self.request = request
        self.response = response
        self.fault = fault
        self.trace = trace
        self.obs = obs
        self.tokens_written = 0
        self.stalled = False

    async def send(
        self,
        events: list[tuple[bytes, int]],
        on_last: Callable[[], None] | None = None,
        emit_times: Sequence[float] = (),
    ) -> None:
        """Write ``(bytes, content tokens)`` events. ``on_last`` runs just before
        the write of the last byte (to commit the trace before the client can
        have seen the end of the stream); ``emit_times``: when the engine produced
        each content event's tokens (for the write lateness)."""
        if not self.fault.rewrites_stream:
            now = time.monotonic()
            emitted = iter(emit_times)  # one a content event, in order (a delivery has a token at least)
            for _, tokens in events:
                if tokens:
                    self._record(now, tokens, next(emitted, None))
            if on_last is not None:
                on_last()
            await self.response.write(b"".join(data for data, _ in events))
            return
        split = SPLIT in self.fault.malformed
        for index, (data, tokens) in enumerate(events):
            await self._before_event()
            pieces = _split_event(data) if split else [data]
            for piece_index, piece in enumerate(pieces):
                if piece_index:
                    await asyncio.sleep(SPLIT_GAP_S)
                if piece_index == len(pieces) - 1:
                    if tokens:
                        self._record(time.monotonic(), tokens)
                    if on_last is not None and index == len(events) - 1:
                        on_last()
                await self.response.write(piece)

    def _record(self, t: float, tokens: int, emitted: float | None = None) -> None:
        self.obs.record_chunk(self.trace, t, tokens, emitted)
        self.tokens_written += tokens

    async def _before_event(self) -> None:
        fault = self.fault
        if fault.stall_seconds > 0 and not self.stalled and self.tokens_written >= fault.stall_after:
            self.stalled = True
            await asyncio.sleep(fault.stall_seconds)
        if fault.reset_after is not None and self.tokens_written >= fault.reset_after:
            self.trace.outcome = RESET
            reset_connection(self.request)
            raise ConnectionResetInjected


# -- the fast stream writer ----------------------------------------------------------------
#
# At a few hundred streams the aiohttp path spends ~27 us per SSE event on the one event
# loop: a queue wake-up of the stream's task per step, a dict built and JSON-encoded per
# chunk, an awaited StreamResponse.write. The loop is busy with that for every stream at
# every step, and a new request's bytes wait in its socket meanwhile (the "server read lag"
# of docs/load-generator.md). A stream without a stream fault therefore takes this path:
# the engine hands each delivery to the stream's sink inside its step (EngineRequest.sink),
# which makes the event (a byte template split once around the text, framed as one HTTP/1.1
# chunk) before the step's end, and the outbox writes it at the end, straight to the socket
# (see _WRITE_SLICE_S below). The handler task only waits for the end
# (and for a paused transport: see FastSseStream.on_delivery). The bytes on the wire are
# the aiohttp path's, event for event (tests/test_sim_fastpath.py).

_TEXT_MARK = "\x00infmax-text"
_USAGE_MARK = "\x00infmax-usage"
# A reader that fell behind: at most this many deliveries per catch-up write, then the
# writer waits for the transport to drain again, so a catch-up never balloons the buffer.
_FAST_CATCH_UP_DELIVERIES = 64


# A step's events are made before the step's end (the engine completes a step early: see
# _MAKE_AHEAD_MARGIN in sim/engine.py), so at the end only their writes are left: each one
# straight to its socket where the transport's buffer is empty (what the transport's write
# would do, less its checks and calls: docs/calibration.md, "Events made ahead"), their booking
# in the trace and the metrics once the step's last is out. The making, the writes and the
# booking go in slices of about this long, with the event loop free between two: it reads the
# sockets then (a new request's first bytes get their arrival stamp), so the writing of one
# step delays a request by at most a slice, not by the whole step's writing.
_WRITE_SLICE_S = 0.0002


class Outbox:
    """The fast streams' events of a step: handed out by the engine before the step's end,
    made in slices until it, and written at it (``release``), in the order the engine handed
    them out, in slices too (one ``call_soon`` each): the loop polls its sockets between two.

    A made event is held by its stream (``FastSseStream.make``), not in an object of its own:
    an event lives from its making to its booking, a step or so, and containers living that
    long survive the collector's young generations into the old one, which then fills faster
    and is collected more often, each a stall of several milliseconds at 1,000 streams. The
    queues hold streams and deliveries side by side."""

    __slots__ = (
        "_loop",
        "_to_make",
        "_to_make_deliveries",
        "_making",
        "_queue",
        "_queue_deliveries",
        "_ends",
        "_scheduled",
        "_on_drained",
        "_written",
        "_written_at",
        "_booked",
        "_make_s",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, on_drained: Callable[[], None]) -> None:
        self._loop = loop
        # handed out, not yet made
        self._to_make: collections.deque[FastSseStream] = collections.deque()
        self._to_make_deliveries: collections.deque[TokenDelivery] = collections.deque()
        self._making = False  # a making slice is scheduled
        # to write: a stream with None holds its made event; with a delivery, it is made as written
        self._queue: collections.deque[FastSseStream] = collections.deque()
        self._queue_deliveries: collections.deque[TokenDelivery | None] = collections.deque()
        # made events that end their stream: written after the step's others, since each one's
        # booking (its trace committed) follows its write in the same slice
        self._ends: collections.deque[FastSseStream] = collections.deque()
        self._written: list[FastSseStream] = []  # written straight to the socket this step
        self._written_at: list[float] = []  # their write stamps
        self._booked = 0  # how many of them are booked
        self._scheduled = False  # a writing or booking slice is scheduled
        self._on_drained = on_drained  # the engine's output_drained: a step held for us goes on
        self._make_s = 0.0  # CPU seconds to make an event (recent slices)

    def backlog(self) -> bool:
        """Events of an earlier step are still unwritten (the engine holds its next step)."""
        return bool(self._queue or self._to_make or self._ends or self._written)

    def making_seconds(self, events: int) -> float:
        """About how long making ``events`` events takes (the engine's ``making_seconds``)."""
        return events * self._make_s

    def put(self, stream: FastSseStream, delivery: TokenDelivery) -> None:
        """The engine's sink (inside its step's completion, before the step's end): the event
        is made in the next slices."""
        self._to_make.append(stream)
        self._to_make_deliveries.append(delivery)
        if not self._making:
            self._making = True
            self._loop.call_soon(self._make_slice)

    def _make_slice(self) -> None:
        self._making = False
        to_make, deliveries = self._to_make, self._to_make_deliveries
        queue, queue_deliveries, ends = self._queue, self._queue_deliveries, self._ends
        clock = time.monotonic
        start = clock()
        end, made = start + _WRITE_SLICE_S, 0
        while to_make:
            stream, delivery = to_make.popleft(), deliveries.popleft()
            if not stream.make(delivery):
                queue.append(stream)
                queue_deliveries.append(delivery)
            elif stream._made_end is None:
                queue.append(stream)
                queue_deliveries.append(None)
            else:
                ends.append(stream)
            made += 1
            if clock() >= end:
                break
        if made:
            self._make_s += ((clock() - start) / made - self._make_s) / 4
        if to_make:
            self._making = True
            self._loop.call_soon(self._make_slice)

    def release(self) -> None:
        """The step's end (the engine's ``on_output``): write its events, the first slice now.
        An event not made by now is made as it is written."""
        self._queue.extend(self._to_make)
        self._queue_deliveries.extend(self._to_make_deliveries)
        self._to_make.clear()
        self._to_make_deliveries.clear()
        if self._ends:
            self._queue.extend(self._ends)
            self._queue_deliveries.extend(itertools.repeat(None, len(self._ends)))
            self._ends.clear()
        if not self._scheduled:
            self._flush()

    def _flush(self) -> None:
        self._scheduled = False
        queue, deliveries = self._queue, self._queue_deliveries
        written, written_at = self._written, self._written_at
        ended_from = len(written)  # the streams' ends written in this slice are booked in it
        ended = False
        clock = time.monotonic
        end = clock() + _WRITE_SLICE_S
        while queue:
            stream, delivery = queue.popleft(), deliveries.popleft()
            if delivery is not None:  # not made: made and written now, or left for the handler
                stream.on_delivery(delivery)
            elif stream._made_fd < 0 or stream._transport.is_closing():  # (closing: its fd may be gone)
                stream.send_made()  # the transport's own write, or what a closed one does
            else:
                frame: bytes = stream._made_frame  # type: ignore[assignment]
                t = clock()
                try:
                    sent = os.write(stream._made_fd, frame)
                except OSError:  # EAGAIN, or the peer gone: the transport buffers it or fails
                    sent = 0
                if sent < len(frame):
                    stream._transport.write(frame[sent:])
                written.append(stream)
                written_at.append(t)
                ended = ended or stream._made_end is not None
            if clock() >= end:
                break
        # A stream's end is booked and its trace committed before the loop reads a request
        # again: a client that saw the end cannot ask for the trace before it is there.
        if ended:
            for index in range(ended_from, len(written)):
                if written[index]._made_end is not None:
                    written[index].ended(written_at[index])
        if queue:
            self._scheduled = True
            self._loop.call_soon(self._flush)
            return
        self._book()

    def _book(self) -> None:
        """The step's written events into the trace and the metrics, in slices too (1,000 of
        them take ~2 ms); the engine's next step waits for them (``backlog``), so a stream's
        events are booked in their order. (A stream's end was booked as it was written.)"""
        written, written_at = self._written, self._written_at
        end = time.monotonic() + _WRITE_SLICE_S
        index, count = self._booked, len(written)
        while index < count:
            stop = min(index + 32, count)
            for i in range(index, stop):
                written[i].book_made(written_at[i])
            index = stop
            if index < count and time.monotonic() >= end:
                self._booked = index
                self._scheduled = True
                self._loop.call_soon(self._book_slice)
                return
        self._written, self._written_at, self._booked = [], [], 0
        if self._queue:  # released while this was booked (the aborts of a shutdown)
            self._flush()
            return
        self._on_drained()

    def _book_slice(self) -> None:
        self._scheduled = False
        self._book()


def _json_text(text: str) -> bytes:
    return encode_json(text).encode()


class FastSseStream:
    """One stream's events, written from the engine's step. See the comment above."""

    __slots__ = (
        "_transport",
        "_fd",
        "_protocol",
        "_params",
        "_shape",
        "_engine_request",
        "_output",
        "_trace",
        "_obs",
        "_outbox",
        "_head",
        "_middle",
        "_tail",
        "_waiter",
        "_made_frame",
        "_made_delivery",
        "_made_content",
        "_made_end",
        "_made_fd",
        "on_wake",
        "pending",
        "completion_tokens",
        "first",
        "finished",
        "error",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: Any,
        params: GenerationParams,
        shape: ResponseShape,
        engine_request: EngineRequest,
        output: OutputText,
        trace: RequestTrace,
        obs: Observability,
        outbox: Outbox,
    ) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        plain = sock is not None and transport.get_extra_info("sslcontext") is None
        self._fd = sock.fileno() if plain else -1  # -1: only through the transport
        self._protocol = protocol
        self._params = params
        self._shape = shape
        self._engine_request = engine_request
        self._output = output
        self._trace = trace
        self._obs = obs
        self._outbox = outbox
        # A content event that does not finish the stream, encoded once with marks where its
        # text (and its running usage) go, then split around them.
        usage_mark = _USAGE_MARK if params.continuous_usage else None
        choice = shape.content_choice(_TEXT_MARK, None)
        template = sse(shape.chunk(choice, usage_mark, params.include_usage))  # type: ignore[arg-type]
        self._head, _, rest = template.partition(_json_text(_TEXT_MARK))
        self._middle, self._tail = rest, b""
        if params.continuous_usage:
            self._middle, _, self._tail = rest.partition(_json_text(_USAGE_MARK))
        self._waiter: asyncio.Future[None] | None = None
        # the event made before its step's end, until the outbox writes and books it (make)
        self._made_frame: bytes | None = None
        self._made_delivery: TokenDelivery | None = None
        self._made_content = False  # it holds the delivery's content event (booked once written)
        self._made_end: tuple[str, str | None] | None = None  # (outcome, finish reason) if it ends the stream
        self._made_fd = -1  # the socket to write it to directly (nothing was buffered), else -1
        # who writes what waits and ends the body, where no handler awaits ``wait`` (sim/frontdoor.py)
        self.on_wake: Callable[[], None] | None = None
        self.pending: list[TokenDelivery] = []  # deliveries not yet written (a paused transport)
        self.completion_tokens = 0
        self.first = True
        self.finished = False  # the last event was written (or the stream failed): the handler ends it
        self.error: BaseException | None = None

    def attach(self) -> None:
        """Become the engine's sink for its request (deliveries go into the outbox, made at
        once, written at the step's end); what it delivered before waits in ``pending``."""
        queue = self._engine_request.deliveries
        while not queue.empty():  # delivered before the sink was set (prepare may have yielded)
            self.pending.append(queue.get_nowait())
        self._engine_request.sink = functools.partial(self._outbox.put, self)  # one call less than a method

    def write_batch(self) -> None:
        """Write the next deliveries that waited (a paused transport), 64 at most at a time."""
        batch = self.pending[:_FAST_CATCH_UP_DELIVERIES]
        del self.pending[:_FAST_CATCH_UP_DELIVERIES]
        self.write(batch)

    def make(self, delivery: TokenDelivery) -> bool:
        """Make the event of ``delivery`` before its step's end, held here until the outbox
        writes it at the end; False if not made. Made now only if it can be written then: the
        stream open and keeping up (no delivery waiting, its transport not paused or closing,
        as ``on_delivery`` checks), and no event of it held already (the aborts of a shutdown
        after a made event); else it is made when written, or waits for the handler."""
        if (
            self._made_frame is not None
            or self.finished
            or self.pending
            or self._protocol.writing_paused
            or self._transport.is_closing()
        ):
            return False
        try:
            if self.first or delivery.finish_reason is not None or self._params.continuous_usage:
                frame, content, end = self._make((delivery,))
                has_content = bool(content)
            else:  # the common event, inline: the template around its text
                self.completion_tokens += delivery.token_count
                data = self._head + self._output.take_json(delivery.token_count) + self._middle
                frame, has_content, end = b"%x\r\n%b\r\n" % (len(data), data), True, None
        except Exception as exc:  # never into the engine's step: the handler raises it
            self.error = exc
            self.finished = True
            self._wake()
            return False
        self._made_frame, self._made_delivery, self._made_content, self._made_end = frame, delivery, has_content, end
        # written straight to the socket only where nothing is buffered before it, which stays
        # so until the step's end: only this stream writes to its transport meanwhile
        self._made_fd = self._fd if self._transport.get_write_buffer_size() == 0 else -1
        return True

    def _take_made(self) -> tuple[bytes, tuple[TokenDelivery, ...], tuple[str, str | None] | None]:
        frame, delivery, end = self._made_frame, self._made_delivery, self._made_end
        assert frame is not None and delivery is not None
        content = (delivery,) if self._made_content else ()
        self._made_frame = self._made_delivery = self._made_end = None
        return frame, content, end

    def send_made(self) -> None:
        """From the outbox, at the step's end: write the made event through the transport (to
        a socket that had bytes buffered), or, if the client went away since, leave it to the
        handler (which ends the stream)."""
        delivery = self._made_delivery
        frame, content, end = self._take_made()
        if self._transport.is_closing():
            self.pending.append(delivery)  # type: ignore[arg-type]
            self._wake()
        else:
            self._send(frame, content, end)

    def ended(self, t: float) -> None:
        """From the outbox: the stream's last event was written at ``t`` (straight to the
        socket): booked, the trace committed, the handler woken to end the body."""
        _, content, end = self._take_made()
        for delivery in content:
            self.book(delivery, t)
        if self._trace.end is None:
            self._trace.end = t
        assert end is not None
        self._obs.finish(self._trace, end[0], self._engine_request, end[1])
        self.finished = True
        self._wake()

    def book_made(self, t: float) -> None:
        """From the outbox: the made event was written at ``t``; book it (a stream's end was
        booked as it was written)."""
        if self._made_frame is None:  # an end, booked already
            return
        delivery, content = self._made_delivery, self._made_content
        self._made_frame = self._made_delivery = self._made_end = None
        if content:
            self.book(delivery, t)  # type: ignore[arg-type]

    def book(self, delivery: TokenDelivery, t: float) -> None:
        """A content event written at ``t`` goes into the trace, the metrics, the write lateness."""
        trace = self._trace
        if trace.committed:  # the stream ended (its client gone) while the step was written
            return
        self._obs.record_chunk(trace, t, delivery.token_count, delivery.emit_time)

    def on_delivery(self, delivery: TokenDelivery) -> None:
        """Write the event now, unless the client is not keeping up (the transport paused
        writing above its high-water mark, as aiohttp's drain waits on) or gone: then the
        delivery waits here for the handler, which drains first. Pending deliveries are token
        counts (as many as the request's max_tokens at most, as in the queue of the aiohttp
        path); their bytes are made when written."""
        if self.finished:
            return
        if self.pending or self._protocol.writing_paused or self._transport.is_closing():
            self.pending.append(delivery)
            self._wake()
            return
        try:
            self.write((delivery,))
        except Exception as exc:  # never into the engine's step: the handler raises it
            self.error = exc
            self.finished = True
            self._wake()

    def write(self, deliveries: Sequence[TokenDelivery]) -> None:
        """Write the events of ``deliveries`` as one HTTP chunk, each content event stamped in
        the trace just before the write; the last one commits the trace first."""
        self._send(*self._make(deliveries))

    def _make(
        self, deliveries: Sequence[TokenDelivery]
    ) -> tuple[bytes, tuple[TokenDelivery, ...], tuple[str, str | None] | None]:
        """The events of ``deliveries`` as one HTTP chunk; its content events' deliveries; and
        (outcome, finish reason) if it ends the stream."""
        params, shape = self._params, self._shape
        events: list[bytes] = []
        content: list[TokenDelivery] = []
        if self.first:
            self.first = False
            preamble = shape.preamble_choice()
            if preamble is not None:
                usage = usage_of(params.prompt_tokens, 0) if params.continuous_usage else None
                events.append(sse(shape.chunk(preamble, usage, params.include_usage)))
        end: tuple[str, str | None] | None = None  # (outcome, finish reason) once the stream ends
        for delivery in deliveries:
            if delivery.finish_reason == FINISH_ABORT:
                events.append(sse(aborted_error().body()))
                events.append(SSE_DONE)
                end = (ABORTED, None)
                break
            count = delivery.token_count
            self.completion_tokens += count
            if delivery.finish_reason is None:
                text_json = self._output.take_json(count)
                if params.continuous_usage:
                    usage_json = encode_json(usage_of(params.prompt_tokens, self.completion_tokens)).encode()
                    events.append(b"".join((self._head, text_json, self._middle, usage_json, self._tail)))
                else:
                    events.append(b"".join((self._head, text_json, self._middle)))
                content.append(delivery)
                continue
            text = self._output.take(count)
            usage = usage_of(params.prompt_tokens, self.completion_tokens) if params.continuous_usage else None
            choice = shape.content_choice(text, delivery.finish_reason)
            events.append(sse(shape.chunk(choice, usage, params.include_usage)))
            content.append(delivery)
            if params.include_usage:
                final_usage = usage_of(params.prompt_tokens, self.completion_tokens)
                events.append(sse(shape.chunk(None, final_usage, True)))
            events.append(SSE_DONE)
            end = (OK, delivery.finish_reason)
            break
        data = b"".join(events)
        return b"%x\r\n%b\r\n" % (len(data), data), tuple(content), end

    def _send(self, frame: bytes, content: Sequence[TokenDelivery], end: tuple[str, str | None] | None) -> None:
        """Write a made chunk through the transport: its content booked at the write, the
        trace committed first when it ends the stream."""
        now = time.monotonic()
        for delivery in content:
            self.book(delivery, now)
        if end is not None:
            self._obs.finish(self._trace, end[0], self._engine_request, end[1])
        self._transport.write(frame)
        if end is not None:
            self.finished = True
            self._wake()

    def _wake(self) -> None:
        if self.on_wake is not None:
            self.on_wake()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until a delivery is pending, or the stream finished."""
        if self.pending or self.finished:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


def fast_stream_possible(request: web.Request, writer: Any) -> bool:
    """The fast writer frames HTTP/1.1 chunks itself: only on a chunked, uncompressed body
    whose headers went out in prepare, over a transport and an aiohttp protocol it knows."""
    return (
        request.transport is not None
        and getattr(writer, "chunked", False) is True
        and getattr(writer, "_compress", None) is None
        and getattr(writer, "_headers_buf", None) is None
        and isinstance(getattr(request.protocol, "writing_paused", None), bool)
    )


async def fast_stream(
    response: web.StreamResponse, writer: Any, stream: FastSseStream, engine_request: EngineRequest
) -> web.StreamResponse:
    """The handler's part of a fast stream: hand the engine the sink, then wait for the end.
    It writes only what waited for a paused transport (after draining it) and the body's end.
    A client that goes away cancels this task (``handler_cancellation``) or fails the drain;
    either way ``_generate`` drops the request from the engine."""
    stream.attach()
    transport = stream._transport
    try:
        while True:
            if stream.error is not None:
                raise stream.error
            if stream.pending:
                await writer.drain()  # waits while the client does not read
                if transport.is_closing():
                    raise ConnectionResetError("the client closed the connection")
                stream.write_batch()
                continue
            if stream.finished:
                break
            await stream.wait()
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away; the caller drops the request from the engine
    finally:
        engine_request.sink = None
    return response

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
            for _, tokens in events:
                if tokens:
                    self._record(now, tokens)
            for emitted in emit_times:
                self.obs.write_lateness.add(now - emitted)
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

    def _record(self, t: float, tokens: int) -> None:
        self.obs.record_chunk(self.trace, t, tokens)
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
# which fills a byte template split once around the text and writes the event, framed as
# one HTTP/1.1 chunk, straight to the transport. The handler task only waits for the end
# (and for a paused transport: see FastSseStream.on_delivery). The bytes on the wire are
# the aiohttp path's, event for event (tests/test_sim_fastpath.py).

_TEXT_MARK = "\x00infmax-text"
_USAGE_MARK = "\x00infmax-usage"
# A reader that fell behind: at most this many deliveries per catch-up write, then the
# writer waits for the transport to drain again, so a catch-up never balloons the buffer.
_FAST_CATCH_UP_DELIVERIES = 64


# A step's events are written in slices of about this long, with the event loop free between
# two: it reads the sockets then (a new request's first bytes get their arrival stamp), so the
# writing of one step delays a request by at most a slice, not by the whole step's writing.
_WRITE_SLICE_S = 0.0002


class Outbox:
    """The fast streams' deliveries in the order the engine handed them out, written in
    slices (one ``call_soon`` each) so that the loop polls its sockets between two."""

    __slots__ = ("_loop", "_queue", "_scheduled", "_on_drained")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_drained: Callable[[], None]) -> None:
        self._loop = loop
        self._queue: collections.deque[tuple[FastSseStream, TokenDelivery]] = collections.deque()
        self._scheduled = False
        self._on_drained = on_drained  # the engine's output_drained: a step held for us goes on

    def backlog(self) -> bool:
        """Events of an earlier step are still unwritten (the engine holds its next step)."""
        return bool(self._queue)

    def put(self, stream: FastSseStream, delivery: TokenDelivery) -> None:
        self._queue.append((stream, delivery))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        queue = self._queue
        end = time.monotonic() + _WRITE_SLICE_S
        while queue:
            stream, delivery = queue.popleft()
            stream.on_delivery(delivery)
            if time.monotonic() >= end:
                break
        if queue:
            self._loop.call_soon(self._flush)
        else:
            self._scheduled = False
            self._on_drained()


def _json_text(text: str) -> bytes:
    return encode_json(text).encode()


class FastSseStream:
    """One stream's events, written from the engine's step. See the comment above."""

    __slots__ = (
        "_transport",
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
        # who writes what waits and ends the body, where no handler awaits ``wait`` (sim/frontdoor.py)
        self.on_wake: Callable[[], None] | None = None
        self.pending: list[TokenDelivery] = []  # deliveries not yet written (a paused transport)
        self.completion_tokens = 0
        self.first = True
        self.finished = False  # the last event was written (or the stream failed): the handler ends it
        self.error: BaseException | None = None

    def attach(self) -> None:
        """Become the engine's sink for its request (deliveries go into the outbox, written in
        its next slice); what it delivered before waits in ``pending``."""
        queue = self._engine_request.deliveries
        while not queue.empty():  # delivered before the sink was set (prepare may have yielded)
            self.pending.append(queue.get_nowait())
        self._engine_request.sink = functools.partial(self._outbox.put, self)  # one call less than a method

    def write_batch(self) -> None:
        """Write the next deliveries that waited (a paused transport), 64 at most at a time."""
        batch = self.pending[:_FAST_CATCH_UP_DELIVERIES]
        del self.pending[:_FAST_CATCH_UP_DELIVERIES]
        self.write(batch)

    def on_delivery(self, delivery: TokenDelivery) -> None:
        """From the outbox: write the event now, unless the client is not
        keeping up (the transport paused writing above its high-water mark, as aiohttp's
        drain waits on) or gone: then the delivery waits here for the handler, which drains
        first. Pending deliveries are token counts (as many as the request's max_tokens at
        most, as in the queue of the aiohttp path); their bytes are made when written."""
        if self.finished:
            return
        if self.pending or self._protocol.writing_paused or self._transport.is_closing():
            self.pending.append(delivery)
            self._wake()
            return
        try:
            if self.first or delivery.finish_reason is not None or self._params.continuous_usage:
                self.write((delivery,))
                return
            # the common event, inline: the template around its text, stamped, written
            self.completion_tokens += delivery.token_count
            data = self._head + self._output.take_json(delivery.token_count) + self._middle
            now = time.monotonic()
            obs = self._obs
            obs.record_chunk(self._trace, now, delivery.token_count)
            obs.write_lateness.add(now - delivery.emit_time)
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        except Exception as exc:  # never into the engine's step: the handler raises it
            self.error = exc
            self.finished = True
            self._wake()

    def write(self, deliveries: Sequence[TokenDelivery]) -> None:
        """Write the events of ``deliveries`` as one HTTP chunk, each content event stamped in
        the trace just before the write; the last one commits the trace first."""
        params, shape = self._params, self._shape
        events: list[bytes] = []
        written: list[TokenDelivery] = []  # the content events' deliveries
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
                written.append(delivery)
                continue
            text = self._output.take(count)
            usage = usage_of(params.prompt_tokens, self.completion_tokens) if params.continuous_usage else None
            choice = shape.content_choice(text, delivery.finish_reason)
            events.append(sse(shape.chunk(choice, usage, params.include_usage)))
            written.append(delivery)
            if params.include_usage:
                final_usage = usage_of(params.prompt_tokens, self.completion_tokens)
                events.append(sse(shape.chunk(None, final_usage, True)))
            events.append(SSE_DONE)
            end = (OK, delivery.finish_reason)
            break
        data = b"".join(events)
        now = time.monotonic()
        obs = self._obs
        for delivery in written:
            obs.record_chunk(self._trace, now, delivery.token_count)
            obs.write_lateness.add(now - delivery.emit_time)
        if end is not None:
            self._obs.finish(self._trace, end[0], self._engine_request, end[1])
        self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
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

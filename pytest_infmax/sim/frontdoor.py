"""The simulator's front door: plain streaming generation requests served at the protocol level.

Why it exists: at a stream turn-over every client sends its next request at once, and the
loop ran, for each of them in one iteration, aiohttp's per-request work (its connection
task's wake-up, the request object, the middleware, the route, the response's ``prepare``)
and our handler's start: ~0.15 ms a request, ~30 ms for 256. Requests whose bytes missed
that iteration's poll waited it out, and the TTFT a client measured held that wait
(docs/calibration.md, "The request's trip").

Here the request the fast stream writer serves anyway -- ``POST /v1/completions`` or
``/v1/chat/completions`` over keep-alive HTTP/1.1 with a ``Content-Length`` body, a valid
body with ``"stream": true``, the simulator ready, the API key right, no fault to inject --
is parsed by httptools (llhttp, which aiohttp's C parser is built on too; the client uses it) and
its stream started from a plain callback: no task, no request object, no middleware. Its events
are written by the same ``FastSseStream`` as aiohttp's fast path (sim/streams.py), so the bytes
on the wire, the trace and the metrics are the same.

``data_received`` only stamps the bytes' arrival and keeps them: the requests read are parsed
and started in slices of ~0.2 ms, in the order they came, with the loop's poll between two
slices. At a burst (every stream of a run sends its first request at once) the starts take
milliseconds (~15 us each); started inside ``data_received``, as they were, they held up the
poll, and a request whose bytes came in meanwhile got its arrival stamp only after them: a
wait in the TTFT the client measured that the trace did not hold. Now the trace's arrival is
within a slice of the bytes', and the burst's wait is the front-end queue (arrival to start),
inside the TTFT the trace records.

Anything else (another path or method, a request to be answered with an error, a fault, a
non-streaming body, ``Expect``, a chunked request body, HTTP/1.0, ``Connection: close``) is
handed to aiohttp: from that request's first byte on, the connection is aiohttp's
protocol's, which serves it and every later request on it exactly as it would have. Parsing
a declined body twice costs nothing that matters: declined requests are not the hot path.
``--front-end aiohttp`` leaves every connection to aiohttp, as before.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import socket
import time

import httptools
import msgspec
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from pytest_infmax.sim.engine import EngineRequest, EngineStopped, RequestTooLarge
from pytest_infmax.sim.faults import FAULT_HEADER, NO_FAULT
from pytest_infmax.sim.pollclock import poll_clock
from pytest_infmax.sim.requests import (
    ApiError,
    GenerationParams,
    OutputText,
    parse_chat_request,
    parse_completion_request,
)
from pytest_infmax.sim.responses import SSE_HEADERS, ChatShape, CompletionShape, ResponseShape
from pytest_infmax.sim.server import (
    CONFIG_KEY,
    ENGINE_KEY,
    OBS_KEY,
    OUTBOX_KEY,
    _is_ready,
    _prompt_blocks,
    check_api_key,
)
from pytest_infmax.sim.streams import FastSseStream
from pytest_infmax.sim.trace import CANCELLED, RequestTrace

# the paths served here, and the response shape each takes
_PATHS = {b"/v1/completions": False, b"/v1/chat/completions": True}
# longer heads go to aiohttp, which applies its limits (a line or a header field of 8,190 bytes at
# most) and answers them: a head within this is within those
_MAX_HEAD_BYTES = 8190
# bytes a client may send while its stream is being written (pipelining); past them the
# door stops reading the connection until that stream has ended
_MAX_PIPELINED_BYTES = 1024 * 1024
_STARTS = (b"POST /v1/completions ", b"POST /v1/chat/completions ")
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in SSE_HEADERS.items())
    + b"Transfer-Encoding: chunked\r\nServer: "
    + SERVER_SOFTWARE.encode()
    + b"\r\n"
)
_END_OF_BODY = b"0\r\n\r\n"  # the last chunk, no trailers
# Requests read are started in slices of about this long (the stream writer's slice, sim/streams.py),
# with the loop's poll between two: a request whose bytes come in while a burst of others is
# started is stamped at the next poll, a slice later, not after the whole burst.
_START_SLICE_S = 0.0002
# 3.7 us for a 128-token prompt's body where json.loads took 13. A body it refuses (NaN, an
# integer past 64 bits, a lone surrogate) goes to aiohttp's handler and json.loads, whose
# answer is the answer; one it accepts decodes to what json.loads makes of it.
_decode_body = msgspec.json.Decoder().decode


class _Date:
    """The ``Date`` header, formatted once a second (as aiohttp does)."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def header(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = b"Date: %s\r\n" % email.utils.formatdate(second, usegmt=True).encode()
        return self._value


_DATE = _Date()


class _Head:
    """httptools' callbacks for one request head: the URL and the headers we look at."""

    __slots__ = ("url", "headers", "complete", "duplicate")

    _WANTED = frozenset(
        (
            b"content-length",
            b"transfer-encoding",
            b"expect",
            b"authorization",
            b"x-request-id",
            b"connection",
            b"upgrade",
            FAULT_HEADER.lower().encode(),
        )
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.complete = False
        self.duplicate = False  # a header we look at came twice: aiohttp decides what that means

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in self._WANTED:
            if name in self.headers:
                self.duplicate = True
            self.headers[name] = value

    def on_headers_complete(self) -> None:
        self.complete = True


class FrontDoor(asyncio.Protocol):
    """One client connection: plain streaming generation requests served here, the
    connection handed to aiohttp's protocol at the first request that is not one."""

    __slots__ = (
        "_app",
        "_aiohttp",
        "_doors",
        "_polls",
        "_transport",
        "_buf",
        "_first_rx",
        "_last_rx",
        "_waiting",
        "_head",
        "_head_len",
        "_body_len",
        "_stream",
        "_trace",
        "_engine_request",
        "_pump_scheduled",
        "_closing",
        "writing_paused",
    )

    def __init__(self, app: web.Application, aiohttp_server: web.Server, doors: FrontDoors) -> None:
        self._app = app
        self._aiohttp = aiohttp_server
        self._doors = doors
        self._polls = poll_clock(asyncio.get_running_loop())
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()  # bytes of requests not yet served or handed over
        self._first_rx = 0.0  # when the first bytes of the request at the buffer's start arrived
        self._last_rx = 0.0  # when the buffer's last bytes arrived
        self._waiting = False  # in the doors' queue of connections with bytes to serve
        self._head: _Head | None = None  # the parsed head of that request, while its body arrives
        self._head_len = 0
        self._body_len = 0
        self._stream: FastSseStream | None = None  # the stream being written, one at a time
        self._trace: RequestTrace | None = None
        self._engine_request: EngineRequest | None = None
        self._pump_scheduled = False
        self._closing = False  # shutting down: close once the stream in flight has ended
        self.writing_paused = False  # what FastSseStream reads, as on aiohttp's protocol

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:  # as aiohttp does: events go out as they are written
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._doors.add(self)

    def data_received(self, data: bytes) -> None:
        now = self._polls.arrival()  # the return of the poll that reported the bytes
        buf = self._buf
        if not buf:
            self._first_rx = now  # these bytes start a request
        buf += data
        self._last_rx = now
        if self._stream is not None:  # sent while its last response is written: served after it
            if len(buf) > _MAX_PIPELINED_BYTES and self._transport is not None:
                self._transport.pause_reading()  # resumed when the stream ends (_pump)
            return
        self._doors.serve_soon(self)  # parsed and started in the doors' next slice

    def eof_received(self) -> bool | None:
        return None  # close: a client that stops sending is gone (aiohttp does the same)

    def connection_lost(self, exc: Exception | None) -> None:
        self._doors.discard(self)
        self._buf.clear()  # a request not yet started has no one to answer
        if self._stream is not None:
            self._end_stream()  # the client went away: the engine drops the request

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._stream is not None:
            self._pump()

    def close_when_idle(self) -> None:
        """At shutdown: close now, or once the stream in flight has been written to its end."""
        self._closing = True
        if self._stream is None:
            self._close()

    # -- requests -------------------------------------------------------------------------

    def serve_buffered(self) -> None:
        """Serve the requests complete in the buffer, one stream at a time (from the doors'
        slice, or once a stream has ended)."""
        self._waiting = False
        if self._closing or self._transport is None or self._transport.is_closing():
            return
        while self._buf and self._stream is None:
            served = self._next_request()
            if served is None:  # incomplete: wait for more bytes
                return
            if not served:  # handed to aiohttp
                return
            self._first_rx = self._last_rx  # what follows in the buffer came in the last read or earlier

    def _next_request(self) -> bool | None:
        """Serve the request at the buffer's start: True when served here, False when
        handed to aiohttp, None while it is incomplete."""
        buf = self._buf
        head = self._head
        if head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                start = bytes(buf[:26])
                if len(buf) > _MAX_HEAD_BYTES or not any(s.startswith(start[: len(s)]) for s in _STARTS):
                    return self._hand_off()  # not a request served here (or garbage): aiohttp answers
                return None
            head = self._parse_head(bytes(buf[: end + 4])) if end + 4 <= _MAX_HEAD_BYTES else None
            if head is None:
                return self._hand_off()
            self._head = head
            self._head_len = end + 4
        size = self._head_len + self._body_len
        if len(buf) < size:
            return None
        body = bytes(buf[self._head_len : size])
        self._head = None
        if not self._start(head, body):
            return self._hand_off()
        del buf[:size]
        return True

    def _parse_head(self, data: bytes) -> _Head | None:
        """The head, when it is one of a request served here; else None."""
        head = _Head()
        parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(data)
        except httptools.HttpParserError:
            return None
        headers = head.headers
        if (
            not head.complete
            or head.duplicate
            or head.url not in _PATHS
            or parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or not parser.should_keep_alive()
            or b"transfer-encoding" in headers
            or b"expect" in headers
            or b"upgrade" in headers
            or FAULT_HEADER.lower().encode() in headers
        ):
            return None
        length = headers.get(b"content-length", b"")
        if not length.isdigit() or int(length) > self._app._client_max_size:
            return None
        self._body_len = int(length)
        return head

    def _start(self, head: _Head, raw_body: bytes) -> bool:
        """Start the request's stream; False (nothing changed) where aiohttp must answer it."""
        app = self._app
        config = app[CONFIG_KEY]
        obs = app[OBS_KEY]
        if (
            config.sse_writer != "fast"
            or obs.faults.config.spec.active
            or obs.crash_after is not None
            or not _is_ready(app)
        ):
            return False
        if config.api_key:
            authorization = head.headers.get(b"authorization", b"").decode("latin-1")
            try:
                check_api_key(authorization, config.api_key)
            except ApiError:
                return False
        chat = _PATHS[head.url]
        try:
            body = _decode_body(raw_body)
            if not isinstance(body, dict):
                return False
            params: GenerationParams = (
                parse_chat_request(body, config.model)
                if chat
                else parse_completion_request(body, config.model, config.vocab_size)
            )
            blocks = _prompt_blocks(config, body, chat)
        except (ApiError, msgspec.DecodeError):  # aiohttp's handler answers it
            return False
        if not params.stream:
            return False
        engine = app[ENGINE_KEY]
        try:
            engine_request = engine.submit(params.prompt_tokens, params.max_tokens, blocks)
        except (EngineStopped, RequestTooLarge):  # answered with an error by aiohttp's handler
            return False
        handler_start = time.monotonic()
        obs.on_generation_request("fast")
        shape: ResponseShape = ChatShape(config.model) if chat else CompletionShape(config.model)
        request_id = head.headers.get(b"x-request-id")
        x_request_id = None if request_id is None else request_id.decode("utf-8", "surrogateescape")
        arrival = min(self._first_rx, handler_start)
        path = head.url.decode()
        trace = obs.begin_trace(path, arrival, x_request_id, handler_start, shape, params, raw_body, NO_FAULT)
        trace.queued = time.monotonic()
        output = OutputText(config.seed * 1_000_003 + engine_request.request_id)
        transport = self._transport
        assert transport is not None
        response_head = _SSE_HEAD + _DATE.header()
        if request_id is not None:
            response_head += b"X-Request-Id: %s\r\n" % request_id
        transport.write(response_head + b"\r\n")
        stream = FastSseStream(transport, self, params, shape, engine_request, output, trace, obs, app[OUTBOX_KEY])
        stream.on_wake = self._wake
        obs.sse_streams["fast"] += 1
        self._stream, self._trace, self._engine_request = stream, trace, engine_request
        stream.attach()
        if stream.pending:
            self._wake()
        return True

    def _hand_off(self) -> bool:
        """From the request at the buffer's start on, the connection is aiohttp's."""
        transport = self._transport
        assert transport is not None
        self._doors.discard(self)
        self._head = None
        handler = self._aiohttp()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.writing_paused:  # the last stream's end still fills the transport's buffer
            handler.pause_writing()
        if not transport.is_reading():
            transport.resume_reading()
        data = bytes(self._buf)
        self._buf.clear()
        if data:
            handler.data_received(data)
        return False

    # -- the stream being written ---------------------------------------------------------

    def _wake(self) -> None:
        """The stream has deliveries waiting for a paused transport, or it finished."""
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        """What aiohttp's fast path does in its handler: write what waited, end the body."""
        self._pump_scheduled = False
        stream, transport = self._stream, self._transport
        if stream is None or transport is None:
            return
        if stream.error is not None or transport.is_closing():
            self._close()
            return
        while stream.pending and not self.writing_paused:
            stream.write_batch()
        if stream.finished and not stream.pending:
            transport.write(_END_OF_BODY)
            self._end_stream()
            if self._closing:
                self._close()
                return
            if not transport.is_reading():
                transport.resume_reading()
            if self._buf:
                self.serve_buffered()

    def _end_stream(self) -> None:
        """The stream is over (written, or its client gone): the engine and trace let go."""
        stream, engine_request, trace = self._stream, self._engine_request, self._trace
        self._stream = self._engine_request = self._trace = None
        if stream is None:
            return
        assert engine_request is not None and trace is not None
        engine_request.sink = None
        self._app[ENGINE_KEY].cancel(engine_request)  # no-op when finished; frees the slot on disconnect
        self._app[OBS_KEY].finish(trace, CANCELLED, engine_request)  # no-op when committed

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        if self._stream is not None:
            self._end_stream()


class FrontDoors:
    """The connections the front door serves (not those handed to aiohttp): the protocol
    factory for ``loop.create_server``, and their graceful end at shutdown."""

    def __init__(self, app: web.Application, aiohttp_server: web.Server) -> None:
        self._app = app
        self._aiohttp = aiohttp_server
        self._open: set[FrontDoor] = set()
        self._all_closed: asyncio.Event | None = None
        # connections whose requests read are still to be parsed and started, in arrival order
        self._waiting: collections.deque[FrontDoor] = collections.deque()
        self._slice_scheduled = False

    def __call__(self) -> FrontDoor:
        return FrontDoor(self._app, self._aiohttp, self)

    def add(self, door: FrontDoor) -> None:
        self._open.add(door)

    def serve_soon(self, door: FrontDoor) -> None:
        """``door`` read bytes: its requests are served in the next slice (see ``_START_SLICE_S``)."""
        if door._waiting:
            return
        door._waiting = True
        self._waiting.append(door)
        if not self._slice_scheduled:
            self._slice_scheduled = True
            asyncio.get_running_loop().call_soon(self._serve_slice)

    def _serve_slice(self) -> None:
        waiting = self._waiting
        end = time.monotonic() + _START_SLICE_S
        while waiting:
            waiting.popleft().serve_buffered()
            if time.monotonic() >= end:
                break
        if waiting:
            asyncio.get_running_loop().call_soon(self._serve_slice)
        else:
            self._slice_scheduled = False

    def discard(self, door: FrontDoor) -> None:
        self._open.discard(door)
        if not self._open and self._all_closed is not None:
            self._all_closed.set()

    async def close(self, timeout: float) -> None:
        """Close every connection once its stream in flight has ended (the engine's stop
        ended them with an abort event), waiting ``timeout`` seconds at most."""
        self._all_closed = asyncio.Event()
        for door in list(self._open):
            door.close_when_idle()
        if self._open:
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        for door in list(self._open):  # a client that does not read: cut off
            door._close()

"""The load generator's wire: HTTP/1.1 streaming POSTs on an asyncio Protocol.

Why not aiohttp's client here: its streaming path (StreamReader, per-line
futures, payload objects) costs more CPU per SSE event than everything we do
with the event, and at hundreds of streams of one-token events that makes the
client, not the server, the bottleneck (docs/load-generator.md has the
measured table). This module reads the socket with a ``Protocol``:

* each ``data_received`` call is stamped once with ``perf_counter()``, the
  moment the bytes reached the process, before any parsing;
* HTTP framing (status, headers, chunked or length-delimited bodies) is parsed
  by ``httptools`` (llhttp, the parser uvicorn uses), not by hand;
* the de-chunked body is split into SSE events at the byte level and each
  event's ``data`` is handed to a sink with that stamp;
* the common case, a ``200`` chunked event stream, is read past its head by the
  C fast lane (``_lane.c``: de-chunking and SSE splitting without a Python call
  per piece, half the client's CPU per event); it hands everything unusual (CR
  line ends, comments, other fields, multi-line data) back to ``SSEDecoder``, and
  where the extension is not built, or ``INFMAX_WIRE=python``, the Python path
  reads the whole body (tests/test_lane.py checks the two agree on any stream).

Connections are kept alive and pooled (one per concurrent stream, opened before
the measured phase by ``ConnectionPool.prefill``), so the measured phase does not
pay for TCP handshakes.

Defences against a broken or hostile server, each ending only that request
with a ``StreamError`` and bounded memory (tests/test_hostile_server.py): an SSE
event larger than ``max_event_bytes``; a status line and headers larger than
``MAX_HEADER_BYTES``; an error (or JSON) body, read only as far as its message
needs, so a huge or endless one ends the request at once; a body that is not an
event stream (a line that is neither an SSE field nor a comment); a malformed
HTTP response; and (checked by the sink) more events than the request can
produce. A stream that never ends is cut by the request timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl as ssl_module
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import httptools

from pytest_infmax.records import ErrorKind

# The C fast lane for streaming bodies (_lane.c): chunked framing and SSE splitting
# without a Python call per piece, and plain content events recorded on the sink
# without one either. Optional: without a compiler the package installs without it
# and the same work runs in Python here. INFMAX_WIRE chooses, for comparison and for
# tests that cover each path: "c" (the default: the lane frames and records plain
# content events), "framing" (the lane frames; every event goes to the Python sink)
# or "python" (no lane).
WIRE_ENV = "INFMAX_WIRE"
WIRE_MODES = ("c", "framing", "python")
if TYPE_CHECKING:
    from pytest_infmax.load._lane import Lane
_Lane: type[Lane] | None
_LaneError: type[ValueError]
try:
    from pytest_infmax.load._lane import Lane as _BuiltLane
    from pytest_infmax.load._lane import LaneError as _BuiltLaneError
except ImportError:  # not built (no C compiler at install time)
    _Lane = None
    _LaneError = ValueError
else:
    _Lane = _BuiltLane
    _LaneError = _BuiltLaneError


def wire_mode() -> str:
    """How streaming bodies are read: ``INFMAX_WIRE`` (one of ``WIRE_MODES``; empty is
    "c"), or "python" wherever the C lane is not built."""
    mode = os.environ.get(WIRE_ENV, "").strip().lower() or "c"
    if mode not in WIRE_MODES:
        raise ValueError(f"{WIRE_ENV}={mode!r}: allowed are {', '.join(map(repr, WIRE_MODES))} (the default is 'c')")
    return "python" if _Lane is None else mode


class _SwitchToLane(Exception):
    """Raised from httptools' headers-complete callback to stop it at the end of the
    head, so the body is read by the fast lane from its first byte."""


# An SSE event (or a non-stream body we read to report it) larger than this ends
# the request as a protocol error instead of growing memory. OpenAI-style events
# are a few hundred bytes; 1 MiB leaves room for big tool-call or logprob chunks.
DEFAULT_MAX_EVENT_BYTES = 1 << 20
# Error bodies are kept only this far, for the message.
_ERROR_BODY_BYTES = 4096
# The status line and headers of a response, which httptools buffers whole, may not
# exceed this (real servers send under 2 KiB; Node allows 16 KiB).
MAX_HEADER_BYTES = 64 * 1024
# The fields of the SSE spec; a line that is none of them (nor a comment) means the
# body is not an event stream (an HTML page, NDJSON).
_SSE_FIELDS = frozenset((b"data", b"event", b"id", b"retry"))


class StreamError(Exception):
    """A request failed; ``kind`` is the typed outcome recorded for it."""

    def __init__(self, kind: ErrorKind, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status  # the HTTP status, when a response had begun


class EventSink(Protocol):
    """Receives a stream's SSE events (``data`` bytes, arrival stamp).

    A sink whose class sets ``PLAIN_CONTENT_IN_C = True`` lets the C lane record plain
    content events on it without calling ``on_event``: it has ``events_left`` (an int,
    decremented per event; ``on_event`` raises when it reaches 0), ``texts`` (an
    ``array('q')``: characters per content event) and ``rec`` (``first_token_time``,
    ``chunk_times``, an ``array('d')``), and ``on_event`` records such an event exactly so
    (generator.ResponseAccumulator; _lane.c says which events are plain). The lane keeps
    the stamps and lengths in C and appends them at each write-back: before it calls any
    Python code, before ``feed`` returns, and on ``sync()``.
    """

    done: bool  # the sink has seen the end of the stream ([DONE]); later events are ignored

    def on_event(self, data: bytes, t: float) -> None: ...


class SSEDecoder:
    """``text/event-stream`` framing at the byte level, per the SSE spec.

    Events end at a blank line; lines end with LF, CRLF or CR; ``data:`` fields
    of one event are joined with LF (one space after the colon is dropped);
    comment lines (``:``) and other fields are ignored. An event is stamped with
    the arrival time of the bytes that completed it.
    """

    __slots__ = ("sink", "max_event_bytes", "_buf", "last_time")

    def __init__(self, sink: EventSink, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.sink = sink
        self.max_event_bytes = max_event_bytes
        self._buf = b""
        self.last_time: float | None = None  # arrival of the latest bytes fed

    def feed(self, data: bytes, t: float) -> None:
        self.last_time = t
        if (
            not self._buf
            and data.startswith(b"data: ")
            and data.find(b"\n") == len(data) - 2
            and data.endswith(b"\n\n")
            and b"\r" not in data
        ):
            # the common case, worth its own path: exactly one single-line event
            self.sink.on_event(data[6:-2], t)
            return
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            # rare: normalise CRLF and CR to LF, keeping a trailing CR that may be
            # the first half of a CRLF split across reads
            tail = b"\r" if buf.endswith(b"\r") else b""
            if tail:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        sink = self.sink
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            block = buf[start:end]
            start = end + 2
            if block[:6] == b"data: " and b"\n" not in block:
                sink.on_event(block[6:], t)
            else:
                self._dispatch(block, t)
            if sink.done:
                self._buf = b""
                return
        rest = buf[start:] if start else buf
        if len(rest) > self.max_event_bytes:
            self._buf = b""
            raise StreamError(
                ErrorKind.PROTOCOL,
                f"an SSE event exceeded {self.max_event_bytes} bytes without ending; the server's stream is malformed",
            )
        self._buf = rest

    def _dispatch(self, block: bytes, t: float) -> None:
        data: list[bytes] = []
        for line in block.lstrip(b"\n").split(b"\n"):
            if not line or line[:1] == b":":
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                data.append(value[1:] if value[:1] == b" " else value)
            elif name not in _SSE_FIELDS:
                raise StreamError(
                    ErrorKind.PROTOCOL,
                    "the body is not an SSE event stream: a line is neither a field (data, event, id, "
                    f"retry) nor a comment: {line[:120]!r}",
                )
        if data:
            self.sink.on_event(b"\n".join(data), t)

    def close(self, t: float) -> None:
        """The body ended: dispatch a last event that lacked its blank line."""
        self.last_time = t
        rest, self._buf = self._buf.strip(b"\r\n"), b""
        if rest and not self.sink.done:
            self._dispatch(rest, t)


class _Exchange:
    """One request/response on a connection."""

    __slots__ = (
        "future",
        "decoder",
        "status",
        "content_type",
        "framed",
        "error_body",
        "error_body_bytes",
        "finished",
        "keep_alive",
        "streaming",
        "head_bytes",
        "chunked",
    )

    def __init__(self, future: asyncio.Future[int], decoder: SSEDecoder) -> None:
        self.future = future
        self.decoder = decoder
        self.status = 0
        self.content_type = b""
        self.framed = False  # chunked or Content-Length: EOF before the end is a disconnect
        self.error_body: list[bytes] = []  # a non-stream body, kept for the message
        self.error_body_bytes = 0
        self.finished = False  # the HTTP message is complete
        self.keep_alive = False
        self.streaming = False  # a 200 event stream (not an error or JSON body)
        self.head_bytes = 0  # bytes read before the headers were complete
        self.chunked: bool | None = False  # Transfer-Encoding: chunked (None: Content-Length too)


class _ParserCallbacks:
    """One connection's httptools callbacks, bound once. A response read by the lane spends
    its parser (httptools stops at the head by an exception), so each response gets a new
    one, which reads its callbacks from the object it is given: from the connection itself
    it bound five new methods a request."""

    __slots__ = ("on_message_begin", "on_header", "on_headers_complete", "on_body", "on_message_complete")

    def __init__(self, conn: StreamConnection) -> None:
        self.on_message_begin = conn.on_message_begin
        self.on_header = conn.on_header
        self.on_headers_complete = conn.on_headers_complete
        self.on_body = conn.on_body
        self.on_message_complete = conn.on_message_complete


class StreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that runs one streaming exchange at a time."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self._parser_callbacks = _ParserCallbacks(self)
        self.parser = httptools.HttpResponseParser(self._parser_callbacks)
        self.exchange: _Exchange | None = None
        self.closed = False
        self._now = 0.0
        self.lane: Lane | None = None  # the exchange's fast lane while it reads the body
        self._parser_spent = False  # httptools was stopped mid-message: a new one for the next
        self._head: list[bytes] = []  # the pieces read while the head is incomplete
        # The lane's callbacks and this protocol's own read, bound once a connection: bound
        # at each response they were containers made per request, which the collector's
        # young and middle collections walk while the request is in flight (see
        # docs/load-generator.md, "What a request left for the collector").
        self._read_head = self.data_received
        self._on_lane_block = self._lane_block
        self._on_lane_raw = self._lane_raw
        self._on_lane_end = self._lane_end
        self._on_lane_error = self._lane_error

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # The status line, the headers and bodies the lane does not read. A streaming body
        # the C lane reads arrives at the lane's own data_received instead (_enter_lane).
        now = time.perf_counter()  # when these bytes reached us: every stamp below
        self._now = now
        ex = self.exchange
        if ex is None:  # bytes nobody asked for (or after a failure): the connection is unusable
            self._abort()
            return
        try:
            if not ex.status and self.pool.fast_lane:
                # kept until the head is complete, to find where the body starts
                self._head.append(data)
            self.parser.feed_data(data)
            if not ex.status:  # still in the status line or headers, which httptools buffers
                ex.head_bytes += len(data)
                if ex.head_bytes > MAX_HEADER_BYTES:
                    raise StreamError(
                        ErrorKind.PROTOCOL,
                        f"the response's status line and headers exceeded {MAX_HEADER_BYTES} bytes "
                        "without ending; the server is broken or hostile",
                    )
        except StreamError as exc:
            self._fail(exc)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__ or exc.__cause__
            error = (
                None
                if isinstance(cause, _SwitchToLane)
                else cause
                if isinstance(cause, StreamError)
                else StreamError(ErrorKind.PROTOCOL, f"unreadable response: {cause or exc}")
            )
            # Dropped before this frame ends: the callback's exception holds its traceback, whose
            # frames lead back to this one, which would hold the exception. That cycle, ten
            # objects a request (frames, tracebacks), only the garbage collector frees, and it
            # brought the young collections twice as often (docs/load-generator.md).
            cause = None
            if error is None:
                self._enter_lane(ex, data, now)
                return
            self._fail(error)
            error = None
        except httptools.HttpParserError as exc:
            self._fail(StreamError(ErrorKind.PROTOCOL, f"malformed HTTP response: {exc}"))
        except Exception as exc:  # never let a bad stream kill the event loop's callback
            self._fail(StreamError(ErrorKind.PROTOCOL, f"unreadable response: {type(exc).__name__}: {exc}"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        ex = self.exchange
        if ex is None or ex.future.done():
            return
        now = time.perf_counter()
        if not ex.framed and ex.status:
            # a close-delimited body (no Content-Length, not chunked): EOF is its end
            try:
                ex.decoder.close(now)
                self._finish(ex)
            except StreamError as err:
                self._fail(err)
            return
        reason = f"{exc}" if exc else "the server closed the connection"
        self._fail(StreamError(ErrorKind.DISCONNECT, f"connection lost mid-response: {reason}"))

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.exchange is None:  # a response nobody asked for (after the last one, in its read)
            self._abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.exchange
        if ex is None:
            return
        lname = name.lower()
        if lname == b"content-type":
            ex.content_type = value.lower()
        elif lname == b"transfer-encoding":
            ex.framed = True
            if ex.chunked is not None:
                ex.chunked = value.strip().lower() == b"chunked"
        elif lname == b"content-length":
            ex.framed = True
            ex.chunked = None  # both framings: leave it to httptools, which refuses it

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.status = self.parser.get_status_code()
            ex.streaming = ex.status == 200 and not ex.content_type.startswith(b"application/json")
            if ex.streaming and ex.chunked and self._head:
                # a chunked event stream: stop httptools here; the fast lane reads the body
                ex.keep_alive = self.parser.should_keep_alive()
                raise _SwitchToLane
        self._head.clear()

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is None:
            return
        if ex.streaming:
            if ex.future.done():
                return  # [DONE] came; the rest of the message is drained unread
            decoder = ex.decoder
            decoder.feed(body, self._now)
            if decoder.sink.done:
                ex.future.set_result(ex.status)
            return
        # not a stream: keep a bounded prefix for the error message
        if ex.error_body_bytes < _ERROR_BODY_BYTES:
            ex.error_body.append(body[: _ERROR_BODY_BYTES - ex.error_body_bytes])
        ex.error_body_bytes += len(body)
        if ex.error_body_bytes >= _ERROR_BODY_BYTES:
            # enough for the message: neither read nor wait for the rest (it may never end)
            self._finish(ex)

    def on_message_complete(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        ex.finished = True
        ex.keep_alive = self.parser.should_keep_alive()
        if not ex.future.done():
            ex.decoder.close(self._now)
            self._finish(ex)
        self._release(ex)

    # -- the exchange -----------------------------------------------------------------------

    def start(self, request: bytes, decoder: SSEDecoder) -> asyncio.Future[int]:
        """Write ``request``; the future resolves with the HTTP status when the stream ends."""
        assert self.transport is not None and self.exchange is None
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.exchange = _Exchange(future, decoder)
        if self._parser_spent:
            self.parser = httptools.HttpResponseParser(self._parser_callbacks)
            self._parser_spent = False
        self.transport.write(request)
        return future

    # -- the fast lane ------------------------------------------------------------------

    def _enter_lane(self, ex: _Exchange, data: bytes, now: float) -> None:
        """httptools stopped at the end of a chunked event stream's head (in ``data``):
        the fast lane reads the body from the next byte on."""
        self._parser_spent = True
        head = b"".join(self._head)
        self._head.clear()
        # llhttp takes a response head only with CRLF line ends, so its first blank
        # line is its end, and the headers were completed in this read
        body_start = head.find(b"\r\n\r\n") + 4 - (len(head) - len(data))
        decoder = ex.decoder
        assert _Lane is not None  # the pool's fast_lane is set only where the C lane was imported
        sink = decoder.sink
        records = sink if self.pool.c_content and getattr(sink, "PLAIN_CONTENT_IN_C", False) else None
        self.lane = lane = _Lane(
            sink.on_event, self._on_lane_block, self._on_lane_raw, decoder.max_event_bytes, records
        )
        # From the next read on the lane is the transport's read callback itself: what
        # data_received does for a lane, without a Python frame per read (uvloop reads the
        # protocol's data_received when it is set, hence set_protocol).
        lane.attach(self._on_lane_end, self._on_lane_error, time.perf_counter)
        self.data_received = lane.data_received  # type: ignore[method-assign,assignment]
        assert self.transport is not None
        self.transport.set_protocol(self)
        if body_start < len(data):
            self._lane_feed(lane, data[body_start:], now)

    def _lane_feed(self, lane: Lane, data: bytes, now: float) -> None:
        """Body bytes that arrived at ``now``, through the fast lane."""
        try:
            end = lane.feed(data, now)
        except Exception as exc:
            self._fail(_lane_failure(exc))
            return
        if lane.done or end >= 0:
            self._lane_progress(lane, end, len(data), now)

    def _lane_end(self, end: int, size: int, now: float) -> None:
        """From the lane's data_received: [DONE] was seen, or the message ended."""
        lane = self.lane
        if lane is not None:
            self._lane_progress(lane, end, size, now)

    def _lane_error(self, exc: Exception) -> None:
        """From the lane's data_received: the body could not be read."""
        self._fail(_lane_failure(exc))

    def _leave_lane(self) -> None:
        """The lane's read is over: reads go to this protocol's data_received again."""
        if self.lane is not None:
            self.lane.sync()  # the sink's events_left, counted in C while the lane read
        self.lane = None
        if self.data_received is not self._read_head:
            self.data_received = self._read_head  # type: ignore[method-assign]
            if self.transport is not None and not self.transport.is_closing():
                self.transport.set_protocol(self)

    def _lane_block(self, block: bytes, t: float) -> bool:
        """An event that is not one ``data:`` line: the SSE spec's path, in Python."""
        ex = self.exchange
        decoder = ex.decoder  # type: ignore[union-attr]
        decoder._dispatch(block, t)
        return decoder.sink.done

    def _lane_raw(self, data: bytes, t: float) -> bool:
        """De-chunked bytes once a CR was seen: the Python decoder normalises line ends."""
        decoder = self.exchange.decoder  # type: ignore[union-attr]
        decoder.feed(data, t)
        return decoder.sink.done

    def _lane_progress(self, lane: Lane, end: int, size: int, now: float) -> None:
        """The lane saw [DONE], or the end of the HTTP message (``end`` ≥ 0: just past
        it, in a read of ``size`` bytes)."""
        ex = self.exchange
        if ex is None:
            return
        decoder = ex.decoder
        if lane.done and not ex.future.done():
            decoder.last_time = now
            ex.future.set_result(ex.status)
        if end < 0:
            return
        self._leave_lane()
        ex.finished = True
        if end < size:  # bytes after the end of the message, unasked for: do not reuse the connection
            ex.keep_alive = False
        if not ex.future.done():
            rest = lane.take_rest()
            if rest:
                decoder._buf += rest
            try:
                decoder.close(now)
            except StreamError as exc:
                self._fail(exc)
                return
            self._finish(ex)
        self._release(ex)

    def _finish(self, ex: _Exchange) -> None:
        """The body ended (message complete or EOF): resolve or explain."""
        if ex.status != 200:
            body = b"".join(ex.error_body).decode("utf-8", "replace")
            self._fail(StreamError(ErrorKind.HTTP, _error_message(ex.status, body), ex.status), close=not ex.finished)
            return
        if ex.content_type.startswith(b"application/json"):
            body = b"".join(ex.error_body).decode("utf-8", "replace")
            self._fail(
                StreamError(
                    ErrorKind.PROTOCOL,
                    "the server answered with a JSON body, not an event stream (does it support "
                    f'"stream": true?): {body[:200]!r}',
                    ex.status,
                ),
                close=not ex.finished,
            )
            return
        self._resolve(ex)

    def _resolve(self, ex: _Exchange) -> None:
        if not ex.future.done():
            ex.future.set_result(ex.status)

    def _fail(self, exc: StreamError, close: bool = True) -> None:
        ex = self.exchange
        if ex is not None and not ex.future.done():
            if exc.status is None and ex.status:
                exc.status = ex.status  # the response had begun: the record keeps its status
            ex.future.set_exception(exc)
        if close:
            self._abort()

    def _release(self, ex: _Exchange) -> None:
        """The HTTP message is complete: reuse the connection if both sides keep it."""
        if ex is not self.exchange:
            return
        if ex.keep_alive and ex.future.done() and not ex.future.cancelled() and ex.future.exception() is None:
            self.exchange = None
            self.pool._idle(self)
        elif ex.future.done():
            self.exchange = None
            self._abort()

    def finished_with(self, ok: bool) -> None:
        """The caller is done with its exchange; give the connection back or close it."""
        ex = self.exchange
        if ex is None:
            return
        if ok and ex.finished:
            self._release(ex)
        elif not ok:
            self.exchange = None
            self._abort()
        # else: [DONE] came before the end of the HTTP message; on_message_complete releases it

    def _abort(self) -> None:
        self.closed = True
        self.exchange = None
        self._leave_lane()
        self.pool._forget(self)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class ConnectionPool:
    """Keep-alive connections to one origin; idle ones are reused last-in first-out."""

    def __init__(self, url: str, connect_timeout: float = 30.0, ssl: ssl_module.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.connect_timeout = connect_timeout
        self.ssl = (
            ssl if ssl is not None else (ssl_module.create_default_context() if parts.scheme == "https" else None)
        )
        self._idle_conns: list[StreamConnection] = []
        self._all: set[StreamConnection] = set()
        mode = wire_mode()
        self.fast_lane = mode != "python"  # read streaming bodies with the C fast lane
        self.c_content = mode == "c"  # ... which records plain content events itself

    async def acquire(self) -> StreamConnection:
        while self._idle_conns:
            conn = self._idle_conns.pop()
            # closing: the server closed it and the loop has not called connection_lost yet
            # (uvloop then refuses a write with RuntimeError; asyncio drops it)
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return await self._connect()

    async def _connect(self) -> StreamConnection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: StreamConnection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                ),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            raise StreamError(
                ErrorKind.CONNECT,
                f"cannot connect to {self.host}:{self.port}: no answer within {self.connect_timeout:g} s",
            ) from None
        except OSError as exc:
            raise StreamError(ErrorKind.CONNECT, f"cannot connect to {self.host}:{self.port}: {exc}") from None
        self._all.add(conn)
        return conn

    async def prefill(self, n: int) -> None:
        """Open connections until ``n`` are idle (warm them before a measured phase)."""
        missing = n - sum(1 for c in self._idle_conns if not c.closed)
        if missing <= 0:
            return
        results = await asyncio.gather(*(self._connect() for _ in range(missing)), return_exceptions=True)
        for conn in results:
            if isinstance(conn, StreamConnection):
                self._idle_conns.append(conn)
            # a failure here is not an error yet: the requests will report it

    def _idle(self, conn: StreamConnection) -> None:
        if not conn.closed:
            self._idle_conns.append(conn)

    def _forget(self, conn: StreamConnection) -> None:
        self._all.discard(conn)

    def close(self) -> None:
        for conn in list(self._all):
            conn._abort()
        self._all.clear()
        self._idle_conns.clear()


def build_request(pool: ConnectionPool, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The bytes of one ``POST`` with a JSON body."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {pool.host_header}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        "User-Agent: pytest-infmax",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def stream_post(
    pool: ConnectionPool,
    request: bytes,
    decoder: SSEDecoder,
    on_sent: Callable[[], Any] | None = None,
    timeout: float | None = None,
) -> int:
    """Send ``request`` on a pooled connection and feed the response's events to ``decoder``.

    Returns the HTTP status (200) once the stream ended (the sink saw ``[DONE]``
    or the body ended); raises ``StreamError`` for every failure, a ``TIMEOUT``
    one when no complete response came within ``timeout`` seconds of the call.
    The deadline is a timer on the exchange, not a task wrapped around it (cheaper
    by a task per request). Cancelling the caller closes the connection.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    conn = await pool.acquire()
    if on_sent is not None:
        on_sent()
    ok = False
    try:
        future = conn.start(request, decoder)
    except RuntimeError as exc:  # uvloop: the transport closed under us since acquire(); nothing was sent
        conn.finished_with(False)
        raise StreamError(
            ErrorKind.DISCONNECT, f"the connection closed before the request could be sent ({exc})"
        ) from None
    timer = None if deadline is None or timeout is None else loop.call_at(deadline, _expire, conn, future, timeout)
    try:
        status = await future
        ok = True
        return status
    finally:
        if timer is not None:
            timer.cancel()
        conn.finished_with(ok)


def _expire(conn: StreamConnection, future: asyncio.Future[int], timeout: float) -> None:
    if not future.done() and conn.exchange is not None and conn.exchange.future is future:
        conn._fail(StreamError(ErrorKind.TIMEOUT, f"no complete response within {timeout:g} s"))


def _lane_failure(exc: Exception) -> StreamError:
    """What ends a request whose body the fast lane was reading: the sink's own typed
    error, the lane's framing error, or anything else as an unreadable response."""
    if isinstance(exc, StreamError):
        return exc
    if isinstance(exc, _LaneError):
        return StreamError(ErrorKind.PROTOCOL, str(exc))
    return StreamError(ErrorKind.PROTOCOL, f"unreadable response: {type(exc).__name__}: {exc}")


def _error_message(status: int, body: str) -> str:
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict) and err.get("message"):
            return f"HTTP {status}: {err['message']}"
        if isinstance(err, str):
            return f"HTTP {status}: {err}"
    except (ValueError, AttributeError):
        pass
    return f"HTTP {status}: {body[:200]}"

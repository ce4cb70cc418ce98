"""A scripted hostile HTTP/1.1 server for tests/test_hostile_server.py, run as a subprocess.

``python tests/_hostile_server.py`` binds 127.0.0.1 on a free port, prints
``PORT <n>`` and serves until its stdin closes (so it cannot outlive the test
process that started it, even if that one is killed).

Every request's behaviour comes from a script: ``POST /script`` with a JSON object
``{sha256 of a request body (hex): behaviour}`` replaces the script and clears the
log; a body not in the script gets a good stream (``good``). ``GET /log`` returns,
in arrival order, ``{"conn": n, "seq": k, "behaviour": name}`` for every scripted
endpoint request: ``conn`` numbers the TCP connection, ``seq`` counts requests on
it, so a test can tell whether the client reused a connection.

The behaviours write raw bytes on the socket (no HTTP library), as a broken or
hostile server would. Nothing here runs longer than ``CAP_S`` per request, and every
endless behaviour stops when the client closes the connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable

CAP_S = 20.0  # no behaviour outlives this, whoever is (not) listening
MIB = 1 << 20

script: dict[str, str] = {}
log: list[dict[str, object]] = []


class Request:
    def __init__(self, method: str, path: str, body: bytes) -> None:
        self.method, self.path, self.body = method, path, body
        try:
            self.json = json.loads(body) if body else {}
        except ValueError:
            self.json = {}
        self.max_tokens = int(self.json.get("max_tokens") or 4) if isinstance(self.json, dict) else 4


Writer = asyncio.StreamWriter
Behaviour = Callable[[asyncio.StreamReader, Writer, Request], Awaitable[bool]]  # returns: keep the connection


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def content(text: str, finish: str | None = None) -> bytes:
    return sse(
        {"id": "h", "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    )


SSE_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def good_body(n: int) -> bytes:
    events = [content(f" t{i}", "length" if i == n - 1 else None) for i in range(n)]
    events.append(
        sse({"id": "h", "choices": [], "usage": {"prompt_tokens": 16, "completion_tokens": n, "total_tokens": 16 + n}})
    )
    events.append(b"data: [DONE]\n\n")
    return b"".join(chunk(e) for e in events) + b"0\r\n\r\n"


def length_response(status: bytes, ctype: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (status, ctype, len(body), body)


async def wait_for_close(reader: asyncio.StreamReader) -> bool:
    """Hold the connection until the client closes it (or CAP_S)."""
    try:
        await asyncio.wait_for(reader.read(), CAP_S)
    except (asyncio.TimeoutError, ConnectionError):
        pass
    return False


async def good(reader, writer, req) -> bool:
    writer.write(SSE_CHUNKED + good_body(req.max_tokens))
    await writer.drain()
    return True


async def huge_event(reader, writer, req) -> bool:
    """16 MiB of one data line that never ends with a blank line."""
    writer.write(SSE_CHUNKED + chunk(b'data: {"choices": [{"index": 0, "text": "'))
    piece = chunk(b"x" * (256 * 1024))
    for _ in range(64):
        writer.write(piece)
        await writer.drain()
    return await wait_for_close(reader)


async def endless_events(reader, writer, req) -> bool:
    """Content events forever: no finish_reason, no [DONE]."""
    writer.write(SSE_CHUNKED)
    batch = chunk(content(" more") * 50)
    deadline = time.monotonic() + CAP_S
    while time.monotonic() < deadline:
        writer.write(batch)
        await writer.drain()
    return False


async def endless_pings(reader, writer, req) -> bool:
    """SSE comments (keep-alives) forever, about 200 a second: never an event."""
    writer.write(SSE_CHUNKED)
    deadline = time.monotonic() + CAP_S
    while time.monotonic() < deadline:
        writer.write(chunk(b": ping\n\n"))
        await writer.drain()
        await asyncio.sleep(0.005)  # pacing of the hostile stream, not synchronisation
    return False


async def bad_utf8(reader, writer, req) -> bool:
    """Invalid UTF-8 inside the text the client reads."""
    event = b'data: {"id": "h", "choices": [{"index": 0, "text": "\xff\xfe bad", "finish_reason": null}]}\n\n'
    writer.write(
        SSE_CHUNKED + chunk(event) + chunk(content(" ok", "length")) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    )
    await writer.drain()
    return True


async def json_body(reader, writer, req) -> bool:
    """A server that ignores "stream": true and answers one JSON completion."""
    body = json.dumps(
        {
            "id": "h",
            "object": "text_completion",
            "choices": [{"index": 0, "text": " the whole answer", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 16, "completion_tokens": 4, "total_tokens": 20},
        }
    ).encode()
    writer.write(length_response(b"200 OK", b"application/json", body))
    await writer.drain()
    return True


async def html_body(reader, writer, req) -> bool:
    """A login page (a proxy in the way) labelled as an event stream."""
    body = (
        b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\n\n"
        b'<body><form action="/login">Please sign in</form></body></html>\n'
    )
    writer.write(length_response(b"200 OK", b"text/event-stream", body))
    await writer.drain()
    return True


async def not_object(reader, writer, req) -> bool:
    writer.write(SSE_CHUNKED + chunk(b"data: 42\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()
    return True


async def wrong_choices(reader, writer, req) -> bool:
    event = sse({"id": "h", "choices": "none"})
    writer.write(SSE_CHUNKED + chunk(event) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()
    return True


async def garbage_status(reader, writer, req) -> bool:
    writer.write(b"HELLO WORLD\r\nnot: http\r\n\r\n")
    await writer.drain()
    return await wait_for_close(reader)


async def bad_chunk_size(reader, writer, req) -> bool:
    writer.write(SSE_CHUNKED + chunk(content(" a")) + b"zz\r\n" + content(" b") + b"\r\n")
    await writer.drain()
    return await wait_for_close(reader)


async def huge_500(reader, writer, req) -> bool:
    """HTTP 500 with a 50 MiB body (a debug page, a core dump)."""
    size = 50 * MIB
    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % size)
    piece = b"Traceback (most recent call last):\n" + b"E" * (MIB - 36) + b"\n"
    try:
        for _ in range(size // MIB):
            writer.write(piece)
            await writer.drain()
    except ConnectionError:
        return False
    return True


async def endless_500(reader, writer, req) -> bool:
    """HTTP 500 whose chunked body never ends."""
    writer.write(
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = chunk(b"engine crashed; dumping state " + b"S" * 65000 + b"\n")
    deadline = time.monotonic() + CAP_S
    while time.monotonic() < deadline:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.001)
    return False


async def slowloris(reader, writer, req) -> bool:
    """Headers at once, then a close-delimited body one byte every 10 ms that never completes an event."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
    line = b'data: {"choices": [{"index": 0, "text": "' + b"s" * 10_000
    deadline = time.monotonic() + CAP_S
    for byte in line:
        if time.monotonic() > deadline:
            break
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.01)  # the hostile pacing itself
    return False


async def slowloris_head(reader, writer, req) -> bool:
    """The status line and headers one byte every 10 ms."""
    head = SSE_CHUNKED.replace(b"\r\n\r\n", b"\r\n" + b"X-Slow: " + b"z" * 10_000)
    deadline = time.monotonic() + CAP_S
    for byte in head:
        if time.monotonic() > deadline:
            break
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.01)
    return False


async def cut_mid_chunk(reader, writer, req) -> bool:
    """A chunk announced at 1024 bytes, 60 sent, then the connection closes."""
    writer.write(SSE_CHUNKED + chunk(content(" a")) + b"400\r\n" + content(" b")[:60])
    await writer.drain()
    return False


async def short_body(reader, writer, req) -> bool:
    """Content-Length 4096, one event sent, then the connection closes."""
    event = content(" a")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 4096\r\n\r\n" + event)
    await writer.drain()
    return False


async def huge_header(reader, writer, req) -> bool:
    """A 16 MiB header line, then (if anyone is still reading) a good stream."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Padding: ")
    piece = b"p" * (256 * 1024)
    for _ in range(64):
        writer.write(piece)
        await writer.drain()
    writer.write(b"\r\nTransfer-Encoding: chunked\r\n\r\n" + good_body(req.max_tokens))
    await writer.drain()
    return True


async def endless_after_done(reader, writer, req) -> bool:
    """A good stream up to [DONE], then chunks of junk forever in the same HTTP message."""
    writer.write(SSE_CHUNKED + good_body(req.max_tokens)[:-5])  # without the last chunk
    piece = chunk(b"junk after [DONE] " * 1000)
    deadline = time.monotonic() + CAP_S
    while time.monotonic() < deadline:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.005)
    return False


async def huge_error_object(reader, writer, req) -> bool:
    """An error object inside the stream whose message is 512 KiB."""
    event = sse({"error": {"message": "engine failure: " + "m" * (512 * 1024), "type": "InternalError"}})
    writer.write(SSE_CHUNKED + chunk(event) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()
    return True


BEHAVIOURS: dict[str, Behaviour] = {
    f.__name__: f
    for f in (
        good,
        huge_event,
        endless_events,
        endless_pings,
        bad_utf8,
        json_body,
        html_body,
        not_object,
        wrong_choices,
        garbage_status,
        bad_chunk_size,
        huge_500,
        endless_500,
        slowloris,
        slowloris_head,
        cut_mid_chunk,
        short_body,
        huge_header,
        endless_after_done,
        huge_error_object,
    )
}

_conns = 0


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    try:
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return Request(method, path, body)


async def control(writer: Writer, req: Request) -> None:
    global script
    if req.path == "/script":
        script = dict(req.json)
        log.clear()
        out = b"{}"
    else:
        out = json.dumps(log).encode()
    writer.write(length_response(b"200 OK", b"application/json", out))
    await writer.drain()


async def handle(reader: asyncio.StreamReader, writer: Writer) -> None:
    global _conns
    _conns += 1
    conn, seq = _conns, 0
    try:
        while True:
            req = await read_request(reader)
            if req is None:
                return
            if req.path in ("/script", "/log"):
                await control(writer, req)
                continue
            seq += 1
            name = script.get(hashlib.sha256(req.body).hexdigest(), "good")
            log.append({"conn": conn, "seq": seq, "behaviour": name})
            keep = await asyncio.wait_for(BEHAVIOURS[name](reader, writer, req), CAP_S + 5)
            if not keep:
                return
    except (ConnectionError, asyncio.TimeoutError):
        pass
    finally:
        writer.transport.abort()


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 20)
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    async with server:
        await server.serve_forever()


def _exit_when_stdin_closes() -> None:
    sys.stdin.buffer.read()
    os._exit(0)


if __name__ == "__main__":
    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    asyncio.run(main())

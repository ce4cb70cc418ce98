"""A scripted hostile HTTP/1.1 server for tests/test_hostile_server.py, run as a subprocess.

``python tests/_hostile_server.py`` binds 127.0.0.1 on a free port, prints
``PORT <n>`` and serves until its stdin closes (so it cannot outlive the test
process that started it, even if that one is killed).

Every request's behaviour comes from a script: ``POST /script`` with a JSON object
``{sha256 of a request body (hex): behaviour}`` replaces the script and clears the
log; a body not in the script gets the behaviour of the key ``"*"`` if there is one,
else a good stream (``good``). GET requests are scripted by ``"GET /path"`` keys;
unscripted, ``/health`` answers 200, ``/v1/models`` lists ``hostile-model`` and any
other path is a 404, so the server passes a readiness check (``--infmax-endpoint``).
``GET /log`` returns, in arrival order, ``{"conn": n, "seq": k, "behaviour": name,
"method": ..., "path": ..., "host": ..., "authorization": ...}`` for every request
but the control ones: ``conn`` numbers the TCP connection, ``seq`` counts requests
on it, so a test can tell whether the client reused a connection; ``host`` and
``authorization`` are those headers (None when absent), so a test can tell which
origin a request was sent to and whether it carried a key.

``--port N`` binds that port instead of a free one and ``--script JSON`` starts
with that script; with ``--port`` the server does not watch its stdin (a plugin
that starts it as ``--infmax-server-command`` owns its life and gives it no stdin).

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
    def __init__(self, method: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.method, self.path, self.body = method, path, body
        self.headers = headers or {}
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


def good_body(n: int, prompt_tokens: int = 16, completion_tokens: int | None = None) -> bytes:
    done = n if completion_tokens is None else completion_tokens
    events = [content(f" t{i}", "length" if i == n - 1 else None) for i in range(n)]
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}
    events.append(sse({"id": "h", "choices": [], "usage": usage}))
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


async def hang_after_usage(reader, writer, req) -> bool:
    """Every content event, the finish_reason and the usage, then neither [DONE] nor the end of the body."""
    n = req.max_tokens
    events = [content(f" t{i}", "length" if i == n - 1 else None) for i in range(n)]
    events.append(sse({"id": "h", "choices": [], "usage": {"prompt_tokens": 16, "completion_tokens": n}}))
    writer.write(SSE_CHUNKED + b"".join(chunk(e) for e in events))
    await writer.drain()
    return await wait_for_close(reader)


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


async def models(reader, writer, req) -> bool:
    body = json.dumps({"object": "list", "data": [{"id": "hostile-model", "object": "model"}]}).encode()
    writer.write(length_response(b"200 OK", b"application/json", body))
    await writer.drain()
    return True


async def health(reader, writer, req) -> bool:
    writer.write(length_response(b"200 OK", b"application/json", b"{}"))
    await writer.drain()
    return True


async def not_found(reader, writer, req) -> bool:
    writer.write(length_response(b"404 Not Found", b"text/plain", b"not found"))
    await writer.drain()
    return True


async def unauthorized(reader, writer, req) -> bool:
    """401, as a hosted API answers a missing or wrong key."""
    body = json.dumps({"error": {"message": "Incorrect API key provided.", "code": "invalid_api_key"}}).encode()
    writer.write(length_response(b"401 Unauthorized", b"application/json", body))
    await writer.drain()
    return True


async def drip(reader, writer, req) -> bool:
    """A 200 whose JSON body comes one byte every 0.5 s and never ends (until CAP_S)."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
    await writer.drain()
    deadline = time.monotonic() + CAP_S
    while time.monotonic() < deadline:
        writer.write(b" ")
        await writer.drain()
        await asyncio.sleep(0.5)  # the hostile pacing itself
    return False


async def endless_body(reader, writer, req) -> bool:
    """A 200 whose chunked body never ends: 64 KiB pieces as fast as the client reads."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = chunk(b"# endless\n" * 6500)
    deadline = time.monotonic() + CAP_S
    while time.monotonic() < deadline:
        writer.write(piece)
        await writer.drain()
    return False


def redirect_to(origin: str) -> Behaviour:
    """A 302 to the same path on ``origin`` (``{port}`` is this server's port); a request that
    arrived there already (its Host is the origin's) gets the path's default answer."""

    async def behaviour(reader, writer, req) -> bool:
        location = origin.format(port=PORT) + req.path
        if not origin.endswith("/same") and req.headers.get("host", "").split(":")[0] in origin:
            return await BEHAVIOURS[GET_DEFAULTS.get(req.path, "not_found")](reader, writer, req)
        writer.write(b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % location.encode())
        await writer.drain()
        return True

    return behaviour


def lying_usage(prompt_tokens: int = 16, completion_tokens: int | None = None) -> Behaviour:
    """A good stream whose final ``usage`` reports counts that cannot be true."""

    async def behaviour(reader, writer, req) -> bool:
        done = completion_tokens(req) if callable(completion_tokens) else completion_tokens
        writer.write(SSE_CHUNKED + good_body(req.max_tokens, prompt_tokens, done))
        await writer.drain()
        return True

    return behaviour


USAGE_LIES: dict[str, Behaviour] = {
    "usage_huge": lying_usage(completion_tokens=10**15),
    "usage_negative": lying_usage(completion_tokens=-5),
    "usage_zero": lying_usage(completion_tokens=0),
    "usage_over_max": lying_usage(completion_tokens=lambda req: req.max_tokens + 1),
    "usage_below_chunks": lying_usage(completion_tokens=lambda req: max(1, req.max_tokens // 2)),
    "prompt_huge": lying_usage(prompt_tokens=10**15),
    "prompt_negative": lying_usage(prompt_tokens=-1),
}

BEHAVIOURS: dict[str, Behaviour] = {
    f.__name__: f
    for f in (
        good,
        huge_event,
        endless_events,
        endless_pings,
        hang_after_usage,
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
BEHAVIOURS.update(USAGE_LIES)
BEHAVIOURS.update(
    models=models,
    health=health,
    not_found=not_found,
    unauthorized=unauthorized,
    drip=drip,
    endless_body=endless_body,
    # localhost is another origin than 127.0.0.1 (the host differs): same server, other origin
    redirect_cross_origin=redirect_to("http://localhost:{port}"),
    redirect_same_origin=redirect_to("http://127.0.0.1:{port}/same"),
)
GET_DEFAULTS = {"/health": "health", "/v1/models": "models", "/same/health": "health", "/same/v1/models": "models"}
PORT = 0

_conns = 0


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", 0))
    try:
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return Request(method, path, body, headers)


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
            if req.method == "GET":
                name = script.get(f"GET {req.path}", GET_DEFAULTS.get(req.path, "not_found"))
            else:
                name = script.get(hashlib.sha256(req.body).hexdigest(), script.get("*", "good"))
            log.append(
                {
                    "conn": conn,
                    "seq": seq,
                    "behaviour": name,
                    "method": req.method,
                    "path": req.path,
                    "host": req.headers.get("host"),
                    "authorization": req.headers.get("authorization"),
                }
            )
            keep = await asyncio.wait_for(BEHAVIOURS[name](reader, writer, req), CAP_S + 5)
            if not keep:
                return
    except (ConnectionError, asyncio.TimeoutError):
        pass
    finally:
        writer.transport.abort()


async def main(port: int) -> None:
    global PORT
    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=1 << 20)
    PORT = server.sockets[0].getsockname()[1]
    print(f"PORT {PORT}", flush=True)
    async with server:
        await server.serve_forever()


def _exit_when_stdin_closes() -> None:
    sys.stdin.buffer.read()
    os._exit(0)


if __name__ == "__main__":
    args = sys.argv[1:]
    given_port = int(args[args.index("--port") + 1]) if "--port" in args else 0
    if "--script" in args:
        script = json.loads(args[args.index("--script") + 1])
    if not given_port:
        threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    asyncio.run(main(given_port))

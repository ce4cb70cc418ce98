"""Bounded HTTP GETs: every byte a server controls is bounded in size and in time.

The plugin reads small documents from the server under test outside the load
generator: the readiness check (``/health``, ``/v1/models``), the simulator's
``/sim/stats``, the Prometheus metrics page and a power endpoint. Each of them goes
through :func:`get`, which has

* one **total deadline** for the whole exchange (connect, status line, headers,
  body, every redirect): a server that drips one byte every half second cannot
  stretch it, as it could a per-read socket timeout;
* a **size limit** on the body (``Content-Length`` above it fails at once, a
  chunked or close-delimited body fails as soon as it passes it); http.client
  bounds the status line and headers (64 KiB a line, 100 headers);
* **redirects** followed by hand (at most ``MAX_REDIRECTS``), and the
  ``Authorization`` header is dropped on any hop to another origin (scheme, host
  or port), so a ``302`` elsewhere never receives the API key;
* no proxy from the environment (the server under test is reached directly, as
  the load generator reaches it) and no credentials from the URL.

Failures are :class:`HTTPLimitError` (the deadline or the size limit), or the
``OSError`` / ``http.client.HTTPException`` of the connection; an HTTP error status
is not a failure here: the caller reads :attr:`Response.status`.

:func:`aget` is the same GET for an event loop that must not wait on it (the metrics
scraper, whose baseline scrape is taken the moment warm-up ends): it runs in the
loop's executor thread, and its failures are ``OSError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

DEFAULT_MAX_BYTES = 8 << 20  # /v1/models of a gateway with many models, /sim/stats: far below this
MAX_REDIRECTS = 5
_READ = 64 << 10
_REDIRECTS = (301, 302, 303, 307, 308)
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Headers that carry credentials: never sent to another origin than the one they were given for.
_CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie")


class HTTPLimitError(OSError):
    """The exchange passed its total deadline or its body passed the size limit."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    url: str  # after redirects

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def safe_url(url: str) -> str:
    """``url`` without the ``user:password@`` part, for messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


def get(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_redirects: int = MAX_REDIRECTS,
    deadline: float | None = None,
) -> Response:
    """GET ``url``: the whole exchange within ``timeout`` seconds, a body of at most ``max_bytes``.

    ``deadline`` (a ``time.monotonic()`` instant) ends it earlier: several GETs that share
    one budget of ``timeout`` seconds pass the same deadline.
    """
    own = time.monotonic() + timeout
    deadline = own if deadline is None else min(deadline, own)
    sent = dict(headers or {})
    first_origin = _origin(url)
    for _hop in range(max_redirects + 1):
        response = _get_once(url, sent, deadline, timeout, max_bytes)
        if response.status not in _REDIRECTS or not response.location:
            return Response(response.status, response.body, url)
        url, sent = _next_hop(url, response.location, sent, first_origin)
    raise HTTPLimitError(f"GET {safe_url(url)}: more than {max_redirects} redirects")


def _next_hop(
    url: str, location: str, headers: dict[str, str], first_origin: tuple[str, str, int | None]
) -> tuple[str, dict[str, str]]:
    """Where a redirect leads, and the headers that may go there: none that carry credentials
    to another origin than the first."""
    target = urljoin(url, location)
    if urlsplit(target).scheme not in ("http", "https"):
        raise HTTPLimitError(f"GET {safe_url(url)}: redirected to {safe_url(target)!r}, not an http(s) URL")
    if _origin(target) != first_origin:  # the key was given for one origin only
        headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS}
    return target, headers


async def aget(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_redirects: int = MAX_REDIRECTS,
) -> Response:
    """:func:`get` for an event loop: the same GET in the loop's default executor thread, so
    the loop goes on while it waits. A failure of the exchange is an ``OSError``.

    Why not aiohttp here: the one caller, the metrics scraper, reads a page once a second;
    importing aiohttp and its default SSL context for it cost every run about 0.2 s of CPU
    (benchmarks/whole_run.py), more than the scrapes themselves. The thread ends by the
    total deadline of :func:`get` even when the awaiting task is cancelled."""
    call = functools.partial(
        get, url, headers=headers, timeout=timeout, max_bytes=max_bytes, max_redirects=max_redirects
    )
    try:
        return await asyncio.get_running_loop().run_in_executor(None, call)
    except (http.client.HTTPException, ValueError) as exc:
        raise OSError(f"{type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class _Raw:
    status: int
    body: bytes
    location: str | None


def _get_once(url: str, headers: Mapping[str, str], deadline: float, timeout: float, max_bytes: int) -> _Raw:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {safe_url(url)!r}")
    remaining = deadline - time.monotonic()
    shown = safe_url(url)
    if remaining <= 0:
        raise HTTPLimitError(f"GET {shown}: no answer within {timeout:.3g} s (the whole exchange)")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=remaining)
    expired = threading.Event()
    # the connection's socket, kept here: for a close-delimited body http.client hands it to the
    # response and sets conn.sock to None, and a body that drips would then outlive the deadline
    sockets: list[socket.socket] = []

    def expire() -> None:  # the total deadline: unblock whatever read is waiting
        expired.set()
        for sock in (conn.sock, *sockets):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(remaining, expire)
    timer.daemon = True
    timer.start()
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request("GET", path, headers=dict(headers))
        if conn.sock is not None:
            sockets.append(conn.sock)
        resp = conn.getresponse()
        length = resp.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > max_bytes:
            raise HTTPLimitError(f"GET {shown}: the body is {int(length)} bytes, more than the limit of {max_bytes}")
        body = bytearray()
        while True:
            piece = resp.read(min(_READ, max_bytes + 1 - len(body)))
            if not piece:
                break
            body += piece
            if len(body) > max_bytes:
                raise HTTPLimitError(f"GET {shown}: the body exceeded the limit of {max_bytes} bytes")
        if expired.is_set():  # a shut-down socket can read as the body's end
            raise HTTPLimitError(f"GET {shown}: no answer within {timeout:.3g} s (the whole exchange)")
        return _Raw(resp.status, bytes(body), resp.getheader("Location"))
    except HTTPLimitError:
        raise
    except (OSError, http.client.HTTPException):
        if expired.is_set() or time.monotonic() >= deadline:
            raise HTTPLimitError(f"GET {shown}: no answer within {timeout:.3g} s (the whole exchange)") from None
        raise
    finally:
        timer.cancel()
        conn.close()

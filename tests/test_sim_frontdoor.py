"""The simulator's front door (sim/frontdoor.py): plain streams served at the protocol level,
everything else handed to aiohttp, with the same bytes either way.

Each check is raw HTTP over loopback against real simulator processes: one started with the
default front end, one with ``--front-end aiohttp`` (the path every request took before), fed
the same requests in the same order so that their engines number requests alike and write
the same text.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest

from pytest_infmax.servers.launch import ServerConfig, running_server

STARTUP_TIMEOUT_S = 20.0
READ_TIMEOUT_S = 10.0


@dataclass
class Sim:
    host: str
    port: int
    base_url: str

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base_url}/sim/stats", timeout=READ_TIMEOUT_S) as response:
            return json.loads(response.read())

    def traces(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.base_url}/sim/trace", timeout=READ_TIMEOUT_S) as response:
            return json.loads(response.read())["requests"]

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(READ_TIMEOUT_S)
        sock.connect((self.host, self.port))
        return sock


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Sim]]:
    """Two simulators, alike but for the front end."""
    with (
        _sim(tmp_path_factory.mktemp("fast"), "fast") as fast,
        _sim(tmp_path_factory.mktemp("aiohttp"), "aiohttp") as plain,
    ):
        yield {"fast": fast, "aiohttp": plain}


class _sim:
    def __init__(self, workdir: Path, front_end: str) -> None:
        args = ("--front-end", front_end, "--model", "m", "--seed", "7", "--decode-step-ms", "0.5")
        self._context = running_server(ServerConfig(sim_args=args, startup_timeout=STARTUP_TIMEOUT_S), workdir)

    def __enter__(self) -> Sim:
        server = self._context.__enter__()
        host, port = server.base_url.rsplit("//", 1)[1].rsplit(":", 1)
        return Sim(host, int(port), server.base_url)

    def __exit__(self, *exc: object) -> None:
        self._context.__exit__(*exc)


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False

    # httptools' callbacks
    def on_status(self, status: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def read_responses(sock: socket.socket, count: int) -> list[Response]:
    """Read ``count`` responses (fewer if the server closes first)."""
    responses: list[Response] = []
    while len(responses) < count:
        response = Response()
        parser = httptools.HttpResponseParser(response)
        leftover = getattr(sock, "_leftover", b"")
        if leftover:
            parser.feed_data(leftover)
        while not response.complete:
            data = sock.recv(65536)
            if not data:
                return responses
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                break
        response.status = parser.get_status_code()
        responses.append(response)
    return responses


def post(path: str, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None) -> bytes:
    content = raw if raw is not None else json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", "Host: t", "Content-Type: application/json", f"Content-Length: {len(content)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + content


def normalised(response: Response) -> tuple[int, dict[str, str], str]:
    """The response less what differs between two servers by design: ids, times, the date."""
    body = response.body.decode(errors="replace")
    body = re.sub(r'"(chatcmpl|cmpl)-[0-9a-f]+"', r'"\1-ID"', body)
    body = re.sub(r'"created":\d+', '"created":0', body)
    kept = ("content-type", "transfer-encoding", "cache-control", "x-request-id", "server", "retry-after")
    return response.status, {k: v for k, v in response.headers.items() if k in kept}, body


STREAM = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4, "stream": True}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}

# (name, raw request bytes): each on a fresh connection, against both front ends in turn
CASES: list[tuple[str, bytes]] = [
    ("stream", post("/v1/completions", STREAM)),
    ("stream with usage", post("/v1/completions", {**STREAM, "stream_options": {"include_usage": True}})),
    (
        "stream, continuous usage",
        post("/v1/completions", {**STREAM, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    ),
    ("chat stream", post("/v1/chat/completions", CHAT)),
    ("request id echoed", post("/v1/completions", STREAM, {"X-Request-Id": "abc-1"})),
    ("not streaming", post("/v1/completions", {**STREAM, "stream": False})),
    ("invalid JSON", post("/v1/completions", None, raw=b'{"model": "m", "stream": tru')),
    ("not UTF-8", post("/v1/completions", None, raw=b'{"model": "m\xff"}')),
    ("JSON array", post("/v1/completions", [1, 2])),
    (
        "a key twice",
        post("/v1/completions", None, raw=b'{"model":"m","prompt":[1],"max_tokens":2,"stream":false,"stream":true}'),
    ),
    (
        "NaN",
        post("/v1/completions", None, raw=b'{"model":"m","prompt":[1],"max_tokens":2,"stream":true,"temperature":NaN}'),
    ),
    ("an id past 64 bits", post("/v1/completions", {**STREAM, "prompt": [2**70]})),
    (
        "a lone surrogate",
        post("/v1/completions", None, raw=b'{"model":"m","prompt":"\\ud800","max_tokens":2,"stream":true}'),
    ),
    ("wrong model", post("/v1/completions", {**STREAM, "model": "x"})),
    ("max_tokens 0", post("/v1/completions", {**STREAM, "max_tokens": 0})),
    ("unknown path", post("/v1/nothing", STREAM)),
    ("query string", post("/v1/completions?x=1", STREAM)),
    ("GET", b"GET /v1/completions HTTP/1.1\r\nHost: t\r\n\r\n"),
    ("fault header", post("/v1/completions", STREAM, {"X-Infmax-Fault": "status=503"})),
    ("HTTP/1.0", post("/v1/completions", STREAM).replace(b"HTTP/1.1", b"HTTP/1.0", 1)),
    ("Connection: close", post("/v1/completions", STREAM, {"Connection": "close"})),
    (
        "Content-Length not a number",
        post("/v1/completions", STREAM).replace(b"Content-Length: ", b"Content-Length: x"),
    ),
    ("two Content-Lengths", post("/v1/completions", STREAM, {"Content-Length": "3"})),
    ("garbage", b"HELLO THERE\r\n\r\n"),
    ("a head too long", post("/v1/completions", STREAM, {"X-Pad": "a" * 70_000})),
    (
        "chunked body",
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n"
        % (len(json.dumps(STREAM)), json.dumps(STREAM).encode()),
    ),
]


def test_both_front_ends_answer_every_request_alike(sims: dict[str, Sim]) -> None:
    """Every case, served or handed over, gets the same answer from both front ends, and
    the front door serves exactly the plain streams among them."""
    answers: dict[str, list[Any]] = {"fast": [], "aiohttp": []}
    served_by_door = []
    for front_end, sim in sims.items():
        for name, raw in CASES:
            before = sim.stats()["front_end_requests"]["fast"]
            with sim.connect() as sock:
                sock.sendall(raw)
                (response,) = read_responses(sock, 1) or [Response()]
            answers[front_end].append((name, normalised(response)))
            if sim.stats()["front_end_requests"]["fast"] > before:
                served_by_door.append((front_end, name))
    for (name, fast), (_, plain) in zip(answers["fast"], answers["aiohttp"]):
        assert fast == plain, name
    assert served_by_door == [
        ("fast", name)
        for name in (
            "stream",
            "stream with usage",
            "stream, continuous usage",
            "chat stream",
            "request id echoed",
            "a key twice",  # the last one counts, as json.loads has it
            "an id past 64 bits",
        )
    ]
    by_name = dict(answers["fast"])
    assert by_name["stream"][0] == 200 and by_name["stream"][2].endswith("data: [DONE]\n\n")
    assert by_name["request id echoed"][1]["x-request-id"] == "abc-1"
    assert by_name["wrong model"][0] == 404 and by_name["garbage"][0] == 400


def test_a_connection_is_handed_to_aiohttp_at_its_first_other_request(sims: dict[str, Sim]) -> None:
    """Keep-alive: streams served by the door, then a non-streaming request (aiohttp's from
    then on), then a stream again, all answered in order on the one connection."""
    sim = sims["fast"]
    before = sim.stats()["front_end_requests"]
    with sim.connect() as sock:
        requests = [
            post("/v1/completions", STREAM),
            post("/v1/chat/completions", CHAT),
            post("/v1/completions", {**STREAM, "stream": False}),
            post("/v1/completions", STREAM),
        ]
        responses = []
        for raw in requests:
            sock.sendall(raw)
            responses += read_responses(sock, 1)
    assert [r.status for r in responses] == [200] * 4
    assert [r.headers["content-type"].split(";")[0] for r in responses] == [
        "text/event-stream",
        "text/event-stream",
        "application/json",
        "text/event-stream",
    ]
    assert json.loads(responses[2].body)["usage"]["completion_tokens"] == 4
    after = sim.stats()["front_end_requests"]
    assert {k: after[k] - before[k] for k in after} == {"fast": 2, "aiohttp": 2}


def test_pipelined_streams_are_answered_in_order(sims: dict[str, Sim]) -> None:
    """Two requests in one write: the second waits for the first stream's end."""
    sim = sims["fast"]
    before = sim.stats()["front_end_requests"]["fast"]
    with sim.connect() as sock:
        sock.sendall(
            post("/v1/completions", STREAM, {"X-Request-Id": "one"})
            + post("/v1/completions", STREAM, {"X-Request-Id": "two"})
        )
        responses = _read_pipelined(sock, 2)
    assert [r.headers.get("x-request-id") for r in responses] == ["one", "two"]
    assert all(r.body.decode().count('"finish_reason":"length"') == 1 for r in responses)
    assert sim.stats()["front_end_requests"]["fast"] - before == 2


def _read_pipelined(sock: socket.socket, count: int) -> list[Response]:
    """Responses back to back in one byte stream (each parser fed from where the last ended)."""
    data = bytearray()
    deadline = time.monotonic() + READ_TIMEOUT_S
    while data.count(b"0\r\n\r\n") < count and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    responses = []
    for part in bytes(data).split(b"HTTP/1.1 ")[1:]:
        response = Response()
        parser = httptools.HttpResponseParser(response)
        parser.feed_data(b"HTTP/1.1 " + part)
        response.status = parser.get_status_code()
        responses.append(response)
    return responses


def test_a_client_gone_mid_stream_frees_its_engine_slot(sims: dict[str, Sim]) -> None:
    sim = sims["fast"]
    with sim.connect() as sock:
        sock.sendall(post("/v1/completions", {**STREAM, "max_tokens": 100_000}, {"X-Request-Id": "gone"}))
        seen = b""
        while b"data: " not in seen:  # streaming
            seen += sock.recv(65536)
    deadline = time.monotonic() + READ_TIMEOUT_S
    while time.monotonic() < deadline:
        stats = sim.stats()
        traces = [t for t in sim.traces() if t.get("x_request_id") == "gone"]
        if stats["running"] == 0 and traces:
            break
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert traces[0]["outcome"] == "cancelled"


def test_a_client_that_reads_slowly_gets_every_event(tmp_path: Path) -> None:
    """A client that reads nothing until its request has been generated, over a small
    receive window: the door holds what the transport cannot take (its writing paused above
    the high-water mark) and writes it when the client reads again; nothing is lost or
    reordered. Every event repeats the model's name: 20 KB names make 300 events 6 MB, more
    than the socket buffers hold."""
    model = "m" * 20_000
    tokens = 300
    args = ("--decode-step-ms", "1", "--model", model)
    with running_server(
        ServerConfig(sim_args=args, model=model, startup_timeout=STARTUP_TIMEOUT_S), tmp_path
    ) as server:
        host, port = server.base_url.rsplit("//", 1)[1].rsplit(":", 1)
        sim = Sim(host, int(port), server.base_url)
        with sim.connect(rcvbuf=4096) as sock:
            body = {
                "model": model,
                "prompt": [1],
                "max_tokens": tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            sock.sendall(post("/v1/completions", body))
            deadline = time.monotonic() + READ_TIMEOUT_S
            while sim.stats()["requests_finished"] == 0:  # generated, while the client read nothing
                assert time.monotonic() < deadline, "the request was not generated in time"
            (response,) = read_responses(sock, 1)
        assert sim.stats()["front_end_requests"] == {"fast": 1, "aiohttp": 0}
    events = [line for line in response.body.decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: ") :])["usage"]["completion_tokens"] == tokens
    texts = [json.loads(event[len("data: ") :])["choices"][0]["text"] for event in events[:-2]]
    assert len(texts) == tokens and all(text.startswith(" ") for text in texts)


def test_a_large_pipelined_request_waits_for_the_stream_before_it(sims: dict[str, Sim]) -> None:
    """Over 1 MiB sent while a stream is written: the door stops reading the connection
    (rather than buffer without bound or cut the stream), then serves it after that stream."""
    sim = sims["fast"]
    first = post("/v1/completions", {**STREAM, "max_tokens": 2000}, {"X-Request-Id": "long"})
    second = post("/v1/completions", {**STREAM, "pad": "a" * 1_500_000}, {"X-Request-Id": "large"})
    with sim.connect() as sock:
        sock.sendall(first)
        seen = b""
        while b"data: " not in seen:  # the first stream is being written
            seen += sock.recv(65536)
        sock.sendall(second)
        data = bytearray(seen)
        while data.count(b"0\r\n\r\n") < 2:
            chunk = sock.recv(65536)
            assert chunk, "the connection closed"
            data += chunk
    heads = re.findall(rb"X-Request-Id: (\S+)\r\n", bytes(data))
    assert heads == [b"long", b"large"]
    assert data.count(b'"finish_reason":"length"') == 2

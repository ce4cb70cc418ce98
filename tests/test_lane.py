"""The C fast lane (``pytest_infmax/_lane.c``) reads streaming bodies exactly as the Python path.

The lane de-chunks a ``200 text/event-stream`` chunked body and splits it into SSE
events; whatever it does not handle itself (CR line ends, comments, other fields,
multi-line data) it hands to the Python decoder. Both paths must deliver the same
events with the same arrival stamps, end the same way (status, typed error) and leave
the connection in the same state, for any body cut into any chunks and any reads.
Here a ``StreamConnection`` is fed bytes directly (a fake transport; no sockets), once
with the lane and once with ``INFMAX_WIRE=python``, and the two are compared. The
live paths over loopback are covered by test_hostile_server.py, which runs both.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
from array import array
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_infmax.load import streamclient
from pytest_infmax.load.streamclient import ConnectionPool, SSEDecoder, StreamConnection, StreamError
from pytest_infmax.records import ErrorKind

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_the_fast_lane_is_built() -> None:
    """The extension compiles wherever the package is installed with a C compiler (CI
    included): a silent build failure would quietly double the client's CPU."""
    assert streamclient._Lane is not None, (
        "pytest_infmax.load._lane is not built: install a C compiler (gcc) and the Python "
        "headers, then reinstall the package (pip install -e .)"
    )


@dataclass
class _Sink:
    events: list[tuple[bytes, float]] = field(default_factory=list)
    done: bool = False

    def on_event(self, data: bytes, t: float) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        self.events.append((data, t))


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def set_protocol(self, protocol: object) -> None:
        pass  # the replay calls the connection's data_received, whichever it is


def _replay(reads: list[bytes], lane: bool, max_event_bytes: int, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Feed ``reads`` (read i stamped i) to one connection; what it delivered and how it ended."""
    monkeypatch.setenv(streamclient.WIRE_ENV, "" if lane else "python")
    # streamclient reads its clock once per read: read i is stamped i (only its clock:
    # hypothesis times itself with the real one)
    reads_so_far = itertools.count()
    monkeypatch.setattr(streamclient, "time", SimpleNamespace(perf_counter=lambda: float(next(reads_so_far))))

    async def go() -> dict:
        pool = ConnectionPool("http://127.0.0.1:9/v1/completions")
        assert pool.fast_lane is lane
        conn = StreamConnection(pool)
        transport = _Transport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        sink = _Sink()
        decoder = SSEDecoder(sink, max_event_bytes)
        future = conn.start(b"POST", decoder)
        used_lane = False
        for data in reads:
            if transport.aborted:
                break
            conn.data_received(data)
            used_lane = used_lane or conn._parser_spent  # httptools was stopped for the lane
        outcome: object
        if future.done():
            exc = future.exception()
            outcome = ("error", exc.kind, str(exc)) if isinstance(exc, StreamError) else ("ok", future.result())
        else:
            outcome = ("pending",)
        return {
            "events": [d for d, _ in sink.events],
            "stamps": [t for _, t in sink.events],
            "done": sink.done,
            "outcome": outcome,
            "idle": conn in pool._idle_conns and not conn.closed,  # would be reused
            "aborted": transport.aborted,
            "used_lane": used_lane,
        }

    return asyncio.run(go())


# -- strategies ------------------------------------------------------------------------------------

_TEXT = st.text(st.sampled_from('ab {}":,é[]DONE'), max_size=12)


@st.composite
def _event(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["data", "data", "data", "done", "multi", "comment", "field", "nospace", "empty"]))
    if kind == "data":
        return f"data: {draw(_TEXT)}"
    if kind == "done":
        return "data: [DONE]"
    if kind == "multi":
        return "\n".join(f"data: {draw(_TEXT)}" for _ in range(draw(st.integers(2, 3))))
    if kind == "comment":
        return f": {draw(_TEXT)}"
    if kind == "field":
        return f"event: {draw(_TEXT)}\ndata: {draw(_TEXT)}"
    if kind == "nospace":
        return f"data:{draw(_TEXT)}"
    return ""


@st.composite
def _stream(draw: st.DrawFn) -> tuple[list[bytes], int]:
    events = draw(st.lists(_event(), min_size=0, max_size=8))
    newline = draw(st.sampled_from(["\n", "\n", "\r\n", "\r"]))
    text = "".join(e.replace("\n", newline) + newline * 2 for e in events)
    if draw(st.booleans()):  # an unfinished last event (no blank line)
        text += f"data: {draw(_TEXT)}"
    body = text.encode()
    # chunked framing with random chunk sizes, extensions, trailers
    chunks, i = [], 0
    while i < len(body):
        n = draw(st.integers(1, max(1, len(body) - i)))
        ext = draw(st.sampled_from(["", "", ";x=1"]))
        size = draw(st.sampled_from(["%x", "%X"])) % n
        chunks.append(f"{size}{ext}\r\n".encode() + body[i : i + n] + b"\r\n")
        i += n
    chunks.append(b"0\r\n" + draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"])) + b"\r\n")
    wire = HEAD + b"".join(chunks)
    # random reads: the head may share a read with the body, or be cut anywhere
    cuts = sorted(set(draw(st.lists(st.integers(1, len(wire) - 1), max_size=10))))
    reads = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)])]
    max_event = draw(st.sampled_from([1 << 20, 24]))
    return reads, max_event


PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(_stream())
def test_lane_and_python_read_every_stream_alike(stream: tuple[list[bytes], int]) -> None:
    reads, max_event = stream
    with pytest.MonkeyPatch.context() as mp:
        python = _replay(reads, False, max_event, mp)
    with pytest.MonkeyPatch.context() as mp:
        lane = _replay(reads, True, max_event, mp)
    assert not python["used_lane"]
    python.pop("used_lane")
    lane.pop("used_lane")
    assert lane == python


def _chunked(*payloads: bytes, end: bytes = b"0\r\n\r\n") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads) + end


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "python"])
@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"zz\r\n", "malformed HTTP response"),
        (b"3\r\ndata\r\n", "malformed HTTP response"),  # 4 bytes in a 3-byte chunk
        (b"ffffffffffffffffffff\r\n", "malformed HTTP response"),
    ],
    ids=["bad-size", "long-chunk", "size-overflow"],
)
def test_malformed_chunking_is_a_protocol_error_on_both_paths(
    wire: bytes, message: str, lane: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _replay([HEAD, wire], lane, 1 << 20, monkeypatch)
    assert result["outcome"][0] == "error" and result["outcome"][2].startswith(message), result
    assert result["aborted"] and not result["idle"]
    assert result["used_lane"] is lane


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "python"])
def test_a_whole_stream_in_one_read_and_the_connection_is_kept(lane: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    wire = HEAD + _chunked(b'data: {"a":1}\n\n', b'data: {"a":2}\n\ndata: [DONE]\n\n')
    result = _replay([wire], lane, 1 << 20, monkeypatch)
    assert result["events"] == [b'{"a":1}', b'{"a":2}']
    assert result["stamps"] == [0, 0]
    assert result["outcome"] == ("ok", 200) and result["idle"] and not result["aborted"]
    assert result["used_lane"] is lane


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "python"])
def test_bytes_after_the_end_of_the_message_retire_the_connection(lane: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    wire = HEAD + _chunked(b"data: x\n\ndata: [DONE]\n\n") + b"HTTP/1.1 200 OK\r\n"
    result = _replay([wire], lane, 1 << 20, monkeypatch)
    assert result["events"] == [b"x"] and result["outcome"] == ("ok", 200)
    assert not result["idle"]


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_pooled_connection_closed_under_us_is_not_used_for_the_next_request(
    loop: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keep-alive connection the server closed, whose connection_lost the loop has not run
    yet (vLLM exiting after its EngineCore died): uvloop refused the write with a RuntimeError
    that ended the whole run. The pool skips a closing connection; a write that fails anyway
    is a typed ``disconnected`` failure of that request."""
    from pytest_infmax.load.generator import EVENT_LOOP_ENV, run_coroutine
    from pytest_infmax.load.streamclient import build_request, stream_post
    from pytest_infmax.servers.launch import ServerConfig, running_server

    monkeypatch.setenv(EVENT_LOOP_ENV, loop)
    body = b'{"model": "sim-model", "prompt": "hi", "max_tokens": 2, "stream": true}'

    async def go(base_url: str) -> list[object]:
        pool = ConnectionPool(f"{base_url}/v1/completions")
        request = build_request(pool, "/v1/completions", body, {})
        outcomes: list[object] = [await stream_post(pool, request, SSEDecoder(_StatusSink()), timeout=30)]
        deadline = asyncio.get_running_loop().time() + 10
        while not pool._idle_conns and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.001)  # [DONE] may come before the message's end: it idles then
        (idle,) = pool._idle_conns
        assert idle.transport is not None
        idle.transport.close()  # closing now; connection_lost comes on a later turn of the loop
        outcomes.append(await stream_post(pool, request, SSEDecoder(_StatusSink()), timeout=30))
        # and a connection that closes between acquire() and the write: a typed failure
        conn = await pool.acquire()
        assert conn.transport is not None
        conn.transport.close()
        pool._idle(conn)
        monkeypatch.setattr(pool, "acquire", lambda: _ready(conn))
        try:
            await stream_post(pool, request, SSEDecoder(_StatusSink()), timeout=30)
            outcomes.append("sent")
        except StreamError as exc:
            outcomes.append(exc.kind.value)
        pool.close()
        return outcomes

    with running_server(ServerConfig(sim_args=("--decode-step-ms", "1")), tmp_path) as server:
        outcomes = run_coroutine(go(server.base_url))
    assert outcomes[:2] == [200, 200]
    assert outcomes[2] in ("disconnected", "sent")  # asyncio drops the write; uvloop refuses it: never a crash
    if loop == "uvloop":
        assert outcomes[2] == "disconnected"


async def _ready(conn: StreamConnection) -> StreamConnection:
    return conn


class _StatusSink:
    """A decoder's sink that keeps nothing but the end of the stream (the test looks at statuses)."""

    done = False

    def on_event(self, data: bytes, t: float) -> None:
        if data == b"[DONE]":
            self.done = True


# -- plain content events, recorded in C ---------------------------------------------------------
# The lane records an event on a ResponseAccumulator itself when its JSON is a plain content
# delta (_lane.c, plain_content); everything else goes to on_event. Either way the record
# must come out as on_event alone makes it: the same stamps, text lengths, first token,
# event budget, counts, and the same typed error with the same message.

from pytest_infmax.load.generator import ResponseAccumulator  # noqa: E402
from pytest_infmax.records import RequestRecord  # noqa: E402

_STR = st.one_of(
    st.sampled_from(["", " tok", "tok", "\n", 'a"b', "a\\b", "é", "日本", "😀", "\u2028", "\x00", "\x1f", "/"]),
    st.text(max_size=6),
)
_JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=False), _STR),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_STR, inner, max_size=3)),
    max_leaves=6,
)


def _maybe(key: str, value: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.just({}), value.map(lambda v: {key: v}))


_DELTA = st.builds(
    lambda *parts: {k: v for part in parts for k, v in part.items()},
    _maybe("role", st.sampled_from(["assistant", None])),
    _maybe("content", st.one_of(_STR, st.none(), st.integers(0, 3))),
    _maybe("reasoning_content", st.one_of(st.none(), _STR)),
    _maybe("reasoning", st.one_of(st.none(), _STR)),
    _maybe("tool_calls", _JSONISH),
)
_CHOICE = st.builds(
    lambda *parts: {k: v for part in parts for k, v in part.items()},
    _maybe("index", st.integers(0, 2)),
    _maybe("delta", st.one_of(_DELTA, st.none(), _JSONISH)),
    _maybe("text", st.one_of(_STR, st.none())),
    _maybe("logprobs", st.one_of(st.none(), _JSONISH)),
    _maybe("finish_reason", st.sampled_from([None, None, "stop", "length", 1])),
)
_CHUNK = st.builds(
    lambda *parts: {k: v for part in parts for k, v in part.items()},
    _maybe("id", st.just("chatcmpl-1")),
    _maybe("object", st.just("chat.completion.chunk")),
    _maybe("choices", st.one_of(st.lists(_CHOICE, min_size=1, max_size=2), st.just([]), st.none(), _JSONISH)),
    _maybe("usage", st.one_of(st.none(), st.none(), st.fixed_dictionaries({"completion_tokens": st.integers(0, 9)}))),
    _maybe("error", st.one_of(st.none(), st.none(), _JSONISH)),
    _maybe("extra", _JSONISH),
)


_CONTENT = st.one_of(*[_STR] * 8, st.none(), st.integers(0, 3))
_PLAIN = st.one_of(  # what servers send for nearly every token, with a field or two changed
    st.builds(
        lambda content, extra, finish, usage, first: {
            "id": "chatcmpl-1",
            **extra,
            "choices": [
                {"index": 0, "delta": {**first, "content": content}, "logprobs": None, "finish_reason": finish}
            ],
            **usage,
        },
        _CONTENT,
        _maybe("model", _JSONISH),
        st.sampled_from([None] * 8 + ["stop"]),
        st.sampled_from([{}] * 6 + [{"usage": None}, {"usage": {"completion_tokens": 2}}, {"error": None}]),
        st.sampled_from([{}] * 4 + [{"role": "assistant"}, {"reasoning_content": None}, {"reasoning": "r"}]),
    ),
    st.builds(
        lambda text, finish: {"choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]},
        _CONTENT,
        st.sampled_from([None] * 8 + ["length"]),
    ),
)


@st.composite
def _payload(draw: st.DrawFn) -> bytes:
    """One event's data: a chunk-like object in JSON, written in any of the ways servers
    write it, sometimes damaged (cut, a byte changed, a key spelled with an escape or given
    twice, something after the object)."""
    obj = draw(st.one_of(*[_PLAIN] * 8, _CHUNK, _CHUNK, _JSONISH))
    text = json.dumps(
        obj, ensure_ascii=draw(st.booleans()), separators=draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    )
    data = text.encode("utf-8", "surrogatepass")
    edit = draw(st.sampled_from(["none"] * 12 + ["cut", "byte", "escape_key", "dup", "trail", "space"]))
    if edit == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif edit == "byte" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    elif edit == "escape_key":
        data = data.replace(b'"content"', b'"cont\\u0065nt"').replace(b'"choices"', b'"ch\\u006fices"')
    elif edit == "dup":
        data = data.replace(b'"content": ', b'"content": "x", "content": ').replace(
            b'"content":', b'"content":"x","content":'
        )
    elif edit == "trail":
        data += draw(st.sampled_from([b" ", b"x", b"{}", b"\t"]))
    elif edit == "space":
        data = b" " + data
    return data.replace(b"\n", b"").replace(b"\r", b"")  # one data line, as the lane takes it


def _record(payloads: list[bytes], in_c: bool, max_events: int | None, reads: bool = False) -> tuple[dict, int]:
    """Feeds the events through a lane (recording plain content in C or not); the record.

    ``reads``: as a connection reads them, through the lane's own ``data_received`` (which
    writes the ``events_left`` it counts in C back only before a callback), then ``sync()``,
    as the connection does when the lane's read ends."""
    acc = ResponseAccumulator(RequestRecord(index=0), max_events)
    assert streamclient._Lane is not None
    lane = streamclient._Lane(acc.on_event, lambda b, t: False, lambda b, t: False, 1 << 20, acc if in_c else None)
    outcome: tuple = ("ok",)
    failures: list[Exception] = []
    stamps = itertools.count()
    if reads:
        lane.attach(lambda end, size, t: None, failures.append, lambda: float(next(stamps)))
    for i, data in enumerate(payloads):
        event = b"data: " + data + b"\n\n"
        framed = b"%x\r\n%s\r\n" % (len(event), event)
        try:
            if reads:
                lane.data_received(framed)
                if failures:
                    raise failures[0]
            else:
                lane.feed(framed, float(i))
        except StreamError as exc:
            outcome = ("error", exc.kind, str(exc))
            break
    lane.sync()
    rec = acc.rec
    state = {
        "outcome": outcome,
        "chunk_times": list(rec.chunk_times),
        "first_token_time": rec.first_token_time,
        "texts": list(acc.texts),
        "events_left": acc.events_left,
        "usage": acc.usage,
        "cumulative": acc.cumulative,
        "finished": acc.finished,
        "complete_at": acc.complete_at,
        "done": acc.done,
    }
    return state, lane.content_events


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_payload(), min_size=1, max_size=6), st.sampled_from([None, None, 50, 1, 3]))
def test_plain_content_recorded_in_c_is_what_on_event_records(payloads: list[bytes], max_events: int | None) -> None:
    in_python, none = _record(payloads, False, max_events)
    in_c, _ = _record(payloads, True, max_events)
    assert none == 0
    assert in_c == in_python
    # read by the lane's own data_received: the count kept in C between reads comes out the same
    read_in_c, _ = _record(payloads, True, max_events, reads=True)
    assert read_in_c == in_python


def test_a_plain_content_stream_is_recorded_in_c_and_the_rest_in_python() -> None:
    """The common stream of a chat completion: role, content deltas (ASCII, escaped, UTF-8,
    a surrogate pair), the finish and usage events, [DONE]. The content goes through C, the
    rest through on_event, and the record is complete."""

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, ascii: bool = False) -> bytes:
        obj = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
        obj["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if usage is not None:
            obj["usage"] = usage
        return json.dumps(obj, ensure_ascii=ascii, separators=(",", ":")).encode()

    payloads = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": " tok"}),
        chunk({"content": 'line\n"quoted"'}, ascii=True),
        chunk({"content": "é😀"}),
        chunk({"content": "é😀"}, ascii=True),  # \u00e9\ud83d\ude00: two code points
        chunk({"content": "!"}, finish="stop"),
        json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}).encode(),
        b"[DONE]",
    ]
    in_c, taken = _record(payloads, True, 100)
    in_python, _ = _record(payloads, False, 100)
    assert in_c == in_python
    assert taken == 4  # the four plain content deltas; the role, finish and usage events went to on_event
    assert in_c["texts"] == [4, 13, 2, 2, 1]
    assert in_c["chunk_times"] == [1.0, 2.0, 3.0, 4.0, 5.0] and in_c["first_token_time"] == 1.0
    assert in_c["done"] and in_c["finished"] and in_c["usage"].completion_tokens == 5


def test_an_endless_stream_of_plain_content_is_stopped_with_the_same_error() -> None:
    """The event budget holds on the C path: the event that would exhaust it goes to
    on_event, which raises the typed error."""
    payloads = [json.dumps({"choices": [{"delta": {"content": "x"}}]}).encode()] * 10
    in_c, taken = _record(payloads, True, 4)
    assert in_c == _record(payloads, False, 4)[0]
    assert in_c["outcome"][1] is ErrorKind.PROTOCOL and "more than 4 events" in in_c["outcome"][2]
    assert taken == 4 and in_c["chunk_times"] == [0.0, 1.0, 2.0, 3.0]


def _plain(text: str) -> bytes:
    event = b"data: " + json.dumps({"choices": [{"delta": {"content": text}}]}).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


@pytest.mark.parametrize("end", ["timeout", "cancelled", "closed by the server"])
def test_a_stream_cut_short_keeps_every_stamp_the_lane_recorded(end: str) -> None:
    """The lane keeps plain content events' stamps and lengths in C and writes them to the
    record at its write-backs (before any Python callback, on sync), not per event. A stream
    that ends mid-way -- the request's timeout, the caller cancelled (Ctrl-C), the server
    closing -- ends the lane's read (the connection syncs it), so the record holds every
    stamp that arrived, in order, as the Python path records them."""

    async def go() -> tuple[RequestRecord, ResponseAccumulator, bool]:
        pool = ConnectionPool("http://127.0.0.1:9/v1/completions")
        assert pool.fast_lane
        conn = StreamConnection(pool)
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        rec = RequestRecord(index=0)
        acc = ResponseAccumulator(rec, 100)
        future = conn.start(b"POST", SSEDecoder(acc, 1 << 20))
        conn.data_received(HEAD)
        for i in range(5):
            conn.data_received(_plain("ab" * (i + 1)))
        in_lane = conn.lane is not None
        if end == "timeout":
            streamclient._expire(conn, future, 1.0)
        elif end == "cancelled":
            conn.finished_with(False)
        else:
            conn.connection_lost(None)
        return rec, acc, in_lane

    rec, acc, in_lane = asyncio.run(go())
    assert in_lane  # the five events were read by the lane, not the Python path
    assert len(rec.chunk_times) == 5 and list(rec.chunk_times) == sorted(rec.chunk_times)
    assert rec.first_token_time == rec.chunk_times[0]
    assert list(acc.texts) == [2, 4, 6, 8, 10]
    assert acc.events_left == 101 - 5


def test_a_lane_dropped_without_its_write_back_still_leaves_its_stamps() -> None:
    """Belt and braces: a lane collected before any sync (its connection dropped, not
    closed) writes what it recorded to the sink as it goes."""
    acc = ResponseAccumulator(RequestRecord(index=0), 100)
    assert streamclient._Lane is not None
    lane = streamclient._Lane(acc.on_event, lambda b, t: False, lambda b, t: False, 1 << 20, acc)
    stamps = itertools.count(1)
    lane.attach(lambda end, size, t: None, lambda exc: None, lambda: float(next(stamps)))
    for i in range(3):
        lane.data_received(_plain("x" * (i + 1)))
    assert len(acc.rec.chunk_times) == 0  # kept in C until a write-back
    del lane
    gc.collect()
    assert list(acc.rec.chunk_times) == [1.0, 2.0, 3.0] and list(acc.texts) == [1, 2, 3]


def test_the_lane_refuses_a_sink_whose_fields_are_not_arrays_of_8_byte_items() -> None:
    """The lane appends its stamps and lengths as raw bytes: a list, or an array of another
    type, is refused at once, not filled with garbage."""
    assert streamclient._Lane is not None
    acc = ResponseAccumulator(RequestRecord(index=0), 100)
    acc.texts = [1]  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"sink.texts must be an array.array\('q'\)"):
        streamclient._Lane(acc.on_event, lambda b, t: False, lambda b, t: False, 1 << 20, acc)
    acc = ResponseAccumulator(RequestRecord(index=0), 100)
    acc.rec.chunk_times = array("f")
    with pytest.raises(TypeError, match=r"sink.rec.chunk_times must be an array.array\('d'\)"):
        streamclient._Lane(acc.on_event, lambda b, t: False, lambda b, t: False, 1 << 20, acc)

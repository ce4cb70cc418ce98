"""What does our load generator cost in client CPU, against a floor?

A dedicated minimal emitter (its own process: raw asyncio, HTTP/1.1 keep-alive,
chunked transfer) streams pre-built OpenAI completions SSE events at a fixed
total event rate, ``--tokens-per-event`` tokens per event (1, or 8 as vLLM's
``stream_interval``), 1,024 tokens per response (``--tokens-per-request``), then
the usage event and ``[DONE]``. Against it, each in a client subprocess of its own:

* **ours**: ``LoadGenerator.run`` (closed loop, ``concurrency`` = streams) on
  the event loop it uses by default (uvloop): the full SSE parse, JSON decode,
  timestamps, token accounting, the client's self-monitoring;
* **ours, events in Python**: the same with ``INFMAX_WIRE=framing``: the C lane
  de-chunks and splits the body, and every event goes to the Python sink
  (``ResponseAccumulator.on_event``: msgspec) instead of plain content events
  being recorded by the lane itself; what recording them in C is worth;
* **ours without the C lane**: the same with ``INFMAX_WIRE=python``: streaming
  bodies de-chunked and split into events in Python (httptools' body callback
  and ``SSEDecoder``) instead of by ``pytest_infmax/_lane.c``; what the C lane
  is worth, and what runs where it is not built;
* **ours, asyncio loop**: the same with ``INFMAX_EVENT_LOOP=asyncio``, which
  shows what uvloop is worth;
* **peer**: what the most frugal peer does per event, after vLLM's
  ``benchmark_serving.py`` (InferenceMAX's client is a fork of it): aiohttp line
  iteration, ``json.loads`` per event, a timestamp and the text kept;
* **floor**: a raw aiohttp loop with the same concurrency that posts a
  pre-built body and only reads the response bytes (``iter_any``), parsing
  nothing (the issue's reference floor);
* **protocol floor**: a uvloop ``asyncio.Protocol`` on keep-alive connections
  that only looks for the end of each response: the cost of the kernel and the
  event loop alone, below which no Python client on this machine can go.

Client CPU is ``time.process_time()`` of the client process around the run
(imports and interpreter start excluded). The table gives CPU-seconds per
million streamed tokens and per thousand requests, the ratio ours / floor, and
the requests and tokens the client counted next to what the emitter sent.

    .venv/bin/python benchmarks/client_overhead.py            # ~8 min on 2 cores
    .venv/bin/python benchmarks/client_overhead.py --quick    # ~2 min
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ISL = 128  # prompt tokens per request (our client builds and serialises them)


# -- the emitter --------------------------------------------------------------------


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: object) -> bytes:
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


class _Stream:
    __slots__ = ("transport", "events_left", "last", "tail")

    def __init__(self, transport: asyncio.Transport, events: int, last: bytes, tail: bytes) -> None:
        self.transport, self.events_left, self.last, self.tail = transport, events, last, tail


class Emitter:
    """Every ``tick`` seconds, writes the next pre-built event to every open stream."""

    HEAD = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
    )

    def __init__(self, tokens_per_event: int, tick: float) -> None:
        self.k = tokens_per_event
        self.tick = tick
        text = " tok" * tokens_per_event
        choice = {"index": 0, "text": text, "finish_reason": None}
        self.body_event = _event({"id": "c", "object": "text_completion", "choices": [choice]})
        self.last_event = _event(
            {"id": "c", "object": "text_completion", "choices": [dict(choice, finish_reason="length")]}
        )
        self.streams: list[_Stream] = []
        self.sent_requests = 0
        self.sent_tokens = 0
        self.sent_events = 0
        self._tails: dict[int, bytes] = {}

    def tail(self, tokens: int) -> bytes:
        if tokens not in self._tails:
            usage = {"prompt_tokens": ISL, "completion_tokens": tokens, "total_tokens": ISL + tokens}
            self._tails[tokens] = (
                _event({"id": "c", "object": "text_completion", "choices": [], "usage": usage})
                + _chunk(b"data: [DONE]\n\n")
                + b"0\r\n\r\n"
            )
        return self._tails[tokens]

    def start_stream(self, transport: asyncio.Transport, max_tokens: int) -> None:
        events = max(1, max_tokens // self.k)
        transport.write(self.HEAD)
        self.streams.append(_Stream(transport, events, self.last_event, self.tail(events * self.k)))

    async def ticker(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            next_tick += self.tick
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
            keep: list[_Stream] = []
            for s in self.streams:
                if s.transport.is_closing():
                    continue
                s.events_left -= 1
                self.sent_events += 1
                if s.events_left > 0:
                    s.transport.write(self.body_event)
                    keep.append(s)
                else:
                    s.transport.write(s.last + s.tail)
                    self.sent_requests += 1
            self.sent_tokens = self.sent_events * self.k  # every content event carries k tokens
            self.streams = keep

    def stats(self) -> bytes:
        body = json.dumps(
            {"requests": self.sent_requests, "tokens": self.sent_tokens, "events": self.sent_events}
        ).encode()
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )


_MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d+)')
_MODELS_BODY = b'{"object":"list","data":[{"id":"bench","object":"model"}]}'
_MODELS = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(_MODELS_BODY),
    _MODELS_BODY,
)
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class _Conn(asyncio.Protocol):
    def __init__(self, emitter: Emitter) -> None:
        self.emitter = emitter
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end]
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            length = int(m.group(1)) if m else 0
            if len(self.buf) < head_end + 4 + length:
                return
            body = self.buf[head_end + 4 : head_end + 4 + length]
            self.buf = self.buf[head_end + 4 + length :]
            assert self.transport is not None
            if head.startswith(b"GET /stats"):
                self.transport.write(self.emitter.stats())
                continue
            if head.startswith(b"GET "):  # /v1/models for a client that asks (whole_run.py's pytest); else 404
                self.transport.write(_MODELS if head.startswith(b"GET /v1/models") else _NOT_FOUND)
                continue
            mt = _MAX_TOKENS.search(body)
            self.emitter.start_stream(self.transport, int(mt.group(1)) if mt else 16)


def serve(port_file: Path, tokens_per_event: int, tick: float, shared_port: int = 0) -> None:
    """One emitter process. It listens on a port with ``SO_REUSEPORT`` (``shared_port``, or a
    new one): several emitters on one port, each on a core of its own, share the streams (the
    kernel spreads connections over them), so the events a host can send are not one
    process's. Each also listens on a port of its own for its ``/stats``. Writes "PORT
    STATS_PORT" to ``port_file``."""

    async def main() -> None:
        emitter = Emitter(tokens_per_event, tick)
        loop = asyncio.get_running_loop()
        shared = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        shared.bind(("127.0.0.1", shared_port))
        server = await loop.create_server(lambda: _Conn(emitter), sock=shared, backlog=1024)
        own = await loop.create_server(lambda: _Conn(emitter), "127.0.0.1", 0)
        port, stats_port = (srv.sockets[0].getsockname()[1] for srv in (server, own))
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(f"{port} {stats_port}")
        tmp.rename(port_file)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        ticker = asyncio.ensure_future(emitter.ticker())
        await stop.wait()
        ticker.cancel()
        server.close()
        own.close()

    asyncio.run(main())


# -- the clients (each run in a subprocess of its own) ----------------------------


def client_ours(
    url: str, streams: int, requests: int, osl: int, loop: str = "uvloop", workers: int = 1, wire: str = ""
) -> dict:
    os.environ["INFMAX_EVENT_LOOP"] = loop
    os.environ["INFMAX_WIRE"] = wire  # "python": streaming bodies without the C fast lane
    from pytest_infmax.load.generator import LoadGenerator, run_coroutine
    from pytest_infmax.load.plan import LoadConfig
    from pytest_infmax.load.scenarios import Scenario

    config = LoadConfig(
        Scenario("bench", ISL, osl, range_ratio=1.0),
        concurrency=streams,
        num_requests=requests,
        warmup=0,
        request_timeout=300,
        workers=workers,
    )
    gen = LoadGenerator(url, "bench")
    children0 = _children_cpu()
    cpu0, t0 = time.process_time(), time.perf_counter()
    run = run_coroutine(gen.run(config))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    children_cpu = _children_cpu() - children0  # worker processes, reaped by the run
    ok = [r for r in run.records if r.ok]
    errors = sorted({r.error_message or "" for r in run.records if not r.ok})
    client = run.client.to_dict() if run.client else {}
    return {
        "cpu": cpu,
        "wall": wall,
        "requests": len(ok),
        "tokens": sum(r.output_tokens or 0 for r in ok),
        "chunk_tokens": sum(sum(r.chunk_tokens) for r in ok),
        "errors": errors[:3],
        "client_bound": client.get("client_bound"),
        "reason": client.get("reason"),
        "loop_lag_p99_ms": client.get("loop_lag", {}).get("p99_ms"),
        # the measured phase as the run saw it (with workers: every worker's CPU, summed)
        "measured_wall": run.measured_end - run.measured_start,
        "measured_cpu": client.get("cpu_seconds"),
        "children_cpu": children_cpu,
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def client_floor(url: str, streams: int, requests: int, osl: int) -> dict:
    import aiohttp

    from pytest_infmax.load.scenarios import Scenario, plan_request, request_body

    # the same kind of body ours sends, built once
    body = json.dumps(
        request_body(plan_request(Scenario("bench", ISL, osl, range_ratio=1.0), 0, 0), "bench", "completions", {})
    ).encode()

    async def main() -> tuple[int, int]:
        issued = itertools.count()
        done = 0
        nbytes = 0
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                nonlocal done, nbytes
                while next(issued) < requests:
                    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                        async for data in resp.content.iter_any():
                            nbytes += len(data)
                    done += 1

            await asyncio.gather(*(worker() for _ in range(streams)))
        return done, nbytes

    cpu0, t0 = time.process_time(), time.perf_counter()
    done, nbytes = asyncio.run(main())
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    return {"cpu": cpu, "wall": wall, "requests": done, "tokens": None, "bytes": nbytes}


def client_peer(url: str, streams: int, requests: int, osl: int) -> dict:
    """What the most frugal peer does per event, after vLLM's benchmark_serving.py
    (which InferenceMAX's client forks): aiohttp, one line at a time from
    ``response.content``, strip, drop the ``data: `` prefix, ``json.loads``, a
    timestamp per event, the text appended. Written here from that description
    (one shared session, its newer form: the older one opened a session per request,
    which costs more)."""
    import aiohttp

    from pytest_infmax.load.scenarios import Scenario, plan_request, request_body

    async def main() -> tuple[int, int]:
        issued = itertools.count()
        done = 0
        tokens = 0
        # no connection limit (aiohttp's default of 100 would run 256 streams in waves)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=6 * 3600)) as session:

            async def worker() -> None:
                nonlocal done, tokens
                while (i := next(issued)) < requests:
                    payload = request_body(
                        plan_request(Scenario("bench", ISL, osl, range_ratio=1.0), i, 0), "bench", "completions", {}
                    )
                    st = time.perf_counter()
                    most_recent, ttft, itl, text = st, 0.0, [], ""
                    async with session.post(url, json=payload) as response:
                        async for chunk_bytes in response.content:
                            chunk_bytes = chunk_bytes.strip()
                            if not chunk_bytes:
                                continue
                            chunk = chunk_bytes.decode("utf-8").removeprefix("data: ")
                            if chunk == "[DONE]":
                                continue
                            data = json.loads(chunk)
                            if choices := data.get("choices"):
                                timestamp = time.perf_counter()
                                if not ttft:
                                    ttft = timestamp - st
                                else:
                                    itl.append(timestamp - most_recent)
                                most_recent = timestamp
                                text += choices[0].get("text") or ""
                            elif usage := data.get("usage"):
                                tokens += usage.get("completion_tokens") or 0
                    done += 1

            await asyncio.gather(*(worker() for _ in range(streams)))
        return done, tokens

    # the request builder's first call imports numpy (0.04 CPU-s): outside the measured CPU, as
    # the floors build their one body before theirs
    plan_request(Scenario("bench", ISL, osl, range_ratio=1.0), 0, 0)
    cpu0, t0 = time.process_time(), time.perf_counter()
    done, tokens = asyncio.run(main())
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    return {"cpu": cpu, "wall": wall, "requests": done, "tokens": tokens}


def client_protocol_floor(url: str, streams: int, requests: int, osl: int) -> dict:
    import uvloop

    from pytest_infmax.load.scenarios import Scenario, plan_request, request_body

    body = json.dumps(
        request_body(plan_request(Scenario("bench", ISL, osl, range_ratio=1.0), 0, 0), "bench", "completions", {})
    ).encode()
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port.encode(), len(body), body)
    )

    class Reader(asyncio.Protocol):
        """Keeps its connection; per read, only a timestamp and an end-of-response check."""

        def __init__(self) -> None:
            self.done: asyncio.Future[None] | None = None
            self.nbytes = 0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            time.perf_counter()
            self.nbytes += len(data)
            if data.endswith(b"0\r\n\r\n") and self.done is not None:
                self.done.set_result(None)

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        issued = itertools.count()
        done = 0
        nbytes = 0

        async def worker() -> None:
            nonlocal done, nbytes
            transport, proto = await loop.create_connection(Reader, host, int(port))
            while next(issued) < requests:
                proto.done = loop.create_future()
                transport.write(request)
                await proto.done
                done += 1
            nbytes += proto.nbytes
            transport.close()

        await asyncio.gather(*(worker() for _ in range(streams)))
        return done, nbytes

    cpu0, t0 = time.process_time(), time.perf_counter()
    done, nbytes = uvloop.run(main())
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    return {"cpu": cpu, "wall": wall, "requests": done, "tokens": None, "bytes": nbytes}


# -- the driver -----------------------------------------------------------------------


def _get_stats(base: str | list[str]) -> dict:
    """The emitter's counts; of several emitters (their stats URLs), the sums."""
    import urllib.request

    totals: dict = {}
    for url in [base] if isinstance(base, str) else base:
        with urllib.request.urlopen(url + "/stats", timeout=10) as r:
            for key, value in json.loads(r.read()).items():
                totals[key] = totals.get(key, 0) + value
    return totals


def _start_emitter(tmp: Path, k: int, tick: float, shared_port: int = 0) -> tuple[subprocess.Popen, str, str]:
    """An emitter process: (process, URL of the port it serves, URL of its own /stats)."""
    port_file = tmp / f"port-{k}-{tick}-{shared_port}-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, __file__, "_emit", str(port_file), str(k), str(tick), str(shared_port)],
        cwd=REPO,
    )
    deadline = time.monotonic() + 20
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the emitter did not start")
        time.sleep(0.02)
    port, stats_port = port_file.read_text().split()
    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats_port}"


def _run_client(kind: str, base: str, streams: int, requests: int, osl: int) -> dict:
    # Every client imports numpy (the request builder): none of them measures OpenBLAS's idle
    # threads spinning after the import (docs/load-generator.md, "How it reads a stream").
    from pytest_infmax.lazy import quiet_blas_threads

    env = dict(os.environ)
    quiet_blas_threads(env)
    out = subprocess.run(
        [sys.executable, __file__, "_client", kind, base, str(streams), str(requests), str(osl)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        raise SystemExit(f"{kind} client failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


KINDS = ("ours", "ours-framing", "ours-python-wire", "ours-asyncio", "peer", "floor", "protocol-floor")


def workers_sweep(
    counts: list[int],
    streams: int,
    event_rate: float,
    osl: int,
    repeat: int = 1,
    pin_emitter: list[int] | None = None,
) -> None:
    """Tokens per second the client consumes from an emitter asked for more than one
    process can read, with the load over 1..N worker processes; ``repeat`` interleaved
    rounds (median and spread). ``pin_emitter``: one emitter process on each of these CPUs,
    all on one port (``serve``), and the clients on the other CPUs, so the clients' scaling
    is not the emitters'."""
    client_cpus: list[int] = []
    emitter_cpus = sorted(set(pin_emitter or ()))
    if emitter_cpus:
        client_cpus = sorted(os.sched_getaffinity(0) - set(emitter_cpus))
        if not client_cpus:
            raise SystemExit(f"--pin-emitter {' '.join(map(str, emitter_cpus))}: no CPU is left for the clients")
    print(
        f"\nworkers: {streams} streams of {osl} one-token events, the emitter"
        f"{'s' if len(emitter_cpus) > 1 else ''} asked for {event_rate:g} events/s (more than one client "
        f"process reads); {repeat} interleaved rounds"
        + (f"; emitters on CPUs {emitter_cpus}, clients on CPUs {client_cpus}" if client_cpus else "")
    )
    # (tok/s, measured CPU, measured wall, client-bound, wall outside the measured phase,
    #  CPU per worker process outside it: its interpreter, imports, connecting, exit)
    runs: dict[int, list[tuple[float, float, float, bool, float, float | None]]] = {n: [] for n in counts}
    saved = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory() as tmpdir:
        emitters: list[subprocess.Popen] = []
        try:
            proc, base, stats = _start_emitter(Path(tmpdir), 1, streams / event_rate)
            emitters.append(proc)
            stats_urls = [stats]
            for _ in emitter_cpus[1:]:  # the others on the first one's port
                proc, _, stats = _start_emitter(Path(tmpdir), 1, streams / event_rate, int(base.rsplit(":", 1)[1]))
                emitters.append(proc)
                stats_urls.append(stats)
            for proc, cpu in zip(emitters, emitter_cpus):
                os.sched_setaffinity(proc.pid, {cpu})
            if client_cpus:
                os.sched_setaffinity(0, set(client_cpus))  # inherited by the clients started below
            for _ in range(repeat):
                for n in counts:  # interleaved: a drift of the machine hits every count
                    before = _get_stats(stats_urls)
                    r = _run_client(f"ours-w{n}", base + "/v1/completions", streams, streams * 2, osl)
                    after = _get_stats(stats_urls)
                    assert r["requests"] == after["requests"] - before["requests"] == streams * 2, r
                    rate = r["tokens"] / r["measured_wall"]
                    outside = r["wall"] - r["measured_wall"]
                    per_worker = (r["children_cpu"] - r["measured_cpu"]) / n if n > 1 else None
                    runs[n].append(
                        (rate, r["measured_cpu"], r["measured_wall"], r["client_bound"], outside, per_worker)
                    )
                    print(f"  workers={n}: {rate:,.0f} tok/s", flush=True)
        finally:
            os.sched_setaffinity(0, saved)
            for proc in emitters:
                proc.send_signal(signal.SIGTERM)
            for proc in emitters:
                proc.wait(timeout=10)

    def spread(values: list[float], fmt: str) -> str:
        med = fmt.format(statistics.median(values))
        return med + (f" ({fmt.format(min(values))}-{fmt.format(max(values))})" if len(values) > 1 else "")

    first = statistics.median(r[0] for r in runs[counts[0]])
    print(
        "\n| workers | tokens/s consumed | vs first | client CPU-s (all workers) | CPU % of one core | client-bound "
        "| wall outside the measured phase, s | start-up and exit CPU-s per worker process |"
    )
    print("|--:|--:|--:|--:|--:|--:|--:|--:|")
    for n in counts:
        rs = runs[n]
        rates = [r[0] for r in rs]
        print(
            f"| {n} | {spread(rates, '{:,.0f}')} | {statistics.median(rates) / first:.2f} | "
            f"{spread([r[1] for r in rs], '{:.2f}')} | {spread([100 * r[1] / r[2] for r in rs], '{:.0f}')} % | "
            f"{sum(r[3] for r in rs)} of {len(rs)} | {spread([r[4] for r in rs], '{:.2f}')} | "
            + (spread([r[5] for r in rs if r[5] is not None], "{:.2f}") if n > 1 else "- (in the process)")
            + " |"
        )


def _idle_wakeup_cpu(interval: float = 0.01, seconds: float = 3.0) -> float:
    """CPU seconds one wake-up of an otherwise idle uvloop loop costs: a chain of ``call_later``
    callbacks ``interval`` apart for ``seconds``, as the client's loop-lag ticker is (one loop
    iteration a wake-up; a task awaiting ``asyncio.sleep`` takes two), the process's CPU over
    its wake-ups (kernel included)."""
    import uvloop

    async def chain() -> int:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        end, wakeups = time.monotonic() + seconds, 0

        def tick() -> None:
            nonlocal wakeups
            wakeups += 1
            if time.monotonic() < end:
                loop.call_later(interval, tick)
            else:
                done.set_result(wakeups)

        loop.call_later(interval, tick)
        return await done

    cpu = time.process_time()
    wakeups = uvloop.run(chain())
    return (time.process_time() - cpu) / wakeups


def wakeups(streams: int, osl: int, repeat: int, intervals: list[float]) -> None:
    """What the client's event-loop lag ticker costs: an idle loop's wake-up, then our client
    with the ticker at each of ``intervals`` (ms), interleaved, against the emitter's 10 ms
    events (the client idles between two)."""
    out = subprocess.run(
        [sys.executable, __file__, "_wakeup"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    print(f"\nan idle uvloop loop's wake-up: {float(out.stdout.split()[-1]) * 1e6:.0f} us of CPU")
    runs: dict[float, list[float]] = {ms: [] for ms in intervals}
    saved = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory() as tmpdir:
        proc, base, _ = _start_emitter(Path(tmpdir), 1, 0.01)
        try:
            if len(saved) > 1:  # the emitter on the first CPU, the clients on the others
                os.sched_setaffinity(proc.pid, {min(saved)})
                os.sched_setaffinity(0, saved - {min(saved)})
            for round_index in range(repeat):
                order = intervals if round_index % 2 == 0 else list(reversed(intervals))
                for ms in order:
                    r = _run_client(f"ours-lag{ms:g}", base + "/v1/completions", streams, streams * 2, osl)
                    runs[ms].append(r["measured_cpu"] / r["tokens"] * 1e6)
                    print(f"  ticker {ms:g} ms: {runs[ms][-1]:.2f} CPU-s per M tokens", flush=True)
        finally:
            os.sched_setaffinity(0, saved)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    first = statistics.median(runs[intervals[0]])
    print(
        f"\n{streams} streams of {osl} one-token events every 10 ms; median (min-max) of {repeat} interleaved rounds\n"
    )
    print(f"| lag ticker | CPU-s per M tokens | vs {intervals[0]:g} ms |")
    print("|--:|--:|--:|")
    for ms in intervals:
        values = runs[ms]
        print(
            f"| {ms:g} ms | {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) | "
            f"{statistics.median(values) / first:.2f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter responses, fewer events (< 1.5 min)")
    p.add_argument("--streams", type=int, nargs="+", default=[64, 256])
    p.add_argument("--tokens-per-event", type=int, nargs="+", default=[1, 8])
    p.add_argument(
        "--tokens-per-request", type=int, default=None, help="output tokens per response (default 1024, --quick 256)"
    )
    p.add_argument(
        "--event-rate",
        type=float,
        default=10_000.0,
        help="SSE events per second the emitter sends, over all streams (default: %(default)g)",
    )
    p.add_argument(
        "--events",
        type=int,
        default=None,
        help="at least this many content events per measurement (default: 120k, --quick 25k)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure every client this many times, interleaved, and report the median (default: 1)",
    )
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument(
        "--workers-sweep",
        type=int,
        nargs="+",
        metavar="N",
        help="instead: tokens/s consumed with the load over each of these worker counts",
    )
    p.add_argument(
        "--sweep-event-rate",
        type=float,
        default=400_000.0,
        help="events/s the emitter is asked for in --workers-sweep (default: %(default)g)",
    )
    p.add_argument(
        "--pin-emitter",
        type=int,
        nargs="+",
        metavar="CPU",
        help="in --workers-sweep: one emitter process on each of these CPUs alone, all on one port "
        "(SO_REUSEPORT), and the clients on the other CPUs",
    )
    p.add_argument(
        "--wakeups",
        type=float,
        nargs="+",
        metavar="MS",
        help="instead: what the event-loop lag ticker costs, at each of these intervals in ms (e.g. 10 50)",
    )
    args = p.parse_args()
    events = args.events or (25_000 if args.quick else 120_000)
    if args.wakeups:
        wakeups(args.streams[-1], args.tokens_per_request or 1000, args.repeat, args.wakeups)
        return
    if args.workers_sweep:
        workers_sweep(
            args.workers_sweep,
            args.streams[-1],
            args.sweep_event_rate,
            args.tokens_per_request or (256 if args.quick else 1024),
            args.repeat,
            args.pin_emitter,
        )
        return
    osl = args.tokens_per_request or (256 if args.quick else 1024)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}, "
        f"Python {platform.python_version()}"
    )
    print(
        f"emitter: {args.event_rate:g} events/s in all, {osl} tokens per response, >= {events} events per measurement\n"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for streams in args.streams:
            for k in args.tokens_per_event:
                per_request = max(1, osl // k)  # content events per response
                rounds = max(1, round(events / per_request / streams))
                requests = streams * rounds
                tick = streams / args.event_rate  # each stream gets one event per tick
                proc, base, _ = _start_emitter(Path(tmpdir), k, tick)
                url = base + "/v1/completions"
                try:
                    res = {}
                    samples: dict[str, list[dict]] = {kind: [] for kind in KINDS}
                    for round_ in range(args.repeat):  # interleaved, so drifts of the machine hit every kind
                        # in turn forwards and backwards, so no kind always runs first (after the emitter's
                        # start) or always after the same other one
                        for kind in KINDS if round_ % 2 == 0 else KINDS[::-1]:
                            before = _get_stats(base)
                            r = _run_client(kind, url, streams, requests, per_request * k)
                            after = _get_stats(base)
                            r["sent_requests"] = after["requests"] - before["requests"]
                            r["sent_tokens"] = after["tokens"] - before["tokens"]
                            samples[kind].append(r)
                    for kind in KINDS:  # the median run by CPU
                        runs = sorted(samples[kind], key=lambda r: r["cpu"])
                        res[kind] = runs[len(runs) // 2]
                        res[kind]["cpu_all"] = [r["cpu"] / (r["sent_tokens"] / 1e6) for r in samples[kind]]
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=10)
                ours = res["ours"]
                row = {"streams": streams, "tokens_per_event": k, "requests": requests, "osl": per_request * k}
                for kind in KINDS:
                    r = res[kind]
                    row[kind] = {
                        "cpu_s": r["cpu"],
                        "wall_s": r["wall"],
                        "cpu_per_mtok_runs": r["cpu_all"],
                        "cpu_per_mtok": r["cpu"] / (r["sent_tokens"] / 1e6),
                        "cpu_per_kreq": r["cpu"] / (r["sent_requests"] / 1e3),
                        "requests": r["requests"],
                        "sent_requests": r["sent_requests"],
                        "sent_tokens": r["sent_tokens"],
                    }
                row["ours"].update(
                    tokens=ours["tokens"],
                    chunk_tokens=ours["chunk_tokens"],
                    client_bound=ours["client_bound"],
                    reason=ours["reason"],
                    loop_lag_p99_ms=ours["loop_lag_p99_ms"],
                    errors=ours["errors"],
                )
                row["ratio"] = row["ours"]["cpu_per_mtok"] / row["floor"]["cpu_per_mtok"]
                row["ratio_peer"] = row["ours"]["cpu_per_mtok"] / row["peer"]["cpu_per_mtok"]
                row["ratio_protocol"] = row["ours"]["cpu_per_mtok"] / row["protocol-floor"]["cpu_per_mtok"]
                row["counts_match"] = (
                    all(res[kind]["requests"] == res[kind]["sent_requests"] == requests for kind in KINDS)
                    and ours["tokens"] == ours["chunk_tokens"] == ours["sent_tokens"] == requests * per_request * k
                    and res["ours-asyncio"]["tokens"] == res["ours-asyncio"]["sent_tokens"]
                    and res["ours-python-wire"]["tokens"] == res["ours-python-wire"]["sent_tokens"]
                    and res["ours-framing"]["tokens"] == res["ours-framing"]["sent_tokens"]
                )
                rows.append(row)
                print(
                    f"  streams={streams} tokens/event={k}, CPU-s/Mtok of each run: "
                    + "; ".join(f"{kind} " + " ".join(f"{x:.1f}" for x in res[kind]["cpu_all"]) for kind in KINDS),
                    flush=True,
                )

    print()
    header = (
        "streams",
        "tok/event",
        "ours CPU-s/Mtok",
        "ours, events in Python",
        "ours without C lane",
        "ours on asyncio loop",
        "peer (vLLM-style)",
        "ours/peer",
        "floor (aiohttp)",
        "ours/floor",
        "protocol floor",
        "ours/protocol floor",
        "ours CPU-s/1k req",
        "requests (counted/sent)",
        "tokens (counted/sent)",
        "ours CPU %",
        "client-bound",
    )
    lines = []
    for r in rows:
        o = r["ours"]
        lines.append(
            (
                str(r["streams"]),
                str(r["tokens_per_event"]),
                f"{o['cpu_per_mtok']:.1f}",
                f"{r['ours-framing']['cpu_per_mtok']:.1f}",
                f"{r['ours-python-wire']['cpu_per_mtok']:.1f}",
                f"{r['ours-asyncio']['cpu_per_mtok']:.1f}",
                f"{r['peer']['cpu_per_mtok']:.1f}",
                f"{r['ratio_peer']:.2f}",
                f"{r['floor']['cpu_per_mtok']:.1f}",
                f"{r['ratio']:.2f}",
                f"{r['protocol-floor']['cpu_per_mtok']:.1f}",
                f"{r['ratio_protocol']:.2f}",
                f"{o['cpu_per_kreq']:.2f}",
                f"{o['requests']}/{o['sent_requests']}",
                f"{o['tokens']}/{o['sent_tokens']}",
                f"{100 * o['cpu_s'] / o['wall_s']:.0f}%",
                "yes" if o["client_bound"] else "no",
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(line, widths)) + " |")
    bad = [r for r in rows if not r["counts_match"]]
    for r in rows:
        if r["ours"]["client_bound"]:
            print(f"  streams={r['streams']} tok/event={r['tokens_per_event']}: {r['ours']['reason']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if bad:
        print(f"\nCOUNT MISMATCH in {len(bad)} row(s): {json.dumps(bad, indent=1)}")
        raise SystemExit(1)
    print("\nevery request and token the emitter sent was counted (ours: usage and per-chunk sums agree)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_emit":
        serve(Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 0)
    elif len(sys.argv) > 1 and sys.argv[1] == "_wakeup":
        print(_idle_wakeup_cpu())
    elif len(sys.argv) > 1 and sys.argv[1] == "_client":
        sys.path.insert(0, str(REPO))
        kind, rest = sys.argv[2], (sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        if kind == "ours":
            out = client_ours(*rest)
        elif kind.startswith("ours-lag"):  # the event-loop lag ticker at another interval (--wakeups)
            from pytest_infmax.load import clientstats

            clientstats.LoopLagMonitor.__init__.__defaults__ = (float(kind[len("ours-lag") :]) / 1000,)
            out = client_ours(*rest)
        elif kind.startswith("ours-w"):
            out = client_ours(*rest, workers=int(kind[len("ours-w") :]))
        elif kind == "ours-python-wire":
            out = client_ours(*rest, wire="python")
        elif kind == "ours-framing":
            out = client_ours(*rest, wire="framing")
        elif kind == "ours-asyncio":
            out = client_ours(*rest, loop="asyncio")
        elif kind == "floor":
            out = client_floor(*rest)
        elif kind == "peer":
            out = client_peer(*rest)
        else:
            out = client_protocol_floor(*rest)
        print(json.dumps(out))
    else:
        main()

"""How wrong are the client's timestamps? Measured against the server's own, and the wire.

Two truths, side by side:

* the simulator's trace (``/sim/trace``, ``time.monotonic()``): when it wrote every
  chunk of every request, and when each request arrived: when its first bytes were
  handed to aiohttp's ``data_received`` (``arrival_mono``; the handler start, later by
  the server's front-end queue, is ``handler_mono``). The load generator stamps on
  ``time.perf_counter()``; on Linux both read CLOCK_MONOTONIC, so they compare
  directly. This truth is as late as the simulator's own loop: a request whose bytes
  wait in the socket while the loop writes chunks for everyone else arrives late;
* the wire (``_wire_capture.py``, on by default when the benchmark may open a packet
  socket: root or CAP_NET_RAW): every loopback packet to or from the simulator with
  its kernel timestamp, taken inside the sender's write syscall, converted from
  CLOCK_REALTIME to CLOCK_MONOTONIC with offsets sampled every 50 ms during the run.
  Independent of both programs' event loops. A capture that lost a packet is not used.

For each stream count (64 and 256 by default) the simulator runs through the
project's own launcher, the client warms ``streams`` connections with a warm-up
round, then streams ``--rounds`` rounds of requests; every record is matched to
its trace and to its request on the wire by the sha256 of the body it sent.
Reported, in milliseconds:

* chunk stamp error: every chunk, client stamp − server write (or − its packet);
* ITL error: each client inter-chunk gap − the server's (or the wire's) gap;
* first-token stamp error: client first-token stamp − first chunk written (or its packet);
* send stamp error (wire): client send stamp − the request's first packet;
* TTFT error: client TTFT − TTFT by the truth (trace: arrival → first chunk write;
  wire: request packet → first content event's packet);
* request trip: server arrival − client send; server front-end queue: handler
  start − arrival; server read lag (wire): arrival − request packet: how long the
  bytes sat in the server's socket before its loop read them.

    .venv/bin/python benchmarks/timing_truth.py             # 64 and 256 streams, ~1.5 min on 2 cores
    .venv/bin/python benchmarks/timing_truth.py --no-wire   # the simulator's trace only
    .venv/bin/python benchmarks/timing_truth.py --workers 2 # the same over two load processes
    .venv/bin/python benchmarks/timing_truth.py --repeat 3  # 3 interleaved runs: median [min-max]

With ``--repeat N`` the stream counts are interleaved (64, 256, 64, 256, ...), each run
a fresh simulator, and a last table gives each figure's median over the runs with its
range; the load average at each run's start is printed beside it.

By default the server gets the first CPU and the client the others (``--no-pin``
lets the OS place them): on a 2-core machine the kernel otherwise wakes the
client on the core the server is busy writing from, and every stamp waits for
the server's burst, an artefact of sharing a core, not of the client. The capture
runs unpinned at SCHED_IDLE (``--wire-cpus`` pins it) and lets the kernel buffer.

Goal (issue #7): p99 ≤ 1 ms for chunk and ITL errors; TTFT error p50 ≤ 1 ms, p99 ≤ 5 ms.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pytest_infmax.load.generator import LoadGenerator, encode_body, run_coroutine  # noqa: E402
from pytest_infmax.load.plan import LoadConfig  # noqa: E402
from pytest_infmax.load.scenarios import Scenario, plan_request  # noqa: E402
from pytest_infmax.servers.launch import ServerConfig, running_server  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _wire_capture  # noqa: E402
from _affinity import pin_tree  # noqa: E402


def _same_clock() -> bool:
    mono, perf = time.get_clock_info("monotonic"), time.get_clock_info("perf_counter")
    return sys.platform == "linux" and mono.implementation == perf.implementation


def _pcts(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000.0
    return {
        "n": int(a.size),
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "min": float(a.min()),
    }


class WireCapture:
    """``_wire_capture.py`` in a process of its own, for the length of a run."""

    def __init__(self, port: int, out: Path, cpus: list[int] | None) -> None:
        self.port, self.out = port, out
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("_wire_capture.py")),
            "--port",
            str(port),
            "--out",
            str(out),
        ]
        if cpus:
            cmd += ["--cpus", *map(str, cpus)]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if line != "ready":
            self.process.wait(10)
            raise RuntimeError(line or f"wire capture exited with status {self.process.returncode}")

    def stop(self) -> dict:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=120)
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wire_available() -> str | None:
    """None when a packet socket on lo can be opened, else why not."""
    try:
        _wire_capture.open_socket(1).close()
    except PermissionError as exc:
        return f"no CAP_NET_RAW ({exc}); run as root for the wire-level truth"
    except OSError as exc:
        return f"cannot open a packet socket on lo ({exc})"
    return None


def measure(
    streams: int,
    rounds: int,
    osl: int,
    step_ms: float,
    workers: int,
    pin: bool,
    range_ratio: float,
    wire: bool,
    wire_cpus: list[int] | None,
    sse_writer: str = "fast",
) -> dict:
    scenario = Scenario("truth", 64, osl, range_ratio=range_ratio)
    sim_args = (
        "--decode-step-ms",
        f"{step_ms:g}",
        "--max-num-seqs",
        str(max(256, streams)),
        "--trace-capacity",
        str(streams * (rounds + 2) + 16),
        "--sse-writer",
        sse_writer,
    )
    config = LoadConfig(
        scenario,
        concurrency=streams,
        num_requests=streams * rounds,
        warmup=streams,
        request_timeout=120,
        workers=workers,
    )
    wire_stats: dict | None = None
    wire_requests: dict[str, _wire_capture.WireRequest] = {}
    wire_info: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        with running_server(ServerConfig(sim_args=sim_args), Path(tmp)) as server:
            port = int(server.base_url.rsplit(":", 1)[1])
            everywhere = os.sched_getaffinity(0)
            if pin:  # the server on the first CPU: the launcher's supervisor, the simulator, their threads
                assert server.process is not None
                pin_tree(server.process.pid, {0})
            # the capture before the client pins itself: it inherits every CPU (or --wire-cpus)
            capture = WireCapture(port, Path(tmp) / "wire.bin", wire_cpus) if wire else None
            if pin:  # the client on the others: they never share a core
                os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
            try:
                run = run_coroutine(LoadGenerator(server.base_url, server.model).run(config))
            finally:
                os.sched_setaffinity(0, everywhere)  # the next run's simulator starts from every CPU
                if capture is not None:
                    try:
                        wire_stats = capture.stop()
                    finally:
                        capture.kill()
            with urllib.request.urlopen(f"{server.base_url}/sim/trace", timeout=30) as resp:
                trace = {t["body_sha256"]: t for t in json.loads(resp.read())["requests"]}
            model = server.model
        if capture is not None:
            found, wire_info = _wire_capture.reassemble(capture.out, port)
            wire_requests = {w.body_sha256: w for w in found if w.method == "POST"}
    sim: dict[str, list[float]] = {k: [] for k in ("first", "ttft", "trip", "queue", "chunk", "itl")}
    wr: dict[str, list[float]] = {
        k: []
        for k in ("send", "first", "ttft", "chunk", "itl", "read_lag", "queue", "server_ttft_vs_wire", "server_write")
    }
    unmatched = unmatched_wire = 0
    for rec in run.records:
        if rec.warmup or not rec.ok:
            continue
        body = encode_body(plan_request(scenario, rec.index, config.seed), model, config)
        sha = hashlib.sha256(body).hexdigest()
        truth = trace.get(sha)
        if truth is None or len(truth["chunk_mono"]) != len(rec.chunk_times):
            unmatched += 1
            continue
        server_chunks = truth["chunk_mono"]
        client_chunks = rec.chunk_times
        arrival, handler = truth["arrival_mono"], truth["handler_mono"]
        sim["first"].append(client_chunks[0] - server_chunks[0])
        sim["ttft"].append((client_chunks[0] - rec.send_time) - (server_chunks[0] - arrival))
        sim["trip"].append(arrival - rec.send_time)
        sim["queue"].append(handler - arrival)
        sim["chunk"] += [c - s for c, s in zip(client_chunks, server_chunks)]
        sim["itl"] += [
            (c1 - c0) - (s1 - s0)
            for c0, c1, s0, s1 in zip(client_chunks, client_chunks[1:], server_chunks, server_chunks[1:])
        ]
        if not wire:
            continue
        w = wire_requests.get(sha)
        if w is None or len(w.event_times) != len(client_chunks):
            unmatched_wire += 1
            continue
        events = w.event_times
        wr["send"].append(rec.send_time - w.time)
        wr["first"].append(client_chunks[0] - events[0])
        wr["ttft"].append((client_chunks[0] - rec.send_time) - (events[0] - w.time))
        wr["chunk"] += [c - e for c, e in zip(client_chunks, events)]
        wr["itl"] += [
            (c1 - c0) - (e1 - e0) for c0, c1, e0, e1 in zip(client_chunks, client_chunks[1:], events, events[1:])
        ]
        wr["read_lag"].append(arrival - w.time)
        wr["queue"].append(handler - w.time)
        wr["server_ttft_vs_wire"].append((server_chunks[0] - arrival) - (events[0] - w.time))
        wr["server_write"] += [s - e for s, e in zip(server_chunks, events)]
    client = run.client.to_dict() if run.client else {}
    row = {
        "streams": streams,
        "workers": workers,
        "requests": len(sim["first"]),
        "unmatched": unmatched,
        "errors": sum(1 for r in run.records if not r.ok),
        "sim": {k: _pcts(v) for k, v in sim.items()},
        "loop_lag_p99_ms": client.get("loop_lag", {}).get("p99_ms"),
        "client_bound": client.get("client_bound"),
        "cpu_utilisation": client.get("cpu_utilisation"),
    }
    if wire:
        row["wire"] = {k: _pcts(v) for k, v in wr.items()} if wr["send"] else None
        row["wire_matched"] = len(wr["send"])
        row["wire_unmatched"] = unmatched_wire
        row["capture"] = {**(wire_stats or {}), **wire_info}
    return row


def _cell(stats: dict) -> str:
    return f"{stats['p50']:.3f} / {stats['p99']:.3f} / {stats['max']:.2f}" if stats["n"] else "-"


def _spread(values: list[float], digits: int) -> str:
    """median [min-max] of one figure over the runs."""
    return f"{np.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def _print_medians(rows: list[dict], streams: list[int], wire: bool) -> None:
    """Each figure's p50 and p99, median [min-max] over the runs of each stream count."""
    truth, keys = (
        ("wire", ("chunk", "itl", "first", "ttft", "read_lag"))
        if wire
        else ("sim", ("chunk", "itl", "first", "ttft", "trip"))
    )
    names = {
        "chunk": "chunk stamp error",
        "itl": "ITL error",
        "first": "first-token stamp error",
        "ttft": "TTFT error",
        "read_lag": "server read lag (arrival - wire)",
        "trip": "request trip (send to server arrival)",
    }
    runs = max(r["run"] for r in rows)
    against = "the wire" if wire else "the simulator's trace"
    print(f"\nAgainst {against}, median [min-max] of {runs} interleaved runs, ms p50 / p99:\n")
    print("| streams | " + " | ".join(names[k] for k in keys) + " | load average |")
    print("|--:|" + "--|" * len(keys) + "--:|")
    for n in streams:
        mine = [r for r in rows if r["streams"] == n and r.get(truth)]
        cells = [" / ".join(_spread([r[truth][k][q] for r in mine], 3) for q in ("p50", "p99")) for k in keys]
        load = _spread([r["load_average"] for r in mine], 1)
        print(f"| {n} | " + " | ".join(cells) + f" | {load} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, nargs="+", default=[64, 256])
    p.add_argument("--rounds", type=int, default=3, help="measured requests per stream (default: %(default)s)")
    p.add_argument("--osl", type=int, default=256, help="output tokens per request (default: %(default)s)")
    p.add_argument(
        "--range-ratio",
        type=float,
        default=0.8,
        help="lengths uniform in [ratio*L, L], as InferenceMAX (default: %(default)s); 1.0 puts "
        "every stream in lock-step, the client's worst case",
    )
    p.add_argument(
        "--decode-step-ms",
        type=float,
        default=25.0,
        help="the simulator's decode step: one chunk per stream per step (default: %(default)g)",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of every stream count, interleaved (64, 256, 64, 256, ...); with more than one, "
        "a last table gives each figure's median [min-max] over the runs (default: %(default)s)",
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="let the OS place server and client (by default they get CPUs of their own)",
    )
    p.add_argument("--no-wire", action="store_true", help="no packet capture: only the simulator's own trace as truth")
    p.add_argument(
        "--wire-cpus", type=int, nargs="*", help="pin the capture process (default: unpinned, at SCHED_IDLE)"
    )
    p.add_argument(
        "--sim-wire",
        choices=("fast", "aiohttp"),
        default="fast",
        help="the simulator's stream writer (its --sse-writer; default: %(default)s)",
    )
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    if not _same_clock():
        raise SystemExit("this benchmark compares time.monotonic() and time.perf_counter(): Linux only")
    wire = not args.no_wire
    if wire:
        why = wire_available()
        if why is not None:
            print(f"wire-level truth: OFF: {why}; only the simulator's trace is used", flush=True)
            wire = False
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"event loop: {os.environ.get('INFMAX_EVENT_LOOP', 'uvloop')}, workers: {args.workers}, "
        f"wire capture: {'on' if wire else 'off'}, simulator's stream writer: {args.sim_wire}"
    )
    if args.repeat < 1:
        raise SystemExit(f"--repeat must be at least 1, got {args.repeat}")
    rows = []
    for run, streams in [(run, s) for run in range(1, args.repeat + 1) for s in args.streams]:
        load = os.getloadavg()[0]
        row = measure(
            streams,
            args.rounds,
            args.osl,
            args.decode_step_ms,
            args.workers,
            pin=not args.no_pin and (os.cpu_count() or 1) >= 2,
            range_ratio=args.range_ratio,
            wire=wire,
            wire_cpus=args.wire_cpus,
            sse_writer=args.sim_wire,
        )
        row["run"], row["load_average"] = run, load
        rows.append(row)
        print(
            f"  run {run}, streams={streams} (load average {load:.1f}): {row['requests']} requests matched to the trace ({row['unmatched']} "
            f"unmatched, {row['errors']} errors); client loop lag p99 {row['loop_lag_p99_ms']:.2f} ms, "
            f"CPU {row['cpu_utilisation']:.0%}",
            flush=True,
        )
        if wire:
            cap = row["capture"]
            print(
                f"    wire: {row['wire_matched']} requests matched ({row['wire_unmatched']} unmatched); "
                f"{cap.get('packets')} packets, kernel dropped {cap.get('kernel_dropped')}, "
                f"realtime-monotonic offset moved {cap.get('clock_offset_spread_us', 0):.1f} us over "
                f"{cap.get('clock_samples')} samples",
                flush=True,
            )
            if cap.get("kernel_dropped") or cap.get("no_timestamp"):
                print("    wire: the capture LOST packets: its numbers below are not used", flush=True)
                row["wire"] = None
    print(
        "\nAgainst the simulator's trace (its write stamps; arrival = the request's first bytes in "
        "data_received), ms p50 / p99 / max:\n"
    )
    print(
        "| run | streams | chunk stamp error | ITL error | first-token stamp error | TTFT error | "
        "request trip (send to server arrival) | server front-end queue (handler start - arrival) |"
    )
    print("|--:|--:|--|--|--|--|--|--|")
    for r in rows:
        print(
            f"| {r['run']} | {r['streams']} | "
            + " | ".join(_cell(r["sim"][k]) for k in ("chunk", "itl", "first", "ttft", "trip", "queue"))
            + " |"
        )
    wired = [r for r in rows if r.get("wire")]
    if wired:
        print("\nAgainst the wire (kernel timestamps of the loopback packets), ms p50 / p99 / max:\n")
        print(
            "| run | streams | chunk stamp error | ITL error | first-token stamp error | send stamp error | "
            "TTFT error | server read lag (arrival - wire) | handler start - wire |"
        )
        print("|--:|--:|--|--|--|--|--|--|--|")
        for r in wired:
            print(
                f"| {r['run']} | {r['streams']} | "
                + " | ".join(
                    _cell(r["wire"][k]) for k in ("chunk", "itl", "first", "send", "ttft", "read_lag", "queue")
                )
                + " |"
            )
        print(
            "\n(server write stamp - wire, every chunk: "
            + ", ".join(f"run {r['run']} {r['streams']}: {_cell(r['wire']['server_write'])}" for r in wired)
            + ")"
        )
    if args.repeat > 1:
        _print_medians(rows, args.streams, wire=bool(wired) and len(wired) == len(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))

    def met(r: dict, truth: str) -> bool:
        t = r[truth]
        return (
            t["chunk"]["p99"] <= 1.0 and t["itl"]["p99"] <= 1.0 and t["ttft"]["p50"] <= 1.0 and t["ttft"]["p99"] <= 5.0
        )

    goal = "chunk and ITL error p99 <= 1 ms, TTFT error p50 <= 1 ms and p99 <= 5 ms"
    print(f"\ngoal ({goal}) against the simulator's trace: {'met' if all(met(r, 'sim') for r in rows) else 'NOT met'}")
    if wired:
        print(
            f"goal against the wire: {'met' if all(met(r, 'wire') for r in wired) else 'NOT met'}"
            + ("" if len(wired) == len(rows) else " (not every row had a usable capture)")
        )


if __name__ == "__main__":
    main()

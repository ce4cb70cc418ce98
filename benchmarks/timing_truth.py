"""How wrong are the client's timestamps? Measured against the server's own.

The simulator records when it wrote every chunk of every request (``/sim/trace``,
``time.monotonic()``); the load generator stamps each chunk when its bytes reach
the process (``time.perf_counter()``). On Linux both read CLOCK_MONOTONIC, so the
two are directly comparable: their difference is loopback transfer plus however
late the client's event loop got to the bytes, which is exactly the error a
client adds to every latency it reports.

For each stream count (64 and 256 by default) the simulator runs through the
project's own launcher, the client warms ``streams`` connections with a warm-up
round, then streams ``--rounds`` rounds of requests; every record is matched to
its trace by the sha256 of the body it sent. Reported, in milliseconds:

* first-token stamp error: client first-token stamp − server first-chunk write;
* request trip: server handler start − client write: loopback plus the server's
  own HTTP ingest queue (the simulator parses requests on one Python loop, so
  hundreds sent at once wait there: the server's delay, not the client's);
* TTFT error: client TTFT − server TTFT (handler start → first chunk) = request
  trip + first-token stamp error;
* chunk stamp error: every chunk, client stamp − server write;
* ITL error: each client inter-chunk gap − the server's gap.

    .venv/bin/python benchmarks/timing_truth.py             # 64 and 256 streams, ~1 min on 2 cores
    .venv/bin/python benchmarks/timing_truth.py --workers 2 # the same over two load processes

By default the server gets the first CPU and the client the others (``--no-pin``
lets the OS place them): on a 2-core machine the kernel otherwise wakes the
client on the core the server is busy writing from, and every stamp waits for
the server's burst, an artefact of sharing a core, not of the client.

Goal (issue #7): p99 ≤ 1 ms for chunk and ITL errors; TTFT error p50 ≤ 1 ms, p99 ≤ 5 ms.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pytest_infmax.load import LoadConfig, LoadGenerator, encode_body, run_coroutine  # noqa: E402
from pytest_infmax.scenarios import Scenario, plan_request  # noqa: E402
from pytest_infmax.servers import ServerConfig, running_server  # noqa: E402


def _same_clock() -> bool:
    mono, perf = time.get_clock_info("monotonic"), time.get_clock_info("perf_counter")
    return sys.platform == "linux" and mono.implementation == perf.implementation


def _pcts(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000.0
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max()), "min": float(a.min())}


def _pin(pid: int, cpus: set[int]) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(pid, cpus)


def measure(streams: int, rounds: int, osl: int, step_ms: float, workers: int, pin: bool,
            range_ratio: float) -> dict:
    scenario = Scenario("truth", 64, osl, range_ratio=range_ratio)
    sim_args = ("--decode-step-ms", f"{step_ms:g}", "--max-num-seqs", str(max(256, streams)),
                "--trace-capacity", str(streams * (rounds + 2) + 16))
    config = LoadConfig(scenario, concurrency=streams, num_requests=streams * rounds, warmup=streams,
                        request_timeout=120, workers=workers)
    with tempfile.TemporaryDirectory() as tmp:
        with running_server(ServerConfig(sim_args=sim_args), Path(tmp)) as server:
            if pin:  # the server on the first CPU, the client on the others: they never share a core
                assert server.process is not None
                _pin(server.process.pid, {0})
                _pin(0, set(range(1, os.cpu_count() or 2)))
            run = run_coroutine(LoadGenerator(server.base_url, server.model).run(config))
            with urllib.request.urlopen(f"{server.base_url}/sim/trace", timeout=30) as resp:
                trace = {t["body_sha256"]: t for t in json.loads(resp.read())["requests"]}
            model = server.model
    first, ttft, trip, chunk, itl = [], [], [], [], []
    unmatched = 0
    for rec in run.records:
        if rec.warmup or not rec.ok:
            continue
        body = encode_body(plan_request(scenario, rec.index, config.seed), model, config)
        truth = trace.get(hashlib.sha256(body).hexdigest())
        if truth is None or len(truth["chunk_mono"]) != len(rec.chunk_times):
            unmatched += 1
            continue
        server_chunks = truth["chunk_mono"]
        first.append(rec.chunk_times[0] - server_chunks[0])
        ttft.append((rec.chunk_times[0] - rec.send_time) - (server_chunks[0] - truth["arrival_mono"]))
        trip.append(truth["arrival_mono"] - rec.send_time)
        chunk += [c - s for c, s in zip(rec.chunk_times, server_chunks)]
        itl += [(c1 - c0) - (s1 - s0) for c0, c1, s0, s1 in
                zip(rec.chunk_times, rec.chunk_times[1:], server_chunks, server_chunks[1:])]
    client = run.client.to_dict() if run.client else {}
    return {
        "streams": streams, "workers": workers, "requests": len(first), "unmatched": unmatched,
        "errors": sum(1 for r in run.records if not r.ok),
        "first_token": _pcts(first), "ttft": _pcts(ttft), "trip": _pcts(trip), "chunk": _pcts(chunk), "itl": _pcts(itl),
        "loop_lag_p99_ms": client.get("loop_lag", {}).get("p99_ms"), "client_bound": client.get("client_bound"),
        "cpu_utilisation": client.get("cpu_utilisation"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, nargs="+", default=[64, 256])
    p.add_argument("--rounds", type=int, default=3, help="measured requests per stream (default: %(default)s)")
    p.add_argument("--osl", type=int, default=256, help="output tokens per request (default: %(default)s)")
    p.add_argument("--range-ratio", type=float, default=0.8,
                   help="lengths uniform in [ratio*L, L], as InferenceMAX (default: %(default)s); 1.0 puts "
                        "every stream in lock-step, the client's worst case")
    p.add_argument("--decode-step-ms", type=float, default=25.0,
                   help="the simulator's decode step: one chunk per stream per step (default: %(default)g)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-pin", action="store_true",
                   help="let the OS place server and client (by default they get CPUs of their own)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    if not _same_clock():
        raise SystemExit("this benchmark compares time.monotonic() and time.perf_counter(): Linux only")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"event loop: {os.environ.get('INFMAX_EVENT_LOOP', 'uvloop')}, workers: {args.workers}")
    rows = []
    for streams in args.streams:
        row = measure(streams, args.rounds, args.osl, args.decode_step_ms, args.workers,
                      pin=not args.no_pin and (os.cpu_count() or 1) >= 2, range_ratio=args.range_ratio)
        rows.append(row)
        print(f"  streams={streams}: {row['requests']} requests matched ({row['unmatched']} unmatched, "
              f"{row['errors']} errors); client loop lag p99 {row['loop_lag_p99_ms']:.2f} ms, "
              f"CPU {row['cpu_utilisation']:.0%}", flush=True)
    print()
    print("| streams | chunk stamp error | ITL error | first-token stamp error | request trip "
          "(send to server handler) | TTFT error (trip + first-token stamp) |")
    print("|---|---|---|---|---|---|")
    print("| | p50 / p99 / max ms | | | | |")
    for r in rows:
        cells = [f"{r[k]['p50']:.3f} / {r[k]['p99']:.3f} / {r[k]['max']:.2f}"
                 for k in ("chunk", "itl", "first_token", "trip", "ttft")]
        print(f"| {r['streams']} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    ok = all(r["chunk"]["p99"] <= 1.0 and r["itl"]["p99"] <= 1.0 and r["ttft"]["p50"] <= 1.0
             and r["ttft"]["p99"] <= 5.0 for r in rows)
    print(f"\ngoal (chunk and ITL error p99 <= 1 ms, TTFT error p50 <= 1 ms and p99 <= 5 ms): "
          f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()

"""Does the simulator keep its own schedule under load? Its two stream writers side by side.

For each stream count (``--concurrency``, several allowed) and each stream writer
(``--sim-wire``: the simulator's ``--sse-writer``, ``fast`` or ``aiohttp``), starts the
simulator (``python -m pytest_infmax.sim`` with the flags after ``--``), keeps that many
streaming completions in flight with the project's own load generator until
``--requests-per-stream`` x streams have finished after a warm-up round that opens the
connections (the engine's figures include both), and reports:

* the engine's step lateness (``GET /sim/stats`` -> ``lateness_ms``: when a step's tokens
  were handed out minus its deadline), p50 / p99 / max;
* write lateness (``write_lateness_ms``): each content event's write stamp minus the end
  of the step that produced its tokens, p50 / p99 / max: the schedule as the wire sees it;
* first-event write lateness (``first_write_lateness_ms``): the same for each stream's first
  content event alone, p50 / p99: what the front end adds to the time to first token, client
  and trace alike, after the model's first token;
* TTFT error against the simulator's own trace, per request: the client's TTFT (first
  content event received - request sent) minus the trace's (first content write -
  arrival, the request's first bytes in ``data_received``). The client stamps on
  ``time.perf_counter()``, the trace on ``time.monotonic()``: on Linux both are
  CLOCK_MONOTONIC. It holds the server's read lag (bytes waiting in its socket while its
  loop writes everyone else's events) and the client's own delay;
* send to arrival: the request's trip from the client's send stamp to the simulator's
  arrival stamp (the loop's poll that found its first bytes readable: its read lag, mostly);
* front-end queue: the trace's handler start minus its arrival (the request read, parsed
  and waiting for the loop); inside the trace's TTFT, so not in the TTFT error;
* other work on the simulator's core: the share of the run's wall time that its CPU (the
  first, when pinned) spent on anything but the simulator (other processes, interrupts).
  The trip is the figure it moves: a single CPU-bound process there took the send to
  arrival p50 from 0.7 to 9 ms at 256 streams (docs/calibration.md, "The request's trip");
* chunk error: every content event, client stamp - the trace's write stamp;
* the simulator's garbage collector (``collector`` in ``/sim/stats``, from its start):
  its full collections and its longest pause, a stall of every stream (pytest_infmax/collector.py);
* the simulator's CPU seconds over the run, and per content (SSE) event written, split
  into user and kernel time (the kernel's part is mostly the loopback TCP send of each
  event): the machine-independent cost of its front end.

``--runs`` rounds are interleaved (every writer at every stream count in each round, the
writer order alternating) and the table gives the median of the rounds with their spread
[min-max], next to the load average. The client shares the machine: on 2 cores at 1,000
streams it is itself a bottleneck (its CPU is printed), so the CPU per event is the figure
to compare across machines. ``--against DIR`` adds, for every writer, the simulator of another
checkout of the project (e.g. ``git archive`` of an earlier commit), interleaved with ours.

    .venv/bin/python benchmarks/lateness.py --concurrency 256 1000 --runs 3 -- --profile b200/gpt-oss-120b
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pytest_infmax.load.generator import LoadGenerator, encode_body, run_coroutine  # noqa: E402
from pytest_infmax.load.plan import LoadConfig  # noqa: E402
from pytest_infmax.load.scenarios import Scenario, plan_request  # noqa: E402
from pytest_infmax.sim import FRONT_ENDS, SSE_WRITERS  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from _affinity import pin_tree  # noqa: E402
from _figures import split_simulator_flags, spread_cell, tree_env  # noqa: E402

MODEL = "sim-model"


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _cpu_busy_seconds(cpu: int) -> float:
    """Seconds CPU ``cpu`` was busy (not idle, not waiting for I/O) since boot."""
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] == f"cpu{cpu}":
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
            return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return float("nan")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def _check_tree_runs(tree: Path) -> None:
    """``python -m pytest_infmax.sim`` started as ``measure`` starts it imports ``tree``'s code: a
    side-by-side that ran one tree twice compared nothing (it did, until 2026-12-07)."""
    probe = "import pytest_infmax.sim, sys; sys.stdout.write(pytest_infmax.sim.__file__)"
    imported = subprocess.run(
        [sys.executable, "-c", probe], cwd=tree, env=tree_env(tree), capture_output=True, text=True, timeout=60
    ).stdout
    if not Path(imported).resolve().is_relative_to(tree):
        raise SystemExit(f"--against {tree}: its simulator would import {imported or 'nothing'}, not its own code")


def measure(streams: int, variant: str, args: argparse.Namespace, sim_args: list[str]) -> dict[str, Any]:
    """One simulator start, one run; its numbers. ``variant``: "WRITER/FRONT-END", with " (DIR)"
    after it for the simulator of ``--against``'s checkout."""
    tree = args.against if variant.endswith(")") else REPO
    writer, front_end = variant.split(" ")[0].split("/")
    requests = args.requests_per_stream * streams
    scenario = Scenario("lateness", args.isl, args.osl, range_ratio=args.range_ratio)
    # a warm-up round opens the connections (their TCP handshakes are not the front end's lag)
    config = LoadConfig(scenario, concurrency=streams, num_requests=requests, warmup=streams, request_timeout=600)
    extra = [] if "--max-num-seqs" in sim_args else ["--max-num-seqs", str(max(256, streams))]
    # every request's trace, the warm-up's too: the simulator's CPU below is the whole run's
    traced = requests + config.warmup + 16
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        port_file = Path(workdir) / "port"
        env = tree_env(tree)
        command = [
            sys.executable, "-m", "pytest_infmax.sim", "--port", "0", "--port-file", str(port_file),
            "--model", MODEL, "--sse-writer", writer, "--front-end", front_end, "--trace-capacity", str(traced), *extra, *sim_args,
        ]  # fmt: skip
        # cwd too: ``python -m`` puts the working directory first on sys.path, before PYTHONPATH
        server = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"simulator did not start: {server.stderr.read().decode() if server.stderr else ''}"
                    )
                time.sleep(0.02)
            url = f"http://127.0.0.1:{int(port_file.read_text())}"
            if args.pin:  # the simulator on the first CPU, the client on the others: never one core
                pin_tree(server.pid, {0})  # its threads too
                os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
            cpu_before, started, client_before = _cpu_seconds(server.pid), time.monotonic(), time.process_time()
            core_before = _cpu_busy_seconds(0) if args.pin else float("nan")
            run = run_coroutine(LoadGenerator(url, MODEL).run(config))
            wall = time.monotonic() - started
            cpu_after = _cpu_seconds(server.pid)
            server_user, server_sys = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
            server_cpu = server_user + server_sys
            # what else ran on the simulator's core: its busy time less the simulator's own
            others = (_cpu_busy_seconds(0) - core_before - server_cpu) / wall if args.pin else float("nan")
            client_cpu = time.process_time() - client_before
            stats = _get(f"{url}/sim/stats")
            traces = _get(f"{url}/sim/trace")
        finally:
            server.terminate()
            server.wait(timeout=30)
            if args.pin:
                os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    if traces["dropped"]:  # the events counted would be fewer than the CPU measured was spent on
        raise SystemExit(f"the simulator's trace dropped {traces['dropped']} of its requests (capacity {traced})")
    trace = {t["body_sha256"]: t for t in traces["requests"]}
    ttft_error: list[float] = []
    trip: list[float] = []
    queue: list[float] = []
    chunk_error: list[float] = []
    events = sum(len(truth["chunk_mono"]) for truth in traces["requests"])
    for rec in run.records:
        if not rec.ok or rec.warmup:
            continue
        body = encode_body(plan_request(scenario, rec.index, config.seed), MODEL, config)
        truth = trace.get(hashlib.sha256(body).hexdigest())
        if truth is None or len(truth["chunk_mono"]) != len(rec.chunk_times):
            continue
        server_chunks = truth["chunk_mono"]
        ttft_error.append((rec.chunk_times[0] - rec.send_time) - (server_chunks[0] - truth["arrival_mono"]))
        trip.append(truth["arrival_mono"] - rec.send_time)
        if truth.get("handler_mono") is not None:
            queue.append(truth["handler_mono"] - truth["arrival_mono"])
        chunk_error += [c - s for c, s in zip(rec.chunk_times, server_chunks)]
    lateness, writes = stats["lateness_ms"], stats["write_lateness_ms"]
    collector = stats.get("collector")  # None from a checkout before the simulator watched its collector
    nan = float("nan")
    firsts = stats.get("first_write_lateness_ms") or {"p50": nan, "p99": nan}  # (a checkout before it)
    return {
        "streams": streams,
        "writer": variant,
        "requests": len(run.records),
        "errors": sum(1 for r in run.records if not r.ok),
        "matched": len(ttft_error),
        "wall_s": wall,
        "load_avg": (load_before + os.getloadavg()[0]) / 2,
        "lateness_p50_ms": lateness["p50"],
        "lateness_p99_ms": lateness["p99"],
        "lateness_max_ms": lateness["max"],
        "write_lateness_p50_ms": writes["p50"],
        "write_lateness_p99_ms": writes["p99"],
        "write_lateness_max_ms": writes["max"],
        "first_write_lateness_p50_ms": firsts["p50"],
        "first_write_lateness_p99_ms": firsts["p99"],
        "ttft_error_p50_ms": _pct(ttft_error, 50) * 1e3,
        "ttft_error_p99_ms": _pct(ttft_error, 99) * 1e3,
        "trip_p50_ms": _pct(trip, 50) * 1e3,
        "trip_p99_ms": _pct(trip, 99) * 1e3,
        "queue_p50_ms": _pct(queue, 50) * 1e3,
        "queue_p99_ms": _pct(queue, 99) * 1e3,
        "chunk_error_p50_ms": _pct(chunk_error, 50) * 1e3,
        "chunk_error_p99_ms": _pct(chunk_error, 99) * 1e3,
        "sim_cpu_s": server_cpu,
        "sim_core_others_pct": max(0.0, others * 100),
        "client_cpu_s": client_cpu,
        "events": events,
        "sim_cpu_us_per_event": server_cpu / events * 1e6 if events else float("nan"),
        "sim_user_us_per_event": server_user / events * 1e6 if events else float("nan"),
        "sim_sys_us_per_event": server_sys / events * 1e6 if events else float("nan"),
        "sim_full_collections": collector["collections"][2] if collector else float("nan"),
        "sim_longest_collection_ms": max(collector["longest_pause_ms"]) if collector else float("nan"),
    }


_COLUMNS = (
    ("lateness_p50_ms", "lateness p50"),
    ("lateness_p99_ms", "lateness p99"),
    ("lateness_max_ms", "lateness max"),
    ("write_lateness_p50_ms", "write lateness p50"),
    ("write_lateness_p99_ms", "write lateness p99"),
    ("write_lateness_max_ms", "write lateness max"),
    ("first_write_lateness_p50_ms", "first-event write lateness p50"),
    ("first_write_lateness_p99_ms", "first-event write lateness p99"),
    ("ttft_error_p50_ms", "TTFT error p50"),
    ("ttft_error_p99_ms", "TTFT error p99"),
    ("trip_p50_ms", "send to arrival p50"),
    ("trip_p99_ms", "send to arrival p99"),
    ("queue_p50_ms", "front-end queue p50"),
    ("queue_p99_ms", "front-end queue p99"),
    ("chunk_error_p50_ms", "chunk error p50"),
    ("chunk_error_p99_ms", "chunk error p99"),
    ("sim_cpu_s", "sim CPU s"),
    ("sim_cpu_us_per_event", "sim CPU us / event"),
    ("sim_user_us_per_event", "of which user"),
    ("sim_sys_us_per_event", "of which kernel"),
    ("sim_full_collections", "sim full GCs"),
    ("sim_longest_collection_ms", "sim longest GC pause"),
    ("client_cpu_s", "client CPU s"),
    ("sim_core_others_pct", "other work on the sim's core %"),
    ("load_avg", "load avg"),
)


def main(argv: list[str] | None = None) -> int:
    argv, sim_args = split_simulator_flags(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Flags after -- go to the simulator, e.g. -- --profile b200/gpt-oss-120b (the figures of "
        "docs/calibration.md); --sse-writer, --front-end, --max-num-seqs (the stream count, at least 256) and "
        "--trace-capacity are set here.",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[256], help="stream counts (default: 256)")
    parser.add_argument(
        "--sim-wire", nargs="+", choices=SSE_WRITERS, default=list(SSE_WRITERS), help="the writers to compare"
    )
    parser.add_argument(
        "--front-end",
        nargs="+",
        choices=FRONT_ENDS,
        default=[FRONT_ENDS[0]],
        help="the simulator's front ends to compare (--front-end; default: %(default)s), each with every writer",
    )
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=256)
    parser.add_argument(
        "--range-ratio",
        type=float,
        default=1.0,
        help="lengths uniform in [R x L, L] (InferenceMAX: 0.8); 1.0, the default, runs every stream "
        "the same length, so the streams end and start together (the costliest steps)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the OS place simulator and client (by default the simulator gets the first CPU, the client "
        "the others: woken on the core the simulator writes from, the client would wait for its burst)",
    )
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    parser.add_argument(
        "--against",
        type=Path,
        metavar="DIR",
        help="also run the simulator of this checkout (e.g. `git archive` of an earlier commit), same flags",
    )
    args = parser.parse_args(argv)
    if not 0 < args.range_ratio <= 1:
        parser.error(f"--range-ratio must be in (0, 1], got {args.range_ratio:g}")
    if args.against is not None:
        if not (args.against / "pytest_infmax" / "sim" / "__main__.py").is_file():
            parser.error(f"--against {args.against}: no pytest_infmax/sim there; give a checkout of the project")
        args.against = args.against.resolve()
        _check_tree_runs(args.against)
    if (os.cpu_count() or 1) < 2:
        args.pin = False
    if sys.platform != "linux":
        raise SystemExit("this benchmark compares time.monotonic() and time.perf_counter(): Linux only")
    print(
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, client event loop "
        f"{os.environ.get('INFMAX_EVENT_LOOP', 'uvloop')}, {'pinned' if args.pin else 'unpinned'}, "
        f"lengths in [{args.range_ratio:g} L, L], simulator: {' '.join(sim_args) or '(defaults)'}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    variants = [f"{writer}/{front_end}" for writer in args.sim_wire for front_end in args.front_end]
    if args.against is not None:
        variants += [f"{variant} ({args.against.name})" for variant in variants]
    for round_index in range(args.runs):
        writers = variants if round_index % 2 == 0 else list(reversed(variants))
        for streams in args.concurrency:
            for writer in writers:
                row = measure(streams, writer, args, sim_args)
                row["round"] = round_index
                rows.append(row)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print(f"\nmedian [min-max] of {args.runs} interleaved runs; times in ms:\n")
    print("| streams | writer / front end | " + " | ".join(title for _, title in _COLUMNS) + " |")
    print("|--:|--|" + "--:|" * len(_COLUMNS))
    for streams in args.concurrency:
        for writer in variants:
            cells = [r for r in rows if r["streams"] == streams and r["writer"] == writer]
            print(
                f"| {streams} | {writer} | "
                + " | ".join(spread_cell([r[key] for r in cells]) for key, _ in _COLUMNS)
                + " |"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

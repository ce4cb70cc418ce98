"""Soak: ten minutes of faults at 256 streams; is anything lost, leaked or left behind?

The simulator is started through the plugin's own launcher
(``pytest_infmax.servers.launch.start_server``, its own process group) with 1 % of
generation requests answered HTTP 500 (``--fault-status 500 --fault-rate 0.01``),
and every ``--stall-every`` seconds the whole server is frozen for
``--stall-seconds`` (SIGSTOP / SIGCONT of its process group: a GC pause, a
preempted VM or a stuck driver call, with every open stream mid-response). The
client is the project's ``LoadGenerator`` in this process, closed loop at
``--streams`` concurrent streams, run as back-to-back runs of ``--segment``
seconds each (each run's records are tallied and dropped, so what the memory
figures show is leakage, not stored results; ``--segment 0``: one run for the
whole duration, whose records are all kept).

It reports, and judges (PASS / FAIL, exit status 1 on any FAIL):

* requests sent == outcomes recorded: the server's count of requests it
  received (its ``/sim/trace``, polled and cleared every few seconds), the
  client's count of requests it issued (record indices 0..n-1 of each run, no
  gaps) and the records returned must all be equal; outcomes by kind;
* every injected error was recorded as one (client ``http_error`` == the
  server's injected faults);
* client memory (RSS) at the start, after the first run (warm), at the end and
  its peak: the end may exceed the warm figure by at most
  ``--memory-tolerance-mib`` (or 25 % of the warm figure, if larger);
* processes left after the launcher stopped the server: none (its process
  group, the simulator's pid, any descendant of this process, anything whose
  command line names this run's log directory).

    .venv/bin/python benchmarks/soak.py             # 10 minutes at 256 streams
    .venv/bin/python benchmarks/soak.py --quick     # 60 s, 15 s runs, a stall every 15 s

The simulator's speed is chosen so that two CPU cores are not saturated: short
requests (``--isl 32 --osl 16``) and a 150 ms decode step (about 2.4 s per
request, about 100 requests/s at 256 streams).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_infmax.load.generator import LoadGenerator
from pytest_infmax.load.plan import LoadConfig
from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.servers.launch import Server, ServerConfig, descendants, start_server

try:  # the load generator's own loop choice (uvloop where installed), as infmax.run() uses it
    from pytest_infmax.load.generator import run_coroutine
except ImportError:  # pragma: no cover - an older load.py
    import asyncio

    run_coroutine = asyncio.run

MIB = 1024 * 1024


@dataclass(frozen=True)
class SoakOptions:
    duration: float = 600.0  # seconds of load
    streams: int = 256  # concurrent streams (closed loop)
    segment: float = 60.0  # seconds per back-to-back run (0: one run)
    error_rate: float = 0.01  # fraction of requests answered with error_status
    error_status: int = 500
    stall_every: float = 30.0  # seconds between server freezes (0: none)
    stall_seconds: float = 2.0  # how long each freeze lasts
    isl: int = 32
    osl: int = 16
    decode_step_ms: float = 150.0
    request_timeout: float = 30.0
    poll_every: float = 5.0  # seconds between /sim/trace polls
    progress_every: float = 30.0  # seconds between progress lines (0: none)
    memory_tolerance_mib: float = 32.0
    seed: int = 1

    def sim_args(self) -> tuple[str, ...]:
        return (
            "--decode-step-ms",
            f"{self.decode_step_ms:g}",
            "--decode-ms-per-seq",
            "0",
            "--max-num-seqs",
            str(max(256, self.streams)),
            "--trace-capacity",
            "1000000",
            "--fault-status",
            str(self.error_status),
            "--fault-rate",
            f"{self.error_rate:g}",
            "--seed",
            str(self.seed),
        )

    def runs(self) -> list[float]:
        """The length of each back-to-back run."""
        n = 1 if self.segment <= 0 else max(1, round(self.duration / self.segment))
        return [self.duration / n] * n


@dataclass
class SoakReport:
    options: SoakOptions
    wall_s: float = 0.0
    runs: int = 0
    client_issued: int = 0  # requests the client planned and sent (record indices 0..n-1 per run)
    index_gaps: int = 0  # indices missing or repeated among a run's records
    outcomes: Counter[str] = field(default_factory=Counter)  # records by outcome kind
    server_received: int = 0  # requests the server traced
    server_outcomes: Counter[str] = field(default_factory=Counter)
    server_injected: int = 0  # of those, with an injected fault
    server_dropped: int = 0  # traces lost to the ring buffer before a poll (must be 0)
    engine_admitted: int | None = None  # /sim/stats requests_received (not the injected errors)
    stalls: int = 0
    stalled_s: float = 0.0
    client_bound_runs: int = 0
    client_bound_reasons: list[str] = field(default_factory=list)  # why (the first few), informational
    rss_start: int = 0
    rss_warm: int = 0  # after the first run
    rss_end: int = 0
    rss_peak: int = 0
    rss_after_runs: list[int] = field(default_factory=list)
    processes_left: list[str] = field(default_factory=list)
    server_exit: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def recorded(self) -> int:
        return sum(self.outcomes.values())

    @property
    def memory_limit(self) -> float:
        return max(self.options.memory_tolerance_mib * MIB, 0.25 * self.rss_warm)

    def criteria(self) -> list[tuple[bool, str]]:
        sent_ok = (
            self.server_received == self.recorded == self.client_issued
            and self.index_gaps == 0
            and self.server_dropped == 0
            and self.recorded > 0
        )
        sent = (
            f"requests sent == outcomes recorded: server received {self.server_received}, client issued "
            f"{self.client_issued}, recorded {self.recorded}"
            + (f", {self.index_gaps} index gaps" if self.index_gaps else "")
            + (f", {self.server_dropped} traces dropped" if self.server_dropped else "")
        )
        errors = self.outcomes.get("http_error", 0)
        injected = (
            f"every injected error recorded: {errors} http_error recorded, {self.server_injected} "
            f"injected by the server"
        )
        growth = self.rss_end - self.rss_warm
        memory = (
            f"client memory bounded: {self.rss_end / MIB:.1f} MiB at the end, {growth / MIB:+.1f} MiB "
            f"since the first run ended (limit {self.memory_limit / MIB:+.1f} MiB)"
        )
        left = f"processes left: {', '.join(self.processes_left) or 'none'}"
        return [
            (sent_ok, sent),
            (errors == self.server_injected, injected),
            (growth <= self.memory_limit, memory),
            (not self.processes_left, left),
        ]

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.criteria())

    def table(self) -> str:
        o = self.options
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items(), key=lambda kv: -kv[1]))
        server_kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.server_outcomes.items(), key=lambda kv: -kv[1]))
        per_run = " ".join(f"{r / MIB:.0f}" for r in self.rss_after_runs)
        rows = [
            (
                "load",
                f"{self.wall_s:.0f} s at {o.streams} streams, {self.runs} back-to-back run(s), "
                f"isl {o.isl} / osl {o.osl}, decode step {o.decode_step_ms:g} ms",
            ),
            (
                "faults",
                f"{o.error_rate:.2%} HTTP {o.error_status}; {self.stalls} server stalls of "
                f"{o.stall_seconds:g} s (every {o.stall_every:g} s), {self.stalled_s:.1f} s in all",
            ),
            ("requests sent (server, /sim/trace)", f"{self.server_received}  ({server_kinds or '-'})"),
            ("requests issued (client)", str(self.client_issued)),
            ("outcomes recorded", f"{self.recorded}  ({kinds or '-'})"),
            ("injected errors (server)", str(self.server_injected)),
            ("admitted by the engine (/sim/stats)", "-" if self.engine_admitted is None else str(self.engine_admitted)),
            (
                "client RSS start / warm / end / peak",
                f"{self.rss_start / MIB:.1f} / {self.rss_warm / MIB:.1f} / "
                f"{self.rss_end / MIB:.1f} / {self.rss_peak / MIB:.1f} MiB",
            ),
            ("client RSS after each run (MiB)", per_run or "-"),
            ("client-bound runs", f"{self.client_bound_runs} of {self.runs}"),
            ("server exit status", "-" if self.server_exit is None else str(self.server_exit)),
            ("processes left", ", ".join(self.processes_left) or "none"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines += [f"note: client-bound {r}" for r in self.client_bound_reasons]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"{'PASS' if ok else 'FAIL'}  {text}" for ok, text in self.criteria()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["outcomes"], d["server_outcomes"] = dict(self.outcomes), dict(self.server_outcomes)
        d["recorded"] = self.recorded
        d["criteria"] = [{"passed": ok, "text": text} for ok, text in self.criteria()]
        d["passed"] = self.passed
        return d


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


class _Monitor(threading.Thread):
    """While load runs: freezes the server on schedule, samples RSS, counts the server's traces."""

    def __init__(
        self, server: Server, options: SoakOptions, report: SoakReport, live: Counter[str], log: Callable[[str], None]
    ) -> None:
        super().__init__(name="soak-monitor", daemon=True)
        self.server, self.options, self.report, self.live, self.log = server, options, report, live, log
        self.pgid = server.pid
        self.done = threading.Event()
        self.frozen_at: float | None = None
        self.error: BaseException | None = None
        self.poll_failures = 0

    def poll_trace(self) -> dict[str, Any]:
        """Every trace committed since the last poll, which empties the server's buffer
        (so a ten-minute run does not hold every trace in the server's memory)."""
        body = _get_json(f"{self.server.base_url}/sim/trace?clear=1")
        for trace in body["requests"]:
            self.report.server_received += 1
            self.report.server_outcomes[str(trace["outcome"])] += 1
            if trace.get("fault"):
                self.report.server_injected += 1
        self.report.server_dropped = max(self.report.server_dropped, int(body.get("dropped") or 0))
        return body

    def _freeze(self) -> None:
        os.killpg(self.pgid, signal.SIGSTOP)
        self.frozen_at = time.monotonic()
        self.report.stalls += 1

    def thaw(self) -> None:
        if self.frozen_at is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGCONT)
            self.report.stalled_s += time.monotonic() - self.frozen_at
            self.frozen_at = None

    def run(self) -> None:
        o = self.options
        start = time.monotonic()
        next_stall = start + o.stall_every if o.stall_every > 0 and o.stall_seconds > 0 else math.inf
        next_poll = start + o.poll_every
        next_progress = start + o.progress_every if o.progress_every > 0 else math.inf
        try:
            while not self.done.wait(0.1):
                now = time.monotonic()
                self.report.rss_peak = max(self.report.rss_peak, rss_bytes())
                if self.frozen_at is not None:
                    if now - self.frozen_at >= o.stall_seconds:
                        self.thaw()
                    continue  # a frozen server answers no poll
                if now >= next_stall:
                    self._freeze()
                    next_stall += o.stall_every
                    continue
                if now >= next_poll:
                    try:
                        self.poll_trace()
                    except OSError as exc:  # tried again at the next poll; its traces are still there
                        self.poll_failures += 1
                        self.log(f"soak: a /sim/trace poll failed ({exc}); trying again")
                    next_poll = now + o.poll_every
                if now >= next_progress:
                    next_progress += o.progress_every
                    self.log(
                        f"soak: {now - start:5.0f} s: {sum(self.live.values())} outcomes "
                        f"({self.live.get('ok', 0)} ok), server traced {self.report.server_received}, "
                        f"{self.report.stalls} stalls, client RSS {rss_bytes() / MIB:.1f} MiB"
                    )
        except BaseException as exc:  # reported by the caller; the server must not stay frozen
            self.error = exc
        finally:
            self.thaw()


def _tally(report: SoakReport, records: list[Any]) -> None:
    indices = sorted(r.index for r in records)
    issued = indices[-1] + 1 if indices else 0
    report.client_issued += issued
    report.index_gaps += issued - len(set(indices)) + (len(indices) - len(set(indices)))
    for r in records:
        report.outcomes["ok" if r.ok else str(getattr(r.error_kind, "value", r.error_kind))] += 1


def _started_by_us(before: set[int]) -> list[int]:
    """Live descendants of this process started since ``before`` whose line back to it runs
    through none of ``before``: what the soak started, not the workers that a server started
    earlier forks meanwhile (a test session's PostgreSQL forks autovacuum workers)."""
    return list(descendants(os.getpid(), excluding=before))


def _processes_left(server: Server, before: set[int], log_dir: Path) -> list[str]:
    left: list[str] = []
    pgid = server.pid
    if pgid is not None:
        try:
            os.killpg(pgid, 0)
            left.append(f"process group {pgid}")
        except ProcessLookupError:
            pass
        except PermissionError:
            left.append(f"process group {pgid} (not ours)")
    for pid in sorted(_started_by_us(before)):
        left.append(f"child {pid}")
    marker = str(log_dir)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().decode(errors="replace").rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state not in ("Z", "X") and f"child {entry}" not in left:
            left.append(f"pid {entry} ({cmd.replace(chr(0), ' ').strip()[:80]})")
    return left


def soak(options: SoakOptions, log: Callable[[str], None] = print) -> SoakReport:
    """Run the soak and return its report (the simulator is stopped and checked for leftovers)."""
    report = SoakReport(options)
    live: Counter[str] = Counter()
    scenario = Scenario("soak", options.isl, options.osl)
    before = set(descendants(os.getpid()))
    with tempfile.TemporaryDirectory(prefix="infmax-soak-") as tmp:
        log_dir = Path(tmp) / "logs"
        config = ServerConfig(sim_args=options.sim_args(), startup_timeout=60, shutdown_grace=5)
        server = start_server(config, log_dir)
        monitor: _Monitor | None = None
        try:
            generator = LoadGenerator(server.base_url, server.model, server.api_key)
            gc.collect()
            report.rss_start = report.rss_peak = rss_bytes()
            monitor = _Monitor(server, options, report, live, log)
            started = time.monotonic()
            monitor.start()

            def count(record: Any) -> None:
                live["ok" if record.ok else "error"] += 1

            for i, seconds in enumerate(options.runs()):
                load = LoadConfig(
                    scenario=scenario,
                    concurrency=options.streams,
                    duration=seconds,
                    warmup=0,
                    request_timeout=options.request_timeout,
                    seed=options.seed + i,
                )
                run = run_coroutine(generator.run(load, on_record=count))
                report.runs += 1
                if getattr(run, "client_bound", False):
                    report.client_bound_runs += 1
                    reason = getattr(run.client, "reason", None)
                    if reason and len(report.client_bound_reasons) < 3:
                        report.client_bound_reasons.append(f"run {i + 1}: {reason}")
                _tally(report, run.records)
                del run  # the run's records go; what stays is leakage
                gc.collect()
                report.rss_after_runs.append(rss_bytes())
                if i == 0:
                    report.rss_warm = report.rss_after_runs[-1]
                if monitor.error is not None:
                    raise monitor.error
            report.wall_s = time.monotonic() - started
            monitor.done.set()
            monitor.join(timeout=30)
            if monitor.error is not None:
                raise monitor.error
            report.rss_end = rss_bytes()
            report.rss_peak = max(report.rss_peak, report.rss_end)
            # The server's last traces: every request it received has ended by now.
            deadline = time.monotonic() + 30
            while True:
                body = monitor.poll_trace()
                if (not body["requests"] and not body.get("open")) or time.monotonic() > deadline:
                    break
            if body.get("open"):
                report.notes.append(f"{body['open']} requests still open on the server after 30 s")
            if monitor.poll_failures:
                report.notes.append(f"{monitor.poll_failures} /sim/trace polls failed (retried)")
            report.engine_admitted = _get_json(f"{server.base_url}/sim/stats").get("requests_received")
        finally:
            if monitor is not None:
                monitor.done.set()
                monitor.join(timeout=30)
                monitor.thaw()
            server.stop()
            report.server_exit = server.process.returncode if server.process is not None else None
            report.processes_left = _processes_left(server, before, log_dir)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = SoakOptions()
    parser.add_argument("--duration", type=float, help=f"seconds of load (default: {d.duration:g}, --quick 60)")
    parser.add_argument("--streams", type=int, default=d.streams, help="concurrent streams (default: %(default)s)")
    parser.add_argument(
        "--quick", action="store_true", help="60 s in 15 s runs with a stall every 15 s (unless given otherwise)"
    )
    parser.add_argument(
        "--segment", type=float, help=f"seconds per back-to-back run; 0: one run (default: {d.segment:g}, --quick 15)"
    )
    parser.add_argument("--error-rate", type=float, default=d.error_rate, help="default: %(default)s")
    parser.add_argument("--stall-every", type=float, help=f"default: {d.stall_every:g} s, --quick 15 s")
    parser.add_argument("--stall-seconds", type=float, default=d.stall_seconds, help="default: %(default)s")
    parser.add_argument("--isl", type=int, default=d.isl)
    parser.add_argument("--osl", type=int, default=d.osl)
    parser.add_argument("--decode-step-ms", type=float, default=d.decode_step_ms)
    parser.add_argument("--request-timeout", type=float, default=d.request_timeout)
    parser.add_argument("--memory-tolerance-mib", type=float, default=d.memory_tolerance_mib)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    duration = args.duration if args.duration is not None else (60.0 if args.quick else d.duration)
    options = SoakOptions(
        duration=duration,
        streams=args.streams,
        segment=args.segment if args.segment is not None else (15.0 if args.quick else d.segment),
        error_rate=args.error_rate,
        stall_every=args.stall_every if args.stall_every is not None else (15.0 if args.quick else d.stall_every),
        stall_seconds=args.stall_seconds,
        isl=args.isl,
        osl=args.osl,
        decode_step_ms=args.decode_step_ms,
        request_timeout=args.request_timeout,
        memory_tolerance_mib=args.memory_tolerance_mib,
        progress_every=10.0 if args.quick else d.progress_every,
    )
    print(
        f"soak: {options.duration:g} s at {options.streams} streams; simulator {' '.join(options.sim_args())}",
        flush=True,
    )
    report = soak(options, log=lambda line: print(line, flush=True))
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

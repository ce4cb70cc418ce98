"""Why does the load generator's event loop stall next to a busy server? (issue #16)

Starts real vLLM on CPU from ``.venv-vllm`` (``make vllm``) through the project's own
launcher, runs ``--requests`` requests of 256/128 tokens at concurrency 16, and for every
event-loop lag sample over 100 ms says what the loop thread did in it, from
``/proc/self/task/TID/schedstat`` (ns on CPU, ns runnable but waiting for a CPU) read
every 10 ms by a side thread: on CPU means our code (cProfile's table then says where),
waiting means the kernel ran something else, the rest is blocked. Also printed: requests
in flight on average, the CPU of the vLLM processes, of this client and of the rest of
the machine, and the scheduler autogroups (sessions) of client and server.

    .venv/bin/python benchmarks/loop_stall.py                 # the launcher as it is
    .venv/bin/python benchmarks/loop_stall.py --own-session   # the server in a session of its own (before the fix)

docs/engines.md ("The load generator's stalls ...") has the findings.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pytest_infmax.load import generator
from pytest_infmax.load.clientstats import LoopLagMonitor
from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.run.runner import Infmax
from pytest_infmax.servers import launch
from pytest_infmax.servers.config import config_from_mapping
from pytest_infmax.servers.launch import ServerConfig, start_server

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm"
MONITORS: list[LoopLagMonitor] = []


class _KeptMonitor(LoopLagMonitor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        MONITORS.append(self)


def _own_session(argv: tuple[str, ...], log: Any, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def machine_ticks() -> tuple[int, int]:
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--own-session", action="store_true", help="start vLLM in a session of its own")
    args = parser.parse_args()
    if not (VENV / "bin" / "vllm").exists():
        sys.exit(f"no {VENV}: run `make vllm`")
    generator.LoopLagMonitor = _KeptMonitor  # type: ignore[misc]
    if args.own_session:
        launch.spawn_in_own_group = _own_session
    config = config_from_mapping(
        ServerConfig(),
        dict(
            engine="vllm",
            model=str(VENV / "models" / "tiny-llama"),
            executable=str(VENV / "bin" / "vllm"),
            max_batch_size=16,
            env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"},
            startup_timeout=400,
        ),
    )
    loop_tid = threading.get_native_id()
    samples: list[tuple[float, int, int]] = []
    done = threading.Event()

    def sample() -> None:
        path = Path(f"/proc/self/task/{loop_tid}/schedstat")
        while not done.is_set():
            on_cpu, waiting, _ = (int(x) for x in path.read_text().split())
            samples.append((time.perf_counter(), on_cpu, waiting))
            time.sleep(0.01)

    server = start_server(config, ROOT / ".infmax" / "logs")
    try:
        server.track_descendants()
        tree = [p for p in (server.pid, *server.tracked) if p is not None]
        mine, theirs = (Path(f"/proc/{p}/autogroup").read_text().strip() for p in (os.getpid(), tree[0]))
        print(f"autogroups: client {mine}, vLLM {theirs}")
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        v0, c0, m0 = sum(ticks(p) for p in tree), ticks(os.getpid()), machine_ticks()
        profile = cProfile.Profile()
        profile.enable()
        result = Infmax(server, energy=False, server_metrics=False).run(
            Scenario("tiny", 256, 128), concurrency=args.concurrency, num_requests=args.requests, warmup=16
        )
        profile.disable()
        v1, c1, m1 = sum(ticks(p) for p in tree), ticks(os.getpid()), machine_ticks()
        done.set()
        sampler.join()
    finally:
        server.stop()
    hz = os.sysconf("SC_CLK_TCK")
    busy, total = (m1[0] - m0[0]) / hz, (m1[1] - m0[1]) / hz
    vllm_s, client_s = (v1 - v0) / hz, (c1 - c0) / hz
    print(
        f"CPU: machine busy {busy:.1f} of {total:.1f} CPU-s; vLLM {vllm_s:.1f}, this client {client_s:.2f}, "
        f"the rest {busy - vllm_s - client_s:.1f}"
    )
    measured = [r for r in result.records if not r.warmup and r.send_time and r.end_time]
    start, end = min(r.send_time for r in measured), max(r.end_time for r in measured)  # type: ignore[type-var]
    in_flight = sum(r.end_time - r.send_time for r in measured) / (end - start)  # type: ignore[operator]
    print(f"requests ok {result.metrics.num_ok} of {len(measured)}; in flight on average {in_flight:.2f}")
    t, on_cpu, waiting = (np.array(col, dtype=float) for col in zip(*samples))
    lags = np.array([lag for _, lag in MONITORS[-1].samples])
    print(
        f"loop lag: p50 {np.percentile(lags, 50) * 1e3:.1f} ms, p99 {np.percentile(lags, 99) * 1e3:.1f} ms, max {lags.max():.3f} s"
    )
    totals = np.zeros(4)
    for wake, lag in MONITORS[-1].samples:
        if lag < 0.1:
            continue
        i = max(0, int(np.searchsorted(t, wake - lag - MONITORS[-1].interval)) - 1)
        j = min(len(t) - 1, int(np.searchsorted(t, wake)))
        wall, cpu, wait = t[j] - t[i], (on_cpu[j] - on_cpu[i]) / 1e9, (waiting[j] - waiting[i]) / 1e9
        totals += (wall, cpu, wait, wall - cpu - wait)
    wall, cpu, wait, other = totals
    print(
        f"stalls over 100 ms: wall {wall:.2f} s = on CPU {cpu:.2f} + waiting for a CPU {wait:.2f} + other {other:.2f}"
    )
    table = io.StringIO()
    pstats.Stats(profile, stream=table).sort_stats("tottime").print_stats(8)
    print(table.getvalue())


if __name__ == "__main__":
    main()

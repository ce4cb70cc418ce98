"""Do Ray actors start at one instant? The merged schedule and send times on a local Ray cluster.

Starts Ray's own ``ray.cluster_utils.Cluster`` (``--nodes`` one-CPU nodes on this machine)
and the embedded simulator, then, ``--repeat`` times interleaved, one open-loop run in this
process (``workers=1``) and one over ``--nodes`` Ray actors (``workers=N, ray=ADDRESS``), and
prints for each:

* the largest difference between the two runs' intended send times (from the measured start);
* the server's own arrival stamp of each request (``/sim/trace``, CLOCK_MONOTONIC: the clock
  ``perf_counter`` reads here) minus the merged send time: an actor that started off the
  common instant shows as negative values (it started early) or a median shifted up (late);
* the send lag (actual write minus the intended time) of the Ray run.

Then a node removed mid-run: how long until the run stops with ``WorkerLost``, and how many
records it kept. Needs ``pip install -e '.[ray]'``.

    .venv/bin/python benchmarks/ray_start.py               # 3 nodes, 3 repeats: about a minute
    .venv/bin/python benchmarks/ray_start.py --repeat 5 --requests 48
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from pytest_infmax.load.generator import LoadGenerator
from pytest_infmax.load.plan import LoadConfig, RunRecords
from pytest_infmax.load.rayworkers import WorkerLost
from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.records import RequestRecord
from pytest_infmax.servers.launch import Server, ServerConfig, running_server

SCENARIO = Scenario("tiny", 32, 16)


def _trace(server: Server, clear: bool = False) -> list[float]:
    url = f"{server.base_url}/sim/trace{'?clear=1' if clear else ''}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return sorted(t["arrival_mono"] for t in json.loads(r.read())["requests"])


def _run(server: Server, config: LoadConfig, on_record: Any = None) -> RunRecords:
    return asyncio.run(LoadGenerator(server.base_url, server.model).run(config, on_record=on_record))


def _transit(server: Server, config: LoadConfig) -> tuple[RunRecords, list[float]]:
    _trace(server, clear=True)
    run = _run(server, config)
    sends = sorted(r.send_time for r in run.records)
    return run, sorted(a - s for a, s in zip(_trace(server), sends))


def _ms(values: list[float]) -> str:
    return f"{min(values) * 1e3:.3f} / {statistics.median(values) * 1e3:.3f} / {max(values) * 1e3:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3, help="Ray nodes of one CPU each (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved pairs of runs (default: %(default)s)")
    p.add_argument("--requests", type=int, default=24, help="requests per run (default: %(default)s)")
    p.add_argument("--rate", type=float, default=40.0, help="open-loop requests/s (default: %(default)s)")
    args = p.parse_args()

    from ray.cluster_utils import Cluster

    started = time.perf_counter()
    fast_health = {"health_check_period_ms": 200, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": fast_health}
    )
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=1, include_dashboard=False)
        cluster.wait_for_nodes()
        print(f"Ray cluster of {args.nodes} one-CPU nodes up in {time.perf_counter() - started:.1f} s\n")
        with (
            tempfile.TemporaryDirectory() as logs,
            running_server(ServerConfig(sim_args=("--decode-step-ms", "2")), Path(logs)) as server,
        ):
            base = dict(scenario=SCENARIO, rate=args.rate, num_requests=args.requests, warmup=0, seed=3)
            print(
                "| run | max abs(intended ray - intended 1 proc) | arrival - send, ms (min / median / max), 1 proc "
                "| same, Ray | Ray send lag, ms (min / median / max) |"
            )
            print("|--:|--:|--:|--:|--:|")
            for k in range(args.repeat):
                one, transit_one = _transit(server, LoadConfig(**base))  # type: ignore[arg-type]
                ray_config = LoadConfig(**base, workers=args.nodes, ray=cluster.address)  # type: ignore[arg-type]
                ray_run, transit_ray = _transit(server, ray_config)
                intended = [
                    abs(
                        (a.scheduled_time or 0)
                        - one.measured_start
                        - ((b.scheduled_time or 0) - ray_run.measured_start)
                    )
                    for a, b in zip(one.records, ray_run.records)
                ]
                lags = [r.send_lag for r in ray_run.records if r.send_lag is not None]
                print(
                    f"| {k + 1} | {max(intended) * 1e6:.3f} µs | {_ms(transit_one)} | {_ms(transit_ray)} | {_ms(lags)} |"
                )

            victim = cluster.list_all_nodes()[-1]
            removed: list[float] = []

            def remove(rec: RequestRecord) -> None:
                if not rec.warmup and not removed:
                    cluster.remove_node(victim, allow_graceful=False)
                    removed.append(time.perf_counter())

            config = LoadConfig(
                SCENARIO,
                concurrency=args.nodes,
                num_requests=100_000,
                warmup=args.nodes,
                workers=args.nodes,
                ray=cluster.address,
            )
            try:
                _run(server, config, remove)
                print("\nthe run with a node removed finished: not expected")
            except WorkerLost as lost:
                seen = time.perf_counter() - removed[0]
                unique = len({r.index for r in lost.records}) == len(lost.records)
                print(
                    f"\nnode removed mid-run: WorkerLost {seen:.2f} s later, {len(lost.records)} records kept "
                    f"(each index once: {unique})\n  {lost}"
                )
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()

"""Requests due at one instant: a closed loop's first ones, started in slices or in one block.

A closed loop of N streams starts N requests at once. Each costs the client its planning, the
body's encoding and the write before it first waits; started in one event-loop iteration, no
response is read until the last is written, and a first token that arrives meanwhile is
stamped that late. The load generator starts them in slices of about
``START_SLICE_SECONDS`` of work, the loop polling between slices (``StartSlices``,
pytest_infmax/load/generator.py). Two parts, each the median of ``--runs`` interleaved rounds
with the spread [min-max]:

* **planning and encoding cost** per request, microseconds, with a burst's plans alive at once
  (``--streams`` of them, as while their requests are in flight): the plan as kept now (token
  ids packed, 4 bytes each) against the plan as kept until 2026-12-07 (a tuple of Python ints,
  copied to a list for the body), both encoded by the same msgspec encoder;
* **live**, against the simulator (started here; flags after ``--`` go to it): one request
  per stream after a warm-up round that opens the connections, started in slices and in one
  block (``START_SLICE_SECONDS`` set to infinity, as before the slices): TTFT error against
  the simulator's own trace (client TTFT - trace TTFT; p99 and max), the client's event-loop
  lag during the measured phase (max) and how long the N first sends took.

    .venv/bin/python benchmarks/start_burst.py --streams 1000 --isl 1024 --runs 3 -- --profile b200/gpt-oss-120b
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import statistics
import sys
import time
import tracemalloc
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

import pytest_infmax.load.generator as generator  # noqa: E402
from pytest_infmax.load.generator import LoadGenerator, encode_body, run_coroutine  # noqa: E402
from pytest_infmax.load.plan import LoadConfig  # noqa: E402
from pytest_infmax.load.scenarios import (  # noqa: E402
    DEFAULT_TOKEN_WINDOW,
    PlannedRequest,
    Scenario,
    plan_request,
    request_body,
)

sys.path.insert(0, str(REPO / "benchmarks"))
from _figures import interleaved, print_spread_table, simulator, split_simulator_flags, spread_cell  # noqa: E402

MODEL = "sim-model"
_encode = msgspec.json.Encoder().encode


def _tuple_plan(scenario: Scenario, index: int, seed: int) -> tuple[PlannedRequest, tuple[int, ...]]:
    """A plan as plan_request made it until 2026-12-07: the same draws, the prompt a tuple of
    Python ints (here beside a plan without one, for the body's other fields)."""
    rng = np.random.default_rng([seed, index])
    isl, osl = scenario.sample_lengths(rng)
    return PlannedRequest(index, isl, osl, b"", None), tuple(DEFAULT_TOKEN_WINDOW.draw(rng, isl).tolist())


def plan_cost(isl: int, streams: int) -> dict[str, float]:
    """Microseconds per request to plan and encode ``streams`` requests, every plan kept alive."""
    scenario = Scenario("burst", isl, 64, range_ratio=1.0)
    config = LoadConfig(scenario, concurrency=1, num_requests=1)
    costs = {}
    for name in ("packed", "tuple"):
        kept: list[Any] = []
        gc.collect()
        started = time.perf_counter()
        for i in range(streams):
            if name == "packed":
                plan = plan_request(scenario, i, 0)
                body = encode_body(plan, MODEL, config)
            else:
                plan, ids = _tuple_plan(scenario, i, 0)
                body = _encode({**request_body(plan, MODEL, "completions"), "prompt": list(ids)})
                plan = (plan, ids)
            kept.append((plan, body))
        costs[name] = (time.perf_counter() - started) / streams * 1e6
        del kept
    return costs


def plan_bytes(isl: int, plans: int = 50) -> dict[str, float]:
    """Bytes a kept plan's prompt takes per token (tracemalloc, over ``plans`` plans)."""
    scenario = Scenario("burst", isl, 64, range_ratio=1.0)
    sizes = {}
    for name in ("packed", "tuple"):
        tracemalloc.start()
        kept = [plan_request(scenario, i, 0) if name == "packed" else _tuple_plan(scenario, i, 0) for i in range(plans)]
        sizes[name] = tracemalloc.get_traced_memory()[0] / (plans * isl)
        tracemalloc.stop()
        del kept
    return sizes


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def live(streams: int, isl: int, sliced: bool, sim_args: list[str]) -> dict[str, float]:
    """One simulator start, one closed-loop run of ``streams`` requests after a warm-up round."""
    scenario = Scenario("burst", isl, 64, range_ratio=1.0)
    config = LoadConfig(scenario, concurrency=streams, num_requests=streams, warmup=streams, request_timeout=600)
    slice_seconds = generator.START_SLICE_SECONDS
    generator.START_SLICE_SECONDS = slice_seconds if sliced else math.inf
    try:
        with simulator(MODEL, streams, sim_args, trace_capacity=2 * streams + 16) as url:
            run = run_coroutine(LoadGenerator(url, MODEL).run(config))
            traces = _get(f"{url}/sim/trace")
    finally:
        generator.START_SLICE_SECONDS = slice_seconds
    trace = {t["body_sha256"]: t for t in traces["requests"]}
    errors, sends = [], []
    for rec in run.records:
        if rec.warmup or not rec.ok:
            continue
        truth = trace.get(
            hashlib.sha256(encode_body(plan_request(scenario, rec.index, config.seed), MODEL, config)).hexdigest()
        )
        if truth is None:
            continue
        errors.append((rec.chunk_times[0] - rec.send_time) - (truth["chunk_mono"][0] - truth["arrival_mono"]))
        sends.append(rec.send_time)
    if len(errors) < streams * 0.99:
        raise SystemExit(f"only {len(errors)} of {streams} requests matched the simulator's trace")
    lags = run.client.loop_lags if run.client is not None else []
    return {
        "ttft_error_p99_ms": float(np.percentile(errors, 99)) * 1e3,
        "ttft_error_max_ms": max(errors) * 1e3,
        "loop_lag_max_ms": max(lags, default=0.0) * 1e3,
        "first_sends_ms": (max(sends) - min(sends)) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    argv, sim_args = split_simulator_flags(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Flags after -- go to the simulator, e.g. -- --profile b200/gpt-oss-120b (the figures of "
        "docs/load-generator.md); --max-num-seqs (the stream count, at least 256) and --trace-capacity are set here.",
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--isl", type=int, default=1024, help="the live part's prompt length")
    parser.add_argument("--plan-isl", type=int, nargs="+", default=[1024, 8192], help="the planning part's")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-live", dest="live", action="store_false", help="the planning cost only")
    args = parser.parse_args(argv)
    if sys.platform != "linux":
        raise SystemExit("this benchmark compares time.monotonic() and time.perf_counter(): Linux only")

    print(f"Planning and encoding, us per request, {args.streams} plans alive; median [min-max] of {args.runs}")
    costs: dict[int, dict[str, list[float]]] = {isl: {"packed": [], "tuple": []} for isl in args.plan_isl}
    for _ in range(args.runs):
        for isl in args.plan_isl:
            for name, value in plan_cost(isl, args.streams).items():
                costs[isl][name].append(value)
    print("| ISL | packed ids (now) | tuple of ints (before) | ratio | bytes per prompt token, now / before |")
    print("|--:|--:|--:|--:|--:|")
    for isl, cost in costs.items():
        ratio = statistics.median(cost["packed"]) / statistics.median(cost["tuple"])
        held = plan_bytes(isl)
        print(
            f"| {isl} | {spread_cell(cost['packed'], 1)} | {spread_cell(cost['tuple'], 1)} | {ratio:.2f} "
            f"| {held['packed']:.1f} / {held['tuple']:.1f} |"
        )
    if not args.live:
        return 0

    print(
        f"\nLive: {args.streams} streams, ISL {args.isl}, simulator: {' '.join(sim_args) or '(defaults)'}", flush=True
    )
    figures = interleaved(
        args.runs,
        {
            "in slices (now)": lambda: live(args.streams, args.isl, True, sim_args),
            "in one block (before)": lambda: live(args.streams, args.isl, False, sim_args),
        },
    )
    columns = {
        "ttft_error_p99_ms": "TTFT error p99 ms",
        "ttft_error_max_ms": "TTFT error max ms",
        "loop_lag_max_ms": "loop lag max ms",
        "first_sends_ms": "first sends took ms",
    }
    print_spread_table("first requests started", columns, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

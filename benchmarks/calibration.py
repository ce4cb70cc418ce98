"""Calibrate the simulator's engine model against published measurements.

For every published point this runs the simulator's own scheduler and roofline
cost model (``pytest_infmax.sim.engine.simulate``: the same ``Scheduler`` and
``step_duration`` the real-time server steps through, in simulated time) with the
serving configuration the publication used, and prints predicted / published.

    .venv/bin/python benchmarks/calibration.py              # the table (~25 s of CPU)
    .venv/bin/python benchmarks/calibration.py --extended   # plus the frontier swept to 512 streams
    .venv/bin/python benchmarks/calibration.py --check      # exit 1 if a target/fit point is outside 0.8-1.25
    .venv/bin/python benchmarks/calibration.py --json out.json

``target`` points are the four the simulator is specified against; ``fit`` points
come from the same TensorRT-LLM table and pin the factors those four leave open;
``check`` points were left out of the fit, to show how far the model carries.
docs/calibration.md keeps the table and explains every ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.sim.engine import EngineConfig, SimulationResult, simulate
from pytest_infmax.sim.roofline import Deployment, ProfileRegistry, RooflineCostModel

BAND = (0.8, 1.25)

TRTLLM_PERF = (
    "TensorRT-LLM perf overview (docs/source/developer-guide/perf-overview.md), "
    "ISL/OSL 1000/1000, trtllm-bench throughput, output tok/s/GPU"
)
INFERENCEMAX = "InferenceMAX B200 gpt-oss-120b 1k/1k frontier (vLLM), total tok/s/GPU at 72 tok/s/user"


@dataclass(frozen=True)
class Serving:
    """How the publication ran the engine, in the simulator's terms (per DP rank)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float = 0.9
    block_size: int = 32


# TensorRT-LLM's PyTorch backend defaults (LlmArgs: max_batch_size 2048, max_num_tokens 8192;
# KV-cache blocks of 32 tokens). The perf overview runs trtllm-bench with
# kv_cache_free_gpu_mem_fraction 0.90-0.95 of the memory left after the weights; the
# simulator takes 0.9 of all memory minus the weights, which is close.
TRTLLM = Serving(max_num_seqs=2048, max_num_batched_tokens=8192, gpu_memory_utilization=0.9, block_size=32)
# InferenceMAX's vLLM script for gpt-oss on B200: --max-num-seqs 512, max-num-batched-tokens
# 8192, --gpu-memory-utilization 0.9, fp8 KV cache, no prefix caching; vLLM blocks of 16.
VLLM_INFERENCEMAX = Serving(max_num_seqs=512, max_num_batched_tokens=8192, gpu_memory_utilization=0.9, block_size=16)


@dataclass(frozen=True)
class Point:
    """An offline max-throughput run: every request queued at once (trtllm-bench)."""

    name: str
    role: str  # "fit" or "check"
    profile: str
    tp: int
    gpus: int
    published: float
    source: str
    isl: int = 1000
    osl: int = 1000
    num_requests: int = 3000
    precision: str | None = None
    serving: Serving = TRTLLM
    unit: str = "output tok/s/GPU"

    @property
    def config(self) -> str:
        precision = f" {self.precision}" if self.precision else ""
        return f"{self.profile} {parallel_label(self.tp, self.gpus)}{precision} {self.isl}/{self.osl} offline"


def _powers_of_two(low: int, high: int) -> tuple[int, ...]:
    return tuple(2**k for k in range(low.bit_length() - 1, high.bit_length()) if low <= 2**k <= high)


# InferenceMAX's vLLM search space for gpt-oss-120b on B200, 1k/1k (.github/configs/
# nvidia-master.yaml, gptoss-fp4-b200-vllm): TP -> concurrencies (powers of two).
INFERENCEMAX_SEARCH_SPACE = {1: _powers_of_two(4, 128), 2: _powers_of_two(4, 128), 4: _powers_of_two(4, 64), 8: (4, 8)}
EXTENDED_SEARCH_SPACE = {1: _powers_of_two(4, 512), 2: _powers_of_two(4, 512), 4: _powers_of_two(4, 512)}


@dataclass(frozen=True)
class FrontierPoint:
    """InferenceMAX's throughput-vs-interactivity frontier read at one interactivity.

    For each TP, a sweep of closed-loop concurrencies (10 x concurrency requests each,
    lengths uniform in [0.8 L, L], as InferenceMAX runs them); the frontier is the
    upper envelope of all points (Pareto: no other point has both more throughput
    and more interactivity), drawn as straight lines between its points, and read at
    the target. Past the envelope's last point it stays at that point's throughput."""

    name: str
    role: str
    profile: str
    published: float
    source: str
    interactivity: float  # tok/s/user
    search_space: dict[int, tuple[int, ...]] = field(default_factory=lambda: dict(INFERENCEMAX_SEARCH_SPACE))
    scenario: Scenario = field(default_factory=lambda: Scenario("1k1k", 1024, 1024, 0.8))
    serving: Serving = VLLM_INFERENCEMAX
    unit: str = "total tok/s/GPU"

    @property
    def tps(self) -> tuple[int, ...]:
        return tuple(self.search_space)

    @property
    def config(self) -> str:
        space = ", ".join(f"TP{tp} c{c[0]}-{c[-1]}" for tp, c in self.search_space.items())
        return f"{self.profile} {space}, 1k/1k @ {self.interactivity:g} tok/s/user"


POINTS: list[Point | FrontierPoint] = [
    # The four points the simulator is specified against.
    Point("trtllm-h100-llama70b-fp8-tp2", "target", "h100/llama-3.3-70b", 2, 2, 2209, TRTLLM_PERF),
    Point("trtllm-h200-llama70b-fp8-tp2", "target", "h200/llama-3.3-70b", 2, 2, 2587, TRTLLM_PERF),
    Point("trtllm-b200-gptoss120b-dep2", "target", "b200/gpt-oss-120b", 1, 2, 25943, TRTLLM_PERF),
    FrontierPoint("inferencemax-b200-gptoss120b", "target", "b200/gpt-oss-120b", 25300, INFERENCEMAX, interactivity=72),
    # Same publication; they pin what the points above leave open: B200's dense efficiency,
    # and Hopper's routed-expert efficiency (one value for both MoE models).
    Point("trtllm-b200-llama70b-fp4-tp1", "fit", "b200/llama-3.3-70b", 1, 1, 6920, TRTLLM_PERF, precision="fp4"),
    Point("trtllm-h200-gptoss120b-tp1", "fit", "h200/gpt-oss-120b", 1, 1, 6868, TRTLLM_PERF),
    Point("trtllm-h200-dsr1-fp8-dep8", "fit", "h200/deepseek-r1", 1, 8, 1627, TRTLLM_PERF),
    # Held out of the fit: same publication, other deployments.
    Point("trtllm-b200-dsr1-fp4-dep4", "check", "b200/deepseek-r1", 1, 4, 6463, TRTLLM_PERF, precision="fp4"),
    Point("trtllm-h100-gptoss120b-dep4", "check", "h100/gpt-oss-120b", 1, 4, 4685, TRTLLM_PERF),
]
# --extended: the same frontier with up to 512 streams per server (vLLM's --max-num-seqs 512).
EXTENDED_POINTS: list[Point | FrontierPoint] = [
    FrontierPoint(
        "inferencemax-b200-gptoss120b-c512",
        "check",
        "b200/gpt-oss-120b",
        25300,
        INFERENCEMAX,
        interactivity=72,
        search_space=dict(EXTENDED_SEARCH_SPACE),
    ),
]


ALL_POINTS = POINTS + EXTENDED_POINTS


def parallel_label(tp: int, gpus: int) -> str:
    dp = gpus // tp
    if dp == 1:
        return f"TP{tp}"
    return f"DEP{dp}" if tp == 1 else f"TP{tp}xDP{dp}"


def engine_for(
    registry: ProfileRegistry, profile: str, tp: int, gpus: int, serving: Serving, precision: str | None = None
):
    hardware, model = registry.resolve(profile)
    deployment = Deployment(
        hardware, model, tp=tp, gpus=gpus, gpu_memory_utilization=serving.gpu_memory_utilization, precision=precision
    )
    dp = deployment.dp
    config = EngineConfig(
        max_num_seqs=serving.max_num_seqs * dp,
        max_num_batched_tokens=serving.max_num_batched_tokens * dp,
        max_prefill_tokens_per_step=serving.max_num_batched_tokens * dp,
        kv_cache_tokens=deployment.kv_cache_tokens,
        block_size=serving.block_size,
    )
    return config, RooflineCostModel(deployment)


def run_point(point: Point, registry: ProfileRegistry) -> dict:
    config, cost = engine_for(registry, point.profile, point.tp, point.gpus, point.serving, point.precision)
    result = simulate(config, cost, [(point.isl, point.osl)] * point.num_requests)
    predicted = result.output_throughput / point.gpus
    return {
        "predicted": predicted,
        "detail": (
            f"batch up to {result.max_running}, KV {config.kv_cache_tokens:,} tokens, "
            f"median TPOT {result.median('tpot') * 1e3:.1f} ms"
        ),
    }


def sweep(point: FrontierPoint, registry: ProfileRegistry, tp: int) -> list[tuple[int, float, float]]:
    """(concurrency, interactivity tok/s/user, total tok/s/GPU) along one TP's curve."""
    config, cost = engine_for(registry, point.profile, tp, tp, point.serving)
    curve = []
    for concurrency in point.search_space[tp]:
        rng = np.random.default_rng(concurrency)
        requests = [point.scenario.sample_lengths(rng) for _ in range(10 * concurrency)]
        result: SimulationResult = simulate(config, cost, requests, concurrency=concurrency)
        curve.append((concurrency, result.interactivity, result.total_throughput / tp))
    return curve


def frontier_at(curves: dict[int, list[tuple[int, float, float]]], interactivity: float) -> tuple[float, str]:
    """The upper envelope of every (interactivity, throughput) point, read at ``interactivity``."""
    points = sorted(((x, y, f"TP{tp} c={c}") for tp, curve in curves.items() for c, x, y in curve), key=lambda p: -p[0])
    envelope: list[tuple[float, float, str]] = []  # interactivity falling, throughput rising
    for x, y, label in points:
        if not envelope or y > envelope[-1][1]:
            envelope.append((x, y, label))
    if not envelope or interactivity > envelope[0][0]:
        return 0.0, "no point is that interactive"
    for (x_hi, y_hi, a), (x_lo, y_lo, b) in zip(envelope, envelope[1:]):
        if x_lo <= interactivity <= x_hi:
            t = 0.0 if x_hi == x_lo else (x_hi - interactivity) / (x_hi - x_lo)
            return y_hi + t * (y_lo - y_hi), f"on the envelope between {a} ({x_hi:.0f} tok/s/user) and {b} ({x_lo:.0f})"
    x, y, label = envelope[-1]
    return y, f"the envelope ends at {label}: {x:.0f} tok/s/user, {y:,.0f} tok/s/GPU"


def _task(task: tuple[int, int | None, tuple[str, ...]]) -> tuple[int, int | None, object]:
    """One unit of work for the process pool: a whole Point, or one TP's sweep of a FrontierPoint."""
    index, tp, profile_files = task
    registry = ProfileRegistry.with_files(profile_files)
    point = ALL_POINTS[index]
    if isinstance(point, FrontierPoint):
        return index, tp, sweep(point, registry, tp)  # type: ignore[arg-type]
    return index, tp, run_point(point, registry)


def evaluate_all(profile_files: tuple[str, ...] = (), jobs: int = 2, points: list | None = None) -> list[dict]:
    """Every point's prediction (default: POINTS), in order."""
    indices = [ALL_POINTS.index(p) for p in (POINTS if points is None else points)]
    tasks = []
    for index in indices:
        point = ALL_POINTS[index]
        if isinstance(point, FrontierPoint):
            tasks += [(index, tp, profile_files) for tp in point.tps]
        else:
            tasks.append((index, None, profile_files))
    # Frontier sweeps are the long tasks: start them first.
    tasks.sort(key=lambda t: t[1] is None)
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            done = list(pool.map(_task, tasks))
    else:
        done = [_task(t) for t in tasks]
    results = []
    for index in indices:
        point = ALL_POINTS[index]
        parts = [(tp, out) for i, tp, out in done if i == index]
        if isinstance(point, FrontierPoint):
            curves = dict(sorted(parts))  # type: ignore[arg-type]
            predicted, where = frontier_at(curves, point.interactivity)  # type: ignore[arg-type]
            outcome = {
                "predicted": predicted,
                "detail": where,
                "curves": {
                    f"tp{tp}": [dict(zip(("concurrency", "interactivity", "throughput_per_gpu"), p)) for p in curve]
                    for tp, curve in curves.items()
                },
            }
        else:
            outcome = dict(parts[0][1])  # type: ignore[arg-type]
        outcome.update(
            name=point.name,
            role=point.role,
            config=point.config,
            unit=point.unit,
            published=point.published,
            ratio=outcome["predicted"] / point.published,
            source=point.source,
        )
        results.append(outcome)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target or fit point is outside 0.8-1.25")
    parser.add_argument(
        "--profile-file", action="append", default=[], help="extra profile TOML (as the simulator takes)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="points run in parallel (processes)")
    parser.add_argument("--extended", action="store_true", help="also the frontier swept to 512 streams (slower)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    points = POINTS + EXTENDED_POINTS if args.extended else POINTS
    results = evaluate_all(tuple(args.profile_file), max(1, args.jobs), points)

    header = f"{'point':<34} {'role':<6} {'published':>10} {'predicted':>10} {'ratio':>6}  {'unit':<18} detail"
    print(header)
    print("-" * len(header))
    for r in results:
        flag = "" if BAND[0] <= r["ratio"] <= BAND[1] else "  <- outside 0.8-1.25"
        print(
            f"{r['name']:<34} {r['role']:<6} {r['published']:>10,.0f} {r['predicted']:>10,.0f} {r['ratio']:>6.2f}  "
            f"{r['unit']:<18} {r['detail']}{flag}"
        )
    print(f"\n{len(results)} points in {time.perf_counter() - started:.1f} s (simulated time, {args.jobs} processes)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    outside = [r for r in results if r["role"] != "check" and not BAND[0] <= r["ratio"] <= BAND[1]]
    if args.check and outside:
        print(
            f"{len(outside)} target/fit point(s) outside {BAND[0]}-{BAND[1]}: {', '.join(r['name'] for r in outside)}"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

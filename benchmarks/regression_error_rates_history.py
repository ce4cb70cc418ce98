"""Fewer starts per verdict: error rates of a PR's few fresh starts against a long history.

    .venv/bin/python benchmarks/regression_error_rates_history.py           # 1000 trials (~10 min on 2 idle cores)
    .venv/bin/python benchmarks/regression_error_rates_history.py --quick   # 250 trials (~3 min)
    .venv/bin/python benchmarks/regression_error_rates_history.py --spread 0.01 --history 40 --json out.json

Main's history (``--infmax-autosave``: each saved run a fresh server start) has seen the
between-start noise many times; with at least ``CompareOptions.predictive_history`` runs
(20) the gate compares a PR's runs with the history's predictive distribution
(``pytest_infmax/baselines/predictive.py``). This measures that gate, exactly as the
plugin calls it (``compare.compare_runs``, default options), on runs of the embedded
simulator's engine in simulated time (``sim.engine.simulate``: the real-time engine's
scheduler and step costs, with the noise of ``sim/noise.py``, no clock), so thousands of
fresh starts take minutes:

* every run is a fresh start: a new ``StepNoise`` (its own per-start factor) over the
  simulator's default cost model, the noise of ``regression_error_rates_sim.py``
  (``--start-jitter S --prefill-start-jitter S --step-jitter 0.03 --step-drift 0.01
  --stall-rate 0.002``, S = ``--spread``, 2 % by default);
* workload: 1k1k-mini (ISL/OSL uniform in [102, 128]) at concurrency 8, 16 warm-up and
  80 measured requests, the default count (``--scenario 1k1k-micro``: 1k1k scaled by
  1/32, ISL/OSL in [25, 32], as in ``regression_error_rates_sim.py``; its tails are
  rougher: fewer steps, so a stall or none decides p99);
* one trial: a history of H runs (``--history``, 20), then 5 current runs without a
  change (A/A: a ``regressed`` is a false alarm) and 5 with ``slowdown`` 1.05 (every
  step 5 % slower, the simulator's ``--slowdown 1.05``: TPOT +5 %); a PR with m starts
  (``--starts``) uses the first m of each. Trials are independent: nothing is shared;
* two gates: the default one (the 10 default statistics, no price so no cost), whose
  verdict is the worst of its rows, and ``p50(tpot)`` alone.

Beside the measured rates, ``best`` is the most any test can detect at that false-alarm
rate (Neyman-Pearson: one statistic, its run-to-run sd known, a one-sided z test at
alpha 1 %), from the measured sd of log p50 TPOT: ``Phi(d / (sd sqrt(1/H + 1/m)) - z)``.
Intervals are Wilson's 95 % score intervals over independent trials.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from scipy import stats as sps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from regression_error_rates_sim import wilson  # noqa: E402

from pytest_infmax.baselines.compare import DEFAULT_GATES, CompareOptions, compare_runs  # noqa: E402
from pytest_infmax.baselines.store import BaselineRun  # noqa: E402
from pytest_infmax.sim.engine import EngineConfig, LinearCostModel, simulate  # noqa: E402
from pytest_infmax.sim.noise import NoiseConfig, NoisyCostModel, StepNoise  # noqa: E402

SCENARIOS = {"1k1k-mini": 128, "1k1k-micro": 32}  # ISL = OSL: the default count's scenario, and 1/32 of 1k1k
RANGE_RATIO = 0.8
CONCURRENCY = 8
WARMUP = 16
MEASURED = 80
SLOWDOWN = 1.05
CURRENT = 5  # current runs per arm and trial; a PR of m starts uses the first m
GATE_SETS = {"default gate (10 statistics)": None, "p50(tpot) alone": ("p50(tpot)",)}


def noise_config(spread: float, seed: int) -> NoiseConfig:
    return NoiseConfig(
        start_jitter=spread,
        prefill_start_jitter=spread,
        step_jitter=0.03,
        step_drift=0.01,
        stall_rate=0.002,
        start_seed=seed,
    )


def fresh_start_run(
    rng: np.random.Generator, spread: float, slowdown: float = 1.0, scenario: str = "1k1k-mini"
) -> BaselineRun:
    """One run on a fresh start of the simulator's engine, as the gate sees it."""
    length = SCENARIOS[scenario]
    low = int(length * RANGE_RATIO)
    total = WARMUP + MEASURED
    requests = list(
        zip(rng.integers(low, length + 1, size=total).tolist(), rng.integers(low, length + 1, size=total).tolist())
    )
    cost = NoisyCostModel(LinearCostModel(), StepNoise(noise_config(spread, int(rng.integers(2**62)))))
    result = simulate(EngineConfig(slowdown=slowdown), cost, requests, concurrency=CONCURRENCY)
    measured = sorted(result.requests, key=lambda r: r.sent)[WARMUP:]
    wall = max(r.finished for r in measured) - min(r.sent for r in measured)
    tokens = sum(r.prompt_tokens + r.output_tokens for r in measured)
    tpot = [(r.finished - r.first_token) / (r.output_tokens - 1) for r in measured if r.output_tokens > 1]
    return BaselineRun(
        name="t::history",
        samples={"ttft": [r.ttft for r in measured], "tpot": tpot, "e2e": [r.e2e for r in measured]},
        scalars={"throughput_per_gpu": tokens / wall, "throughput": tokens / wall},
        workload={
            "scenario": {"name": scenario, "isl": length, "osl": length, "range_ratio": RANGE_RATIO},
            "concurrency": CONCURRENCY,
        },
    )


def trials_job(
    seed: int,
    trials: int,
    history: int,
    starts: tuple[int, ...],
    spread: float,
    scenario: str = "1k1k-mini",
    gate_sets: tuple[str, ...] = tuple(GATE_SETS),
    classic: bool = False,
) -> dict[str, Any]:
    """Verdict counts per (gate set, starts, arm), and log p50 TPOT of every history run."""
    rng = np.random.default_rng(seed)
    options = {
        name: CompareOptions(gates=gates or DEFAULT_GATES, predictive_history=None if classic else 20)
        for name, gates in GATE_SETS.items()
        if name in gate_sets
    }
    counts: dict[str, Counter[str]] = {}
    p50s: list[list[float]] = []
    for _ in range(trials):
        base = [fresh_start_run(rng, spread, scenario=scenario) for _ in range(history)]
        p50s.append([math.log(float(np.median(r.samples["tpot"]))) for r in base])
        arms = {
            "A/A": [fresh_start_run(rng, spread, scenario=scenario) for _ in range(CURRENT)],
            "+5%": [fresh_start_run(rng, spread, SLOWDOWN, scenario) for _ in range(CURRENT)],
        }
        for name, opts in options.items():
            cache: dict[Any, Any] = {}  # the bootstrap of each run, once per gate set
            for m in starts:
                for arm, current in arms.items():
                    report = compare_runs(base, current[:m], options=opts, cache=cache)
                    target = next((r for r in report.rows if r.label == "p50(tpot)"), None)
                    key = f"{name}|{m}|{arm}"
                    counts.setdefault(key, Counter())
                    counts[key][report.verdict] += 1
                    if target is not None:
                        counts[key]["p50(tpot) " + target.verdict] += 1
    return {"counts": {k: dict(v) for k, v in counts.items()}, "p50": p50s}


def best_detection(sd: float, history: int, m: int, alpha: float = 0.01) -> float:
    """Neyman-Pearson: the most any one-sided test at ``alpha`` detects of a shift log(1.05),
    for one statistic with a known run-to-run sd."""
    se = sd * math.sqrt(1 / history + 1 / m)
    return float(sps.norm.cdf(math.log(SLOWDOWN) / se - sps.norm.ppf(1 - alpha)))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="250 trials instead of 1000 (~3 min)")
    parser.add_argument("--trials", type=int, help="independent trials (default 1000, quick 250)")
    parser.add_argument("--history", type=int, default=20, help="history runs per trial (default 20)")
    parser.add_argument("--starts", default="1,2,3,5", help="fresh starts per PR to tabulate (default 1,2,3,5)")
    parser.add_argument(
        "--scenario", choices=sorted(SCENARIOS), default="1k1k-mini", help="ISL/OSL 128 (default) or 32"
    )
    parser.add_argument(
        "--gate-set", choices=("both", "default", "p50"), default="both", help="which gates to measure (default both)"
    )
    parser.add_argument(
        "--classic", action="store_true", help="the prior-based interval at any history (before the predictive path)"
    )
    parser.add_argument("--spread", type=float, default=0.02, help="per-start sd of step cost (default 0.02)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    trials = args.trials or (250 if args.quick else 1000)
    starts = tuple(sorted({int(s) for s in args.starts.split(",")}))
    if args.history < 3 or not starts or min(starts) < 1 or max(starts) > CURRENT:
        parser.error(f"--history must be >= 3 and --starts between 1 and {CURRENT}")
    names = tuple(GATE_SETS)
    gate_sets = {"both": names, "default": names[:1], "p50": names[1:]}[args.gate_set]
    started = time.time()
    print(
        f"PR gate against a {args.history}-run history on the simulator's engine (simulated time): "
        f"{'prior-based interval; ' if args.classic else ''}{args.scenario} at concurrency {CONCURRENCY}, {WARMUP} + {MEASURED} requests a run, per-start spread "
        f"{args.spread:.1%}, slowdown {SLOWDOWN:g} for detection; {trials} independent trials."
    )
    jobs = max(1, args.jobs)
    sizes = [trials // jobs + (1 if i < trials % jobs else 0) for i in range(jobs)]
    with ProcessPoolExecutor(jobs) as pool:
        parts = list(
            pool.map(
                trials_job,
                [args.seed + i for i in range(jobs)],
                sizes,
                [args.history] * jobs,
                [starts] * jobs,
                [args.spread] * jobs,
                [args.scenario] * jobs,
                [gate_sets] * jobs,
                [args.classic] * jobs,
            )
        )
    counts: dict[str, Counter[str]] = {}
    p50s: list[list[float]] = []
    for part in parts:
        p50s += part["p50"]
        for key, c in part["counts"].items():
            counts.setdefault(key, Counter()).update(c)
    sd = float(np.mean([np.std(h, ddof=1) for h in p50s]))
    print(f"Measured run-to-run sd of log p50 TPOT (mean over histories): {sd:.2%}\n")
    out: dict[str, Any] = {
        "trials": trials,
        "history": args.history,
        "spread": args.spread,
        "scenario": args.scenario,
        "classic": args.classic,
        "p50_tpot_sd": sd,
    }
    rows = []
    print(
        "| gate | starts per PR | false alarms % [95 % CI] | detection of +5 % TPOT % [95 % CI] "
        "| p50(tpot) regressed % | best possible % |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in gate_sets:
        for m in starts:
            aa, slow = counts[f"{name}|{m}|A/A"], counts[f"{name}|{m}|+5%"]
            fa, det, tgt = aa["regressed"], slow["regressed"], slow["p50(tpot) regressed"]
            fa_ci, det_ci = wilson(fa, trials), wilson(det, trials)
            best = best_detection(sd, args.history, m)
            print(
                f"| {name} | {m} | {_pct(fa / trials)} [{_pct(fa_ci[0])}, {_pct(fa_ci[1])}] "
                f"| {_pct(det / trials)} [{_pct(det_ci[0])}, {_pct(det_ci[1])}] | {_pct(tgt / trials)} | {_pct(best)} |"
            )
            rows.append(
                {
                    "gate": name,
                    "starts": m,
                    "false_alarms": fa,
                    "false_alarm_ci": fa_ci,
                    "detected": det,
                    "detection_ci": det_ci,
                    "p50_tpot_regressed": tgt,
                    "best_possible": best,
                    "aa_verdicts": {k: v for k, v in aa.items() if " " not in k},
                    "slow_verdicts": {k: v for k, v in slow.items() if " " not in k},
                }
            )
    out["rows"] = rows
    needed = next((m for m in range(1, 200) if best_detection(sd, args.history, m) >= 0.95), None)
    print(
        f"\nBest possible with {args.history} history runs: 95 % detection at 1 % false alarms needs "
        f"{needed if needed else 'more than 200'} starts per PR at this sd."
    )
    print(f"({time.time() - started:.0f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The regression gate's error rates against the real simulator, next to the synthetic generator's.

    .venv/bin/python benchmarks/regression_error_rates_sim.py           # 40 + 20 fresh starts (~4 min on 2 cores)
    .venv/bin/python benchmarks/regression_error_rates.py --simulator   # the same
    .venv/bin/python benchmarks/regression_error_rates_sim.py --quick   # 16 + 8 starts (~1.5 min)
    .venv/bin/python benchmarks/regression_error_rates_sim.py --save-pools pools.json
    .venv/bin/python benchmarks/regression_error_rates_sim.py --load-pools pools.json   # analysis only

``regression_error_rates.py`` measures the gate on synthetic runs (hundreds of
thousands of them). This checks those numbers against the real thing: the embedded
simulator, started through the plugin's own launcher (``servers.start_server``), a
fresh start per run, with the synthetic generator's noise switched on by the
simulator's noise flags (``--start-jitter 0.02 --prefill-start-jitter 0.02
--step-jitter 0.03 --step-drift 0.01 --stall-rate 0.002``), each run measured by the
plugin's load generator and turned into the gate's runs by ``baselines.runs_of``, as
``--infmax-repeat`` does.

What it does:

1. a pool of fresh-start runs without a regression and a smaller one with
   ``--slowdown 1.05`` (every step 5 % slower: TPOT +5 %, and TTFT), interleaved so
   that the host's own load drifts over both alike. Workload: 1k1k scaled by 1/32
   (ISL/OSL uniform in [25, 32]) at concurrency 8, 16 warm-up and 80 measured
   requests (the default count), the simulator's default costs: about 1.7 s a run;
2. the runs' own spread: run-to-run sd of each statistic, real against synthetic
   (the quantity that decides the gate's error rates), and how the drawn start
   factors (``/sim/stats``) track p50 TPOT;
3. comparisons resampled from the pools through ``compare.compare_runs`` (the
   plugin's gate, default options): A/A draws baseline and current runs from the
   no-slowdown pool without overlap (a ``regressed`` is a false alarm); detection
   draws the baseline from it and the current runs from the slowdown pool;
4. beside them, what the synthetic generator predicts for the same configuration
   (same workload, same noise, the same slowdown of every step; it does not model
   the host): from independent runs, and from pools of the real pools' size
   resampled the same way (several such pools, to show how far a finite pool's
   resampled rate strays).

Resampled comparisons from a finite pool are **not independent**: two comparisons
share runs, so the Wilson interval over them (reported) is too narrow. A pool of P
runs holds only P / (k + n) disjoint k-vs-n comparisons; the second interval is
Wilson's at that count (too wide). The synthetic pools' spread shows the real
uncertainty. A false-alarm rate of 1 % cannot be confirmed from 40 runs: what this
can confirm is the noise (the run-to-run spread) and detection rates well away from
0 and 100 %.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from regression_error_rates import Noise, Workload, simulate_run  # noqa: E402

from pytest_infmax.baselines.compare import CompareOptions, compare_runs  # noqa: E402
from pytest_infmax.baselines.store import BaselineRun, runs_of  # noqa: E402
from pytest_infmax.load.scenarios import Scenario  # noqa: E402
from pytest_infmax.run.runner import Infmax  # noqa: E402
from pytest_infmax.servers.launch import ServerConfig, start_server  # noqa: E402

#: 1k1k at 1/32: about 370 engine steps of ~4.5 ms per run
SCENARIO = Scenario("1k1k-micro", 32, 32)
WORKLOAD = Workload(isl=32, osl=32)  # concurrency 8, 80 measured + 16 warm-up, the simulator's default costs
#: the synthetic generator's noise minus its per-request stream delays (the simulator has none)
NOISE = dataclasses.replace(Noise(), slow_request_rate=0.0, slow_request_ms=(0.0, 0.0))
SLOWDOWN = 1.05
#: (baseline runs, current runs)
SETUPS: tuple[tuple[int, int], ...] = ((10, 1), (10, 5), (10, 10), (10, 20))
QUICK_SETUPS: tuple[tuple[int, int], ...] = ((5, 1), (5, 3), (5, 8))
STATS = (
    ("p50(tpot)", "tpot", 50),
    ("p50(ttft)", "ttft", 50),
    ("p99(ttft)", "ttft", 99),
    ("p50(e2e)", "e2e", 50),
    ("throughput", None, None),
)


def sim_args(noise: Noise, slowdown: float = 1.0) -> tuple[str, ...]:
    """The simulator flags that reproduce the synthetic generator's ``noise``."""
    args = [
        "--decode-step-ms",
        f"{WORKLOAD.decode_ms:g}",
        "--decode-ms-per-seq",
        f"{WORKLOAD.per_seq_ms:g}",
        "--prefill-ms-per-1k-tokens",
        f"{WORKLOAD.prefill_ms_per_1k:g}",
        "--start-jitter",
        f"{noise.start_decode:g}",
        "--prefill-start-jitter",
        f"{noise.start_prefill:g}",
        "--step-jitter",
        f"{noise.step_jitter:g}",
        "--step-drift",
        f"{noise.drift:g}",
        "--step-drift-steps",
        f"{noise.drift_steps:g}",
        "--stall-rate",
        f"{noise.hiccup_rate:g}",
        "--stall-ms",
        f"{noise.hiccup_ms[0]:g},{noise.hiccup_ms[1]:g}",
    ]
    if slowdown != 1.0:
        args += ["--slowdown", f"{slowdown:g}"]
    return tuple(args)


# -- the real simulator -------------------------------------------------------------------------------


def _schedule(n_base: int, n_slow: int) -> list[bool]:
    """Which runs are slowed down: spread evenly through the sequence."""
    total = n_base + n_slow
    return [(i + 1) * n_slow // total > i * n_slow // total for i in range(total)]


def collect_pools(n_base: int, n_slow: int, log_dir: Path, log: Any = print) -> dict[str, Any]:
    """Fresh-start runs of the real simulator: ``n_base`` plain and ``n_slow`` with --slowdown."""
    pools: dict[str, Any] = {"base": [], "slow": [], "base_info": [], "slow_info": []}
    started = time.monotonic()
    schedule = _schedule(n_base, n_slow)
    for i, slow in enumerate(schedule):
        config = ServerConfig(sim_args=sim_args(NOISE, SLOWDOWN if slow else 1.0), startup_timeout=60)
        server = start_server(config, log_dir)
        try:
            result = Infmax(server, name="sim").run(
                SCENARIO, concurrency=WORKLOAD.concurrency, num_requests=WORKLOAD.num_requests, warmup=WORKLOAD.warmup
            )
            with urllib.request.urlopen(f"{server.base_url}/sim/stats", timeout=10) as response:
                engine = json.loads(response.read())
        finally:
            server.stop()
        if result.metrics.num_ok != WORKLOAD.num_requests:
            raise RuntimeError(f"run {i}: {result.metrics.num_ok} of {WORKLOAD.num_requests} requests succeeded")
        (run,) = runs_of(result)
        key = "slow" if slow else "base"
        pools[key].append(run)
        pools[key + "_info"].append(
            {
                "start_factor": engine["noise"]["start_factor"],
                "prefill_start_factor": engine["noise"]["prefill_start_factor"],
                "stalls": engine["noise"]["stalls"],
                "steps": engine["noise"]["steps"],
                "lateness_p99_ms": engine["lateness_ms"]["p99"],
                "startup_s": server.startup_seconds,
            }
        )
        if (i + 1) % 10 == 0 or i + 1 == len(schedule):
            log(f"  {i + 1}/{len(schedule)} fresh starts ({time.monotonic() - started:.0f} s)")
    pools["seconds"] = time.monotonic() - started
    return pools


def save_pools(pools: dict[str, Any], path: str) -> None:
    doc = {k: ([dataclasses.asdict(r) for r in v] if k in ("base", "slow") else v) for k, v in pools.items()}
    Path(path).write_text(json.dumps(doc))


def load_pools(path: str) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    for key in ("base", "slow"):
        doc[key] = [BaselineRun(**r) for r in doc[key]]
    return doc


# -- statistics ----------------------------------------------------------------------------------------


def wilson(count: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's 95 % score interval for a binomial proportion."""
    if total <= 0:
        return 0.0, 1.0
    p = count / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def run_value(run: BaselineRun, metric: str | None, q: float | None) -> float:
    if metric is None:
        return float(run.scalars["throughput_per_gpu"] or 0.0)
    return float(np.percentile(run.samples[metric], q))


def spread(runs: list[BaselineRun]) -> dict[str, dict[str, float]]:
    """Per statistic: geometric mean and run-to-run sd of the log, with a 95 % chi-square interval."""
    out = {}
    for label, metric, q in STATS:
        logs = np.log([run_value(r, metric, q) for r in runs])
        n = len(logs)
        sd = float(np.std(logs, ddof=1))
        lo = sd * math.sqrt((n - 1) / sps.chi2.ppf(0.975, n - 1))
        hi = sd * math.sqrt((n - 1) / sps.chi2.ppf(0.025, n - 1))
        out[label] = {"mean": float(np.exp(logs.mean())), "sd": sd, "sd_lo": lo, "sd_hi": hi, "n": n}
    return out


def resampled(
    base: list[BaselineRun], slow: list[BaselineRun], setups: tuple[tuple[int, int], ...], reps: int, seed: int
) -> dict[tuple[int, int, str], Counter]:
    """Verdicts of comparisons resampled from the pools: A/A from ``base`` without overlap,
    detection with the current runs from ``slow``."""
    rng = np.random.default_rng(seed)
    opts = CompareOptions()
    out: dict[tuple[int, int, str], Counter] = {}
    for k, n in setups:
        for effect in ("A/A", "slow"):
            if (effect == "A/A" and k + n > len(base)) or (effect == "slow" and (n > len(slow) or k > len(base))):
                continue
            counts: Counter = Counter()
            for _ in range(reps):
                order = rng.permutation(len(base))
                baseline = [base[j] for j in order[:k]]
                if effect == "A/A":
                    current = [base[j] for j in order[k : k + n]]
                else:
                    current = [slow[j] for j in rng.permutation(len(slow))[:n]]
                report = compare_runs(baseline, current, options=opts)
                _count(counts, report)
            out[(k, n, effect)] = counts
    return out


def _count(counts: Counter, report: Any) -> None:
    target = next(r for r in report.rows if r.label == "p50(tpot)")
    counts["gate_" + report.verdict] += 1
    counts["tpot_" + target.verdict] += 1
    counts["total"] += 1
    for row in report.rows:
        if row.verdict == "regressed":
            counts["row_" + row.label] += 1


def synthetic_pool(rng: np.random.Generator, size: int, slowdown: float = 1.0) -> list[BaselineRun]:
    return [simulate_run(rng, WORKLOAD, NOISE, slowdown=slowdown) for _ in range(size)]


def synthetic_independent_job(setups: tuple[tuple[int, int], ...], reps: int, seed: int) -> dict:
    """The synthetic generator's prediction: every comparison from fresh runs."""
    rng = np.random.default_rng(seed)
    opts = CompareOptions()
    out: dict = {}
    for k, n in setups:
        for effect in ("A/A", "slow"):
            counts: Counter = Counter()
            for _ in range(reps):
                baseline = synthetic_pool(rng, k)
                current = synthetic_pool(rng, n, SLOWDOWN if effect == "slow" else 1.0)
                _count(counts, compare_runs(baseline, current, options=opts))
            out[(k, n, effect)] = counts
    return out


def synthetic_pools_job(
    setups: tuple[tuple[int, int], ...], n_base: int, n_slow: int, pools: int, reps: int, seed: int
) -> dict:
    """Synthetic pools of the real pools' sizes, resampled as the real ones are: one rate per pool."""
    rng = np.random.default_rng(seed)
    rates: dict = {}
    for p in range(pools):
        base, slow = synthetic_pool(rng, n_base), synthetic_pool(rng, n_slow, SLOWDOWN)
        for key, counts in resampled(base, slow, setups, reps, seed * 1000 + p).items():
            rates.setdefault(key, []).append(counts["gate_regressed"] / counts["total"])
    return rates


def synthetic_spread_job(size: int, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    return spread(synthetic_pool(rng, size)), spread(synthetic_pool(rng, size, SLOWDOWN))


# -- report --------------------------------------------------------------------------------------------


def _merge_counts(parts: list[dict]) -> dict:
    merged: dict = {}
    for part in parts:
        for key, counts in part.items():
            merged.setdefault(key, Counter()).update(counts)
    return merged


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(lo: float, hi: float) -> str:
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 + 8 fresh starts and smaller setups (~1.5 min)")
    parser.add_argument("--pool", type=int, help="fresh-start runs without a regression (default 40, quick 16)")
    parser.add_argument(
        "--slow-pool", type=int, help=f"fresh-start runs with --slowdown {SLOWDOWN:g} (default 20, quick 8)"
    )
    parser.add_argument("--reps", type=int, help="resampled comparisons per setup and effect (default 200, quick 100)")
    parser.add_argument("--synthetic-pools", type=int, help="synthetic pools of the same sizes (default 6, quick 4)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes for the synthetic part (default 2)")
    parser.add_argument("--seed", type=int, default=20250602)
    parser.add_argument("--save-pools", help="write the real runs here (JSON) for --load-pools")
    parser.add_argument("--load-pools", help="analyse runs saved by --save-pools instead of starting the simulator")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    n_base = args.pool or (16 if args.quick else 40)
    n_slow = args.slow_pool or (8 if args.quick else 20)
    reps = args.reps or (100 if args.quick else 200)
    n_pools = args.synthetic_pools or (4 if args.quick else 6)
    setups = QUICK_SETUPS if args.quick else SETUPS
    started = time.time()

    print(
        f"Regression gate error rates against the real simulator ({SCENARIO.name}: ISL/OSL "
        f"[{int(SCENARIO.isl * SCENARIO.range_ratio)}, {SCENARIO.isl}], concurrency {WORKLOAD.concurrency}, "
        f"{WORKLOAD.warmup} warm-up + {WORKLOAD.num_requests} measured requests per run)."
    )
    print("Simulator flags: " + " ".join(sim_args(NOISE)))
    if args.load_pools:
        pools = load_pools(args.load_pools)
        print(f"Runs from {args.load_pools}: {len(pools['base'])} plain, {len(pools['slow'])} slowed.")
    else:
        print(f"Collecting {n_base} fresh starts and {n_slow} with --slowdown {SLOWDOWN:g} (interleaved)...")
        with tempfile.TemporaryDirectory(prefix="infmax-sim-rates-") as logs:
            pools = collect_pools(n_base, n_slow, Path(logs))
        if args.save_pools:
            save_pools(pools, args.save_pools)
    base, slow = pools["base"], pools["slow"]
    n_base, n_slow = len(base), len(slow)

    # Run-to-run spread, real against synthetic.
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        spread_f = pool.submit(synthetic_spread_job, 400, args.seed)
        chunks = max(1, args.jobs)
        indep_f = [
            pool.submit(synthetic_independent_job, setups, reps // chunks + (i < reps % chunks), args.seed + 1 + i)
            for i in range(chunks)
        ]
        per = [n_pools // chunks + (i < n_pools % chunks) for i in range(chunks)]
        pools_f = [
            pool.submit(synthetic_pools_job, setups, n_base, n_slow, count, max(20, reps // 4), args.seed + 100 + i)
            for i, count in enumerate(per)
            if count
        ]
        real = resampled(base, slow, setups, reps, args.seed + 7)
        syn_spread, syn_slow_spread = spread_f.result()
        indep = _merge_counts([f.result() for f in indep_f])
        pool_rates: dict = {}
        for f in pools_f:
            for key, values in f.result().items():
                pool_rates.setdefault(key, []).extend(values)

    real_spread, real_slow_spread = spread(base), spread(slow)
    print(f"\nRun-to-run spread ({n_base} real fresh starts; synthetic: 400 runs of the same configuration):")
    print(
        f"{'statistic':12s} {'real mean':>11s} {'synthetic':>11s} {'real sd %':>10s} {'95% interval':>15s} "
        f"{'synthetic sd %':>15s}"
    )
    for label, *_ in STATS:
        r, s = real_spread[label], syn_spread[label]
        unit = 1 if label == "throughput" else 1e3
        print(
            f"{label:12s} {r['mean'] * unit:11.3f} {s['mean'] * unit:11.3f} {100 * r['sd']:10.2f} "
            f"{_ci(r['sd_lo'], r['sd_hi']):>15s} {100 * s['sd']:15.2f}"
        )
    print("(means in ms, throughput in tok/s/gpu)")
    factors = np.log([i["start_factor"] for i in pools["base_info"]])
    tpot = np.log([run_value(r, "tpot", 50) for r in base])
    corr = (
        float(np.corrcoef(factors, tpot)[0, 1])
        if len(base) > 2 and np.std(factors) > 0 and np.std(tpot) > 0
        else float("nan")
    )
    print(
        f"drawn start factors (/sim/stats): sd {100 * float(np.std(factors, ddof=1)):.2f} % of the asked "
        f"{100 * NOISE.start_decode:g} %; correlation of log start factor with log p50 TPOT: {corr:.2f}"
    )
    effect_real = real_slow_spread["p50(tpot)"]["mean"] / real_spread["p50(tpot)"]["mean"] - 1
    effect_syn = syn_slow_spread["p50(tpot)"]["mean"] / syn_spread["p50(tpot)"]["mean"] - 1
    print(
        f"--slowdown {SLOWDOWN:g} moved mean p50 TPOT by {100 * effect_real:+.1f} % (real, {n_slow} vs {n_base} "
        f"runs) and {100 * effect_syn:+.1f} % (synthetic)"
    )
    lateness = [i["lateness_p99_ms"] for i in pools["base_info"] + pools["slow_info"]]
    print(f"host timing: p99 step lateness per run, median {np.median(lateness):.2f} ms, max {max(lateness):.2f} ms")

    print(
        f"\nVerdicts: real = {reps} comparisons resampled from the pools (NOT independent: they share runs); "
        f"synthetic = {reps // chunks * chunks} independent comparisons"
    )
    print(
        f"of fresh synthetic runs, and the same resampling from {n_pools} synthetic pools of {n_base} + {n_slow} "
        "runs (mean and range of their rates)."
    )
    print(
        "'regr.%' = the comparison's verdict is regressed (any of the 10 default gates); 'tpot%' = p50(tpot) "
        "regressed. A/A: a false alarm;"
    )
    print(
        f"slowdown: --slowdown {SLOWDOWN:g} on the current runs (detection). Intervals: Wilson 95 %; "
        "'n_eff' = the disjoint comparisons the pool holds.\n"
    )
    header = (
        f"{'setup':9s} {'effect':8s} | {'real regr.%':>11s} {'Wilson, resamples':>17s} {'n_eff':>5s} "
        f"{'Wilson, n_eff':>14s} {'tpot%':>6s} | {'synthetic':>9s} {'Wilson':>13s} {'tpot%':>6s} | "
        f"{'synthetic pools':>19s}"
    )
    print(header)
    print("-" * len(header))
    table = []
    for (k, n, effect), counts in real.items():
        total = counts["total"]
        hits = counts["gate_regressed"]
        n_eff = n_base // (k + n) if effect == "A/A" else min(n_base // k, n_slow // n)
        eff_hits = round(hits / total * n_eff)
        ind = indep[(k, n, effect)]
        ind_total = ind["total"]
        rates = pool_rates.get((k, n, effect), [])
        label = "A/A" if effect == "A/A" else f"x{SLOWDOWN:g}"
        row = {
            "baseline_runs": k,
            "current_runs": n,
            "effect": effect,
            "real": {
                "comparisons": total,
                "regressed": hits / total,
                "wilson": wilson(hits, total),
                "n_eff": n_eff,
                "wilson_n_eff": wilson(eff_hits, n_eff),
                "tpot_regressed": counts["tpot_regressed"] / total,
                "verdicts": {k2: v for k2, v in counts.items() if k2 != "total"},
            },
            "synthetic_independent": {
                "comparisons": ind_total,
                "regressed": ind["gate_regressed"] / ind_total,
                "wilson": wilson(ind["gate_regressed"], ind_total),
                "tpot_regressed": ind["tpot_regressed"] / ind_total,
                "verdicts": {k2: v for k2, v in ind.items() if k2 != "total"},
            },
            "synthetic_pools": {"rates": rates},
        }
        table.append(row)
        pools_text = f"{_pct(float(np.mean(rates)))} [{_pct(min(rates))}-{_pct(max(rates))}]" if rates else "n/a"
        print(
            f"{f'{k} vs {n}':9s} {label:8s} | {_pct(hits / total):>11s} {_ci(*wilson(hits, total)):>17s} "
            f"{n_eff:5d} {_ci(*wilson(eff_hits, n_eff)):>14s} {_pct(counts['tpot_regressed'] / total):>6s} | "
            f"{_pct(ind['gate_regressed'] / ind_total):>9s} {_ci(*wilson(ind['gate_regressed'], ind_total)):>13s} "
            f"{_pct(ind['tpot_regressed'] / ind_total):>6s} | {pools_text:>19s}"
        )
    print("\nWhich gates fired (regressed rows over all comparisons; A/A: the false alarms):")
    for (k, n, effect), counts in real.items():

        def fired(c: Counter) -> str:
            rows = sorted(((v, key[4:]) for key, v in c.items() if key.startswith("row_")), reverse=True)
            return ", ".join(f"{label} {v}" for v, label in rows) or "none"

        label = "A/A" if effect == "A/A" else f"x{SLOWDOWN:g}"
        print(f"  {f'{k} vs {n}':9s} {label:6s} real: {fired(counts)}; synthetic: {fired(indep[(k, n, effect)])}")
    print(
        "\nThe resampled rates share runs: read them against the synthetic pools' range (what a pool of this "
        "size gives\nwhen the truth is the synthetic column), not against the Wilson interval over resamples."
    )
    print(f"\n({time.time() - started:.0f} s; fresh starts {pools.get('seconds', 0):.0f} s)")
    if args.json:
        doc = {
            "scenario": SCENARIO.to_dict(),
            "sim_args": list(sim_args(NOISE)),
            "slowdown": SLOWDOWN,
            "pool": n_base,
            "slow_pool": n_slow,
            "spread": {"real": real_spread, "real_slowed": real_slow_spread, "synthetic": syn_spread},
            "start_factor_sd": float(np.std(factors, ddof=1)),
            "start_factor_tpot_correlation": corr,
            "slowdown_effect": {"real": effect_real, "synthetic": effect_syn},
            "run_info": {"base": pools["base_info"], "slow": pools["slow_info"]},
            "verdicts": table,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

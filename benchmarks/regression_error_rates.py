"""Measured error rates of the regression gate (pytest_infmax.baselines.compare) under realistic noise.

    .venv/bin/python benchmarks/regression_error_rates.py           # the full tables (~3 min on 2 cores)
    .venv/bin/python benchmarks/regression_error_rates.py --quick   # fewer comparisons (~40 s)
    .venv/bin/python benchmarks/regression_error_rates.py --json out.json
    .venv/bin/python benchmarks/regression_error_rates.py --simulator   # against the real simulator (~4 min):
                                                # regression_error_rates_sim.py, options passed on

What it measures, at the default request count (1k1k-mini, concurrency 8: 16 warm-up
and 80 measured requests per run):

1. the gate's verdicts over many A/A comparisons (no change: "regressed" is a false
   alarm) and over comparisons with an injected slowdown of TPOT or TTFT (2, 5, 10 %,
   and 2x), for several history lengths (baseline runs) and repeats (current runs);
2. the same for the alternative designs: Mann-Whitney U on pooled per-request
   samples (treating a run's requests as independent), and fixed-percentage gates;
3. the sequential option: false alarms and detection when deciding after each
   batch of 8 requests, against naive repeated Mann-Whitney peeking;
4. a calibration check of the synthetic generator (noise off) against the
   simulator's own engine model in simulated time.

Runs come from a synthetic generator (below), not from the real-time simulator:
hundreds of thousands of server starts would take days in real time on 2 cores.
``--simulator`` (``regression_error_rates_sim.py``) checks the generator against the
real simulator, whose noise flags (``--start-jitter`` and friends) reproduce this
noise model, at a scale that fits a few minutes.

The generator
-------------
Running the real simulator hundreds of times in real time is too slow on a small
CI machine, so this reproduces what matters for the statistics, in simulated time:

* **closed-loop continuous batching** (the simulator's and vLLM's step loop): N
  requests in flight; every engine step decodes one token for each running
  request and prefills the requests that arrived before it started; a finished
  request's replacement is sent when its last token reaches the client and joins
  the first step that starts after it arrives. Requests in flight share step
  times, so their TPOT and TTFT are correlated, as on a real server;
* **per-step jitter** within a run: lognormal, sd 3 % per step (kernel-time and
  launch jitter), plus a slow drift (AR(1), sd 1 %, ~200-step memory: clocks
  following temperature);
* **a per-start factor** between runs: lognormal sd 2 % on every step's cost
  (memory clock, GPU and NUMA placement, allocator state after warm-up) and a
  further 2 % on prefill cost (compute-bound prefill follows the SM boost clock,
  which varies with temperature and power limits): 2 % on decode, 2.8 % on prefill,
  inside the 2-3 % the issue asks for. Sinha et al. ("Not All GPUs Are Created
  Equal", SC'22, arXiv:2208.11035) measured about 8 % average performance variation
  between GPUs of one SKU in production clusters; a range over many GPUs spans 4-5
  standard deviations, so 2 % sd for landing on another GPU, before start-to-start
  effects on the same GPU;
* **stragglers**: a 0.2 % chance per step of a 5-30 ms stall (GC pause, CPU
  preemption of the scheduler), and a 1 % chance per request of a 5-20 ms
  front-end delay of its stream (tokenizer, queueing in the API server);
* client/network overhead of about 0.2 ms each way.

Together this gives run-to-run sds of about 2.5 % for p50 TPOT, E2E and TTFT and
for throughput, 5 % for p90 TTFT and 20 % for p99 TTFT (the p99 of 80 requests is
nearly their maximum, and stragglers dominate it).

Costs default to the simulator's (``--decode-step-ms 4 --decode-ms-per-seq 0.05
--prefill-ms-per-1k-tokens 20``), the scenario to 1k1k-mini (ISL/OSL uniform in
[102, 128]) at concurrency 8 with 16 warm-up and 80 measured requests.

Injected regressions: ``tpot_effect`` multiplies the decode part of every step
(a slower decode kernel; TTFT grows too, by less); ``ttft_effect`` slows the prefill
part of every step (a slower prefill kernel) by as much as makes the noise-free
median TTFT grow by that fraction (+5 % TTFT is +24 % prefill cost here; TPOT grows
by 0.7 % with it, as prefill steps interleave with decode). A delay in front of
the engine would not do: in a closed loop requests arrive while a step runs, and a
delay shorter than the rest of that step changes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter
from scipy.stats import mannwhitneyu

from pytest_infmax.baselines.compare import CompareOptions, compare_runs
from pytest_infmax.baselines.sequential import SequentialComparison
from pytest_infmax.baselines.store import BaselineRun


@dataclass(frozen=True)
class Workload:
    concurrency: int = 8
    num_requests: int = 80
    warmup: int = 16
    isl: int = 128
    osl: int = 128
    range_ratio: float = 0.8
    decode_ms: float = 4.0
    per_seq_ms: float = 0.05
    prefill_ms_per_1k: float = 20.0


@dataclass(frozen=True)
class Noise:
    step_jitter: float = 0.03
    drift: float = 0.01
    drift_steps: float = 200.0
    start_decode: float = 0.02
    start_prefill: float = 0.02
    hiccup_rate: float = 0.002
    hiccup_ms: tuple[float, float] = (5.0, 30.0)
    slow_request_rate: float = 0.01
    slow_request_ms: tuple[float, float] = (5.0, 20.0)
    network_ms: float = 0.2

    @classmethod
    def none(cls) -> Noise:
        return cls(0.0, 0.0, 200.0, 0.0, 0.0, 0.0, (0.0, 0.0), 0.0, (0.0, 0.0), 0.2)


_NOMINAL_TTFT: dict[Workload, float] = {}


def nominal_ttft(workload: Workload) -> float:
    """Median TTFT of a noise-free run of this workload (seconds)."""
    if workload not in _NOMINAL_TTFT:
        run = simulate_run(np.random.default_rng(0), workload, Noise.none())
        _NOMINAL_TTFT[workload] = float(np.median(run.samples["ttft"]))
    return _NOMINAL_TTFT[workload]


def simulate_run(
    rng: np.random.Generator,
    workload: Workload = Workload(),
    noise: Noise = Noise(),
    *,
    tpot_effect: float = 0.0,
    ttft_effect: float = 0.0,
    name: str = "synthetic",
    start_factors: tuple[float, float] | None = None,
    slowdown: float = 1.0,
) -> BaselineRun:
    """One run (one server start) as a BaselineRun: per-request samples in send order.

    ``slowdown`` multiplies every step's duration, stalls included (the simulator's
    ``--slowdown``), where ``tpot_effect`` slows decode only."""
    wl = workload
    # a slower prefill kernel, sized so that the noise-free median TTFT grows by ttft_effect
    mean_isl = (int(wl.isl * wl.range_ratio) + wl.isl) / 2
    prefill_scale = 1 + ttft_effect * nominal_ttft(wl) / (wl.prefill_ms_per_1k / 1e6 * mean_isl) if ttft_effect else 1.0
    total = wl.warmup + wl.num_requests
    lo_i, lo_o = int(wl.isl * wl.range_ratio), int(wl.osl * wl.range_ratio)
    isl = rng.integers(lo_i, wl.isl + 1, size=total).tolist()
    osl = rng.integers(lo_o, wl.osl + 1, size=total).tolist()
    if start_factors is None:
        f_dec = math.exp(rng.normal(0, noise.start_decode)) if noise.start_decode else 1.0
        f_pre = f_dec * (math.exp(rng.normal(0, noise.start_prefill)) if noise.start_prefill else 1.0)
    else:
        f_dec, f_pre = start_factors
    dec = wl.decode_ms / 1000 * f_dec * (1 + tpot_effect) * slowdown
    per_seq = wl.per_seq_ms / 1000 * f_dec * (1 + tpot_effect) * slowdown
    pre = wl.prefill_ms_per_1k / 1e6 * f_pre * prefill_scale * slowdown

    max_steps = int(total * wl.osl / wl.concurrency * 1.3) + 4 * wl.osl + 100
    mult = np.ones(max_steps)
    if noise.step_jitter:
        mult *= np.exp(rng.normal(0, noise.step_jitter, max_steps))
    if noise.drift:
        phi = math.exp(-1 / noise.drift_steps)
        eps = rng.normal(0, noise.drift * math.sqrt(1 - phi * phi), max_steps)
        eps[0] = rng.normal(0, noise.drift)
        mult *= np.exp(lfilter([1.0], [1.0, -phi], eps))
    stall = np.zeros(max_steps)
    if noise.hiccup_rate:
        hit = rng.random(max_steps) < noise.hiccup_rate
        stall[hit] = rng.uniform(*noise.hiccup_ms, hit.sum()) / 1000 * slowdown
    mult_l = mult.tolist()
    stall_l = stall.tolist()
    net = noise.network_ms / 1000
    net_jitter = rng.lognormal(0, 0.3, size=(total, 2)) * net
    slow = np.zeros(total)
    if noise.slow_request_rate:
        hit = rng.random(total) < noise.slow_request_rate
        slow[hit] = rng.uniform(*noise.slow_request_ms, hit.sum()) / 1000
    slow_l = slow.tolist()

    sent = [0.0] * total  # client send time
    arrive = [0.0] * total  # at the server
    first = [0.0] * total  # first token seen by the client
    end = [0.0] * total  # last token seen by the client
    waiting: list[int] = []
    for i in range(min(wl.concurrency, total)):
        sent[i] = 0.0
        arrive[i] = net_jitter[i, 0]
        waiting.append(i)
    next_req = min(wl.concurrency, total)
    running: list[list[int]] = []  # [request, tokens still to emit]
    delay = [0.0] * total  # front-end delay of this request's stream
    t = 0.0
    step = 0
    done = 0
    while done < total:
        if step >= max_steps:
            raise RuntimeError("synthetic run did not finish; raise max_steps")
        joining = [r for r in waiting if arrive[r] < t]  # arriving as a step starts: the next one
        if not running and not joining:  # idle until the next arrival
            t = min(arrive[r] for r in waiting) + 1e-9
            continue
        if joining:
            waiting = [r for r in waiting if arrive[r] >= t]
        cost = dec + per_seq * len(running) + pre * sum(isl[r] for r in joining)
        t += cost * mult_l[step] + stall_l[step]
        step += 1
        finished = []
        keep = []
        for item in running:
            item[1] -= 1
            if item[1] == 0:
                finished.append(item[0])
            else:
                keep.append(item)
        for r in joining:
            out_net = net_jitter[r, 1]
            delay[r] = slow_l[r] + out_net
            first[r] = t + delay[r]
            if osl[r] - 1 == 0:
                finished.append(r)
            else:
                keep.append([r, osl[r] - 1])
        running = keep
        for r in finished:
            end[r] = t + delay[r]
            done += 1
            if next_req < total:
                sent[next_req] = end[r]
                arrive[next_req] = end[r] + net_jitter[next_req, 0]
                waiting.append(next_req)
                next_req += 1

    measured = range(wl.warmup, total)
    order = sorted(measured, key=lambda r: sent[r])
    ttft = [first[r] - sent[r] for r in order]
    e2e = [end[r] - sent[r] for r in order]
    tpot = [(end[r] - first[r]) / (osl[r] - 1) for r in order if osl[r] > 1]
    wall = max(end[r] for r in measured) - min(sent[r] for r in measured)
    tokens = sum(isl[r] + osl[r] for r in measured)
    tput = tokens / wall
    samples = {"ttft": ttft, "tpot": tpot, "e2e": e2e, "itl_mean": tpot, "itl_max": []}
    scalars: dict[str, float | None] = {
        "throughput_per_gpu": tput,
        "throughput": tput,
        "num_requests": float(wl.num_requests),
        "num_ok": float(wl.num_requests),
        "error_rate": 0.0,
        "duration": wall,
        "num_gpus": 1.0,
    }
    workload = {
        "scenario": {
            "name": "1k1k-mini",
            "isl": wl.isl,
            "osl": wl.osl,
            "range_ratio": wl.range_ratio,
            "endpoint": "completions",
        },
        "concurrency": wl.concurrency,
        "rate": None,
        "rate_infinite": False,
        "burstiness": 1.0,
        "max_concurrency": None,
        "extra_body": {},
        "num_requests": wl.num_requests,
        "warmup": wl.warmup,
        "duration": None,
        "seed": 0,
    }
    return BaselineRun(name=name, samples=samples, scalars=scalars, workload=workload)


# -- experiments -------------------------------------------------------------------------------

#: (label, which metric the slowdown hits, size)
EFFECTS: tuple[tuple[str, str | None, float], ...] = (
    ("A/A (none)", None, 0.0),
    ("TPOT +2%", "tpot", 0.02),
    ("TPOT +5%", "tpot", 0.05),
    ("TPOT +10%", "tpot", 0.10),
    ("TTFT +2%", "ttft", 0.02),
    ("TTFT +5%", "ttft", 0.05),
    ("TTFT +10%", "ttft", 0.10),
    ("TPOT 2x", "tpot", 1.00),
)
REQUIREMENT_EFFECTS = tuple(e for e in EFFECTS if e[0] in ("A/A (none)", "TPOT +5%", "TPOT +10%"))
#: (baseline runs, current runs): every effect
SETUPS: tuple[tuple[int, int], ...] = ((1, 1), (10, 1), (10, 10))
#: history and repeats needed: A/A, TPOT +5 % and +10 % only
REQUIREMENT_SETUPS: tuple[tuple[int, int], ...] = ((3, 1), (10, 3), (10, 5), (10, 20), (20, 20))
QUICK_SETUPS: tuple[tuple[int, int], ...] = ((1, 1), (10, 1), (10, 10))
QUICK_REQUIREMENT_SETUPS: tuple[tuple[int, int], ...] = ((10, 5), (20, 20))
#: the same on a quiet testbed (QUIET)
QUIET_SETUPS: tuple[tuple[int, int], ...] = ((10, 1), (10, 3), (10, 5))
VERDICTS = ("regressed", "unsure", "same", "improved")


def _current(
    rng: np.random.Generator,
    n: int,
    kind: str | None,
    size: float,
    workload: Workload = Workload(),
    noise: Noise = Noise(),
) -> list[BaselineRun]:
    return [
        simulate_run(
            rng,
            workload,
            noise,
            tpot_effect=size if kind == "tpot" else 0.0,
            ttft_effect=size if kind == "ttft" else 0.0,
        )
        for _ in range(n)
    ]


#: a testbed with locked clocks on a fixed GPU: per-start sd 1 % instead of 2 % (+2 % prefill)
QUIET = Noise(start_decode=0.01, start_prefill=0.01)


def gate_job(k: int, n: int, reps: int, seed: int, effects: tuple = EFFECTS, noise: Noise = Noise()) -> dict:
    """Verdicts of the default gate (all default metrics) for each effect; the
    baseline runs of one repetition are shared by its effects."""
    rng = np.random.default_rng(seed)
    opts = CompareOptions()
    out = {label: {"gate": Counter(), "target": Counter(), "rows": Counter()} for label, _, _ in effects}
    effects = tuple(effects)
    for _ in range(reps):
        base = [simulate_run(rng, Workload(), noise) for _ in range(k)]
        cache: dict = {}
        for label, kind, size in effects:
            report = compare_runs(base, _current(rng, n, kind, size, noise=noise), options=opts, cache=cache)
            target = "p50(ttft)" if kind == "ttft" else "p50(tpot)"
            rows = {r.label: r for r in report.rows}
            out[label]["gate"][report.verdict] += 1
            out[label]["target"][rows[target].verdict] += 1
            for r in report.rows:
                if r.verdict == "regressed":
                    out[label]["rows"][r.label] += 1
    return out


def naive_job(reps: int, seed: int) -> dict:
    """Alternative designs on p50 TPOT with one current run: Mann-Whitney U on
    pooled requests, and fixed-percentage gates."""
    rng = np.random.default_rng(seed)
    designs = {
        "Mann-Whitney U on requests, 1 vs 1 run (p < 0.01)": (1, "mwu"),
        "Mann-Whitney U on requests, 1 vs 1 run (p < 0.01 and change > 5%)": (1, "mwu+effect"),
        "Mann-Whitney U on requests, 10 runs pooled vs 1 (p < 0.01)": (10, "mwu"),
        "fixed gate: p50 TPOT more than 2% above, 1 vs 1 run": (1, "fixed2"),
        "fixed gate: p50 TPOT more than 5% above, 1 vs 1 run": (1, "fixed5"),
        "this design, p50(tpot) gated alone, 1 vs 1 run": (1, "gate"),
        "this design, p50(tpot) gated alone, 10 vs 1 runs": (10, "gate"),
    }
    opts = CompareOptions(gates=("p50(tpot)",))
    out = {name: {"A/A (none)": 0, "TPOT +5%": 0} for name in designs}
    for _ in range(reps):
        base10 = [simulate_run(rng) for _ in range(10)]
        for label, size in (("A/A (none)", 0.0), ("TPOT +5%", 0.05)):
            cur = simulate_run(rng, tpot_effect=size)
            y = np.asarray(cur.samples["tpot"])
            for name, (k, rule) in designs.items():
                base = base10[:k]
                x = np.concatenate([r.samples["tpot"] for r in base])
                change = np.median(y) / np.median(x) - 1
                if rule.startswith("mwu"):
                    p = mannwhitneyu(y, x, alternative="greater").pvalue
                    hit = p < 0.01 and (rule == "mwu" or change > 0.05)
                elif rule == "fixed2":
                    hit = change > 0.02
                elif rule == "fixed5":
                    hit = change > 0.05
                else:
                    hit = compare_runs(base, cur, options=opts).verdict == "regressed"
                out[name][label] += int(hit)
    return out


def sequential_job(
    reps: int, seed: int, effects: tuple = (("A/A (none)", 0.0), ("TPOT +10%", 0.10), ("TPOT +20%", 0.20))
) -> dict:
    """Decide after each batch of 8 requests (one current run of up to 400 requests,
    10 baseline runs of 80): the confidence sequence vs naive Mann-Whitney peeking."""
    rng = np.random.default_rng(seed)
    long_run = Workload(num_requests=400)
    out = {label: {"verdicts": Counter(), "requests": [], "naive_regressed": 0} for label, _ in effects}
    for _ in range(reps):
        base = [simulate_run(rng) for _ in range(10)]
        pooled = np.concatenate([r.samples["tpot"] for r in base])
        for label, size in effects:
            cur = simulate_run(rng, long_run, tpot_effect=size)
            y = cur.samples["tpot"]
            seq = SequentialComparison(base, "p50(tpot)", alpha=0.01, min_effect=0.05, max_requests=400)
            state = None
            for i in range(0, len(y), 8):
                state = seq.update(y[i : i + 8])
                if state.stop:
                    break
            assert state is not None
            out[label]["verdicts"][state.verdict] += 1
            out[label]["requests"].append(state.requests)
            for t in range(32, len(y) + 1, 8):  # naive: test again after every batch, stop at p < 0.01
                if mannwhitneyu(y[:t], pooled, alternative="greater").pvalue < 0.01:
                    out[label]["naive_regressed"] += 1
                    break
    return out


def calibration_check() -> list[str]:
    """The generator with its noise off against the simulator's engine model (simulated time)."""
    lines = []
    try:
        from pytest_infmax.sim.engine import EngineConfig, LinearCostModel, simulate
    except Exception as exc:  # the simulator is being reworked elsewhere: a skip, not a failure
        return [f"skipped: simulator engine model not importable ({exc})"]
    wl = Workload(num_requests=400)
    rng = np.random.default_rng(7)
    total = wl.warmup + wl.num_requests
    lo_i, lo_o = int(wl.isl * wl.range_ratio), int(wl.osl * wl.range_ratio)
    reqs = [(int(rng.integers(lo_i, wl.isl + 1)), int(rng.integers(lo_o, wl.osl + 1))) for _ in range(total)]
    try:
        sim = simulate(
            EngineConfig(),
            LinearCostModel(wl.decode_ms, wl.per_seq_ms, wl.prefill_ms_per_1k),
            reqs,
            concurrency=wl.concurrency,
        )
    except Exception as exc:
        return [f"skipped: simulate() failed ({exc})"]
    measured = sim.requests[wl.warmup :]
    quiet = dataclasses.replace(Noise.none(), network_ms=0.0)
    syn = simulate_run(np.random.default_rng(7), wl, quiet)
    pairs = (
        (
            "p50 TTFT ms",
            float(np.median([r.ttft for r in measured])) * 1e3,
            float(np.median(syn.samples["ttft"])) * 1e3,
        ),
        (
            "p50 TPOT ms",
            float(np.median([r.tpot for r in measured])) * 1e3,
            float(np.median(syn.samples["tpot"])) * 1e3,
        ),
        ("throughput tok/s", sim.total_throughput, syn.scalars["throughput_per_gpu"] or 0.0),
    )
    for name, a, b in pairs:
        lines.append(f"{name:18s} simulator engine {a:9.3f}   synthetic {b:9.3f}   ratio {b / a:.3f}")
    try:
        from pytest_infmax.sim import build_parser

        flags = [s for a in build_parser()._actions for s in a.option_strings]
        noisy = [f for f in flags if any(w in f for w in ("jitter", "drift", "stall-rate", "stall-ms", "start-seed"))]
    except Exception:
        noisy = []
    lines.append(
        "real-time simulator noise flags: "
        + (
            ", ".join(noisy) + " (--simulator runs the real simulator with them: regression_error_rates_sim.py)"
            if noisy
            else "none, so no real-time noise calibration (skipped)"
        )
    )
    return lines


# -- running and printing ---------------------------------------------------------------------------


def _merge(a: dict, b: dict) -> dict:
    for label, parts in b.items():
        for key, value in parts.items():
            if isinstance(value, Counter):
                a[label][key].update(value)
            elif isinstance(value, list):
                a[label][key].extend(value)
            else:
                a[label][key] += value
    return a


def _pct(count: int, total: int) -> str:
    return f"{100 * count / total:5.1f}" if total else "  n/a"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--simulator" in argv:  # the real simulator: its own script, the other options passed on
        import os

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from regression_error_rates_sim import main as simulator_main

        return simulator_main([a for a in argv if a != "--simulator"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--simulator",
        action="store_true",
        help="measure against the real simulator instead (regression_error_rates_sim.py; "
        "its options: --simulator --help)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer setups and comparisons (~40 s)")
    parser.add_argument("--reps", type=int, help="comparisons per setup and effect (default 200, quick 100)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--seed", type=int, default=20250601)
    parser.add_argument("--json", help="also write the counts here")
    args = parser.parse_args(argv)
    reps = args.reps or (100 if args.quick else 200)
    setups = QUICK_SETUPS if args.quick else SETUPS
    requirement_setups = QUICK_REQUIREMENT_SETUPS if args.quick else REQUIREMENT_SETUPS
    quiet_setups = () if args.quick else QUIET_SETUPS
    started = time.time()
    chunks = max(1, args.jobs)
    plan = (
        [(k, n, EFFECTS, "") for k, n in setups]
        + [(k, n, REQUIREMENT_EFFECTS, "") for k, n in requirement_setups]
        + [(k, n, REQUIREMENT_EFFECTS, "quiet") for k, n in quiet_setups]
    )
    results: dict = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {}
        for s, (k, n, effects, tag) in enumerate(plan):
            sizes = [reps // chunks + (1 if i < reps % chunks else 0) for i in range(chunks)]
            noise = QUIET if tag == "quiet" else Noise()
            futures[(k, n, len(effects), tag)] = [
                pool.submit(gate_job, k, n, size, args.seed + 1000 * s + i, effects, noise)
                for i, size in enumerate(sizes)
                if size
            ]
        naive_reps = reps
        naive_f = [pool.submit(naive_job, naive_reps // chunks, args.seed + 50_000 + i) for i in range(chunks)]
        seq_reps = max(20, reps // 2)
        seq_f = [pool.submit(sequential_job, seq_reps // chunks, args.seed + 60_000 + i) for i in range(chunks)]
        for key, fs in futures.items():
            merged = None
            for f in fs:
                merged = f.result() if merged is None else _merge(merged, f.result())
            results[key] = merged
        naive = None
        for f in naive_f:
            part = f.result()
            naive = part if naive is None else {d: {k: naive[d][k] + part[d][k] for k in part[d]} for d in part}
        seq = None
        for f in seq_f:
            seq = f.result() if seq is None else _merge(seq, f.result())

    print("Regression gate error rates: synthetic 1k1k-mini runs at concurrency 8, 80 measured requests each.")
    print("Default gate: p50/p90/p99 of TTFT, TPOT, E2E and throughput per GPU; min effect 5%, alpha 1%.")
    print("'gate regr.' = the comparison's verdict is regressed (any metric); the verdict columns are those")
    print("of the metric the slowdown targets (p50 TPOT, or p50 TTFT for TTFT slowdowns).\n")
    header = (
        f"{'setup (baseline vs current runs)':34s} {'injected':11s} {'comps':>5s} {'gate regr.%':>11s} "
        f"{'regressed%':>10s} {'unsure%':>8s} {'same%':>6s} {'improved%':>9s}"
    )
    table = []
    sections = (
        ("Every effect:", len(EFFECTS), ""),
        ("History and repeats needed:", len(REQUIREMENT_EFFECTS), ""),
        ("Quiet testbed (clocks locked, one GPU: per-start sd 1 %, prefill 1.4 %):", len(REQUIREMENT_EFFECTS), "quiet"),
    )
    for title, wanted, want_tag in sections:
        if not any(c == wanted and t == want_tag for _, _, c, t in results):
            continue
        print(title)
        print(header)
        print("-" * len(header))
        for (k, n, count, tag), res in results.items():
            if count != wanted or tag != want_tag:
                continue
            for label in res:
                parts = res[label]
                total = sum(parts["gate"].values())
                t = parts["target"]
                row = {
                    "testbed": tag or "default",
                    "baseline_runs": k,
                    "current_runs": n,
                    "effect": label,
                    "comparisons": total,
                    "gate_regressed": parts["gate"]["regressed"] / total,
                    **{f"target_{v}": t[v] / total for v in VERDICTS},
                    "regressed_rows": dict(parts["rows"]),
                }
                table.append(row)
                print(
                    f"{f'{k} vs {n}':34s} {label:11s} {total:5d} {_pct(parts['gate']['regressed'], total):>11s} "
                    f"{_pct(t['regressed'], total):>10s} {_pct(t['unsure'], total):>8s} "
                    f"{_pct(t['same'], total):>6s} {_pct(t['improved'], total):>9s}"
                )
            print()

    assert naive is not None
    print(f"Alternative designs on p50 TPOT, one current run ({naive_reps // chunks * chunks} comparisons each):")
    print(f"{'design':70s} {'A/A regressed%':>14s} {'TPOT+5% regressed%':>18s}")
    naive_total = naive_reps // chunks * chunks
    for name, counts in naive.items():
        print(f"{name:70s} {_pct(counts['A/A (none)'], naive_total):>14s} {_pct(counts['TPOT +5%'], naive_total):>18s}")

    assert seq is not None
    seq_total = seq_reps // chunks * chunks
    print(
        f"\nSequential (10 baseline runs; one current run, checked after every 8 requests, cap 400; "
        f"{seq_total} runs each):"
    )
    print(
        f"{'injected':11s} {'regressed%':>10s} {'unsure%':>8s} {'same%':>6s} {'mean requests':>13s} "
        f"{'naive MWU peeking regressed%':>28s}"
    )
    for label, parts in seq.items():
        v = parts["verdicts"]
        print(
            f"{label:11s} {_pct(v['regressed'], seq_total):>10s} {_pct(v['unsure'], seq_total):>8s} "
            f"{_pct(v['same'], seq_total):>6s} {np.mean(parts['requests']):13.0f} "
            f"{_pct(parts['naive_regressed'], seq_total):>28s}"
        )

    print("\nCalibration check (generator, noise off, vs the simulator's engine model; 400 requests):")
    calibration = calibration_check()
    for line in calibration:
        print("  " + line)
    print(f"\n({time.time() - started:.0f} s)")
    if args.json:
        doc = {
            "gate": table,
            "naive": naive,
            "sequential": {
                k: {
                    "verdicts": dict(v["verdicts"]),
                    "mean_requests": float(np.mean(v["requests"])),
                    "naive_regressed": v["naive_regressed"],
                    "runs": seq_total,
                }
                for k, v in seq.items()
            },
            "calibration": calibration,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

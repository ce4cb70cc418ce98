"""Regression verdicts: is the current run slower than its baseline, and how sure are we?

Three verdicts, as in Chromium's Pinpoint, plus improvements:

* ``regressed``: the change is significantly worse than zero *and* its interval
  reaches past the minimum effect (default 5 %): it may well matter;
* ``same``: the interval lies inside ±minimum effect (equivalence, as in a TOST):
  any change is too small to matter, including a real but tiny one;
* ``improved``: the mirror image of ``regressed``;
* ``unsure``: neither: the interval straddles zero and reaches past the minimum
  effect. Run more (more baseline history, or repeats of the current run).

Why not Mann-Whitney on the requests? Requests of one closed-loop run share engine
steps (their latencies are correlated), and a server start differs from the next
(clocks, placement, warm-up) by more than requests differ within a run. Treating a
run's requests as independent samples therefore makes the test ever more "sure"
as requests grow, while the thing that actually varies, the run, was sampled once:
such a gate flaps (``benchmarks/regression_error_rates.py`` measures it).

The model, per gated statistic (e.g. p99 TTFT), on the log scale, for run j::

    y_j = log(statistic of run j) = mu + b_j + w_j

``b_j`` is the between-run (per server start) effect with variance ``sigma_b^2``;
``w_j`` the within-run sampling error of the statistic, whose variance comes from a
**circular block bootstrap** over time-contiguous blocks of requests (block = the
concurrency of a closed-loop run: the requests that share engine steps), so
correlation between requests is kept inside a block. The per-run variance
``tau^2 = sigma_b^2 + var(w)`` is estimated from the **spread of the baseline's run
history** (and of the current repeats, if any), shrunk towards a documented
**conservative prior** (default run-to-run sd 3 % for medians, more for tails;
4 pseudo-degrees of freedom) plus the bootstrap within-run variance::

    tau_hat^2 = (nu0 * (prior^2 + mean within var) + sum of squares of runs about their group means)
                / (nu0 + (k - 1) + (n - 1))

The change ``d = mean(y_current) - mean(y_baseline)`` has standard error
``tau_hat * sqrt(1/k + 1/n)`` with Student-t ``nu0 + k + n - 2`` degrees of freedom:
a prediction interval for a new run when n = 1. With one baseline run there is no
history, the prior alone sets the interval, and verdicts lean to ``unsure``. Run-level
scalars (throughput, cost) have one value per run and no within-run part: they are
compared against the spread of repeated runs when there are several, and by their
ratio against the prior otherwise; each row says which.

Error rates: ``alpha`` (default 1 %) is the chance that a comparison of two
identical setups yields ``regressed`` on any gated metric; it is split over the
gated metrics (Bonferroni), each interval being a two-sided ``1 - 2*alpha/m``
interval whose lower end is a one-sided ``alpha/m`` bound.

:class:`~pytest_infmax.baselines.sequential.SequentialComparison` decides after each batch of requests with an
always-valid (asymptotic) confidence sequence, so peeking is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pytest_infmax.baselines.advice import RunsAdvice, runs_advice
from pytest_infmax.baselines.predictive import DEFAULT_PREDICTIVE_HISTORY, predictive_compare
from pytest_infmax.baselines.store import (
    Baseline,
    BaselineError,
    BaselineMismatch,
    BaselineRun,
    BaselineSet,
    Difference,
    differences,
    unknown_fields,
)
from pytest_infmax.baselines.stores import describe, load_side
from pytest_infmax.lazy import lazy_module
from pytest_infmax.measure.registry import METRICS, SCALAR_METRICS, parse_stat, stat_quantile

if TYPE_CHECKING:
    import numpy as np
    from scipy import stats as sps
else:  # imported at first use, not with this module (pytest_infmax/lazy.py)
    np = lazy_module("numpy")
    sps = lazy_module("scipy.stats")

Verdict = Literal["regressed", "unsure", "improved", "same"]
VERDICT_ORDER: tuple[Verdict, ...] = ("regressed", "unsure", "improved", "same")

#: per-request metrics a gate can name (samples kept in baselines; interactivity = 1/tpot)
SAMPLE_GATE_METRICS: tuple[str, ...] = ("ttft", "tpot", "e2e", "itl_mean", "itl_max", "interactivity")
#: run-level metrics a gate can name (one value per run): every registered run-level figure,
#: cost and energy included (a run keeps those it measured)
SCALAR_GATE_METRICS: tuple[str, ...] = SCALAR_METRICS


# -- what is gated -------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """One gated statistic: ``p99(ttft)``, ``mean(tpot)`` or a scalar like ``throughput_per_gpu``."""

    metric: str
    stat: str | None = None

    @classmethod
    def parse(cls, text: str | Gate) -> Gate:
        if isinstance(text, Gate):
            return text
        s = text.strip()
        m = re.fullmatch(r"([A-Za-z0-9.]+)\(\s*([a-z0-9_]+)\s*\)", s)
        if m:
            metric = m.group(2)
            if metric not in SAMPLE_GATE_METRICS:
                raise ValueError(
                    f"gate {text!r}: {metric!r} has no per-request samples; use one of {', '.join(SAMPLE_GATE_METRICS)}"
                )
            stat = parse_stat(m.group(1))
            if stat in ("std", "min", "max"):
                raise ValueError(f"gate {text!r}: gate a percentile, mean or median, not {stat}")
            return cls(metric, "p50" if stat == "median" else stat)
        if re.fullmatch(r"[a-z0-9_]+", s):
            if s in SAMPLE_GATE_METRICS:
                raise ValueError(f"gate {text!r} is a per-request metric; say which statistic, e.g. p99({s})")
            if s not in SCALAR_GATE_METRICS:
                raise ValueError(
                    f"gate {text!r}: unknown run-level metric; use one of {', '.join(SCALAR_GATE_METRICS)}"
                )
            return cls(s, None)
        raise ValueError(
            f"gate {text!r}: expected STAT(METRIC) such as p99(ttft), or a scalar such as throughput_per_gpu"
        )

    @property
    def label(self) -> str:
        return self.metric if self.stat is None else f"{self.stat}({self.metric})"

    @property
    def higher_is_better(self) -> bool:
        info = METRICS.get(self.metric)
        return bool(info.higher_is_better) if info else False  # itl_mean, itl_max: latencies

    @property
    def unit(self) -> str:
        info = METRICS.get(self.metric)
        return info.unit if info else "ms"  # itl_mean, itl_max: latencies

    def __str__(self) -> str:
        return self.label


DEFAULT_GATES: tuple[Gate, ...] = tuple(
    Gate.parse(s)
    for s in (
        "p50(ttft)",
        "p90(ttft)",
        "p99(ttft)",
        "p50(tpot)",
        "p90(tpot)",
        "p99(tpot)",
        "p50(e2e)",
        "p90(e2e)",
        "p99(e2e)",
        "throughput_per_gpu",
        "cost_per_mtok",
    )
)


def parse_gates(spec: str | Sequence[str | Gate]) -> tuple[Gate, ...]:
    """``"p50(tpot), p99(ttft), throughput_per_gpu"`` or a list of them."""
    items = _split_gates(spec) if isinstance(spec, str) else list(spec)
    gates = tuple(Gate.parse(g) for g in items)
    if not gates:
        raise ValueError("no gated metrics given")
    return gates


def _split_gates(spec: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def default_prior_sigma(gate: Gate) -> float:
    """Conservative prior run-to-run sd (log scale) of a gated statistic.

    Our synthetic model, like published GPU variability (about 8 % spread between
    GPUs of one SKU, Sinha et al., SC'22), has 2-3 % per server start; the prior
    is set above that (3 % for medians and throughput, more for TTFT and tails,
    whose sampling noise in a run of ~100 requests is larger), so that with little
    history a comparison is more often ``unsure`` than wrong.
    """
    if gate.stat is None:
        return (
            0.03
            if gate.metric
            in (
                "throughput_per_gpu",
                "throughput",
                "output_throughput",
                "output_throughput_per_gpu",
                "input_throughput",
                "input_throughput_per_gpu",
                "request_throughput",
                "cost_per_mtok",
            )
            else 0.05
        )
    q = stat_quantile(gate.stat)
    tail = 0 if q is None or q <= 75 else (1 if q <= 95 else 2)
    if gate.metric == "ttft":
        return (0.04, 0.05, 0.08)[tail]
    if gate.metric == "itl_max":
        return 0.08
    return (0.03, 0.04, 0.06)[tail]


@dataclass(frozen=True)
class CompareOptions:
    """How comparisons are made. Defaults are what the measured error rates in
    docs/baselines.md were obtained with.

    ``min_effect``: the smallest relative change that matters (0.05 = 5 %).
    ``alpha``: chance of a false ``regressed`` over all gates of one comparison.
    ``prior_sigma``: overrides of the prior run-to-run sd by gate label or metric
    name (``{"p99(ttft)": 0.1, "tpot": 0.02}``); ``prior_df``: its weight in
    pseudo-runs. ``bootstrap``: block-bootstrap resamples per run; ``block``:
    block length in requests (None: the run's concurrency, else n^(1/3)).
    """

    gates: tuple[Gate, ...] = DEFAULT_GATES
    min_effect: float = 0.05
    alpha: float = 0.01
    prior_sigma: Mapping[str, float] = field(default_factory=dict)
    prior_df: float = 4.0
    bootstrap: int = 200
    block: int | None = None
    seed: int = 0
    #: with at least this many baseline runs, the history's predictive distribution decides
    #: (baselines/predictive.py: no prior, max-t over the gates); None: never
    predictive_history: int | None = DEFAULT_PREDICTIVE_HISTORY

    def __post_init__(self) -> None:
        object.__setattr__(self, "gates", parse_gates(self.gates))
        if not 0 < self.min_effect < 1:
            raise ValueError(f"min_effect must be a fraction in (0, 1), e.g. 0.05 for 5 %; got {self.min_effect!r}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha!r}")
        if not self.prior_df > 0:
            raise ValueError(f"prior_df must be > 0, got {self.prior_df!r}")
        if self.bootstrap < 50:
            raise ValueError(f"bootstrap must be >= 50 resamples, got {self.bootstrap!r}")
        if self.block is not None and self.block < 1:
            raise ValueError(f"block must be >= 1 request, got {self.block!r}")
        for key, value in self.prior_sigma.items():
            if not value > 0:
                raise ValueError(f"prior_sigma[{key!r}] must be > 0, got {value!r}")
        if self.predictive_history is not None and self.predictive_history < 3:
            raise ValueError(
                f"predictive_history must be >= 3 baseline runs (or None), got {self.predictive_history!r}"
            )

    def prior_for(self, gate: Gate) -> float:
        for key in (gate.label, gate.metric):
            if key in self.prior_sigma:
                return float(self.prior_sigma[key])
        return default_prior_sigma(gate)


# -- results -------------------------------------------------------------------------------


@dataclass
class ComparisonRow:
    """One gated statistic, baseline against current.

    ``baseline``/``current`` are geometric means over runs (the value itself for
    one run), in canonical units (seconds, tok/s ...); ``change`` is
    current/baseline - 1 and ``interval`` its interval at ``level``; ``p_value``
    is two-sided for "no change" (before the Bonferroni split).
    """

    gate: Gate
    verdict: Verdict
    baseline: float | None
    current: float | None
    change: float | None
    interval: tuple[float, float] | None
    level: float | None
    p_value: float | None
    method: str
    baseline_runs: int
    current_runs: int
    run_sd: float | None = None  # estimated run-to-run sd (log scale) used
    note: str = ""
    advice: RunsAdvice | None = None  # unsure: the runs that would settle a regression of min_effect

    @property
    def label(self) -> str:
        return self.gate.label

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.gate.label,
            "unit": self.gate.unit,
            "higher_is_better": self.gate.higher_is_better,
            "baseline": self.baseline,
            "current": self.current,
            "change": self.change,
            "interval": list(self.interval) if self.interval else None,
            "level": self.level,
            "p_value": self.p_value,
            "verdict": self.verdict,
            "method": self.method,
            "baseline_runs": self.baseline_runs,
            "current_runs": self.current_runs,
            "run_sd": self.run_sd,
            "note": self.note,
            "advice": None if self.advice is None else self.advice.to_dict(),
        }


@dataclass
class ComparisonReport:
    """Every gated statistic of one result key; ``verdict`` is the worst of the rows
    (regressed > unsure > improved > same)."""

    key: str | None
    rows: list[ComparisonRow]
    options: CompareOptions
    baseline_runs: int
    current_runs: int
    forced_differences: list[Difference] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # testbed fields known on one side only

    @property
    def verdict(self) -> Verdict:
        verdicts = {r.verdict for r in self.rows}
        for v in VERDICT_ORDER:
            if v in verdicts:
                return v
        return "unsure"  # nothing could be compared

    @property
    def regressed(self) -> bool:
        return self.verdict == "regressed"

    def rows_with(self, verdict: Verdict) -> list[ComparisonRow]:
        return [r for r in self.rows if r.verdict == verdict]

    @property
    def advice(self) -> RunsAdvice | None:
        """What would settle the report where it is ``unsure``: the advice of its hardest unsure row
        (every row's own is in its note and its ``advice``)."""
        if self.verdict != "unsure":
            return None
        advices = [r.advice for r in self.rows_with("unsure") if r.advice is not None]
        return max(advices, key=lambda a: a.cost) if advices else None

    def summary_line(self) -> str:
        """``regressed: p50(tpot) +12.3% [+8.1%, +16.6%], ...`` for a test report."""
        head = f"{self.key}: " if self.key else ""
        worst = self.rows_with(self.verdict) if self.rows else []
        parts = [
            f"{r.label} {_pct(r.change)} [{_pct(r.interval[0])}, {_pct(r.interval[1])}]"
            for r in worst
            if r.interval is not None and r.change is not None
        ]
        tail = f" ({self.baseline_runs} baseline vs {self.current_runs} current runs)"
        advice = self.advice
        if advice is not None:
            tail += f"; {advice.text()}"
        return f"{head}{self.verdict}: " + (", ".join(parts) if parts else "nothing compared") + tail

    def format_table(self, methods: bool = True) -> str:
        return format_report(self, methods=methods)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "verdict": self.verdict,
            "baseline_runs": self.baseline_runs,
            "current_runs": self.current_runs,
            "min_effect": self.options.min_effect,
            "alpha": self.options.alpha,
            "rows": [r.to_dict() for r in self.rows],
            "advice": None if self.advice is None else self.advice.to_dict(),
            "forced_differences": [str(d) for d in self.forced_differences],
            "skipped": list(self.skipped),
            "unchecked_testbed_fields": list(self.unchecked),
        }


# -- the comparison --------------------------------------------------------------------------


def compare_baseline(
    baseline: Baseline,
    current: BaselineRun | Sequence[BaselineRun],
    *,
    testbed: Mapping[str, Any] | None = None,
    options: CompareOptions | None = None,
    force: bool = False,
) -> ComparisonReport:
    """Compare current run(s) with a stored baseline.

    Refuses (:class:`~pytest_infmax.baselines.store.BaselineMismatch`, naming each field)
    when the testbed (if given) or the workload differs, unless ``force``; forced
    differences are kept in the report.
    """
    runs = [current] if isinstance(current, BaselineRun) else list(current)
    if not runs:
        raise ValueError("compare_baseline needs at least one current run")
    diffs = differences(baseline.testbed if testbed is not None else None, testbed, baseline.workload, runs[0].workload)
    if diffs and not force:
        raise BaselineMismatch(baseline.key, diffs, baseline.path)
    report = compare_runs(baseline.runs, runs, options=options, key=baseline.key)
    report.forced_differences = diffs
    report.unchecked = unknown_fields(baseline.testbed, testbed)
    return report


def compare_files(
    baseline_path: str,
    current_path: str,
    *,
    options: CompareOptions | None = None,
    force: bool = False,
    keys: Sequence[str] | None = None,
    last: int | None = None,
    set_name: str | None = None,
) -> tuple[list[ComparisonReport], list[str]]:
    """``infmax compare``: baseline file/directory or results file against another; a side that
    is a directory of sets or a ``postgresql://`` store gives the set ``set_name``
    (:func:`~pytest_infmax.baselines.stores.load_side`).

    Every run of the current side is a current run (repeats), or its last ``last``
    runs. Returns the reports of keys on both sides and messages about the rest;
    raises :class:`~pytest_infmax.baselines.store.BaselineError` for unreadable input and
    :class:`~pytest_infmax.baselines.store.BaselineMismatch` for a testbed or workload
    difference (unless ``force``).
    """
    base = load_side(baseline_path, set_name)
    cur = load_side(current_path, set_name)
    wanted = list(keys) if keys else sorted(set(base) | set(cur))
    reports, messages = [], []
    for key in wanted:
        if key not in base or key not in cur:
            side = "baseline" if key not in base else "current"
            messages.append(
                f"{key}: not in the {side} ({describe(baseline_path if side == 'baseline' else current_path)})"
            )
            continue
        testbed, runs = base[key]
        cur_testbed, cur_runs = cur[key]
        if last:
            cur_runs = cur_runs[-last:]
        baseline = Baseline(key, testbed, runs)
        reports.append(compare_baseline(baseline, cur_runs, testbed=cur_testbed, options=options, force=force))
    if not reports and not messages:
        raise BaselineError(f"nothing to compare: no results in {describe(baseline_path)} or {describe(current_path)}")
    return reports, messages


def compare_runs(
    baseline: Sequence[BaselineRun],
    current: Sequence[BaselineRun] | BaselineRun,
    *,
    options: CompareOptions | None = None,
    key: str | None = None,
    cache: dict[Any, Any] | None = None,
) -> ComparisonReport:
    """Compare current run(s) with baseline run(s), one row per gate both sides have.

    ``cache`` (a dict the caller keeps) reuses the bootstrap of runs seen before,
    for many comparisons against one baseline with the same options.
    """
    opts = options or CompareOptions()
    base = list(baseline)
    cur = [current] if isinstance(current, BaselineRun) else list(current)
    if not base or not cur:
        raise ValueError("compare_runs needs at least one baseline run and one current run")
    if opts.predictive_history is not None and len(base) >= opts.predictive_history:
        return _compare_predictive(base, cur, opts, key)
    stats = _RunStatistics(opts, cache)
    prepared = []
    skipped = []
    for gate in opts.gates:
        on_base = stats.collect(base, gate, side=0)
        on_cur = stats.collect(cur, gate, side=1)
        if on_base is None or on_cur is None:
            if on_base is None and on_cur is None and opts.gates == DEFAULT_GATES:
                continue  # a default gate this result does not have (cost without a price)
            skipped.append(
                f"{gate.label}: {'not measured' if on_base is None and on_cur is None else 'not on both sides'}"
                " (or not positive, so no ratio)"
            )
            continue
        prepared.append((gate, *on_base, *on_cur))
    m = max(len({_family(g) for g, *_ in prepared}), 1)
    rows = [_compare_gate(gate, ya, wa, yb, wb, opts, m, stats.block_used) for gate, ya, wa, yb, wb in prepared]
    return ComparisonReport(key, rows, opts, len(base), len(cur), skipped=skipped)


# -- a long history: its predictive distribution (baselines/predictive.py) ---------------------


def _compare_predictive(
    base: Sequence[BaselineRun], cur: Sequence[BaselineRun], opts: CompareOptions, key: str | None
) -> ComparisonReport:
    """Each gate's mean over the current runs against the history's predictive distribution:
    the history's spread of whole runs holds the between-start and within-run noise alike,
    so no prior and no bootstrap; one max-t critical value for all gates."""
    gates, on_base, on_cur, skipped = [], [], [], []
    for gate in opts.gates:
        ya, yb = _log_values(base, gate), _log_values(cur, gate)
        if ya is None or yb is None:
            if ya is None and yb is None and opts.gates == DEFAULT_GATES:
                continue  # a default gate this result does not have (cost without a price)
            side = "not measured" if ya is None and yb is None else "not on both sides"
            skipped.append(f"{gate.label}: {side} (or not positive, so no ratio)")
            continue
        gates.append(gate)
        on_base.append(ya)
        on_cur.append(yb)
    k, n = len(base), len(cur)
    if not gates:
        return ComparisonReport(key, [], opts, k, n, skipped=skipped)
    worse = [-1.0 if g.higher_is_better else 1.0 for g in gates]
    pc = predictive_compare(np.column_stack(on_base), np.column_stack(on_cur), worse, alpha=opts.alpha, seed=opts.seed)
    margin = math.log1p(opts.min_effect)
    rows = []
    # the one-sided error of each gate's bound at the shared critical value, for the advice
    per_gate_alpha = float(sps.t.sf(pc.critical, pc.df))
    for gate, ya, yb, iv, sign in zip(gates, on_base, on_cur, pc.intervals, worse):
        bad_lo, bad_hi = sorted((sign * iv.lo, sign * iv.hi))
        verdict = decide(bad_lo, bad_hi, margin)
        advice = (
            runs_advice(
                iv.run_sd,
                k,
                n,
                min_effect=opts.min_effect,
                one_sided_alpha=per_gate_alpha,
                prior_df=0.0,
                metric=gate.label,
            )
            if verdict == "unsure"
            else None
        )
        method = (
            f"predictive: mean of {n} new start{'s' if n > 1 else ''} vs {k}-run history; "
            f"run sd {iv.run_sd:.1%}; t({pc.df}), max-t over {len(gates)} gates: {pc.critical:.2f}"
        )
        rows.append(
            ComparisonRow(
                gate=gate,
                verdict=verdict,
                baseline=math.exp(float(ya.mean())),
                current=math.exp(float(yb.mean())),
                change=math.expm1(iv.change),
                interval=(math.expm1(iv.lo), math.expm1(iv.hi)),
                level=pc.level,
                p_value=iv.p_value,
                method=method,
                baseline_runs=k,
                current_runs=n,
                run_sd=iv.run_sd,
                note=_note(k, advice),
                advice=advice,
            )
        )
    return ComparisonReport(key, rows, opts, k, n, skipped=skipped)


def _log_values(runs: Sequence[BaselineRun], gate: Gate) -> np.ndarray | None:
    """log of the gated statistic of each run; None if any run lacks it (or it is not positive)."""
    ys = []
    for run in runs:
        if gate.stat is None:
            value = run.scalar(gate.metric)
        else:
            values = metric_values(run, gate.metric)
            value = float(statistic(values, gate.stat)) if values.size else None
        if value is None or not value > 0:
            return None
        ys.append(math.log(value))
    return np.asarray(ys)


class _RunStatistics:
    """Run-level statistics and their block-bootstrap within-run variances, cached per run."""

    def __init__(self, opts: CompareOptions, cache: dict[Any, Any] | None = None) -> None:
        self.opts = opts
        self._cache: dict[Any, Any] = {} if cache is None else cache
        self.block_used: dict[str, set[int]] = {}

    def collect(self, runs: Sequence[BaselineRun], gate: Gate, side: int) -> tuple[np.ndarray, np.ndarray] | None:
        """log statistic per run and its within-run variance (0 for scalars); None if any run lacks it."""
        ys, ws = [], []
        for i, run in enumerate(runs):
            if gate.stat is None:
                value = run.scalar(gate.metric)
                if value is None or value <= 0:
                    return None
                ys.append(math.log(value))
                ws.append(0.0)
                continue
            point, var = self._distribution(run, gate.metric, side, i)
            value = point.get(gate.stat)
            if value is None or not value > 0:
                return None
            ys.append(math.log(value))
            ws.append(var.get(gate.stat, 0.0))
        return np.asarray(ys), np.asarray(ws)

    def _distribution(
        self, run: BaselineRun, metric: str, side: int, index: int
    ) -> tuple[dict[str, float], dict[str, float]]:
        key = (id(run), metric, side, index)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is run:  # the same object, not a new one at a reused id
            return hit[1]
        values = metric_values(run, metric)
        gate_stats = sorted({g.stat for g in self.opts.gates if g.metric == metric and g.stat})
        if values.size == 0 or not gate_stats:
            out: tuple[dict[str, float], dict[str, float]] = ({}, {})
        else:
            block = self.opts.block or default_block(run, values.size)
            self.block_used.setdefault(metric, set()).add(block)
            seed = [self.opts.seed, side, index, SAMPLE_GATE_METRICS.index(metric)]
            out = run_statistics(
                values, gate_stats, block=block, resamples=self.opts.bootstrap, rng=np.random.default_rng(seed)
            )
        self._cache[key] = (run, out)
        return out


_FAMILIES = {
    "cost_per_mtok": "throughput",
    "throughput": "throughput",
    "throughput_per_gpu": "throughput",
    "input_cost_per_mtok": "input_throughput",
    "input_throughput_per_gpu": "input_throughput",
    "output_cost_per_mtok": "output_throughput",
    "output_throughput_per_gpu": "output_throughput",
    "tokens_per_mw": "energy_per_token",  # tok/s / W = tok / J
}


def _family(gate: Gate) -> str:
    """Gates that are exact transforms of one another count once in the Bonferroni split:
    cost per token is price x GPUs / throughput, so its ratio is throughput's, inverted;
    tokens per MW is tokens per joule, energy per token inverted."""
    return _FAMILIES.get(gate.metric, gate.label)


def metric_values(run: BaselineRun, metric: str) -> np.ndarray:
    """A run's per-request values of a gated metric (``interactivity``: 1/TPOT)."""
    if metric == "interactivity":
        tpot = run.values("tpot")
        return 1.0 / tpot[tpot > 0]
    return run.values(metric)


def default_block(run: BaselineRun | None, n: int) -> int:
    """Block length for the bootstrap: the closed loop's concurrency (requests that
    share engine steps), else n^(1/3); at most n/5 so there are at least 5 blocks."""
    c = run.concurrency if run is not None else None
    block = c if c else max(1, round(n ** (1 / 3)))
    return int(max(1, min(block, n // 5 if n >= 5 else 1)))


def statistic(values: np.ndarray, stat: str, axis: int | None = None) -> Any:
    q = stat_quantile(stat)
    if q is not None:
        return np.percentile(values, q, axis=axis)
    if stat == "mean":
        return np.mean(values, axis=axis)
    if stat == "median":
        return np.median(values, axis=axis)
    raise ValueError(f"cannot gate on {stat!r}")


def block_bootstrap_indices(n: int, block: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Circular block bootstrap: (resamples, n) indices made of ``block``-long runs
    of consecutive requests starting at random places (wrapping around)."""
    block = max(1, min(block, n))
    nblocks = -(-n // block)
    starts = rng.integers(0, n, size=(resamples, nblocks))
    idx = (starts[:, :, None] + np.arange(block)) % n
    return idx.reshape(resamples, nblocks * block)[:, :n]


def run_statistics(
    values: np.ndarray, stats: Sequence[str], *, block: int, resamples: int, rng: np.random.Generator
) -> tuple[dict[str, float], dict[str, float]]:
    """Point value of each statistic and the block-bootstrap variance of its log."""
    values = np.asarray(values, dtype=np.float64)
    point = {s: float(statistic(values, s)) for s in stats}
    if values.size < 4:
        return point, {s: 0.0 for s in stats}
    boot = np.sort(values[block_bootstrap_indices(values.size, block, resamples, rng)], axis=1)
    var: dict[str, float] = {}
    for s in stats:
        q = stat_quantile(s)
        b = _sorted_percentile(boot, q) if q is not None else np.asarray(statistic(boot, s, axis=1))
        b = b[b > 0]
        var[s] = float(np.var(np.log(b), ddof=1)) if b.size > 1 else 0.0
    return point, var


def _sorted_percentile(rows: np.ndarray, q: float) -> np.ndarray:
    """numpy's default (linear) percentile of each already-sorted row."""
    n = rows.shape[1]
    pos = q / 100 * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return rows[:, lo] * (1 - frac) + rows[:, hi] * frac


@dataclass(frozen=True)
class RunNoise:
    """The run-to-run variance estimate behind an interval."""

    tau2: float  # per-run variance of the log statistic
    df: float  # degrees of freedom of the t distribution
    history_df: int  # of which from observed runs
    prior_sd: float
    within_sd: float  # sqrt of the mean bootstrap within-run variance


def estimate_run_noise(
    groups: Sequence[np.ndarray], within: Sequence[np.ndarray], prior_sd: float, prior_df: float
) -> RunNoise:
    """Pooled per-run variance of log statistics, shrunk towards the prior.

    ``groups`` are log statistics of runs that share a mean (baseline runs;
    current runs). The prior is ``prior_sd^2 + mean within-run variance`` with
    ``prior_df`` pseudo degrees of freedom (a scaled inverse chi-square prior);
    the estimate never falls below the mean within-run variance.
    """
    ss = sum(float(np.sum((g - g.mean()) ** 2)) for g in groups if len(g) > 1)
    hist_df = sum(len(g) - 1 for g in groups)
    w = np.concatenate([np.asarray(x, dtype=np.float64) for x in within]) if within else np.zeros(1)
    w_mean = float(np.mean(w)) if w.size else 0.0
    tau0 = prior_sd**2 + w_mean
    tau2 = (prior_df * tau0 + ss) / (prior_df + hist_df)
    return RunNoise(max(tau2, w_mean), prior_df + hist_df, hist_df, prior_sd, math.sqrt(w_mean))


def _compare_gate(
    gate: Gate,
    ya: np.ndarray,
    wa: np.ndarray,
    yb: np.ndarray,
    wb: np.ndarray,
    opts: CompareOptions,
    m: int,
    blocks: Mapping[str, set[int]],
) -> ComparisonRow:
    k, n = len(ya), len(yb)
    prior = opts.prior_for(gate)
    noise = estimate_run_noise([ya, yb], [wa, wb], prior, opts.prior_df)
    d = float(yb.mean() - ya.mean())
    se = math.sqrt(noise.tau2 * (1 / k + 1 / n))
    one_sided = opts.alpha / m
    tq = float(sps.t.ppf(1 - one_sided, noise.df))
    lo, hi = d - tq * se, d + tq * se
    p = float(2 * sps.t.sf(abs(d) / se, noise.df)) if se > 0 else (0.0 if d else 1.0)
    sign = -1.0 if gate.higher_is_better else 1.0
    bad_lo, bad_hi = sorted((sign * lo, sign * hi))
    verdict = decide(bad_lo, bad_hi, math.log1p(opts.min_effect))
    method = _method(gate, k, n, noise, blocks.get(gate.metric), 1 - 2 * one_sided, m, opts.alpha)
    advice = (
        runs_advice(
            math.sqrt(noise.tau2),
            k,
            n,
            min_effect=opts.min_effect,
            one_sided_alpha=one_sided,
            prior_df=opts.prior_df,
            metric=gate.label,
        )
        if verdict == "unsure"
        else None
    )
    note = _note(k, advice)
    return ComparisonRow(
        gate=gate,
        verdict=verdict,
        baseline=math.exp(float(ya.mean())),
        current=math.exp(float(yb.mean())),
        change=math.expm1(d),
        interval=(math.expm1(lo), math.expm1(hi)),
        level=1 - 2 * one_sided,
        p_value=p,
        method=method,
        baseline_runs=k,
        current_runs=n,
        run_sd=math.sqrt(noise.tau2),
        note=note,
        advice=advice,
    )


def decide(bad_lo: float, bad_hi: float, margin: float) -> Verdict:
    """The verdict from an interval of the change in the *worse* direction (log scale).

    regressed: significantly worse (bad_lo > 0) and possibly by at least the margin
    (bad_hi > margin); improved: the mirror image; same: inside (-margin, margin);
    unsure: anything else.
    """
    if bad_lo > 0 and bad_hi > margin:
        return "regressed"
    if bad_hi < 0 and bad_lo < -margin:
        return "improved"
    if -margin < bad_lo and bad_hi < margin:
        return "same"
    return "unsure"


def _method(
    gate: Gate, k: int, n: int, noise: RunNoise, blocks: set[int] | None, level: float, m: int, alpha: float
) -> str:
    runs = f"{k} vs {n} run{'s' if n > 1 else ''}"
    sd = math.sqrt(noise.tau2)
    if noise.history_df:
        spread = f"run sd {sd:.1%} ({noise.history_df} df history + prior {noise.prior_sd:.0%})"
    else:
        spread = f"run sd {sd:.1%} from prior {noise.prior_sd:.0%} (no history)"
    if gate.stat is None:
        kind = "one value/run vs spread of runs" if noise.history_df else "one value/run: ratio"
        within = ""
    else:
        kind = "log ratio of run stats"
        bl = "/".join(str(b) for b in sorted(blocks)) if blocks else "?"
        within = f"; block bootstrap L={bl}"
    return f"{kind}, {runs}; {spread}{within}; t({noise.df:g}), {m} gates"


def _note(k: int, advice: RunsAdvice | None) -> str:
    notes = []
    if k < 3:
        notes.append(f"{k} baseline run{'s' if k > 1 else ''}: interval from the prior; record >= 3 runs")
    if advice is not None:
        notes.append(advice.text())
    return "; ".join(notes)


# -- formatting --------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x * 100:+.1f}%"


def _value(x: float | None, unit: str) -> str:
    if x is None:
        return "n/a"
    if unit == "ms":  # latencies are kept in seconds
        return f"{x * 1000:.3g} ms" if x * 1000 < 100 else f"{x * 1000:.0f} ms"
    if unit == "$/Mtok":
        return f"${x:.4g}"
    if unit == "%":
        return f"{x * 100:.3g}%"
    return f"{x:.4g} {unit}".strip()


#: the columns of a comparison table, in every report that shows one
COMPARISON_HEADERS: tuple[str, ...] = ("metric", "baseline", "current", "change", "interval", "p", "verdict")


def comparison_cells(row: Mapping[str, Any]) -> list[str]:
    """One comparison row (``ComparisonRow.to_dict()``) as the cells of :data:`COMPARISON_HEADERS`:
    the terminal, Markdown and HTML tables all show these."""
    interval = row.get("interval")
    p = row.get("p_value")
    verdict = str(row.get("verdict", "unsure"))
    unit = str(row.get("unit") or "")
    return [
        str(row.get("metric", "?")),
        _value(row.get("baseline"), unit),
        _value(row.get("current"), unit),
        _pct(row.get("change")),
        f"[{_pct(interval[0])}, {_pct(interval[1])}]" if interval else "n/a",
        "n/a" if p is None else (f"{p:.2g}" if p >= 1e-4 else "<1e-4"),
        verdict.upper() if verdict == "regressed" else verdict,
    ]


def format_report(report: ComparisonReport, *, methods: bool = True) -> str:
    """A fixed-width table: metric, baseline, current, change, interval, p, verdict, method."""
    headers = list(COMPARISON_HEADERS)
    if methods:
        headers.append("method")
    lines = []
    for r in report.rows:
        cells = comparison_cells(r.to_dict())
        if methods:
            cells.append(r.method + (f" [{r.note}]" if r.note else ""))
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(headers)]
    right = {1, 2, 3, 5}

    def fmt(items: Sequence[str]) -> str:
        return "  ".join(
            s.rjust(w) if i in right else s.ljust(w) for i, (s, w) in enumerate(zip(items, widths))
        ).rstrip()

    level = report.rows[0].level if report.rows else None
    title = (
        f"{report.key or 'comparison'}: {report.verdict} ({report.baseline_runs} baseline run(s) vs "
        f"{report.current_runs} current run(s); min effect {report.options.min_effect:.0%}"
        + (f"; intervals at {level:.2%}" if level else "")
        + ")"
    )
    out = [title, fmt(headers), "  ".join("-" * w for w in widths)]
    out += [fmt(c) for c in lines]
    for d in report.forced_differences:
        out.append(f"warning: compared across differing {d} (forced)")
    if report.unchecked:
        out.append(f"note: testbed fields known on one side only, not checked: {', '.join(report.unchecked)}")
    for s in report.skipped:
        out.append(f"skipped {s}")
    if report.advice is not None:
        out.append(f"unsure: {report.advice.text()}")
    return "\n".join(out)


def compare_stored(
    store: BaselineSet,
    key: str,
    current: BaselineRun | Sequence[BaselineRun],
    testbed: Mapping[str, Any],
    *,
    options: CompareOptions | None = None,
    force: bool = False,
) -> ComparisonReport | None:
    """Compare current run(s) with the baseline ``store`` keeps for ``key``; None when there is none.

    Raises :class:`BaselineMismatch` (unless ``force``) and
    :class:`CorruptBaselineError`.
    """
    baseline = store.load(key)
    if baseline is None:
        return None
    return compare_baseline(baseline, current, testbed=testbed, options=options, force=force)

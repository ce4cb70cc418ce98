"""Sequential decisions (``--infmax-sequential``): is the run settled yet, after each batch?

:class:`SequentialComparison` decides after each batch of requests with an always-valid
(asymptotic) confidence sequence, so looking often is not p-value peeking; the fixed-run
comparison it agrees with at the end is :mod:`pytest_infmax.baselines.compare`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pytest_infmax.baselines.compare import (
    CompareOptions,
    Gate,
    Verdict,
    _RunStatistics,
    decide,
    default_block,
    estimate_run_noise,
    run_statistics,
)
from pytest_infmax.baselines.store import BaselineRun
from pytest_infmax.lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
    from scipy import stats as sps
else:  # imported at first use, not with this module (pytest_infmax/lazy.py)
    np = lazy_module("numpy")
    sps = lazy_module("scipy.stats")


@dataclass(frozen=True)
class SequentialState:
    """Where a sequential comparison stands after the latest batch.

    ``interval`` bounds the relative change (current/baseline - 1) and holds at
    level ``1 - alpha`` simultaneously at every look. ``stop`` is True once the
    verdict is settled (anything but ``unsure``) or the request cap is reached;
    ``limited_by_history`` says the between-run part of the interval (which more
    requests cannot shrink) is already wider than what is left of the within-run part.
    """

    requests: int
    verdict: Verdict
    settled: bool
    stop: bool
    change: float | None
    interval: tuple[float, float] | None
    within_half_width: float | None  # log scale, confidence-sequence part
    between_half_width: float  # log scale, run-to-run part
    limited_by_history: bool
    reason: str


class SequentialComparison:
    """Decide after each batch of requests whether a gated statistic is settled.

    An always-valid interval for the log change, union of two parts at error
    ``alpha/2`` each:

    * within the current run, an asymptotic confidence sequence (Waudby-Smith et
      al., "Time-uniform central limit theory and asymptotic confidence
      sequences", 2023; the normal-mixture boundary of Howard et al. 2021),
      ``hat_t ± sd_t * sqrt(2 (t rho^2 + 1) / (t^2 rho^2) * log(sqrt(t rho^2 + 1) / (alpha/2)))``
      with ``sd_t^2 = t * (block-bootstrap variance of the log statistic)`` and
      ``rho`` tuned to the cap; it holds at every look at once, so checking
      after each batch is not "peeking";
    * between runs, a t bound on the baseline's mean plus the current start's own
      offset, from the history (and prior) as in :func:`compare_runs`; it does
      not shrink with more requests.

    The verdict rule is :func:`decide` with ``min_effect``. Feed per-request values
    of the gate's metric in send order with :meth:`update` (TPOTs for
    ``interactivity``: they are inverted here, as for baselines); stop when
    ``state.stop``. One gate per instance (split ``alpha`` for several).
    """

    def __init__(
        self,
        baseline: Sequence[BaselineRun],
        gate: Gate | str = "p50(tpot)",
        *,
        alpha: float = 0.01,
        min_effect: float = 0.05,
        max_requests: int = 400,
        min_requests: int | None = None,
        block: int | None = None,
        options: CompareOptions | None = None,
    ) -> None:
        self.gate = Gate.parse(gate)
        if self.gate.stat is None:
            raise ValueError("a sequential comparison needs a per-request statistic such as p50(tpot)")
        if not baseline:
            raise ValueError("a sequential comparison needs at least one baseline run")
        self.opts = replace(options or CompareOptions(), gates=(self.gate,), alpha=alpha, min_effect=min_effect)
        self.alpha = alpha
        self.margin = math.log1p(min_effect)
        self.max_requests = int(max_requests)
        stats = _RunStatistics(self.opts)
        collected = stats.collect(list(baseline), self.gate, side=0)
        if collected is None:
            raise ValueError(f"the baseline has no {self.gate.metric} samples")
        ya, wa = collected
        self.baseline_log = float(ya.mean())
        k = len(ya)
        noise = estimate_run_noise([ya], [wa], self.opts.prior_for(self.gate), self.opts.prior_df)
        # the baseline mean's error (tau^2/k) plus the current start's own offset (<= tau^2)
        tq = float(sps.t.ppf(1 - alpha / 4, noise.df))
        self.between = tq * math.sqrt(noise.tau2 * (1 + 1 / k))
        self.block = block or default_block(baseline[0], len(baseline[0].values(self.gate.metric)) or 80)
        self.min_requests = min_requests or max(4 * self.block, 16)
        a = alpha / 2
        self._rho2 = (-2 * math.log(a) + math.log(-2 * math.log(a) + 1)) / self.max_requests
        self._values: list[float] = []
        self._rng = np.random.default_rng(self.opts.seed)
        self.state = SequentialState(
            0, "unsure", False, False, None, None, None, self.between, self.between >= self.margin, "no requests yet"
        )

    def update(self, values: Iterable[float]) -> SequentialState:
        """Add a batch of per-request values (send order) and decide."""
        new = [float(v) for v in values]
        if self.gate.metric == "interactivity":
            new = [1.0 / v for v in new if v > 0]
        self._values.extend(new)
        t = len(self._values)
        if t < self.min_requests:
            self.state = replace(self.state, requests=t, reason=f"waiting for {self.min_requests} requests")
            return self.state
        arr = np.asarray(self._values)
        point, var = run_statistics(
            arr, [self.gate.stat or "p50"], block=self.block, resamples=self.opts.bootstrap, rng=self._rng
        )
        stat = point[self.gate.stat or "p50"]
        if not stat > 0:
            raise ValueError(f"{self.gate.label} is not positive; cannot compare ratios")
        d = math.log(stat) - self.baseline_log
        sd2 = t * max(var[self.gate.stat or "p50"], 1e-12)
        a = self.alpha / 2
        r2 = self._rho2
        within = math.sqrt(sd2 * 2 * (t * r2 + 1) / (t * t * r2) * math.log(math.sqrt(t * r2 + 1) / a))
        lo, hi = d - within - self.between, d + within + self.between
        sign = -1.0 if self.gate.higher_is_better else 1.0
        bad_lo, bad_hi = sorted((sign * lo, sign * hi))
        verdict = decide(bad_lo, bad_hi, self.margin)
        settled = verdict != "unsure"
        capped = t >= self.max_requests
        limited = self.between >= max(within, 1e-12) or self.between >= self.margin
        if settled:
            reason = f"settled after {t} requests"
        elif capped:
            reason = f"request cap {self.max_requests} reached without a verdict"
        elif self.between >= self.margin:
            reason = "between-run noise alone exceeds the minimum effect: only 'regressed'/'improved' can settle"
        else:
            reason = "not settled yet"
        self.state = SequentialState(
            t,
            verdict,
            settled,
            settled or capped,
            math.expm1(d),
            (math.expm1(lo), math.expm1(hi)),
            within,
            self.between,
            limited,
            reason,
        )
        return self.state

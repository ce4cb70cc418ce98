"""The history's predictive distribution: a verdict for a few fresh starts against a long history.

A history of saved runs (``--infmax-autosave`` on main: each run a fresh server start)
has seen the between-start noise many times over. Its spread is the noise a new start
will show, so with enough history (default: 20 runs, ``CompareOptions.predictive_history``)
the comparison needs no prior and no within-run bootstrap: the per-run spread of each
gated statistic already holds both parts. This module is that comparison, on arrays
(numpy and scipy only); ``compare.compare_runs`` turns its intervals into rows.

The model, per gated statistic g, on the log scale: history runs ``y_1..y_n`` and
current runs ``x_1..x_m`` are normal with a common sd ``sigma_g`` and means ``mu_g``
(history) and ``mu_g + delta_g`` (current). With ``s_g`` the pooled sd of both groups
about their means (``nu = n + m - 2`` degrees of freedom; with one current run, the
history's sd alone), the Student-t predictive interval for the mean of m new starts
given the history is::

    mean(x) - mean(y)  ~  delta_g + s_g * sqrt(1/n + 1/m) * t(nu)

(the flat-prior Bayesian posterior predictive; with m = 1 it is the classical
prediction interval for one new run). Ratios are compared as differences of logs.

Several statistics are gated at once and must share the false-alarm budget ``alpha``
(a false alarm: ``regressed`` on any of them when nothing changed). They are strongly
correlated (a slow start slows p50 TPOT, p50 E2E and throughput alike), so instead of
splitting ``alpha`` over them (Bonferroni), the critical value is the ``1 - alpha``
quantile of ``max_g T_g`` with ``T`` the multivariate t of the statistics, signed so
that larger is worse, whose correlation is estimated from the history (and the
current runs' residuals), shrunk towards independence (which only raises the critical
value) by ``shrink``. The quantile comes from seeded Monte Carlo draws, so a verdict
is reproducible. One interval per statistic, ``change ± critical * se``, then goes
through the usual decision with the minimum effect (``compare.decide``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pytest_infmax.lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
    from scipy import stats as sps
else:  # imported at first use, not with this module (pytest_infmax/lazy.py)
    np = lazy_module("numpy")
    sps = lazy_module("scipy.stats")

#: the history a verdict needs before it uses the predictive distribution: the store's cap
DEFAULT_PREDICTIVE_HISTORY = 20
#: weight of the identity in the correlation the critical value is drawn from
DEFAULT_SHRINK = 0.25
#: Monte Carlo draws of the max-t critical value (its 0.99 quantile to about ±0.5 %)
DEFAULT_DRAWS = 40_000


@dataclass(frozen=True)
class PredictiveInterval:
    """One gated statistic: the log change of the current mean from the history's, its
    standard error, and its interval ``change ± critical * se`` (log scale)."""

    change: float
    se: float
    run_sd: float
    lo: float
    hi: float
    p_value: float  # two-sided, of this statistic alone (t with ``df``)
    worse_critical: float  # the critical value on the worse side (skew-corrected)


@dataclass(frozen=True)
class PredictiveComparison:
    """Every gated statistic of one comparison, and the critical value they share."""

    intervals: tuple[PredictiveInterval, ...]
    critical: float
    df: float
    history_runs: int
    current_runs: int
    alpha: float

    @property
    def level(self) -> float:
        """Simultaneous two-sided coverage of the intervals: at least ``1 - 2 alpha``."""
        return 1 - 2 * self.alpha


def predictive_compare(
    history: np.ndarray,
    current: np.ndarray,
    worse: Sequence[float],
    *,
    alpha: float,
    prior_sd: Sequence[float] | None = None,
    prior_df: float = 0.0,
    shrink: float = DEFAULT_SHRINK,
    skew_correction: bool = True,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> PredictiveComparison:
    """Intervals of the log change of ``current`` (m runs x G statistics, log values)
    against ``history`` (n runs x G), sharing one max-t critical value at ``alpha``.

    ``worse`` is +1 for a statistic where larger is worse (latency, cost), -1 where
    larger is better (throughput): the false-alarm budget is one-sided, for
    ``regressed``. ``prior_sd`` (one per statistic) with ``prior_df`` pseudo degrees of
    freedom is a scaled inverse chi-square prior on each run-to-run variance (the
    normal-inverse-gamma predictive); ``prior_df=0``: the history alone.
    """
    y = np.asarray(history, dtype=np.float64)
    x = np.asarray(current, dtype=np.float64)
    if y.ndim != 2 or x.ndim != 2 or y.shape[1] != x.shape[1] or y.shape[1] == 0:
        raise ValueError(
            f"history and current must be (runs x statistics) arrays with the same statistics, "
            f"got {y.shape} and {x.shape}"
        )
    n, m = y.shape[0], x.shape[0]
    if n < 2 or m < 1:
        raise ValueError(f"a predictive comparison needs >= 2 history runs and >= 1 current run, got {n} and {m}")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(x))):
        raise ValueError("history and current must hold finite log values")
    sign = np.asarray(worse, dtype=np.float64)
    if sign.shape != (y.shape[1],) or not np.all(np.abs(sign) == 1):
        raise ValueError(f"worse must be +1 or -1 for each of the {y.shape[1]} statistics, got {list(worse)!r}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")
    if prior_df < 0 or (prior_df > 0 and prior_sd is None):
        raise ValueError(f"prior_df must be >= 0, and prior_sd given with it; got {prior_df!r}, {prior_sd!r}")
    prior_var = np.zeros(y.shape[1]) if prior_sd is None else np.asarray(prior_sd, dtype=np.float64) ** 2
    if prior_var.shape != (y.shape[1],):
        raise ValueError(f"prior_sd must give one sd per statistic ({y.shape[1]}), got {prior_sd!r}")
    residuals = np.vstack([y - y.mean(axis=0), x - x.mean(axis=0)])
    data_df = n + m - 2
    df = data_df + prior_df
    var = (prior_df * prior_var + np.sum(residuals**2, axis=0)) / df
    sd = np.sqrt(var)
    se = sd * math.sqrt(1 / n + 1 / m)
    change = x.mean(axis=0) - y.mean(axis=0)
    critical = max_t_critical(residuals * sign, df, alpha, shrink=shrink, draws=draws, seed=seed)
    skew = history_skew(y * sign) if skew_correction else np.zeros(y.shape[1])
    intervals = []
    for g in range(y.shape[1]):
        d, e = float(change[g]), float(se[g])
        p = float(2 * sps.t.sf(abs(d) / e, df)) if e > 0 else (0.0 if d else 1.0)
        worse_critical = cornish_fisher(critical, float(skew[g]), n, m)
        low, high = (worse_critical, critical) if sign[g] > 0 else (critical, worse_critical)
        intervals.append(PredictiveInterval(d, e, float(sd[g]), d - low * e, d + high * e, p, worse_critical))
    return PredictiveComparison(tuple(intervals), critical, df, n, m, alpha)


def history_skew(values: np.ndarray) -> np.ndarray:
    """Sample skewness of each column (adjusted Fisher-Pearson), 0 where it has no spread."""
    centred = values - values.mean(axis=0)
    m2 = np.mean(centred**2, axis=0)
    m3 = np.mean(centred**3, axis=0)
    n = values.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        g1 = np.where(m2 > 0, m3 / np.power(m2, 1.5), 0.0)
    return g1 * math.sqrt(n * (n - 1)) / (n - 2) if n > 2 else np.zeros(values.shape[1])


def cornish_fisher(critical: float, skew: float, n: int, m: int) -> float:
    """The critical value on the worse side for runs whose statistic is skewed towards worse.

    Tail statistics of short runs (p99 of 80 requests: nearly their maximum, with rare
    stalls) are skewed across starts, and a normal predictive then fires too often on
    one new start. The difference of the means of m new and n history runs has
    skewness ``skew * (1/m^2 - 1/n^2) / (1/m + 1/n)^1.5``; Cornish-Fisher's first term
    moves the quantile by ``(z^2 - 1) / 6`` times it. Only a skew towards worse widens
    (a skew the other way would narrow on a noisy estimate).
    """
    if skew <= 0:
        return critical
    skew_d = skew * (1 / m**2 - 1 / n**2) / (1 / m + 1 / n) ** 1.5
    return critical + (critical**2 - 1) / 6 * max(skew_d, 0.0)


def max_t_critical(
    residuals: np.ndarray,
    df: float,
    alpha: float,
    *,
    shrink: float = DEFAULT_SHRINK,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> float:
    """The ``1 - alpha`` quantile of ``max_g T_g``, T multivariate t with ``df`` degrees of
    freedom and the (shrunk) correlation of the columns of ``residuals``.

    One statistic: the t quantile itself. Columns without spread count as independent.
    """
    if not 0 <= shrink <= 1:
        raise ValueError(f"shrink must be in [0, 1], got {shrink!r}")
    g = residuals.shape[1]
    if g == 1:
        return float(sps.t.ppf(1 - alpha, df))
    corr = _correlation(residuals)
    corr = (1 - shrink) * corr + shrink * np.eye(g)
    # eigen-decomposition, not Cholesky: an estimated correlation may be only semi-definite
    vals, vecs = np.linalg.eigh(corr)
    root = vecs * np.sqrt(np.clip(vals, 0.0, None))
    rng = np.random.default_rng([seed, g, round(df * 1000)])
    z = rng.standard_normal((draws, g)) @ root.T
    w = np.sqrt(rng.chisquare(df, size=draws) / df)
    top = np.max(z, axis=1) / w
    return float(np.quantile(top, 1 - alpha))


def _correlation(residuals: np.ndarray) -> np.ndarray:
    cov = residuals.T @ residuals
    scale = np.sqrt(np.diag(cov))
    ok = scale > 0
    corr = np.eye(cov.shape[0])
    inner = cov[np.ix_(ok, ok)] / np.outer(scale[ok], scale[ok])
    corr[np.ix_(ok, ok)] = inner
    np.fill_diagonal(corr, 1.0)
    return np.clip(corr, -1.0, 1.0)

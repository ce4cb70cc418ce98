"""What an ``unsure`` verdict needs: how many runs would settle a regression of the minimum effect.

A comparison is ``unsure`` when its interval is too wide to tell a change of the minimum
effect (``--infmax-min-effect``, default 5 %) from none. Its width comes from the run-to-run
noise the comparison measured (``tau``, log scale: the baseline history's spread shrunk
towards the prior, plus the within-run bootstrap variance) and from the number of runs on
each side: the change's standard error is ``tau * sqrt(1/k + 1/n)`` for ``k`` baseline and
``n`` current runs, with Student-t ``prior_df + (k - 1) + (n - 1)`` degrees of freedom.

A true regression of exactly the minimum effect ``m`` (log scale) is called ``regressed``
with probability ``power`` (default 95 %) when ``m >= se * (t_alpha + t_power)``: the
interval's lower end then clears zero in that share of runs. :func:`runs_advice` finds the
fewest runs that meet it, three ways: current runs in all with the baseline runs there are,
baseline runs in all with the current runs there are, and the same number on each side.
The side that *lacks* runs is the one that must grow: where no number of current runs is
enough (``1/k`` alone is too wide), the baseline's history is too short.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pytest_infmax.lazy import lazy_module

if TYPE_CHECKING:
    from scipy import stats as sps
else:  # imported at first use, not with this module (pytest_infmax/lazy.py)
    sps = lazy_module("scipy.stats")

#: the chance of calling a regression of the minimum effect ``regressed`` that advice aims for
DEFAULT_POWER = 0.95
#: the most runs on one side that advice considers
MAX_RUNS = 1000

Side = Literal["current", "baseline", "both"]


@dataclass(frozen=True)
class RunsAdvice:
    """How many runs would settle a regression of ``min_effect`` at run-to-run sd ``run_sd``.

    ``current_needed``: current runs in all, with the ``baseline_runs`` there are (None: no
    number up to :data:`MAX_RUNS` is enough); ``baseline_needed``: baseline runs in all, with
    the ``current_runs`` there are; ``balanced``: runs on each side if both grow together.
    ``lacking``: the side that must grow (``both`` where neither alone is enough).
    """

    min_effect: float
    run_sd: float
    power: float
    baseline_runs: int
    current_runs: int
    current_needed: int | None
    baseline_needed: int | None
    balanced: int | None
    lacking: Side
    metric: str = ""  # the gated statistic, e.g. p50(tpot)

    def text(self) -> str:
        """One line for a report: the numbers, the side that lacks runs, and how to add them."""
        of = f" of {self.metric}" if self.metric else ""
        head = f"to settle a {self.min_effect:.0%} regression{of} at run sd {self.run_sd:.1%}"
        have = f"{self.baseline_runs} baseline vs {self.current_runs} current runs"
        if self.lacking == "current" and self.current_needed is not None and self.current_needed <= self.current_runs:
            return (
                f"{head}: {have} are enough {self.power:.0%} of the time, and this change lies near the line; "
                "more runs on either side narrow its interval"
            )
        if self.lacking == "current" and self.current_needed is not None:
            more = f"{self.current_needed} current runs in all (have {self.current_runs}: --infmax-repeat N)"
            alt = f", or {self.baseline_needed} baseline runs" if self.baseline_needed is not None else ""
            return f"{head}: {more}{alt}"
        if self.lacking == "baseline" and self.baseline_needed is not None:
            return (
                f"{head}: the baseline lacks runs ({have}; no number of current runs is enough): "
                f"{self.baseline_needed} baseline runs in all (--infmax-repeat N --infmax-save SET)"
            )
        each = f"{self.balanced} runs on each side" if self.balanced is not None else f"more than {MAX_RUNS} runs"
        return f"{head}: both sides lack runs ({have}): {each} (fresh server starts)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_effect": self.min_effect,
            "run_sd": self.run_sd,
            "power": self.power,
            "baseline_runs": self.baseline_runs,
            "current_runs": self.current_runs,
            "current_needed": self.current_needed,
            "baseline_needed": self.baseline_needed,
            "balanced": self.balanced,
            "lacking": self.lacking,
            "metric": self.metric,
            "text": self.text(),
        }

    @property
    def cost(self) -> int:
        """Runs still to make on the cheapest way it names (to pick the hardest of several rows)."""
        if self.lacking == "current" and self.current_needed is not None:
            return self.current_needed - self.current_runs
        if self.lacking == "baseline" and self.baseline_needed is not None:
            return self.baseline_needed - self.baseline_runs
        if self.balanced is None:
            return 2 * MAX_RUNS
        return 2 * self.balanced - self.baseline_runs - self.current_runs


def settles(
    run_sd: float, k: int, n: int, margin: float, one_sided_alpha: float, prior_df: float, power: float
) -> bool:
    """Whether ``k`` baseline and ``n`` current runs call a regression of ``margin`` (log scale)
    ``regressed`` with probability ``power`` at this run-to-run sd."""
    df = prior_df + (k - 1) + (n - 1)
    se = run_sd * math.sqrt(1 / k + 1 / n)
    return se * (float(sps.t.ppf(1 - one_sided_alpha, df)) + float(sps.t.ppf(power, df))) <= margin


def _fewest(ok: Any, start: int) -> int | None:
    """The smallest x in [start, MAX_RUNS] with ok(x), for ok monotone in x (bisection)."""
    if start > MAX_RUNS or not ok(MAX_RUNS):
        return None
    lo, hi = start, MAX_RUNS
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def runs_advice(
    run_sd: float,
    k: int,
    n: int,
    *,
    min_effect: float,
    one_sided_alpha: float,
    prior_df: float,
    power: float = DEFAULT_POWER,
    metric: str = "",
) -> RunsAdvice:
    """The fewest runs that settle a regression of ``min_effect`` (a fraction, 0.05 = 5 %) at
    ``run_sd``, from ``k`` baseline and ``n`` current runs (see the module's docstring)."""
    margin = math.log1p(min_effect)

    def ok(kk: int, nn: int) -> bool:
        return settles(run_sd, kk, nn, margin, one_sided_alpha, prior_df, power)

    current = _fewest(lambda x: ok(k, x), n)
    baseline = _fewest(lambda x: ok(x, n), k)
    balanced = _fewest(lambda x: ok(x, x), max(k, n))
    lacking: Side = "current" if current is not None else "baseline" if baseline is not None else "both"
    if lacking == "baseline" and balanced is not None and baseline is not None and baseline > 4 * balanced:
        lacking = "both"  # growing both is far cheaper than the baseline alone
    return RunsAdvice(min_effect, run_sd, power, k, n, current, baseline, balanced, lacking, metric)

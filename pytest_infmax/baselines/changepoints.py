"""Change points in a series of runs: where a history stepped up or down, and stayed there.

A gate compares one pull request with the history before it, so a regression that
creeps in by 2 % a merge passes every gate. Change-point detection looks at the whole
history instead and finds where its level moved. This uses Apache Otava (formerly
DataStax's Hunter, ``pip install 'pytest-infmax[history]'``): E-Divisive means (Matteson
and James) over sliding windows, each candidate kept only where a t-test of the runs
either side of it gives ``p < max_pvalue`` (Fleming et al., "Hunter: Using Change Point
Detection to Hunt for Performance Regressions", ICPE 2023).

Otava is imported where it is used, not with this module: without it, detection is a
:class:`ChangePointsUnavailable` saying what to install.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

INSTALL_HINT = "pip install 'pytest-infmax[history]'"
#: Otava's sliding window, in runs: short enough that steps a few runs apart are found
#: one by one (tests/test_history.py measures it), long enough for its t-test
DEFAULT_WINDOW = 20
DEFAULT_MAX_PVALUE = 0.001


class ChangePointsUnavailable(RuntimeError):
    """Apache Otava is not installed; ``str()`` says how to get it."""


@dataclass(frozen=True)
class ChangePoint:
    """The series moved at ``index``: runs ``[.., index)`` average ``before``, runs
    ``[index, next change point)`` average ``after``; ``change`` is after/before - 1."""

    index: int
    before: float
    after: float
    p_value: float

    @property
    def change(self) -> float:
        return self.after / self.before - 1.0 if self.before else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "before": self.before,
            "after": self.after,
            "change": self.change,
            "p_value": self.p_value,
        }


def _otava() -> Any:
    try:
        from otava import analysis
    except Exception as exc:  # ImportError, or an install that cannot be imported
        raise ChangePointsUnavailable(
            f"change-point detection needs Apache Otava, which cannot be imported here ({exc}); {INSTALL_HINT}"
        ) from None
    return analysis


def change_points(
    values: Sequence[float],
    *,
    max_pvalue: float = DEFAULT_MAX_PVALUE,
    min_change: float = 0.0,
    window: int = DEFAULT_WINDOW,
) -> list[ChangePoint]:
    """The change points of ``values`` (oldest first), in order.

    ``max_pvalue``: how sure each must be; ``min_change``: the smallest relative step
    kept (0.02 = 2 %). A series shorter than 4 has none."""
    if not 0 < max_pvalue < 1:
        raise ValueError(f"max_pvalue must be in (0, 1), got {max_pvalue!r}")
    if not 0 <= min_change < 1:
        raise ValueError(f"min_change must be a fraction in [0, 1), got {min_change!r}")
    if window < 4:
        raise ValueError(f"window must be at least 4 runs, got {window!r}")
    series = [float(v) for v in values]
    if any(not math.isfinite(v) for v in series):
        raise ValueError("the series holds a value that is not a finite number")
    if len(series) < 4:
        return []
    analysis = _otava()
    found, _weak = analysis.compute_change_points(
        series, window_len=window, max_pvalue=max_pvalue, min_magnitude=min_change
    )
    return [
        ChangePoint(
            index=int(cp.index),
            before=float(cp.stats.mean_1),
            after=float(cp.stats.mean_2),
            p_value=float(cp.stats.pvalue),
        )
        for cp in sorted(found, key=lambda c: int(c.index))
    ]

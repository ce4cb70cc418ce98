"""A baseline set's history as a trend: one value per saved run, each with the commit it
measured, and the change points in it (``infmax history SET [TEST]``).

Each run the plugin saves records its git commit, branch and time
(:mod:`pytest_infmax.baselines.provenance`); a run saved before that says ``?``. The
value of a run is its gated statistic (``p50(tpot)`` by default: the run's median TPOT;
or a run-level figure such as ``throughput_per_gpu``), as the gate computes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_infmax.baselines.changepoints import DEFAULT_MAX_PVALUE, ChangePoint, change_points
from pytest_infmax.baselines.compare import Gate, metric_values, statistic
from pytest_infmax.baselines.store import Baseline, BaselineError, BaselineRun
from pytest_infmax.baselines.stores import describe, has_set, open_set

#: the history cap a set is opened with to read it (reading never trims a stored history)
MAX_HISTORY = 1_000_000


@dataclass(frozen=True)
class HistoryPoint:
    """One saved run: its value of the statistic and where it came from."""

    value: float
    commit: str | None
    branch: str | None
    saved_at: str

    @property
    def short_commit(self) -> str:
        return self.commit[:10] if self.commit else "?"

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "commit": self.commit, "branch": self.branch, "saved_at": self.saved_at}


@dataclass
class History:
    """One result key's trend of one statistic, and its change points."""

    key: str
    gate: Gate
    points: list[HistoryPoint]
    change_points: list[ChangePoint] = field(default_factory=list)
    skipped: int = 0  # runs without the statistic

    @property
    def values(self) -> list[float]:
        return [p.value for p in self.points]

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "metric": self.gate.label,
            "unit": self.gate.unit,
            "points": [p.to_dict() for p in self.points],
            "change_points": [
                {**cp.to_dict(), "commit": self.points[cp.index].commit, "branch": self.points[cp.index].branch}
                for cp in self.change_points
            ],
            "skipped": self.skipped,
        }


def run_value(run: BaselineRun, gate: Gate) -> float | None:
    """The run's value of ``gate``'s statistic (canonical units), None where it has none."""
    if gate.stat is None:
        return run.scalar(gate.metric)
    values = metric_values(run, gate.metric)
    if values.size == 0:
        return None
    value = float(statistic(values, gate.stat))
    return value if math.isfinite(value) else None


def history_of(
    baseline: Baseline,
    gate: Gate | str = "p50(tpot)",
    *,
    max_pvalue: float = DEFAULT_MAX_PVALUE,
    min_change: float = 0.0,
    detect: bool = True,
) -> History:
    """The trend of ``gate`` over the baseline's runs (oldest first) and its change points."""
    gate = Gate.parse(gate)
    points, skipped = [], 0
    for run in baseline.runs:
        value = run_value(run, gate)
        if value is None:
            skipped += 1
            continue
        raw = run.environment.get("git")
        git: dict[str, Any] = raw if isinstance(raw, dict) else {}
        points.append(
            HistoryPoint(
                value=value,
                commit=git.get("commit"),
                branch=git.get("branch"),
                saved_at=str(run.environment.get("saved_at") or run.recorded_at or "?"),
            )
        )
    history = History(baseline.key, gate, points, skipped=skipped)
    if detect:
        history.change_points = change_points(history.values, max_pvalue=max_pvalue, min_change=min_change)
    return history


def set_histories(
    location: str | Path,
    set_name: str,
    test: str | None = None,
    gate: Gate | str = "p50(tpot)",
    *,
    max_pvalue: float = DEFAULT_MAX_PVALUE,
    min_change: float = 0.0,
) -> list[History]:
    """The history of every result key of the set ``set_name`` at ``location`` (a directory of
    sets, or a postgresql:// store) whose key contains ``test``."""
    if not has_set(location, set_name):
        raise BaselineError(
            f"there is no baseline set {set_name!r} in {describe(location)} (--infmax-save {set_name} makes it)"
        )
    every = list(open_set(location, set_name, history=MAX_HISTORY))
    baselines = [b for b in every if test is None or test in b.key]
    if not baselines:
        what = f"whose key contains {test!r}" if test else "at all"
        keys = ", ".join(sorted(b.key for b in every)) or "none"
        raise BaselineError(f"no baseline in set {set_name!r} of {describe(location)} {what} (its keys: {keys})")
    return [history_of(b, gate, max_pvalue=max_pvalue, min_change=min_change) for b in baselines]


def _value(x: float, unit: str) -> str:
    return f"{x * 1000:.4g} ms" if unit == "ms" else f"{x:.4g} {unit}".strip()


def format_history(history: History) -> str:
    """The trend (one line a run, change points marked) and the change points with their commits."""
    unit = history.gate.unit
    starts = {cp.index: cp for cp in history.change_points}
    lines = [f"{history.key}: {history.gate.label} over {len(history.points)} runs, oldest first"]
    lines.append(f"{'run':>4}  {'saved at':<20}  {'commit':<10}  {'branch':<16}  {history.gate.label:>12}")
    for i, p in enumerate(history.points):
        mark = ""
        if i in starts:
            mark = f"  <- change point: {starts[i].change * 100:+.1f}%"
        lines.append(
            f"{i:>4}  {p.saved_at:<20}  {p.short_commit:<10}  {(p.branch or '?')[:16]:<16}  "
            f"{_value(p.value, unit):>12}{mark}"
        )
    if history.skipped:
        lines.append(f"({history.skipped} runs without {history.gate.label} left out)")
    if not history.change_points:
        lines.append("change points: none")
    for cp in history.change_points:
        p = history.points[cp.index]
        lines.append(
            f"change point at run {cp.index} (commit {p.short_commit}, branch {p.branch or '?'}, {p.saved_at}): "
            f"{_value(cp.before, unit)} -> {_value(cp.after, unit)} ({cp.change * 100:+.1f}%, p={cp.p_value:.2g})"
        )
    return "\n".join(lines)


def histories_document(histories: Sequence[History]) -> dict[str, Any]:
    return {"format": "pytest-infmax-history/1", "histories": [h.to_dict() for h in histories]}

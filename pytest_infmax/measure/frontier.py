"""Pareto frontiers and reading them at a target, as InferenceMAX does.

A sweep gives one point per load level. A point is on the frontier when no
other point is at least as good on both axes and better on one. Between
frontier points values are read with monotone cubic (PCHIP) interpolation,
the method of InferenceMAX's TCO calculator: it never overshoots the measured
points. Outside the measured range there is no reading: asking is an error
that says what range was measured, never an extrapolation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pytest_infmax.lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
    from scipy import interpolate
else:  # imported at first use, not with this module (pytest_infmax/lazy.py): scipy.interpolate is ~0.3 s
    np = lazy_module("numpy")
    interpolate = lazy_module("scipy.interpolate")


class FrontierRangeError(ValueError):
    """The target lies outside what the sweep measured."""


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str = ""
    data: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def pareto_front(
    points: Sequence[Point], x_higher_is_better: bool = True, y_higher_is_better: bool = True
) -> list[Point]:
    """The non-dominated points, sorted by x ascending."""
    sx = 1.0 if x_higher_is_better else -1.0
    sy = 1.0 if y_higher_is_better else -1.0
    finite = [p for p in points if np.isfinite(p.x) and np.isfinite(p.y)]
    front = []
    for p in finite:
        dominated = any(sx * q.x >= sx * p.x and sy * q.y >= sy * p.y and (q.x != p.x or q.y != p.y) for q in finite)
        if not dominated:
            front.append(p)
    front.sort(key=lambda p: (p.x, p.y))
    # Equal points appear once.
    unique: list[Point] = []
    for p in front:
        if not unique or (unique[-1].x, unique[-1].y) != (p.x, p.y):
            unique.append(p)
    return unique


@dataclass(frozen=True)
class Frontier:
    """A frontier of ``y_name`` against ``x_name`` with its measured points."""

    x_name: str
    y_name: str
    points: tuple[Point, ...]
    front: tuple[Point, ...]

    @classmethod
    def build(
        cls,
        x_name: str,
        y_name: str,
        points: Sequence[Point],
        x_higher_is_better: bool = True,
        y_higher_is_better: bool = True,
    ) -> Frontier:
        return cls(x_name, y_name, tuple(points), tuple(pareto_front(points, x_higher_is_better, y_higher_is_better)))

    @property
    def x_range(self) -> tuple[float, float]:
        if not self.front:
            return (float("nan"), float("nan"))
        return (self.front[0].x, self.front[-1].x)

    def at(self, x: float) -> float:
        """``y`` on the frontier at ``x`` (PCHIP between frontier points)."""
        if not self.front:
            raise FrontierRangeError(f"no {self.y_name} frontier: the sweep has no measured point")
        lo, hi = self.x_range
        if not lo <= x <= hi:
            raise FrontierRangeError(
                f"{self.x_name}={x:g} is outside the measured range {lo:g} to {hi:g}; "
                f"{self.y_name} there would be an extrapolation. Sweep further "
                f"(more or fewer concurrent requests) to cover it."
            )
        xs = np.array([p.x for p in self.front])
        ys = np.array([p.y for p in self.front])
        if len(xs) == 1:
            return float(ys[0])
        return float(interpolate.PchipInterpolator(xs, ys)(x))

    def to_dict(self) -> dict[str, Any]:
        return {
            "x": self.x_name,
            "y": self.y_name,
            "points": [{"x": p.x, "y": p.y, "label": p.label} for p in self.points],
            "front": [{"x": p.x, "y": p.y, "label": p.label} for p in self.front],
        }

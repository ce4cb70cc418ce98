"""Capacity as an assertion: the largest load that meets the SLAs (``infmax.capacity(...)``).

vLLM's ``bench sweep serve_sla`` searches for the largest request rate or concurrency
that meets an SLA; here the answer is a number a test asserts on
(``assert cap.concurrency >= 64``) and every point measured on the way is an ordinary
result in the reports. The search:

1. **Bracketing.** ``lo`` first, then doubling (``lo``, 2·lo, 4·lo, ...) up to ``hi``
   (measured last) until a load misses the SLAs. ``lo`` missing them: no load in
   [lo, hi] meets them (the capacity is 0). ``hi`` meeting them: the capacity is at
   least ``hi`` (``capped``).
2. **Narrowing** between the largest load that met the SLAs and the smallest that
   missed them, until they are at most ``step`` apart. ``method="pchip"`` (the default,
   as serve_sla does) puts the next load at the root of a monotone cubic (PCHIP)
   through every point's *SLA margin*; a guess that does not halve the bracket is
   followed by a bisection step, so the search never takes more than about twice
   bisection's points. ``method="bisect"`` halves the bracket every time.

The **SLA margin** of a point is its worst objective's relative distance from its limit:
``(measured - limit) / |limit|`` for an upper limit (``p99(ttft) < 500ms``),
``(limit - measured) / |limit|`` for a lower one (``interactivity > 50``); at most 0
where the objective is met. Whether a point met the SLAs is the SLA's own verdict; the
margin only places the next guess. Measurements are noisy, so the loads need not behave
monotonically: the capacity is the largest load that met the SLAs *below the smallest
load that missed them*, and a load above that which met them anyway is reported
(``non_monotone``), never taken as the answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pytest_infmax.lazy import lazy_module
from pytest_infmax.load.plan import MAX_CONCURRENCY, LoadConfigError
from pytest_infmax.measure.verdicts import Verdict
from pytest_infmax.run.sweep import SweepResult

if TYPE_CHECKING:
    import numpy as np
    from scipy import interpolate
else:  # scipy.interpolate costs ~0.5 s of CPU to import: paid by capacity() alone, not every run
    np = lazy_module("numpy")
    interpolate = lazy_module("scipy.interpolate")

Over = Literal["concurrency", "rate"]
Method = Literal["pchip", "bisect"]

DEFAULT_LO = 1
DEFAULT_HI = 1024
GROWTH = 2  # bracketing multiplies the load by this until it misses the SLAs


@dataclass(frozen=True)
class Probe:
    """One load the search measured: did it meet the SLAs, and by what margin."""

    load: float
    met: bool
    margin: float  # the worst objective's relative margin: <= 0 met; inf: an objective not measured
    name: str = ""  # the result's name (a row of the reports)
    missed: tuple[str, ...] = ()  # the verdicts of the objectives it missed

    def to_dict(self) -> dict[str, Any]:
        return {
            "load": self.load,
            "met": self.met,
            "margin": self.margin if math.isfinite(self.margin) else None,
            "name": self.name,
            "missed": list(self.missed),
        }


def margin(verdicts: Sequence[Verdict]) -> float:
    """The worst objective's relative distance from its limit (<= 0: every objective met)."""
    worst = -math.inf
    for v in verdicts:
        o = v.objective
        if v.measured is None or not math.isfinite(v.measured):
            return math.inf
        over = v.measured - o.limit if o.op in ("<", "<=") else o.limit - v.measured
        scale = abs(o.limit) or 1.0  # a limit of 0 (error_rate <= 0): the absolute distance
        worst = max(worst, over / scale)
    return worst if verdicts else -math.inf


@dataclass(frozen=True)
class Grid:
    """The loads a search may try: whole concurrencies, or request rates, from ``lo`` to ``hi``,
    resolved to ``step``."""

    over: Over
    lo: float
    hi: float
    step: float

    @classmethod
    def of(cls, over: str, lo: float | None, hi: float | None, step: float | None) -> Grid:
        if over not in ("concurrency", "rate"):
            raise LoadConfigError(f"capacity(over={over!r}): over must be 'concurrency' or 'rate'")
        whole = over == "concurrency"
        lo = DEFAULT_LO if lo is None else lo
        hi = DEFAULT_HI if hi is None else hi
        step = (1 if whole else lo) if step is None else step
        for name, value in (("lo", lo), ("hi", hi), ("step", step)):
            ok_type = isinstance(value, int) if whole else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok_type or not math.isfinite(value) or value <= 0:
                kind = "a whole number >= 1" if whole else "a finite number > 0 (requests/s)"
                raise LoadConfigError(f"capacity(over={over!r}): {name} must be {kind}, got {value!r}")
        if hi < lo:
            raise LoadConfigError(f"capacity(): hi={hi:g} is below lo={lo:g}; give lo <= hi")
        if whole and hi > MAX_CONCURRENCY:
            raise LoadConfigError(f"capacity(): hi={hi} is more than the {MAX_CONCURRENCY} streams one run may open")
        return cls("concurrency" if whole else "rate", lo, hi, step)

    @property
    def whole(self) -> bool:
        return self.over == "concurrency"

    def label(self, load: float) -> str:
        return f"c={int(load)}" if self.whole else f"rate={load:g}/s"

    def snap(self, guess: float, met: float, missed: float) -> float:
        """``guess`` as a load strictly between ``met`` and ``missed`` (which are more than a step apart)."""
        if self.whole:
            return float(min(max(round(guess), met + 1), missed - 1))
        half = self.step / 2
        return float(min(max(guess, met + half), missed - half))


def bracket(probes: Sequence[Probe]) -> tuple[float | None, float | None]:
    """(the largest load that met the SLAs below every load that missed them, the smallest load that
    missed them); None where there is none."""
    missed = min((p.load for p in probes if not p.met), default=None)
    met = max((p.load for p in probes if p.met and (missed is None or p.load < missed)), default=None)
    return met, missed


def search(
    measure: Callable[[float], Probe],
    grid: Grid,
    method: Method = "pchip",
) -> list[Probe]:
    """Bracket, then narrow (see the module's docstring); ``measure(load)`` runs one load.
    Returns every probe, in the order measured."""
    if method not in ("pchip", "bisect"):
        raise LoadConfigError(f"capacity(method={method!r}): method must be 'pchip' or 'bisect'")
    probes: list[Probe] = []

    def probe(load: float) -> Probe:
        p = measure(load)
        probes.append(p)
        return p

    load = grid.lo
    while probe(load).met:  # bracketing
        if load >= grid.hi:
            return probes  # capped: hi meets the SLAs
        load = min(grid.hi, math.floor(load * GROWTH) if grid.whole else load * GROWTH)
    bisect_next = method == "bisect"
    while True:  # narrowing
        met, missed = bracket(probes)
        if met is None or missed is None or missed - met <= grid.step:
            return probes
        guess = None if bisect_next else _pchip_root(probes, met, missed)
        load = grid.snap((met + missed) / 2 if guess is None else guess, met, missed)
        probe(load)
        new_met, new_missed = bracket(probes)
        halved = new_met is not None and new_missed is not None and new_missed - new_met <= (missed - met) / 2
        # a guess that did not halve the bracket is followed by a bisection step
        bisect_next = method == "bisect" or (guess is not None and not halved)


def _pchip_root(probes: Sequence[Probe], met: float, missed: float) -> float | None:
    """Where a monotone cubic through the points' margins crosses 0 inside (met, missed); None
    where the margins cannot say (a margin not measured, no crossing there)."""
    by_load: dict[float, float] = {}
    for p in probes:
        by_load[p.load] = p.margin
    xs = np.array(sorted(by_load))
    ys = np.array([by_load[x] for x in xs])
    if len(xs) < 2 or not np.all(np.isfinite(ys)):
        return None
    roots = interpolate.PchipInterpolator(xs, ys, extrapolate=False).solve(0.0, discontinuity=False)
    inside = [float(r) for r in roots if met < r < missed]
    return inside[0] if inside else None


@dataclass
class CapacityResult(SweepResult):
    """What ``infmax.capacity(...)`` returns: the largest load that met the SLAs, and every point
    measured (``results``, a sweep: frontiers and costs read from it as from any sweep).

    ``cap.concurrency`` / ``cap.rate``: the capacity (0 where even ``lo`` missed the SLAs);
    ``cap.met``: some load met them; ``cap.capped``: ``hi`` met them, so the capacity is at
    least that; ``cap.probes``: each load, in the order measured, with its SLA margin.
    """

    over: Over = "concurrency"
    grid: Grid | None = None
    sla: tuple[str, ...] = ()
    method: Method = "pchip"
    probes: list[Probe] = field(default_factory=list)

    @property
    def load(self) -> float:
        """The capacity: the largest load that met the SLAs below the smallest that missed them."""
        met, _ = bracket(self.probes)
        return 0.0 if met is None else met

    @property
    def concurrency(self) -> int:
        if self.over != "concurrency":
            raise AttributeError(f"this capacity was searched over {self.over}: read cap.rate")
        return int(self.load)

    @property
    def rate(self) -> float:
        if self.over != "rate":
            raise AttributeError(f"this capacity was searched over {self.over}: read cap.concurrency")
        return self.load

    @property
    def met(self) -> bool:
        return bracket(self.probes)[0] is not None

    @property
    def capped(self) -> bool:
        """``hi`` met the SLAs: the capacity is at least ``hi`` (the search went no further)."""
        return self.grid is not None and any(p.met and p.load >= self.grid.hi for p in self.probes)

    @property
    def missed_at(self) -> float | None:
        """The smallest load that missed the SLAs (None where none did)."""
        return bracket(self.probes)[1]

    @property
    def non_monotone(self) -> list[float]:
        """Loads that met the SLAs above a load that missed them (noise, or a server that
        behaves so): reported, never taken as the capacity."""
        missed = self.missed_at
        return sorted(p.load for p in self.probes if p.met and missed is not None and p.load > missed)

    def describe(self) -> str:
        """``c=6 meets p99(ttft) < 60ms (c=7 misses it; 6 points: c=1 met, ...)``."""
        if self.grid is None:
            return "no capacity searched"
        g, sla = self.grid, "; ".join(self.sla)
        points = ", ".join(f"{g.label(p.load)} {'met' if p.met else 'missed'}" for p in self.probes)
        n = f"{len(self.probes)} point{'s' * (len(self.probes) != 1)}"
        if not self.met:
            head = f"no load meets {sla}: the lowest, {g.label(g.lo)}, misses it"
        elif self.capped:
            head = f"{g.label(self.load)} meets {sla}, the most searched (hi={g.hi:g}): the capacity is at least that"
        else:
            head = f"{g.label(self.load)} meets {sla} ({g.label(self.missed_at or 0)} misses it)"
        odd = f"; met above a load that missed: {', '.join(g.label(x) for x in self.non_monotone)}"
        return f"{head}; {n}: {points}" + (odd if self.non_monotone else "")

    def __repr__(self) -> str:  # what pytest shows for `assert cap.concurrency >= 64`
        return f"CapacityResult({self.describe()})"

    def capacity_summary(self) -> dict[str, Any] | None:
        g = self.grid
        return {
            "over": self.over,
            "capacity": self.load,
            "met": self.met,
            "capped": self.capped,
            "missed_at": self.missed_at,
            "sla": list(self.sla),
            "lo": g.lo if g else None,
            "hi": g.hi if g else None,
            "step": g.step if g else None,
            "method": self.method,
            "probes": [p.to_dict() for p in self.probes],
            "non_monotone": self.non_monotone,
            "text": self.describe(),
        }

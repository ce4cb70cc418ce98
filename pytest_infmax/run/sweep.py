"""Sweeps: one run per load level, and the frontiers they trace.

InferenceMAX judges a serving stack by its whole curve of throughput per GPU
against interactivity, not by one point. A sweep runs the same scenario at
each concurrency (or request rate) and keeps every point; frontiers and
frontier SLAs such as ``"throughput_per_gpu@interactivity=50 > 10000 tok/s"``
are read from them.

Each point's coordinates: interactivity is the median per-request
1/TPOT (tok/s/user), throughput per GPU is total tokens per second per GPU,
E2E latency is the median. Any registered figure can be an axis, so
``"cost_per_mtok@interactivity=100 < $0.10"`` and
``"tokens_per_mw@interactivity=50 > 1M tok/s/MW"`` are frontier SLAs too: per-request
distributions are read at their median, the server's histograms and gauges at
their mean, run-level figures as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_infmax.measure.cost import Price, TokenCost
from pytest_infmax.measure.frontier import Frontier, FrontierRangeError, Point
from pytest_infmax.measure.registry import METRICS, metric_info
from pytest_infmax.measure.sla import SLASyntaxError, format_quantity, parse
from pytest_infmax.run.results import LoadResult


def _coord_stat(metric: str) -> str | None:
    """The statistic a sweep point stands at: a distribution's median, a server figure's mean."""
    kind = metric_info(metric).kind
    return "p50" if kind == "distribution" else "mean" if kind in ("histogram", "gauge") else None


def point_value(result: LoadResult, metric: str) -> float | None:
    return result.metrics.value(metric, _coord_stat(metric))


@dataclass
class SweepResult:
    """Every point of a sweep, in the order they ran."""

    results: list[LoadResult]
    price: Price | None = None
    price_note: str = ""  # why there is no price, when there is none
    verdicts: list[FrontierVerdict] = field(default_factory=list)

    def frontier(self, y: str = "throughput_per_gpu", x: str = "interactivity") -> Frontier:
        """The Pareto frontier of ``y`` against ``x``, each oriented by its metric's better direction."""
        points = []
        for r in self.results:
            xv, yv = point_value(r, x), point_value(r, y)
            if xv is not None and yv is not None:
                points.append(Point(xv, yv, r.config.label))
        return Frontier.build(x, y, points, _higher_is_better(x), _higher_is_better(y))

    def throughput_per_gpu_at(self, interactivity: float) -> float:
        return self.frontier("throughput_per_gpu", "interactivity").at(interactivity)

    def throughput_per_gpu_at_e2e(self, e2e: float) -> float:
        return self.frontier("throughput_per_gpu", "e2e").at(e2e)

    def costs(self) -> list[TokenCost]:
        """Cost per million tokens at every point (needs ``price``)."""
        if self.price is None:
            raise ValueError(f"no price: {self.price_note or 'pass price= to sweep() or set --infmax-gpu-hour-usd'}")
        return [
            TokenCost.of(
                self.price, r.num_gpus, r.metrics.throughput, r.metrics.input_throughput, r.metrics.output_throughput
            )
            for r in self.results
        ]

    def cost_frontier(self) -> Frontier:
        """Cost per million total tokens (lower is better) against interactivity (needs a price)."""
        self.costs()  # raises, saying how to set a price, when there is none
        return self.frontier("cost_per_mtok", "interactivity")

    def unmeasured(self, metric: str) -> str | None:
        """Why some point has no value of ``metric`` (None when every point has one)."""
        for r in self.results:
            if point_value(r, metric) is None:
                return f"{r.config.label}: {r.metrics.why_unmeasured(metric)}"
        return None

    def capacity_summary(self) -> dict[str, Any] | None:
        """A capacity search's answer, for the reports (``run.capacity.CapacityResult``, a sweep
        whose loads the search chose); None for a sweep of given loads."""
        return None

    def check(self, *objectives: str) -> list[FrontierVerdict]:
        """Check frontier SLAs; raise ``FrontierSLAFailed`` listing every violation."""
        __tracebackhide__ = True
        parsed = [FrontierObjective.parse(o) for o in objectives]
        verdicts = [o.evaluate(self) for o in parsed]
        self.verdicts.extend(verdicts)
        failed = [v for v in verdicts if not v.passed]
        if failed:
            raise FrontierSLAFailed(failed)
        return verdicts


def _lhs(metric: str) -> str:
    """How a frontier coordinate is written in the scalar grammar."""
    stat = _coord_stat(metric) if metric in METRICS else None
    return f"{stat}({metric})" if stat else metric


def _higher_is_better(metric: str) -> bool:
    try:
        return METRICS[metric].higher_is_better
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}") from None


_FRONTIER_EXPR = re.compile(
    r"^\s*(?P<y>[A-Za-z_][A-Za-z0-9_]*)\s*@\s*(?P<x>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?P<at>[^<>=≤≥]+?)\s*(?P<rest>(<=|>=|<|>|≤|≥).*)$"
)


@dataclass(frozen=True)
class FrontierObjective:
    """``Y@X=V OP LIMIT``: the frontier of Y against X, read at X=V, compared with LIMIT."""

    text: str
    y: str
    x: str
    at: float
    at_unit: str
    op: str
    limit: float
    unit: str

    @classmethod
    def parse(cls, text: str) -> FrontierObjective:
        m = _FRONTIER_EXPR.match(text)
        if not m:
            raise SLASyntaxError(
                text,
                "a frontier SLA reads Y@X=VALUE OP LIMIT",
                "e.g. 'throughput_per_gpu@interactivity=50 > 10000 tok/s'",
            )
        y, x = m["y"], m["x"]
        # Reuse the SLA grammar for both sides: same metrics, units and messages.
        try:
            limit_part = parse(f"{_lhs(y)} {m['rest']}")
            at_text = m["at"]
            if x in METRICS and re.fullmatch(r"[0-9.eE+-]+[kM]?", at_text) and METRICS[x].dimension != "time":
                at_text += f" {METRICS[x].unit}"  # interactivity=50 means 50 tok/s/user, as InferenceMAX writes it
            at_part = parse(f"{_lhs(x)} >= {at_text}")
        except SLASyntaxError as exc:
            raise SLASyntaxError(text, exc.problem, exc.hint, what="frontier SLA") from None
        return cls(text, y, x, at_part.limit, at_part.unit, limit_part.op, limit_part.limit, limit_part.unit)

    def evaluate(self, sweep: SweepResult) -> FrontierVerdict:
        frontier = sweep.frontier(self.y, self.x)
        try:
            measured = frontier.at(self.at)
        except FrontierRangeError as exc:
            missing = sweep.unmeasured(self.y) or sweep.unmeasured(self.x)
            why = f"not measured at every point ({missing})" if missing else str(exc)
            return FrontierVerdict(self, None, False, f"FAILED {self.text}: {why}")
        ok = {
            "<": measured < self.limit,
            "<=": measured <= self.limit,
            ">": measured > self.limit,
            ">=": measured >= self.limit,
        }[self.op]
        shown = format_quantity(measured, self.unit)
        msg = (
            f"{'' if ok else 'FAILED '}{self.text}: {shown} on the frontier at "
            f"{self.x}={format_quantity(self.at, self.at_unit)} "
            f"(from {len(frontier.front)} frontier points of {len(frontier.points)})"
        )
        return FrontierVerdict(self, measured, ok, msg)


@dataclass(frozen=True)
class FrontierVerdict:
    objective: FrontierObjective
    measured: float | None
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective.text,
            "measured": self.measured,
            "passed": self.passed,
            "message": self.message,
        }


class FrontierSLAFailed(AssertionError):
    # the reason a failed test's rows give (reports/rows.py), instead of a bare "test"
    verdict_reason = "frontier SLA"

    def __init__(self, failures: Sequence[FrontierVerdict]) -> None:
        self.failures = list(failures)
        super().__init__(
            "\n".join([f"{len(self.failures)} frontier SLA(s) failed:"] + [f"  {v.message}" for v in self.failures])
        )

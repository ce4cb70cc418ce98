"""Judging a run's metrics against SLA objectives: :class:`SLA`, one :class:`Verdict`
per objective, and :class:`SLAFailed` listing the violated ones.

The objectives themselves are parsed by :mod:`pytest_infmax.measure.sla`; the
figures come from :mod:`pytest_infmax.measure.metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pytest_infmax.measure.metrics import GoodputLimits, GoodputSpec, Metrics
from pytest_infmax.measure.sla import Objective, _short_repr, format_quantity, parse_all, split_expressions

__all__ = ["SLA", "SLAFailed", "Verdict"]


class SLAFailed(AssertionError):
    """Raised by :meth:`SLA.check`: every violated objective, one per line.

    ``verdicts`` keeps the verdicts it was given (:meth:`SLA.check` gives all,
    passed ones too, for reports); ``failures`` just the failed ones.
    ``context`` (e.g. which run) heads the message when given.
    """

    from_marker = False  # the plugin sets it where the verdicts are the whole report (no traceback)

    def __init__(self, verdicts: Iterable[Verdict], *, context: str | None = None) -> None:
        self.verdicts = list(verdicts)
        self.failures = [v for v in self.verdicts if not v.passed]
        self.context = context
        super().__init__(self._render())

    def _render(self) -> str:
        n, total = len(self.failures), len(self.verdicts)
        noun = "objective" if total == 1 else "objectives"
        count = f"{n} of {total}" if n != total else f"{n}"
        lines = [self.context] if self.context else []
        lines.append(f"{count} SLA {noun} failed:")
        lines += [f"  {v.message}" for v in self.failures]
        return "\n".join(lines)


# -- evaluation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """How one objective fared against a run.

    ``passed`` is always a bool: an objective with nothing to measure (no
    requests measured, no successful requests for a latency statistic, no
    goodput limits) has ``measured=None`` and *fails*, because an SLA that was
    not shown to hold did not hold.
    ``count`` is how many requests the figure rests on.
    """

    objective: Objective
    measured: float | None
    passed: bool
    count: int
    message: str

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        o = self.objective
        return {
            "objective": str(o),
            "metric": o.metric,
            "stat": o.stat,
            "op": o.op,
            "limit": o.limit,
            "unit": o.unit,
            "measured": self.measured,
            "passed": self.passed,
            "count": self.count,
            "message": self.message,
        }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _over_under(objective: Objective, measured: float) -> str:
    if objective.limit == 0 or measured == objective.limit:
        return "at the limit" if measured == objective.limit else ""
    rel = abs(measured - objective.limit) / abs(objective.limit) * 100
    pct = f"{rel:.0f}" if rel >= 10 else (f"{rel:.1f}" if rel >= 1 else f"{rel:.2g}")
    return f"{pct}% {'over' if measured > objective.limit else 'under'}"


def _no_data_reason(objective: Objective, metrics: Metrics) -> str:
    if objective.info.source != "requests" and metrics.num_requests:
        return f"not measured: {metrics.why_unmeasured(objective.metric)}"
    if objective.metric in ("goodput", "goodput_ratio") and metrics.goodput_limits is None:
        return "goodput needs per-request limits: pass goodput='ttft<500ms, tpot<50ms'"
    if metrics.num_requests == 0:
        return "no requests were measured"
    if metrics.num_ok == 0:
        return f"no successful requests ({metrics.num_requests} measured, all failed)"
    return f"no {objective.metric} values among {_plural(metrics.num_ok, 'successful request')}"


def _judge(objective: Objective, metrics: Metrics) -> Verdict:
    # An empty run proves nothing, even where a figure exists (throughput 0.0).
    measured = metrics.value(objective.metric, objective.stat) if metrics.num_requests else None
    count = metrics.count_behind(objective.metric)
    if measured is None:
        message = f"FAILED {objective}: {_no_data_reason(objective, metrics)}"
        return Verdict(objective, None, False, count, message)
    shown = format_quantity(measured, objective.unit)
    span = metrics.value_range(objective.metric, objective.stat) if objective.stat else None
    if span is not None:
        # A histogram's percentile is only known to lie inside one bucket: judged at the end
        # that could break the limit, so a pass is certain (never a pass the data cannot show).
        lo, hi = span
        measured = hi if objective.op in ("<", "<=") else lo
        mean = metrics.value(objective.metric, "mean")
        shown = (
            f"{format_quantity(lo, objective.unit)} to {format_quantity(hi, objective.unit)} "
            f"(within one histogram bucket{'' if mean is None else ', mean ' + format_quantity(mean, objective.unit)})"
        )
    passed = objective.holds(measured)
    noun = "request" if objective.info.kind != "gauge" else "sample"
    behind = f"over {_plural(count, noun)}"
    if objective.info.kind in ("histogram", "gauge"):
        behind += " (the server's metrics)"
    if objective.metric == "itl":
        behind += f" ({_plural(metrics.itl.count, 'token gap')})"
    provenance = metrics.provenance_of(objective.metric)
    if objective.info.source in ("price", "energy") and provenance:
        behind += f"; {provenance}"
    if passed:
        return Verdict(objective, measured, True, count, f"{objective}: measured {shown} {behind}")
    detail = ", ".join(x for x in (f"limit {objective.limit_text}", _over_under(objective, measured)) if x)
    message = f"FAILED {objective}: measured {shown} ({detail}) {behind}"
    return Verdict(objective, measured, False, count, message)


def _flatten(arg: str | Objective | Iterable[str | Objective]) -> list[str | Objective]:
    if isinstance(arg, str):
        return list(split_expressions(arg))
    if isinstance(arg, Objective):
        return [arg]
    if isinstance(arg, Iterable) and not isinstance(arg, (bytes, bytearray, Mapping)):
        return [piece for item in arg for piece in _flatten(item)]
    raise TypeError(
        f"an SLA objective is a str (e.g. 'p99(ttft) < 500ms') or an Objective, "
        f"got {type(arg).__name__} {_short_repr(arg)}"
        + ("; per-request limits go in goodput={...}" if isinstance(arg, Mapping) else "")
    )


class SLA:
    """A set of objectives, validated when built so mistakes surface before load.

    Each positional argument may be a string (split on ',', ';' and
    newlines), an Objective, or an iterable of either, so ``SLA("a", "b")``,
    ``SLA(["a", "b"])`` and ``SLA("a, b")`` are the same SLA (and
    ``@pytest.mark.sla("a", "b")`` args can be passed straight through).
    ``goodput`` holds the per-request limits that ``goodput``/``goodput_ratio``
    objectives are computed against; pass ``sla.goodput`` to ``compute_metrics``.
    """

    def __init__(
        self,
        *objectives: str | Objective | Iterable[str | Objective],
        goodput: GoodputSpec | None = None,
    ) -> None:
        items: list[str | Objective] = []
        for arg in objectives:
            items.extend(_flatten(arg))
        self.objectives: tuple[Objective, ...] = tuple(parse_all(items))
        self.goodput: GoodputLimits | None = GoodputLimits.parse(goodput) if goodput is not None else None

    @property
    def needs_goodput(self) -> bool:
        """Whether some objective is on goodput (so limits must reach compute_metrics)."""
        return any(o.metric in ("goodput", "goodput_ratio") for o in self.objectives)

    def evaluate(self, metrics: Metrics) -> list[Verdict]:
        """One verdict per objective, in order."""
        return [self._evaluate_one(o, metrics) for o in self.objectives]

    def _evaluate_one(self, objective: Objective, metrics: Metrics) -> Verdict:
        if objective.metric in ("goodput", "goodput_ratio") and self.goodput is not None:
            problem = None
            if metrics.goodput_limits is None:
                problem = (
                    "goodput needs per-request limits: these metrics were computed "
                    "without them; pass goodput=sla.goodput to compute_metrics"
                )
            elif metrics.goodput_limits != self.goodput:
                problem = (
                    f"metrics were computed with goodput limits '{metrics.goodput_limits}' "
                    f"but this SLA's are '{self.goodput}'"
                )
            if problem is not None:
                count = metrics.count_behind(objective.metric)
                return Verdict(objective, None, False, count, f"FAILED {objective}: {problem}")
        return _judge(objective, metrics)

    def check(self, metrics: Metrics) -> list[Verdict]:
        """Evaluate, raising SLAFailed (an AssertionError) listing every violation."""
        verdicts = self.evaluate(metrics)
        if not all(v.passed for v in verdicts):
            raise SLAFailed(verdicts)
        return verdicts

    def __iter__(self) -> Iterator[Objective]:
        return iter(self.objectives)

    def __len__(self) -> int:
        return len(self.objectives)

    def __str__(self) -> str:
        return ", ".join(str(o) for o in self.objectives)

    def __repr__(self) -> str:
        goodput = f", goodput={str(self.goodput)!r}" if self.goodput is not None else ""
        return f"SLA({', '.join(repr(str(o)) for o in self.objectives)}{goodput})"


# -- the error budget: silence is a failure ----------------------------------------------

#: InferenceMAX's rule: a run with more failed requests than this fails, whatever else it measured
DEFAULT_MAX_ERROR_RATE = 0.05


def excess_errors(
    metrics: Mapping[str, Any], sla: Iterable[Mapping[str, Any]], max_error_rate: float | None
) -> str | None:
    """What is wrong when a run failed more requests than ``max_error_rate`` allows and the test
    set no ``error_rate`` objective of its own (that one is the test's word on errors), e.g.
    ``6 of 6 requests failed (6 connect_error)``; None where the run is within the budget, the
    budget is off (``None``) or the test judged ``error_rate`` itself.

    ``metrics`` is ``Metrics.to_dict()`` (or a results file's ``metrics``), ``sla`` the verdicts'
    dicts: the reports tell the same from a results file as the session did.
    """
    if max_error_rate is None or any(v.get("metric") == "error_rate" for v in sla):
        return None
    rate = metrics.get("error_rate")
    if not isinstance(rate, (int, float)) or rate != rate or not rate > max_error_rate:  # NaN: nothing measured
        return None
    total = int(metrics.get("num_requests") or 0)
    failed = total - int(metrics.get("num_ok") or 0)
    kinds = ", ".join(f"{n} {kind}" for kind, n in (metrics.get("errors_by_kind") or {}).items())
    return f"{failed} of {total} requests failed" + (f" ({kinds})" if kinds else "")

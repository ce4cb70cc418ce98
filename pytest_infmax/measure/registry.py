"""The metric registry: every metric's name, kind, dimension and display unit, and
the names of statistics and comparisons.

Both the SLA grammar (:mod:`pytest_infmax.measure.sla`) and the computation
(:mod:`pytest_infmax.measure.metrics`) read it; it imports neither.

Adding a scalar metric (say ``cost_per_mtok``) takes one :data:`METRICS` entry
and one :class:`~pytest_infmax.measure.metrics.Metrics` field of the same name
(plus computing it): every consumer looks figures up by name through
``Metrics.value``.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

Kind = Literal["distribution", "scalar"]
Dimension = Literal["time", "tokens_per_second", "requests_per_second", "ratio"]

# -- registry ----------------------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is: how it is aggregated, what it measures, how to show it.

    ``unit`` is the display label (``ms`` for times, ``%`` for ratios); values
    themselves are always canonical (seconds, per second, fraction).
    """

    name: str
    kind: Kind
    dimension: Dimension
    unit: str
    description: str
    higher_is_better: bool


def _registry(*infos: MetricInfo) -> dict[str, MetricInfo]:
    return {info.name: info for info in infos}


METRICS: dict[str, MetricInfo] = _registry(
    # per-request distributions
    MetricInfo("ttft", "distribution", "time", "ms", "time to first token: request sent to first content token", False),
    MetricInfo(
        "tpot", "distribution", "time", "ms", "time per output token: (E2E - TTFT) / (output tokens - 1)", False
    ),
    MetricInfo(
        "itl", "distribution", "time", "ms", "inter-token latency, per token (a k-token chunk gives k gaps)", False
    ),
    MetricInfo("e2e", "distribution", "time", "ms", "end-to-end latency: request sent to response fully read", False),
    MetricInfo(
        "interactivity",
        "distribution",
        "tokens_per_second",
        "tok/s/user",
        "tokens per second seen by one user: 1 / TPOT",
        True,
    ),
    # run-level scalars
    MetricInfo(
        "request_throughput",
        "scalar",
        "requests_per_second",
        "req/s",
        "successful requests per second of wall time",
        True,
    ),
    MetricInfo(
        "input_throughput",
        "scalar",
        "tokens_per_second",
        "tok/s",
        "input tokens of successful requests per second",
        True,
    ),
    MetricInfo(
        "output_throughput",
        "scalar",
        "tokens_per_second",
        "tok/s",
        "output tokens of successful requests per second",
        True,
    ),
    MetricInfo(
        "throughput",
        "scalar",
        "tokens_per_second",
        "tok/s",
        "input + output tokens of successful requests per second",
        True,
    ),
    MetricInfo(
        "input_throughput_per_gpu",
        "scalar",
        "tokens_per_second",
        "tok/s/gpu",
        "input throughput divided by the GPU count",
        True,
    ),
    MetricInfo(
        "output_throughput_per_gpu",
        "scalar",
        "tokens_per_second",
        "tok/s/gpu",
        "output throughput divided by the GPU count",
        True,
    ),
    MetricInfo(
        "throughput_per_gpu",
        "scalar",
        "tokens_per_second",
        "tok/s/gpu",
        "total (input + output) throughput divided by the GPU count",
        True,
    ),
    MetricInfo("error_rate", "scalar", "ratio", "%", "failed requests / measured requests", False),
    MetricInfo(
        "goodput",
        "scalar",
        "requests_per_second",
        "req/s",
        "requests per second that succeeded and met every goodput limit",
        True,
    ),
    MetricInfo(
        "goodput_ratio",
        "scalar",
        "ratio",
        "%",
        "share of measured requests that succeeded and met every goodput limit",
        True,
    ),
)

DISTRIBUTION_METRICS: tuple[str, ...] = tuple(name for name, info in METRICS.items() if info.kind == "distribution")
SCALAR_METRICS: tuple[str, ...] = tuple(name for name, info in METRICS.items() if info.kind == "scalar")

#: metrics a goodput limit may constrain: those defined for a single request
GOODPUT_METRICS: tuple[str, ...] = ("ttft", "tpot", "e2e", "interactivity")


def metric_info(name: str) -> MetricInfo:
    """Look a metric up, failing with the list of known ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}") from None


# -- comparisons and statistic names (shared with the SLA grammar) ------------

OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}

NAMED_STATS: tuple[str, ...] = ("mean", "median", "std", "min", "max")
_PERCENTILE_RE = re.compile(r"p(\d+(?:\.\d+)?)")


def format_quantile(q: float) -> str:
    """Shortest positional spelling of a percentile: 99.0 -> '99', 99.9 -> '99.9'.

    Never scientific notation, so ``'p' + format_quantile(q)`` always re-parses.
    """
    if float(q).is_integer():
        return str(int(q))
    return format(Decimal(repr(float(q))), "f")


def parse_stat(name: str) -> str:
    """Normalise a statistic name ('P99.90' -> 'p99.9', ' Mean' -> 'mean').

    Raises ValueError naming what is accepted; percentiles must be in (0, 100].
    """
    text = name.strip().lower()
    if text in NAMED_STATS:
        return text
    match = _PERCENTILE_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"unknown statistic {name!r}; expected one of {', '.join(NAMED_STATS)} "
            "or a percentile such as p50, p99 or p99.9"
        )
    q = float(match.group(1))
    if not 0.0 < q <= 100.0:
        raise ValueError(f"percentile {name!r} is out of range: it must be above p0 and at most p100")
    return "p" + format_quantile(q)


def stat_quantile(stat: str) -> float | None:
    """The percentile a normalised stat names ('p99.9' -> 99.9), else None."""
    if stat.startswith("p"):
        return float(stat[1:])
    return None

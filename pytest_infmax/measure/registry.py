"""The metric registry: every figure a run produces, with its kind, dimension, display
unit, better direction and source, and the names of statistics and comparisons.

Every consumer iterates this one table: the SLA grammar
(:mod:`pytest_infmax.measure.sla`), the computation (:mod:`pytest_infmax.measure.metrics`),
frontier SLAs, the baseline gate, and every report. It imports none of them.

A figure's *source* says what it needs beyond the request records:

* ``requests``: computed from the records alone (latencies, throughputs, errors, goodput);
* ``price``: a $/GPU-hour price (cost per million tokens); *priced* at that price's source;
* ``energy``: GPU energy over the measured phase, *measured* through NVML or *modelled*
  (the simulator); $/kWh for the energy's own cost;
* ``server``: the server's own Prometheus metrics (histograms and gauges).

Where that input is missing the figure is *not measured*, with a reason: never zero,
and an SLA on it fails saying how to measure it.

Adding a run-level figure takes one :data:`METRICS` entry here and its computation
in :mod:`pytest_infmax.measure.metrics`; a new dimension also takes its units in
:data:`pytest_infmax.measure.sla.UNITS`.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

#: distribution: one value per request, judged by a statistic (p99, mean...);
#: scalar: one value per run; histogram: the server's Prometheus histogram (mean exact,
#: percentiles known only to within a bucket); gauge: a server gauge sampled during the run.
Kind = Literal["distribution", "scalar", "histogram", "gauge"]
Dimension = Literal[
    "time",
    "tokens_per_second",
    "requests_per_second",
    "ratio",
    "cost",
    "energy_per_token",
    "tokens_per_second_per_mw",
    "power",
    "count",
]
Source = Literal["requests", "price", "energy", "server"]

#: what each source is, in words, for tables and messages
SOURCES: dict[str, str] = {
    "requests": "measured from the requests",
    "price": "priced: needs a $/GPU-hour price",
    "energy": "needs GPU energy (NVML, or the simulator's model)",
    "server": "from the server's own Prometheus metrics",
}

# -- registry ----------------------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is: how it is aggregated, what it measures, how to show it.

    ``unit`` is the display label (``ms`` for times, ``%`` for ratios, ``$/Mtok``);
    values themselves are always canonical (seconds, per second, fraction, $ per
    million tokens, J per token, W). ``stats``: the statistics a histogram or gauge
    has (a distribution takes any, a scalar none).
    """

    name: str
    kind: Kind
    dimension: Dimension
    unit: str
    description: str
    higher_is_better: bool
    source: Source = "requests"
    stats: tuple[str, ...] = ()

    @property
    def takes_stat(self) -> bool:
        return self.kind != "scalar"


def _registry(*infos: MetricInfo) -> dict[str, MetricInfo]:
    return {info.name: info for info in infos}


def _server_histogram(role: str, what: str) -> MetricInfo:
    return MetricInfo(
        f"server_{role}",
        "histogram",
        "time",
        "ms",
        f"the server's own {what} (Prometheus histogram: mean exact, p50/p99 within one bucket)",
        False,
        "server",
        ("mean", "p50", "p99"),
    )


def _server_gauge(role: str, dimension: Dimension, unit: str, what: str) -> MetricInfo:
    return MetricInfo(
        f"server_{role}",
        "gauge",
        dimension,
        unit,
        f"the server's {what}, sampled during the run",
        False,
        "server",
        ("mean", "max"),
    )


_COST = "$/GPU-hour x GPUs / (tok/s x 3600) x 10^6"

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
    # cost, at a $/GPU-hour price (InferenceMAX: cost = $/GPU-hour x GPUs / (tok/s x 3600) x 10^6)
    MetricInfo(
        "cost_per_mtok", "scalar", "cost", "$/Mtok", f"$ per million tokens, input + output: {_COST}", False, "price"
    ),
    MetricInfo(
        "input_cost_per_mtok",
        "scalar",
        "cost",
        "$/Mtok",
        "$ per million input tokens (all GPU time over the input tokens)",
        False,
        "price",
    ),
    MetricInfo(
        "output_cost_per_mtok",
        "scalar",
        "cost",
        "$/Mtok",
        "$ per million output tokens (all GPU time over the output tokens)",
        False,
        "price",
    ),
    # energy over the measured phase (energy is not separable by token type: each is the whole energy)
    MetricInfo(
        "energy_per_token",
        "scalar",
        "energy_per_token",
        "J/token",
        "GPU energy over the measured phase / (input + output tokens)",
        False,
        "energy",
    ),
    MetricInfo(
        "input_energy_per_token",
        "scalar",
        "energy_per_token",
        "J/token",
        "GPU energy over the measured phase / input tokens",
        False,
        "energy",
    ),
    MetricInfo(
        "output_energy_per_token",
        "scalar",
        "energy_per_token",
        "J/token",
        "GPU energy over the measured phase / output tokens",
        False,
        "energy",
    ),
    MetricInfo(
        "tokens_per_mw",
        "scalar",
        "tokens_per_second_per_mw",
        "tok/s/MW",
        "tokens per second per MW: throughput per GPU x 1000 / kW per GPU (InferenceMAX), at the measured power",
        True,
        "energy",
    ),
    MetricInfo(
        "output_tokens_per_mw",
        "scalar",
        "tokens_per_second_per_mw",
        "tok/s/MW",
        "output tokens per second per MW of measured GPU power",
        True,
        "energy",
    ),
    MetricInfo("power", "scalar", "power", "W", "average power of all GPUs over the measured phase", False, "energy"),
    MetricInfo(
        "power_per_gpu", "scalar", "power", "W/gpu", "average power per GPU over the measured phase", False, "energy"
    ),
    MetricInfo(
        "energy_cost_per_mtok",
        "scalar",
        "cost",
        "$/Mtok",
        "electricity cost per million tokens at the $/kWh set (--infmax-usd-per-kwh)",
        False,
        "energy",
    ),
    # the server's own view (Prometheus), beside the client's
    _server_histogram("ttft", "time to first token"),
    _server_histogram("queue_time", "time requests waited in its queue"),
    _server_histogram("itl", "inter-token latency"),
    _server_histogram("tpot", "time per output token"),
    _server_histogram("e2e", "end-to-end request latency"),
    _server_gauge("running", "count", "", "requests running"),
    _server_gauge("waiting", "count", "", "requests waiting"),
    _server_gauge("kv_cache_usage", "ratio", "%", "KV-cache use"),
    # prefix reuse: what the workload designed (load.workloads), and what the server's cache found
    MetricInfo(
        "designed_prefix_reuse",
        "scalar",
        "ratio",
        "%",
        "share of prompt tokens the workload designed to repeat an earlier prompt's start "
        "(multi-turn history, shared prefixes, a trace's hash ids); 0 for random prompts",
        True,
    ),
    MetricInfo(
        "prefix_cache_hit_rate",
        "scalar",
        "ratio",
        "%",
        "the server's prefix-cache hits / queries over the measured phase, in prompt tokens "
        "(vllm:prefix_cache_hits / vllm:prefix_cache_queries)",
        True,
        "server",
    ),
)

DISTRIBUTION_METRICS: tuple[str, ...] = tuple(name for name, info in METRICS.items() if info.kind == "distribution")
SCALAR_METRICS: tuple[str, ...] = tuple(name for name, info in METRICS.items() if info.kind == "scalar")
SERVER_METRICS: tuple[str, ...] = tuple(name for name, info in METRICS.items() if info.source == "server")

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

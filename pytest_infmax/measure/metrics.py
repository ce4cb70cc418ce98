"""Metrics computed from request records, following InferenceMAX's definitions.

Everything here is derived from :class:`~pytest_infmax.records.RequestRecord`
objects and nothing else, so a JSON report that keeps its records can always be
recomputed. Definitions (InferenceMAX / vLLM ``benchmark_serving``):

* **TTFT**: request sent to first content token.
* **TPOT** per request: ``(E2E - TTFT) / (output tokens - 1)``; undefined for a
  request with fewer than two output tokens.
* **Interactivity** per request: ``1 / TPOT`` (tok/s/user). A request whose TPOT
  is 0 (every token arrived in its first chunk) has no finite interactivity and
  is left out of that distribution.
* **ITL**: per-token inter-token latency; a chunk of ``k`` tokens contributes
  ``k`` gaps of ``interval / k`` (see ``RequestRecord.itls``).
* **Throughput**: tokens / wall time, from successful requests only; ``*_per_gpu``
  divides by the GPU count. ``request_throughput`` counts successful requests
  (vLLM's ``completed / duration``).
* **Error rate**: failed / measured requests.
* **Goodput** (vLLM): requests per second that succeeded *and* met every
  per-request limit; ``goodput_ratio`` is the share of measured requests that did.

Latencies are kept in seconds, rates per second and ratios as fractions; units
for display belong to :mod:`pytest_infmax.measure.sla` and the reports. What each
metric is (its kind, dimension and unit) is in :mod:`pytest_infmax.measure.registry`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from pytest_infmax.measure.registry import (
    DISTRIBUTION_METRICS,
    GOODPUT_METRICS,
    NAMED_STATS,
    OPS,
    SCALAR_METRICS,
    format_quantile,
    metric_info,
    parse_stat,
    stat_quantile,
)
from pytest_infmax.measure.sla import Objective, parse_goodput_limits
from pytest_infmax.records import RequestRecord

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0)


def _check_quantile(q: float) -> float:
    q = float(q)
    if not 0.0 < q <= 100.0:
        raise ValueError(f"percentile {q!r} is out of range; use a value in (0, 100]")
    return q


# -- distributions ------------------------------------------------------------


@dataclass(frozen=True)
class Distribution:
    """Summary of per-request (or per-token) values.

    ``values`` is a sorted, read-only float64 array. ``std`` is the *population*
    standard deviation (ddof=0), as numpy and vLLM's benchmark report it: the
    run is the whole population we describe, not a sample of one.
    Percentiles use numpy's default linear interpolation, like vLLM.
    An empty distribution has count 0 and NaN statistics; nothing raises.
    ``num_requests`` is how many requests contributed values (differs from
    ``count`` only for ITL, which has one value per token gap).
    """

    values: np.ndarray = field(repr=False, compare=False)
    count: int
    mean: float
    median: float
    std: float
    min: float
    max: float
    percentiles: dict[float, float]
    num_requests: int

    @classmethod
    def from_values(
        cls,
        values: Iterable[float],
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        *,
        num_requests: int | None = None,
    ) -> Distribution:
        arr = np.sort(np.asarray(list(values), dtype=np.float64))
        arr.flags.writeable = False
        qs = _normalise_percentiles(percentiles)
        count = int(arr.size)
        if count == 0:
            nan = math.nan
            pct = {q: nan for q in qs}
            return cls(arr, 0, nan, nan, nan, nan, nan, pct, num_requests or 0)
        pct = {q: float(np.percentile(arr, q)) for q in qs}
        return cls(
            values=arr,
            count=count,
            mean=float(np.mean(arr)),
            median=float(np.median(arr)),
            std=float(np.std(arr)),
            min=float(arr[0]),
            max=float(arr[-1]),
            percentiles=pct,
            num_requests=count if num_requests is None else num_requests,
        )

    def percentile(self, q: float) -> float:
        """Any percentile (0 < q <= 100) by linear interpolation; NaN when empty."""
        q = _check_quantile(q)
        if q in self.percentiles:
            return self.percentiles[q]
        if self.count == 0:
            return math.nan
        return float(np.percentile(self.values, q))

    def stat(self, name: str) -> float:
        """A statistic by name: mean, median, std, min, max or pNN (e.g. p99.9)."""
        stat = parse_stat(name)
        q = stat_quantile(stat)
        if q is not None:
            return self.percentile(q)
        return float(getattr(self, stat))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary without the raw values; NaN becomes None."""
        out: dict[str, Any] = {"count": self.count}
        for name in NAMED_STATS:
            out[name] = _json_float(getattr(self, name))
        for q, v in self.percentiles.items():
            out["p" + format_quantile(q)] = _json_float(v)
        return out


def _normalise_percentiles(percentiles: Sequence[float]) -> tuple[float, ...]:
    return tuple(sorted({_check_quantile(q) for q in percentiles}))


def _json_float(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# -- goodput limits -------------------------------------------------------------

GoodputSpec = Union["GoodputLimits", str, Mapping[str, str | float | int]]


def per_request_value(record: RequestRecord, metric: str) -> float | None:
    """A goodput metric for one request; None where it is not defined.

    Interactivity of a request with TPOT 0 is +inf (it met any floor).
    """
    if metric == "interactivity":
        tpot = record.tpot
        if tpot is None:
            return None
        return math.inf if tpot <= 0 else 1.0 / tpot
    if metric == "ttft":
        return record.ttft_from_schedule
    if metric == "tpot":
        return record.tpot
    if metric == "e2e":
        return record.e2e_from_schedule
    raise KeyError(f"{metric!r} is not a per-request metric; use one of {', '.join(GOODPUT_METRICS)}")


@dataclass(frozen=True)
class GoodputLimits:
    """Per-request limits a request must all meet to count toward goodput.

    Each limit is an :class:`~pytest_infmax.measure.sla.Objective` with ``stat=None``
    (it applies to every request, not to a statistic over them). Build with
    :meth:`parse` from ``"ttft <= 500ms, tpot < 50ms"`` or
    ``{"ttft": "500ms", "tpot": 0.05}``.

    A request meets the limits when it succeeded and each limit holds. A
    request with fewer than two output tokens has no TPOT (and so no
    interactivity): it meets tpot/interactivity limits *vacuously*, since it
    never made a user wait between tokens. A successful request missing its
    TTFT or E2E cannot be shown to meet a limit on them, so it does not.
    """

    limits: tuple[Objective, ...]

    @classmethod
    def parse(cls, spec: GoodputSpec) -> GoodputLimits:
        """Parse a string or a mapping; an existing GoodputLimits is returned as is."""
        if isinstance(spec, GoodputLimits):
            return spec
        return cls(parse_goodput_limits(spec))

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(limit.metric for limit in self.limits)

    def meets(self, record: RequestRecord) -> bool:
        """Did this request succeed and meet every limit?"""
        if not record.ok:
            return False
        return all(self._holds(record, limit) for limit in self.limits)

    @staticmethod
    def _holds(record: RequestRecord, limit: Objective) -> bool:
        value = per_request_value(record, limit.metric)
        if value is None:
            return limit.metric in ("tpot", "interactivity")  # vacuous: no TPOT
        return OPS[limit.op](value, limit.limit)

    def __str__(self) -> str:
        return ", ".join(str(limit) for limit in self.limits)


# -- run metrics ---------------------------------------------------------------


@dataclass
class Metrics:
    """Every figure of one measured run (warm-up requests excluded).

    Scalars are plain float fields named as in :data:`METRICS`; ``goodput`` and
    ``goodput_ratio`` are None when no goodput limits were given. Ratios whose
    denominator is zero (``error_rate`` of a run with no requests) are NaN.
    """

    num_requests: int
    num_ok: int
    num_errors: int
    errors_by_kind: dict[str, int]
    num_warmup: int
    duration: float
    num_gpus: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    throughput: float
    input_throughput_per_gpu: float
    output_throughput_per_gpu: float
    throughput_per_gpu: float
    error_rate: float
    goodput: float | None
    goodput_ratio: float | None
    num_good: int | None
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    interactivity: Distribution
    goodput_limits: GoodputLimits | None
    percentiles: tuple[float, ...]

    def distribution(self, metric: str) -> Distribution:
        info = metric_info(metric)
        if info.kind != "distribution":
            raise ValueError(f"{metric} is a run-level scalar, not a distribution")
        dist: Distribution = getattr(self, metric)
        return dist

    def value(self, metric: str, stat: str | None = None) -> float | None:
        """A figure by name; None when it is undefined (no data, or no goodput limits).

        Distribution metrics need a statistic (``value('ttft', 'p99')``);
        scalars take none. Raises KeyError for an unknown metric and ValueError
        for a missing, unknown or superfluous statistic.
        """
        info = metric_info(metric)
        if info.kind == "distribution":
            if stat is None:
                raise ValueError(
                    f"{metric} is a per-request distribution; say which statistic, e.g. value({metric!r}, 'p99')"
                )
            result: float | None = self.distribution(metric).stat(stat)
        else:
            if stat is not None:
                raise ValueError(
                    f"{metric} is a run-level scalar; it takes no statistic (got {stat!r}), use value({metric!r})"
                )
            result = getattr(self, metric)
        if result is None or math.isnan(result):
            return None
        return float(result)

    def count_behind(self, metric: str) -> int:
        """How many requests a figure rests on.

        For a distribution, the requests that contributed values (for ITL that
        is requests with at least two chunks, not token gaps); for a run-level
        scalar, every measured request.
        """
        info = metric_info(metric)
        if info.kind == "distribution":
            return self.distribution(metric).num_requests
        return self.num_requests

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain Python types, NaN as None, distributions summarised."""
        out: dict[str, Any] = {
            "num_requests": self.num_requests,
            "num_ok": self.num_ok,
            "num_errors": self.num_errors,
            "errors_by_kind": dict(self.errors_by_kind),
            "num_warmup": self.num_warmup,
            "duration": _json_float(self.duration),
            "num_gpus": self.num_gpus,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
        }
        for name in SCALAR_METRICS:
            out[name] = _json_float(getattr(self, name))
        out["num_good"] = self.num_good
        out["goodput_limits"] = None if self.goodput_limits is None else str(self.goodput_limits)
        out["percentiles"] = [float(q) for q in self.percentiles]
        for name in DISTRIBUTION_METRICS:
            out[name] = getattr(self, name).to_dict()
        return out


# -- computation ------------------------------------------------------------------


def wall_time(records: Sequence[RequestRecord]) -> float:
    """Seconds from the first request's start to the last one's end.

    A request starts when it was sent, or, in an open-loop run, when it was
    scheduled if that was earlier (a client falling behind its schedule must
    not shorten the window). A request that never ended counts at its send time.
    """
    if not records:
        return 0.0
    start = min(_start_time(r) for r in records)
    end = max(r.end_time if r.end_time is not None else r.send_time for r in records)
    return max(end - start, 0.0)


def _start_time(record: RequestRecord) -> float:
    if record.scheduled_time is None:
        return record.send_time
    return min(record.scheduled_time, record.send_time)


def _rate(amount: float, duration: float) -> float:
    return amount / duration if duration > 0 else 0.0


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else math.nan


def _errors_by_kind(records: Iterable[RequestRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        if r.error_kind is not None:
            key = r.error_kind.value
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _distributions(ok: Sequence[RequestRecord], qs: tuple[float, ...]) -> dict[str, Distribution]:
    # Open-loop latencies start at the scheduled send time, so a client that sends late
    # cannot hide its own delay (no coordinated omission); closed loop: from the write.
    ttft = [t for t in (r.ttft_from_schedule for r in ok) if t is not None]
    e2e = [t for t in (r.e2e_from_schedule for r in ok) if t is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    interactivity = [1.0 / t for t in tpot if t > 0]
    itl_lists = [r.itls() for r in ok]
    itl = [gap for gaps in itl_lists for gap in gaps]
    return {
        "ttft": Distribution.from_values(ttft, qs),
        "tpot": Distribution.from_values(tpot, qs),
        "itl": Distribution.from_values(itl, qs, num_requests=sum(1 for g in itl_lists if g)),
        "e2e": Distribution.from_values(e2e, qs),
        "interactivity": Distribution.from_values(interactivity, qs),
    }


def compute_metrics(
    records: Sequence[RequestRecord],
    *,
    num_gpus: int = 1,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    goodput: GoodputSpec | None = None,
) -> Metrics:
    """Compute every metric of a run from its records.

    Warm-up records are dropped first. Token totals come from successful
    requests only (a failed request's tokens were not served); a missing count
    counts as 0. Throughputs are 0.0 when the run has no duration or nothing
    succeeded. ``goodput`` (limits as a string, mapping or GoodputLimits) turns
    on ``goodput``/``goodput_ratio``; without it they are None.
    """
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"num_gpus must be a whole number >= 1, got {num_gpus!r}")
    qs = _normalise_percentiles(percentiles)
    limits = GoodputLimits.parse(goodput) if goodput is not None else None

    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.ok]
    duration = wall_time(measured)
    input_tokens = sum(r.input_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    total_rate = _rate(input_tokens + output_tokens, duration)
    input_rate = _rate(input_tokens, duration)
    output_rate = _rate(output_tokens, duration)

    num_good = sum(1 for r in measured if limits.meets(r)) if limits is not None else None

    return Metrics(
        num_requests=len(measured),
        num_ok=len(ok),
        num_errors=len(measured) - len(ok),
        errors_by_kind=_errors_by_kind(measured),
        num_warmup=len(records) - len(measured),
        duration=duration,
        num_gpus=num_gpus,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=_rate(len(ok), duration),
        input_throughput=input_rate,
        output_throughput=output_rate,
        throughput=total_rate,
        input_throughput_per_gpu=input_rate / num_gpus,
        output_throughput_per_gpu=output_rate / num_gpus,
        throughput_per_gpu=total_rate / num_gpus,
        error_rate=_ratio(len(measured) - len(ok), len(measured)),
        goodput=_rate(num_good, duration) if num_good is not None else None,
        goodput_ratio=_ratio(num_good, len(measured)) if num_good is not None else None,
        num_good=num_good,
        goodput_limits=limits,
        percentiles=qs,
        **_distributions(ok, qs),
    )

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

* **Cost** per million tokens (InferenceMAX): ``$/GPU-hour x GPUs / (tok/s x 3600) x 10^6``,
  at the price the run was given (:mod:`pytest_infmax.measure.cost`).
* **Energy** per token: the GPU energy of the measured phase over its tokens;
  **tokens per MW** (InferenceMAX: throughput per GPU x 1000 / kW per GPU) at the
  measured average **power** (:mod:`pytest_infmax.measure.energy`).
* **Server-side** figures: the server's own Prometheus histograms and gauges
  (:mod:`pytest_infmax.measure.servermetrics`); ``prefix_cache_hit_rate`` is its
  prefix-cache hits over queries (prompt tokens) between the scrapes around the run.
* **Designed prefix reuse**: the measured requests' ``shared_prefix_tokens`` (the
  prompt tokens the workload designed to repeat an earlier prompt's start) over their
  prompt tokens as planned (:mod:`pytest_infmax.load.workloads`); 0 for random prompts.
* **Per turn** (multi-turn sessions): :class:`TurnMetrics` for each turn number, over
  the measured requests of that turn: TTFT, E2E, prompt tokens and designed reuse.

The last three need more than the records; :meth:`Metrics.with_figures` adds them,
and says for each input how it was obtained (``provenance``) or why it is missing
(``unmeasured``). A figure that was not measured is None, never 0.

Latencies are kept in seconds, rates per second and ratios as fractions; units
for display belong to :mod:`pytest_infmax.measure.sla` and the reports. What each
metric is (its kind, dimension, unit and source) is in :mod:`pytest_infmax.measure.registry`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from pytest_infmax.lazy import lazy_module
from pytest_infmax.measure.cost import Price, TokenCost
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
from pytest_infmax.records import RequestRecord, joined_itls

if TYPE_CHECKING:
    import numpy as np

    from pytest_infmax.measure.energy import EnergyReport
else:  # imported at first use, not with this module (pytest_infmax/lazy.py)
    np = lazy_module("numpy")

#: why a source's figures are missing when nothing was said (see Metrics.with_figures)
NOT_GIVEN: dict[str, str] = {
    "price": "no price: set --infmax-gpu-hour-usd (or @pytest.mark.infmax_price(gpu_hour_usd=...), "
    "or a simulator --profile whose GPU has a default price)",
    "energy": "no GPU energy was measured: it needs NVML on the server's machine, or the simulator's power model",
    "server": "the server's Prometheus metrics were not scraped: point "
    "@pytest.mark.infmax_server(metrics_path=...) at its metrics page (metrics_path='' turns scraping off)",
}

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
        arr = np.sort(np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64))
        arr.flags.writeable = False
        qs = _normalise_percentiles(percentiles)
        count = int(arr.size)
        if count == 0:
            nan = math.nan
            pct = {q: nan for q in qs}
            return cls(arr, 0, nan, nan, nan, nan, nan, pct, num_requests or 0)
        # one call for every percentile: one partition of the values, not one each (the same numbers)
        pct = dict(zip(qs, np.percentile(arr, qs).tolist()))
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
    # figures that need a price, GPU energy or the server's metrics (with_figures); None: not measured
    cost_per_mtok: float | None = None
    input_cost_per_mtok: float | None = None
    output_cost_per_mtok: float | None = None
    energy_per_token: float | None = None
    input_energy_per_token: float | None = None
    output_energy_per_token: float | None = None
    tokens_per_mw: float | None = None
    output_tokens_per_mw: float | None = None
    power: float | None = None
    power_per_gpu: float | None = None
    energy_cost_per_mtok: float | None = None
    server: Mapping[str, Any] | None = None  # ServerMetrics.to_dict(), when it was available
    designed_prefix_reuse: float = 0.0
    prefix_cache_hit_rate: float | None = None  # the server's own (with_figures)
    #: multi-turn sessions: one entry per turn number (empty for independent requests)
    turns: tuple[TurnMetrics, ...] = ()
    #: source ("requests", "price", "energy", "server") -> how its figures were obtained
    provenance: dict[str, str] = field(default_factory=lambda: {"requests": "measured"})
    #: source (or a figure's own name, where only it is missing) -> why its figures are missing
    unmeasured: dict[str, str] = field(default_factory=lambda: dict(NOT_GIVEN))

    def with_figures(
        self,
        *,
        price: Price | None = None,
        price_note: str = "",
        energy: EnergyReport | None = None,
        server: Mapping[str, Any] | None = None,
    ) -> Metrics:
        """These metrics with the figures a price, the GPU energy and the server's own metrics
        give, each source's provenance, and the reason for each one missing."""
        provenance = {"requests": self.provenance.get("requests", "measured")}
        unmeasured = {}
        figures: dict[str, Any] = {}
        if price is not None:
            cost = TokenCost.of(price, self.num_gpus, self.throughput, self.input_throughput, self.output_throughput)
            figures.update(cost_per_mtok=cost.total, input_cost_per_mtok=cost.input, output_cost_per_mtok=cost.output)
            provenance["price"] = (
                f"priced at ${price.usd_per_gpu_hour:g}/GPU-hour x {self.num_gpus} GPU ({price.source})"
            )
            if cost.total is None:
                unmeasured["price"] = "no tokens were produced, so there is no cost per token"
        else:
            unmeasured["price"] = price_note or NOT_GIVEN["price"]
        if energy is not None and energy.measured:
            gpus = len(energy.gpus) or self.num_gpus
            figures.update(
                energy_per_token=energy.j_per_token,
                input_energy_per_token=energy.j_per_input_token,
                output_energy_per_token=energy.j_per_output_token,
                tokens_per_mw=energy.tokens_per_s_per_mw,
                output_tokens_per_mw=energy.output_tokens_per_s_per_mw,
                power=energy.avg_power_w,
                power_per_gpu=None if energy.avg_power_w is None else energy.avg_power_w / gpus,
                energy_cost_per_mtok=energy.energy_usd_per_mtok,
            )
            kind = "modelled" if energy.modelled else "measured"
            source = energy.source.removeprefix(f"{kind}: ")  # the simulator's source already says "modelled: "
            provenance["energy"] = f"{kind} ({source})" if source else kind
            if energy.usd_per_kwh is None:  # a figure of its own missing: keyed by its name
                unmeasured["energy_cost_per_mtok"] = (
                    "no electricity price: set --infmax-usd-per-kwh (or @pytest.mark.infmax_price(usd_per_kwh=...))"
                )
        else:
            unmeasured["energy"] = (energy.reason if energy is not None else "") or NOT_GIVEN["energy"]
        if server is not None and server.get("available"):
            provenance["server"] = f"the server's Prometheus metrics ({server.get('engine') or 'unknown'} names)"
            counters = server.get("counters") or {}
            queries = (counters.get("prefix_cache_queries") or {}).get("delta")
            hits = (counters.get("prefix_cache_hits") or {}).get("delta")
            if queries and hits is not None:
                figures["prefix_cache_hit_rate"] = hits / queries
            else:
                unmeasured["prefix_cache_hit_rate"] = (
                    "the server counted no prefix-cache queries during the run (prefix caching off?)"
                    if queries == 0
                    else "the server's metrics page has no prefix-cache counters (vllm:prefix_cache_queries)"
                )
        else:
            server_why = (server or {}).get("reason") or NOT_GIVEN["server"]
            unmeasured["server"] = f"the server's metrics are {server_why}" if server else server_why
            server = None
        return dataclasses.replace(self, server=server, provenance=provenance, unmeasured=unmeasured, **figures)

    def why_unmeasured(self, metric: str) -> str:
        """Why a figure has no value here, and how to measure it."""
        info = metric_info(metric)
        if info.source == "requests":
            return "not measured"
        if metric in self.unmeasured:  # a figure missing on its own, though its source was there
            return self.unmeasured[metric]
        if info.source in self.unmeasured:
            return self.unmeasured[info.source]
        if info.source == "server":
            entry = self._server_entry(metric)
            if info.kind == "gauge" and entry is not None and not entry.get("samples"):
                every = (self.server or {}).get("interval_s")
                return (
                    f"the server's {entry.get('metric', metric)} gauge was not sampled during the run: it is read "
                    f"every {every or '?'} s, and the measured phase was shorter (run longer, e.g. duration=)"
                )
            return f"the server's metrics page has no {metric[len('server_') :]} figure"
        return f"{metric} could not be computed from this run"

    def provenance_of(self, metric: str) -> str | None:
        """How a figure was obtained ('measured', 'modelled (...)', 'priced at $2/GPU-hour ...')."""
        return self.provenance.get(metric_info(metric).source)

    def _server_entry(self, metric: str) -> Mapping[str, Any] | None:
        info = metric_info(metric)
        if self.server is None:
            return None
        group = "histograms" if info.kind == "histogram" else "gauges"
        entry = (self.server.get(group) or {}).get(metric[len("server_") :])
        return entry if isinstance(entry, Mapping) else None

    def value_range(self, metric: str, stat: str) -> tuple[float, float] | None:
        """Where a server histogram's percentile lies for certain: the bucket it falls in
        (canonical units); None for every other figure, which is known exactly."""
        if metric_info(metric).kind != "histogram" or not stat.startswith("p"):
            return None
        span = (self._server_entry(metric) or {}).get(f"{stat}_range_ms")
        if not span or span[0] is None or span[1] is None:
            return None
        return float(span[0]) / 1000.0, float(span[1]) / 1000.0

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
        if info.kind in ("histogram", "gauge"):
            if stat is None or parse_stat(stat) not in info.stats:
                raise ValueError(f"{metric} is the server's {info.kind}; say which statistic: {', '.join(info.stats)}")
            entry = self._server_entry(metric)
            stat = parse_stat(stat)
            if entry is None:
                return None
            raw = entry.get(f"{stat}_ms") if info.kind == "histogram" else entry.get(stat)
            if raw is None or not math.isfinite(raw):
                return None
            return float(raw) / 1000.0 if info.kind == "histogram" else float(raw)
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
        if info.kind in ("histogram", "gauge"):
            entry = self._server_entry(metric) or {}
            return int(entry.get("count", entry.get("samples")) or 0)
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
        out["provenance"] = dict(self.provenance)
        out["unmeasured"] = dict(self.unmeasured)
        out["num_good"] = self.num_good
        out["goodput_limits"] = None if self.goodput_limits is None else str(self.goodput_limits)
        out["percentiles"] = [float(q) for q in self.percentiles]
        for name in DISTRIBUTION_METRICS:
            out[name] = getattr(self, name).to_dict()
        if self.turns:
            out["turns"] = [t.to_dict() for t in self.turns]
        return out

    def turn(self, number: int) -> TurnMetrics:
        """The figures of turn ``number`` (1 = each conversation's first) of a multi-turn run."""
        for t in self.turns:
            if t.turn == number:
                return t
        known = ", ".join(str(t.turn) for t in self.turns) or "none: not a multi-turn run"
        raise KeyError(f"no measured request of turn {number}; turns measured: {known}")


@dataclass(frozen=True)
class TurnMetrics:
    """One turn of multi-turn sessions: its measured requests' figures.

    ``ttft`` and ``e2e`` are over the turn's successful requests; ``mean_prompt_tokens``
    is the prompt length as planned (the whole history so far), ``designed_prefix_reuse``
    the share of those tokens designed to repeat an earlier prompt's start.
    """

    turn: int
    num_requests: int
    num_ok: int
    ttft: Distribution
    e2e: Distribution
    mean_prompt_tokens: float
    designed_prefix_reuse: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "turn": self.turn,
            "num_requests": self.num_requests,
            "num_ok": self.num_ok,
            "ttft": self.ttft.to_dict(),
            "e2e": self.e2e.to_dict(),
            "mean_prompt_tokens": _json_float(self.mean_prompt_tokens),
            "designed_prefix_reuse": _json_float(self.designed_prefix_reuse),
        }


def _designed_reuse(records: Sequence[RequestRecord]) -> float:
    total = sum(r.requested_input_tokens or 0 for r in records)
    return sum(r.shared_prefix_tokens or 0 for r in records) / total if total else 0.0


def _turns(measured: Sequence[RequestRecord], qs: tuple[float, ...]) -> tuple[TurnMetrics, ...]:
    by_turn: dict[int, list[RequestRecord]] = {}
    for r in measured:
        if r.turn is not None:
            by_turn.setdefault(r.turn, []).append(r)
    out = []
    for turn, records in sorted(by_turn.items()):
        ok = [r for r in records if r.ok]
        prompts = [r.requested_input_tokens or 0 for r in records]
        out.append(
            TurnMetrics(
                turn=turn,
                num_requests=len(records),
                num_ok=len(ok),
                ttft=Distribution.from_values([t for t in (r.ttft_from_schedule for r in ok) if t is not None], qs),
                e2e=Distribution.from_values([t for t in (r.e2e_from_schedule for r in ok) if t is not None], qs),
                mean_prompt_tokens=sum(prompts) / len(prompts),
                designed_prefix_reuse=_designed_reuse(records),
            )
        )
    return tuple(out)


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
    itl, itl_requests = joined_itls(ok)  # every record's per-token gaps, computed at once
    return {
        "ttft": Distribution.from_values(ttft, qs),
        "tpot": Distribution.from_values(tpot, qs),
        "itl": Distribution.from_values(itl, qs, num_requests=itl_requests),
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
    dists = _distributions(ok, qs)

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
        ttft=dists["ttft"],
        tpot=dists["tpot"],
        itl=dists["itl"],
        e2e=dists["e2e"],
        interactivity=dists["interactivity"],
        designed_prefix_reuse=_designed_reuse(measured),
        turns=_turns(measured, qs),
    )

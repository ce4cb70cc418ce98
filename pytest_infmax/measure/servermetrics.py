"""The server's own view of a run: its Prometheus metrics, scraped around the measured phase.

vLLM and SGLang serve Prometheus text at ``/metrics`` (SGLang only when started
with ``--enable-metrics``), TensorRT-LLM's ``trtllm-serve`` at
``/prometheus/metrics``, and the simulator at ``/metrics`` with vLLM's names.
A run scrapes the endpoint when its measured phase begins and after it ends,
and takes the difference: the histograms' bucket counts, sums and counts give
the server's TTFT, queue time, inter-token latency and end-to-end latency over
exactly the requests the server finished in between (mean exactly, p50/p99
interpolated within buckets as Prometheus' ``histogram_quantile`` does). Gauges
(running and waiting requests, KV-cache use) say little before and after a
run, so they are also sampled every ``interval`` seconds while it runs.

Nothing here fails a run: a missing endpoint, an HTTP error, a timeout or text
that is not Prometheus' gives a result that says "unavailable: <why>".

The comparison that matters: the client's TTFT includes everything before the
engine's clock starts and after it stops (connection, HTTP, the client's own
event loop), so a client TTFT well above the server's is evidence that the
client, not the server, took the time (:func:`compare_ttft`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pytest_infmax import boundedhttp
from pytest_infmax.lazy import lazy_module

if TYPE_CHECKING:
    from prometheus_client import parser as prometheus_parser
else:  # imported at first use, not with this module (pytest_infmax/lazy.py)
    prometheus_parser = lazy_module("prometheus_client.parser")

DEFAULT_INTERVAL = 1.0  # seconds between gauge samples during the run
SCRAPE_TIMEOUT = 3.0  # seconds for one GET of the metrics page, all of it
METRICS_MAX_BYTES = 16 << 20  # a metrics page larger than this is not read (vLLM's: ~100 KiB)
CATCH_UP_TIMEOUT = 1.0  # seconds to wait for the server to record the last requests it finished
OVERHEAD_MIN_MS = 5.0  # client TTFT above the server's by more than max(this, ...
OVERHEAD_FRACTION = 0.20  # ... this share of the server's TTFT) is called client overhead

# The figure -> its metric names in each engine, preferred first. Sources (metric names as
# each engine registers them):
#   vLLM: docs.vllm.ai/en/stable/usage/metrics/ and vllm/v1/metrics/loggers.py
#     (vllm:gpu_cache_usage_perc and vllm:time_per_output_token_seconds are the older names
#     of vllm:kv_cache_usage_perc and vllm:inter_token_latency_seconds);
#   SGLang: python/sglang/srt/metrics/collector.py (SchedulerMetricsCollector,
#     TokenizerMetricsCollector), docs.sglang.io/references/production_metrics.html;
#   TensorRT-LLM: tensorrt_llm/metrics/collector.py (MetricsCollector, served by trtllm-serve
#     at /prometheus/metrics): "trtllm_" prefixed in current releases, unprefixed in 1.0/1.1
#     (time_to_first_token_seconds, ...), "trtllm:" when passed through NVIDIA Dynamo.
#     Its time_per_output_token_seconds is one observation per request (TPOT), not per token.
ENGINE_METRICS: dict[str, dict[str, tuple[str, ...]]] = {
    "vllm": {
        "ttft": ("vllm:time_to_first_token_seconds",),
        "queue_time": ("vllm:request_queue_time_seconds",),
        "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
        "tpot": ("vllm:request_time_per_output_token_seconds",),
        "e2e": ("vllm:e2e_request_latency_seconds",),
        "running": ("vllm:num_requests_running",),
        "waiting": ("vllm:num_requests_waiting",),
        "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        "requests": ("vllm:request_success_total",),
        "prompt_tokens": ("vllm:prompt_tokens_total",),
        "generation_tokens": ("vllm:generation_tokens_total",),
        # prompt tokens looked up in / found in the prefix cache (V0: the gpu_ names)
        "prefix_cache_queries": ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"),
        "prefix_cache_hits": ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
    },
    "sglang": {
        "ttft": ("sglang:time_to_first_token_seconds",),
        "queue_time": ("sglang:queue_time_seconds",),
        "itl": ("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
        "e2e": ("sglang:e2e_request_latency_seconds",),
        "running": ("sglang:num_running_reqs",),
        "waiting": ("sglang:num_queue_reqs",),
        "kv_cache_usage": ("sglang:token_usage",),
        "requests": ("sglang:num_requests_total",),
        "prompt_tokens": ("sglang:prompt_tokens_total",),
        "generation_tokens": ("sglang:generation_tokens_total",),
    },
    "trtllm": {
        "ttft": (
            "trtllm_time_to_first_token_seconds",
            "trtllm:time_to_first_token_seconds",
            "time_to_first_token_seconds",
        ),
        "queue_time": (
            "trtllm_request_queue_time_seconds",
            "trtllm:request_queue_time_seconds",
            "request_queue_time_seconds",
        ),
        "tpot": (
            "trtllm_time_per_output_token_seconds",
            "trtllm:time_per_output_token_seconds",
            "time_per_output_token_seconds",
        ),
        "e2e": (
            "trtllm_e2e_request_latency_seconds",
            "trtllm:e2e_request_latency_seconds",
            "e2e_request_latency_seconds",
        ),
        "running": ("trtllm_num_requests_running", "trtllm:num_requests_running"),
        "waiting": ("trtllm_num_requests_waiting", "trtllm:num_requests_waiting"),
        "kv_cache_usage": ("trtllm_kv_cache_utilization", "trtllm:kv_cache_utilization"),
        "requests": ("trtllm_request_success_total", "trtllm:request_success_total", "request_success_total"),
        "prompt_tokens": ("trtllm_prompt_tokens_total", "trtllm:prompt_tokens_total"),
        "generation_tokens": ("trtllm_generation_tokens_total", "trtllm:generation_tokens_total"),
    },
}
ENGINES = tuple(ENGINE_METRICS)
HISTOGRAMS = ("ttft", "queue_time", "itl", "tpot", "e2e")  # seconds; reported in ms
GAUGES = ("running", "waiting", "kv_cache_usage")
COUNTERS = ("requests", "prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits")
# Gauges that are fractions: averaged across label sets (e.g. data-parallel ranks), not summed.
FRACTION_GAUGES = frozenset({"kv_cache_usage"})
QUANTILES = (0.5, 0.99)

Series = list[tuple[dict[str, str], float]]  # one metric's samples: (labels, value) per label set


class ScrapeError(Exception):
    """The metrics page could not be read or parsed; the message says why."""


# -- parsing -------------------------------------------------------------------------------


def engine_order(engine: str | None) -> tuple[str, ...]:
    """Engines whose names are looked for, the server's own first (any other: vLLM's first)."""
    first = engine if engine in ENGINE_METRICS else "vllm"
    return (first, *(e for e in ENGINES if e != first))


def candidate_names(role: str, engine: str | None = None) -> list[tuple[str, str]]:
    """(engine, metric name) to look for, in order of preference."""
    return [(e, n) for e in engine_order(engine) for n in ENGINE_METRICS[e].get(role, ())]


def _sample_names(role: str, name: str) -> tuple[str, ...]:
    return (f"{name}_bucket", f"{name}_sum", f"{name}_count") if role in HISTOGRAMS else (name,)


def _wanted(roles: Iterable[str]) -> set[str]:
    return {s for role in roles for _, n in candidate_names(role) for s in _sample_names(role, n)}


def _prefilter(text: str, wanted: set[str]) -> str:
    """Only the sample lines of the metrics we read: a vLLM page has a thousand lines, and
    prometheus_client's parser is pure Python, so parsing all of it in the client's event loop
    during the run would cost the client time it needs for the load."""
    prefixes = tuple(wanted)
    return "\n".join(line for line in text.splitlines() if line.startswith(prefixes)) + "\n"


def parse(text: str, roles: Iterable[str] | None = None) -> dict[str, Series]:
    """Prometheus text -> sample name -> [(labels, value)], for the samples of ``roles``
    (default: every figure this module reads). Raises ScrapeError for text that is not
    Prometheus' exposition format."""
    wanted = _wanted(roles if roles is not None else (*HISTOGRAMS, *GAUGES, *COUNTERS))
    out: dict[str, Series] = {}
    try:
        for family in prometheus_parser.text_string_to_metric_families(_prefilter(text, wanted)):
            for sample in family.samples:
                if sample.name in wanted:
                    out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    except Exception as exc:  # the parser raises ValueError, IndexError, ... on garbled text
        raise ScrapeError(f"not Prometheus text ({type(exc).__name__}: {exc})") from None
    return out


def _select(series: Series, model: str | None) -> Series:
    """The model's series when the samples name it (``model_name``), else every series."""
    if model and any(labels.get("model_name") == model for labels, _ in series):
        return [(labels, v) for labels, v in series if labels.get("model_name") == model]
    return series


@dataclass(frozen=True)
class HistogramState:
    """One histogram summed over its label sets: cumulative bucket counts by upper bound."""

    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), sorted; +Inf last
    total: float  # _sum
    count: float  # _count

    def minus(self, before: HistogramState | None) -> HistogramState:
        """The observations made between ``before`` and this; ScrapeError if a counter went back."""
        if before is None:
            return self
        old = dict(before.buckets)
        buckets = tuple((le, c - old.get(le, 0.0)) for le, c in self.buckets)
        count = self.count - before.count
        if count < 0 or any(c < 0 for _, c in buckets):
            raise ScrapeError("counters went backwards between the scrapes (did the server restart?)")
        return HistogramState(buckets, self.total - before.total, count)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """Prometheus' estimate (:func:`histogram_quantile`), kept inside :meth:`quantile_range`."""
        value, span = histogram_quantile(q, self.buckets), self.quantile_range(q)
        if value is None or span is None:
            return value
        return min(max(value, span[0]), span[1])

    def quantile_range(self, q: float) -> tuple[float, float] | None:
        """Where the true q-quantile must lie: inside the bucket that holds its rank, and (latencies
        being >= 0) at most mean / (1 - q) (Markov's inequality). Interpolating inside a wide bucket
        can say 150 ms for a queue time whose mean is 0.2 ms (vLLM's first queue-time bucket ends at
        0.3 s); this range shows how little the buckets know, and caps the estimate."""
        if not self.buckets or self.buckets[-1][0] != math.inf or self.buckets[-1][1] <= 0:
            return None
        rank = q * self.buckets[-1][1]
        b = next(i for i, (_, c) in enumerate(self.buckets) if c >= rank)
        lower = 0.0 if b == 0 else self.buckets[b - 1][0]
        upper = self.buckets[b][0]
        mean = self.mean
        if mean is not None and q < 1 and mean >= 0:
            upper = min(upper, mean / (1.0 - q))
        return (min(lower, upper), upper)


def histogram_state(samples: Mapping[str, Series], name: str, model: str | None = None) -> HistogramState | None:
    """The histogram ``name`` from parsed samples (None when the page does not have it)."""
    bucket_series = samples.get(f"{name}_bucket")
    if not bucket_series:
        return None
    buckets: dict[float, float] = {}
    for labels, value in _select(bucket_series, model):
        le = float(labels.get("le", "nan"))
        if not math.isnan(le):
            buckets[le] = buckets.get(le, 0.0) + value
    total = sum(v for _, v in _select(samples.get(f"{name}_sum", []), model))
    count_series = samples.get(f"{name}_count")
    count = sum(v for _, v in _select(count_series, model)) if count_series else buckets.get(math.inf, 0.0)
    return HistogramState(tuple(sorted(buckets.items())), total, count)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The q-quantile (0..1) of cumulative buckets, as Prometheus' ``histogram_quantile``:
    linear interpolation inside the bucket holding the rank, the lowest bucket starting at 0,
    and the highest finite bound when the rank falls in the +Inf bucket. None without data."""
    if not buckets or buckets[-1][0] != math.inf:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    b = next(i for i, (_, c) in enumerate(buckets) if c >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0] if len(buckets) >= 2 else None
    upper, cum = buckets[b]
    if b == 0 and upper <= 0:
        return upper
    lower, below = (0.0, 0.0) if b == 0 else buckets[b - 1]
    in_bucket = cum - below
    if in_bucket <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / in_bucket


def gauge_value(samples: Mapping[str, Series], name: str, role: str, model: str | None = None) -> float | None:
    """A gauge over its label sets: summed (request counts) or averaged (fractions)."""
    series = _select(samples.get(name, []), model)
    if not series:
        return None
    values = [v for _, v in series]
    return sum(values) / len(values) if role in FRACTION_GAUGES else sum(values)


def counter_value(samples: Mapping[str, Series], name: str, model: str | None = None) -> float | None:
    series = _select(samples.get(name, []), model)
    return sum(v for _, v in series) if series else None


def find_name(samples: Mapping[str, Series], role: str, engine: str | None) -> tuple[str, str] | None:
    """(engine, metric name) of the first candidate for ``role`` present in ``samples``."""
    for eng, name in candidate_names(role, engine):
        if _sample_names(role, name)[0] in samples:
            return eng, name
    return None


# -- the result ----------------------------------------------------------------------------


@dataclass
class ServerMetrics:
    """What the server's metrics said about the measured phase (or why there is nothing)."""

    url: str
    available: bool
    reason: str | None = None  # "unavailable: ..." when not available
    engine: str | None = None  # whose metric names the page used
    window: str = ""  # what the before/after difference covers
    histograms: dict[str, dict[str, Any]] = field(default_factory=dict)
    gauges: dict[str, dict[str, Any]] = field(default_factory=dict)
    counters: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # figures the page does not have
    interval_s: float = DEFAULT_INTERVAL
    notes: list[str] = field(default_factory=list)

    @classmethod
    def unavailable(cls, url: str, why: str, interval: float = DEFAULT_INTERVAL) -> ServerMetrics:
        return cls(url=url, available=False, reason=f"unavailable: {why}", interval_s=interval)

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "available": self.available,
            "reason": self.reason,
            "engine": self.engine,
            "window": self.window,
            "histograms": self.histograms,
            "gauges": self.gauges,
            "counters": self.counters,
            "missing": list(self.missing),
            "interval_s": self.interval_s,
            "notes": list(self.notes),
        }


def _ms(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x * 1000.0


def summarise(
    before: Mapping[str, Series],
    after: Mapping[str, Series],
    gauge_samples: Mapping[str, Sequence[float]] | None = None,
    *,
    url: str = "",
    engine: str | None = None,
    model: str | None = None,
    interval: float = DEFAULT_INTERVAL,
    window: str = "",
) -> ServerMetrics:
    """The differences between two parsed scrapes, with the gauge samples taken between them."""
    result = ServerMetrics(url=url, available=True, window=window, interval_s=interval)
    found_engines: list[str] = []
    for role in HISTOGRAMS:
        hit = find_name(after, role, engine)
        if hit is None:
            result.missing.append(role)
            continue
        found_engines.append(hit[0])
        now = histogram_state(after, hit[1], model)
        then = histogram_state(before, hit[1], model)
        if now is None:
            result.missing.append(role)
            continue
        try:
            delta = now.minus(then)
        except ScrapeError as exc:
            result.notes.append(f"{hit[1]}: {exc}")
            continue
        entry: dict[str, Any] = {"metric": hit[1], "count": int(round(delta.count)), "mean_ms": _ms(delta.mean)}
        for q in QUANTILES:
            span = delta.quantile_range(q)
            entry[f"p{q * 100:g}_ms"] = _ms(delta.quantile(q))
            entry[f"p{q * 100:g}_range_ms"] = None if span is None else [_ms(span[0]), _ms(span[1])]
        result.histograms[role] = entry
    for role in GAUGES:
        hit = find_name(after, role, engine) or find_name(before, role, engine)
        if hit is None:
            result.missing.append(role)
            continue
        found_engines.append(hit[0])
        values = [v for v in (gauge_samples or {}).get(role, ()) if v is not None and math.isfinite(v)]
        result.gauges[role] = {
            "metric": hit[1],
            "before": gauge_value(before, hit[1], role, model),
            "after": gauge_value(after, hit[1], role, model),
            "mean": sum(values) / len(values) if values else None,
            "max": max(values) if values else None,
            "samples": len(values),
        }
    for role in COUNTERS:
        hit = find_name(after, role, engine)
        if hit is None:
            result.missing.append(role)
            continue
        found_engines.append(hit[0])
        now_v, then_v = counter_value(after, hit[1], model), counter_value(before, hit[1], model) or 0.0
        if now_v is None or now_v < then_v:
            result.notes.append(f"{hit[1]}: counter went backwards between the scrapes (did the server restart?)")
            continue
        result.counters[role] = {"metric": hit[1], "delta": now_v - then_v}
    if not found_engines:
        return ServerMetrics.unavailable(
            url, "the page has none of the metrics read (vLLM, SGLang or TensorRT-LLM names)", interval
        )
    result.engine = max(set(found_engines), key=found_engines.count)
    return result


def compare_ttft(
    server: Mapping[str, Any] | None, client_mean_s: float | None, client_p50_s: float | None
) -> dict[str, Any] | None:
    """The client's TTFT against the server's over the same requests.

    Judged on the means, which both sides know exactly (the server's is its
    histogram's sum / count); its p50 is interpolated inside a bucket (vLLM's
    TTFT buckets near 50 ms are 20 ms wide), too coarse for a 5 ms threshold.
    The client's TTFT is above the server's by the time outside the engine's
    clock: connection, HTTP, the client's own event loop. More than
    max(5 ms, 20 % of the server's) is called client overhead.
    """
    if not server or not server.get("available"):
        return None
    ttft = (server.get("histograms") or {}).get("ttft") or {}
    server_mean = ttft.get("mean_ms")
    if server_mean is None or client_mean_s is None or not math.isfinite(client_mean_s) or not ttft.get("count"):
        return None
    client_mean = client_mean_s * 1000.0
    client_p50 = None if client_p50_s is None or not math.isfinite(client_p50_s) else client_p50_s * 1000.0
    excess = client_mean - server_mean
    threshold = max(OVERHEAD_MIN_MS, OVERHEAD_FRACTION * server_mean)
    overhead = excess > threshold
    note = None
    if overhead:
        p50 = ""
        if client_p50 is not None and ttft.get("p50_ms") is not None:
            p50 = f"; p50 {client_p50:.1f} vs ~{ttft['p50_ms']:.1f} ms"
        note = (
            f"client-side TTFT exceeds the server's by {excess:.1f} ms (mean {client_mean:.1f} vs "
            f"{server_mean:.1f} ms{p50}; threshold {threshold:.1f} ms): evidence of client overhead "
            f"(or of time outside the engine's clock: network, HTTP front end)"
        )
    return {
        "client_ttft_mean_ms": client_mean,
        "server_ttft_mean_ms": server_mean,
        "client_ttft_p50_ms": client_p50,
        "server_ttft_p50_ms": ttft.get("p50_ms"),
        "excess_ms": excess,
        "threshold_ms": threshold,
        "client_overhead": overhead,
        "note": note,
    }


# -- scraping ------------------------------------------------------------------------------


def metrics_url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + "/" + path.lstrip("/")


class Scraper:
    """Scrapes one server's metrics page around a run; never raises into the run.

    ``await open()`` reads the page once, before warm-up (is it there at all?).
    ``on_record`` is the load generator's record callback: when the last of
    ``warmup`` warm-up records arrives (the measured phase starts once every
    warm-up request has ended) it calls ``begin()``, which takes the baseline
    scrape and starts the gauge sampler as tasks; with no warm-up, ``open()``
    begins at once. It also counts the measured requests that succeeded.
    ``await finish()`` stops the sampler and takes the last scrape, repeated
    until the server has recorded as many finished requests as the client
    counted (at most ``CATCH_UP_TIMEOUT``), and returns the :class:`ServerMetrics`.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        engine: str | None = None,
        api_key: str | None = None,
        interval: float = DEFAULT_INTERVAL,
        timeout: float = SCRAPE_TIMEOUT,
        hint: str = "",
        warmup: int = 0,
    ) -> None:
        self.url = url
        self.warmup = warmup
        self._warmup_seen = 0
        self.measured_ok = 0  # measured requests that succeeded, as the client saw them
        self.model = model
        self.engine = engine
        self.interval = interval
        self.timeout = timeout
        self.hint = hint  # added to "unavailable" reasons, e.g. how to turn the endpoint on
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._probe: str | None = None  # the text read by open()
        self._failed: str | None = None
        self._baseline: asyncio.Task[str] | None = None
        self._baseline_window = ""
        self._sampler: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.gauge_samples: dict[str, list[float]] = {role: [] for role in GAUGES}
        self.sample_errors = 0

    async def fetch(self) -> str:
        """The page's text; ScrapeError on any failure. The GET is bounded in time (``timeout``
        for the whole exchange) and size (``METRICS_MAX_BYTES``): a server that sends an endless
        page costs neither memory nor more than one timeout (``boundedhttp.aget``)."""
        try:
            response = await boundedhttp.aget(
                self.url, headers=self._headers, timeout=self.timeout, max_bytes=METRICS_MAX_BYTES
            )
        except boundedhttp.HTTPLimitError as exc:
            raise ScrapeError(str(exc)) from None
        except OSError as exc:
            raise ScrapeError(f"GET {boundedhttp.safe_url(self.url)}: {exc}") from None
        if response.status != 200:
            raise ScrapeError(f"GET {boundedhttp.safe_url(self.url)}: HTTP {response.status}")
        return response.text()

    async def open(self) -> bool:
        """Read the page once; False (and the reason kept) when it cannot be read or parsed."""
        try:
            text = await self.fetch()
            samples = parse(text)
        except ScrapeError as exc:
            self._failed = str(exc)
            return False
        if not any(find_name(samples, role, self.engine) for role in (*HISTOGRAMS, *GAUGES)):
            self._failed = f"{self.url} has none of the metrics read (vLLM, SGLang or TensorRT-LLM names)"
            return False
        self._probe = text
        if self.warmup <= 0:
            self.begin()
        return True

    @property
    def ok(self) -> bool:
        return self._failed is None and self._probe is not None

    def begin(self) -> None:
        """The measured phase starts now: baseline scrape and gauge sampler, as tasks."""
        if not self.ok or self._baseline is not None:
            return
        self._baseline = asyncio.ensure_future(self.fetch())
        self._baseline_window = (
            "from the end of warm-up to the end of the measured phase"
            if self.warmup > 0
            else "the measured phase (no warm-up)"
        )
        self._sampler = asyncio.ensure_future(self._sample_gauges())

    async def measured_phase_starts(self) -> None:
        """The measured phase starts now (the load generator's ``before_measured``): the
        baseline scrape, begun here or at the end of warm-up, is awaited, so that it holds
        no measured request. Its failure is reported by ``finish``."""
        self.begin()
        if self._baseline is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._baseline), timeout=self.timeout + 1.0)

    def on_record(self, rec: Any) -> None:
        """The load generator's record callback (a ``RequestRecord``)."""
        if getattr(rec, "warmup", False):
            self._warmup_seen += 1
            if self._warmup_seen == self.warmup:
                self.begin()
        elif getattr(rec, "ok", False):
            self.measured_ok += 1

    async def _sample_gauges(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval)
            if self._stop.is_set():
                return
            try:
                samples = parse(await self.fetch(), GAUGES)
            except ScrapeError:
                self.sample_errors += 1
                continue
            for role in GAUGES:
                hit = find_name(samples, role, self.engine)
                if hit is not None:
                    value = gauge_value(samples, hit[1], role, self.model)
                    if value is not None:
                        self.gauge_samples[role].append(value)

    async def finish(self, expected_requests: int | None = None) -> ServerMetrics:
        """Stop sampling, take the last scrape, and return the differences. ``expected_requests``
        (default: the measured requests counted by ``on_record``) is how many finished requests
        the last scrape waits for."""
        try:
            return await self._finish(self.measured_ok if expected_requests is None else expected_requests)
        finally:
            await self.close()

    async def _finish(self, expected: int | None) -> ServerMetrics:
        if not self.ok:
            return ServerMetrics.unavailable(self.url, (self._failed or "not scraped") + self.hint, self.interval)
        self._stop.set()
        if self._sampler is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sampler, timeout=self.timeout + 1.0)
        notes: list[str] = []
        before_text = self._probe or ""
        window = "from before warm-up to the end of the measured phase (warm-up included)"
        if self._baseline is not None:
            try:
                before_text = await asyncio.wait_for(self._baseline, timeout=self.timeout + 1.0)
                window = self._baseline_window
            except (ScrapeError, asyncio.TimeoutError) as exc:
                notes.append(
                    f"the scrape at the start of the measured phase failed ({exc}); the figures include warm-up"
                )
        try:
            before = parse(before_text)
            after = await self._settled_after(before, expected)
        except ScrapeError as exc:
            return ServerMetrics.unavailable(self.url, str(exc), self.interval)
        result = summarise(
            before,
            after,
            self.gauge_samples,
            url=self.url,
            engine=self.engine,
            model=self.model,
            interval=self.interval,
            window=window,
        )
        result.notes[:0] = notes
        if self.sample_errors:
            result.notes.append(f"{self.sample_errors} gauge sample(s) during the run could not be read")
        ttft = result.histograms.get("ttft")
        if expected is not None and ttft is not None and ttft["count"] < expected:
            result.notes.append(
                f"the server recorded {ttft['count']} first tokens for {expected} measured requests that got one"
            )
        return result

    async def _settled_after(self, before: Mapping[str, Series], expected: int | None) -> dict[str, Series]:
        """The last scrape, repeated (for at most CATCH_UP_TIMEOUT) until the server has recorded
        ``expected`` more end-to-end latencies: a server may record a request just after its
        last byte reached the client."""
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        while True:
            after = parse(await self.fetch())
            if expected is None or time.monotonic() >= deadline:
                return after
            hit = find_name(after, "e2e", self.engine) or find_name(after, "ttft", self.engine)
            if hit is None:
                return after
            now, then = histogram_state(after, hit[1], self.model), histogram_state(before, hit[1], self.model)
            done = (now.count if now else 0.0) - (then.count if then else 0.0)
            if done >= expected:
                return after
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self._stop.set()
        for task in (self._sampler, self._baseline):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

"""``GET /metrics``: Prometheus text exposition (format 0.0.4) with vLLM's names.

A dashboard, alert or autoscaler written against vLLM's ``/metrics`` reads the
simulator unchanged: same metric names (``vllm:`` prefix), same ``model_name``
label, same histogram buckets as vLLM's V1 ``PrometheusStatLogger``.

Hand-written rather than ``prometheus_client``: about a dozen metrics, no new
dependency, and no process-global registry (tests start many simulators, and a
library registry would also expose ``python_*``/``process_*`` series vLLM hides in
its multiprocess mode).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM V1 buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{_escape_label(value)}"' for name, value in pairs) + "}"


class Histogram:
    """Cumulative-bucket histogram, as Prometheus exposes it."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last: above every bound (+Inf)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.total += value * times
        self.count += times


class SimMetrics:
    """The simulator's counters and histograms; gauges are read at scrape time."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success: dict[str, int] = {"length": 0}  # by finished_reason
        self.ttft = Histogram(TTFT_BUCKETS)
        self.inter_token = Histogram(TOKEN_LATENCY_BUCKETS)
        self.request_tpot = Histogram(TOKEN_LATENCY_BUCKETS)
        self.e2e = Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue = Histogram(REQUEST_LATENCY_BUCKETS)

    # -- observations, fed by the server as a request progresses -------------------

    def on_first_token(self, prompt_tokens: int, ttft: float) -> None:
        self.prompt_tokens += prompt_tokens
        self.ttft.observe(ttft)

    def on_tokens(self, tokens: int, gap: float | None) -> None:
        """``tokens`` output tokens written ``gap`` seconds after the previous
        event of the same request (None for the first): k tokens after a gap
        count as k inter-token latencies of gap / k, like the load generator."""
        self.generation_tokens += tokens
        if gap is not None and tokens > 0:
            self.inter_token.observe(gap / tokens, tokens)

    def on_finished(
        self, finish_reason: str, e2e: float, queue: float | None, ttft: float | None, output_tokens: int
    ) -> None:
        self.success[finish_reason] = self.success.get(finish_reason, 0) + 1
        self.e2e.observe(e2e)
        if queue is not None:
            self.queue.observe(queue)
        if ttft is not None and output_tokens > 1:
            self.request_tpot.observe((e2e - ttft) / (output_tokens - 1))

    # -- exposition --------------------------------------------------------------

    def render(self, running: int, waiting: int, kv_cache_usage: float, prefix_cache: tuple[int, int] = (0, 0)) -> str:
        """The page; ``prefix_cache``: the engine's (queries, hits) in prompt tokens."""
        model = (("model_name", self.model),)
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        def sample(name: str, value: float, extra: Sequence[tuple[str, str]] = ()) -> None:
            lines.append(f"{name}{_labels((*model, *extra))} {_number(value)}")

        def gauge(name: str, value: float, help_text: str) -> None:
            family(name, "gauge", help_text)
            sample(name, value)

        def counter(name: str, value: float, help_text: str) -> None:
            family(name, "counter", help_text)
            sample(name, value)

        def histogram(name: str, hist: Histogram, help_text: str) -> None:
            family(name, "histogram", help_text)
            cumulative = 0
            for bound, count in zip(hist.bounds, hist.counts):
                cumulative += count
                sample(f"{name}_bucket", cumulative, (("le", _number(bound)),))
            sample(f"{name}_bucket", hist.count, (("le", "+Inf"),))
            sample(f"{name}_sum", hist.total)
            sample(f"{name}_count", hist.count)

        gauge("vllm:num_requests_running", running, "Number of requests in model execution batches.")
        gauge("vllm:num_requests_waiting", waiting, "Number of requests waiting to be processed.")
        gauge("vllm:kv_cache_usage_perc", kv_cache_usage, "KV-cache usage. 1 means 100 percent usage.")
        gauge(
            "vllm:gpu_cache_usage_perc",
            kv_cache_usage,
            "GPU KV-cache usage. 1 means 100 percent usage (vLLM V0 name of vllm:kv_cache_usage_perc).",
        )
        counter("vllm:prompt_tokens_total", self.prompt_tokens, "Number of prefill tokens processed.")
        counter(
            "vllm:prefix_cache_queries_total",
            prefix_cache[0],
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        counter(
            "vllm:prefix_cache_hits_total",
            prefix_cache[1],
            "Prefix cache hits, in terms of number of cached tokens.",
        )
        counter("vllm:generation_tokens_total", self.generation_tokens, "Number of generation tokens processed.")
        family("vllm:request_success_total", "counter", "Count of successfully processed requests.")
        for reason, count in sorted(self.success.items()):
            sample("vllm:request_success_total", count, (("finished_reason", reason),))
        histogram("vllm:time_to_first_token_seconds", self.ttft, "Histogram of time to first token in seconds.")
        histogram("vllm:inter_token_latency_seconds", self.inter_token, "Histogram of inter-token latency in seconds.")
        histogram(
            "vllm:time_per_output_token_seconds",
            self.inter_token,
            "Histogram of time per output token in seconds. DEPRECATED: Use vllm:inter_token_latency_seconds instead.",
        )
        histogram(
            "vllm:request_time_per_output_token_seconds",
            self.request_tpot,
            "Histogram of time_per_output_token_seconds per request.",
        )
        histogram("vllm:e2e_request_latency_seconds", self.e2e, "Histogram of e2e request latency in seconds.")
        histogram(
            "vllm:request_queue_time_seconds",
            self.queue,
            "Histogram of time spent in WAITING phase for request.",
        )
        return "\n".join(lines) + "\n"

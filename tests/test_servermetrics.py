"""The server's own Prometheus metrics beside the client's figures (pytest_infmax.measure.servermetrics)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_infmax import Infmax
from pytest_infmax.measure import servermetrics as sm
from pytest_infmax.reports.markdown import markdown_summary
from pytest_infmax.reports.rows import result_row
from pytest_infmax.reports.table import format_table
from pytest_infmax.servers.launch import Server, ServerConfig, running_server

# Two scrapes of a vLLM-style page, written by hand. The served model is "m"; a second model
# ("other") on the same page must be left out; model "m" runs on two engine cores (label
# engine="0"/"1"), summed. Engine 1's series first appear in the second scrape.
BEFORE = """\
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="m"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.02",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.05",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.03
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="other"} 50.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.02",model_name="other"} 50.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.05",model_name="other"} 50.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="other"} 50.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="other"} 50.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="other"} 0.2
vllm:time_to_first_token_seconds_count{engine="0",model_name="other"} 50.0
# HELP vllm:request_queue_time_seconds Histogram of time spent in WAITING phase for request.
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{engine="0",le="0.3",model_name="m"} 0.0
vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="m"} 0.0
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 0.0
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 0.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.0
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 2.0
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1234.0
"""

AFTER = """\
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.02",model_name="m"} 6.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.05",model_name="m"} 9.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 10.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.3
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 10.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.01",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.02",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.05",model_name="m"} 5.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.1",model_name="m"} 9.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="m"} 10.0
vllm:time_to_first_token_seconds_sum{engine="1",model_name="m"} 0.6
vllm:time_to_first_token_seconds_count{engine="1",model_name="m"} 10.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="other"} 90.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.02",model_name="other"} 90.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.05",model_name="other"} 90.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="other"} 90.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="other"} 90.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="other"} 0.4
vllm:time_to_first_token_seconds_count{engine="0",model_name="other"} 90.0
# HELP vllm:request_queue_time_seconds Histogram of time spent in WAITING phase for request.
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{engine="0",le="0.3",model_name="m"} 10.0
vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10.0
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 0.002
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 10.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.4
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 10.0
vllm:request_success_total{engine="1",finished_reason="stop",model_name="m"} 5.0
"""


# -- parsing and the before/after maths, by hand ----------------------------------------------


def test_histogram_delta_mean_and_quantiles_by_hand() -> None:
    before, after = sm.parse(BEFORE), sm.parse(AFTER)
    name = "vllm:time_to_first_token_seconds"
    delta = sm.histogram_state(after, name, "m").minus(sm.histogram_state(before, name, "m"))
    # after, both engines summed: 2, 8, 14, 19, 20 (sum 0.9); minus before 1, 2, 2, 2, 2 (sum 0.03)
    assert delta.buckets == ((0.01, 1.0), (0.02, 6.0), (0.05, 12.0), (0.1, 17.0), (math.inf, 18.0))
    assert delta.count == 18.0
    assert delta.total == pytest.approx(0.87)
    assert delta.mean == pytest.approx(0.87 / 18)
    # p50: rank 9 lies in (0.02, 0.05] holding ranks 7..12: 0.02 + 0.03 * (9 - 6) / 6
    assert delta.quantile(0.5) == pytest.approx(0.035)
    # p90: rank 16.2 in (0.05, 0.1]: 0.05 + 0.05 * (16.2 - 12) / 5
    assert delta.quantile(0.9) == pytest.approx(0.092)
    # p5: rank 0.9 in the lowest bucket, which starts at 0: 0.01 * 0.9 / 1
    assert delta.quantile(0.05) == pytest.approx(0.009)
    # p99: rank 17.82 is in the +Inf bucket: the highest finite bound, as Prometheus answers
    assert delta.quantile(0.99) == pytest.approx(0.1)
    assert delta.quantile_range(0.5) == pytest.approx((0.02, 0.05))
    assert delta.quantile_range(0.99) == pytest.approx((0.1, (0.87 / 18) / 0.01))


def test_prometheus_histogram_quantile_edge_cases() -> None:
    assert sm.histogram_quantile(0.5, []) is None
    assert sm.histogram_quantile(0.5, [(0.1, 3.0)]) is None  # no +Inf bucket
    assert sm.histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None  # no observations
    assert sm.histogram_quantile(0.5, [(0.1, 4.0), (math.inf, 4.0)]) == pytest.approx(0.05)
    assert sm.histogram_quantile(1.0, [(0.1, 4.0), (0.2, 4.0), (math.inf, 4.0)]) == pytest.approx(0.1)


def test_a_wide_bucket_cannot_put_the_median_above_twice_the_mean() -> None:
    """vLLM's first queue-time bucket ends at 0.3 s: interpolation alone says a 0.2 ms mean has a
    150 ms median. Latencies are >= 0, so the median is at most twice the mean (Markov)."""
    before, after = sm.parse(BEFORE), sm.parse(AFTER)
    name = "vllm:request_queue_time_seconds"
    delta = sm.histogram_state(after, name, "m").minus(sm.histogram_state(before, name, "m"))
    assert sm.histogram_quantile(0.5, delta.buckets) == pytest.approx(0.15)  # Prometheus' own answer
    assert delta.mean == pytest.approx(0.0002)
    assert delta.quantile_range(0.5) == pytest.approx((0.0, 0.0004))
    assert delta.quantile(0.5) == pytest.approx(0.0004)


def test_summarise_gauges_counters_and_missing_figures() -> None:
    result = sm.summarise(
        sm.parse(BEFORE),
        sm.parse(AFTER),
        {"running": [5.0, 7.0, 6.0], "kv_cache_usage": [0.1, 0.5]},
        url="http://x/metrics",
        engine="vllm",
        model="m",
        interval=0.5,
        window="w",
    )
    d = result.to_dict()
    assert d["available"] and d["engine"] == "vllm" and d["window"] == "w" and d["interval_s"] == 0.5
    ttft = d["histograms"]["ttft"]
    assert ttft["metric"] == "vllm:time_to_first_token_seconds" and ttft["count"] == 18
    assert ttft["mean_ms"] == pytest.approx(870 / 18)
    assert ttft["p50_ms"] == pytest.approx(35.0) and ttft["p99_ms"] == pytest.approx(100.0)
    assert ttft["p50_range_ms"] == pytest.approx([20.0, 50.0])
    assert d["histograms"]["queue_time"]["mean_ms"] == pytest.approx(0.2)
    running = d["gauges"]["running"]  # running requests summed over the engine cores
    assert (running["before"], running["after"], running["mean"], running["max"], running["samples"]) == (
        0.0,
        7.0,
        6.0,
        7.0,
        3,
    )
    kv = d["gauges"]["kv_cache_usage"]  # a fraction: averaged over the engine cores
    assert kv["after"] == pytest.approx(0.3) and kv["mean"] == pytest.approx(0.3) and kv["max"] == 0.5
    assert d["counters"]["requests"] == {"metric": "vllm:request_success_total", "delta": 13.0}
    assert {"itl", "tpot", "e2e", "waiting", "prompt_tokens", "generation_tokens"} <= set(d["missing"])
    json.dumps(d, allow_nan=False)


def test_without_the_model_label_every_series_counts() -> None:
    after = sm.parse(AFTER)
    state = sm.histogram_state(after, "vllm:time_to_first_token_seconds", model="not-served-here")
    assert state is not None and state.count == 110.0  # m's 20 and other's 90


@pytest.mark.parametrize(
    "engine,page",
    [
        (
            "sglang",
            'sglang:time_to_first_token_seconds_bucket{le="0.1"} 2\n'
            'sglang:time_to_first_token_seconds_bucket{le="+Inf"} 2\n'
            "sglang:time_to_first_token_seconds_sum 0.1\nsglang:time_to_first_token_seconds_count 2\n"
            "sglang:num_queue_reqs 3\nsglang:token_usage 0.5\n",
        ),
        (
            "trtllm",
            'trtllm_time_to_first_token_seconds_bucket{le="0.1",model_name="undefined"} 2\n'
            'trtllm_time_to_first_token_seconds_bucket{le="+Inf",model_name="undefined"} 2\n'
            'trtllm_time_to_first_token_seconds_sum{model_name="undefined"} 0.1\n'
            'trtllm_time_to_first_token_seconds_count{model_name="undefined"} 2\n'
            "trtllm_num_requests_waiting 3\ntrtllm_kv_cache_utilization 0.5\n",
        ),
    ],
)
def test_sglang_and_tensorrt_llm_names(engine: str, page: str) -> None:
    result = sm.summarise({}, sm.parse(page), model="served-model").to_dict()
    assert result["engine"] == engine
    assert result["histograms"]["ttft"]["count"] == 2 and result["histograms"]["ttft"]["mean_ms"] == pytest.approx(50)
    assert result["gauges"]["waiting"]["after"] == 3.0 and result["gauges"]["kv_cache_usage"]["after"] == 0.5


def test_garbled_text_and_pages_without_the_metrics() -> None:
    with pytest.raises(sm.ScrapeError, match="not Prometheus text"):
        sm.parse('vllm:num_requests_running{model_name="m" 3\n')
    assert sm.parse("<html><body>Not Found</body></html>") == {}
    result = sm.summarise({}, sm.parse("python_gc_objects_collected_total 3\n"), url="u")
    assert not result.available and result.reason.startswith("unavailable: ")


def test_a_counter_that_went_back_is_a_note_not_a_figure() -> None:
    result = sm.summarise(sm.parse(AFTER), sm.parse(BEFORE), model="m")  # swapped: a restart in between
    assert "ttft" not in result.histograms and "requests" not in result.counters
    assert any("backwards" in note for note in result.notes)


def test_client_overhead_judged_on_the_means() -> None:
    server = {"available": True, "histograms": {"ttft": {"count": 10, "mean_ms": 10.0, "p50_ms": 9.0}}}
    slow = sm.compare_ttft(server, 0.0200, 0.0190)
    assert slow["client_overhead"] and slow["excess_ms"] == pytest.approx(10.0) and slow["threshold_ms"] == 5.0
    assert slow["note"].startswith("client-side TTFT exceeds the server's by 10.0 ms")
    assert "evidence of client overhead" in slow["note"]
    assert not sm.compare_ttft(server, 0.0149, 0.0140)["client_overhead"]  # within 5 ms
    big = {"available": True, "histograms": {"ttft": {"count": 10, "mean_ms": 100.0, "p50_ms": 90.0}}}
    within = sm.compare_ttft(big, 0.118, 0.110)  # 18 ms, but 20 % of 100 ms is allowed
    assert within["threshold_ms"] == pytest.approx(20.0) and not within["client_overhead"] and within["note"] is None
    assert sm.compare_ttft({"available": False}, 0.02, 0.02) is None
    assert sm.compare_ttft(server, None, None) is None


# -- scraping: failures never reach the run ---------------------------------------------------


def _finish(scraper: sm.Scraper) -> sm.ServerMetrics:
    async def go() -> sm.ServerMetrics:
        await scraper.open()
        return await scraper.finish()

    return asyncio.run(asyncio.wait_for(go(), timeout=10))


def test_nothing_listening_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the scrape: connection refused
    result = _finish(sm.Scraper(f"http://127.0.0.1:{port}/metrics", hint=" (a hint)"))
    assert not result.available
    assert result.reason.startswith(f"unavailable: GET http://127.0.0.1:{port}/metrics: ")
    assert result.reason.endswith(" (a hint)")


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (the kernel does), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        result = _finish(sm.Scraper(f"http://127.0.0.1:{port}/metrics", timeout=0.3))
    assert (
        result.to_dict()["reason"]
        == f"unavailable: GET http://127.0.0.1:{port}/metrics: no answer within 0.3 s (the whole exchange)"
    )


# -- against the simulator (vLLM's names) ------------------------------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(ServerConfig(sim_args=("--decode-step-ms", "1")), tmp_path_factory.mktemp("sm")) as s:
        yield s


def test_server_ttft_beside_the_clients_from_the_simulator(sim: Server) -> None:
    result = Infmax(sim, server_metrics_interval=0.05).run("1k1k-mini", concurrency=1, num_requests=8, warmup=2)
    assert result.server_metrics is not None and result.server_metrics.available, result.server_metrics
    d = result.to_dict(include_records=False)
    json.dumps(d, allow_nan=False)
    server = d["server_metrics"]
    assert server["url"] == f"{sim.base_url}/metrics" and server["engine"] == "vllm"
    assert server["window"] == "from the end of warm-up to the end of the measured phase"
    hist = server["histograms"]
    # exactly the measured requests: warm-up left out, none missed at the end
    assert hist["ttft"]["count"] == 8 and hist["e2e"]["count"] == 8
    assert server["counters"]["requests"]["delta"] == 8
    assert server["counters"]["generation_tokens"]["delta"] == d["metrics"]["total_output_tokens"]
    comparison = server["comparison"]
    client_mean, server_mean = comparison["client_ttft_mean_ms"], comparison["server_ttft_mean_ms"]
    assert client_mean == pytest.approx(d["metrics"]["ttft"]["mean"] * 1000)
    # one stream on an idle loop: the client sees the first token within a few ms of the server
    assert -1.0 < client_mean - server_mean < 5.0, comparison
    assert comparison["client_overhead"] is False and comparison["note"] is None
    running = server["gauges"]["running"]
    assert running["samples"] >= 1 and running["max"] == 1.0  # one stream at a time
    assert server["gauges"]["kv_cache_usage"]["max"] > 0
    row = result_row(d)
    # a percentile from buckets is the bucket it lies in, shown with the exact mean (issue 15)
    assert row["server_ttft_p50_range_ms"] == hist["ttft"]["p50_range_ms"] and row["client_overhead_note"] is None
    lo, hi = hist["ttft"]["p50_range_ms"]
    table = format_table([row])
    assert "srv TTFT p50 ms" in table and f"{lo:.1f}-{hi:.1f} (mean {server_mean:.1f})" in table
    md = markdown_summary([d])
    assert "### Server-side metrics" in md and f"{server_mean:.1f} / {client_mean:.1f}" in md
    assert f"| {lo:.1f}-{hi:.1f} / " in md  # the mean has its own column


def test_an_endpoint_without_metrics_still_runs(sim: Server, tmp_path: Path) -> None:
    config = ServerConfig(kind="endpoint", endpoint=sim.base_url, metrics_path="/no-metrics-here")
    with running_server(config, tmp_path) as endpoint:
        result = Infmax(endpoint).run("1k1k-mini", concurrency=2, num_requests=4, warmup=0, sla=["p99(ttft) < 10s"])
    assert result.passed is True and result.metrics.num_ok == 4
    d = result.to_dict(include_records=False)["server_metrics"]
    assert d["available"] is False and d["comparison"] is None
    assert d["reason"] == f"unavailable: GET {sim.base_url}/no-metrics-here: HTTP 404"
    assert result_row(result.to_dict(include_records=False))["server_ttft_p50_range_ms"] is None
    assert "Server metrics: unavailable: GET" in markdown_summary([result.to_dict(include_records=False)])


def test_metrics_path_per_kind_and_switched_off(sim: Server) -> None:
    assert ServerConfig().prometheus_path == "/metrics"
    assert ServerConfig(kind="endpoint", endpoint="http://h:1").prometheus_path == "/metrics"
    assert ServerConfig(kind="trtllm", model="m").prometheus_path == "/prometheus/metrics"
    assert ServerConfig(kind="sglang", model="m").prometheus_path == "/metrics"
    assert ServerConfig(kind="vllm", model="m", metrics_path="/custom").prometheus_path == "/custom"
    assert ServerConfig(metrics_path="").prometheus_path is None
    result = Infmax(sim, server_metrics=False).run("1k1k-mini", concurrency=1, num_requests=2, warmup=0)
    assert result.server_metrics is None and result.to_dict(include_records=False)["server_metrics"] is None

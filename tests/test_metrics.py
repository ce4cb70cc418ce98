"""Metrics against hand-computed values from a small recorded run.

The run below is written out by hand; every expected figure is derived in the
comments next to its assertion, so a failure says which definition drifted.
Times are dyadic fractions (0.125, 0.25, ...) so most arithmetic is exact.
"""

from __future__ import annotations

import json
import math
import typing

import numpy as np
import pytest

from pytest_infmax.measure.metrics import Distribution, GoodputLimits, Metrics, compute_metrics
from pytest_infmax.measure.registry import DISTRIBUTION_METRICS, METRICS, SCALAR_METRICS, Dimension, parse_stat
from pytest_infmax.measure.sla import SLASyntaxError, units_for
from pytest_infmax.records import ErrorKind, RequestRecord, TokenSource


def _run() -> list[RequestRecord]:
    """A warm-up, three successes (one with a 4-token chunk, one single-token), one failure."""
    warmup = RequestRecord(
        index=0,
        warmup=True,
        send_time=0.0,
        first_token_time=0.5,
        end_time=0.875,
        chunk_times=[0.5],
        chunk_tokens=[1],
        input_tokens=1000,
        output_tokens=1,
    )
    # r1: 8 output tokens in chunks of 1, 1, 1, 4, 1.
    r1 = RequestRecord(
        index=1,
        send_time=1.0,
        first_token_time=1.25,
        end_time=2.75,
        chunk_times=[1.25, 1.375, 1.5, 2.5, 2.625],
        chunk_tokens=[1, 1, 1, 4, 1],
        input_tokens=100,
        input_tokens_source=TokenSource.REQUEST,
        output_tokens=8,
        output_tokens_source=TokenSource.USAGE,
        chunk_tokens_source=TokenSource.USAGE_DELTA,
    )
    # r2: 3 output tokens, one per chunk.
    r2 = RequestRecord(
        index=2,
        send_time=2.0,
        first_token_time=2.5,
        end_time=3.5,
        chunk_times=[2.5, 3.0, 3.5],
        chunk_tokens=[1, 1, 1],
        input_tokens=200,
        output_tokens=3,
    )
    # r3: a single output token: no TPOT, no ITL.
    r3 = RequestRecord(
        index=3,
        send_time=3.0,
        first_token_time=3.125,
        end_time=3.125,
        chunk_times=[3.125],
        chunk_tokens=[1],
        input_tokens=50,
        output_tokens=1,
    )
    # r4: timed out; it ends last, so it closes the wall-time window.
    r4 = RequestRecord(
        index=4,
        send_time=4.0,
        end_time=5.0,
        input_tokens=300,
        error_kind=ErrorKind.TIMEOUT,
        error_message="timed out after 1s",
    )
    return [warmup, r1, r2, r3, r4]


@pytest.fixture
def run() -> list[RequestRecord]:
    return _run()


@pytest.fixture
def m(run: list[RequestRecord]) -> Metrics:
    return compute_metrics(run, num_gpus=8)


# -- counts, duration, tokens, throughput ------------------------------------------


def test_counts_exclude_warmup(m: Metrics) -> None:
    # measured: r1..r4 (warm-up dropped); r4 failed
    assert (m.num_requests, m.num_ok, m.num_errors, m.num_warmup) == (4, 3, 1, 1)
    assert m.errors_by_kind == {"timeout": 1}


def test_wall_time_spans_measured_requests_including_failures(m: Metrics) -> None:
    # earliest measured send: r1 at 1.0 (warm-up's 0.0 ignored);
    # latest end: failed r4 at 5.0  ->  5.0 - 1.0 = 4.0 s
    assert m.duration == 4.0


def test_tokens_come_from_successful_requests_only(m: Metrics) -> None:
    # input: 100 + 200 + 50 = 350 (r4's 300 were never served); output: 8 + 3 + 1 = 12
    assert m.total_input_tokens == 350
    assert m.total_output_tokens == 12


def test_throughputs(m: Metrics) -> None:
    # over 4.0 s: 350/4 = 87.5 in, 12/4 = 3.0 out, 362/4 = 90.5 total; 3 ok requests/4 = 0.75
    assert m.input_throughput == 87.5
    assert m.output_throughput == 3.0
    assert m.throughput == 90.5
    assert m.request_throughput == 0.75
    # per GPU with num_gpus=8: 87.5/8 = 10.9375, 3/8 = 0.375, 90.5/8 = 11.3125
    assert m.input_throughput_per_gpu == 10.9375
    assert m.output_throughput_per_gpu == 0.375
    assert m.throughput_per_gpu == 11.3125
    assert m.num_gpus == 8


def test_error_rate(m: Metrics) -> None:
    # 1 failed of 4 measured (the warm-up does not dilute it)
    assert m.error_rate == 0.25
    assert m.value("error_rate") == 0.25


def test_output_tokens_none_counts_as_zero() -> None:
    r = RequestRecord(
        index=0,
        send_time=0.0,
        first_token_time=0.5,
        end_time=1.0,
        chunk_times=[0.5],
        chunk_tokens=[1],
        input_tokens=None,
        output_tokens=None,
    )
    m = compute_metrics([r])
    assert (m.total_input_tokens, m.total_output_tokens) == (0, 0)
    assert m.throughput == 0.0
    assert m.request_throughput == 1.0  # 1 success / 1.0 s


# -- per-request distributions ----------------------------------------------------------


def test_ttft(m: Metrics) -> None:
    # r1: 1.25-1.0 = 0.25; r2: 2.5-2.0 = 0.5; r3: 3.125-3.0 = 0.125; r4 failed: none
    vals = [0.125, 0.25, 0.5]
    assert list(m.ttft.values) == vals
    assert m.ttft.count == 3
    assert m.ttft.mean == pytest.approx(0.875 / 3)
    assert m.ttft.median == 0.25
    assert (m.ttft.min, m.ttft.max) == (0.125, 0.5)
    # population std (ddof=0): sqrt(sum((x - mean)^2) / 3), not / 2
    mean = 0.875 / 3
    pop = math.sqrt(sum((x - mean) ** 2 for x in vals) / 3)
    assert m.ttft.std == pytest.approx(pop)
    assert m.ttft.std != pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in vals) / 2))
    # linear interpolation: p90 rank 0.9*(3-1) = 1.8 -> 0.25 + 0.8*(0.5-0.25) = 0.45
    assert m.ttft.percentiles[90.0] == pytest.approx(0.45)
    # p99 rank 1.98 -> 0.25 + 0.98*0.25 = 0.495
    assert m.value("ttft", "p99") == pytest.approx(0.495)


def test_tpot_is_decode_time_over_output_tokens_minus_one(m: Metrics) -> None:
    # r1: (E2E - TTFT) / (8 - 1) = (1.625 - 0.25) / 7 = 1.375/7 (E2E to the last token: see test_e2e)
    # r2: (1.5 - 0.5) / (3 - 1) = 0.5
    # r3: one output token -> no TPOT; r4 failed
    assert m.tpot.count == 2
    assert list(m.tpot.values) == pytest.approx([1.375 / 7, 0.5])
    assert m.tpot.mean == pytest.approx((1.375 / 7 + 0.5) / 2)
    # not the mean chunk gap: r1's chunk gaps average (2.625-1.25)/4 = 0.34375
    assert m.tpot.min != pytest.approx(0.34375)


def test_interactivity_is_one_over_tpot(m: Metrics) -> None:
    # r1: 7/1.375 = 5.09 tok/s/user; r2: 1/0.5 = 2
    assert list(m.interactivity.values) == pytest.approx([2.0, 7 / 1.375])
    assert m.value("interactivity", "max") == pytest.approx(7 / 1.375)


def test_e2e(m: Metrics) -> None:
    # E2E ends at the last content token, as InferenceMAX's and vLLM's clients end their latency,
    # not at the stream's end (r1's usage chunk and [DONE] arrived at 2.75, after its last token)
    # r1: 2.625-1.0 = 1.625; r2: 3.5-2.0 = 1.5; r3: 3.125-3.0 = 0.125
    assert list(m.e2e.values) == [0.125, 1.5, 1.625]
    assert m.value("e2e", "mean") == pytest.approx((0.125 + 1.5 + 1.625) / 3)


def test_itl_is_per_token_with_multi_token_chunks(m: Metrics) -> None:
    # r1 chunk gaps: 0.125 (k=1), 0.125 (k=1), 1.0 (k=4 -> four gaps of 0.25), 0.125 (k=1)
    #    -> 7 values = output tokens - 1
    # r2: 0.5, 0.5; r3: a single chunk, no gaps
    expected = sorted([0.125, 0.125, 0.25, 0.25, 0.25, 0.25, 0.125, 0.5, 0.5])
    assert list(m.itl.values) == expected
    assert m.itl.count == 9
    # mean = (3*0.125 + 4*0.25 + 2*0.5) / 9 = 2.375/9; a chunk-level mean would be 2.375/6
    assert m.itl.mean == pytest.approx(2.375 / 9)
    assert m.itl.median == 0.25  # 5th of 9
    # p90: rank 0.9*8 = 7.2, between the two 0.5s
    assert m.value("itl", "p90") == 0.5
    # the figure rests on 2 requests (r1, r2), not 9 gaps
    assert m.count_behind("itl") == 2
    assert m.itl.num_requests == 2


def test_zero_tpot_has_no_finite_interactivity() -> None:
    # every token arrived in the first chunk: E2E == TTFT -> TPOT 0, 1/TPOT undefined
    r = RequestRecord(
        index=0, send_time=0.0, first_token_time=0.5, end_time=0.5, chunk_times=[0.5], chunk_tokens=[4], output_tokens=4
    )
    m = compute_metrics([r])
    assert list(m.tpot.values) == [0.0]
    assert m.interactivity.count == 0
    assert m.value("interactivity", "p50") is None


def test_count_behind(m: Metrics) -> None:
    assert m.count_behind("ttft") == 3
    assert m.count_behind("tpot") == 2
    assert m.count_behind("throughput") == 4  # scalars rest on every measured request
    assert m.count_behind("error_rate") == 4


# -- goodput ----------------------------------------------------------------------------


def test_goodput_with_limits(run: list[RequestRecord]) -> None:
    m = compute_metrics(run, goodput="ttft <= 250ms, tpot < 300ms")
    # r1: ttft 0.25 <= 0.25 and tpot 0.214 < 0.3  -> good
    # r2: ttft 0.5 > 0.25                          -> not
    # r3: ttft 0.125; no TPOT (1 token): vacuous   -> good
    # r4: failed                                   -> not
    assert m.num_good == 2
    assert m.goodput == 2 / 4.0  # good requests per second of wall time
    assert m.goodput_ratio == 2 / 4  # of all measured requests, failures included
    assert str(m.goodput_limits) == "ttft <= 250 ms, tpot < 300 ms"


def test_goodput_strict_limit_at_equality(run: list[RequestRecord]) -> None:
    # r1's TTFT is exactly 0.25: '<' excludes it, leaving only r3
    m = compute_metrics(run, goodput="ttft < 250ms, tpot < 300ms")
    assert m.num_good == 1
    assert m.goodput == 0.25 and m.goodput_ratio == 0.25


def test_goodput_dict_form(run: list[RequestRecord]) -> None:
    # numbers are seconds; dict means <= for ttft/tpot: same as the string form above
    limits = GoodputLimits.parse({"ttft": "250ms", "tpot": 0.3})
    assert limits == GoodputLimits.parse("ttft <= 250ms, tpot <= 0.3 s")
    assert compute_metrics(run, goodput=limits).num_good == 2


def test_goodput_interactivity_floor_and_e2e(run: list[RequestRecord]) -> None:
    # interactivity >= 4: r1 4.667 yes, r2 2.0 no, r3 vacuous yes
    assert compute_metrics(run, goodput={"interactivity": 4}).num_good == 2
    # e2e <= 1.5 s: r1 1.75 no, r2 1.5 yes, r3 0.125 yes
    assert compute_metrics(run, goodput="e2e <= 1.5s").num_good == 2
    # both: only r3
    assert compute_metrics(run, goodput="e2e <= 1.5s, interactivity >= 4 tok/s/user").num_good == 1


def test_no_goodput_limits_means_none(m: Metrics) -> None:
    assert m.goodput is None and m.goodput_ratio is None and m.num_good is None
    assert m.value("goodput") is None
    assert m.to_dict()["goodput"] is None


def test_bad_goodput_limits_raise_the_sla_error(run: list[RequestRecord]) -> None:
    with pytest.raises(SLASyntaxError, match="give a unit"):
        compute_metrics(run, goodput="ttft < 500")
    with pytest.raises(SLASyntaxError, match="not a per-request metric"):
        GoodputLimits.parse("throughput > 5 tok/s")


# -- percentiles and the Distribution API ------------------------------------------------


def test_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(7)
    ttfts = rng.gamma(2.0, 0.1, size=257)
    records = [
        RequestRecord(
            index=i, send_time=float(i), first_token_time=float(i) + t, end_time=float(i) + t + 0.5, output_tokens=1
        )
        for i, t in enumerate(ttfts)
    ]
    m = compute_metrics(records, percentiles=(50, 90, 99, 99.9))
    expected = np.array([r.ttft for r in records])  # (i + t) - i, as the metric sees it
    for q in (50, 90, 99, 99.9):
        assert m.ttft.percentiles[float(q)] == pytest.approx(np.percentile(expected, q))
    assert m.ttft.percentile(12.5) == pytest.approx(np.percentile(expected, 12.5))
    assert m.ttft.stat("p99.9") == pytest.approx(np.percentile(expected, 99.9))
    assert m.ttft.stat("P50") == m.ttft.median
    assert m.value("ttft", "std") == pytest.approx(np.std(expected))
    assert m.percentiles == (50.0, 90.0, 99.0, 99.9)
    assert set(m.to_dict()["ttft"]) == {"count", "mean", "median", "std", "min", "max", "p50", "p90", "p99", "p99.9"}


def test_distribution_values_sorted_and_read_only() -> None:
    d = Distribution.from_values([3.0, 1.0, 2.0])
    assert list(d.values) == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        d.values[0] = 9.0


def test_empty_distribution_is_nan_not_an_error() -> None:
    d = Distribution.from_values([], percentiles=(50, 99))
    assert d.count == 0
    for name in ("mean", "median", "std", "min", "max", "p50", "p99", "p99.9"):
        assert math.isnan(d.stat(name))
    assert d.to_dict() == {
        "count": 0,
        "mean": None,
        "median": None,
        "std": None,
        "min": None,
        "max": None,
        "p50": None,
        "p99": None,
    }


def test_stat_names() -> None:
    assert parse_stat(" P99.90 ") == "p99.9"
    assert parse_stat("p100") == "p100"
    for bad in ("avg", "p0", "p101", "p", "p-1", "99"):
        with pytest.raises(ValueError):
            parse_stat(bad)
    with pytest.raises(ValueError, match="out of range"):
        Distribution.from_values([1.0]).percentile(0)


# -- empty and degenerate runs -------------------------------------------------------------


@pytest.mark.parametrize("records", [[], [_run()[0]]], ids=["no records", "warm-up only"])
def test_empty_run(records: list[RequestRecord]) -> None:
    m = compute_metrics(records, goodput="ttft < 1s")
    assert (m.num_requests, m.num_ok, m.num_errors, m.duration) == (0, 0, 0, 0.0)
    for name in (
        "request_throughput",
        "input_throughput",
        "output_throughput",
        "throughput",
        "input_throughput_per_gpu",
        "output_throughput_per_gpu",
        "throughput_per_gpu",
    ):
        assert getattr(m, name) == 0.0
    assert math.isnan(m.error_rate) and m.value("error_rate") is None  # 0/0 is not 0% errors
    assert m.goodput == 0.0 and m.value("goodput_ratio") is None
    for name in DISTRIBUTION_METRICS:
        assert getattr(m, name).count == 0
        assert m.value(name, "p99") is None
    json.dumps(m.to_dict(), allow_nan=False)


def test_all_failed_run() -> None:
    records = [
        RequestRecord(
            index=i,
            send_time=float(i),
            end_time=float(i) + 0.5,
            error_kind=ErrorKind.HTTP if i else ErrorKind.CONNECT,
            http_status=503,
        )
        for i in range(3)
    ]
    m = compute_metrics(records)
    assert m.error_rate == 1.0
    assert m.errors_by_kind == {"connect_error": 1, "http_error": 2}
    assert m.duration == 2.5  # 0.0 -> 2.5
    assert m.throughput == 0.0 and m.request_throughput == 0.0
    assert m.ttft.count == 0 and m.value("ttft", "p50") is None


def test_zero_duration_gives_zero_throughput() -> None:
    r = RequestRecord(
        index=0,
        send_time=1.0,
        first_token_time=1.0,
        end_time=1.0,
        chunk_times=[1.0],
        chunk_tokens=[1],
        input_tokens=10,
        output_tokens=1,
    )
    m = compute_metrics([r])
    assert m.duration == 0.0 and m.throughput == 0.0 and m.request_throughput == 0.0


def test_open_loop_window_starts_at_earliest_schedule() -> None:
    # the client fell behind: r0 was due at 0.5 but sent at 1.0; the window opens at 0.5
    records = [
        RequestRecord(
            index=0,
            scheduled_time=0.5,
            send_time=1.0,
            first_token_time=1.5,
            end_time=2.0,
            chunk_times=[1.5],
            chunk_tokens=[1],
            output_tokens=1,
        ),
        RequestRecord(
            index=1,
            scheduled_time=1.5,
            send_time=1.5,
            first_token_time=2.0,
            end_time=2.5,
            chunk_times=[2.0],
            chunk_tokens=[1],
            output_tokens=1,
        ),
    ]
    m = compute_metrics(records)
    assert m.duration == 2.0  # 2.5 - 0.5
    assert m.output_throughput == 1.0  # 2 tokens / 2 s
    # Open loop: TTFT runs from the scheduled send (no coordinated omission): r0's
    # 0.5 s of client delay counts (1.5 - 0.5 = 1.0); the raw figure from the send stays.
    assert list(m.ttft.values) == [0.5, 1.0]
    assert records[0].ttft == 0.5 and records[0].ttft_from_schedule == 1.0


def test_unfinished_request_counts_at_its_send_time() -> None:
    records = [
        RequestRecord(
            index=0,
            send_time=0.0,
            first_token_time=0.5,
            end_time=1.0,
            chunk_times=[0.5],
            chunk_tokens=[1],
            output_tokens=1,
        ),
        RequestRecord(index=1, send_time=3.0, end_time=None, error_kind=ErrorKind.CANCELLED),
    ]
    assert compute_metrics(records).duration == 3.0


@pytest.mark.parametrize("gpus", [0, -1, True, 1.5])
def test_num_gpus_must_be_positive_int(gpus: object) -> None:
    with pytest.raises(ValueError, match="num_gpus"):
        compute_metrics([], num_gpus=gpus)  # type: ignore[arg-type]


def test_bad_percentile_config() -> None:
    with pytest.raises(ValueError):
        compute_metrics([], percentiles=(50, 120))


# -- lookup API, registry, serialisation -------------------------------------------------------


def test_value_needs_a_stat_for_distributions_and_none_for_scalars(m: Metrics) -> None:
    with pytest.raises(ValueError, match="per-request distribution; say which statistic"):
        m.value("ttft")
    with pytest.raises(ValueError, match="takes no statistic"):
        m.value("throughput", "p99")
    with pytest.raises(ValueError, match="unknown statistic"):
        m.value("ttft", "avg")
    with pytest.raises(KeyError, match="known metrics: ttft"):
        m.value("latency")


def test_registry_matches_metrics_fields(m: Metrics) -> None:
    # every registered metric is reachable by name; a new scalar needs entry + field only
    assert set(DISTRIBUTION_METRICS) == {"ttft", "tpot", "itl", "e2e", "interactivity"}
    requests = {name for name in SCALAR_METRICS if METRICS[name].source == "requests"}
    assert requests == {
        "request_throughput",
        "input_throughput",
        "output_throughput",
        "throughput",
        "input_throughput_per_gpu",
        "output_throughput_per_gpu",
        "throughput_per_gpu",
        "error_rate",
        "goodput",
        "goodput_ratio",
        "designed_prefix_reuse",
    }
    dimensions = set(typing.get_args(Dimension))
    for name, info in METRICS.items():
        assert info.name == name
        assert info.dimension in dimensions
        assert units_for(info), f"{name} has no unit an SLA can be written in"
        if info.kind == "distribution":
            assert isinstance(m.value(name, "max"), float)
        elif info.kind == "scalar":
            assert hasattr(m, name)
        else:  # the server's: a statistic it has, none here (no server metrics given)
            assert info.source == "server" and info.stats
            assert m.value(name, info.stats[0]) is None
        if info.source != "requests" and info.kind == "scalar":
            assert getattr(m, name) is None  # not measured is None, never 0
            assert m.why_unmeasured(name)
    assert METRICS["ttft"].higher_is_better is False
    assert METRICS["interactivity"].higher_is_better is True


def _plain(obj: object) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    return obj is None or type(obj) in (int, float, str, bool)


def test_to_dict_is_json_ready(run: list[RequestRecord]) -> None:
    d = compute_metrics(run, num_gpus=8, goodput="ttft <= 250ms").to_dict()
    assert _plain(d)  # no numpy scalars, no tuples
    json.dumps(d, allow_nan=False)
    assert d["throughput_per_gpu"] == 11.3125
    assert d["itl"]["count"] == 9 and "values" not in d["itl"]
    assert d["ttft"]["p50"] == 0.25
    assert d["goodput_limits"] == "ttft <= 250 ms"
    assert d["errors_by_kind"] == {"timeout": 1}


def test_goodput_dict_accepts_numpy_numbers(run: list[RequestRecord]) -> None:
    limits = GoodputLimits.parse({"ttft": np.float64(0.25), "tpot": np.int64(1)})
    assert str(limits) == "ttft <= 0.25 s, tpot <= 1 s"
    assert compute_metrics(run, goodput=limits).num_good == 2


def _itl_records(draw: typing.Any) -> list[RequestRecord]:
    from hypothesis import strategies as st

    out = []
    for i in range(draw(st.integers(0, 6))):
        n = draw(st.integers(0, 12))
        gaps = draw(st.lists(st.floats(0.0, 0.5, allow_nan=False), min_size=n, max_size=n))
        times = np.cumsum(np.asarray(gaps, dtype=np.float64)) + 100.0
        # one count a chunk, fewer, more, zeros, or past the expansion limit or int64
        counts = draw(
            st.lists(
                st.one_of(st.integers(0, 4), st.sampled_from([1 << 17, 1 << 70])),
                min_size=draw(st.sampled_from([n, n, n, max(n - 2, 0), n + 1])),
                max_size=n + 1,
            )
        )[: draw(st.sampled_from([n, n, max(n - 2, 0), n + 1]))]
        rec = RequestRecord(index=i, send_time=99.0, end_time=200.0, chunk_times=times.tolist(), chunk_tokens=counts)
        if draw(st.booleans()) and draw(st.booleans()):
            rec.error_kind = ErrorKind.DISCONNECT
        out.append(rec)
    return out


def test_every_records_itls_at_once_are_each_records_own_one_after_another() -> None:
    """metrics computes the per-token gaps of every record at once (records.joined_itls); the
    figures must be the ones each record's itl_array gives, bit for bit, whatever the counts."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from pytest_infmax.records import joined_itls

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def check(data: typing.Any) -> None:
        records = _itl_records(data.draw)
        got, n = joined_itls(records)
        own = [r.itl_array() for r in records]
        want = np.concatenate(own) if own else np.empty(0)
        assert got.dtype == np.float64 and got.tobytes() == want.tobytes()
        assert n == sum(1 for a in own if a.size)

    check()


def test_percentiles_taken_together_are_each_ones_own() -> None:
    """Distribution takes every percentile in one numpy call; each is what its own call gives."""
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 10, 999, 5000):
        values = rng.standard_exponential(n) * 0.01
        qs = (0.1, 25.0, 50.0, 90.0, 95.0, 99.0, 99.9, 100.0)
        d = Distribution.from_values(values, qs)
        assert all(d.percentiles[q] == float(np.percentile(values, q)) for q in qs)

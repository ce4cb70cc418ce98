"""The SLA grammar, its error messages, and judging metrics against objectives."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_infmax.measure.metrics import Metrics, compute_metrics
from pytest_infmax.measure.registry import METRICS
from pytest_infmax.measure.sla import Objective, SLASyntaxError, parse, parse_all, units_for
from pytest_infmax.measure.verdicts import SLA, SLAFailed, Verdict
from pytest_infmax.records import ErrorKind, RequestRecord

# -- parsing: every documented example ---------------------------------------------

EXAMPLES = [
    # text, metric, stat, op, canonical limit, unit
    ("p99(ttft) < 500ms", "ttft", "p99", "<", 0.5, "ms"),
    ("median(tpot) <= 20 ms", "tpot", "median", "<=", 0.02, "ms"),
    ("mean(e2e) < 2s", "e2e", "mean", "<", 2.0, "s"),
    ("p99.9(itl) < 100ms", "itl", "p99.9", "<", 0.1, "ms"),
    ("p50(interactivity) > 50 tok/s/user", "interactivity", "p50", ">", 50.0, "tok/s/user"),
    ("throughput_per_gpu > 5000 tok/s", "throughput_per_gpu", None, ">", 5000.0, "tok/s"),
    ("throughput_per_gpu >= 5000 tok/s/gpu", "throughput_per_gpu", None, ">=", 5000.0, "tok/s/gpu"),
    ("output_throughput > 1.2k tok/s", "output_throughput", None, ">", 1200.0, "tok/s"),
    ("error_rate < 0.1%", "error_rate", None, "<", 0.001, "%"),
    ("error_rate <= 0.001", "error_rate", None, "<=", 0.001, ""),
    ("goodput_ratio >= 95%", "goodput_ratio", None, ">=", 0.95, "%"),
    ("request_throughput > 2 req/s", "request_throughput", None, ">", 2.0, "req/s"),
    ("goodput > 1.5 req/s", "goodput", None, ">", 1.5, "req/s"),
    ("max(ttft) < 1s", "ttft", "max", "<", 1.0, "s"),
    ("std(tpot) < 5ms", "tpot", "std", "<", 0.005, "ms"),
    # variants: spacing, case, micro, suffixes, interactivity in plain tok/s
    ("  P99 ( TTFT )<500 MS ", "ttft", "p99", "<", 0.5, "ms"),
    ("p99(ttft) < 250us", "ttft", "p99", "<", 250e-6, "us"),
    ("p99(ttft) < 250 µs", "ttft", "p99", "<", 250e-6, "us"),
    ("p50(interactivity) >= 50 tok/s", "interactivity", "p50", ">=", 50.0, "tok/s"),
    ("throughput > 2M tok/s", "throughput", None, ">", 2e6, "tok/s"),
    ("p99(ttft) < 5Ms", "ttft", "p99", "<", 0.005, "ms"),  # a unit beats a suffix
    ("Error_Rate ≤ 1 %", "error_rate", None, "<=", 0.01, "%"),
    ("min(interactivity) > 1e1 TOK/S/USER", "interactivity", "min", ">", 10.0, "tok/s/user"),
    ("p100(e2e) < .5s", "e2e", "p100", "<", 0.5, "s"),
]


@pytest.mark.parametrize(("text", "metric", "stat", "op", "limit", "unit"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_examples_parse(text: str, metric: str, stat: str | None, op: str, limit: float, unit: str) -> None:
    o = parse(text)
    assert (o.metric, o.stat, o.op, o.unit) == (metric, stat, op, unit)
    assert o.limit == pytest.approx(limit, rel=1e-12)
    assert o.text == text
    assert Objective.parse(text) == o
    assert parse(str(o)) == o


def test_percent_limits_are_exact_at_the_boundary() -> None:
    # 95% must be 0.95 exactly, or 19/20 requests would fail '>= 95%'
    assert parse("goodput_ratio >= 95%").limit == 0.95
    assert parse("p99(ttft) < 500ms").limit == 0.5


def test_normal_form() -> None:
    assert str(parse("P99.90(TTFT)<=500MS")) == "p99.9(ttft) <= 500 ms"
    assert str(parse("output_throughput > 1.2k tok/s")) == "output_throughput > 1200 tok/s"
    assert str(parse("error_rate<0.1 %")) == "error_rate < 0.1%"
    assert str(parse("error_rate <= 0.001")) == "error_rate <= 0.001"


def test_text_does_not_take_part_in_equality() -> None:
    assert parse("p99(ttft)<500ms") == parse("p99 ( ttft ) < 500 ms")
    assert parse("p99(ttft) < 500ms") != parse("p99(ttft) < 0.5s")  # different units shown


# -- parsing: malformed expressions ------------------------------------------------------

MALFORMED = [
    # text, a phrase the message must contain (the concrete fix or diagnosis)
    ("p99(ttft) < 500", "ttft is a time; give a unit (us, ms or s), e.g. 'p99(ttft) < 500ms'"),
    ("ttft < 500ms", "ttft is a per-request distribution; say which statistic, e.g. 'p99(ttft) <"),
    ("p99(throughput) > 5000 tok/s", "takes no statistic; write 'throughput > 5000 tok/s'"),
    ("p99(ttft) < 5 tok/s", "ttft is a time, but 'tok/s' is a token rate"),
    ("p50(tpot) > 3 tok/s/user", "use us, ms or s"),
    ("throughput > 5000 tok/s/gpu", "did you mean throughput_per_gpu?"),
    ("p50(ttft) < 5 tok/s/user", "a token rate"),
    ("throughput > 5 tok/s/user", "'tok/s/user' only applies to interactivity"),
    ("request_throughput > 2 tok/s", "'tok/s' is a token rate"),
    ("throughput > 5000", "give a unit (tok/s), e.g. 'throughput > 5000 tok/s'"),
    ("request_throughput > 2", "e.g. 'request_throughput > 2 req/s'"),
    ("ttf < 5ms", "did you mean 'ttft'?"),
    ("latency < 5ms", "known metrics: ttft, tpot, itl, e2e, interactivity"),
    ("avg(ttft) < 5ms", "unknown statistic 'avg'"),
    ("p0(ttft) < 5ms", "out of range"),
    ("p101(ttft) < 5ms", "out of range"),
    ("p99 ttft < 5ms", "write 'p99(ttft) < …'"),
    ("p99(ttft < 5ms", "expected ')' after 'ttft'"),
    ("p99() < 5ms", "expected a metric name"),
    ("500ms > p99(ttft)", "the limit goes on the right"),
    ("", "empty expression"),
    ("   ", "empty expression"),
    ("p99(ttft) == 5ms", "expected <, <=, > or >="),
    ("p99(ttft) 5ms", "expected a comparison"),
    ("p99(ttft) <", "expected a number after '<'"),
    ("p99(ttft) < fast", "expected a number"),
    ("p99(ttft) < 5 mss", "did you mean 'ms'?"),
    ("p99(ttft) < 5 minutes", "ttft takes us, ms or s"),
    ("p99(ttft) < 5ms < 6ms", "one comparison per expression"),
    ("error_rate < 150%", "ratio above 100%"),
    ("error_rate < 5", "did you mean 'error_rate < 5%'?"),
    ("goodput_ratio >= 1.5", "ratio above 100%"),
    ("error_rate < 0.1 tok/s", "error_rate is a ratio"),
    ("error_rate < -1%", "cannot be negative"),
    ("p99(ttft) < 1e999s", "not a finite number"),
    ("p99(ttft) < 5 ms extra", "unknown unit"),
]


@pytest.mark.parametrize(("text", "hint"), MALFORMED, ids=[m[0] or "<empty>" for m in MALFORMED])
def test_malformed_expressions_explain_themselves(text: str, hint: str) -> None:
    with pytest.raises(SLASyntaxError) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith(f"invalid SLA '{text}'")
    assert hint in message
    assert info.value.expression == text
    assert isinstance(info.value, ValueError)


def test_syntax_errors_say_where() -> None:
    with pytest.raises(SLASyntaxError) as info:
        parse("p99(ttft < 5ms")
    assert info.value.column == 10  # the '<' where ')' was expected
    assert "at column 10" in str(info.value)


def test_parse_all_names_the_position() -> None:
    good = ["p99(ttft) < 500ms", "throughput > 5 tok/s"]
    assert [o.metric for o in parse_all(good)] == ["ttft", "throughput"]
    with pytest.raises(SLASyntaxError) as info:
        parse_all(["p99(ttft) < 500ms", "p99(tpot) < 50", "bogus"])
    assert str(info.value).startswith("SLA #2 of 3: invalid SLA 'p99(tpot) < 50'")
    assert info.value.index == 1
    with pytest.raises(SLASyntaxError) as single:
        parse_all(["p99(tpot) < 50"])
    assert str(single.value).startswith("invalid SLA")  # no position for a single one


def test_sla_validates_when_built() -> None:
    with pytest.raises(SLASyntaxError, match="give a unit"):
        SLA(["p99(ttft) < 500ms", "p99(tpot) < 50"])
    with pytest.raises(SLASyntaxError, match="invalid goodput limit 'tpot < 50'"):
        SLA(["goodput > 1 req/s"], goodput="ttft < 500ms, tpot < 50")


def test_sla_accepts_one_string_objectives_and_mixtures() -> None:
    sla = SLA("p99(ttft) < 500ms, p99(tpot) < 50ms\nerror_rate < 1%")
    assert [str(o) for o in sla] == ["p99(ttft) < 500 ms", "p99(tpot) < 50 ms", "error_rate < 1%"]
    assert len(SLA([parse("p99(ttft) < 1s"), "error_rate < 1%"])) == 2
    assert len(SLA(parse("p99(ttft) < 1s"))) == 1
    # varargs, as @pytest.mark.sla("...", "...") passes them
    assert list(SLA("p99(ttft) < 1s", "error_rate < 1%")) == list(SLA(["p99(ttft) < 1s", "error_rate < 1%"]))
    assert len(SLA()) == 0
    with pytest.raises(SLASyntaxError, match="SLA #2 of 2"):
        SLA("p99(ttft) < 1s", "p99(tpot) < 5")
    with pytest.raises(TypeError):
        SLA(42)  # type: ignore[arg-type]


# -- evaluation ------------------------------------------------------------------------------


def _ok(i: int, ttft: float, e2e: float, out: int = 2) -> RequestRecord:
    return RequestRecord(
        index=i,
        send_time=float(i),
        first_token_time=float(i) + ttft,
        end_time=float(i) + e2e,
        chunk_times=[float(i) + ttft, float(i) + e2e],
        chunk_tokens=[1, out - 1],
        input_tokens=10,
        output_tokens=out,
    )


def _failed(i: int) -> RequestRecord:
    return RequestRecord(
        index=i, send_time=float(i), end_time=float(i) + 1.0, error_kind=ErrorKind.HTTP, http_status=500
    )


@pytest.fixture
def metrics() -> Metrics:
    # 4 requests: TTFTs 0.125, 0.25, 0.5 and one failure -> error_rate exactly 0.25
    # TPOT: e2e - ttft over 1 token: 0.375, 0.5, 0.75
    # wall time: first send 0.0 to the failure's end 3.0 + 1.0 = 4.0 s
    records = [_ok(0, 0.125, 0.5), _ok(1, 0.25, 0.75), _ok(2, 0.5, 1.25), _failed(3)]
    return compute_metrics(records, goodput="ttft <= 250ms")  # r0, r1 good -> ratio 0.5


@pytest.mark.parametrize(
    ("expr", "passed"),
    [
        ("max(ttft) < 500ms", False),  # 0.5 == limit: strict fails
        ("max(ttft) <= 500ms", True),  # equality passes <=
        ("min(ttft) > 125ms", False),
        ("min(ttft) >= 125ms", True),
        ("median(ttft) < 0.3s", True),
        ("p50(tpot) <= 500ms", True),
        ("error_rate < 25%", False),  # exactly 1/4
        ("error_rate <= 25%", True),
        ("error_rate <= 0.25", True),
        ("goodput_ratio >= 50%", True),
        ("goodput_ratio > 50%", False),
        ("request_throughput >= 0.75 req/s", True),  # 3 ok / 4.0 s (0.0 -> 4.0)
        ("request_throughput > 0.75 req/s", False),
    ],
)
def test_pass_fail_and_boundaries(metrics: Metrics, expr: str, passed: bool) -> None:
    (verdict,) = SLA([expr]).evaluate(metrics)
    assert verdict.passed is passed
    assert verdict.message.startswith("FAILED ") is (not passed)


def test_verdict_messages(metrics: Metrics) -> None:
    ok, bad, under = SLA(["max(ttft) <= 500ms", "p50(ttft) < 200ms", "throughput > 10 tok/s"]).evaluate(metrics)
    assert ok.message == "max(ttft) <= 500 ms: measured 500 ms over 3 requests"
    assert (ok.measured, ok.count) == (0.5, 3)
    # median 0.25 vs 0.2: 25% over
    assert bad.message == "FAILED p50(ttft) < 200 ms: measured 250 ms (limit 200 ms, 25% over) over 3 requests"
    # tokens: 3 * (10 in + 2 out) = 36 over 4.0 s = 9 tok/s; 10% under
    assert under.message == (
        "FAILED throughput > 10 tok/s: measured 9 tok/s (limit 10 tok/s, 10% under) over 4 requests"
    )


def test_messages_use_the_objectives_unit(metrics: Metrics) -> None:
    (v,) = SLA(["p50(ttft) < 0.2s"]).evaluate(metrics)
    assert "measured 0.25 s (limit 0.2 s" in v.message
    (v,) = SLA(["error_rate < 0.1"]).evaluate(metrics)
    assert "measured 0.25 (limit 0.1," in v.message
    (v,) = SLA(["error_rate < 10%"]).evaluate(metrics)
    assert "measured 25% (limit 10%, 150% over)" in v.message
    (v,) = SLA(["max(ttft) < 500ms"]).evaluate(metrics)
    assert "(limit 500 ms, at the limit)" in v.message


def test_check_lists_every_violation(metrics: Metrics) -> None:
    sla = SLA(["p50(ttft) < 200ms", "max(ttft) <= 500ms", "error_rate < 1%", "p99(tpot) < 100ms"])
    with pytest.raises(SLAFailed) as info:
        sla.check(metrics)
    err = info.value
    assert isinstance(err, AssertionError)
    lines = str(err).splitlines()
    assert lines[0] == "3 of 4 SLA objectives failed:"  # check() keeps the passed one too
    assert lines[1].strip().startswith("FAILED p50(ttft) < 200 ms: measured 250 ms")
    assert lines[2].strip().startswith("FAILED error_rate < 1%: measured 25%")
    assert lines[3].strip().startswith("FAILED p99(tpot) < 100 ms: measured 745 ms")
    assert "max(ttft)" not in str(err)
    assert len(err.verdicts) == 4 and len(err.failures) == 3
    assert all(isinstance(v, Verdict) for v in err.verdicts)


def test_sla_failed_context_and_failures_only(metrics: Metrics) -> None:
    verdicts = SLA("p50(ttft) < 200ms, error_rate < 1%").evaluate(metrics)
    err = SLAFailed(verdicts, context="chat-1k1k: concurrency 8")
    assert str(err).splitlines()[:2] == ["chat-1k1k: concurrency 8", "2 SLA objectives failed:"]
    assert err.context == "chat-1k1k: concurrency 8"
    assert str(SLAFailed(verdicts[:1])).splitlines()[0] == "1 SLA objective failed:"


def test_check_returns_verdicts_when_all_pass(metrics: Metrics) -> None:
    verdicts = SLA(["max(ttft) <= 500ms", "error_rate <= 25%"]).check(metrics)
    assert [v.passed for v in verdicts] == [True, True]


def test_no_successful_requests_fails(metrics: Metrics) -> None:
    m = compute_metrics([_failed(0), _failed(1)])
    (v, rate) = SLA(["p99(ttft) < 500ms", "error_rate <= 100%"]).evaluate(m)
    assert v.passed is False and v.measured is None and v.count == 0
    assert v.message == "FAILED p99(ttft) < 500 ms: no successful requests (2 measured, all failed)"
    assert rate.passed is True  # the error rate itself is measurable


def test_empty_run_fails_every_objective() -> None:
    m = compute_metrics([])
    verdicts = SLA(["p99(ttft) < 500ms", "throughput < 1 tok/s", "error_rate < 1%"]).evaluate(m)
    assert [v.passed for v in verdicts] == [False, False, False]
    assert all("no requests were measured" in v.message for v in verdicts)


def test_goodput_objective_needs_limits() -> None:
    m = compute_metrics([_ok(0, 0.125, 0.5)])
    (v,) = SLA(["goodput > 0.5 req/s"]).evaluate(m)
    assert v.passed is False and v.measured is None
    assert "goodput needs per-request limits: pass goodput='ttft<500ms, tpot<50ms'" in v.message


def test_goodput_objective_with_limits(metrics: Metrics) -> None:
    sla = SLA(["goodput >= 0.5 req/s", "goodput_ratio >= 50%"], goodput="ttft <= 250ms")
    assert sla.needs_goodput
    assert str(sla.goodput) == "ttft <= 250 ms"
    # r0, r1 good over 4.0 s -> 0.5 req/s; 2 of 4 -> 50%
    assert [v.passed for v in sla.evaluate(metrics)] == [True, True]


def test_goodput_limits_must_match_the_metrics(metrics: Metrics) -> None:
    sla = SLA(["goodput_ratio >= 50%"], goodput="ttft <= 100ms")
    (v,) = sla.evaluate(metrics)
    assert v.passed is False
    assert "computed with goodput limits 'ttft <= 250 ms' but this SLA's are 'ttft <= 100 ms'" in v.message


def test_sla_goodput_limits_must_reach_the_metrics() -> None:
    m = compute_metrics([_ok(0, 0.125, 0.5)])  # computed without limits
    (v,) = SLA(["goodput_ratio >= 50%"], goodput="ttft <= 250ms").evaluate(m)
    assert v.passed is False
    assert "pass goodput=sla.goodput to compute_metrics" in v.message


def test_itl_verdict_counts_requests_and_gaps() -> None:
    records = [_ok(0, 0.125, 0.5, out=5), _ok(1, 0.125, 0.5, out=3)]  # last chunks of 4 and 2 tokens
    (v,) = SLA(["p99(itl) < 1s"]).evaluate(compute_metrics(records))
    assert v.count == 2
    assert v.message.endswith("over 2 requests (6 token gaps)")


# -- properties --------------------------------------------------------------------------------

_FRAGMENTS = [
    "p99",
    "p99.9",
    "P50",
    "median",
    "mean",
    "std",
    "min",
    "max",
    "avg",
    "p0",
    "p",
    "(",
    ")",
    *METRICS,
    "ttf",
    "<",
    "<=",
    ">",
    ">=",
    "=",
    "==",
    "≤",
    "≥",
    "!",
    "500",
    "0.1",
    ".5",
    "1e3",
    "1e999",
    "-3",
    "k",
    "K",
    "M",
    "ms",
    "MS",
    "s",
    "us",
    "µs",
    "Ms",
    "%",
    "tok/s",
    "tok/s/gpu",
    "tok/s/user",
    "req/s",
    "/",
    " ",
    "  ",
    "\t",
    "e",
    ".",
    "_",
    ",",
    "x",
]


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(max_size=40),
        st.lists(st.sampled_from(_FRAGMENTS), max_size=8).map("".join),
        st.lists(st.sampled_from(_FRAGMENTS), max_size=8).map(" ".join),
    )
)
def test_random_text_raises_only_syntax_errors(text: str) -> None:
    try:
        o = parse(text)
    except SLASyntaxError as exc:
        assert repr(text) in str(exc)
        return
    assert parse(str(o)) == o


def _valid_expression(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(list(METRICS)))
    info = METRICS[name]
    lhs = name
    if info.kind == "distribution":
        stat = draw(
            st.one_of(
                st.sampled_from(["mean", "median", "std", "min", "max", "p50", "p99", "p99.9", "p100"]),
                st.floats(min_value=0.001, max_value=100).map(lambda q: f"p{q:.3f}"),
            )
        )
        lhs = f"{stat}{draw(st.sampled_from(['', ' ']))}({name})"
    elif info.kind in ("histogram", "gauge"):  # the server's: the statistics it has
        lhs = f"{draw(st.sampled_from(info.stats))}({name})"
    unit = draw(st.sampled_from(units_for(info)))
    if info.dimension == "cost" and draw(st.booleans()):  # '$0.05' is 0.05 $/Mtok
        op = draw(st.sampled_from(["<", "<=", ">", ">="]))
        return f"{lhs} {op} ${draw(st.floats(min_value=0, max_value=1e6))!r}"
    if info.dimension == "ratio":
        top = 100.0 if unit == "%" else 1.0
        number = repr(draw(st.floats(min_value=0, max_value=top)))
    else:
        number = draw(
            st.one_of(
                st.floats(min_value=0, max_value=1e12).map(repr),
                st.integers(min_value=0, max_value=10**6).map(str),
                st.integers(min_value=0, max_value=999).map(lambda n: f"{n}k"),
            )
        )
    op = draw(st.sampled_from(["<", "<=", ">", ">="]))
    text = f"{lhs}{draw(st.sampled_from(['', ' ', '  ']))}{op} {number}{draw(st.sampled_from(['', ' ']))}{unit}"
    return draw(st.sampled_from([text, text.upper().replace("K", "k"), f"  {text}\t"]))


@settings(max_examples=400, deadline=None)
@given(st.composite(_valid_expression)())
def test_valid_expressions_round_trip(text: str) -> None:
    o = parse(text)
    again = parse(str(o))
    assert again == o
    assert str(again) == str(o)
    assert o.limit >= 0

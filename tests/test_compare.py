"""Regression verdicts on constructed data, the sequential rule, and `infmax compare`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pytest_infmax.baselines.compare import (
    DEFAULT_GATES,
    CompareOptions,
    Gate,
    block_bootstrap_indices,
    compare_runs,
    decide,
    estimate_run_noise,
    parse_gates,
    run_statistics,
)
from pytest_infmax.baselines.sequential import SequentialComparison
from pytest_infmax.baselines.store import BaselineRun, BaselineStore, build_testbed
from pytest_infmax.cli import main as cli_main

SERVER = {"kind": "sim", "model": "sim-model", "num_gpus": 1, "command": ["python", "-m", "pytest_infmax.sim"]}
WORKLOAD = {
    "scenario": {"name": "1k1k-mini", "isl": 128, "osl": 128, "range_ratio": 0.8, "endpoint": "completions"},
    "concurrency": 8,
    "rate": None,
    "rate_infinite": False,
    "burstiness": 1.0,
    "max_concurrency": None,
    "extra_body": {},
}


def make_run(
    rng: np.random.Generator,
    *,
    scale: float = 1.0,
    ttft_scale: float | None = None,
    run_sd: float = 0.0,
    n: int = 80,
    name: str = "t::a",
) -> BaselineRun:
    """A run whose latencies are lognormal around TTFT 11 ms / TPOT 4.5 ms, times ``scale``
    and a per-run factor with sd ``run_sd`` (a server start)."""
    start = math.exp(rng.normal(0, run_sd)) if run_sd else 1.0
    f, g = scale * start, (ttft_scale if ttft_scale is not None else scale) * start
    ttft = 0.011 * g * rng.lognormal(0, 0.15, n)
    tpot = 0.0045 * f * rng.lognormal(0, 0.03, n)
    e2e = ttft + 114 * tpot
    tput = 3400.0 / f
    return BaselineRun(
        name=name,
        samples={"ttft": list(ttft), "tpot": list(tpot), "e2e": list(e2e)},
        scalars={"throughput_per_gpu": tput, "throughput": tput},
        workload=dict(WORKLOAD),
    )


def runs(seed: int, count: int, **kwargs) -> list[BaselineRun]:
    rng = np.random.default_rng(seed)
    return [make_run(rng, **kwargs) for _ in range(count)]


# -- verdicts on constructed data ---------------------------------------------------------------------


def test_obvious_2x_regression_is_regressed_even_from_one_run_each() -> None:
    report = compare_runs(runs(1, 1), runs(2, 1, scale=2.0))
    assert report.verdict == "regressed" and report.regressed
    rows = {r.label: r for r in report.rows}
    assert rows["p50(tpot)"].verdict == "regressed"
    assert rows["p50(tpot)"].change == pytest.approx(1.0, abs=0.05)
    assert rows["throughput_per_gpu"].verdict == "regressed"  # lower throughput is worse
    assert rows["throughput_per_gpu"].change == pytest.approx(-0.5, abs=0.01)
    assert "regressed" in report.summary_line() and "p50(tpot)" in report.summary_line()


def test_identical_distributions_with_enough_data_are_same() -> None:
    report = compare_runs(
        runs(1, 10, run_sd=0.005),
        runs(2, 10, run_sd=0.005),
        options=CompareOptions(gates=("p50(tpot)", "p90(tpot)", "p50(e2e)", "throughput_per_gpu")),
    )
    assert {r.verdict for r in report.rows} == {"same"}, report.format_table()
    assert report.verdict == "same"


@pytest.mark.parametrize("seed", range(8))
def test_identical_distributions_with_little_data_are_unsure_never_regressed(seed: int) -> None:
    report = compare_runs(runs(seed, 1, run_sd=0.02), runs(seed + 100, 1, run_sd=0.02))
    assert all(r.verdict in ("unsure", "same") for r in report.rows), report.format_table()
    assert report.verdict == "unsure"  # one run each: the prior decides, and it leaves room


@pytest.mark.parametrize("seed", range(6))
def test_one_percent_change_with_5_percent_min_effect_is_never_regressed(seed: int) -> None:
    gates = CompareOptions(gates=("p50(tpot)", "p50(e2e)", "throughput_per_gpu"))
    little = compare_runs(runs(seed, 1, run_sd=0.02), runs(seed + 50, 1, run_sd=0.02, scale=1.01), options=gates)
    lots = compare_runs(runs(seed, 10, run_sd=0.003), runs(seed + 50, 10, run_sd=0.003, scale=1.01), options=gates)
    assert {r.verdict for r in little.rows} <= {"unsure", "same"}
    assert {r.verdict for r in lots.rows} == {"same"}, lots.format_table()  # real but below the minimum effect
    assert lots.rows[0].change == pytest.approx(0.01, abs=0.005)


def test_improvement_is_improved() -> None:
    report = compare_runs(runs(1, 5, run_sd=0.01), runs(2, 5, run_sd=0.01, scale=0.7))
    rows = {r.label: r for r in report.rows}
    assert rows["p50(tpot)"].verdict == "improved"
    assert rows["throughput_per_gpu"].verdict == "improved"  # higher throughput
    assert report.verdict in ("improved", "unsure")  # noisy tails may stay unsure
    assert not report.regressed


def test_ttft_only_regression_is_reported_on_ttft_rows() -> None:
    report = compare_runs(
        runs(1, 5, run_sd=0.01),
        runs(2, 5, run_sd=0.01, ttft_scale=1.5),
        options=CompareOptions(gates=("p50(ttft)", "p50(tpot)")),
    )
    rows = {r.label: r for r in report.rows}
    assert rows["p50(ttft)"].verdict == "regressed"
    assert rows["p50(tpot)"].verdict != "regressed"


def test_every_row_has_the_figures_and_the_method() -> None:
    report = compare_runs(runs(1, 1), runs(2, 1, scale=2.0))
    for row in report.rows:
        d = row.to_dict()
        for key in ("metric", "baseline", "current", "change", "interval", "p_value", "verdict", "method"):
            assert d[key] is not None, key
        assert d["interval"][0] <= d["change"] <= d["interval"][1]
    rows = {r.label: r for r in report.rows}
    assert "no history" in rows["p50(tpot)"].method and "block bootstrap L=8" in rows["p50(tpot)"].method
    assert "ratio" in rows["throughput_per_gpu"].method  # one value per run, no history
    assert "record >= 3 runs" in rows["p50(tpot)"].note
    history = compare_runs(runs(1, 5), runs(2, 1))
    assert "spread of runs" in {r.label: r for r in history.rows}["throughput_per_gpu"].method
    table = report.format_table()
    assert "p50(tpot)" in table and "REGRESSED" in table and "interval" in table


def test_alpha_is_split_over_the_gates() -> None:
    report = compare_runs(runs(1, 3), runs(2, 3))
    m = len(report.rows)  # cost_per_mtok absent here
    assert m == 10
    assert report.rows[0].level == pytest.approx(1 - 2 * 0.01 / m)


def test_gates_parse() -> None:
    assert parse_gates("p50(tpot), p99( ttft ), median(e2e), throughput_per_gpu") == (
        Gate("tpot", "p50"),
        Gate("ttft", "p99"),
        Gate("e2e", "p50"),
        Gate("throughput_per_gpu"),
    )
    assert Gate.parse("p99.9(ttft)").label == "p99.9(ttft)"
    assert "cost_per_mtok" in [g.label for g in DEFAULT_GATES]
    for bad, match in (
        ("p99(bogus)", "per-request"),
        ("ttft", "say which statistic"),
        ("std(ttft)", "percentile"),
        ("p99 ttft", "expected"),
        ("bogus", "unknown run-level"),
    ):
        with pytest.raises(ValueError, match=match):
            Gate.parse(bad)
    assert Gate.parse("throughput_per_gpu").higher_is_better and not Gate.parse("p50(ttft)").higher_is_better
    assert not Gate.parse("cost_per_mtok").higher_is_better


@pytest.mark.parametrize(
    "lo, hi, verdict",
    [
        (0.01, 0.10, "regressed"),  # significant and may exceed the 5 % margin
        (0.01, 0.03, "same"),  # significant but certainly below the margin
        (-0.02, 0.03, "same"),
        (-0.02, 0.10, "unsure"),
        (-0.10, -0.01, "improved"),
        (-0.03, -0.01, "same"),
        (-0.10, 0.02, "unsure"),
    ],
)
def test_decision_rule(lo: float, hi: float, verdict: str) -> None:
    assert decide(lo, hi, math.log1p(0.05)) == verdict


# -- the noise model -----------------------------------------------------------------------------------


def test_block_bootstrap_keeps_time_contiguous_blocks() -> None:
    idx = block_bootstrap_indices(80, 8, 50, np.random.default_rng(0))
    assert idx.shape == (50, 80)
    steps = np.diff(idx, axis=1) % 80
    assert np.all(steps[:, 0:7] == 1)  # within the first block: consecutive requests


def test_block_bootstrap_sees_correlation_that_iid_resampling_misses() -> None:
    """Requests in flight together share engine steps: a slowly varying factor over 80 requests."""
    rng = np.random.default_rng(4)
    shared = np.repeat(rng.normal(0, 0.05, 10), 8)  # one factor per 8 requests in flight
    values = 0.0045 * np.exp(shared + rng.normal(0, 0.01, 80))
    _, block_var = run_statistics(values, ["p50"], block=8, resamples=400, rng=np.random.default_rng(1))
    _, iid_var = run_statistics(values, ["p50"], block=1, resamples=400, rng=np.random.default_rng(1))
    assert block_var["p50"] > 1.5 * iid_var["p50"]


def test_run_noise_uses_history_and_falls_back_to_the_prior() -> None:
    no_history = estimate_run_noise([np.array([0.0]), np.array([0.1])], [np.zeros(1), np.zeros(1)], 0.03, 4)
    assert no_history.tau2 == pytest.approx(0.03**2) and no_history.df == 4 and no_history.history_df == 0
    spread = np.log(np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.1, 0.9, 1.0, 1.05, 0.95]))
    wide = estimate_run_noise([spread], [np.zeros(10)], 0.03, 4)
    assert wide.tau2 > 0.03**2 and wide.df == 13  # a noisy history widens the interval
    quiet = estimate_run_noise([np.full(10, 0.5)], [np.zeros(10)], 0.03, 4)
    assert quiet.tau2 < 0.03**2  # a quiet one narrows it, but the prior keeps weight
    floor = estimate_run_noise([np.full(10, 0.5)], [np.full(10, 0.05**2)], 0.0001, 4)
    assert floor.tau2 >= 0.05**2  # never below the within-run sampling variance


# -- sequential ----------------------------------------------------------------------------------------


def _feed(seq: SequentialComparison, values: np.ndarray, batch: int = 8):
    state = None
    for i in range(0, len(values), batch):
        state = seq.update(values[i : i + batch])
        if state.stop:
            break
    return state


@pytest.mark.parametrize("seed", range(5))
def test_sequential_never_regresses_on_identical_data_despite_looking_after_every_batch(seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = runs(seed, 10, run_sd=0.01)
    seq = SequentialComparison(base, "p50(tpot)", max_requests=240)
    state = _feed(seq, 0.0045 * rng.lognormal(0, 0.03, 240))
    assert state.verdict != "regressed" and state.stop
    assert state.requests <= 240


def test_sequential_settles_a_large_regression_early() -> None:
    rng = np.random.default_rng(9)
    seq = SequentialComparison(runs(9, 10, run_sd=0.01), "p50(tpot)", max_requests=400)
    state = _feed(seq, 0.0045 * 1.5 * rng.lognormal(0, 0.03, 400))
    assert state.verdict == "regressed" and state.settled and state.requests < 100
    assert state.interval[0] > 0


def test_sequential_reports_when_history_limits_it() -> None:
    seq = SequentialComparison(runs(3, 1), "p50(tpot)", max_requests=64)
    state = _feed(seq, 0.0045 * np.random.default_rng(3).lognormal(0, 0.03, 64))
    assert state.stop and state.verdict == "unsure" and state.limited_by_history
    assert "cap" in state.reason or "between-run" in state.reason


# -- infmax compare --------------------------------------------------------------------------------------


def _load_result(seed: int, scale: float):
    from pytest_infmax.load.plan import LoadConfig, RunRecords
    from pytest_infmax.load.scenarios import get_scenario
    from pytest_infmax.records import RequestRecord
    from pytest_infmax.run.results import LoadResult

    rng = np.random.default_rng(seed)
    records = []
    for i in range(40):
        t = i * 0.01
        ttft, tpot = scale * rng.uniform(0.010, 0.012), scale * rng.uniform(0.0045, 0.0047)
        chunks = [t + ttft + j * tpot for j in range(10)]
        records.append(
            RequestRecord(
                index=i,
                send_time=t,
                first_token_time=chunks[0],
                end_time=chunks[-1],
                chunk_times=chunks,
                chunk_tokens=[1] * 10,
                input_tokens=100,
                output_tokens=10,
            )
        )
    run = RunRecords(records, clock_origin=0.0, epoch_origin=1.7e9, measured_start=0.0, measured_end=1.0)
    return LoadResult("t::a", LoadConfig(scenario=get_scenario("1k1k-mini"), concurrency=4), run, dict(SERVER))


def _store(tmp_path, name: str, run_list: list[BaselineRun], testbed: dict | None = None) -> str:
    store = BaselineStore(tmp_path / name)
    store.save("t::a", run_list, testbed or build_testbed(SERVER))
    return str(store.path_for("t::a"))


def test_cli_compare_exit_codes(tmp_path, capsys) -> None:
    base = _store(tmp_path, "base", runs(1, 5, run_sd=0.01))
    same = _store(tmp_path, "same", runs(2, 3, run_sd=0.01))
    slow = _store(tmp_path, "slow", runs(3, 3, run_sd=0.01, scale=1.5))
    assert cli_main(["compare", base, same]) == 0
    out = capsys.readouterr().out
    assert "p50(tpot)" in out and "5 baseline run(s) vs 3 current run(s)" in out
    assert cli_main(["compare", base, slow, "--json", str(tmp_path / "cmp.json")]) == 1
    assert "REGRESSED" in capsys.readouterr().out
    doc = json.loads((tmp_path / "cmp.json").read_text())
    assert doc["comparisons"][0]["verdict"] == "regressed"
    assert cli_main(["compare", base, slow, "--metrics", "p50(ttft)", "--min-effect", "80"]) == 0
    # directories pair files by key
    assert cli_main(["compare", str(tmp_path / "base"), str(tmp_path / "slow"), "--brief"]) == 1
    capsys.readouterr()
    # a directory of sets (.infmax/baselines) with --set: that set, on either side
    assert cli_main(["compare", str(tmp_path), slow, "--set", "base"]) == 1
    assert "REGRESSED" in capsys.readouterr().out
    assert cli_main(["compare", str(tmp_path), slow, "--set", "nightly"]) == 2
    assert "no baseline set 'nightly' in" in capsys.readouterr().err


def test_cli_compare_unsure_exit_code_is_opt_in(tmp_path, capsys) -> None:
    base = _store(tmp_path, "base", runs(1, 1, run_sd=0.02))
    cur = _store(tmp_path, "cur", runs(2, 1, run_sd=0.02))
    assert cli_main(["compare", base, cur]) == 0
    assert cli_main(["compare", base, cur, "--fail-on-unsure"]) == 1
    capsys.readouterr()


def test_cli_compare_refuses_bad_input_with_a_message(tmp_path, capsys) -> None:
    base = _store(tmp_path, "base", runs(1, 3))
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "pytest-infmax-baseline/1", "runs": [')
    assert cli_main(["compare", base, str(broken)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "Traceback" not in err
    # the way on is said in this command's words: pytest's flags are named as pytest's
    assert "pytest's --infmax-update" in err and "Rewrite it with --infmax-update" not in err
    assert cli_main(["compare", base, str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    other = _store(tmp_path, "h200", runs(2, 3), build_testbed(SERVER, {"gpu_model": "H200"}))
    h100 = _store(tmp_path, "h100", runs(1, 3), build_testbed(SERVER, {"gpu_model": "H100"}))
    assert cli_main(["compare", h100, other]) == 2
    err = capsys.readouterr().err
    assert "gpu_model" in err and "`infmax compare --force`" in err and "--infmax-compare-force" not in err
    assert "start a new baseline with --infmax-update" not in err
    assert cli_main(["compare", h100, other, "--force"]) == 0
    assert "forced" in capsys.readouterr().out


def test_cli_compare_reads_results_files(tmp_path, capsys) -> None:
    from pytest_infmax.reports.document import results_document

    def results(seed: int, scale: float) -> str:
        doc = results_document([_load_result(seed + i, scale).to_dict() for i in range(3)], [SERVER])
        path = tmp_path / f"r{seed}-{scale}.json"
        path.write_text(json.dumps(doc))
        return str(path)

    assert cli_main(["compare", results(0, 1.0), results(10, 2.0), "--metrics", "p50(tpot)"]) == 1
    assert cli_main(["compare", results(0, 1.0), results(20, 1.0), "--metrics", "p50(tpot)"]) == 0
    capsys.readouterr()


def test_cli_compare_with_nothing_in_common_is_an_error(tmp_path, capsys) -> None:
    store = BaselineStore(tmp_path / "other")
    store.save("t::b", runs(1, 1), build_testbed(SERVER))
    base = _store(tmp_path, "base", runs(1, 1))
    assert cli_main(["compare", base, str(store.path_for("t::b"))]) == 2
    assert "nothing compared" in capsys.readouterr().err

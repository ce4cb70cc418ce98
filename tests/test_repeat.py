"""--infmax-repeat: N runs of one load, each on a fresh server start, kept apart for the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _sim_helpers import pid_alive

from pytest_infmax.baselines.compare import compare_files
from pytest_infmax.baselines.store import Baseline, BaselineRun, BaselineStore, runs_of
from pytest_infmax.load.plan import LoadConfigError, RunRecords
from pytest_infmax.measure.energy import EnergyReport
from pytest_infmax.records import RequestRecord, TokenSource
from pytest_infmax.reports.rows import result_row
from pytest_infmax.run.repeats import RepeatError, pooled_energy, pooled_metrics, repeat_marker_count
from pytest_infmax.run.runner import Infmax
from pytest_infmax.servers.launch import ServerConfig, ServerError, ServerPool, running_server

FAST = "--decode-step-ms 2 --decode-ms-per-seq 0.01"
FAST_ARGS = tuple(FAST.split())


# -- in the plugin -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("no_leaked_servers")
def test_repeat_starts_the_server_afresh_and_the_gate_sees_every_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf="""
        import pytest

        def test_one(infmax):
            result = infmax.run("1k1k-mini", concurrency=4, num_requests=12, warmup=2)
            assert result.metrics.num_requests == 12 * len(result.repeats.runs)

        @pytest.mark.infmax_repeat(2)
        def test_marked(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=6, warmup=0)
    """
    )
    pytester.makeini(
        f"[pytest]\ninfmax_sim_args = {FAST}\ninfmax_repeat = 3\nasyncio_default_fixture_loop_scope = function\n"
    )
    saved = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-save", "default", "--infmax-json", "r.json"
    )
    saved.assert_outcomes(passed=2)
    saved.stdout.fnmatch_lines(["*test_perf.py::test_one*c=4 x3*36*", "*saved to * (3 runs)*"])
    doc = json.loads((pytester.path / "r.json").read_text())
    one, marked = doc["results"]
    assert one["repeats"]["count"] == 3 and one["repeats"]["fresh_starts"] and one["metrics"]["num_requests"] == 36
    runs = one["repeats"]["runs"]
    pids = [r["server"]["pid"] for r in runs]
    assert len(set(pids)) == 3  # three starts of the server, one per run
    assert [r["records"] for r in runs] == [[0, 14], [14, 28], [28, 42]] and len(one["records"]) == 42
    assert all(r["metrics"]["num_requests"] == 12 for r in runs)
    windows = [r["measured_window_s"] for r in runs]
    assert all(a[1] < b[0] for a, b in zip(windows, windows[1:]))  # one after another
    # Throughput pools the runs' measured time, not the restarts between them.
    assert one["metrics"]["duration"] == pytest.approx(sum(r["metrics"]["duration"] for r in runs), rel=1e-6)
    assert marked["repeats"]["count"] == 2  # the marker over infmax_repeat = 3
    assert marked["repeats"]["runs"][0]["server"]["pid"] == pids[-1]  # the pool's server, restarted in place
    assert len(list((pytester.path / ".infmax" / "logs").glob("server-sim-*.log"))) == 3 + 1
    folder = pytester.path / ".infmax" / "baselines" / "default"
    stored = {p.name: json.loads(p.read_text()) for p in folder.glob("*.json")}
    (base_one,) = [d for name, d in stored.items() if "test_one" in name]
    assert len(base_one["runs"]) == 3 and len({r["started_at"] for r in base_one["runs"]}) == 3
    assert [len(r["samples"]["tpot"]) for r in base_one["runs"]] == [12, 12, 12]

    compared = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "one")
    compared.assert_outcomes(passed=1)
    compared.stdout.fnmatch_lines(["ok * test_perf.py::test_one: * (3 baseline vs 3 current runs)*"])
    # `infmax compare` reads a results file's repeats as its runs too.
    (report,), _ = compare_files(str(folder), str(pytester.path / "r.json"), keys=["test_perf.py::test_one"])
    assert (report.baseline_runs, report.current_runs) == (3, 3)


#: the simulator with start-to-start variation (and per-step jitter), as on a GPU
NOISY = f"{FAST} --start-jitter 0.02 --step-jitter 0.03"


@pytest.mark.slow
@pytest.mark.usefixtures("no_leaked_servers")
def test_repeats_of_a_noisy_simulator_catch_a_slowdown_and_pass_without_one(pytester: pytest.Pytester) -> None:
    """End to end with start-to-start noise: a baseline of 3 fresh starts, then 3 more
    starts with --slowdown 2 (regressed) and 3 without (not regressed). Each start
    draws its own factor, though the plugin restarts the simulator with the same flags."""
    pytester.makepyfile(
        test_perf="""
        from pytest_infmax.load.scenarios import Scenario

        def test_one(infmax):
            infmax.run(Scenario("tiny", 16, 16), concurrency=4, num_requests=12, warmup=2)
    """
    )
    # Gated on medians: p99 of 16 requests is their maximum, which a loaded CI host moves
    # by more than the per-start noise this test is about.
    pytester.makeini(
        f"[pytest]\ninfmax_sim_args = {NOISY}\ninfmax_repeat = 3\n"
        "infmax_gates = p50(tpot), p50(e2e)\nasyncio_default_fixture_loop_scope = function\n"
    )
    saved = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-save", "default", "--infmax-json", "base.json"
    )
    saved.assert_outcomes(passed=1)
    saved.stdout.fnmatch_lines(["*saved to * (3 runs)*"])
    (result,) = json.loads((pytester.path / "base.json").read_text())["results"]
    logs = [Path(run["server"]["log"]).read_text() for run in result["repeats"]["runs"]]
    noise_lines = [[line for line in log.splitlines() if line.startswith("infmax-sim: noise: ")] for log in logs]
    assert [len(lines) for lines in noise_lines] == [1, 1, 1], logs  # each start states its noise
    # Three starts, three draws. The 64-bit seeds are compared, not the factors: two of three
    # lognormal(sd 0.02) factors agree to the 4 decimals printed about once in 250 runs.
    seeds = {lines[0].split("start seed ")[1].split()[0] for lines in noise_lines}
    assert len(seeds) == 3, logs

    slowed = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-compare-force", f"--infmax-sim-args={NOISY} --slowdown 2"
    )
    slowed.assert_outcomes(failed=1)
    slowed.stdout.fnmatch_lines(
        ["FAIL test_perf.py::test_one: regressed: *p50(tpot) +*(3 baseline vs 3 current runs)*"]
    )

    same = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    same.assert_outcomes(passed=1)
    (line,) = [x for x in same.outlines if "test_perf.py::test_one: " in x and "current runs)" in x]
    assert line.startswith("ok ") and ": regressed" not in line, line
    assert "(3 baseline vs 3 current runs)" in line


def test_bad_repeat_values_are_usage_errors_naming_the_setting(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf="""
        import pytest

        @pytest.mark.infmax_repeat(0)
        def test_marked(infmax):
            pass
    """
    )
    for args, message in (
        (["--infmax-repeat", "0"], "*--infmax-repeat = '0' is not valid: must be a whole number >= 1*"),
        (["--infmax-repeat", "abc"], "*--infmax-repeat = 'abc' is not valid*whole number >= 1*"),
        (["-k", "marked"], "*test_marked: @pytest.mark.infmax_repeat: *whole number >= 1*got 0*"),
    ):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, args
        result.stderr.fnmatch_lines([message])


@pytest.mark.parametrize("value", ["0", "-2", "abc", "1.5", ""])
def test_repeat_setting_parser_refuses_what_is_not_a_count(value: str) -> None:
    from pytest_infmax.settings import SETTINGS

    (setting,) = [s for s in SETTINGS if s.name == "repeat"]
    assert (setting.flag, setting.env, setting.ini, setting.default) == (
        "--infmax-repeat",
        "INFMAX_REPEAT",
        "infmax_repeat",
        1,
    )
    with pytest.raises(ValueError, match="whole number >= 1"):
        setting.parse(value)
    assert setting.parse(" 10 ") == 10


@pytest.mark.parametrize(
    ("args", "kwargs"), [((), {}), ((2, 3), {}), ((0,), {}), ((True,), {}), (("3",), {}), ((), {"runs": 3})]
)
def test_repeat_marker_takes_one_count(args: tuple, kwargs: dict) -> None:
    with pytest.raises(RepeatError, match="whole number >= 1"):
        repeat_marker_count(args, kwargs)
    assert repeat_marker_count((4,), {}) == 4 and repeat_marker_count((), {"n": 2}) == 2


# -- without pytest ---------------------------------------------------------------------------------


def test_pool_restart_is_a_fresh_start_in_place(tmp_path: Path) -> None:
    pool = ServerPool(tmp_path)
    config = ServerConfig(sim_args=FAST_ARGS)
    try:
        server = pool.get(config)
        old_pid = server.pid
        assert pool.restart(server) is server
        assert server.pid != old_pid and not pid_alive(old_pid)  # the old process group is gone
        assert pool.get(config) is server and pid_alive(server.pid) and server.base_url
        result = Infmax(server).run("1k1k-mini", concurrency=1, num_requests=2, warmup=0)
        assert result.metrics.num_ok == 2 and result.server["pid"] == server.pid
    finally:
        pool.stop_all()
    assert not pid_alive(server.pid)


def test_endpoint_repeats_without_restart_and_the_gate_merges_them(tmp_path: Path) -> None:
    with running_server(ServerConfig(sim_args=FAST_ARGS), tmp_path) as sim:
        endpoint = ServerPool(tmp_path).get(ServerConfig(kind="endpoint", endpoint=sim.base_url))
        assert not endpoint.restartable
        with pytest.raises(ServerError, match="cannot be restarted"):
            ServerPool(tmp_path).restart(endpoint)
        result = Infmax(endpoint).run("1k1k-mini", concurrency=2, num_requests=4, warmup=0, repeat=2)
    assert len(result.repeats.runs) == 2 and not result.repeats.fresh_starts
    assert "cannot be restarted" in result.repeats.note
    assert result.metrics.num_requests == 8
    (merged,) = runs_of(result)  # one start: one run for the gate, not two
    assert len(merged.samples["tpot"]) == 8
    (merged_again,) = runs_of(json.loads(json.dumps(result.to_dict())))
    assert merged_again.samples["tpot"] == merged.samples["tpot"]


def test_sweep_points_are_repeated_and_bad_repeat_option_is_refused(tmp_path: Path) -> None:
    pool = ServerPool(tmp_path)
    try:
        server = pool.get(ServerConfig(sim_args=FAST_ARGS))
        infmax = Infmax(server, repeat=2, restart=pool.restart)
        with pytest.raises(LoadConfigError, match="repeat= must be a whole number >= 1"):
            infmax.run("1k1k-mini", concurrency=1, num_requests=2, repeat=0)
        pid = server.pid
        sweep = infmax.sweep("1k1k-mini", concurrency=[1, 2], num_requests=2, warmup=0)
        assert [len(r.repeats.runs) for r in sweep.results] == [2, 2]
        assert [r.metrics.num_requests for r in sweep.results] == [4, 4]
        assert len({run.server["pid"] for r in sweep.results for run in r.repeats.runs} | {pid}) == 3
        assert [len(runs_of(r)) for r in sweep.results] == [2, 2]
        assert [result_row(r.to_dict(include_records=False))["load"] for r in sweep.results] == ["c=1 x2", "c=2 x2"]
    finally:
        pool.stop_all()


# -- pooling and storage -------------------------------------------------------------------------


def _run(start: float, n: int, seconds: float) -> RunRecords:
    """n requests of 10 output tokens, back to back, the whole run ``seconds`` long."""
    step = seconds / n
    records = [
        RequestRecord(
            i,
            send_time=start + i * step,
            first_token_time=start + i * step + step / 10,
            end_time=start + (i + 1) * step,
            output_tokens=10,
            input_tokens=5,
            output_tokens_source=TokenSource.USAGE,
            input_tokens_source=TokenSource.USAGE,
        )
        for i in range(n)
    ]
    return RunRecords(
        records, clock_origin=start, epoch_origin=1e9 + start, measured_start=start, measured_end=start + seconds
    )


def test_pooled_metrics_rate_over_the_runs_measured_time_not_the_restarts() -> None:
    runs = [_run(0.0, 10, 1.0), _run(100.0, 10, 3.0)]  # a long restart in between
    m = pooled_metrics(runs, num_gpus=2, percentiles=(50.0,), goodput=None)
    assert m.num_requests == 20 and m.duration == pytest.approx(4.0)
    assert m.throughput == pytest.approx(20 * 15 / 4.0) and m.throughput_per_gpu == pytest.approx(20 * 15 / 8.0)
    assert m.request_throughput == pytest.approx(5.0) and m.goodput is None


def test_pooled_energy_sums_runs_and_says_which_was_not_measured() -> None:
    runs = [_run(0.0, 2, 1.0), _run(10.0, 2, 3.0)]
    a = EnergyReport(
        measured=True,
        source="nvml",
        duration_s=1.0,
        coverage=1.0,
        samples=10,
        energy_j=100.0,
        avg_power_w=100.0,
        peak_power_w=120.0,
        input_tokens=10,
        output_tokens=20,
        timeline=[[0.5, 100.0]],
    )
    b = EnergyReport(
        measured=True,
        source="nvml",
        duration_s=3.0,
        coverage=0.5,
        samples=30,
        energy_j=600.0,
        avg_power_w=200.0,
        peak_power_w=250.0,
        input_tokens=10,
        output_tokens=20,
        timeline=[[1.0, 200.0]],
    )
    rep = pooled_energy([a, b], runs, usd_per_kwh=0.1)
    assert rep.energy_j == 700.0 and rep.duration_s == 4.0 and rep.avg_power_w == pytest.approx(175.0)
    assert rep.peak_power_w == 250.0 and rep.coverage == pytest.approx(0.625) and rep.samples == 40
    assert rep.j_per_token == pytest.approx(700.0 / 60) and rep.energy_usd == pytest.approx(700 / 3.6e6 * 0.1)
    assert rep.timeline == [[0.5, 100.0], [11.0, 200.0]]  # on the first run's clock
    off = pooled_energy([a, EnergyReport.not_measured("no NVML")], runs, None)
    assert not off.measured and off.reason == "not measured in run 2: no NVML"


def _baseline_run(i: int) -> BaselineRun:
    return BaselineRun(name="k", samples={"tpot": [0.01 + i * 1e-4] * 5}, scalars={}, recorded_at=str(i))


def test_a_save_keeps_all_its_runs_and_the_history_cap_drops_the_oldest(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path, history=4)
    store.save("k", [_baseline_run(i) for i in range(3)], {"engine": "sim"})
    store.save("k", [_baseline_run(i) for i in range(3, 6)], {"engine": "sim"})
    assert [r.recorded_at for r in store.load("k").runs] == ["2", "3", "4", "5"]
    store.save("k", [_baseline_run(i) for i in range(6, 12)], {"engine": "sim"})  # more than the cap: all kept
    assert [r.recorded_at for r in store.load("k").runs] == [str(i) for i in range(6, 12)]
    assert Baseline("k", {}, []).history == 20 and BaselineStore(tmp_path).history == 20

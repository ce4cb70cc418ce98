"""Baseline storage: round trip, atomic writes, corrupt files, testbeds, history, pytest-benchmark export."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from pytest_infmax import atomic
from pytest_infmax.baselines.benchmark import benchmark_stats, export_benchmark_json
from pytest_infmax.baselines.compare import compare_baseline, compare_stored
from pytest_infmax.baselines.store import (
    FORMAT,
    Baseline,
    BaselineError,
    BaselineMismatch,
    BaselineRun,
    BaselineStore,
    CorruptBaselineError,
    build_testbed,
    load_baseline,
    load_runs,
    merge_runs,
    normalise_server_options,
    result_keys,
    safe_filename,
)
from pytest_infmax.load.plan import LoadConfig, RunRecords
from pytest_infmax.load.scenarios import get_scenario
from pytest_infmax.records import ErrorKind, RequestRecord, TokenSource
from pytest_infmax.reports.document import results_document
from pytest_infmax.run.results import LoadResult

SERVER = {
    "kind": "sim",
    "base_url": "http://127.0.0.1:40123",
    "model": "sim-model",
    "num_gpus": 1,
    "command": [
        "/home/u/.venv/bin/python",
        "-m",
        "pytest_infmax.sim",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        "/tmp/x/port",
        "--parent-pid",
        "4242",
        "--model",
        "sim-model",
        "--decode-step-ms",
        "8",
    ],
    "pid": 4321,
    "log": "/tmp/x/sim.log",
    "startup_seconds": 0.4,
}
GPU = {"gpu_model": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "driver": "550.54.15", "engine_version": "0.1.0"}


def make_result(
    name: str = "tests/test_perf.py::test_x[c=4]", n: int = 24, seed: int = 0, scale: float = 1.0, concurrency: int = 4
) -> LoadResult:
    """A closed-loop-looking run: 2 warm-up requests, n measured, one failure."""
    rng = np.random.default_rng(seed)
    records = []
    t = 0.0
    for i in range(n + 2):
        ttft = scale * rng.uniform(0.010, 0.014)
        tpot = scale * rng.uniform(0.0045, 0.0050)
        tokens = int(rng.integers(8, 12))
        chunks = [t + ttft + j * tpot for j in range(tokens)]
        records.append(
            RequestRecord(
                index=i,
                warmup=i < 2,
                send_time=t,
                first_token_time=chunks[0],
                end_time=chunks[-1],
                chunk_times=chunks,
                chunk_tokens=[1] * tokens,
                input_tokens=100,
                output_tokens=tokens,
                input_tokens_source=TokenSource.REQUEST,
                output_tokens_source=TokenSource.USAGE,
                chunk_tokens_source=TokenSource.USAGE,
            )
        )
        t += 0.01
    records[-1].error_kind = ErrorKind.HTTP
    records[-1].http_status = 500
    run = RunRecords(records, clock_origin=0.0, epoch_origin=1.7e9, measured_start=0.02, measured_end=t + 0.1)
    config = LoadConfig(scenario=get_scenario("1k1k-mini"), concurrency=concurrency)
    return LoadResult(name=name, config=config, run=run, server=dict(SERVER), num_gpus=1)


# -- the compact run -------------------------------------------------------------------------------


def test_run_keeps_compact_per_request_samples_in_send_order() -> None:
    result = make_result()
    run = BaselineRun.from_result(result)
    ok = sorted((r for r in result.records if r.ok and not r.warmup), key=lambda r: r.send_time)
    assert len(ok) == 23  # 24 measured, one failed
    assert run.samples["ttft"] == pytest.approx([r.ttft for r in ok], abs=1e-7)
    assert run.samples["tpot"] == pytest.approx([r.tpot for r in ok], abs=1e-7)
    assert run.samples["e2e"] == pytest.approx([r.e2e for r in ok], abs=1e-7)
    assert run.samples["itl_max"] == pytest.approx([max(r.itls()) for r in ok], abs=1e-7)
    assert "chunk_times" not in json.dumps(run.to_dict())  # compact: no per-chunk data
    assert run.scalars["throughput_per_gpu"] == pytest.approx(result.metrics.throughput_per_gpu)
    assert run.scalars["error_rate"] == pytest.approx(1 / 24)
    assert run.workload["concurrency"] == 4 and run.workload["scenario"]["name"] == "1k1k-mini"
    assert run.concurrency == 4


def test_run_from_the_json_dict_equals_run_from_the_result() -> None:
    """Under xdist results reach the controller as to_dict(); both paths must agree."""
    result = make_result()
    a = BaselineRun.from_result(result)
    b = BaselineRun.from_result(json.loads(json.dumps(result.to_dict(include_records=True))))
    assert a.samples.keys() == b.samples.keys()
    for key in a.samples:  # the JSON keeps times to 1 ns; samples are rounded to 0.1 µs
        assert a.samples[key] == pytest.approx(b.samples[key], abs=2e-7)
    assert a.scalars == pytest.approx(b.scalars)
    assert a.workload == b.workload


def test_a_result_dict_without_records_is_a_clear_error() -> None:
    with pytest.raises(BaselineError, match="per-request records"):
        BaselineRun.from_result(make_result().to_dict(include_records=False))


def test_price_adds_cost_per_million_tokens() -> None:
    result = make_result()
    run = BaselineRun.from_result(result, price=2.0)
    expected = 2.0 * 1 / (result.metrics.throughput * 3600) * 1e6
    assert run.scalars["cost_per_mtok"] == pytest.approx(expected)


# -- storage ----------------------------------------------------------------------------------------


def test_round_trip_through_the_store(tmp_path) -> None:
    store = BaselineStore(tmp_path / "baselines")
    key = "tests/test_perf.py::test_x[c=4]"
    run = BaselineRun.from_result(make_result(key))
    testbed = build_testbed(SERVER, GPU)
    store.save(key, run, testbed)
    loaded = store.load(key)
    assert loaded is not None
    assert loaded.key == key and loaded.testbed == testbed
    assert len(loaded.runs) == 1
    back = loaded.runs[0]
    assert back.samples == {k: [round(x, 7) for x in v] for k, v in run.samples.items()}
    assert back.scalars == run.scalars and back.workload == run.workload
    assert store.keys() == [key]
    assert store.load("tests/test_perf.py::other") is None


def test_file_is_stable_readable_and_diffable(tmp_path) -> None:
    store = BaselineStore(tmp_path)
    key = "tests/perf/test_a.py::TestX::test_y[1k1k-mini-c=8]"
    path = store.path_for(key)
    assert path == store.path_for(key)  # stable
    assert path.suffix == ".json" and all(c.isalnum() or c in "._-" for c in path.name)
    assert path.name.startswith("tests_perf_test_a.py_TestX_test_y_1k1k-mini-c_8")
    assert safe_filename("a/b") != safe_filename("a_b")  # same slug, different keys: different files
    store.save(key, BaselineRun.from_result(make_result(key)), build_testbed(SERVER))
    text = path.read_text()
    doc = json.loads(text)
    assert doc["format"] == FORMAT
    assert list(doc) == sorted(doc)  # sorted keys...
    assert list(doc["runs"][0]) == sorted(doc["runs"][0])
    assert "\n " in text  # ...and indentation, for line-wise diffs


def test_write_is_atomic_no_temp_left_and_old_file_intact_on_failure(tmp_path, monkeypatch) -> None:
    store = BaselineStore(tmp_path)
    key = "t::a"
    store.save(key, BaselineRun.from_result(make_result(key, seed=1)), build_testbed(SERVER))
    before = store.path_for(key).read_bytes()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [
        store.path_for(key).name
    ]  # no temp file left

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(
        BaselineError, match="not saved to .*: No space left on device; the baseline there is unchanged"
    ):
        store.save(key, BaselineRun.from_result(make_result(key, seed=2)), build_testbed(SERVER))
    monkeypatch.undo()
    assert store.path_for(key).read_bytes() == before  # the old baseline survives
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [
        store.path_for(key).name
    ]  # temp removed
    assert len(store.load(key).runs) == 1


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"format": "pytest-infmax-baseline/1", "key": "t::a", "runs": [{"sam', "not valid JSON"),
        ("not json at all", "not valid JSON"),
        ("", "empty"),
        ("[1, 2, 3]", "not an object"),
        ('{"format": "something-else/1"}', "'format'"),
        ('{"format": "pytest-infmax-baseline/99", "key": "t::a", "testbed": {}, "runs": [{}]}', "newer"),
        ('{"format": "pytest-infmax-baseline/1", "key": "t::a", "testbed": {}, "runs": []}', "non-empty"),
        (
            '{"format": "pytest-infmax-baseline/1", "key": "t::a", "testbed": {}, "runs": [{"samples": {"ttft": ["x"]}, '
            '"scalars": {}}]}',
            "list of numbers",
        ),
        (
            '{"format": "pytest-infmax-baseline/1", "key": "t::a", "testbed": {}, "runs": [{"samples": {}, '
            '"scalars": {"x": NaN}}]}',
            "NaN",
        ),
        # issue 17: hollow runs were accepted and compared on throughput alone
        (
            '{"format": "pytest-infmax-baseline/1", "key": "t::a", "testbed": {}, "runs": [{"samples": '
            '{"ttft": [], "tpot": []}, "scalars": {"throughput": 100.0}}]}',
            "a run has no samples (not one successful request)",
        ),
        # issue 17: was a RecursionError traceback
        ("[" * 100_000 + "]" * 100_000, "nests deeper than any baseline does"),
        (
            '{"format": "pytest-infmax-baseline/1", "key": "t::a", "testbed": {}, "runs": [{"samples": '
            '{"ttft": [0.1, 1e308]}, "scalars": {}}]}',
            "samples['ttft'] holds 1e+308, which is not a latency",
        ),
        (
            '{"format": "pytest-infmax-baseline/1", "key": "t::a", "testbed": {}, "runs": [{"samples": '
            '{"ttft": [0.1]}, "scalars": {"throughput": 1e400}}]}',
            "scalars['throughput'] must be a finite number or null, got inf",
        ),
    ],
)
def test_corrupt_file_is_a_clear_error_naming_file_and_fix(tmp_path, content, reason) -> None:
    store = BaselineStore(tmp_path)
    path = store.path_for("t::a")
    path.write_text(content)
    with pytest.raises(CorruptBaselineError) as info:
        store.load("t::a")
    message = str(info.value)
    assert str(path) in message and "--infmax-update" in message and reason in message
    with pytest.raises(CorruptBaselineError):  # appending to it is refused too
        store.save("t::a", BaselineRun.from_result(make_result("t::a")), build_testbed(SERVER))
    # --infmax-update rewrites it
    store.save("t::a", BaselineRun.from_result(make_result("t::a")), build_testbed(SERVER), mode="replace")
    assert len(store.load("t::a").runs) == 1


def test_a_hollow_run_is_never_saved(tmp_path) -> None:
    """Issue 17: a run without one successful request was saved, then compared on throughput
    alone. Saving it is a BaselineError (the gate's 'baseline check failed'); the file is untouched."""
    store = BaselineStore(tmp_path)
    run = BaselineRun.from_result(make_result("t::a"))
    run.samples = {k: [] for k in run.samples}
    with pytest.raises(BaselineError, match=r"t::a: not saved: a run has no samples"):
        store.save("t::a", run, build_testbed(SERVER))
    assert not store.path_for("t::a").exists()


def test_binary_garbage_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(b"\x80\x81\xfe\xff")
    with pytest.raises(CorruptBaselineError, match="UTF-8"):
        load_baseline(path)


def test_history_is_bounded_oldest_dropped(tmp_path) -> None:
    store = BaselineStore(tmp_path, history=10)
    testbed = build_testbed(SERVER)
    for i in range(13):
        run = BaselineRun.from_result(make_result("t::a", seed=i))
        run.name = f"run{i}"
        baseline = store.save("t::a", run, testbed)
    assert [r.name for r in baseline.runs] == [f"run{i}" for i in range(3, 13)]
    assert [r.name for r in store.load("t::a").runs] == [f"run{i}" for i in range(3, 13)]
    store.save("t::a", BaselineRun.from_result(make_result("t::a")), testbed, mode="replace")
    assert len(store.load("t::a").runs) == 1  # update starts a new history


# -- testbeds --------------------------------------------------------------------------------------


def test_server_options_drop_what_changes_between_starts() -> None:
    opts = normalise_server_options(SERVER["command"])
    assert opts == ["python", "-m", "pytest_infmax.sim", "--model", "sim-model", "--decode-step-ms", "8"]
    assert normalise_server_options(["vllm", "serve", "m", "--port=8123", "--tensor-parallel-size", "2"]) == [
        "vllm",
        "serve",
        "m",
        "--tensor-parallel-size",
        "2",
    ]
    other_start = dict(SERVER, command=[c.replace("40123", "5") for c in SERVER["command"]], pid=1, base_url="x")
    assert build_testbed(other_start, GPU) == build_testbed(SERVER, GPU)


def test_testbed_mismatch_is_refused_naming_the_field_and_allowed_with_force(tmp_path) -> None:
    store = BaselineStore(tmp_path)
    key = "t::a"
    store.save(key, BaselineRun.from_result(make_result(key, seed=1)), build_testbed(SERVER, GPU))
    h200 = build_testbed(SERVER, dict(GPU, gpu_model="NVIDIA H200"))
    current = BaselineRun.from_result(make_result(key, seed=2))
    with pytest.raises(BaselineMismatch) as info:
        compare_stored(store, key, current, h200)
    assert info.value.fields == ["gpu_model"]
    assert "gpu_model" in str(info.value) and "H100" in str(info.value) and "H200" in str(info.value)
    assert "force" in str(info.value)
    with pytest.raises(BaselineMismatch, match="gpu_model"):  # appending across testbeds too
        store.save(key, current, h200)
    report = compare_stored(store, key, current, h200, force=True)
    assert report is not None and [d.name for d in report.forced_differences] == ["gpu_model"]
    assert "gpu_model" in report.format_table()
    # other fields are named the same way
    slower = build_testbed(dict(SERVER, command=SERVER["command"][:-1] + ["4"]), GPU)
    with pytest.raises(BaselineMismatch, match="server_options"):
        compare_stored(store, key, current, slower)


def test_workload_mismatch_is_refused(tmp_path) -> None:
    store = BaselineStore(tmp_path)
    store.save("t::a", BaselineRun.from_result(make_result("t::a", concurrency=4)), build_testbed(SERVER))
    other = BaselineRun.from_result(make_result("t::a", concurrency=8))
    with pytest.raises(BaselineMismatch, match="concurrency: baseline 4, current 8"):
        compare_stored(store, "t::a", other, build_testbed(SERVER))


def test_unknown_testbed_field_is_noted_not_refused() -> None:
    baseline = Baseline("t::a", build_testbed(SERVER, GPU), [BaselineRun.from_result(make_result(seed=1))])
    report = compare_baseline(baseline, BaselineRun.from_result(make_result(seed=2)), testbed=build_testbed(SERVER))
    assert set(report.unchecked) == {"driver", "engine_version", "gpu_model"}


def test_repeats_on_one_server_start_merge_into_one_run() -> None:
    a, b = (BaselineRun.from_result(make_result(seed=i)) for i in (1, 2))
    merged = merge_runs([a, b])
    assert merged.samples["tpot"] == a.samples["tpot"] + b.samples["tpot"]
    assert merged.scalars["throughput_per_gpu"] == pytest.approx(
        (a.scalars["throughput_per_gpu"] + b.scalars["throughput_per_gpu"]) / 2
    )
    assert merged.workload == a.workload


def test_result_keys_are_unique_within_a_test() -> None:
    assert result_keys(["t::a", "t::a[c=1]", "t::a", "t::a"]) == ["t::a", "t::a[c=1]", "t::a#2", "t::a#3"]


def test_load_runs_reads_results_files_grouping_repeats(tmp_path) -> None:
    doc = results_document(
        [make_result("t::a", seed=i).to_dict() for i in range(3)] + [make_result("t::b").to_dict()], [SERVER]
    )
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    runs = load_runs(path)
    assert sorted(runs) == ["t::a", "t::b"]
    testbed, a_runs = runs["t::a"]
    assert len(a_runs) == 3 and testbed["engine"] == "sim"


# -- pytest-benchmark ------------------------------------------------------------------------------

BENCHMARK_STATS_KEYS = {
    "min",
    "max",
    "mean",
    "stddev",
    "rounds",
    "median",
    "iqr",
    "q1",
    "q3",
    "iqr_outliers",
    "stddev_outliers",
    "outliers",
    "ld15iqr",
    "hd15iqr",
    "ops",
    "total",
}


def test_benchmark_stats_follow_pytest_benchmark() -> None:
    s = benchmark_stats([4.0, 1.0, 3.0, 2.0])
    assert s["min"] == 1 and s["max"] == 4 and s["rounds"] == 4 and s["mean"] == 2.5 and s["median"] == 2.5
    assert s["stddev"] == pytest.approx(statistics.stdev([1, 2, 3, 4]))  # sample sd
    assert (s["q1"], s["q3"], s["iqr"]) == (1.5, 3.5, 2.0)  # even count: medians of halves
    assert s["ops"] == pytest.approx(4 / 10) and s["total"] == 10
    odd = benchmark_stats([1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 7.0])  # 7 = 4*1 + 3
    assert odd["q1"] == pytest.approx(0.75 * 2 + 0.25 * 3)
    assert odd["q3"] == pytest.approx(0.25 * 5 + 0.75 * 7)
    assert odd["iqr_outliers"] == 1 and odd["outliers"].endswith(";1") and odd["hd15iqr"] == 100.0
    one = benchmark_stats([2.0])
    assert one["stddev"] == 0 and one["q1"] == one["q3"] == 2.0


def test_benchmark_stats_match_pytest_benchmark_itself() -> None:
    stats_mod = pytest.importorskip("pytest_benchmark.stats")
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 7, 8, 9, 10, 80):
        data = list(rng.lognormal(0, 0.3, n))
        ref = stats_mod.Stats()
        for x in data:
            ref.update(x)
        ours = benchmark_stats(data)
        for key in BENCHMARK_STATS_KEYS:
            want = getattr(ref, key)
            assert ours[key] == (want if isinstance(want, str) else pytest.approx(want)), (n, key)


def test_export_benchmark_json_has_pytest_benchmark_layout() -> None:
    result = make_result("t::a")
    doc = export_benchmark_json(
        [result, BaselineRun.from_result(make_result("t::b"))],
        commit_info={"id": "abc", "time": None, "author_time": None, "dirty": False, "project": "p", "branch": "main"},
    )
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= set(doc)
    assert {"node", "machine", "python_version", "system", "cpu"} <= set(doc["machine_info"])
    assert doc["commit_info"]["id"] == "abc"
    json.dumps(doc, allow_nan=False)  # plain JSON numbers
    names = [b["name"] for b in doc["benchmarks"]]
    assert names[:5] == ["t::a::ttft", "t::a::tpot", "t::a::e2e", "t::a::itl", "t::a::throughput_per_gpu"]
    for bench in doc["benchmarks"]:
        assert {"group", "name", "fullname", "params", "param", "extra_info", "options", "stats"} <= set(bench)
        stats = bench["stats"]
        assert BENCHMARK_STATS_KEYS | {"data", "iterations"} <= set(stats)
        for key in BENCHMARK_STATS_KEYS - {"outliers"}:
            assert isinstance(stats[key], (int, float)) and math.isfinite(stats[key]), (bench["name"], key)
        assert stats["rounds"] == len(stats["data"])
    ttft = doc["benchmarks"][0]["stats"]
    expected = sorted(r.ttft for r in result.records if r.ok and not r.warmup)
    assert ttft["rounds"] == 23 and ttft["min"] == pytest.approx(expected[0])
    assert ttft["median"] == pytest.approx(statistics.median(expected))
    tput = doc["benchmarks"][4]
    assert tput["stats"]["ops"] == pytest.approx(result.metrics.throughput_per_gpu)  # ops is tok/s/GPU


def test_export_benchmark_json_reads_back_in_pytest_benchmark(tmp_path) -> None:
    pytest.importorskip("pytest_benchmark.storage.file")
    from pytest_benchmark.stats import normalize_stats

    doc = json.loads(json.dumps(export_benchmark_json([make_result()], commit_info={"id": "x"})))
    for bench in doc["benchmarks"]:
        normalize_stats(bench["stats"])  # what its loader runs on every saved file


def test_commit_info_outside_a_repository_says_unversioned(tmp_path) -> None:
    """commit_info comes from read-only git calls; outside a repository it says unversioned."""
    from pytest_infmax.baselines.benchmark import benchmark_commit_info

    info = benchmark_commit_info(tmp_path)
    assert {"id", "time", "author_time", "dirty", "project", "branch"} <= set(info)
    assert info["id"] == "unversioned" or len(info["id"]) == 40  # tmp may sit inside some repository
    assert not (tmp_path / ".git").exists()

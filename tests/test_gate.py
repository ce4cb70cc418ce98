"""The regression gate as users run it: save, compare, update, corrupt files, exports."""

from __future__ import annotations

import json

import pytest

FAST = "--decode-step-ms 2 --decode-ms-per-seq 0.01"


def _project(pytester: pytest.Pytester, sim_args: str = FAST) -> None:
    pytester.makepyfile(
        test_perf="""
        def test_one(infmax):
            infmax.run("1k1k-mini", concurrency=4, num_requests=24, warmup=4)

        def test_two(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=8, warmup=0)
    """
    )
    pytester.makeini(f"[pytest]\ninfmax_sim_args = {sim_args}\nasyncio_default_fixture_loop_scope = function\n")


def _files(pytester: pytest.Pytester, set_name: str = "default") -> dict[str, dict]:
    folder = pytester.path / ".infmax" / "baselines" / set_name
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


@pytest.mark.slow
def test_missing_baseline_is_recorded_then_compared(pytester: pytest.Pytester) -> None:
    _project(pytester)
    first = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-save", "default", "-k", "one")
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["*infmax baselines*", "ok * no baseline in * yet (recorded, not a failure)*"])
    ((name, doc),) = _files(pytester).items()
    assert "test_one" in name and len(doc["runs"]) == 1
    second = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "one")
    second.assert_outcomes(passed=1)  # one baseline run: unsure at worst, never a false alarm here
    second.stdout.fnmatch_lines(["ok * test_perf.py::test_one: * (1 baseline vs 1 current runs)*"])


@pytest.mark.slow
def test_two_fold_slowdown_fails_with_a_table_and_is_not_saved(pytester: pytest.Pytester) -> None:
    _project(pytester)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-save", "default", "-k", "one").assert_outcomes(
        passed=1
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-k",
        "one",
        "--infmax-autosave",
        f"--infmax-sim-args={FAST} --slowdown 2",  # the treatment: no testbed change, no --infmax-compare-force
    )
    result.assert_outcomes(failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*baseline regression: test_perf.py::test_one: regressed: *p50(tpot) +*",
            "*metric*baseline*current*change*interval*verdict*",
            "*p50(tpot)*REGRESSED*",
            "FAIL test_perf.py::test_one: regressed*",
        ]
    )
    (doc,) = _files(pytester).values()
    assert len(doc["runs"]) == 1  # the regressed run did not join the history


@pytest.mark.slow
def test_testbed_change_is_refused_naming_what_differs(pytester: pytest.Pytester) -> None:
    _project(pytester)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-save", "default", "-k", "one").assert_outcomes(
        passed=1
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-k", "one", f"--infmax-sim-args={FAST} --max-num-seqs 64"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*baseline check failed*different testbed*server_options*--infmax-update*"])
    # an option the project declares as treatment is compared across, not refused
    declared = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-k",
        "one",
        f"--infmax-sim-args={FAST} --max-num-seqs 64",
        "--infmax-treatment-option=max-num-seqs",
    )
    declared.assert_outcomes(passed=1)
    declared.stdout.fnmatch_lines(["ok * test_perf.py::test_one: * (1 baseline vs 1 current runs)*"])


@pytest.mark.slow
def test_corrupt_baseline_is_a_clear_error_and_update_rewrites_only_tests_that_ran(pytester: pytest.Pytester) -> None:
    _project(pytester)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-save", "default").assert_outcomes(passed=2)
    files = _files(pytester)
    one = next(n for n in files if "test_one" in n)
    two = next(n for n in files if "test_two" in n)
    folder = pytester.path / ".infmax" / "baselines" / "default"
    (folder / one).write_text('{"format": "pytest-infmax-baseline/1", "runs": [')  # truncated
    before_two = (folder / two).read_text()
    broken = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "one")
    broken.assert_outcomes(failed=1)
    out = broken.stdout.str()
    assert one in out and "--infmax-update" in out and "Traceback" not in out
    fixed = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "one", "--infmax-update")
    fixed.assert_outcomes(passed=1)
    assert len(json.loads((folder / one).read_text())["runs"]) == 1
    assert (folder / two).read_text() == before_two  # -k: the other test's baseline is untouched


def test_benchmark_json_export(pytester: pytest.Pytester) -> None:
    _project(pytester)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-k", "two", "--infmax-compare", "off", "--infmax-benchmark-json", "bench.json"
    )
    result.assert_outcomes(passed=1)
    doc = json.loads((pytester.path / "bench.json").read_text())
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= set(doc)
    names = {b["name"] for b in doc["benchmarks"]}
    assert any(n.endswith("::ttft") for n in names) and any(n.endswith("::tpot") for n in names)
    stats = doc["benchmarks"][0]["stats"]
    assert {"min", "max", "mean", "stddev", "rounds", "median", "iqr", "q1", "q3", "ops"} <= set(stats)


def test_bad_gate_settings_are_usage_errors(pytester: pytest.Pytester) -> None:
    _project(pytester)
    for args, message in (
        (["--infmax-min-effect", "150%"], "*--infmax-min-effect*between 0 and 100%*"),
        (["--infmax-save", "../x"], "*--infmax-save*plain name*"),
        (["--infmax-gates", "p99(nope)"], "*gates*"),
    ):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, args
        result.stderr.fnmatch_lines([message])


def test_a_compare_set_that_does_not_exist_is_a_usage_error_listing_the_sets(pytester: pytest.Pytester) -> None:
    """Before: --infmax-compare mian compared nothing, said nothing and exited 0, so the gate
    was off without a word. Now a set named on purpose must exist; the default set stays quiet
    where there are no baselines at all (a project that does not use them)."""
    _project(pytester)
    quiet = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "two")
    quiet.assert_outcomes(passed=1)  # no baselines directory, nothing asked: nothing said
    assert "baseline" not in quiet.stdout.str().lower()
    missing = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-compare", "main")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(
        ["*--infmax-compare = 'main': there is no baseline set 'main' in *baselines (it does not exist;"
         " --infmax-save main makes the set)*"]
    )  # fmt: skip
    for name in ("main", "default", "nightly"):
        (pytester.path / ".infmax" / "baselines" / name).mkdir(parents=True)
    typo = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-compare", "mian")
    assert typo.ret == pytest.ExitCode.USAGE_ERROR
    typo.stderr.fnmatch_lines(
        ["*--infmax-compare = 'mian': there is no baseline set 'mian' in *; the sets there: default, main, nightly;"
         " did you mean 'main'?*"]
    )  # fmt: skip
    off = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "two", "--infmax-compare", "off")
    off.assert_outcomes(passed=1)  # off: no comparison, on purpose
    # a new set made by this very run is fine: compared with nothing, then saved
    first = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-k", "two", "--infmax-compare", "pr", "--infmax-autosave"
    )
    first.assert_outcomes(passed=1)
    assert (pytester.path / ".infmax" / "baselines" / "pr").is_dir()


def test_a_baselines_path_that_is_a_file_is_a_usage_error_naming_it(pytester: pytest.Pytester) -> None:
    """Before: compare-only passed silently (nothing compared) and --infmax-save raised a raw
    NotADirectoryError traceback. Now both are a usage error naming the path and the fix."""
    _project(pytester)
    (pytester.path / "baselines.json").write_text("{}")
    for args in ([], ["--infmax-save", "main"], ["--infmax-compare", "main"]):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-baselines", "baselines.json", *args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, args
        result.stderr.fnmatch_lines(
            ["*--infmax-baselines = *baselines.json is a file, not a directory of baseline sets; point"
             " --infmax-baselines at a directory*"]
        )  # fmt: skip
        assert "Traceback" not in result.stderr.str() + result.stdout.str()
    below = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-baselines", "baselines.json/sets", "--infmax-save", "main"
    )
    assert below.ret == pytest.ExitCode.USAGE_ERROR
    below.stderr.fnmatch_lines(["*baselines.json/sets cannot be made: *baselines.json is a file*"])


@pytest.mark.slow
def test_sequential_stops_a_clear_regression_early(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf="""
        def test_seq(infmax):
            infmax.run("1k1k-mini", concurrency=8, num_requests=240, warmup=8)
    """
    )
    pytester.makeini(f"[pytest]\ninfmax_sim_args = {FAST}\nasyncio_default_fixture_loop_scope = function\n")
    saved = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-save", "default")
    saved.assert_outcomes(passed=1)
    slow = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--infmax-sequential",
        "--infmax-compare-force",
        "--infmax-json",
        "r.json",
        f"--infmax-sim-args={FAST} --slowdown 2",
    )
    slow.assert_outcomes(failed=1)  # the gate after the run agrees: regressed
    (result,) = json.loads((pytester.path / "r.json").read_text())["results"]
    seq = result["sequential"]
    assert seq["gate"] == "p50(tpot)" and seq["verdict"] == "regressed" and seq["settled"]
    # Stopped long before the 240-request cap: only requests already in flight finish after the stop.
    assert seq["requests"] < 240 and result["metrics"]["num_requests"] <= seq["requests"] + 8 + 8
    assert result["metrics"]["num_requests"] < 120


def test_sequential_needs_a_per_request_statistic(pytester: pytest.Pytester) -> None:
    _project(pytester)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-sequential", "--infmax-sequential-gate", "throughput_per_gpu"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--infmax-sequential-gate needs a per-request statistic*"])


def test_two_tests_with_the_same_name_never_share_one_history(pytester: pytest.Pytester) -> None:
    # Issue 17: infmax.run(name="shared") in two tests wrote one history, each test then compared
    # with the other's runs. The second test to use a name fails, naming the first; its run is
    # not saved.
    pytester.makepyfile(
        test_perf="""
        def test_a(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=4, warmup=0, name="shared")

        def test_b(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=4, warmup=0, name="shared")
        """
    )
    pytester.makeini(f"[pytest]\ninfmax_sim_args = {FAST}\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-save", "main")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*baseline check failed: shared: test_perf.py::test_a already has the baseline 'shared' in this "
            "session: two tests would share one history*give each its own name= in infmax.run()*"
        ]
    )
    (saved,) = (pytester.path / ".infmax" / "baselines" / "main").glob("*.json")
    assert len(json.loads(saved.read_text())["runs"]) == 1  # test_a's run only

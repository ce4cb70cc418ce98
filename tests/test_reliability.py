"""Reliability: the rows of docs/reliability.md that no other test file backs.

Each test injects one fault the way it happens to users (a pytest session in a
subprocess, or the runner against the simulator) and checks what the user sees,
how long it takes, and what is kept. docs/reliability.md is the index: every row
names its test, here or elsewhere in tests/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pytest_infmax.baselines.store import BaselineRun, BaselineStore, build_testbed
from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.measure.verdicts import SLAFailed
from pytest_infmax.records import ErrorKind
from pytest_infmax.run.runner import Infmax
from pytest_infmax.servers.launch import ServerConfig, running_server

FAST_SIM = "--decode-step-ms 2 --decode-ms-per-seq 0.01"
SMALL = Scenario("reliability", 16, 8)


def _write(pytester: pytest.Pytester, body: str) -> None:
    pytester.makepyfile(test_perf=textwrap.dedent(body))
    pytester.makeini(f"[pytest]\ninfmax_sim_args = {FAST_SIM}\nasyncio_default_fixture_loop_scope = function\n")


# -- error-rate SLAs see injected errors ------------------------------------------------------------


def test_error_rate_sla_sees_injected_500s_and_every_request_has_an_outcome(tmp_path: Path) -> None:
    flags = ("--decode-step-ms", "1", "--fault-status", "500", "--fault-rate", "0.25", "--seed", "1")
    with running_server(ServerConfig(sim_args=flags), tmp_path) as server:
        result = Infmax(server, request_timeout=30).run(SMALL, concurrency=1, num_requests=40, warmup=0)
        with_trace = json.loads(_get(f"{server.base_url}/sim/trace"))["requests"]
    # sent == recorded: one record per request, each either ok or a typed error with a message
    assert len(result.records) == 40 == len(with_trace)
    assert sorted(r.index for r in result.records) == list(range(40))
    failed = [r for r in result.records if not r.ok]
    assert all(r.error_kind is ErrorKind.HTTP and "HTTP 500" in (r.error_message or "") for r in failed)
    assert 0 < len(failed) < 40
    assert len(failed) == sum(1 for t in with_trace if t["fault"])  # the client missed no injected error
    measured = len(failed) / 40
    assert result.metrics.error_rate == pytest.approx(measured)
    (verdict,) = result.evaluate("error_rate < 1%")
    assert not verdict.passed and verdict.measured == pytest.approx(measured) and verdict.count == 40
    with pytest.raises(SLAFailed, match=r"error_rate < 1%.*measured"):
        result.check("error_rate < 1%")


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


# -- the run ends within a bound ---------------------------------------------------------------------


def test_stall_past_the_request_timeout_ends_the_run_in_about_the_timeout(tmp_path: Path) -> None:
    """Every request stalls for a minute; the run must end after about one request_timeout
    (the requests run concurrently), not after the stall."""
    flags = ("--decode-step-ms", "1", "--fault-stall-seconds", "60", "--fault-stall-after", "1")
    with running_server(ServerConfig(sim_args=flags, shutdown_grace=2), tmp_path) as server:
        started = time.monotonic()
        result = Infmax(server, request_timeout=1.0).run(SMALL, concurrency=4, num_requests=4, warmup=0)
        elapsed = time.monotonic() - started
    assert [r.error_kind for r in result.records] == [ErrorKind.TIMEOUT] * 4
    assert all("no complete response within 1 s" in (r.error_message or "") for r in result.records)
    assert all(len(r.chunk_times) == 1 for r in result.records)  # the token before the stall is kept
    assert 1.0 <= elapsed < 4.0, elapsed


# -- results directory not writable ------------------------------------------------------------------


def test_unwritable_results_path_is_a_clear_error_and_outcomes_are_still_reported(
    pytester: pytest.Pytester, no_leaked_servers
) -> None:
    _write(
        pytester,
        """
        def test_ok(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0)

        def test_fails():
            assert False, "the failure the user must still see"
    """,
    )
    (pytester.path / "blocker").write_text("a file, not a directory\n")  # fails for root too
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-json", "blocker/out/r.json")
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "blocker/out" in out  # the error names the path
    assert "Traceback" not in out and "INTERNALERROR" not in out
    result.stdout.fnmatch_lines(["*the failure the user must still see*", "*infmax results*", "*1 failed, 1 passed*"])


def test_one_unwritable_report_is_named_and_every_other_report_is_still_written(
    pytester: pytest.Pytester, no_leaked_servers
) -> None:
    """Issue 15, item 4 (and the red team's finding): a read-only JSON path stopped the HTML and
    the Markdown at writable paths from being written. One writer, one failure behaviour."""
    _write(
        pytester,
        """
        def test_ok(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0)
    """,
    )
    (pytester.path / "blocker").write_text("a file, not a directory\n")
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--infmax-json",
        "blocker/r.json",
        "--infmax-html",
        "out/r.html",
        "--infmax-markdown",
        "out/r.md",
        "--infmax-benchmark-json",
        "out/bench.json",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # results the user asked for are missing
    result.stdout.fnmatch_lines(["*could not write the JSON results *blocker/r.json*"])
    for name in ("r.html", "r.md", "bench.json"):
        assert (pytester.path / "out" / name).stat().st_size > 0, name
    assert "Traceback" not in result.stdout.str()


def test_infmax_report_writes_what_it_can_and_names_what_it_cannot(tmp_path: Path) -> None:
    """The CLI goes through the same writer: the Markdown is written though the HTML cannot be."""
    doc = {"format": "pytest-infmax/1", "environment": {}, "servers": [], "results": []}
    src = tmp_path / "r.json"
    src.write_text(json.dumps(doc))
    (tmp_path / "blocker").write_text("a file\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_infmax.cli",
            "report",
            str(src),
            "-o",
            str(tmp_path / "blocker" / "r.html"),
            "--markdown",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "could not write the HTML report" in proc.stderr and "blocker" in proc.stderr
    assert (tmp_path / "r.md").read_text().startswith("## infmax results")
    assert f"wrote {tmp_path / 'r.md'}" in proc.stdout


# -- two sessions writing baselines at once ---------------------------------------------------------


def test_concurrent_baseline_saves_never_corrupt_the_file(tmp_path: Path) -> None:
    from test_baselines import SERVER, make_result

    key = "tests/test_perf.py::test_x[c=4]"
    store = BaselineStore(tmp_path, history=100)
    testbed = build_testbed(SERVER)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def save(seed: int) -> None:
        try:
            barrier.wait()
            for round_ in range(3):
                BaselineStore(tmp_path, history=100).save(
                    key, BaselineRun.from_result(make_result(key, seed=seed * 10 + round_)), testbed
                )
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # Valid JSON, loadable, no temp file left, and no run lost: save() holds an exclusive
    # lock on the baseline across its read-modify-write.
    json.loads(store.path_for(key).read_text())
    baseline = store.load(key)
    assert baseline is not None
    assert len(baseline.runs) == 24
    name = store.path_for(key).name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f".{name}.lock"])


@pytest.mark.slow
def test_two_sessions_saving_baselines_at_once(pytester: pytest.Pytester, no_leaked_servers) -> None:
    _write(
        pytester,
        """
        def test_one(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0)
    """,
    )
    procs = [
        pytester.popen(
            [*_pytest_argv(), "-p", "no:cacheprovider", "--infmax-save", "main"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    (path,) = (pytester.path / ".infmax" / "baselines" / "main").glob("*.json")
    doc = json.loads(path.read_text())
    # Never a broken file, and both runs kept: the saves take turns on the baseline's lock.
    assert len(doc["runs"]) == 2
    assert not list(path.parent.glob(".*.tmp"))


def _pytest_argv() -> list[str]:
    import sys

    return [sys.executable, "-m", "pytest"]


# -- pytest-xdist worker crash -----------------------------------------------------------------------


@pytest.mark.slow
def test_xdist_worker_crash_is_reported_and_leaves_no_server(pytester: pytest.Pytester, no_leaked_servers) -> None:
    _write(
        pytester,
        """
        import os
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_load(infmax, i):
            assert infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0).metrics.num_ok == 2

        def test_worker_dies(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=1, warmup=0)
            os._exit(1)
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--infmax-json", "x.json", timeout=120)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(["*worker*crashed while running*test_worker_dies*"])
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 4 and outcomes.get("failed") == 1, outcomes
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "INTERNALERROR" not in out
    doc = json.loads((pytester.path / "x.json").read_text())
    names = sorted((r["name"], r.get("unfinished", False)) for r in doc["results"])
    # the crashed test's run is kept from its worker's journal, flagged (tests/test_journal.py)
    assert names == [(f"test_perf.py::test_load[{i}]", False) for i in range(4)] + [
        ("test_perf.py::test_worker_dies", True)
    ]


# -- Ctrl-C during a run: what is kept -----------------------------------------------------------------


def test_ctrl_c_mid_session_keeps_the_results_of_tests_that_finished(
    pytester: pytest.Pytester, no_leaked_servers
) -> None:
    _write(
        pytester,
        """
        import os, signal, threading

        def test_a_first(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0)

        def test_b_interrupted(infmax):
            # Ctrl-C as at a terminal, even where this session inherited SIGINT ignored
            # (a background job of a non-interactive shell, as some CI runners start it).
            signal.signal(signal.SIGINT, signal.default_int_handler)
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            infmax.run("1k1k-mini", concurrency=1, num_requests=500, warmup=0)
    """,
    )
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-json", "r.json", timeout=120)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert time.monotonic() - started < 30  # the interrupted run does not finish its 500 requests
    doc = json.loads((pytester.path / "r.json").read_text())
    first, second = doc["results"]  # the interrupted run is kept too, flagged (tests/test_journal.py)
    assert first["name"] == "test_perf.py::test_a_first" and "interrupted" not in first
    assert second["name"] == "test_perf.py::test_b_interrupted" and second["interrupted"] is True


def test_api_key_appears_in_no_artefact(pytester: pytest.Pytester, no_leaked_servers, monkeypatch) -> None:
    """The key is on the server's command line and in the client's environment; no report,
    log, baseline or terminal line may contain it."""
    key = "sk-live-0123456789abcdef"
    monkeypatch.setenv("INFMAX_API_KEY", key)
    _write(
        pytester,
        """
        def test_secret(infmax, infmax_server):
            infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0, sla=["error_rate < 1%"])
    """,
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-v",
        f"--infmax-sim-args={FAST_SIM} --api-key {key}",
        "--infmax-json",
        "out/r.json",
        "--infmax-html",
        "out/r.html",
        "--infmax-markdown",
        "out/r.md",
        "--infmax-benchmark-json",
        "out/b.json",
        "--infmax-save",
        "main",
        "--junitxml",
        "out/j.xml",
    )
    result.assert_outcomes(passed=1)
    seen = result.stdout.str() + result.stderr.str()
    files = [p for p in pytester.path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in files) and any("baselines" in str(p) for p in files)
    leaks = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert key not in seen and not leaks, leaks
    assert "***" in (pytester.path / "out" / "r.json").read_text()  # the command line shows it redacted


def test_a_baseline_save_on_a_full_disk_is_a_clear_error_and_the_old_file_stands(tmp_path: Path) -> None:
    """Issue 17: a baseline save on a full disk was a raw OSError traceback. A real limit (RLIMIT_FSIZE,
    in a process of its own: writes past it fail with EFBIG, as past the end of a disk) stands in
    for the disk; the save is a BaselineError naming the file and the fix, and the file is unchanged."""
    script = textwrap.dedent(
        f"""
        import resource, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_baselines import SERVER, make_result
        from pytest_infmax.baselines.store import BaselineError, BaselineRun, BaselineStore, build_testbed

        key = "tests/test_perf.py::test_x[c=4]"
        store = BaselineStore({str(tmp_path)!r})
        store.save(key, BaselineRun.from_result(make_result(key, seed=1)), build_testbed(SERVER))
        before = store.path_for(key).read_bytes()
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, resource.RLIM_INFINITY))
        try:
            store.save(key, BaselineRun.from_result(make_result(key, seed=2)), build_testbed(SERVER))
        except BaselineError as exc:
            print("ERROR", exc)
        assert store.path_for(key).read_bytes() == before, "the old baseline was damaged"
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR tests/test_perf.py::test_x[c=4]: not saved to " in proc.stdout, proc.stdout
    assert "File too large; the baseline there is unchanged. Free space or make" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr

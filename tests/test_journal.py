"""Crash-safe results (issue #17, item 3): the results journal and Ctrl-C's interrupted run.

The sessions are real pytest processes, killed with real signals from outside: SIGKILL
(an OOM kill, a CI runner's hard stop) once the first test's result is journaled, or
while a test that ran two loads blocks (in one process and under ``-n 2``), a worker
that kills itself mid-test, and SIGINT (Ctrl-C) once the second test's run is
measuring. docs/reliability.md has a row for each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _sim_helpers import pid_alive

from pytest_infmax.reports.journal import (
    Journal,
    JournalError,
    journal_path,
    json_path_for,
    read_journal,
    shard_path,
    shards,
    stamps_path,
)
from pytest_infmax.reports.rows import result_row
from pytest_infmax.sidecar import load_results

FAST_SIM = "--decode-step-ms 2 --decode-ms-per-seq 0.01"

FIRST_AND_BLOCKING = """
import pathlib, signal, threading, urllib.request, json

def test_a_first(infmax, infmax_server):
    pathlib.Path("server.pid").write_text(str(infmax_server.pid))  # its supervisor's
    infmax.run("1k1k-mini", concurrency=2, num_requests=6, warmup=0)

def test_b_long(infmax, infmax_server):
    # Ctrl-C as at a terminal, even where this session inherited SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def measuring():  # say so once the simulator finished a request of this run
        while True:
            with urllib.request.urlopen(infmax_server.base_url + "/sim/trace", timeout=5) as r:
                if len(json.loads(r.read())["requests"]) > 6:
                    pathlib.Path("measuring").write_text("yes")
                    return
            threading.Event().wait(0.05)

    threading.Thread(target=measuring, daemon=True).start()
    infmax.run("1k1k-mini", concurrency=4, num_requests=100000, warmup=0)  # ended by a signal
"""


def _rebuild(journal: Path) -> subprocess.CompletedProcess[str]:
    """``infmax report --from-journal JOURNAL --markdown``, as a user rebuilds the reports."""
    return subprocess.run(
        [INFMAX, "report", "--from-journal", str(journal), "--markdown"], capture_output=True, text=True, timeout=120
    )


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _journaled(path: Path, kind: str) -> bool:
    """A whole line of ``kind`` is in the journal (one being written is not whole yet)."""
    try:
        lines = path.read_text().split("\n")[:-1]  # whole lines end in a newline
    except FileNotFoundError:
        return False
    return any(json.loads(line)["kind"] == kind for line in lines)


INFMAX = str(Path(sys.executable).with_name("infmax"))  # the command, as installed


@pytest.fixture
def session(pytester: pytest.Pytester, no_leaked_servers: None) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts the two-test session in a real pytest process; kills it and checks no server is left."""
    pytester.makepyfile(test_perf=textwrap.dedent(FIRST_AND_BLOCKING))
    pytester.makeini(f"[pytest]\ninfmax_sim_args = {FAST_SIM}\n")
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
            cwd=pytester.path,
            stdout=open(pytester.path / "out.txt", "wb"),  # noqa: SIM115 - the child holds it
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a signal to it reaches it alone
        )
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        # the server's supervisor takes it down with pytest, even a SIGKILLed one (docs/reliability.md);
        # then no_leaked_servers checks that no simulator is left
        pid_file = pytester.path / "server.pid"
        if pid_file.exists():
            supervisor = int(pid_file.read_text())
            _wait_for("the server's supervisor to exit", lambda: not pid_alive(supervisor), timeout=20)


@pytest.mark.slow
def test_sigkill_loses_only_the_test_in_flight_and_the_journal_rebuilds_the_reports(
    pytester: pytest.Pytester, session: Callable[..., subprocess.Popen[bytes]]
) -> None:
    results = pytester.path / "out" / "r.json"
    journal = journal_path(results)
    proc = session("--infmax-json", str(results))
    _wait_for("the first test's result in the journal", lambda: _journaled(journal, "result"))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not results.exists()  # what a SIGKILL took: --infmax-json is written at the session's end

    rebuilt = _rebuild(journal)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"wrote {results}" in rebuilt.stdout
    doc = json.loads(results.read_text())
    assert doc["format"] == "pytest-infmax/1"
    (first,) = doc["results"]
    assert first["name"] == "test_perf.py::test_a_first"
    assert "interrupted" not in first
    assert len(first["records"]) == 6 and all(r["error_kind"] is None for r in first["records"])
    assert first["metrics"]["num_requests"] == 6 and first["metrics"]["num_ok"] == 6
    assert doc["servers"] == [first["server"]]
    assert doc["environment"]["written_at"]  # the run's environment, from the journal's first line
    assert "test_a_first" in results.with_suffix(".html").read_text()
    assert "test_a_first" in results.with_suffix(".md").read_text()


@pytest.mark.slow
def test_ctrl_c_keeps_the_interrupted_runs_records_flagged(
    pytester: pytest.Pytester, session: Callable[..., subprocess.Popen[bytes]]
) -> None:
    proc = session("--infmax-json", "r.json", "--infmax-markdown", "r.md")
    _wait_for("the second test's run to be measuring", (pytester.path / "measuring").exists)
    interrupted_at = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == pytest.ExitCode.INTERRUPTED
    assert time.monotonic() - interrupted_at < 30  # it does not finish its 100000 requests
    doc = json.loads((pytester.path / "r.json").read_text())
    first, second = doc["results"]
    assert first["name"] == "test_perf.py::test_a_first" and "interrupted" not in first
    assert second["name"] == "test_perf.py::test_b_long"
    assert second["interrupted"] is True
    records = second["records"]
    ok = [r for r in records if r["error_kind"] is None]
    cancelled = [r for r in records if r["error_kind"] == "cancelled"]
    assert len(ok) >= 1  # what it measured before Ctrl-C
    assert 1 <= len(cancelled) <= 4  # the requests in flight (concurrency=4), each recorded
    assert len(ok) + len(cancelled) == len(records)
    assert all(r["error_message"] == "the run was stopped before this request ended" for r in cancelled)
    assert sorted(r["index"] for r in records) == list(range(len(records)))  # none lost in between
    assert second["metrics"]["num_requests"] == len(records)
    assert result_row(second)["reasons"] == ["interrupted"]  # the row says why its figures are partial
    summary = (pytester.path / "r.md").read_text()  # every report is still written
    assert "test_b_long" in summary and "FAIL (interrupted)" in summary
    assert not journal_path(pytester.path / "r.json").exists()  # the JSON holds it all: no journal left


TWO_RUNS_THEN_BLOCKS = """
import os, pathlib, threading

def _pid(infmax_server):  # its supervisor's, one file per process (each xdist worker starts its own)
    pathlib.Path(f"server-{os.getpid()}.pid").write_text(str(infmax_server.pid))

def test_a_done(infmax, infmax_server):
    _pid(infmax_server)
    infmax.run("1k1k-mini", concurrency=2, num_requests=6, warmup=0)

def test_b_two_runs_then_blocks(infmax, infmax_server):
    _pid(infmax_server)
    infmax.run("1k1k-mini", concurrency=1, num_requests=3, warmup=0)
    infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0)
    pathlib.Path("blocked").write_text("yes")
    threading.Event().wait(300)  # until the kill (bounded, should the kill never come)
"""


def _journaled_result_of(path: Path, test: str) -> bool:
    """A whole ``result`` line of ``test`` is in the journal."""
    try:
        lines = path.read_text().split("\n")[:-1]
    except FileNotFoundError:
        return False
    return any((line := json.loads(text))["kind"] == "result" and line.get("test") == test for text in lines)


@pytest.mark.slow
@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["one-process", "xdist-n2"])
def test_sigkill_loses_at_most_the_run_in_flight_and_unfinished_runs_are_flagged(
    pytester: pytest.Pytester, no_leaked_servers: None, xdist: list[str]
) -> None:
    """A test ran two loads and blocks: SIGKILL pytest; the journal holds both runs (fsynced as
    each ended, in the process that ran it) and the test that finished; the reports rebuilt
    from it show the two runs flagged unfinished, never as passed."""
    pytester.makepyfile(test_perf=textwrap.dedent(TWO_RUNS_THEN_BLOCKS))
    pytester.makeini(f"[pytest]\ninfmax_sim_args = {FAST_SIM}\n")
    results = pytester.path / "out" / "r.json"
    journal = journal_path(results)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *xdist, "--infmax-json", str(results)],
        cwd=pytester.path,
        stdout=open(pytester.path / "out.txt", "wb"),  # noqa: SIM115 - the child holds it
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a signal reaches it and its workers alone
    )
    try:
        _wait_for("the second test to block after its two runs", (pytester.path / "blocked").exists, timeout=120)
        _wait_for(
            "the first test's result", lambda: _journaled_result_of(journal, "test_perf.py::test_a_done"), timeout=120
        )
        proc.send_signal(signal.SIGKILL)  # pytest itself (the controller under -n 2)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # xdist workers left behind the killed controller
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        for pid_file in pytester.path.glob("server-*.pid"):  # each server's supervisor takes it down
            supervisor = int(pid_file.read_text())
            _wait_for("a server's supervisor to exit", lambda s=supervisor: not pid_alive(s), timeout=20)
    assert not results.exists()
    if xdist:  # the runs are in the journal of the worker that ran them
        assert [p.name for p in shards(journal)] == ["r.json.journal.gw0", "r.json.journal.gw1"]

    rebuilt = _rebuild(journal)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "2 run(s) of test(s) that never finished" in rebuilt.stderr
    doc = json.loads(results.read_text())
    done, first, second = doc["results"]
    assert done["name"] == "test_perf.py::test_a_done" and "unfinished" not in done
    assert done["metrics"]["num_ok"] == 6 and result_row(done)["verdict"] == "-"
    for run, concurrency, requests in ((first, 1, 3), (second, 2, 4)):
        assert run["name"] == "test_perf.py::test_b_two_runs_then_blocks"
        assert run["unfinished"] is True
        assert run["load"]["concurrency"] == concurrency
        assert len(run["records"]) == requests and all(r["error_kind"] is None for r in run["records"])
        assert run["metrics"]["num_ok"] == requests
        assert result_row(run)["verdict"] == "FAIL" and result_row(run)["reasons"] == ["unfinished"]
    markdown = results.with_suffix(".md").read_text()
    assert markdown.count("FAIL (unfinished)") == 2
    # the per-chunk stamps went to the journals' binary stamps files, and came back into every record
    assert all("chunk_times" not in p.read_text() for p in (journal, *shards(journal)))
    for run in load_results(results)["results"]:
        assert all(len(r["chunk_times"]) == r["output_tokens"] > 0 for r in run["records"])
    assert "test_b_two_runs_then_blocks" in results.with_suffix(".html").read_text()


@pytest.mark.slow
def test_a_crashed_xdist_workers_runs_reach_the_json_flagged_unfinished(
    pytester: pytest.Pytester, no_leaked_servers: None
) -> None:
    """An xdist worker killed mid-test (an OOM kill): pytest-xdist reports the test as crashed
    and the session ends as usual; the run the worker finished first is in the JSON, flagged."""
    pytester.makepyfile(
        test_perf="""
        import os, signal

        def test_crash(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    pytester.makeini(f"[pytest]\ninfmax_sim_args = {FAST_SIM}\n")
    result = pytester.runpytest_subprocess("-n", "1", "--infmax-json", "r.json", "--infmax-markdown", "r.md")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*1 run(s) of tests that never finished (a worker crashed) are kept*"])
    (run,) = json.loads((pytester.path / "r.json").read_text())["results"]
    assert run["name"] == "test_perf.py::test_crash" and run["unfinished"] is True
    assert run["metrics"]["num_ok"] == 4
    assert "FAIL (unfinished)" in (pytester.path / "r.md").read_text()
    assert not journal_path(pytester.path / "r.json").exists() and not shards(journal_path(pytester.path / "r.json"))


# -- the journal file itself ----------------------------------------------------------------------------


def test_journal_lines_are_durable_redacted_and_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    from pytest_infmax.redact import add_secret

    add_secret("sk-journal-secret-123456")
    path = journal_path(tmp_path / "r.json")
    assert path.name == "r.json.journal" and json_path_for(path) == tmp_path / "r.json"
    journal = Journal(path)
    journal.append("result", {"name": "t1", "server": {"cmd": "serve --api-key sk-journal-secret-123456"}})
    journal.append("check", {"message": "ok"})
    # the kill came in the middle of the next line
    with open(path, "a") as f:
        f.write('{"kind": "result", "data": {"name": "t2", "rec')
    assert "sk-journal-secret-123456" not in path.read_text()
    doc, notes = read_journal(path)
    assert [r["name"] for r in doc["results"]] == ["t1"]
    assert doc["checks"] == [{"message": "ok"}]
    assert notes and "cut short" in notes[0]
    journal.close(remove=True)
    assert not path.exists()


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.json.journal"
    path.write_text('{"format": "pytest-infmax/1", "results": []}\n')
    with pytest.raises(JournalError, match="not a results journal"):
        read_journal(path)
    bad = subprocess.run(
        [INFMAX, "report", "--from-journal", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "not a results journal" in bad.stderr
    assert os.listdir(tmp_path) == ["r.json.journal"]  # nothing written


def test_worker_journals_of_the_session_are_merged_and_another_sessions_are_skipped(tmp_path: Path) -> None:
    path = journal_path(tmp_path / "r.json")
    main = Journal(path)
    main.open()
    worker = Journal(shard_path(path, "gw0"), session=main.session, writer="gw0")
    stamped = [{"index": 0, "chunk_times": [0.5, 0.75], "chunk_tokens": [1, 2]}, {"index": 1, "chunk_times": []}]
    worker.append("run", {"name": "a", "started_at": 2.0, "records": stamped}, test="t.py::a")
    worker.append("run", {"name": "c", "started_at": 3.0, "records": stamped}, test="t.py::c")
    worker.append("run", {"name": "b", "started_at": 1.0}, test="t.py::b")
    stale = Journal(shard_path(path, "gw7"), writer="gw7")  # an earlier session's, with more workers
    stale.append("run", {"name": "old"}, test="t.py::old")
    main.append("result", {"name": "a", "passed": True}, test="t.py::a")  # completes a's run
    for j in (main, worker, stale):
        j.close(remove=False)
    doc, notes = read_journal(path)
    assert [(r["name"], r.get("unfinished")) for r in doc["results"]] == [("a", None), ("b", True), ("c", True)]
    assert doc["results"][2]["records"] == [  # the stamps from the binary stamps file beside the worker's journal
        {"index": 0, "chunk_times": [0.5, 0.75], "chunk_tokens": [1, 2]},
        {"index": 1, "chunk_times": [], "chunk_tokens": []},
    ]
    assert "0.75" not in shard_path(path, "gw0").read_text() and stamps_path(shard_path(path, "gw0")).is_file()
    assert shards(path) == [shard_path(path, "gw0"), shard_path(path, "gw7")]  # not the stamps files
    assert doc["results"][0]["passed"] is True  # the controller's complete line, not the run's
    assert any("gw7" in n and "another session" in n for n in notes)


def test_a_result_line_names_the_stamps_its_run_line_wrote_instead_of_a_second_copy(tmp_path: Path) -> None:
    """A test's ``result`` line holds the records its ``run`` line did: their stamps are written
    once and named by both lines; stamps that differ (another run, another test) get a block."""
    import numpy as np

    from pytest_infmax.records import RequestRecord

    def entry(name: str, shift: float, *, arrays: bool) -> dict[str, object]:
        records = [
            RequestRecord(index=i, send_time=0.0, end_time=1.0, chunk_times=[0.1 * k + shift for k in range(50)])
            for i in range(4)
        ]
        for rec in records:
            rec.chunk_tokens = [1] * 50
        return {"name": name, "records": [r.to_dict(arrays=arrays) for r in records]}

    path = journal_path(tmp_path / "r.json")
    journal = Journal(path)
    journal.append("run", entry("a", 0.0, arrays=True), test="t.py::a")
    one_block = stamps_path(path).stat().st_size
    assert one_block == 2 * 4 * 8 + 2 * 200 * 8  # the counts, then 200 stamps and 200 token counts
    journal.append("result", entry("a", 0.0, arrays=False), test="t.py::a")  # the same stamps, as lists
    assert stamps_path(path).stat().st_size == one_block
    journal.append("run", entry("b", 0.5, arrays=True), test="t.py::b")
    journal.append("result", entry("b", 0.25, arrays=True), test="t.py::b")  # not its run's: written
    journal.append("result", entry("a", 0.0, arrays=True), test="t.py::c")  # another test's: written
    assert stamps_path(path).stat().st_size == 4 * one_block
    lines = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert [line["stamps"]["at"] for line in lines] == [0, 0, one_block, 2 * one_block, 3 * one_block]
    doc, notes = read_journal(path)
    assert not notes and [r["name"] for r in doc["results"]] == ["a", "b", "a"]
    for result, shift in zip(doc["results"], (0.0, 0.25, 0.0)):
        for rec in result["records"]:
            assert rec["chunk_times"] == np.round(np.array([0.1 * k + shift for k in range(50)]), 9).tolist()
            assert rec["chunk_tokens"] == [1] * 50
    journal.close(remove=True)

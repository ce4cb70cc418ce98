"""benchmarks/soak.py at a small scale, so the soak benchmark keeps working.

A few seconds at 16 streams with 5 % injected HTTP 500s and a short freeze of the
whole simulator every two seconds, in three back-to-back runs: every criterion
the full soak judges (requests sent == outcomes recorded, injected errors seen,
client memory bounded, no process left) must pass here too.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


def _load_soak():
    spec = importlib.util.spec_from_file_location("infmax_soak_benchmark", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_soak_at_small_scale_passes_every_criterion() -> None:
    soak = _load_soak()
    options = soak.SoakOptions(
        duration=6,
        streams=16,
        segment=2,
        error_rate=0.05,
        stall_every=2,
        stall_seconds=0.3,
        isl=16,
        osl=8,
        decode_step_ms=20,
        request_timeout=10,
        poll_every=1,
        progress_every=0,
    )
    report = soak.soak(options, log=lambda line: None)
    table = report.table()
    assert report.passed, table
    assert report.runs == 3 and len(report.rss_after_runs) == 3
    assert report.recorded == report.server_received == report.client_issued > 50, table
    assert report.stalls >= 2, table  # the server was frozen and the streams survived it
    assert 0 < report.outcomes["http_error"] == report.server_injected, table
    assert report.outcomes["ok"] + report.outcomes["http_error"] == report.recorded, table  # nothing else
    assert report.processes_left == [] and report.server_exit is not None, table
    assert "PASS  requests sent == outcomes recorded" in table


def test_the_report_fails_what_it_should() -> None:
    """The verdicts themselves: a lost outcome, a missed error, memory growth and a leftover process."""
    soak = _load_soak()
    mib = soak.MIB
    report = soak.SoakReport(
        soak.SoakOptions(),
        runs=2,
        client_issued=10,
        server_received=10,
        server_injected=1,
        rss_start=90 * mib,
        rss_warm=100 * mib,
        rss_end=110 * mib,
    )
    report.outcomes.update({"ok": 9, "http_error": 1})
    assert report.passed, report.table()
    report.server_received = 11  # the server saw a request the client has no outcome for
    report.outcomes["http_error"] = 0  # and the client missed the injected error
    report.rss_end = 200 * mib  # and grew by 100 MiB after the first run
    report.processes_left = ["child 4242"]
    verdicts = [ok for ok, _ in report.criteria()]
    assert verdicts == [False, False, False, False]
    assert report.table().count("FAIL  ") == 4


def test_the_leftover_check_counts_what_the_soak_started_not_what_an_older_child_forks() -> None:
    """A server an earlier test started (the session's PostgreSQL) forks workers of its own
    while the soak runs: they are not the soak's leftovers. A process the soak started, or one
    of its children, is. (CI saw an autovacuum worker reported as "child N".)"""
    soak = _load_soak()
    # an older child that forks a grandchild when told, and reports its pid
    forker_code = (
        "import os, subprocess, sys\n"
        "sys.stdin.readline()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE)\n"
        "print(child.pid, flush=True)\n"
        "sys.stdin.readline()\n"
        "child.stdin.close(); child.wait()\n"
    )
    older = subprocess.Popen(
        [sys.executable, "-c", forker_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    ours: subprocess.Popen[str] | None = None
    try:
        before = set(soak.descendants(os.getpid()))
        assert older.stdin is not None and older.stdout is not None
        older.stdin.write("fork\n")
        older.stdin.flush()
        grandchild = int(older.stdout.readline())
        ours = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, text=True
        )
        started = soak._started_by_us(before)
        assert grandchild not in started
        assert ours.pid in started
    finally:
        if ours is not None:
            assert ours.stdin is not None
            ours.stdin.close()
            ours.wait(timeout=30)
        assert older.stdin is not None
        older.stdin.write("done\n")
        older.stdin.close()
        older.wait(timeout=30)

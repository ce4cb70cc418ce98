"""A perf session parks idle OpenBLAS threads (OPENBLAS_THREAD_TIMEOUT=4) in itself, the
simulator and the load workers, unless the user set it, so numpy's BLAS threads do not spin
on the cores the server under test needs (pytest_infmax/lazy.py, quiet_blas_threads; what
the spin costs is measured in docs/load-generator.md)."""

from __future__ import annotations

import re
import sys

import pytest

from pytest_infmax.lazy import BLAS_SPIN_ENV, quiet_blas_threads

# The test body reads its own environment and the simulator's (the supervisor's child whose
# command line runs pytest_infmax.sim), and says what it found.
PERF_TEST = """
import os
from pathlib import Path


def _environ(pid):
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\\0")
    return dict(p.decode().split("=", 1) for p in pairs if b"=" in p)


def _descendants(pid):
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in map(int, children):
        yield child
        yield from _descendants(child)


def test_one(infmax, infmax_server):
    infmax.run("1k1k-mini", concurrency=1, num_requests=1, warmup=0)
    (sim,) = [
        pid for pid in _descendants(infmax_server.process.pid)
        if b"pytest_infmax.sim" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    print("HERE", os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
    print("SIM", _environ(sim).get("OPENBLAS_THREAD_TIMEOUT"))
"""


def _found(pytester: pytest.Pytester) -> tuple[str, str]:
    """Runs PERF_TEST in a session of its own; the setting it found here and in the simulator."""
    pytester.makepyfile(test_perf=PERF_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    here, sim = re.search(r"HERE (\S+)", out), re.search(r"SIM (\S+)", out)
    assert here and sim, out
    return here[1], sim[1]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_perf_session_parks_blas_threads_in_itself_and_the_simulator(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(BLAS_SPIN_ENV, raising=False)
    assert _found(pytester) == ("4", "4")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_the_users_own_blas_setting_is_kept(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BLAS_SPIN_ENV, "20")
    assert _found(pytester) == ("20", "20")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_session_that_loaded_numpy_first_is_left_as_it_is_but_the_simulator_is_not(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenBLAS reads its setting when numpy loads it: once the user's conftest imported numpy,
    setting it in this process would say something untrue, so it is not set; the simulator,
    a process of its own, still gets it."""
    monkeypatch.delenv(BLAS_SPIN_ENV, raising=False)
    pytester.makeconftest("import numpy\n")
    assert _found(pytester) == ("None", "4")


def test_a_childs_environment_gets_the_setting_unless_it_has_one() -> None:
    env: dict[str, str] = {}
    quiet_blas_threads(env)
    assert env == {BLAS_SPIN_ENV: "4"}
    mine = {BLAS_SPIN_ENV: "0"}
    quiet_blas_threads(mine)
    assert mine == {BLAS_SPIN_ENV: "0"}

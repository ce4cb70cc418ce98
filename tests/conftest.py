"""Fixtures shared by the tests that run the plugin in a subprocess (pytester)."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Imported before any test: pytester's in-process runs (runpytest, inline_run) put sys.modules
# back as it was after each run, and numpy's C extension cannot be loaded twice in a process.
# The plugin imports numpy at first use (docs/performance.md), so a first import inside an
# in-process run was undone, and the next test that needed numpy in that xdist worker failed
# with "cannot load module more than once per process" (tests/test_journal.py alone, -n 2).
import numpy  # noqa: F401
import pytest
from _hostile_client import HostileClient, hostile_server_port
from _postgres import Postgres, PostgresUnavailable, check_available, running_postgres


def sim_pids_under(path: str) -> list[int]:
    """Simulator processes whose working directory or arguments are under ``path``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if "pytest_infmax.sim" in cmd and (path in cmd or cwd.startswith(path)):
            pids.append(int(entry))
    return sorted(pids)


@pytest.fixture
def no_leaked_servers(pytester: pytest.Pytester):
    """After each test, no simulator started by the inner session may survive.

    Inner sessions run in ``pytester.path``, so their servers have it as their
    working directory (or in their arguments); other tests' servers do not.
    """
    yield
    leaked = sim_pids_under(str(pytester.path))
    assert not leaked, f"simulator processes left running: {leaked}"


@pytest.fixture
def hostile_server() -> Iterator[HostileClient]:
    """A scripted hostile HTTP server (tests/_hostile_server.py) in a subprocess, for one test."""
    with hostile_server_port() as port:
        yield HostileClient(port)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL server for this session (tests/_postgres.py): started once, always stopped;
    the tests that use it are skipped, with the reason, where the binaries are missing."""
    try:
        check_available()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL server to test against: {exc}")
    with running_postgres() as server:
        yield server

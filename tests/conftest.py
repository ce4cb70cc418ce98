"""Fixtures shared by the tests that run the plugin in a subprocess (pytester)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _hostile_client import HostileClient


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


HOSTILE_SERVER = Path(__file__).with_name("_hostile_server.py")


@pytest.fixture
def hostile_server() -> Iterator[HostileClient]:
    """A scripted hostile HTTP server (tests/_hostile_server.py) in a subprocess, for one test."""
    proc = subprocess.Popen([sys.executable, str(HOSTILE_SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the hostile server did not print its port within 30 s"
        line = proc.stdout.readline().decode()
        assert line.startswith("PORT "), f"unexpected first line from the hostile server: {line!r}"
        yield HostileClient(int(line.split()[1]))
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the server exits when its stdin closes
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

"""Fixtures shared by the tests that run the plugin in a subprocess (pytester)."""

from __future__ import annotations

import os

import pytest


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

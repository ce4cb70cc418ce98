"""Pinning a server and everything it started to CPUs, for the benchmarks that keep it off the
client's core.

``os.sched_setaffinity(pid, ...)`` sets one thread's CPUs: the process's main thread, not
its other threads and not its children. The project's launcher starts the simulator under a
supervisor (``pytest_infmax/servers/supervisor.py``), so the launcher's pid is the
supervisor's: pinning it alone left the simulator where it was, and a benchmark that then
pinned itself to the other CPUs had every later simulator, started from it, inherit the
client's CPU (timing_truth.py until 2026-12-07; docs/load-generator.md says which figures).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_infmax.servers.processes import descendants  # noqa: E402


def pin_tree(root: int, cpus: set[int]) -> list[int]:
    """Pin every thread of ``root`` and of each of its live descendants to ``cpus``; the
    thread ids pinned. A thread or process that ended meanwhile is skipped."""
    pinned = []
    for pid in [root, *descendants(root)]:
        try:
            threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
        except OSError:  # ended
            continue
        for tid in threads:
            try:
                os.sched_setaffinity(tid, cpus)
            except (ProcessLookupError, FileNotFoundError):
                continue
            pinned.append(tid)
    return pinned


def affinities(root: int) -> dict[int, set[int]]:
    """Every thread of ``root`` and its descendants -> the CPUs it may run on."""
    found = {}
    for pid in [root, *descendants(root)]:
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                found[int(tid)] = os.sched_getaffinity(int(tid))
            except OSError:
                continue
    return found

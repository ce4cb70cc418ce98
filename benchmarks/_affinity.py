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

from pytest_infmax.servers.processes import descendants


def _threads(root: int) -> list[int]:
    """The thread ids of ``root`` and of each of its live descendants."""
    found = []
    for pid in [root, *descendants(root)]:
        try:
            found += [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
        except OSError:  # ended
            continue
    return found


def pin_tree(root: int, cpus: set[int]) -> list[int]:
    """Pin every thread of ``root`` and of each of its live descendants to ``cpus``; the
    thread ids pinned. A thread that ended meanwhile is skipped."""
    pinned = []
    for tid in _threads(root):
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # ended (any other refusal is raised: a pin must not fail silently)
            continue
        pinned.append(tid)
    return pinned


def affinities(root: int) -> dict[int, set[int]]:
    """Every thread of ``root`` and its descendants -> the CPUs it may run on."""
    found = {}
    for tid in _threads(root):
        try:
            found[tid] = os.sched_getaffinity(tid)
        except ProcessLookupError:  # ended
            continue
    return found

"""benchmarks/_affinity.py: a server pinned with everything it started, not just its launcher's pid.

The launcher's pid is the supervisor's (pytest_infmax/servers/supervisor.py), the simulator
its child: ``os.sched_setaffinity`` on that pid alone left the simulator on every CPU, and
timing_truth.py's later simulators on the client's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_infmax.servers.launch import ServerConfig, running_server

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to pin to one"
)


def test_the_launched_simulator_and_its_threads_go_where_the_server_is_pinned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # a benchmark's helper module, not the package's
    from _affinity import affinities, pin_tree

    first = min(os.sched_getaffinity(0))
    with running_server(ServerConfig(), tmp_path) as server:
        assert server.process is not None
        supervisor = server.process.pid
        os.sched_setaffinity(supervisor, {first})  # what the benchmark did: the simulator stays put
        assert any(cpus != {first} for tid, cpus in affinities(supervisor).items() if tid != supervisor)
        pinned = pin_tree(supervisor, {first})
        threads = affinities(supervisor)
        assert len(threads) >= 2 and set(pinned) >= set(threads)  # the supervisor and the simulator, at least
        assert all(cpus == {first} for cpus in threads.values()), threads

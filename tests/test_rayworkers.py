"""Load workers as Ray actors (``LoadConfig(ray=ADDRESS)``), on a real local multi-node Ray cluster.

The cluster is Ray's own ``ray.cluster_utils.Cluster``: a head and two more nodes of one CPU
each, so that each of three actors runs on a node of its own, against the embedded simulator
over loopback. Starting the cluster costs 10-15 s on two busy cores, so the module shares one
(tests/docs_support.py keeps the module on one xdist worker) and its tests are few.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from pytest_infmax.load.generator import LoadGenerator
from pytest_infmax.load.plan import LoadConfig, LoadConfigError, RunRecords
from pytest_infmax.load.rayworkers import WorkerLost
from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.load.workloads import Sessions
from pytest_infmax.records import ErrorKind, RequestRecord
from pytest_infmax.servers.launch import Server, ServerConfig, running_server

ray_cluster_utils = pytest.importorskip(
    "ray.cluster_utils", reason="Ray is not installed here (pip install -e '.[ray]')"
)

SCENARIO = Scenario("tiny", 32, 16)
NODES = 3  # the head and two more, one CPU each: one actor per node


def _ray_processes(gcs_address: str) -> list[psutil.Process]:
    """The cluster's processes: this process's children, and any that left them naming the
    cluster's GCS (Ray 2.40's node agents outlived ``Cluster.shutdown``, reparented to init)."""
    children = set(psutil.Process().children(recursive=True))
    found = []
    for p in psutil.process_iter():
        try:
            line = " ".join(p.cmdline())
        except psutil.Error:
            continue
        ours = p in children and ("/ray/" in line or line.startswith("ray::"))
        if ours or f"--gcs-address={gcs_address}" in line:
            found.append(p)
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A local Ray cluster of NODES nodes; torn down, every process of it gone, even when a test fails."""
    # a node's death is seen within a second (Ray's defaults: 3 s x 5 failed checks)
    fast_health = {"health_check_period_ms": 200, "health_check_failure_threshold": 3}
    for attempt in (1, 2):
        c = ray_cluster_utils.Cluster()
        try:
            c.add_node(num_cpus=1, include_dashboard=False, _system_config=fast_health)  # the head
            for _ in range(NODES - 1):
                c.add_node(num_cpus=1, include_dashboard=False)
            c.wait_for_nodes()
            break
        except Exception as exc:
            # Ray gives a node 30 s (hard-coded in ray/_private/node.py) to register with its GCS;
            # on an overloaded 2-core host a fresh-clone run once missed it. Once more, then fail.
            _shut_down(c)
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            warnings.warn(f"Ray's cluster did not start ({exc}); starting it once more", stacklevel=1)
    try:
        yield c
    finally:
        _shut_down(c)


def _shut_down(c: Any) -> None:
    """Shut the cluster down and make sure every process of it is gone."""
    c.shutdown()
    _, alive = psutil.wait_procs(_ray_processes(c.address), timeout=30)
    for p in alive:
        p.kill()
    assert not alive, f"Ray processes outlived the cluster's shutdown: {[p.cmdline()[:2] for p in alive]}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(ServerConfig(sim_args=("--decode-step-ms", "2")), tmp_path_factory.mktemp("ray")) as s:
        yield s


def _run(server: Server, config: LoadConfig, on_record: Any = None) -> RunRecords:
    return asyncio.run(LoadGenerator(server.base_url, server.model).run(config, on_record=on_record))


def _sim_trace(server: Server, clear: bool = False) -> dict[str, Any]:
    url = f"{server.base_url}/sim/trace{'?clear=1' if clear else ''}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def _content(run: RunRecords) -> list[tuple[int, bool, int, int]]:
    return [(r.index, r.warmup, r.requested_input_tokens, r.requested_output_tokens) for r in run.records]


@pytest.mark.slow
def test_closed_loop_on_ray_sends_the_single_process_requests_from_one_start(cluster: Any, server: Server) -> None:
    base = dict(scenario=SCENARIO, concurrency=3, num_requests=30, warmup=3, seed=7)
    one = _run(server, LoadConfig(**base))  # type: ignore[arg-type]
    handed: list[tuple[RequestRecord, float]] = []
    three = _run(
        server,
        LoadConfig(**base, workers=3, ray=cluster.address),  # type: ignore[arg-type]
        lambda r: handed.append((r, time.perf_counter())),
    )
    returned = time.perf_counter()
    # every request index once, the same requests (content depends on seed and index only) as one process
    assert [r.index for r in three.records] == list(range(33))
    assert all(r.ok for r in three.records)
    assert _content(three) == _content(one)
    assert three.client is not None and three.client.workers == 3 and three.client.cpu_seconds > 0
    # the stamps came back onto this process's clock: each measured request inside the measured
    # phase, and no record ended after this process was handed it
    measured = [r for r in three.records if not r.warmup]
    assert min(r.send_time for r in measured) >= three.measured_start
    assert max(r.end_time for r in measured) <= three.measured_end <= returned  # type: ignore[type-var]
    assert all(r.end_time is not None and r.end_time <= seen for r, seen in handed)
    assert sorted(r.index for r, _ in handed) == list(range(33))
    # one common start: each actor's first measured request went out at it, within a few ms
    firsts = sorted(r.send_time - three.measured_start for r in measured)[:3]
    assert firsts[-1] < 0.05, firsts


@pytest.mark.slow
def test_open_loop_on_ray_keeps_the_single_process_schedule(cluster: Any, server: Server) -> None:
    base = dict(scenario=SCENARIO, rate=40.0, num_requests=24, warmup=0, seed=3)
    one = _run(server, LoadConfig(**base))  # type: ignore[arg-type]
    _sim_trace(server, clear=True)
    three = _run(server, LoadConfig(**base, workers=3, ray=cluster.address))  # type: ignore[arg-type]
    assert [r.index for r in three.records] == list(range(24)) and all(r.ok for r in three.records)
    intended_one = [r.scheduled_time - one.measured_start for r in one.records]  # type: ignore[operator]
    intended_ray = [r.scheduled_time - three.measured_start for r in three.records]  # type: ignore[operator]
    assert intended_ray == pytest.approx(intended_one, abs=1e-3)  # the acceptance: within 1 ms
    assert _content(three) == _content(one)
    # every actor sent its arrivals on time from its own reading of the common start ...
    assert all(r.send_lag is not None and r.send_lag < 0.05 for r in three.records)
    # ... and that reading is the driver's: the server's arrival stamps (CLOCK_MONOTONIC, the
    # clock perf_counter reads here) follow the merged send times by transit time only. An
    # actor that started off the common instant would show as arrivals before their sends
    # (it started early) or long after (late). Arrivals are 25 ms apart: order matches them.
    arrivals = sorted(t["arrival_mono"] for t in _sim_trace(server)["requests"])
    sends = sorted(r.send_time for r in three.records)
    transit = [a - s for a, s in zip(arrivals, sends)]
    assert len(arrivals) == 24 and min(transit) > -0.0005 and sorted(transit)[12] < 0.002, transit


@pytest.mark.slow
def test_stop_halts_every_actor_and_keeps_what_they_measured(cluster: Any, server: Server) -> None:
    """``stop`` (a dead server, seen by the runner's ServerWatch) reaches every actor: no new
    request starts, and the run ends with what they measured, as over worker processes."""
    seen: list[RequestRecord] = []
    gen = LoadGenerator(server.base_url, server.model)
    start = time.monotonic()
    run = asyncio.run(
        gen.run(
            LoadConfig(SCENARIO, concurrency=3, duration=120, warmup=0, workers=3, ray=cluster.address),
            on_record=seen.append,
            stop=lambda: len(seen) >= 9,
        )
    )
    assert time.monotonic() - start < 60  # not the 120 s asked for
    assert len(run.records) >= 9 and len(run.records) < 600
    assert {r.error_kind for r in run.records} <= {None, ErrorKind.CANCELLED}
    assert run.client is not None and run.client.workers == 3


def test_ray_runs_independent_requests_only() -> None:
    with pytest.raises(LoadConfigError, match="give workers=1 and no ray="):
        LoadConfig(SCENARIO, concurrency=2, workload=Sessions(turns=2), ray="auto")
    with pytest.raises(LoadConfigError, match="ray must be a non-empty string"):
        LoadConfig(SCENARIO, concurrency=2, ray="")


@pytest.mark.slow
def test_the_plugin_setting_runs_the_workers_on_ray(
    cluster: Any, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_r="""
        from pytest_infmax import Scenario

        def test_r(infmax):
            infmax.run(Scenario("tiny", 16, 8), concurrency=4, num_requests=8, warmup=0)
    """
    )
    pytester.makeini("[pytest]\ninfmax_sim_args = --decode-step-ms 1\n")
    monkeypatch.setenv("INFMAX_RAY", cluster.address)  # the setting's env spelling; --infmax-ray is the flag
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-workers", "2", "--infmax-json", "out.json"
    )
    result.assert_outcomes(passed=1)
    (run,) = json.loads((pytester.path / "out.json").read_text())["results"]
    assert run["client"]["workers"] == 2 and run["metrics"]["num_ok"] == 8
    bad = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-sequential")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--infmax-sequential*needs one local load process*INFMAX_RAY = *"])


def test_a_wrong_address_fails_at_once_naming_it(pytester: pytest.Pytester) -> None:
    """A Ray address where nothing listens: the test fails within seconds, naming the address,
    not after Ray's own two-minute wait for a GCS that never answers."""
    with socket.socket() as sock:  # a port nothing listens on: bound, then closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pytester.makepyfile(
        test_r="""
        from pytest_infmax import Scenario

        def test_r(infmax):
            infmax.run(Scenario("tiny", 16, 8), concurrency=2, num_requests=4, warmup=0)
    """
    )
    start = time.monotonic()
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-workers", "2", "--infmax-ray", f"127.0.0.1:{port}"
    )
    assert time.monotonic() - start < 60  # start-up and the simulator included; Ray's own wait was > 120 s
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [f"*could not connect to the Ray cluster at '127.0.0.1:{port}'*refused*ray start --head*"]
    )


# last in the module: it takes a node out of the shared cluster
@pytest.mark.slow
def test_a_node_lost_mid_run_stops_the_run_and_keeps_what_was_measured(cluster: Any, server: Server) -> None:
    victim = cluster.list_all_nodes()[-1]  # not the head
    assert not victim.head
    removed: list[float] = []

    def remove_a_node(rec: RequestRecord) -> None:
        if not rec.warmup and not removed:
            removed.append(time.perf_counter())
            cluster.remove_node(victim, allow_graceful=False)

    config = LoadConfig(SCENARIO, concurrency=3, num_requests=6000, warmup=3, workers=3, ray=cluster.address)
    started = time.perf_counter()
    with pytest.raises(WorkerLost) as lost:
        _run(server, config, remove_a_node)
    assert removed
    assert time.perf_counter() - removed[0] < 30, "the loss was not seen in time"
    message = str(lost.value)
    assert "of 3 (Ray actor " in message and f"on node {victim.node_id[:12]}" in message, message
    assert "was lost mid-run" in message and "WorkerLost.records" in message
    kept = lost.value.records
    indices = [r.index for r in kept]
    assert len(kept) >= 4 and indices == sorted(set(indices)), "each record once"
    assert all(r.send_time >= started for r in kept)
    # far fewer than planned: the run stopped rather than ran on short of a shard
    assert len(kept) < 6003


def _sim_stats(server: Server) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.base_url}/sim/stats", timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


# after the test above (it takes another node out of the shared cluster)
@pytest.mark.slow
def test_a_node_lost_under_the_plugin_fails_the_test_and_reports_what_was_measured(
    cluster: Any, server: Server, pytester: pytest.Pytester
) -> None:
    """The run's records up to the loss reach --infmax-json and the table, flagged, and the
    test fails naming the lost worker: nothing measured is lost with the node."""
    nodes = cluster.list_all_nodes()
    victim = next(node for node in reversed(nodes) if not node.head)
    workers = len(nodes)  # one actor on every node (one CPU each), so the victim runs one
    pytester.makepyfile(
        test_lost="""
        from pytest_infmax import Scenario

        def test_lost(infmax):
            infmax.run(Scenario("tiny", 32, 16), concurrency=3, num_requests=20000, warmup=3)
    """
    )
    env = {**os.environ, "INFMAX_RAY": cluster.address}
    before = _sim_stats(server)["requests_finished"]
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--infmax-endpoint", server.base_url]
    cmd += ["--infmax-workers", str(workers), "--infmax-json", "out.json", "--infmax-markdown", "out.md"]
    with subprocess.Popen(cmd, cwd=pytester.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        try:
            deadline = time.monotonic() + 120
            # the measured phase is under way: some requests past the warm-up have finished
            while _sim_stats(server)["requests_finished"] < before + 40:
                assert proc.poll() is None and time.monotonic() < deadline, "the run never got going"
                time.sleep(0.05)
            cluster.remove_node(victim, allow_graceful=False)
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = out.decode(errors="replace")
    assert proc.returncode == 1, text
    assert "was lost mid-run" in text and f"on node {victim.node_id[:12]}" in text, text
    assert "FAIL (worker lost)" in text, text
    (run,) = json.loads((pytester.path / "out.json").read_text())["results"]
    assert "was lost mid-run" in run["worker_lost"]
    # the part before the loss: 37 or more measured requests had finished when the node went, and
    # the surviving actors' share of them (half, with two workers) is kept; only the lost actor's
    # records not yet fetched (fetched every 0.25 s) die with it
    assert run["metrics"]["num_ok"] >= 15 and run["metrics"]["num_requests"] < 20000, run["metrics"]
    assert "FAIL (worker lost)" in (pytester.path / "out.md").read_text()

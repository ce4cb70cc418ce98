"""workers=N: the load spread over processes, records merged, processes always ended.

Against the real simulator over loopback; the workers are real subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from pytest_infmax.load.generator import LoadGenerator, arrival_offsets
from pytest_infmax.load.plan import LoadConfig, LoadConfigError, RunRecords
from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.load.workers import WorkerError, share
from pytest_infmax.records import ErrorKind, RequestRecord
from pytest_infmax.servers.launch import Server, ServerConfig, running_server

SCENARIO = Scenario("tiny", 32, 16)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(ServerConfig(sim_args=("--decode-step-ms", "2")), tmp_path_factory.mktemp("workers")) as s:
        yield s


def _workers_alive() -> list[psutil.Process]:
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            line = " ".join(p.cmdline())
        except psutil.Error:
            # gone, or a zombie (dead, not yet reaped): not alive, whatever it was. A zombie child
            # of another test's (a Ray node's that timed out starting) made cmdline() raise here.
            continue
        if "pytest_infmax.load.worker_main" in line:
            alive.append(p)
    return alive


def _run(server: Server, config: LoadConfig, on_record=None) -> RunRecords:
    return asyncio.run(LoadGenerator(server.base_url, server.model).run(config, on_record=on_record))


def test_share_splits_evenly() -> None:
    assert [share(10, k, 3) for k in range(3)] == [4, 3, 3]
    assert sum(share(257, k, 4) for k in range(4)) == 257


def test_closed_loop_over_two_workers_sends_the_same_requests(server: Server) -> None:
    one = _run(server, LoadConfig(SCENARIO, concurrency=4, num_requests=16, warmup=4, seed=7))
    two = _run(server, LoadConfig(SCENARIO, concurrency=4, num_requests=16, warmup=4, seed=7, workers=2))
    assert all(r.ok for r in two.records)
    assert [r.index for r in two.records] == list(range(20))
    assert sum(r.warmup for r in two.records) == 4
    # request content depends only on (seed, index): the same requests as one process sends
    assert [(r.requested_input_tokens, r.requested_output_tokens) for r in two.records] == [
        (r.requested_input_tokens, r.requested_output_tokens) for r in one.records
    ]
    assert two.client is not None and two.client.workers == 2
    d = two.client.to_dict()
    assert d["workers"] == 2 and d["send_lag"]["n"] == 16 and d["loop_lag"]["n"] > 0
    measured = [r for r in two.records if not r.warmup]
    assert min(r.send_time for r in measured) >= two.measured_start
    assert max(r.end_time for r in measured) <= two.measured_end  # type: ignore[type-var]
    assert not _workers_alive()


def test_open_loop_over_three_workers_keeps_the_single_process_schedule(server: Server) -> None:
    config = LoadConfig(SCENARIO, rate=40.0, num_requests=12, warmup=0, seed=3, workers=3)
    run = _run(server, config)
    assert all(r.ok for r in run.records) and len(run.records) == 12
    expected = arrival_offsets(12, 40.0, 1.0, np.random.default_rng([3, 0x0A77]))
    got = [r.scheduled_time - run.measured_start for r in run.records]  # type: ignore[operator]
    assert got == pytest.approx(list(expected), abs=1e-9)
    # every worker sends its arrivals on time: the client is not the bottleneck here
    assert all(r.send_lag is not None and r.send_lag < 0.05 for r in run.records)


def test_on_record_sees_every_record_as_workers_report_them(server: Server) -> None:
    seen: list[RequestRecord] = []
    run = _run(server, LoadConfig(SCENARIO, concurrency=2, num_requests=6, warmup=2, workers=2), seen.append)
    assert sorted(r.index for r in seen) == [r.index for r in run.records]


def test_the_runs_cpu_counts_the_coordinating_process_with_its_workers(server: Server) -> None:
    """The parent reads and decodes every record while the workers run: its CPU is the load's
    too. Each measured record here costs the parent 50 ms of CPU (in ``on_record``)."""
    burnt = 0.0

    def costly(record: RequestRecord) -> None:
        nonlocal burnt
        if not record.warmup:
            start = time.process_time()
            while time.process_time() - start < 0.05:
                pass
            burnt += time.process_time() - start

    run = _run(server, LoadConfig(SCENARIO, concurrency=2, num_requests=8, warmup=2, workers=2), costly)
    assert run.client is not None and burnt >= 0.4
    assert run.client.cpu_seconds >= burnt  # the workers' own CPU on top


def test_a_worker_that_dies_fails_the_run_and_the_others_are_ended(server: Server) -> None:
    killed: list[int] = []

    def kill_one(rec: RequestRecord) -> None:
        if not killed:
            victim = _workers_alive()[0]
            killed.append(victim.pid)
            victim.send_signal(signal.SIGKILL)

    config = LoadConfig(SCENARIO, concurrency=2, num_requests=400, warmup=2, workers=2)
    with pytest.raises(WorkerError, match=r"load worker \d of 2 exited with status -9"):
        _run(server, config, kill_one)
    assert killed and not _workers_alive()


def test_cancelling_the_run_ends_every_worker(server: Server) -> None:
    async def go() -> None:
        started = asyncio.Event()
        gen = LoadGenerator(server.base_url, server.model)
        task = asyncio.ensure_future(
            gen.run(
                LoadConfig(SCENARIO, concurrency=2, num_requests=10_000, warmup=0, workers=2),
                on_record=lambda r: started.set(),
            )
        )
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert not _workers_alive()


def test_bad_worker_counts_are_refused_up_front() -> None:
    with pytest.raises(LoadConfigError, match="workers must be a whole number >= 1"):
        LoadConfig(SCENARIO, concurrency=2, workers=0)
    with pytest.raises(LoadConfigError, match="workers=4 is more than the 2 concurrent streams"):
        LoadConfig(SCENARIO, concurrency=2, workers=4)


def test_stop_ends_every_worker_early_and_keeps_what_they_measured(server: Server) -> None:
    """``stop`` (a dead server, seen by the runner's ServerWatch) reaches every worker
    process: no new request starts, and the run ends with what they measured."""
    seen: list[RequestRecord] = []
    gen = LoadGenerator(server.base_url, server.model)
    start = time.monotonic()
    run = asyncio.run(
        gen.run(
            LoadConfig(SCENARIO, concurrency=4, duration=120, warmup=0, workers=2),
            on_record=seen.append,
            stop=lambda: len(seen) >= 8,
        )
    )
    assert time.monotonic() - start < 30  # not the 120 s asked for
    assert len(run.records) >= 8 and run.records == sorted(seen, key=lambda r: r.index)
    assert len(run.records) < 400  # what the workers sent before they were told, not 120 s of it
    assert {r.error_kind for r in run.records} <= {None, ErrorKind.CANCELLED}
    assert not _workers_alive()


def test_a_stop_asked_during_warm_up_waits_for_the_common_start(server: Server) -> None:
    """A stop that holds from the first warm-up record (a server already dead) reaches the
    workers after the common start, not before it, where a worker would read it as the start."""
    start = time.monotonic()
    run = asyncio.run(
        LoadGenerator(server.base_url, server.model).run(
            LoadConfig(SCENARIO, concurrency=2, duration=60, warmup=40, workers=2), stop=lambda: True
        )
    )
    assert time.monotonic() - start < 30
    assert sum(r.warmup for r in run.records) == 40  # a warm-up long enough that its records come before the start
    assert sum(not r.warmup for r in run.records) < 200  # what went out before the stop arrived: not 60 s of it
    assert not _workers_alive()


def test_a_server_that_dies_mid_run_stops_a_run_over_workers(pytester: pytest.Pytester) -> None:
    """The dead-server watch of a one-process run holds over worker processes too: before,
    the workers' closed loops went on for the whole duration against nothing."""
    pytester.makepyfile(
        test_d="""
        import pytest

        @pytest.mark.infmax_server(sim_args="--decode-step-ms 2 --crash-after 20")
        def test_long(infmax):
            infmax.run("1k1k-mini", concurrency=2, duration=120, warmup=0)
    """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-workers", "2", "--infmax-json", "r.json")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the server died during the run:",
            "*test_long c=2: the run stopped after * requests (* failed): the server exited with code 1: *",
        ]
    )
    (res,) = json.loads((pytester.path / "r.json").read_text())["results"]
    assert res["client"]["workers"] == 2
    assert "the server exited with code 1" in res["server_died"]
    assert res["metrics"]["duration"] < 30  # stopped within a moment, not after 120 s of refusals
    result.stdout.fnmatch_lines(["*test_long*FAIL (server died)*"])


def test_the_api_key_reaches_workers_through_the_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-worker-secret"
    monkeypatch.setenv("INFMAX_API_KEY", key)  # the launcher's readiness probe sends it
    config = ServerConfig(sim_args=("--decode-step-ms", "2", "--api-key", key))
    with running_server(config, tmp_path) as keyed:
        seen_cmdlines: list[str] = []

        def look(rec: RequestRecord) -> None:
            seen_cmdlines.extend(" ".join(p.cmdline()) for p in _workers_alive())

        run = asyncio.run(
            LoadGenerator(keyed.base_url, keyed.model, key).run(
                LoadConfig(SCENARIO, concurrency=2, num_requests=4, warmup=0, workers=2), on_record=look
            )
        )
        assert all(r.ok for r in run.records)  # the workers sent the key
        assert seen_cmdlines and not any(key in c for c in seen_cmdlines)  # but not on a command line
        bad = asyncio.run(
            LoadGenerator(keyed.base_url, keyed.model, "wrong").run(
                LoadConfig(SCENARIO, concurrency=2, num_requests=2, warmup=0, workers=2)
            )
        )
        assert [r.http_status for r in bad.records] == [401, 401]


def test_plugin_option_spreads_runs_over_workers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_w="""
        from pytest_infmax import Scenario

        def test_w(infmax):
            infmax.run(Scenario("tiny", 16, 8), concurrency=4, num_requests=8, warmup=0)
            infmax.run(Scenario("tiny", 16, 8), concurrency=1, num_requests=2, warmup=0)
    """
    )
    pytester.makeini("[pytest]\ninfmax_sim_args = --decode-step-ms 1\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-workers", "2", "--infmax-json", "out.json"
    )
    result.assert_outcomes(passed=1)
    runs = json.loads((pytester.path / "out.json").read_text())["results"]
    assert [r["client"]["workers"] for r in runs] == [2, 1]  # never more workers than streams
    # each process ran its measured phase with its start-up's objects frozen (pytest_infmax/collector.py)
    assert all(r["client"]["collector"]["frozen_objects"] > 1000 for r in runs)
    bad = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-workers", "2", "--infmax-sequential")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--infmax-sequential*needs one load process*--infmax-workers = 2*"])

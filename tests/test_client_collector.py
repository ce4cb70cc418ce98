"""The client's garbage collector over a measured phase (pytest_infmax/collector.py,
``CollectorHold``): what the session held when the phase started is frozen, so a full
collection meanwhile scans only what the run made (in a pytest session with the plugin one
scanned ~55,000 objects and paused 16.8 ms, every stream's stamps as late); everything is
put back when the phase ends, and the run reports what the collector did."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_infmax.collector import FULL_EVERY, YOUNG_EVERY, CollectorHold, merge_collector_figures
from pytest_infmax.load.generator import LoadGenerator
from pytest_infmax.load.plan import LoadConfig
from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.records import RequestRecord
from pytest_infmax.servers.launch import Server, ServerConfig, running_server

SCENARIO = Scenario("tiny", 32, 16)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(ServerConfig(sim_args=("--decode-step-ms", "2")), tmp_path_factory.mktemp("gc")) as s:
        yield s


def test_the_measured_phase_runs_with_the_sessions_objects_frozen_and_puts_them_back(server: Server) -> None:
    thresholds = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    during: list[tuple[int, tuple[int, int, int]]] = []

    def on_record(rec: RequestRecord) -> None:
        during.append((gc.get_freeze_count(), gc.get_threshold()))

    config = LoadConfig(SCENARIO, concurrency=4, num_requests=12, warmup=4)
    run = asyncio.run(LoadGenerator(server.base_url, server.model).run(config, on_record=on_record))
    measured = during[4:]  # the warm-up's four records come first, before the hold
    assert all(frozen == during[0][0] for frozen, _ in during[:4]) and during[0][0] == 0
    assert all(frozen > 1000 for frozen, _ in measured), measured  # the session's objects, frozen
    young = min(thresholds[0], YOUNG_EVERY)  # young collections more often, full ones as far apart
    held = (young, thresholds[1], max(thresholds[2], FULL_EVERY * thresholds[0] // young))
    assert all(t == held for _, t in measured), (measured, held)
    # put back: nothing frozen, the thresholds as they were
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds
    assert run.client is not None and run.client.collector is not None
    figures = run.client.to_dict()["collector"]
    assert figures["frozen_objects"] > 1000  # counted when frozen
    assert len(figures["collections"]) == len(figures["longest_pause_ms"]) == 3
    json.dumps(figures)  # plain JSON, as the results file keeps it


def _garbage_of_a_run(server: Server, requests: int) -> int:
    """Objects in reference cycles that a closed loop of ``requests`` left: only the collector
    frees them (found with it off meanwhile)."""
    config = LoadConfig(SCENARIO, concurrency=4, num_requests=requests, warmup=0)
    gc.collect()
    gc.disable()
    try:
        run = asyncio.run(LoadGenerator(server.base_url, server.model).run(config))
        assert [r.error_message for r in run.records if r.error_kind] == []
        return gc.collect()
    finally:
        gc.enable()


def test_a_streamed_request_leaves_nothing_for_the_collector(server: Server) -> None:
    """What reading a stream makes is freed by reference counting as the stream ends, so the
    young collections meet less and none of it waits for one. The switch of a response to the
    C lane (an exception from httptools' callback) left ten objects a request in a cycle
    (frames and tracebacks, the connection's read frame holding the exception) until
    2026-12-07. A run's own objects (its connections, its loop) may be cyclic: the same for
    20 requests as for 120."""
    few, many = _garbage_of_a_run(server, 20), _garbage_of_a_run(server, 120)
    assert many - few < 50, (few, many)  # not per request (before: 533 and 2,646, ~21 each)


def test_a_freeze_someone_else_made_is_left_to_them() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        hold = CollectorHold()
        hold.start()
        hold.stop()
        # still frozen (an unfreeze would leave none; some may have been freed meanwhile)
        assert gc.get_freeze_count() > frozen // 2 and hold.describe()["frozen_objects"] == 0
    finally:
        gc.unfreeze()


def test_a_run_over_workers_reports_every_processs_collector(server: Server) -> None:
    config = LoadConfig(SCENARIO, concurrency=4, num_requests=12, warmup=4, workers=2)
    run = asyncio.run(LoadGenerator(server.base_url, server.model).run(config))
    assert run.client is not None and run.client.collector is not None
    assert run.client.collector["frozen_objects"] > 2000  # two worker processes' objects
    assert gc.get_freeze_count() == 0


def test_figures_of_several_processes_merge_into_one() -> None:
    a = {
        "collections": [5, 1, 0],
        "longest_pause_ms": [0.2, 1.5, 0.0],
        "total_pause_ms": [0.5, 1.5, 0.0],
        "frozen_objects": 10,
    }
    b = {
        "collections": [3, 0, 1],
        "longest_pause_ms": [0.4, 0.0, 9.0],
        "total_pause_ms": [0.9, 0.0, 9.0],
        "frozen_objects": 7,
    }
    assert merge_collector_figures([a, None, b]) == {
        "collections": [8, 1, 1],
        "longest_pause_ms": [0.4, 1.5, 9.0],
        "total_pause_ms": [1.4, 1.5, 9.0],
        "frozen_objects": 17,
    }
    assert merge_collector_figures([None]) is None


def test_a_run_cancelled_mid_phase_puts_the_collector_back(server: Server) -> None:
    """Ctrl-C in the measured phase: the interrupted run's figures still come, and nothing
    stays frozen once the cancellation has gone through."""
    thresholds = gc.get_threshold()
    interrupted: list[Any] = []
    config = LoadConfig(SCENARIO, concurrency=2, num_requests=10_000, warmup=0)

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.ensure_future(
            LoadGenerator(server.base_url, server.model).run(
                config, on_record=lambda r: started.set(), on_interrupted=interrupted.append
            )
        )
        await asyncio.wait_for(started.wait(), timeout=30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds
    (run,) = interrupted
    assert run.client.collector["frozen_objects"] > 1000


def test_the_live_benchmark_measures_both_token_count_keepings() -> None:
    """benchmarks/client_collector.py --live at a small scale, so the figures docs/load-generator.md
    quotes keep a script that makes them: a run each way, each with the client's collector figures."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "client_collector.py"
    command = [sys.executable, str(script), "--live", "16", "--osl", "8", "--runs", "1", "--", "--decode-step-ms", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert any(row.startswith("| array('q') (now) |") for row in rows), done.stdout
    assert any(row.startswith("| list of ints (before) |") for row in rows), done.stdout


def test_the_live_benchmark_compares_this_client_with_another_checkouts(tmp_path: Path) -> None:
    """``--against DIR``: each run in a process whose client is that tree's (here this checkout
    twice, so the plumbing, not a difference, is what is checked); a tree without the
    project is refused with what to give."""
    repo = Path(__file__).resolve().parents[1]
    script = repo / "benchmarks" / "client_collector.py"
    command = [sys.executable, str(script), "--live", "16", "--osl", "8", "--runs", "1", "--against", str(repo)]
    done = subprocess.run([*command, "--", "--decode-step-ms", "1"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| client | young: collections |"), done.stdout
    assert any(row.startswith("| this checkout |") for row in rows), done.stdout
    assert any(row.startswith(f"| {repo.name} |") for row in rows), done.stdout
    refused = subprocess.run([*command[:-1], str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "give a checkout of the project" in refused.stderr


# A run in miniature, in a process of its own (the thresholds are process-wide): 1,000 requests in
# flight, each a few containers; as one ends (its objects old by then, freed by reference
# counting) the next starts, and one object in four is kept to the end, as a record is.
_RUN = textwrap.dedent(
    """
    import collections, gc, json, sys
    from pytest_infmax.collector import CollectorHold
    met = []
    def watch(phase, info):
        if phase == "start" and info["generation"] < 2:
            met.append((info["generation"], sum(len(gc.get_objects(g)) for g in range(info["generation"] + 1))))
    class Request:
        def __init__(self, i):
            self.state = {"n": i}
            self.parts = [[i], [i]]
    hold = CollectorHold()
    if sys.argv[1] == "held":
        hold.start()
    in_flight = collections.deque(Request(i) for i in range(1000))
    kept = []
    gc.callbacks.append(watch)
    for i in range(100_000):
        in_flight.popleft()
        in_flight.append(Request(i))
        if i % 4 == 0:
            kept.append([i])
    gc.callbacks.remove(watch)
    hold.stop()
    print(json.dumps({g: max(n for gg, n in met if gg == g) for g in (0, 1)}))
    """
)


def _largest_collections(mode: str) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", _RUN, mode], capture_output=True, text=True, timeout=120, check=True)
    return dict(json.loads(done.stdout))


@pytest.mark.skipif(gc.get_threshold()[2] == 0, reason="an incremental collector sizes its own collections")
def test_a_held_phases_collections_each_meet_few_objects_as_old_ones_die() -> None:
    """CPython counts the old objects freed against the new ones made, so where requests end
    as fast as they start its young collections come seldom and each meets thousands of
    objects, its middle ones those of every request started since the last: stalls of 6 and
    13 ms at 1,000 streams. A held phase collects its young generation sooner (YOUNG_EVERY)."""
    default, held = _largest_collections("default"), _largest_collections("held")
    assert default["0"] > 2_000 and default["1"] > 10_000, default
    assert held["0"] < default["0"] / 2 and held["1"] < default["1"] / 2, (held, default)

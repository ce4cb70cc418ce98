"""The simulator's garbage collector (pytest_infmax/collector.py): start-up frozen, full collections
spaced out, and what the collector did in ``/sim/stats``."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from pytest_infmax.collector import FULL_EVERY, CollectorWatch
from pytest_infmax.servers.launch import ServerConfig, running_server

# A serving pattern in miniature, in a process of its own (the settings are process-wide):
# each step makes a burst of short-lived containers (its events) while a few of 1,000 open
# streams end and new ones start, so objects keep surviving into the old generation.
_SERVING = textwrap.dedent(
    """
    import collections, gc, json, sys
    from pytest_infmax.collector import settle_collector
    if sys.argv[1] == "settled":
        settle_collector()
    class Stream:
        def __init__(self, i):
            self.state = {"n": i}
            self.parts = [i]
            self.queue = collections.deque()
    open_streams = collections.deque(Stream(i) for i in range(1000))
    before = [s["collections"] for s in gc.get_stats()]
    for step in range(1000):
        burst = [[n] for n in range(1000)]
        del burst
        for i in range(20):
            open_streams.popleft()
            open_streams.append(Stream(i))
    after = [s["collections"] for s in gc.get_stats()]
    print(json.dumps([a - b for a, b in zip(after, before)]))
    """
)


def _collections(mode: str) -> list[int]:
    done = subprocess.run(
        [sys.executable, "-c", _SERVING, mode], capture_output=True, text=True, timeout=120, check=True
    )
    return list(json.loads(done.stdout))


@pytest.mark.skipif(gc.get_threshold()[2] == 0, reason="an incremental collector has no full-collection threshold")
def test_a_settled_collector_makes_a_full_collection_per_hundred_middle_ones_not_per_ten() -> None:
    default = _collections("default")
    settled = _collections("settled")
    # CPython's defaults: a full collection every 10 of the middle generation's (once enough
    # objects were promoted); the settled one waits for FULL_EVERY of them
    assert default[1] >= 50 and default[2] >= 4, default
    assert settled[1] >= 50, settled
    assert settled[2] <= settled[1] // FULL_EVERY, settled


def test_the_watch_counts_each_generations_collections_and_pauses() -> None:
    watch = CollectorWatch()
    watch.install()
    watch.install()  # once only
    try:
        gc.collect()
        gc.collect(0)
    finally:
        watch.uninstall()
    gc.collect()  # not counted: uninstalled
    summary = watch.describe()
    assert summary["collections"][2] == 1 and summary["collections"][0] >= 1
    assert 0 < summary["longest_pause_ms"][2] <= summary["total_pause_ms"][2]
    assert summary["thresholds"] == list(gc.get_threshold())
    assert watch._callback not in gc.callbacks


def test_the_simulator_freezes_its_start_up_and_reports_its_collector(tmp_path: Path) -> None:
    with running_server(ServerConfig(sim_args=("--model", "m", "--decode-step-ms", "1")), tmp_path) as sim:
        body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 8, "stream": True}).encode()
        for _ in range(3):
            request = urllib.request.Request(
                f"{sim.base_url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.read().endswith(b"data: [DONE]\n\n")
        with urllib.request.urlopen(f"{sim.base_url}/sim/stats", timeout=30) as response:
            collector = json.loads(response.read())["collector"]
    assert collector["thresholds"][2] == FULL_EVERY
    assert collector["frozen"] > 10_000  # modules, the app, the engine's tables: out of every collection
    assert len(collector["collections"]) == len(collector["longest_pause_ms"]) == 3

"""The garbage collector kept off a measured schedule, and what it did.

Two processes keep a schedule: the simulator, writing its streams' events (``settle_collector``
at start-up, for the process's life; ``/sim/stats`` shows what the collector did), and the load
generator, stamping every event it reads (``CollectorHold`` for a run's measured phase only:
its process is the pytest session, not the client's alone).

The load generator's measured phase: a full collection in a pytest session with the plugin
scanned ~55,000 objects (pytest's, the plugin's, the tests') and paused 16.8 [15.8-24.4] ms,
every stream's stamps as late; with them frozen it took 0.0 [0.0-0.1] ms
(``benchmarks/client_collector.py --runs 5``, docs/load-generator.md). The hold freezes what
exists when the phase starts, spaces full collections out as below, and puts both back when
the phase ends.

It also makes the young collections come more often (``YOUNG_EVERY``): CPython starts one
when 700 more containers were made than freed, and counts the old objects freed too. In a
run, requests that end free their old objects as fast as new ones are made, so at 1,000
streams a young collection met ~7,000 objects, and a middle one (every tenth) those of every
request started since the last and still in flight: stalls of up to 6 and 13 ms. At 100,
seven times as many collections, each shorter: the longest 0.7 and 3.4 ms, in about the same
time all told (docs/load-generator.md, "What a request left for the collector").

The simulator:

CPython's cyclic collector stops the loop while it runs. A young collection scans the few
hundred containers made since the last one (microseconds); a full one scans every container
alive, and a serving simulator holds about 34 per open stream (its transport, socket,
protocol, trace, engine request, ...): at 1,000 streams a full collection took 3.5-8 ms,
as long as writing one step's events, and with CPython's default thresholds one came every
~4 s (docs/calibration.md, "The collector's full collections"). Each delays every event of
the step it lands in: the write lateness max of a 1,000-stream run was 9.2-9.6 ms with
them, 7.2-7.4 without.

Two things keep them off the schedule:

* what start-up made (modules, the app, the engine's tables) is frozen (``gc.freeze``):
  it lives as long as the process, and no collection scans it again;
* a full collection waits for ``FULL_EVERY`` collections of the middle generation
  (CPython: 10), so under load one comes every ~25 s at 1,000 streams, not every ~4 s.
  What serving allocates is freed by reference counting when its stream ends (the
  collector found 0-3 objects in each full collection of a 1,000-stream run), so waiting
  longer holds back next to nothing; cycles among young objects are collected as before.

An incremental collector (a CPython whose ``gc.get_threshold()[2]`` reads 0, as 3.13's
pre-releases had) ignores the third threshold: its old-generation work is already split
into small increments.
"""

from __future__ import annotations

import gc
import time
from typing import Any

# Collections of the middle generation before a full one (CPython's default: 10).
FULL_EVERY = 100
# The load generator's measured phase: a young collection once this many more containers were
# made than freed (CPython's default: 700), so that each collection is short. See CollectorHold.
YOUNG_EVERY = 100


class CollectorWatch:
    """What the collector did since :meth:`install`: per generation, how many collections
    and the longest and total pause (a ``gc.callbacks`` entry: about a microsecond each)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.longest_ms = [0.0, 0.0, 0.0]
        self.total_ms = [0.0, 0.0, 0.0]
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = min(int(info["generation"]), 2)
        pause_ms = (time.perf_counter() - self._started) * 1e3
        self.collections[generation] += 1
        self.total_ms[generation] += pause_ms
        if pause_ms > self.longest_ms[generation]:
            self.longest_ms[generation] = pause_ms

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def pauses(self) -> dict[str, Any]:
        """Collections and their longest and total pause: lists indexed by generation (2: full)."""
        return {
            "collections": list(self.collections),
            "longest_pause_ms": [round(value, 3) for value in self.longest_ms],
            "total_pause_ms": [round(value, 3) for value in self.total_ms],
        }

    def describe(self) -> dict[str, Any]:
        """``collector`` in ``GET /sim/stats``: the pauses, what is frozen, the thresholds."""
        return {**self.pauses(), "frozen": gc.get_freeze_count(), "thresholds": list(gc.get_threshold())}


def settle_collector(full_every: int = FULL_EVERY) -> None:
    """Call once start-up is done: freeze what it made, and space the full collections out
    (see the module's docstring). Process-wide: only the simulator's own process calls it."""
    gc.freeze()
    young, middle, _full = gc.get_threshold()
    gc.set_threshold(young, middle, full_every)


class CollectorHold:
    """A measured phase's collector, in a process that is not the caller's alone: ``start()``
    freezes what exists (no collection scans it until ``stop()``), spaces full collections
    out (``FULL_EVERY``) and watches the pauses; ``stop()`` puts thresholds and frozen objects
    back. If something else had frozen objects first, the freeze is its to manage: the hold
    leaves it alone (and freezes nothing)."""

    def __init__(self, full_every: int = FULL_EVERY) -> None:
        self.full_every = full_every
        self.watch = CollectorWatch()
        self.frozen = 0  # objects this hold froze (counted when it ends)
        self._holding_freeze = False
        self._thresholds: tuple[int, int, int] | None = None

    def start(self) -> None:
        self.watch.install()
        self._thresholds = gc.get_threshold()
        if gc.get_freeze_count() == 0:
            gc.freeze()  # O(1); counting them walks every one (~17 ms for 277,000): stop() does
            self._holding_freeze = True
        young, middle, full = self._thresholds
        if full > 0:  # 0: an incremental collector, which ignores it (module docstring)
            # Young collections more often, each of fewer objects; full ones as far apart as
            # FULL_EVERY sets them at CPython's young threshold (more middle ones between two).
            young_every = max(1, min(young, YOUNG_EVERY))
            gc.set_threshold(young_every, middle, max(full, self.full_every * young // young_every))

    def stop(self) -> None:
        """Put back what ``start`` changed; a second call does nothing."""
        if self._thresholds is None:
            return
        gc.set_threshold(*self._thresholds)
        self._thresholds = None
        if self._holding_freeze:
            self.frozen = gc.get_freeze_count()
            gc.unfreeze()
            self._holding_freeze = False
        self.watch.uninstall()

    def describe(self) -> dict[str, Any]:
        """What the collector did meanwhile (``CollectorWatch.pauses``) and the objects frozen."""
        return {**self.watch.pauses(), "frozen_objects": self.frozen}


def merge_collector_figures(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Several processes' ``CollectorHold.describe()`` as one: counts and totals added, the
    longest pause the longest of any (None when no process gave figures)."""
    given = [p for p in parts if p is not None]
    if not given:
        return None
    return {
        "collections": [sum(p["collections"][g] for p in given) for g in range(3)],
        "longest_pause_ms": [max(p["longest_pause_ms"][g] for p in given) for g in range(3)],
        "total_pause_ms": [round(sum(p["total_pause_ms"][g] for p in given), 3) for g in range(3)],
        "frozen_objects": sum(p["frozen_objects"] for p in given),
    }

"""The load generator's view of its own limits.

A load generator that falls behind makes the server look slower than it is:
requests go out later than the load model said, and chunks are stamped late
because the event loop was busy. This module measures that during a run:

* **send lag** per request: actual write time minus the time the load model
  said to send (open loop: the scheduled arrival time, or the moment a
  ``max_concurrency`` slot was obtained if later; closed loop: the moment the
  worker decided to send its next request, i.e. planning and serialising the
  request plus any blocking in between);
* **event-loop lag**: a timer asks to run ``interval`` seconds later, again and
  again, and records how much later it actually ran (a busy or blocked loop delays
  every timestamp the client takes by about that much);
* **client CPU**: process CPU seconds over wall seconds of the measured phase
  (1.0 = one core busy all the time; the asyncio client uses at most ~1 core);
* **the garbage collector**: its collections and pauses over the measured phase, which it
  spends with the session's objects frozen (``pytest_infmax.collector.CollectorHold``).

A run is marked ``client_bound`` with the reason when the p99 of the event-loop
lag or of the send lag passes ``threshold`` (default 10 ms).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pytest_infmax.lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:  # imported at first use, not with this module (pytest_infmax/lazy.py)
    np = lazy_module("numpy")


DEFAULT_LAG_THRESHOLD = 0.010  # seconds
# Seconds between event-loop lag samples. Each sample is a timer that wakes the loop, and
# between a stream's events the loop is idle: an idle wake-up cost 65 us of CPU on a 2-core
# VM, so a 10 ms ticker (100 wake-ups a second) was 8 % of the client's CPU at 256 streams
# of 10 ms events: 2.96 against 2.72 CPU-s per M tokens at 50 ms, where 100 ms saved no more
# (benchmarks/client_overhead.py --wakeups 10 50 100, docs/load-generator.md). What it
# measures is unchanged: a sample that falls in a block of the loop reports it, so the share
# of lagging samples is the share of time blocked, whatever the interval.
DEFAULT_LOOP_LAG_INTERVAL = 0.050


def _summary(values: list[float]) -> dict[str, Any]:
    """p50 / p99 / max in milliseconds (None for an empty sample) and the count."""
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(values, dtype=float) * 1000.0
    return {
        "n": int(a.size),
        "p50_ms": round(float(np.percentile(a, 50)), 4),
        "p99_ms": round(float(np.percentile(a, 99)), 4),
        "max_ms": round(float(a.max()), 4),
    }


class LoopLagMonitor:
    """Samples event-loop lag: how late a timer of ``interval`` seconds runs.

    ``start()`` inside the running loop, ``stop()`` when done; ``samples`` holds
    ``(wake time, lag seconds)`` pairs on the ``time.perf_counter()`` clock.

    The sampler is a chain of plain ``call_later`` callbacks, not a task that awaits
    ``asyncio.sleep``: a sleeping task wakes in two loop iterations (the timer resolves
    its future, then the task's step runs as a ready callback: a second poll, and
    ``get_running_loop``'s ``getpid`` syscall), a callback in one. strace of the client at
    64 streams of 10 ms events showed 40 polls and 20 getpids a second for a 20 Hz sampler.
    """

    def __init__(self, interval: float = DEFAULT_LOOP_LAG_INTERVAL) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._schedule()

    def _schedule(self) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_later(self.interval, self._tick, time.perf_counter())

    def _tick(self, t0: float) -> None:
        t1 = time.perf_counter()
        self.samples.append((t1, max(0.0, t1 - t0 - self.interval)))
        self._schedule()

    async def stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def lags_between(self, start: float, end: float) -> list[float]:
        """Lags of the samples that woke in ``[start, end]`` (a sample woken
        after ``end`` still counts if it slept through it, so a block at the
        very end of the phase is not missed)."""
        out = [lag for t, lag in self.samples if start <= t <= end]
        for t, lag in self.samples:
            if t > end:
                if t - lag - self.interval <= end:
                    out.append(lag)
                break
        return out


@dataclass
class ClientStats:
    """How the client itself behaved during the measured phase."""

    send_lags: list[float] = field(default_factory=list)  # seconds, one per measured request
    loop_lags: list[float] = field(default_factory=list)  # seconds, one per sample
    loop_lag_interval: float = DEFAULT_LOOP_LAG_INTERVAL
    # process CPU (user + system) during the measured phase; over workers, theirs and the
    # coordinating process's (workers.merge_shards)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    threshold: float = DEFAULT_LAG_THRESHOLD
    send_lag_reference: str = ""  # what send lag was measured from (closed / open loop)
    workers: int = 1  # processes the load ran in (CPU is their sum; loop lag is every loop's samples)
    # the garbage collector over the measured phase (pytest_infmax/collector.py CollectorHold):
    # collections, longest and total pause per generation, objects frozen; over workers, merged
    collector: dict[str, Any] | None = None

    @property
    def cpu_utilisation(self) -> float | None:
        """Process CPU seconds per wall second (1.0 = one core fully busy)."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else None

    @property
    def reasons(self) -> list[str]:
        """Why the run is client-bound; empty when it is not."""
        out: list[str] = []
        limit_ms = self.threshold * 1000
        for name, values in (("event-loop lag", self.loop_lags), ("send lag", self.send_lags)):
            s = _summary(values)
            if s["p99_ms"] is not None and s["p99_ms"] > limit_ms:
                out.append(
                    f"{name} p99 {s['p99_ms']:.1f} ms > {limit_ms:g} ms "
                    f"(max {s['max_ms']:.1f} ms over {s['n']} samples)"
                )
        return out

    @property
    def client_bound(self) -> bool:
        return bool(self.reasons)

    @property
    def reason(self) -> str | None:
        """One line for a results table; None when not client-bound."""
        reasons = self.reasons
        if not reasons:
            return None
        cpu = self.cpu_utilisation
        tail = f"; client CPU {cpu:.0%} of a core" if cpu is not None else ""
        if self.workers > 1:
            tail += f" over {self.workers} worker processes"
        return "client-bound: " + "; ".join(reasons) + tail

    def to_dict(self) -> dict[str, Any]:
        cpu = self.cpu_utilisation
        return {
            "client_bound": self.client_bound,
            "reason": self.reason,
            "threshold_ms": self.threshold * 1000,
            "send_lag": _summary(self.send_lags),
            "send_lag_reference": self.send_lag_reference,
            "loop_lag": _summary(self.loop_lags),
            "loop_lag_interval_ms": self.loop_lag_interval * 1000,
            "cpu_seconds": round(self.cpu_seconds, 6),
            "wall_seconds": round(self.wall_seconds, 6),
            "cpu_utilisation": None if cpu is None else round(cpu, 4),
            "workers": self.workers,
            "collector": self.collector,
        }

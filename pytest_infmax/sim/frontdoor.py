"""The simulator's front door: request starts in slices, with the sockets read between two.

A request's trip from the client's send to the simulator's ``data_received`` (its
``arrival``, what TTFT counts from) is as long as the event loop takes to get back to
``select``. asyncio runs every callback that was ready when an iteration began before it
polls again, and a burst of requests makes that long: 256 streams in lock-step finish
together, their clients send the next requests at once, and one iteration then ran every
one of their handlers up to the first suspension (~0.15 ms each: the body parsed and
checked, the engine's submit, the response's head): 10 to 40 ms in which no socket was
read, so the requests that came next waited in the kernel (``benchmarks/lateness.py``'s
"send to arrival", p50 3-5 ms and p99 9-35 ms at 256 streams, with the simulator's core
a third busy).

:class:`FrontDoor` bounds that: a generation handler awaits :meth:`FrontDoor.enter`
first. Within :data:`START_SLICE_S` of the loop's last poll it goes straight on; past it,
it queues (first come, first served) and the door lets the queue in a few at a time, one
batch per loop iteration, as many as fit a slice at the measured cost of a start; the
loop polls its sockets between two batches. The wait is the simulator's front-end queue,
and it is not hidden: a request's handler start (``handler_mono`` in the trace) is taken
after the door, its arrival stamp (``data_received``) before it.

When the loop last polled is read from its selector (wrapped once per loop: asyncio's
selector event loop keeps it as ``_selector``); on a loop without one (uvloop) the door
never holds a request.
"""

from __future__ import annotations

import asyncio
import collections
import time
import weakref
from typing import Any

# Handlers start for at most about this long after a poll of the sockets. 0.2 ms (the fast
# SSE writer's slice) let one start in per loop iteration, behind a writer slice each time:
# requests waited 30-70 ms at the door at 256 streams; 1 ms keeps the trip's p99 at ~3 ms
# with no longer a wait than without the door.
START_SLICE_S = 0.001
_FIRST_COST_S = 50e-6  # a start's cost until one was measured
_COST_WEIGHT = 0.2  # of each new sample in the moving average


class _PollClock:
    """When the loop's selector last returned (``time.monotonic()``)."""

    __slots__ = ("at", "known", "__weakref__")

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.known = False  # False: no selector to watch, so every instant counts as just polled


_CLOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _PollClock] = weakref.WeakKeyDictionary()


def poll_clock(loop: asyncio.AbstractEventLoop) -> _PollClock:
    """The loop's poll clock, its selector wrapped on first use (once per loop)."""
    clock = _CLOCKS.get(loop)
    if clock is not None:
        return clock
    clock = _PollClock()
    selector: Any = getattr(loop, "_selector", None)
    select = getattr(selector, "select", None)
    if select is not None:

        def stamped_select(timeout: float | None = None) -> Any:
            ready = select(timeout)
            clock.at = time.monotonic()
            return ready

        selector.select = stamped_select
        clock.known = True
    _CLOCKS[loop] = clock
    return clock


class FrontDoor:
    """Generation requests start in slices of :data:`START_SLICE_S` after a poll. See the
    module's docstring."""

    __slots__ = ("_loop", "_clock", "_queue", "_scheduled", "_cost", "_last_start", "_batch_head", "held")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._clock = poll_clock(loop)
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._scheduled = False
        self._cost = _FIRST_COST_S  # moving average of one start's cost
        self._last_start = 0.0
        self._batch_head: asyncio.Future[None] | None = None  # the first of the batch let in last
        self.held = 0  # requests that waited at the door (for /sim/stats)

    @property
    def start_cost_s(self) -> float:
        """The moving average of one start's cost, as measured in the batches let in."""
        return self._cost

    async def enter(self) -> None:
        """Return when this request may start: at once within a slice of the last poll
        with nobody waiting, else in its turn, after the loop polled again."""
        clock = self._clock
        if not self._queue and (not clock.known or time.monotonic() - clock.at < START_SLICE_S):
            return
        waiter = self._loop.create_future()
        self._queue.append(waiter)
        self.held += 1
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._release)
        await waiter  # cancelled (the client went away): _release skips it
        # A batch's starts run back to back: the time since the previous one of the same
        # batch is what that one cost (its handler ran to its first suspension in between).
        now = time.monotonic()
        if waiter is not self._batch_head:  # (a sample past a slice, a preemption, counts as a slice)
            self._cost += _COST_WEIGHT * (min(now - self._last_start, START_SLICE_S) - self._cost)
        self._last_start = now

    def _release(self) -> None:
        """One batch in: as many waiters as a slice holds at the measured cost (at least
        one); they run in the next iteration, after the loop polled, and this runs again
        after them while some still wait."""
        queue = self._queue
        batch = max(1, int(START_SLICE_S / max(self._cost, 1e-6)))
        self._batch_head = None
        while queue and batch:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if self._batch_head is None:
                    self._batch_head = waiter
                batch -= 1
        if queue:
            self._loop.call_soon(self._release)
        else:
            self._scheduled = False

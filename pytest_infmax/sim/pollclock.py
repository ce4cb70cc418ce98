"""When the simulator's event loop last polled its sockets: a request's arrival stamp.

asyncio reads a socket in the loop iteration whose poll (``select``) reported it readable,
but only after every callback that was queued before that poll (a stream writer's slice,
the handlers of the requests read in the iteration before), and after the reads of the
sockets ahead of it in the poll's list. A request's arrival (what its TTFT counts from) is
therefore the return of the poll that found its first bytes, not the later
``data_received`` call: the bytes were in the socket by then.

The poll's return is read from the loop's selector, wrapped once per loop (asyncio's
selector event loop keeps it as ``_selector``); on a loop without one (uvloop) the clock
is not ``known`` and the arrival stays the ``data_received`` stamp.

The same wrapper makes the loop's timers fire on time (``precise``): ``epoll_wait`` takes
whole milliseconds, and Python's epoll selector rounds a timeout up, so a timer fires up to
1 ms late; the engine's step ends are timers. A wait with a timeout is therefore done by
``select(2)`` on the epoll file descriptor itself (readable when any socket the loop watches
is; microseconds), followed by the selector's own poll without a wait.
"""

from __future__ import annotations

import asyncio
import select as _select
import time
import weakref
from typing import Any


class PollClock:
    """When the loop's selector last returned (``time.monotonic()``)."""

    __slots__ = ("at", "known", "precise", "__weakref__")

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.known = False  # no selector to watch: ``at`` means nothing
        self.precise = False  # the loop's timers fire within microseconds, not up to 1 ms late

    def arrival(self) -> float:
        """When bytes read now reached the process: the return of the poll that reported
        them (asyncio reads in the iteration of its poll), else now."""
        now = time.monotonic()
        return self.at if self.known and self.at < now else now


_CLOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PollClock] = weakref.WeakKeyDictionary()


def poll_clock(loop: asyncio.AbstractEventLoop) -> PollClock:
    """The loop's poll clock, its selector wrapped on first use (once per loop)."""
    clock = _CLOCKS.get(loop)
    if clock is not None:
        return clock
    clock = PollClock()
    selector: Any = getattr(loop, "_selector", None)
    select = getattr(selector, "select", None)
    if select is not None:
        epoll: Any = getattr(selector, "_selector", None)  # EpollSelector's select.epoll
        epoll_type: Any = getattr(_select, "epoll", None)  # Linux only
        epoll_fd = epoll.fileno() if epoll_type is not None and isinstance(epoll, epoll_type) else -1
        precise = clock.precise = 0 <= epoll_fd < 1024  # select(2) takes descriptors below FD_SETSIZE only

        def stamped_select(timeout: float | None = None) -> Any:
            if precise and timeout is not None and timeout > 0:
                _select.select((epoll_fd,), (), (), timeout)  # the wait, to the microsecond
                timeout = 0
            ready = select(timeout)
            clock.at = time.monotonic()
            return ready

        selector.select = stamped_select
        clock.known = True
    _CLOCKS[loop] = clock
    return clock

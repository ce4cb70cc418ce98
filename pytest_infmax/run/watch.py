"""Whether the server died during a run, so the run stops instead of measuring its absence.

A closed loop against a dead server does not slow down: every request fails to connect at
once and the next one follows (against vLLM whose EngineCore was killed: 127,919 failed
requests in 22 s, every one kept and written out). The run is stopped as soon as the server
is known dead, its records until then are kept, and the result says why (``server_died``):

* a server the plugin launched: its exit status (:meth:`Server.exit_code`: the supervisor's,
  or the leader's when it failed, or 0 when it exited and nothing listens on its port);
* any server, an endpoint included: every request for :data:`REFUSED_FOR_S` seconds failed to
  connect (at least :data:`REFUSED_AT_LEAST` in a row).
"""

from __future__ import annotations

import time

from pytest_infmax.records import ErrorKind, RequestRecord
from pytest_infmax.servers.launch import Server

CHECK_INTERVAL_S = 0.25  # how often the server's process is looked at (reads /proc and a file)
REFUSED_FOR_S = 2.0
REFUSED_AT_LEAST = 20
# After a run whose last request lost its connection, how long the server's exit may take to
# show: a crashing server closes its sockets a moment before its exit status can be read
EXIT_GRACE_S = 1.0


class ServerWatch:
    """A run's ``stop`` predicate and record watcher: True once the server is dead; ``note`` says how."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.note: str | None = None
        self._next_check = 0.0
        self._refused = 0
        self._refused_since: float | None = None
        self._connection_lost = False  # the last request ended with a refused or lost connection

    def on_record(self, rec: RequestRecord) -> None:
        self._connection_lost = rec.error_kind in (ErrorKind.CONNECT, ErrorKind.DISCONNECT)
        if rec.error_kind != ErrorKind.CONNECT:
            self._refused, self._refused_since = 0, None
            return
        self._refused += 1
        if self._refused_since is None:
            self._refused_since = rec.send_time or time.perf_counter()

    def dead(self, *, now: bool = False) -> bool:
        """Whether the server is dead; looked at no more often than every CHECK_INTERVAL_S, unless ``now``
        (the run's end: then a server whose last request lost its connection gets EXIT_GRACE_S to show
        its exit)."""
        if self.note is not None:
            return True
        at = time.monotonic()
        if at < self._next_check and not now:
            return False
        self._next_check = at + CHECK_INTERVAL_S
        note = self.server.death_note()
        if note is None and now and self._connection_lost:  # the run's end: a crash may not show yet
            deadline = at + EXIT_GRACE_S
            while note is None and time.monotonic() < deadline:
                time.sleep(0.02)
                note = self.server.death_note()
        if note is None and self._refused >= REFUSED_AT_LEAST and self._refused_since is not None:
            span = time.perf_counter() - self._refused_since
            if span >= REFUSED_FOR_S:
                note = (
                    f"every request for {span:.1f} s failed to connect ({self._refused} in a row) to "
                    f"{self.server.base_url}: nothing accepts connections there any more"
                )
        self.note = note
        return note is not None

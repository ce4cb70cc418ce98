"""Progress of long runs: which run, how many requests are done, live throughput.

A line at most every ``interval`` seconds, and none for runs shorter than
that, so quick tests stay quiet. The writer is whatever the caller gives (the
plugin writes to the terminal past pytest's output capture).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pytest_infmax.records import RequestRecord


class Progress:
    """Counts records as they complete and reports every ``interval`` seconds."""

    def __init__(
        self,
        write: Callable[[str], None],
        name: str,
        label: str,
        total: int | None,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.write, self.name, self.label, self.total = write, name, label, total
        self.interval, self.clock = interval, clock
        self.started = clock()
        self.last = self.started
        self.done = self.errors = self.tokens = 0
        self.window_tokens = 0

    def on_record(self, rec: RequestRecord) -> None:
        self.done += 1
        self.errors += 0 if rec.ok else 1
        tokens = (rec.input_tokens or 0) + (rec.output_tokens or 0) if rec.ok else 0
        self.tokens += tokens
        self.window_tokens += tokens
        now = self.clock()
        if now - self.last >= self.interval:
            rate = self.window_tokens / (now - self.last)
            self.last, self.window_tokens = now, 0
            self.write(self.line(rate))

    def line(self, rate: float) -> str:
        total = f"/{self.total}" if self.total else ""
        errors = f", {self.errors} errors" if self.errors else ""
        return (
            f"infmax: {self.name} {self.label}: {self.done}{total} requests{errors}, "
            f"{rate:,.0f} tok/s, {self.clock() - self.started:.0f} s"
        )

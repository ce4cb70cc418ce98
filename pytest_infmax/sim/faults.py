"""Fault injection for the simulator: what a real server does to a client on a bad day.

Faults come from two places:

* command-line flags (``--fault-status 503 --fault-rate 0.1``, ...): a
  :class:`FaultSpec` applied to a random fraction ``--fault-rate`` of the
  generation requests (drawn from a generator seeded by ``--seed``, so a run with
  one request in flight at a time is reproducible);
* the ``X-Infmax-Fault`` request header: a spec for that one request, which
  replaces the command-line faults (``X-Infmax-Fault: none`` exempts it).

Header grammar: items separated by ``;`` or ``,``, each ``key=value`` (or a bare
``none``); malformed-SSE modes are joined with ``+``::

    X-Infmax-Fault: status=429; retry_after=2
    X-Infmax-Fault: stall=2; stall_after=5
    X-Infmax-Fault: reset_after=5
    X-Infmax-Fault: malformed=no_space+comment+no_done

This module only describes faults; :mod:`pytest_infmax.sim.server` and
:mod:`pytest_infmax.sim.streams` carry them out. It imports nothing heavy, so
``pytest_infmax.sim`` stays light.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

FAULT_HEADER = "X-Infmax-Fault"

# Malformed-SSE modes; every one but invalid_json, no_finish (with no_done) leaves
# a stream that a tolerant client (and the openai SDK) still parses.
SPLIT = "split"  # each event's bytes go out in several writes, with awaits between
NO_SPACE = "no_space"  # "data:{...}" instead of "data: {...}"
EMPTY_CHOICES = "empty_choices"  # an extra chunk with "choices": [] before the content
COMMENT = "comment"  # an SSE comment line (": ping") before every content event
NO_DONE = "no_done"  # no "data: [DONE]" at the end
NO_FINISH = "no_finish"  # the last content chunk has "finish_reason": null
NO_USAGE = "no_usage"  # no usage, neither the final chunk nor per-chunk usage
INVALID_JSON = "invalid_json"  # a data line that is not JSON, after the first content event

MALFORMED_MODES: tuple[str, ...] = (
    SPLIT, NO_SPACE, EMPTY_CHOICES, COMMENT, NO_DONE, NO_FINISH, NO_USAGE, INVALID_JSON,
)  # fmt: skip

DEFAULT_RETRY_AFTER_S = 1.0
DEFAULT_STALL_AFTER_TOKENS = 1


class FaultSpecError(ValueError):
    """A fault flag or header that cannot be understood; the message says why."""


@dataclass(frozen=True)
class FaultSpec:
    """The faults applied to one request. The default value injects nothing.

    ``status``: answer this HTTP status (OpenAI error body) instead of generating.
    ``retry_after``: ``Retry-After`` seconds sent with ``status`` (default 1 s for 429).
    ``stall_seconds`` / ``stall_after``: once ``stall_after`` output tokens have been
    written, pause the stream this long (non-streaming: delay the answer).
    ``reset_after``: once this many output tokens have been written, reset the
    connection (TCP RST, no more bytes).
    ``malformed``: malformed-SSE modes, see :data:`MALFORMED_MODES`.
    """

    status: int | None = None
    retry_after: float | None = None
    stall_seconds: float = 0.0
    stall_after: int = DEFAULT_STALL_AFTER_TOKENS
    reset_after: int | None = None
    malformed: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.status is not None and not 400 <= self.status <= 599:
            raise FaultSpecError(f"status must be an HTTP error status 400-599, got {self.status}")
        if self.retry_after is not None and self.retry_after < 0:
            raise FaultSpecError(f"retry_after must be >= 0 seconds, got {self.retry_after:g}")
        if self.stall_seconds < 0:
            raise FaultSpecError(f"stall seconds must be >= 0, got {self.stall_seconds:g}")
        if self.stall_after < 0:
            raise FaultSpecError(f"stall_after must be >= 0 tokens, got {self.stall_after}")
        if self.reset_after is not None and self.reset_after < 0:
            raise FaultSpecError(f"reset_after must be >= 0 tokens, got {self.reset_after}")
        unknown = sorted(set(self.malformed) - set(MALFORMED_MODES))
        if unknown:
            raise FaultSpecError(f"unknown malformed mode(s) {', '.join(unknown)}; known: {', '.join(MALFORMED_MODES)}")

    @property
    def active(self) -> bool:
        return bool(self.status is not None or self.stall_seconds > 0 or self.reset_after is not None or self.malformed)

    @property
    def rewrites_stream(self) -> bool:
        """True when the SSE writer must go event by event instead of batching."""
        return self.stall_seconds > 0 or self.reset_after is not None or bool(self.malformed)

    def effective_retry_after(self) -> float | None:
        if self.retry_after is not None:
            return self.retry_after
        return DEFAULT_RETRY_AFTER_S if self.status == 429 else None

    def describe(self) -> str | None:
        """The spec in header syntax (what the trace records), or None when inactive."""
        if not self.active:
            return None
        items: list[str] = []
        if self.status is not None:
            items.append(f"status={self.status}")
            if self.retry_after is not None:
                items.append(f"retry_after={self.retry_after:g}")
        if self.stall_seconds > 0:
            items.append(f"stall={self.stall_seconds:g}")
            items.append(f"stall_after={self.stall_after}")
        if self.reset_after is not None:
            items.append(f"reset_after={self.reset_after}")
        if self.malformed:
            items.append("malformed=" + "+".join(m for m in MALFORMED_MODES if m in self.malformed))
        return "; ".join(items)


NO_FAULT = FaultSpec()


def parse_malformed(text: str) -> frozenset[str]:
    """``"no_space+comment"`` or ``"no_space,comment"`` → the set of modes (validated)."""
    modes = frozenset(m.strip() for m in text.replace(",", "+").split("+") if m.strip())
    FaultSpec(malformed=modes)  # validates
    return modes


def _number(key: str, value: str, kind: type) -> float | int:
    try:
        return kind(value)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise FaultSpecError(f"{key}: expected {expected}, got {value!r}") from None


def parse_fault_header(value: str) -> FaultSpec:
    """Parse an ``X-Infmax-Fault`` value. Returns :data:`NO_FAULT` for ``none``.

    Raises :class:`FaultSpecError` naming the bad item, so a typo in a test fails
    loudly (the server answers 400) instead of silently injecting nothing.
    """
    fields: dict[str, object] = {}
    malformed: set[str] = set()
    items = [item.strip() for item in value.replace(",", ";").split(";") if item.strip()]
    if not items:
        raise FaultSpecError(
            "empty value; give e.g. 'status=503', 'stall=2', 'reset_after=5', 'malformed=no_space' or 'none'"
        )
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip().lower(), raw.strip()
        if key == "none" and not sep:
            if len(items) > 1:
                raise FaultSpecError("'none' cannot be combined with other faults")
            return NO_FAULT
        if not sep or not raw:
            raise FaultSpecError(f"{item!r}: expected key=value")
        if key == "status":
            fields["status"] = _number(key, raw, int)
        elif key == "retry_after":
            fields["retry_after"] = _number(key, raw, float)
        elif key in ("stall", "stall_seconds"):
            fields["stall_seconds"] = _number(key, raw, float)
        elif key == "stall_after":
            fields["stall_after"] = _number(key, raw, int)
        elif key == "reset_after":
            fields["reset_after"] = _number(key, raw, int)
        elif key == "malformed":
            malformed |= parse_malformed(raw)
        else:
            raise FaultSpecError(
                f"unknown key {key!r}; known: status, retry_after, stall, stall_after, reset_after, malformed, none"
            )
    return FaultSpec(malformed=frozenset(malformed), **fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FaultConfig:
    """The command-line faults: ``spec`` on a fraction ``rate`` of generation
    requests, and ``crash_after`` (exit abruptly when request N+1 arrives)."""

    spec: FaultSpec = NO_FAULT
    rate: float = 1.0
    crash_after: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise FaultSpecError(f"--fault-rate must be between 0 and 1, got {self.rate:g}")
        if self.crash_after is not None and self.crash_after < 0:
            raise FaultSpecError(f"--crash-after must be >= 0 requests, got {self.crash_after}")

    @property
    def active(self) -> bool:
        return self.spec.active or self.crash_after is not None


class FaultPlan:
    """Decides, request by request, which faults apply."""

    def __init__(self, config: FaultConfig, seed: int) -> None:
        self.config = config
        self._rng = random.Random(f"infmax-sim-faults-{seed}")

    def choose(self, header: str | None) -> FaultSpec:
        """The header's spec if there is one, else the command-line spec with
        probability ``rate``. Raises :class:`FaultSpecError` for a bad header."""
        if header is not None:
            return parse_fault_header(header)
        spec = self.config.spec
        if not spec.active:
            return NO_FAULT
        if self.config.rate >= 1.0 or self._rng.random() < self.config.rate:
            return spec
        return NO_FAULT


def spec_from_flags(
    *,
    status: int | None,
    retry_after: float | None,
    stall_seconds: float,
    stall_after: int,
    reset_after: int | None,
    malformed: str | None,
) -> FaultSpec:
    return dataclasses.replace(
        NO_FAULT,
        status=status,
        retry_after=retry_after,
        stall_seconds=stall_seconds,
        stall_after=stall_after,
        reset_after=reset_after,
        malformed=parse_malformed(malformed) if malformed else frozenset(),
    )

"""Workloads beyond independent random prompts: multi-turn sessions with shared prefixes,
and replay of a Mooncake-format trace.

Random-token prompts never share a prefix, so they cannot see a serving stack's prefix
cache, where it regresses most. These workloads are built so the reuse is known in
advance: every planned request carries ``shared_prefix_tokens``, the tokens at the start
of its prompt that repeat the start of a prompt planned before it (the reuse the workload
*designed*; :func:`designed_reuse` over a run), to be read beside the server's own
prefix-cache hit rate.

* :class:`Sessions`: N users (the closed loop's ``concurrency``), each holding a
  conversation of ``turns`` turns. Turn *k*'s prompt is the whole history (every earlier
  user message and answer) plus new user tokens, so the previous turn's prompt is its
  prefix. Between a turn's response and the next turn the user thinks ``think_time``
  seconds. With ``prefixes=P, prefix_len=L``, each conversation opens with one of P
  shared prefixes of L tokens (a system prompt), session *s* taking prefix *s mod P*.
  The scenario gives each turn's new user tokens (ISL) and its answer's length (OSL).
  An answer's tokens in the history are planned stand-ins of the requested length (a
  token-id endpoint returns text, not ids), so the server's cache of its own generated
  tokens does not hit; the designed reuse counts only the prompts.
* :class:`Trace`: Mooncake's trace format, one JSON object a line: ``timestamp`` (ms),
  ``input_length``, ``output_length`` and ``hash_ids``, one per block of
  :data:`MOONCAKE_BLOCK_TOKENS` prompt tokens. Each hash id becomes one fixed block of
  tokens, the same wherever it appears, so two requests share exactly the prefix the
  trace says they do. Requests are sent at their timestamps divided by ``speedup``.

Token-id (completions) prompts draw every token from the run's :class:`TokenWindow`
(inside the served vocabulary); chat prompts use words, one token each.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_infmax.lazy import lazy_module
from pytest_infmax.load.scenarios import _WORDS, PlannedRequest, Scenario, TokenWindow, pack_token_ids

if TYPE_CHECKING:
    import numpy as np
else:  # imported at first use, not with this module (pytest_infmax/lazy.py)
    np = lazy_module("numpy")

MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash id in Mooncake's traces
MAX_TURNS = 1000
MAX_TRACE_LINES = 1_000_000

_PREFIX_STREAM = 0x9F1C5  # rng stream of the shared prefixes
_SESSION_STREAM = 0x5E55  # rng stream of a session's turns
_BLOCK_STREAM = 0xB10C  # rng stream of a trace's hash-id blocks


class WorkloadError(ValueError):
    """A workload that cannot be built (bad arguments, an unreadable trace line)."""


def _whole(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= int(value) <= high:
        raise WorkloadError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def _draw(rng: np.random.Generator, n: int, endpoint: str, tokens: TokenWindow) -> list[Any]:
    """``n`` prompt tokens: ids from the window (completions) or words (chat)."""
    if endpoint == "completions":
        ids: list[Any] = tokens.draw(rng, n).tolist()
        return ids
    return [_WORDS[w] for w in rng.integers(0, len(_WORDS), size=n)]


def _request(
    index: int,
    prompt: list[Any],
    output_len: int,
    endpoint: str,
    *,
    shared: int,
    session: int | None = None,
    turn: int | None = None,
    messages: tuple[tuple[str, str], ...] | None = None,
) -> PlannedRequest:
    if endpoint == "completions":
        return PlannedRequest(
            index,
            len(prompt),
            output_len,
            pack_token_ids(prompt),
            None,
            session=session,
            turn=turn,
            shared_prefix_tokens=shared,
        )
    return PlannedRequest(
        index,
        len(prompt),
        output_len,
        None,
        " ".join(prompt) if messages is None else None,
        session=session,
        turn=turn,
        shared_prefix_tokens=shared,
        messages=messages,
    )


# -- multi-turn sessions --------------------------------------------------------------


@dataclass(frozen=True)
class Sessions:
    """Multi-turn conversations (see the module docstring): ``turns`` per session,
    ``think_time`` seconds between a response and the next turn, and optionally
    ``prefixes`` shared prefixes of ``prefix_len`` tokens."""

    turns: int = 2
    think_time: float = 0.0
    prefixes: int = 0
    prefix_len: int = 0

    def __post_init__(self) -> None:
        _whole("Sessions(turns=)", self.turns, 1, MAX_TURNS)
        _whole("Sessions(prefixes=)", self.prefixes, 0, 1_000_000)
        _whole("Sessions(prefix_len=)", self.prefix_len, 0, 10_000_000)
        think = self.think_time
        if isinstance(think, bool) or not isinstance(think, numbers.Real) or not 0 <= think < math.inf:
            raise WorkloadError(f"Sessions(think_time=) must be seconds >= 0, got {think!r}")
        if (self.prefixes == 0) != (self.prefix_len == 0):
            raise WorkloadError(
                f"Sessions(prefixes={self.prefixes}, prefix_len={self.prefix_len}): give both (P shared prefixes "
                "of L tokens) or neither"
            )

    def prefix(self, session: int, seed: int, endpoint: str, tokens: TokenWindow) -> list[Any]:
        """The shared prefix session ``session`` opens with (empty without prefixes)."""
        if not self.prefixes:
            return []
        rng = np.random.default_rng([seed, _PREFIX_STREAM, session % self.prefixes])
        return _draw(rng, self.prefix_len, endpoint, tokens)

    def plan(
        self, scenario: Scenario, session: int, seed: int, tokens: TokenWindow, first_index: int = 0
    ) -> list[PlannedRequest]:
        """Every turn of session ``session``, indexed from ``first_index``; depends only on
        (seed, session) and the token window.

        Designed reuse: turn 1 shares its prefix with the first session that used it (session
        ``session mod prefixes``, so every session from ``prefixes`` on reuses it); turn *k*
        repeats all of turn *k - 1*'s prompt.
        """
        endpoint = scenario.endpoint
        rng = np.random.default_rng([seed, _SESSION_STREAM, session])
        prefix = self.prefix(session, seed, endpoint, tokens)
        history = list(prefix)
        chat = endpoint == "chat"
        messages: list[tuple[str, str]] = [("system", " ".join(prefix))] if prefix and chat else []
        out: list[PlannedRequest] = []
        previous = len(prefix) if session >= self.prefixes else 0
        for turn in range(1, self.turns + 1):
            isl, osl = scenario.sample_lengths(rng)
            user = _draw(rng, isl, endpoint, tokens)
            history.extend(user)
            if chat:
                messages.append(("user", " ".join(user)))
            out.append(
                _request(
                    first_index + turn - 1,
                    list(history),
                    osl,
                    endpoint,
                    shared=previous,
                    session=session,
                    turn=turn,
                    messages=tuple(messages) if chat else None,
                )
            )
            previous = len(history)
            answer = _draw(rng, osl, endpoint, tokens)  # the answer's stand-in in the history
            history.extend(answer)
            if chat:
                messages.append(("assistant", " ".join(answer)))
        return out

    def describe(self) -> str:
        shared = f", {self.prefixes} shared prefixes of {self.prefix_len} tokens" if self.prefixes else ""
        return f"{self.turns}-turn sessions, think {self.think_time:g} s{shared}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "sessions",
            "turns": self.turns,
            "think_time": self.think_time,
            "prefixes": self.prefixes,
            "prefix_len": self.prefix_len,
        }


# -- trace replay ------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceEntry:
    """One line of a Mooncake trace."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class Trace:
    """A Mooncake-format trace to replay; ``Trace.load(path, speedup=...)``."""

    entries: tuple[TraceEntry, ...]
    speedup: float = 1.0
    source: str = ""
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    _shared: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.entries:
            raise WorkloadError(f"trace {self.source or ''} has no requests".replace("  ", " "))
        speed = self.speedup
        if isinstance(speed, bool) or not isinstance(speed, numbers.Real) or not 0 < speed < math.inf:
            raise WorkloadError(f"Trace(speedup=) must be a number > 0, got {speed!r}")
        _whole("Trace(block_tokens=)", self.block_tokens, 1, 1 << 20)
        object.__setattr__(self, "_shared", tuple(_shared_prefixes(self.entries, self.block_tokens)))

    @classmethod
    def load(cls, path: str | Path, *, speedup: float = 1.0, limit: int | None = None) -> Trace:
        """Read a JSONL trace (``limit``: its first N lines only)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise WorkloadError(f"cannot read the trace {path}: {exc.strerror or exc}") from None
        return cls(tuple(parse_trace(text.splitlines(), str(path), limit)), speedup, str(path))

    def offsets(self) -> np.ndarray:
        """Send offsets in seconds from the first request: the timestamps over ``speedup``."""
        stamps = np.array([e.timestamp_ms for e in self.entries], dtype=float)
        return (stamps - stamps[0]) / 1000.0 / self.speedup

    def plan(self, j: int, index: int, seed: int, endpoint: str, tokens: TokenWindow) -> PlannedRequest:
        """Entry ``j``'s request: one fixed block of tokens per hash id, cut to its input
        length (random tokens of its own where the hash ids do not cover it)."""
        entry = self.entries[j]
        prompt: list[Any] = []
        for h in entry.hash_ids:
            if len(prompt) >= entry.input_length:
                break
            prompt.extend(_draw(np.random.default_rng([seed, _BLOCK_STREAM, h]), self.block_tokens, endpoint, tokens))
        if len(prompt) < entry.input_length:
            rng = np.random.default_rng([seed, _BLOCK_STREAM, 1 << 62, j])
            prompt.extend(_draw(rng, entry.input_length - len(prompt), endpoint, tokens))
        del prompt[entry.input_length :]
        return _request(index, prompt, entry.output_length, endpoint, shared=self._shared[j])

    @property
    def duration(self) -> float:
        """Seconds from the first request's send to the last's, at this speed-up."""
        return float(self.offsets()[-1])

    def describe(self) -> str:
        return f"trace {Path(self.source).name or '(inline)'} ({len(self.entries)} requests, x{self.speedup:g})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "trace",
            "source": self.source,
            "requests": len(self.entries),
            "speedup": self.speedup,
            "block_tokens": self.block_tokens,
            "duration_s": self.duration,
        }


def parse_trace(lines: Iterable[str], source: str = "trace", limit: int | None = None) -> Iterator[TraceEntry]:
    """Mooncake JSONL lines as entries; a bad line is an error naming its line and field."""
    count = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if limit is not None and count >= limit:
            return
        if count >= MAX_TRACE_LINES:
            raise WorkloadError(f"{source}: more than {MAX_TRACE_LINES} requests; replay a part of it (limit=)")
        where = f"{source} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise WorkloadError(f"{where}: expected an object with timestamp, input_length, output_length, hash_ids")
        stamp = obj.get("timestamp")
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp) or stamp < 0:
            raise WorkloadError(f"{where}: 'timestamp' must be milliseconds >= 0, got {stamp!r}")
        input_length = _whole(f"{where}: 'input_length'", obj.get("input_length"), 1, 10_000_000)
        output_length = _whole(f"{where}: 'output_length'", obj.get("output_length"), 1, 10_000_000)
        hash_ids = obj.get("hash_ids", [])
        if not isinstance(hash_ids, list) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hash_ids
        ):
            raise WorkloadError(f"{where}: 'hash_ids' must be a list of whole numbers >= 0")
        count += 1
        yield TraceEntry(float(stamp), input_length, output_length, tuple(hash_ids))


def _shared_prefixes(entries: Iterable[TraceEntry], block_tokens: int) -> Iterator[int]:
    """Per entry, the prompt tokens at its start that an earlier entry's prompt also had.

    A hash id stands for one block and everything before it, so the prompts agree up to
    where an earlier prompt covered that block: a block an earlier prompt had only part of
    (its partial last block) is shared only that far, and the sharing stops there.
    """
    covered: dict[int, int] = {}  # hash id -> most tokens of its block an earlier prompt had
    for entry in entries:
        shared = 0
        lengths = [min(block_tokens, entry.input_length - i * block_tokens) for i in range(len(entry.hash_ids))]
        for h, length in zip(entry.hash_ids, lengths):
            if length <= 0:
                break
            have = covered.get(h, 0)
            shared += min(length, have)
            if have < length:
                break
        yield shared
        for h, length in zip(entry.hash_ids, lengths):
            if length > covered.get(h, 0):
                covered[h] = length


Workload = Sessions | Trace


def designed_reuse(shared: Iterable[int | None], prompts: Iterable[int | None]) -> float:
    """The share of prompt tokens the workload designed to repeat an earlier prompt's start:
    sum of ``shared_prefix_tokens`` over sum of prompt tokens (0.0 with no prompt tokens)."""
    total = sum(p or 0 for p in prompts)
    return sum(s or 0 for s in shared) / total if total else 0.0

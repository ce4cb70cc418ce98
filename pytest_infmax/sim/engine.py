"""The simulator's engine: a continuous-batching scheduler and the clocks that drive it.

Latency in a real engine comes from its step loop: every step runs one forward pass
that prefills (chunks of) newly admitted prompts and decodes one token for each
running sequence, so per-token latency grows with the batch, and new requests queue
once the batch or the KV cache is full. This module has that loop once, as the
clock-free :class:`Scheduler`, and two drivers of it:

* :class:`Engine` runs it in real time on the event loop, so the load generator
  measures the same shapes (TTFT, TPOT, queueing) it would on a GPU;
* :func:`simulate` runs the same scheduler and cost model in simulated time (a
  discrete-event run: no sleeping), so sweeps and calibration finish in seconds.

Scheduling, as in vLLM (V1) and TensorRT-LLM:

* requests are admitted first come, first served, while fewer than
  ``max_num_seqs`` run and the KV cache has room (head-of-line: a request that does
  not fit blocks the ones behind it);
* KV cache: ``kv_cache_tokens`` (None: unlimited) in blocks of ``block_size``
  tokens. A request is admitted only once blocks for its whole prompt +
  ``max_tokens`` are free, and holds them until it ends: TensorRT-LLM's default
  ``GUARANTEED_NO_EVICT`` capacity policy. Nothing is ever preempted. A request
  that could never fit is refused at :meth:`Engine.submit`;
* prefix caching (``enable_prefix_caching``, off by default: benchmark prompts are
  random token ids, which never share a prefix): a request whose first prompt blocks
  are cached skips their prefill, LRU eviction of unused cached blocks under the KV
  capacity (:mod:`pytest_infmax.sim.prefixcache`);
* each step decodes one token for every sequence whose prefill is done, then
  spends what is left of the step's token budget (``max_num_batched_tokens``;
  None: no joint budget) on prefill chunks, at most ``max_prefill_tokens_per_step``
  prompt tokens per step (chunked prefill mixed with decode). The step that
  completes a prompt's prefill produces that request's first token.

How long a step takes comes from a pluggable :class:`StepCostModel` (times
``slowdown``). A cost model may also implement ``batch_seconds(batch)`` to see the
per-sequence shape of the step (:class:`StepBatch`), as the roofline model
(:mod:`pytest_infmax.sim.roofline`) does.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import enum
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from pytest_infmax.sim.prefixcache import UNLIMITED_CACHE_BLOCKS, PrefixCache

logger = logging.getLogger("pytest_infmax.sim")

FINISH_LENGTH = "length"
FINISH_ABORT = "abort"  # the engine stopped before the request finished (server shutdown)

# If the loop falls this far behind its absolute schedule (an overloaded event loop),
# the schedule is rebased on "now" instead of bursting the missed steps back to back.
_MAX_SCHEDULE_LAG_S = 0.05
# Lateness percentiles in /sim/stats: counted in bins of 10 us up to 100 ms (LatenessHistogram)
LATENESS_BIN_S = 1e-5
LATENESS_RANGE_S = 0.1
_LATENESS_BINS = round(LATENESS_RANGE_S / LATENESS_BIN_S)
_LATENESS_BINS_PER_S = 1.0 / LATENESS_BIN_S
# The event loop waits in epoll, whose timeout has 1 ms resolution and is rounded up,
# so a timer at the deadline fires 0-1 ms late. The step timer is set this much early
# instead, and a timer that fires before the deadline sleeps the rest (at most this
# long, and only the step loop's own idle time), so steps end within ~0.5 ms of it.
# On a loop whose timers fire to the microsecond (the simulator's: sim/pollclock.py) the
# server sets ``Engine.timer_lead_s`` to PRECISE_TIMER_LEAD_S instead.
_TIMER_LEAD_S = 0.0005
PRECISE_TIMER_LEAD_S = 0.0003  # a timed wait's overshoot: p90 0.1 ms, p99 0.3 on a VM here
# A sleep overshoots too (the kernel's timer slack and the wake-up: ~0.08 ms here), so the
# last part of the wait for a step's end is spun instead of slept.
_SPIN_S = 0.00015
# A step's output is made before its end, so that at the deadline only the writing of it is
# left (docs/calibration.md, "Events made ahead"): the step's timer fires early by what the
# recent steps' completion took per request, plus the consumer's estimate of its making
# (``Engine.making_seconds``), times this margin (a step where many streams start or end makes
# costlier events), plus a floor, at most _MAX_MAKE_AHEAD_S; the tokens are handed out at the
# deadline, the loop free until then.
_MAKE_AHEAD_MARGIN = 3.0
_MIN_MAKE_AHEAD_S = 0.0005
_MAX_MAKE_AHEAD_S = 0.02


class LatenessHistogram:
    """How late things happened against their schedule, in seconds, over everything since the
    start: p50 and p99 to LATENESS_BIN_S (each bin read as its middle), the count and the exact
    max. The engine keeps one for its steps; the HTTP front end one for its writes
    (``/sim/stats``). A window of the last values would describe a run's last steps only (at
    1,000 streams, 8,192 writes are its last 8 steps), not the run."""

    __slots__ = ("_bins", "count", "max")

    def __init__(self) -> None:
        # counts per bin of LATENESS_BIN_S; the last bin holds everything from LATENESS_RANGE_S up
        self._bins = [0] * (_LATENESS_BINS + 1)
        self.count = 0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        if seconds > self.max:
            self.max = seconds
        index = int(seconds * _LATENESS_BINS_PER_S)
        if index < 0:  # early (a clock's jitter): counted as on time
            index = 0
        elif index > _LATENESS_BINS:
            index = _LATENESS_BINS
        self._bins[index] += 1

    def percentiles(self, *qs: float) -> list[float]:
        """The nearest-rank ``q``-th percentiles in seconds (0.0 when empty): each the middle of
        its bin, at most the max (the last bin's values read as the max)."""
        if not self.count:
            return [0.0 for _ in qs]
        cumulative = list(itertools.accumulate(self._bins))  # once for every q
        found = []
        for q in qs:
            index = bisect.bisect_left(cumulative, max(1, math.ceil(q / 100.0 * self.count)))
            found.append(self.max if index >= _LATENESS_BINS else min((index + 0.5) * LATENESS_BIN_S, self.max))
        return found

    def percentile(self, q: float) -> float:
        return self.percentiles(q)[0]

    def summary_ms(self) -> dict[str, float]:
        """count, p50, p99 and max since the start, in ms."""
        p50, p99 = self.percentiles(50, 99)
        return {"count": self.count, "p50": p50 * 1e3, "p99": p99 * 1e3, "max": self.max * 1e3}


class StepCostModel(Protocol):
    """How long one engine step takes; the only thing a new cost model must provide."""

    def step_seconds(self, num_decode: int, prefill_tokens: int, context_tokens: int) -> float:
        """Duration of a step that decodes ``num_decode`` sequences and prefills
        ``prefill_tokens`` prompt tokens, attending over ``context_tokens`` tokens of
        KV cache in total (decode contexts plus the prefilled prompts so far)."""
        ...


class StepBatch(NamedTuple):
    """The full shape of one step, for cost models that implement
    ``batch_seconds(batch)`` instead of (or as well as) ``step_seconds``."""

    num_decode: int
    prefill_tokens: int
    context_tokens: int  # as passed to step_seconds
    decode_contexts: list[int]  # per decoding sequence: KV tokens it attends over
    prefill_chunks: list[tuple[int, int]]  # per prefilling sequence: (tokens already cached, chunk)


@dataclass(frozen=True)
class LinearCostModel:
    """A step costs a fixed overhead, plus a per-sequence decode cost, plus prefill
    cost proportional to the prompt tokens processed. Cheap and predictable, which is
    what tests want; it ignores context length."""

    decode_step_ms: float = 4.0
    decode_ms_per_seq: float = 0.05
    prefill_ms_per_1k_tokens: float = 20.0

    def step_seconds(self, num_decode: int, prefill_tokens: int, context_tokens: int) -> float:
        milliseconds = (
            self.decode_step_ms
            + self.decode_ms_per_seq * num_decode
            + self.prefill_ms_per_1k_tokens * prefill_tokens / 1000.0
        )
        return max(0.0, milliseconds) / 1000.0


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler limits, named after their vLLM / SGLang / TensorRT-LLM counterparts."""

    max_num_seqs: int = 256
    max_prefill_tokens_per_step: int = 8192
    stream_interval: int = 1
    max_num_batched_tokens: int | None = None  # decode + prefill tokens per step; None: no joint budget
    kv_cache_tokens: int | None = None  # KV-cache capacity; None: unlimited
    block_size: int = 16  # KV-cache block, in tokens
    slowdown: float = 1.0  # every step's duration is multiplied by this
    enable_prefix_caching: bool = False  # vLLM's automatic prefix caching (sim.prefixcache)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_prefill_tokens_per_step < 1:
            raise ValueError("max_prefill_tokens_per_step must be >= 1")
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(
                f"kv_cache_tokens must hold at least one block ({self.block_size} tokens), got {self.kv_cache_tokens}"
            )
        if not (self.slowdown > 0 and math.isfinite(self.slowdown)):
            raise ValueError(f"slowdown must be a finite number > 0, got {self.slowdown}")

    @property
    def kv_cache_blocks(self) -> int | None:
        return None if self.kv_cache_tokens is None else self.kv_cache_tokens // self.block_size


class TokenDelivery(NamedTuple):
    """A group of output tokens handed to the request's consumer.

    ``finish_reason`` is None until the delivery that ends the request; it is
    ``"length"`` for a normal finish and ``"abort"`` (with ``token_count`` 0) when
    the engine stopped under the request."""

    token_count: int
    emit_time: float  # loop.time() when the step that produced the tokens ended
    finish_reason: str | None


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class EngineRequest:
    """One generation request as the scheduler sees it: only token counts, no text."""

    __slots__ = (
        "request_id",
        "prompt_tokens",
        "max_tokens",
        "deliveries",
        "state",
        "prefilled_tokens",
        "generated_tokens",
        "undelivered_tokens",
        "decoding",
        "kv_blocks",
        "scheduled_time",
        "block_hashes",
        "cache_refs",
        "cached_tokens",
        "sink",
    )

    def __init__(
        self,
        request_id: int,
        prompt_tokens: int,
        max_tokens: int,
        *,
        with_queue: bool = True,
        block_hashes: tuple[int, ...] = (),
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        # The real-time engine hands tokens over through this queue; simulated runs
        # record them directly and have none.
        self.deliveries: asyncio.Queue[TokenDelivery] = asyncio.Queue() if with_queue else None  # type: ignore[assignment]
        self.state = RequestState.WAITING
        self.prefilled_tokens = 0
        self.generated_tokens = 0
        self.undelivered_tokens = 0
        self.decoding = False  # True once prefill is done and the first token produced
        self.kv_blocks = 0  # KV-cache blocks held while running
        self.scheduled_time: float | None = None  # real-time engine: first step it was in (queue time)
        self.block_hashes = block_hashes  # prefix caching: the chained hash of each full prompt block
        self.cache_refs: list[int] = []  # cached blocks this request uses (hits, then the ones it added)
        self.cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        # The real-time engine calls this, when set, with each delivery instead of queueing it:
        # the consumer handles it synchronously inside the step (no task wake-up per delivery).
        # It must not raise, and must not call back into the engine.
        self.sink: Callable[[TokenDelivery], None] | None = None

    @property
    def done(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.CANCELLED)


@dataclass(frozen=True)
class EngineStats:
    requests_received: int
    requests_finished: int
    requests_cancelled: int
    running: int
    waiting: int
    # Fraction of KV-cache blocks held by running requests (0.0 when unlimited).
    kv_cache_usage: float = 0.0
    # Real-time engine: how late steps ended against their schedule (actual emit
    # time - deadline), in ms, over every step since the start: count, p50, p99 (to
    # 0.01 ms), max.
    lateness_ms: dict[str, float] = field(default_factory=dict)
    # Prefix caching: prompt tokens looked up and found (vLLM's prefix_cache_queries / _hits)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class EngineStopped(RuntimeError):
    """Raised by :meth:`Engine.submit` once the engine has been stopped."""


class RequestTooLarge(ValueError):
    """The request's prompt + max_tokens can never fit in the KV cache."""


@dataclass
class StepPlan:
    """What one step does, fixed before it runs so arrivals mid-step wait for the next."""

    prefill: list[tuple[EngineRequest, int]]  # (request, prompt tokens prefilled this step)
    decode: list[EngineRequest]

    def prefill_tokens(self) -> int:
        return sum(chunk for _, chunk in self.prefill)

    def size(self) -> int:
        """Requests in the step."""
        return len(self.prefill) + len(self.decode)

    def context_tokens(self) -> int:
        decode_context = sum(r.prompt_tokens + r.generated_tokens for r in self.decode)
        prefill_context = sum(r.prefilled_tokens + chunk for r, chunk in self.prefill)
        return decode_context + prefill_context

    def batch(self) -> StepBatch:
        decode_contexts = [r.prompt_tokens + r.generated_tokens for r in self.decode]
        prefill_chunks = [(r.prefilled_tokens, chunk) for r, chunk in self.prefill]
        prefill_tokens = sum(chunk for _, chunk in prefill_chunks)
        context = sum(decode_contexts) + sum(cached + chunk for cached, chunk in prefill_chunks)
        return StepBatch(len(decode_contexts), prefill_tokens, context, decode_contexts, prefill_chunks)


_StepPlan = StepPlan  # the name before the scheduler was split out


def step_duration(cost_model: StepCostModel, plan: StepPlan, slowdown: float = 1.0) -> float:
    """Seconds the step takes: the cost model's answer (its ``batch_seconds`` when it
    has one) times ``slowdown``. Both drivers call this, so they agree exactly."""
    batch_seconds = getattr(cost_model, "batch_seconds", None)
    if batch_seconds is not None:
        seconds = batch_seconds(plan.batch())
    else:
        seconds = cost_model.step_seconds(len(plan.decode), plan.prefill_tokens(), plan.context_tokens())
    return max(0.0, seconds) * slowdown


Deliver = Callable[[EngineRequest, TokenDelivery], None]


class Scheduler:
    """The continuous-batching scheduler, without a clock (see the module docstring).

    A driver calls :meth:`schedule` to admit waiting requests and fix the next
    step, lets the step's duration pass (really or in simulation), then calls
    :meth:`complete` with the time it ended; tokens go out through ``deliver``.
    """

    def __init__(self, config: EngineConfig, deliver: Deliver) -> None:
        self.config = config
        self._deliver = deliver
        self._stream_interval = config.stream_interval
        self._waiting: collections.OrderedDict[int, EngineRequest] = collections.OrderedDict()
        self._running: dict[int, EngineRequest] = {}  # admission order
        self._prefilling: dict[int, EngineRequest] = {}  # running, prompt not done (admission order)
        self._decoding: dict[int, EngineRequest] = {}  # running, producing tokens
        self.total_blocks = config.kv_cache_blocks
        self.free_blocks = self.total_blocks
        self.prefix_cache: PrefixCache | None = (
            PrefixCache(config.block_size, UNLIMITED_CACHE_BLOCKS if self.total_blocks is None else None)
            if config.enable_prefix_caching
            else None
        )
        self.requests_received = 0
        self.requests_finished = 0
        self.requests_cancelled = 0

    # -- requests ------------------------------------------------------------------

    def blocks_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        return -(-(prompt_tokens + max_tokens) // self.config.block_size)

    def add(self, request: EngineRequest) -> None:
        if self.total_blocks is not None:
            needed = self.blocks_needed(request.prompt_tokens, request.max_tokens)
            if needed > self.total_blocks:
                raise RequestTooLarge(
                    f"prompt ({request.prompt_tokens} tokens) + max_tokens ({request.max_tokens}) = "
                    f"{request.prompt_tokens + request.max_tokens} tokens exceeds the KV cache "
                    f"({self.total_blocks * self.config.block_size} tokens)"
                )
        self.requests_received += 1
        self._waiting[request.request_id] = request

    def cancel(self, request: EngineRequest) -> None:
        if request.done:
            return
        self._waiting.pop(request.request_id, None)
        if self._running.pop(request.request_id, None) is not None:
            self._prefilling.pop(request.request_id, None)
            self._decoding.pop(request.request_id, None)
            self._release(request)
        request.state = RequestState.CANCELLED
        self.requests_cancelled += 1

    def abort_all(self, now: float) -> None:
        """End every open request with an ``abort`` delivery (engine shutdown)."""
        for request in [*self._waiting.values(), *self._running.values()]:
            request.state = RequestState.CANCELLED
            self._release(request)
            self._deliver(request, TokenDelivery(0, now, FINISH_ABORT))
        self._waiting.clear()
        self._running.clear()
        self._prefilling.clear()
        self._decoding.clear()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Blocks held by running requests (cached blocks no request uses count as free, as in vLLM)."""
        if not self.total_blocks:
            return 0.0
        unused = self.prefix_cache.unused_blocks if self.prefix_cache is not None else 0
        return (self.total_blocks - (self.free_blocks or 0) - unused) / self.total_blocks

    # -- steps ---------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """Admit what fits, then fix the next step; None when nothing can run."""
        self._admit()
        if not self._running:
            return None
        config = self.config
        token_budget = config.max_num_batched_tokens
        decode = list(self._decoding.values())
        if token_budget is not None:
            if len(decode) > token_budget:
                decode = decode[:token_budget]
            token_budget -= len(decode)
        prefill_budget = config.max_prefill_tokens_per_step
        if token_budget is not None:
            prefill_budget = min(prefill_budget, token_budget)
        prefill: list[tuple[EngineRequest, int]] = []
        for request in self._prefilling.values():
            remaining = request.prompt_tokens - request.prefilled_tokens
            chunk = min(remaining, prefill_budget)
            if chunk == 0 and remaining > 0:
                continue  # the step's prefill budget is spent; waits for the next step
            prefill.append((request, chunk))
            prefill_budget -= chunk
        if not decode and not prefill:
            return None
        return StepPlan(prefill=prefill, decode=decode)

    def complete(self, plan: StepPlan, emit_time: float) -> None:
        """Apply a finished step: advance prefills, hand out the step's tokens."""
        running = RequestState.RUNNING
        emit = self._emit_token
        for request, chunk in plan.prefill:
            if request.state is not running:
                continue  # cancelled while the step ran
            request.prefilled_tokens += chunk
            if request.prefilled_tokens >= request.prompt_tokens:
                if self.prefix_cache is not None:
                    self._cache_prompt(request)
                request.decoding = True
                del self._prefilling[request.request_id]
                self._decoding[request.request_id] = request
                emit(request, emit_time)
        for request in plan.decode:
            if request.state is running:  # else cancelled while the step ran
                emit(request, emit_time)

    def _admit(self) -> None:
        waiting = self._waiting
        max_num_seqs = self.config.max_num_seqs
        cache = self.prefix_cache
        while waiting and len(self._running) < max_num_seqs:
            request = next(iter(waiting.values()))
            hits: tuple[int, ...] = ()
            if cache is not None:
                hits = request.block_hashes[: cache.match(request.block_hashes, request.prompt_tokens)]
            if self.total_blocks is not None:
                needed = self.blocks_needed(request.prompt_tokens, request.max_tokens) - len(hits)
                assert self.free_blocks is not None
                evictable = cache.unused_blocks - cache.unused_among(hits) if cache is not None else 0
                if needed > self.free_blocks + evictable:
                    return  # head of line waits for KV blocks; FCFS, no skipping
                if cache is not None:
                    cache.acquire(hits, request.prompt_tokens)
                    if needed > self.free_blocks:  # room from the least recently used cached blocks
                        self.free_blocks += cache.evict(needed - self.free_blocks)
                self.free_blocks -= needed
                request.kv_blocks = needed
            elif cache is not None:
                cache.acquire(hits, request.prompt_tokens)
            if hits:
                request.cache_refs = list(hits)
                request.cached_tokens = request.prefilled_tokens = len(hits) * self.config.block_size
            del waiting[request.request_id]
            request.state = RequestState.RUNNING
            self._running[request.request_id] = request
            self._prefilling[request.request_id] = request

    def _release(self, request: EngineRequest) -> None:
        if request.kv_blocks and self.free_blocks is not None:
            self.free_blocks += request.kv_blocks
        request.kv_blocks = 0
        if request.cache_refs and self.prefix_cache is not None:
            self.prefix_cache.release(request.cache_refs)
            request.cache_refs = []

    def _cache_prompt(self, request: EngineRequest) -> None:
        """A prompt's prefill is done: its full blocks not cached yet enter the cache, each one
        of the blocks the request holds handed over to it (so the capacity is counted once)."""
        cache = self.prefix_cache
        assert cache is not None
        for h in request.block_hashes[len(request.cache_refs) :]:
            if cache.insert(h):
                request.cache_refs.append(h)
                if request.kv_blocks:
                    request.kv_blocks -= 1

    def _emit_token(self, request: EngineRequest, emit_time: float) -> None:
        request.generated_tokens += 1
        count = request.undelivered_tokens + 1
        finish_reason = self._finish_reason(request)
        if finish_reason is None and count < self._stream_interval:
            request.undelivered_tokens = count
            return
        request.undelivered_tokens = 0
        if finish_reason is not None:
            self._finish(request)
        self._deliver(request, TokenDelivery(count, emit_time, finish_reason))

    def _finish_reason(self, request: EngineRequest) -> str | None:
        """Why the request stops after its latest token, or None to go on.

        The simulator never samples EOS, so requests always run to ``max_tokens``
        whether or not ``ignore_eos`` was set. This is the hook for an early-stop
        model (return ``"stop"``) should one be wanted."""
        return FINISH_LENGTH if request.generated_tokens >= request.max_tokens else None

    def _finish(self, request: EngineRequest) -> None:
        request.state = RequestState.FINISHED
        del self._running[request.request_id]
        self._decoding.pop(request.request_id, None)
        self._release(request)
        self.requests_finished += 1


# -- real time ----------------------------------------------------------------------------


class Engine:
    """The scheduler driven in real time on the running event loop.

    Each step is a timer: the step is planned, its end is scheduled with
    ``loop.call_at`` at an absolute deadline (so sleep overshoot never accumulates).
    The timer fires a little before the deadline: the step completes then (its
    deliveries go to their sinks, whose consumer makes its events meanwhile), and at
    the deadline the tokens are handed out (``on_output``; queues get theirs) and the
    next step is planned, without a task switch in between. How late each step's
    hand-out was against its deadline is recorded (``stats().lateness_ms``).
    """

    def __init__(self, config: EngineConfig, cost_model: StepCostModel) -> None:
        self._config = config
        self._cost_model = cost_model
        self._scheduler = Scheduler(config, self._put_delivery)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._kick: asyncio.Handle | None = None
        self._previous_deadline: float | None = None
        self._stopped = False
        self._next_request_id = 0
        self._lateness = LatenessHistogram()
        # The consumer's backlog: when set and true at a step's end, the step's tokens are held
        # (the step is not complete) until the consumer calls output_drained(). A front end that
        # writes slower than the engine steps slows the engine down instead of falling behind
        # it without bound; the wait shows as the step's lateness.
        self.backlog: Callable[[], bool] | None = None
        # Called at a step's end, once every delivery of the step went to its sink (before the
        # end: the consumer makes its events meanwhile): the consumer writes what it made now.
        self.on_output: Callable[[], None] | None = None
        # The consumer's estimate of the seconds it needs to make the events of n deliveries
        # (added to how early a step completes).
        self.making_seconds: Callable[[int], float] | None = None
        self.timer_lead_s = _TIMER_LEAD_S  # how early a step's timer fires (see _TIMER_LEAD_S)
        self._held: tuple[StepPlan, float] | None = None
        self._due: list[tuple[EngineRequest, TokenDelivery]] = []  # queue deliveries, put at the end
        self._make_s_per_request = 0.0  # how long completing a step took, per request (recent steps)
        self._busy_s = 0.0

    @property
    def busy_seconds(self) -> float:
        """Modelled time the GPUs spent in steps so far."""
        return self._busy_s

    @property
    def step_running(self) -> bool:
        return self._timer is not None

    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start stepping on the running event loop."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._wake()

    async def stop(self) -> None:
        """Stop stepping and end every open request with an ``abort`` delivery, so
        the HTTP handlers waiting on them return promptly during shutdown."""
        self._stopped = True
        self._held = None
        for handle in (self._timer, self._kick):
            if handle is not None:
                handle.cancel()
        self._timer = self._kick = None
        self._abort_all(asyncio.get_running_loop().time())

    # -- request API ---------------------------------------------------------------

    def submit(self, prompt_tokens: int, max_tokens: int, block_hashes: tuple[int, ...] = ()) -> EngineRequest:
        """Queue a request; its tokens arrive on ``request.deliveries`` (or go to ``request.sink``
        once the consumer sets one). ``block_hashes``: its
        prompt's full blocks (:func:`pytest_infmax.sim.prefixcache.block_hashes`), for prefix caching.

        Raises :class:`RequestTooLarge` when prompt + max_tokens can never fit in
        the KV cache, :class:`EngineStopped` after :meth:`stop`."""
        if self._stopped:
            raise EngineStopped("engine is stopped")
        if prompt_tokens < 0 or max_tokens < 1:
            raise ValueError("prompt_tokens must be >= 0 and max_tokens >= 1")
        request = EngineRequest(self._next_request_id, prompt_tokens, max_tokens, block_hashes=block_hashes)
        self._scheduler.add(request)
        self._next_request_id += 1
        self._wake()
        return request

    def cancel(self, request: EngineRequest) -> None:
        """Drop a request from the queue or the batch (client went away). A finished
        request is left alone, so handlers may call this unconditionally."""
        self._scheduler.cancel(request)

    def stats(self) -> EngineStats:
        scheduler = self._scheduler
        return EngineStats(
            requests_received=scheduler.requests_received,
            requests_finished=scheduler.requests_finished,
            requests_cancelled=scheduler.requests_cancelled,
            running=scheduler.num_running,
            waiting=scheduler.num_waiting,
            kv_cache_usage=scheduler.kv_cache_usage,
            lateness_ms=self.lateness_ms(),
            prefix_cache_queries=scheduler.prefix_cache.queries if scheduler.prefix_cache is not None else 0,
            prefix_cache_hits=scheduler.prefix_cache.hits if scheduler.prefix_cache is not None else 0,
        )

    def lateness_ms(self) -> dict[str, float]:
        """count, p50, p99 and max over every step since the start, in ms."""
        return self._lateness.summary_ms()

    # -- step loop -----------------------------------------------------------------

    def _wake(self) -> None:
        """Plan a step soon if the engine is idle (never synchronously: a request
        submitted now is admitted at the next step, as in a real engine)."""
        if (
            self._loop is not None
            and not self._stopped
            and self._timer is None
            and self._kick is None
            and self._held is None
        ):
            self._kick = self._loop.call_soon(self._begin_step)

    def _begin_step(self) -> None:
        self._kick = None
        loop = self._loop
        assert loop is not None
        plan = self._scheduler.schedule()
        if plan is None:
            self._previous_deadline = None  # idle: the next step starts from "now"
            return
        try:
            duration = step_duration(self._cost_model, plan, self._config.slowdown)
        except Exception:
            logger.exception("infmax-sim: the cost model failed; aborting every request")
            self._abort_all(loop.time())
            return
        now = loop.time()
        for request, _ in plan.prefill:  # first scheduled: ends the server's queue-time metric
            if request.scheduled_time is None:
                request.scheduled_time = now
        previous = self._previous_deadline
        if previous is None or now - previous > _MAX_SCHEDULE_LAG_S:
            previous = now
        deadline = previous + duration
        size = plan.size()
        making = self._make_s_per_request * size
        if self.making_seconds is not None:
            making += self.making_seconds(size)
        ahead = min(_MAX_MAKE_AHEAD_S, _MIN_MAKE_AHEAD_S + _MAKE_AHEAD_MARGIN * making)
        self._timer = loop.call_at(deadline - self.timer_lead_s - ahead, self._end_step, plan, deadline, duration)

    def _end_step(self, plan: StepPlan, deadline: float, duration: float = 0.0) -> None:
        self._timer = None
        self._busy_s += duration  # modelled GPU time, for /sim/power
        backlog = self.backlog
        if backlog is not None and backlog():
            self._held = (plan, deadline)  # output_drained() completes it
            return
        self._complete_step(plan, deadline)

    def output_drained(self) -> None:
        """The consumer wrote what it had: a step held for it (see ``backlog``) completes now."""
        held = self._held
        if held is not None and not self._stopped:
            self._held = None
            self._complete_step(*held)

    def _complete_step(self, plan: StepPlan, deadline: float) -> None:
        """Complete the step (its deliveries go to their sinks, which make their events now),
        then hand its tokens out at the deadline: at once if it is near or past, else from a
        timer just before it, the loop free meanwhile."""
        loop = self._loop
        assert loop is not None
        start = loop.time()
        self._scheduler.complete(plan, max(start, deadline))  # tokens are due at the step's end
        made = loop.time()
        size = plan.size()
        if size:  # mostly the same batch from step to step: an average of the last few
            self._make_s_per_request += ((made - start) / size - self._make_s_per_request) / 4
        lead = self.timer_lead_s
        if deadline - made > lead:
            self._timer = loop.call_at(deadline - lead, self._hand_out, deadline)
        else:
            self._hand_out(deadline)

    def _hand_out(self, deadline: float) -> None:
        """The step's end: its tokens go out (the sinks' consumer writes, queues get theirs),
        and the next step is planned."""
        self._timer = None
        loop = self._loop
        assert loop is not None
        early = deadline - loop.time()
        if early > _SPIN_S:
            time.sleep(min(early, self.timer_lead_s) - _SPIN_S)
        while loop.time() < deadline:  # at most _SPIN_S, plus a short sleep's overshoot
            pass
        self._lateness.add(loop.time() - deadline)
        self._release()
        self._previous_deadline = deadline
        self._begin_step()

    def _release(self) -> None:
        due, self._due = self._due, []
        for request, delivery in due:
            request.deliveries.put_nowait(delivery)
        if self.on_output is not None:
            self.on_output()

    def _abort_all(self, now: float) -> None:
        """End every open request with an abort delivery, handed out at once."""
        self._scheduler.abort_all(now)
        self._release()

    def _put_delivery(self, request: EngineRequest, delivery: TokenDelivery) -> None:
        sink = request.sink
        if sink is not None:
            sink(delivery)
        else:
            self._due.append((request, delivery))


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


# -- simulated time -----------------------------------------------------------------------


@dataclass(frozen=True)
class SimulatedRequest:
    """One request of a simulated run; times in seconds from the run's start."""

    prompt_tokens: int
    output_tokens: int
    sent: float
    first_token: float
    finished: float

    @property
    def ttft(self) -> float:
        return self.first_token - self.sent

    @property
    def e2e(self) -> float:
        return self.finished - self.sent

    @property
    def tpot(self) -> float:
        """InferenceMAX's TPOT: (E2E - TTFT) / (output tokens - 1)."""
        if self.output_tokens < 2:
            return 0.0
        return (self.finished - self.first_token) / (self.output_tokens - 1)


@dataclass(frozen=True)
class SimulationResult:
    """What a simulated run measured, in the load generator's terms."""

    requests: list[SimulatedRequest]
    duration: float  # first request sent -> last request finished, seconds
    steps: int
    max_running: int  # the largest batch any step had

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.requests)

    @property
    def input_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration if self.duration > 0 else 0.0

    @property
    def total_throughput(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.duration if self.duration > 0 else 0.0

    def percentile(self, metric: str, q: float) -> float:
        """``metric`` is ``ttft``, ``tpot`` or ``e2e``; seconds."""
        return _percentile(sorted(getattr(r, metric) for r in self.requests), q)

    def median(self, metric: str) -> float:
        return self.percentile(metric, 50)

    def mean(self, metric: str) -> float:
        values = [getattr(r, metric) for r in self.requests]
        return sum(values) / len(values) if values else 0.0

    @property
    def interactivity(self) -> float:
        """Median per-request 1 / TPOT (tok/s/user)."""
        return _percentile(sorted(1.0 / r.tpot for r in self.requests if r.tpot > 0), 50)


class _Recorder:
    __slots__ = ("request", "sent", "first_token")

    def __init__(self, request: EngineRequest, sent: float) -> None:
        self.request = request
        self.sent = sent
        self.first_token: float | None = None


def simulate(
    config: EngineConfig,
    cost_model: StepCostModel,
    requests: Iterable[tuple[int, int]],
    *,
    concurrency: int | None = None,
    max_steps: int | None = None,
) -> SimulationResult:
    """Run ``requests`` ((prompt tokens, max_tokens) pairs) through the same
    :class:`Scheduler` and :func:`step_duration` as the real-time engine, in
    simulated time.

    ``concurrency=N`` is the load generator's closed loop: N requests in flight, the
    next one sent when one finishes (it joins at the step after, like a request
    arriving while a step runs). ``concurrency=None`` sends them all at time 0
    (an offline max-throughput run, as ``trtllm-bench throughput`` does).
    """
    pending = collections.deque(requests)
    total = len(pending)
    if total == 0:
        raise ValueError("simulate needs at least one request")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    recorders: dict[int, _Recorder] = {}
    done: list[SimulatedRequest] = []
    arrivals: list[EngineRequest] = []
    next_id = 0

    def deliver(request: EngineRequest, delivery: TokenDelivery) -> None:
        recorder = recorders[request.request_id]
        if recorder.first_token is None:
            recorder.first_token = delivery.emit_time
        if delivery.finish_reason is not None:
            del recorders[request.request_id]
            done.append(
                SimulatedRequest(
                    request.prompt_tokens,
                    request.generated_tokens,
                    recorder.sent,
                    recorder.first_token,
                    delivery.emit_time,
                )
            )
            if pending:
                arrivals.append(send(delivery.emit_time))

    scheduler = Scheduler(config, deliver)

    def send(now: float) -> EngineRequest:
        nonlocal next_id
        prompt_tokens, max_tokens = pending.popleft()
        if prompt_tokens < 0 or max_tokens < 1:
            raise ValueError("prompt_tokens must be >= 0 and max_tokens >= 1")
        request = EngineRequest(next_id, prompt_tokens, max_tokens, with_queue=False)
        next_id += 1
        recorders[request.request_id] = _Recorder(request, now)
        return request

    first_wave = total if concurrency is None else min(concurrency, total)
    for _ in range(first_wave):
        scheduler.add(send(0.0))
    now = 0.0
    steps = 0
    max_running = 0
    while scheduler.has_work or arrivals:
        plan = scheduler.schedule()
        if plan is None and scheduler.has_work:  # not reachable: add() refuses what never fits
            raise RuntimeError("simulate: the scheduler has requests but cannot run any")
        for request in arrivals:  # sent while the last step ran: admitted from the next one
            scheduler.add(request)
        arrivals.clear()
        if plan is None:
            continue
        max_running = max(max_running, len(plan.decode) + len(plan.prefill))
        now += step_duration(cost_model, plan, config.slowdown)
        scheduler.complete(plan, now)
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
    return SimulationResult(done, now, steps, max_running)

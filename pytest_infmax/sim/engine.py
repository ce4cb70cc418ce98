"""The simulator's engine: a real-time step loop shaped like a serving engine's scheduler.

Latency in a real engine comes from its step loop: every step runs one forward pass
that prefills newly admitted prompts and decodes one token for each running sequence,
so per-token latency grows with the batch and new requests queue once the batch is
full. This module reproduces that loop in real time on the event loop, so the
load generator measures the same shapes (TTFT, TPOT, queueing) it would on a GPU.

The time a step takes comes from a pluggable :class:`StepCostModel`, so a later
cost model (for example a roofline one) only has to implement ``step_seconds``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
from dataclasses import dataclass
from typing import NamedTuple, Protocol

FINISH_LENGTH = "length"
FINISH_ABORT = "abort"  # the engine stopped before the request finished (server shutdown)

# If the loop falls this far behind its absolute schedule (an overloaded event loop),
# the schedule is rebased on "now" instead of bursting the missed steps back to back.
_MAX_SCHEDULE_LAG_S = 0.05


class StepCostModel(Protocol):
    """How long one engine step takes; the only thing a new cost model must provide."""

    def step_seconds(self, num_decode: int, prefill_tokens: int, context_tokens: int) -> float:
        """Duration of a step that decodes ``num_decode`` sequences and prefills
        ``prefill_tokens`` prompt tokens, attending over ``context_tokens`` tokens of
        KV cache in total (decode contexts plus the prefilled prompts so far)."""
        ...


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

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_prefill_tokens_per_step < 1:
            raise ValueError("max_prefill_tokens_per_step must be >= 1")
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")


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
    )

    def __init__(self, request_id: int, prompt_tokens: int, max_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.deliveries: asyncio.Queue[TokenDelivery] = asyncio.Queue()
        self.state = RequestState.WAITING
        self.prefilled_tokens = 0
        self.generated_tokens = 0
        self.undelivered_tokens = 0
        self.decoding = False  # True once prefill is done and the first token produced

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


class EngineStopped(RuntimeError):
    """Raised by :meth:`Engine.submit` once the engine has been stopped."""


@dataclass
class _StepPlan:
    """What one step does, fixed before it runs so arrivals mid-step wait for the next."""

    prefill: list[tuple[EngineRequest, int]]  # (request, prompt tokens prefilled this step)
    decode: list[EngineRequest]

    def prefill_tokens(self) -> int:
        return sum(chunk for _, chunk in self.prefill)

    def context_tokens(self) -> int:
        decode_context = sum(r.prompt_tokens + r.generated_tokens for r in self.decode)
        prefill_context = sum(r.prefilled_tokens + chunk for r, chunk in self.prefill)
        return decode_context + prefill_context


class Engine:
    """Continuous-batching scheduler driven by one asyncio task.

    Requests are admitted first-come-first-served while fewer than ``max_num_seqs``
    run. Each step prefills admitted prompts (at most ``max_prefill_tokens_per_step``
    prompt tokens per step, chunking longer prompts across steps) and decodes one
    token for every sequence whose prefill is complete; the step that completes a
    prompt's prefill produces that request's first token. Steps are paced against
    absolute deadlines on ``loop.time()``, so sleep overshoot never accumulates.
    """

    def __init__(self, config: EngineConfig, cost_model: StepCostModel) -> None:
        self._config = config
        self._cost_model = cost_model
        self._waiting: collections.OrderedDict[int, EngineRequest] = collections.OrderedDict()
        self._running: dict[int, EngineRequest] = {}
        self._work_available = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._next_request_id = 0
        self._requests_received = 0
        self._requests_finished = 0
        self._requests_cancelled = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the step loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="infmax-sim-engine")

    async def stop(self) -> None:
        """Stop stepping and end every open request with an ``abort`` delivery, so
        the HTTP handlers waiting on them return promptly during shutdown."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        now = asyncio.get_running_loop().time()
        for request in [*self._waiting.values(), *self._running.values()]:
            request.state = RequestState.CANCELLED
            request.deliveries.put_nowait(TokenDelivery(0, now, FINISH_ABORT))
        self._waiting.clear()
        self._running.clear()

    # -- request API ---------------------------------------------------------------

    def submit(self, prompt_tokens: int, max_tokens: int) -> EngineRequest:
        """Queue a request; its tokens arrive on ``request.deliveries``."""
        if self._stopped:
            raise EngineStopped("engine is stopped")
        if prompt_tokens < 0 or max_tokens < 1:
            raise ValueError("prompt_tokens must be >= 0 and max_tokens >= 1")
        request = EngineRequest(self._next_request_id, prompt_tokens, max_tokens)
        self._next_request_id += 1
        self._requests_received += 1
        self._waiting[request.request_id] = request
        self._work_available.set()
        return request

    def cancel(self, request: EngineRequest) -> None:
        """Drop a request from the queue or the batch (client went away). A finished
        request is left alone, so handlers may call this unconditionally."""
        if request.done:
            return
        self._waiting.pop(request.request_id, None)
        self._running.pop(request.request_id, None)
        request.state = RequestState.CANCELLED
        self._requests_cancelled += 1

    def stats(self) -> EngineStats:
        return EngineStats(
            requests_received=self._requests_received,
            requests_finished=self._requests_finished,
            requests_cancelled=self._requests_cancelled,
            running=len(self._running),
            waiting=len(self._waiting),
        )

    # -- step loop -----------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        previous_deadline: float | None = None
        while True:
            self._admit_waiting()
            if not self._running:
                previous_deadline = None  # idle: the next step starts from "now"
                self._work_available.clear()
                await self._work_available.wait()
                continue
            plan = self._plan_step()
            duration = self._cost_model.step_seconds(
                len(plan.decode), plan.prefill_tokens(), plan.context_tokens()
            )
            now = loop.time()
            if previous_deadline is None or now - previous_deadline > _MAX_SCHEDULE_LAG_S:
                previous_deadline = now
            deadline = previous_deadline + duration
            # Always yield at least once so a zero-cost model cannot starve the handlers.
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            self._publish(plan, loop.time())
            previous_deadline = deadline

    def _admit_waiting(self) -> None:
        while self._waiting and len(self._running) < self._config.max_num_seqs:
            request_id, request = self._waiting.popitem(last=False)
            request.state = RequestState.RUNNING
            self._running[request_id] = request

    def _plan_step(self) -> _StepPlan:
        budget = self._config.max_prefill_tokens_per_step
        prefill: list[tuple[EngineRequest, int]] = []
        decode: list[EngineRequest] = []
        for request in self._running.values():
            if request.decoding:
                decode.append(request)
                continue
            remaining = request.prompt_tokens - request.prefilled_tokens
            chunk = min(remaining, budget)
            if chunk == 0 and remaining > 0:
                continue  # prefill budget of this step is spent; waits for the next step
            prefill.append((request, chunk))
            budget -= chunk
        return _StepPlan(prefill=prefill, decode=decode)

    def _publish(self, plan: _StepPlan, emit_time: float) -> None:
        """Apply a finished step: advance prefills, hand out the step's tokens."""
        for request, chunk in plan.prefill:
            if request.done:
                continue  # cancelled while the step ran
            request.prefilled_tokens += chunk
            if request.prefilled_tokens >= request.prompt_tokens:
                request.decoding = True
                self._emit_token(request, emit_time)
        for request in plan.decode:
            if not request.done:
                self._emit_token(request, emit_time)

    def _emit_token(self, request: EngineRequest, emit_time: float) -> None:
        request.generated_tokens += 1
        request.undelivered_tokens += 1
        finish_reason = self._finish_reason(request)
        if finish_reason is None and request.undelivered_tokens < self._config.stream_interval:
            return
        request.deliveries.put_nowait(
            TokenDelivery(request.undelivered_tokens, emit_time, finish_reason)
        )
        request.undelivered_tokens = 0
        if finish_reason is not None:
            self._finish(request)

    def _finish_reason(self, request: EngineRequest) -> str | None:
        """Why the request stops after its latest token, or None to go on.

        The simulator never samples EOS, so requests always run to ``max_tokens``
        whether or not ``ignore_eos`` was set. This is the hook for an early-stop
        model (return ``"stop"``) should one be wanted."""
        if request.generated_tokens >= request.max_tokens:
            return FINISH_LENGTH
        return None

    def _finish(self, request: EngineRequest) -> None:
        request.state = RequestState.FINISHED
        self._running.pop(request.request_id, None)
        self._requests_finished += 1

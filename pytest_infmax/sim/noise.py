"""Timing noise for the simulator: a per-start factor and per-step jitter.

Without noise every fresh start of the simulator runs at exactly the same speed,
so repeated runs (``--infmax-repeat``) differ only by the host's timing noise and
the regression gate's error rates cannot be measured against it. Real GPUs differ
from one server start to the next (clocks, placement, allocator state after
warm-up) more than requests differ within one run, and every step has its own
kernel and launch jitter. This module adds both, as the synthetic generator of
``benchmarks/regression_error_rates.py`` models them, so the two can be compared:

* **per start** (drawn once, when the simulator process starts): every step's
  cost is multiplied by ``exp(N(0, start_jitter))``, and the prefill part of it by a
  further ``exp(N(0, prefill_start_jitter))`` (compute-bound prefill follows the SM
  clock);
* **per step**: a lognormal multiplier ``exp(N(0, step_jitter))``, times a slow drift
  ``exp(x_t)`` with ``x_t`` an AR(1) process of sd ``step_drift`` and a memory of
  ``step_drift_steps`` steps (clocks following temperature);
* **stalls**: with probability ``stall_rate`` per step, ``U(stall_ms)`` milliseconds
  are added to the step (a GC pause, the scheduler preempted).

The per-start draws come from fresh OS entropy at each start, not from ``--seed``:
the plugin restarts the server with identical arguments, and each start must draw
its own factor. ``--start-seed`` fixes them (and the per-step sequence) for a
reproducible start. The drawn factors are logged at start-up and shown under
``noise`` in ``GET /sim/stats``.

The noise wraps any cost model (:class:`NoisyCostModel`), so the real-time engine
and :func:`pytest_infmax.sim.engine.simulate` both see it.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Any

from pytest_infmax.sim.engine import StepBatch, StepCostModel

DEFAULT_DRIFT_STEPS = 200.0
DEFAULT_STALL_MS = (5.0, 30.0)
MAX_SD = 1.0  # a lognormal sd of 100 % is already absurd for timing noise


def _check_sd(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= MAX_SD):
        raise ValueError(f"{name} must be a standard deviation between 0 and {MAX_SD:g} (0.02 is 2 %), got {value!r}")


@dataclass(frozen=True)
class NoiseConfig:
    """What the noise flags asked for (all off by default)."""

    start_jitter: float = 0.0
    prefill_start_jitter: float = 0.0
    step_jitter: float = 0.0
    step_drift: float = 0.0
    step_drift_steps: float = DEFAULT_DRIFT_STEPS
    stall_rate: float = 0.0
    stall_ms: tuple[float, float] = DEFAULT_STALL_MS
    start_seed: int | None = None

    def __post_init__(self) -> None:
        _check_sd("--start-jitter", self.start_jitter)
        _check_sd("--prefill-start-jitter", self.prefill_start_jitter)
        _check_sd("--step-jitter", self.step_jitter)
        _check_sd("--step-drift", self.step_drift)
        if not (math.isfinite(self.step_drift_steps) and self.step_drift_steps >= 1):
            raise ValueError(f"--step-drift-steps must be a number of steps >= 1, got {self.step_drift_steps!r}")
        if not (math.isfinite(self.stall_rate) and 0.0 <= self.stall_rate <= 1.0):
            raise ValueError(f"--stall-rate must be a probability between 0 and 1, got {self.stall_rate!r}")
        low, high = self.stall_ms
        if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low <= high):
            raise ValueError(f"--stall-ms must be LOW,HIGH milliseconds with 0 <= LOW <= HIGH, got {low!r},{high!r}")
        if self.start_seed is not None and self.start_seed < 0:
            raise ValueError(f"--start-seed must be a whole number >= 0, got {self.start_seed!r}")

    @property
    def enabled(self) -> bool:
        return bool(
            self.start_jitter or self.prefill_start_jitter or self.step_jitter or self.step_drift or self.stall_rate
        )


class StepNoise:
    """The noise of one start: its factors, drawn at construction, and a per-step stream."""

    def __init__(self, config: NoiseConfig) -> None:
        self.config = config
        self.seed = config.start_seed if config.start_seed is not None else int.from_bytes(os.urandom(8), "big")
        rng = random.Random(self.seed)
        self._rng = rng
        self.start_factor = math.exp(rng.gauss(0.0, config.start_jitter)) if config.start_jitter else 1.0
        self.prefill_start_factor = (
            math.exp(rng.gauss(0.0, config.prefill_start_jitter)) if config.prefill_start_jitter else 1.0
        )
        self._phi = math.exp(-1.0 / config.step_drift_steps)
        self._innovation_sd = config.step_drift * math.sqrt(1.0 - self._phi * self._phi)
        self._drift = rng.gauss(0.0, config.step_drift) if config.step_drift else 0.0  # stationary start
        self.steps = 0
        self.stalls = 0

    def next_step(self) -> tuple[float, float]:
        """(multiplier, added seconds) of the next step."""
        config, rng = self.config, self._rng
        log_mult = 0.0
        if config.step_jitter:
            log_mult += rng.gauss(0.0, config.step_jitter)
        if config.step_drift:
            if self.steps:
                self._drift = self._phi * self._drift + rng.gauss(0.0, self._innovation_sd)
            log_mult += self._drift
        stall = 0.0
        if config.stall_rate and rng.random() < config.stall_rate:
            stall = rng.uniform(*config.stall_ms) / 1000.0
            self.stalls += 1
        self.steps += 1
        return math.exp(log_mult), stall

    def describe(self) -> dict[str, Any]:
        """What ``GET /sim/stats`` shows under ``noise``."""
        c = self.config
        return {
            "start_seed": self.seed,
            "start_factor": self.start_factor,
            "prefill_start_factor": self.prefill_start_factor,
            "start_jitter": c.start_jitter,
            "prefill_start_jitter": c.prefill_start_jitter,
            "step_jitter": c.step_jitter,
            "step_drift": c.step_drift,
            "step_drift_steps": c.step_drift_steps,
            "stall_rate": c.stall_rate,
            "stall_ms": list(c.stall_ms),
            "steps": self.steps,
            "stalls": self.stalls,
        }

    def log_line(self) -> str:
        c = self.config
        parts = [f"start factor {self.start_factor:.4f} (--start-jitter {c.start_jitter:g})"]
        if c.prefill_start_jitter:
            parts.append(
                f"prefill start factor {self.prefill_start_factor:.4f} "
                f"(--prefill-start-jitter {c.prefill_start_jitter:g})"
            )
        if c.step_jitter:
            parts.append(f"step jitter sd {c.step_jitter:g}")
        if c.step_drift:
            parts.append(f"drift sd {c.step_drift:g} over {c.step_drift_steps:g} steps")
        if c.stall_rate:
            parts.append(f"stalls in {c.stall_rate:.2%} of steps, {c.stall_ms[0]:g}-{c.stall_ms[1]:g} ms")
        return f"infmax-sim: noise: {', '.join(parts)}; start seed {self.seed} (--start-seed to repeat it)"


class NoisyCostModel:
    """A cost model with :class:`StepNoise` on top; other attributes (``deployment``,
    ``describe``) are the wrapped model's."""

    def __init__(self, inner: StepCostModel, noise: StepNoise) -> None:
        self.inner = inner
        self.noise = noise

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "noise"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _seconds(self, batch: StepBatch) -> float:
        batch_seconds = getattr(self.inner, "batch_seconds", None)
        if batch_seconds is not None:
            return max(0.0, batch_seconds(batch))
        return max(0.0, self.inner.step_seconds(batch.num_decode, batch.prefill_tokens, batch.context_tokens))

    def batch_seconds(self, batch: StepBatch) -> float:
        noise = self.noise
        seconds = self._seconds(batch)
        if noise.prefill_start_factor != 1.0 and batch.prefill_tokens:
            decode_only = StepBatch(batch.num_decode, 0, sum(batch.decode_contexts), batch.decode_contexts, [])
            prefill_part = max(0.0, seconds - self._seconds(decode_only))
            seconds += (noise.prefill_start_factor - 1.0) * prefill_part
        multiplier, stall = noise.next_step()
        return seconds * noise.start_factor * multiplier + stall

    def step_seconds(self, num_decode: int, prefill_tokens: int, context_tokens: int) -> float:
        """The plain protocol: the context is read as decode context and the prefill as one
        fresh chunk (as the roofline model's own ``step_seconds`` does)."""
        decode_context = max(0, context_tokens - prefill_tokens)
        contexts = [decode_context // num_decode] * num_decode if num_decode else []
        chunks = [(0, prefill_tokens)] if prefill_tokens else []
        return self.batch_seconds(StepBatch(num_decode, prefill_tokens, context_tokens, contexts, chunks))


def with_noise(cost_model: StepCostModel, config: NoiseConfig) -> StepCostModel:
    """``cost_model`` itself when every noise flag is off, else wrapped (drawing this start's factors)."""
    if not config.enabled:
        return cost_model
    return NoisyCostModel(cost_model, StepNoise(config))


def noise_of(cost_model: object) -> StepNoise | None:
    return cost_model.noise if isinstance(cost_model, NoisyCostModel) else None

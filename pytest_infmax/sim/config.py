"""The simulator's configuration: :class:`SimConfig`, everything its HTTP app needs.

It is a module of its own, below the app (:mod:`pytest_infmax.sim.server`), because the
modules the app imports read it too (:mod:`pytest_infmax.sim.observability` builds its trace
log, metrics and fault plan from it) and must not import the app back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pytest_infmax.sim.engine import EngineConfig, LinearCostModel, StepCostModel
from pytest_infmax.sim.faults import FaultConfig
from pytest_infmax.sim.trace import DEFAULT_TRACE_CAPACITY


@dataclass(frozen=True)
class SimConfig:
    """Everything the HTTP app needs; built from the command line by ``main``."""

    model: str = "sim-model"
    api_key: str | None = None
    startup_delay_s: float = 0.0
    seed: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)
    cost_model: StepCostModel = field(default_factory=LinearCostModel)
    faults: FaultConfig = field(default_factory=FaultConfig)
    trace_capacity: int = DEFAULT_TRACE_CAPACITY
    trace_file: Path | None = None
    # token ids of the model served: a prompt id at or above this is refused as vLLM refuses it
    # ("Token id N is out of vocabulary"); None: any id
    vocab_size: int | None = None
    # "fast": streams without a stream fault are written from the engine's step straight to the
    # socket (FastSseStream); "aiohttp": every stream through SseWriter (--sse-writer)
    sse_writer: str = "fast"
    front_end: str = "fast"  # sim/frontdoor.py serves plain streams, or "aiohttp" serves everything

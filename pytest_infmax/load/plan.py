"""What a run is asked to do (:class:`LoadConfig`) and what it produced (:class:`RunRecords`).

The generator (:mod:`pytest_infmax.load.generator`) and the worker processes
(:mod:`pytest_infmax.load.workers`) both read these; they import neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pytest_infmax.load.clientstats import DEFAULT_LAG_THRESHOLD, ClientStats
from pytest_infmax.load.scenarios import DEFAULT_TOKEN_WINDOW, Scenario, TokenWindow
from pytest_infmax.records import RequestRecord


class LoadConfigError(ValueError):
    """A run was asked for with arguments that cannot work together."""


@dataclass(frozen=True)
class LoadConfig:
    """How much load, of what shape, for how long."""

    scenario: Scenario
    concurrency: int | None = None
    rate: float | None = None
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_requests: int | None = None
    duration: float | None = None
    warmup: int | None = None
    request_timeout: float = 600.0
    seed: int = 0
    extra_body: dict[str, Any] = field(default_factory=dict)
    # a run is client-bound when event-loop lag p99 or send lag p99 exceeds this (seconds)
    client_lag_threshold: float = DEFAULT_LAG_THRESHOLD
    # processes the load is spread over, each with its own event loop (pytest_infmax.load.workers)
    workers: int = 1
    # the token ids completions prompts are drawn from: inside the model's vocabulary (servers.vocab)
    tokens: TokenWindow = DEFAULT_TOKEN_WINDOW

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise LoadConfigError("give exactly one of concurrency= (closed loop) or rate= (open loop, requests/s)")
        if self.concurrency is not None and self.concurrency < 1:
            raise LoadConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise LoadConfigError(f"rate must be > 0 requests/s (math.inf: all at once), got {self.rate}")
        if not self.burstiness > 0:
            raise LoadConfigError(f"burstiness must be > 0 (1 = Poisson), got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise LoadConfigError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.num_requests is not None and self.num_requests < 1:
            raise LoadConfigError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration is not None and not self.duration > 0:
            raise LoadConfigError(f"duration must be > 0 seconds, got {self.duration}")
        if self.warmup is not None and self.warmup < 0:
            raise LoadConfigError(f"warmup must be >= 0, got {self.warmup}")
        if not self.request_timeout > 0:
            raise LoadConfigError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")
        if not self.client_lag_threshold > 0:
            raise LoadConfigError(f"client_lag_threshold must be > 0 seconds, got {self.client_lag_threshold}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise LoadConfigError(f"workers must be a whole number >= 1, got {self.workers!r}")
        width = self.concurrency or self.max_concurrency
        if self.workers > 1 and width is not None and self.workers > width:
            raise LoadConfigError(
                f"workers={self.workers} is more than the {width} concurrent streams to spread over them; "
                "give at most one worker per stream"
            )
        if self.rate is not None and self.num_requests is None and self.duration is None:
            raise LoadConfigError("an open-loop run needs an end: give num_requests= or duration= with rate=")

    @property
    def effective_num_requests(self) -> int | None:
        """InferenceMAX's default: 10 requests per unit of concurrency."""
        if self.num_requests is not None:
            return self.num_requests
        if self.duration is not None:
            return None
        assert self.concurrency is not None
        return 10 * self.concurrency

    @property
    def effective_warmup(self) -> int:
        """InferenceMAX's default: 2 warm-up requests per unit of concurrency."""
        if self.warmup is not None:
            return self.warmup
        width = self.concurrency or self.max_concurrency or 0
        return 2 * width

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"c={self.concurrency}"
        rate = "inf" if math.isinf(self.rate or 0) else f"{self.rate:g}"
        return f"rate={rate}/s"

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.to_dict(),
            "concurrency": self.concurrency,
            "rate": None if self.rate is None or math.isinf(self.rate) else self.rate,
            "rate_infinite": self.rate is not None and math.isinf(self.rate),
            "burstiness": self.burstiness,
            "max_concurrency": self.max_concurrency,
            "num_requests": self.effective_num_requests,
            "duration": self.duration,
            "warmup": self.effective_warmup,
            "request_timeout": self.request_timeout,
            "seed": self.seed,
            "extra_body": self.extra_body,
            "workers": self.workers,
            "token_ids": self.tokens.to_dict(),
        }


@dataclass
class RunRecords:
    """What one run produced: records plus the clock they were taken on."""

    records: list[RequestRecord]
    clock_origin: float  # perf_counter() at the start of the run
    epoch_origin: float  # time.time() at the same instant
    measured_start: float  # perf_counter() when the measured phase began
    measured_end: float
    client: ClientStats | None = None  # the client's own limits during the measured phase

    @property
    def client_bound(self) -> bool:
        """True when the client itself fell behind (see ``client.reason``)."""
        return self.client is not None and self.client.client_bound

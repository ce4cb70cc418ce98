"""What a run is asked to do (:class:`LoadConfig`) and what it produced (:class:`RunRecords`).

The generator (:mod:`pytest_infmax.load.generator`) and the worker processes
(:mod:`pytest_infmax.load.workers`) both read these; they import neither.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from pytest_infmax.load.clientstats import DEFAULT_LAG_THRESHOLD, ClientStats
from pytest_infmax.load.scenarios import DEFAULT_TOKEN_WINDOW, Scenario, TokenWindow
from pytest_infmax.load.workloads import Sessions, Trace, Workload
from pytest_infmax.records import RequestRecord


class LoadConfigError(ValueError):
    """A run was asked for with arguments that cannot work together."""


# Bounds of one run: far above any real benchmark, far below what would exhaust the
# client's memory (every planned request is held) or file descriptors (one per stream).
MAX_CONCURRENCY = 100_000
MAX_REQUESTS = 10_000_000


@dataclass(frozen=True)
class _Field:
    """One argument of a run: its kind and its bounds (None: no bound; optional: None allowed)."""

    kind: str  # "int" (a whole number, not bool), "real" (int or float, not bool), "dict", "text"
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed (> rather than >=)
    optional: bool = False
    infinite: bool = False  # math.inf is allowed
    unit: str = ""

    def check(self, name: str, value: Any) -> None:
        if value is None and self.optional:
            return
        if self.kind == "dict":
            if not isinstance(value, dict):
                raise LoadConfigError(f"{name} must be a mapping of request fields, got {value!r}")
            return
        if self.kind == "text":
            if not isinstance(value, str) or not value.strip():
                raise LoadConfigError(
                    f"{name} must be a non-empty string{' or None' if self.optional else ''}, got {value!r}"
                )
            return
        whole = self.kind == "int"
        good_type = isinstance(value, numbers.Integral) if whole else isinstance(value, numbers.Real)
        if isinstance(value, bool) or not good_type:
            raise LoadConfigError(f"{name} must be {self._describe()}, got {value!r} ({type(value).__name__})")
        if not whole and (math.isnan(value) or (math.isinf(value) and not self.infinite)):
            raise LoadConfigError(f"{name} must be {self._describe()}, got {value!r}")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            raise LoadConfigError(f"{name} must be {self._describe()}, got {value!r}")

    def _describe(self) -> str:
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"<= {self.high:g}")
        text = " and ".join(bounds)
        if self.kind == "int":
            text = f"a whole number {text}"
        else:
            text += f" {self.unit}" if self.unit else ""
            text += " (a number; math.inf: all at once)" if self.infinite else " (a number)"
        return text + (" or None" if self.optional else "")


# Every argument of a run, checked in one place before anything is planned or sent.
FIELDS: dict[str, _Field] = {
    "concurrency": _Field("int", 1, MAX_CONCURRENCY, optional=True),
    "rate": _Field("real", 0, low_open=True, optional=True, infinite=True, unit="requests/s"),
    "burstiness": _Field("real", 0, low_open=True),  # 1 = Poisson
    "max_concurrency": _Field("int", 1, MAX_CONCURRENCY, optional=True),
    "num_requests": _Field("int", 1, MAX_REQUESTS, optional=True),
    "duration": _Field("real", 0, low_open=True, optional=True, unit="seconds"),
    "warmup": _Field("int", 0, MAX_REQUESTS, optional=True),
    "request_timeout": _Field("real", 0, low_open=True, unit="seconds"),
    "seed": _Field("int", 0, 2**63 - 1),
    "extra_body": _Field("dict"),
    "client_lag_threshold": _Field("real", 0, low_open=True, unit="seconds"),
    "workers": _Field("int", 1, 1024),
    "ray": _Field("text", optional=True),
}


def _check_fields(config: LoadConfig) -> None:
    if not isinstance(config.scenario, Scenario):
        raise LoadConfigError(f"scenario must be a Scenario, got {config.scenario!r}")
    for name, spec in FIELDS.items():
        spec.check(name, getattr(config, name))


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
    # the workers run as Ray actors on the cluster at this address ("auto", "HOST:6379",
    # "ray://HOST:10001"; "local" starts a one-node Ray here) instead of as local processes
    # (pytest_infmax.load.rayworkers; docs/scale-out.md)
    ray: str | None = None
    # the token ids completions prompts are drawn from: inside the model's vocabulary (servers.vocab)
    tokens: TokenWindow = DEFAULT_TOKEN_WINDOW
    # multi-turn sessions or a trace to replay (load.workloads); None: independent requests
    workload: Workload | None = None

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.workload is not None:
            self._check_workload()
            return
        if (self.concurrency is None) == (self.rate is None):
            raise LoadConfigError("give exactly one of concurrency= (closed loop) or rate= (open loop, requests/s)")
        width = self.concurrency or self.max_concurrency
        if self.workers > 1 and width is not None and self.workers > width:
            raise LoadConfigError(
                f"workers={self.workers} is more than the {width} concurrent streams to spread over them; "
                "give at most one worker per stream"
            )
        if self.rate is not None and self.num_requests is None and self.duration is None:
            raise LoadConfigError("an open-loop run needs an end: give num_requests= or duration= with rate=")
        if self.rate is not None and self.num_requests is None and self.duration is not None:
            if math.isinf(self.rate):
                raise LoadConfigError(
                    f"rate=math.inf sends every request at once, so duration={self.duration:g} does not say how "
                    "many: give num_requests="
                )
            if self.rate * self.duration > MAX_REQUESTS:
                raise LoadConfigError(
                    f"rate={self.rate:g} for duration={self.duration:g} s plans {self.rate * self.duration:.3g} "
                    f"requests, more than the {MAX_REQUESTS} one run may send"
                )

    def _check_workload(self) -> None:
        workload = self.workload
        if not isinstance(workload, (Sessions, Trace)):
            raise LoadConfigError(f"workload must be Sessions(...) or Trace.load(...), got {workload!r}")
        if self.workers != 1 or self.ray is not None:
            raise LoadConfigError(
                f"{workload.describe()} runs in one local load-generator process: give workers=1 and no ray="
            )
        if isinstance(workload, Sessions):
            if (self.concurrency is None) == (self.rate is None):
                raise LoadConfigError(
                    f"{workload.describe()}: give concurrency=N (N users, each holding a conversation: closed loop) "
                    "or rate=R (R new conversations per second: open loop)"
                )
            if self.rate is not None and self.num_requests is None and self.duration is None:
                raise LoadConfigError("an open-loop run needs an end: give num_requests= or duration= with rate=")
            if self.rate is not None and math.isinf(self.rate):
                raise LoadConfigError(
                    f"{workload.describe()}: rate= is new conversations per second; give a finite one"
                )
            return
        if self.concurrency is not None or self.rate is not None:
            raise LoadConfigError(
                f"{workload.describe()} is sent at its own timestamps (speedup= scales them): leave out "
                "concurrency= and rate= (max_concurrency= caps the requests in flight)"
            )
        if self.warmup:
            raise LoadConfigError(
                f"{workload.describe()} has no warm-up phase (its first requests are part of the trace): "
                "give warmup=0 or leave it out"
            )

    @property
    def effective_num_requests(self) -> int | None:
        """InferenceMAX's default: 10 requests per unit of concurrency. Sessions: rounded up
        to whole sessions; a trace: its requests (at most ``num_requests`` of them)."""
        workload = self.workload
        if isinstance(workload, Trace):
            n = len(workload.entries)
            return n if self.num_requests is None else min(n, self.num_requests)
        if self.num_requests is not None:
            n = self.num_requests
        elif self.duration is not None:
            return None
        else:
            assert self.concurrency is not None
            n = 10 * self.concurrency
        return _whole_sessions(n, workload)

    @property
    def effective_warmup(self) -> int:
        """InferenceMAX's default: 2 warm-up requests per unit of concurrency (sessions:
        rounded up to whole sessions; a trace: none)."""
        if isinstance(self.workload, Trace):
            return 0
        if self.warmup is not None:
            return _whole_sessions(self.warmup, self.workload)
        width = self.concurrency or self.max_concurrency or 0
        return _whole_sessions(2 * width, self.workload)

    @property
    def label(self) -> str:
        if isinstance(self.workload, Trace):
            return f"trace x{self.workload.speedup:g}"
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
            "workload": None if self.workload is None else self.workload.to_dict(),
        }


def _whole_sessions(requests: int, workload: Workload | None) -> int:
    """``requests`` rounded up to whole sessions (a session runs all its turns)."""
    if not isinstance(workload, Sessions):
        return requests
    return -(-requests // workload.turns) * workload.turns


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

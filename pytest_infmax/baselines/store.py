"""Baselines: what earlier runs of each perf test measured, kept for comparison.

One JSON file per result key (the pytest node id, plus ``[c=N]`` for sweep points)
under a baselines directory (default ``.infmax/baselines/``). A file holds

* ``format``: ``pytest-infmax-baseline/1``;
* ``key``: the result key, and ``testbed``: what the numbers are only valid for
  (GPU model and count, driver, engine and its version, model, server options);
* ``runs``: a bounded history (default the last 20) of runs, oldest first. Each
  run keeps its per-request samples in send order (``ttft``, ``tpot``, ``e2e``,
  ``itl_mean``, ``itl_max``; seconds, rounded to 0.1 µs), its run-level scalars
  (every registered run-level figure: throughput, error rate, and cost and energy
  where the run was priced and its energy measured), the full metrics summary,
  the workload and the environment it ran in.

Several runs are kept because between-run variance (a server start differs from
the next by more than requests differ within one run) can only be estimated from
several runs; :mod:`pytest_infmax.baselines.compare` explains how they are used.

Files are written atomically with sorted keys and indentation so that they diff
well in git. They are plain JSON and never pickled; a file that cannot be read is
a :class:`CorruptBaselineError` naming the file and the fix, never a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pytest_infmax import sidecar
from pytest_infmax.atomic import write_json_atomic
from pytest_infmax.baselines.treatment import split_treatment, treatment_flags_for
from pytest_infmax.environment import environment
from pytest_infmax.lazy import lazy_module
from pytest_infmax.measure.cost import cost_per_million_tokens
from pytest_infmax.measure.registry import SCALAR_METRICS
from pytest_infmax.records import RequestRecord
from pytest_infmax.servers import telemetry

if TYPE_CHECKING:
    import numpy as np

    from pytest_infmax.measure.cost import Price
    from pytest_infmax.run.results import LoadResult
else:  # imported at first use, not with this module (pytest_infmax/lazy.py)
    np = lazy_module("numpy")

FORMAT = "pytest-infmax-baseline/1"
FORMAT_NAME, _, _FORMAT_VERSION = FORMAT.rpartition("/")
FORMAT_VERSION = int(_FORMAT_VERSION)
DEFAULT_DIR = ".infmax/baselines"
#: runs a history keeps (oldest dropped first; a save of more runs keeps all of them): room for
#: two saves at --infmax-repeat 10, so the spread spans more than one CI job's machine and day
DEFAULT_HISTORY = 20

#: per-request sample arrays a run keeps (seconds, send order)
SAMPLE_METRICS: tuple[str, ...] = ("ttft", "tpot", "e2e", "itl_mean", "itl_max")
#: run-level figures a run keeps: every registered one (those needing a price, energy or the
#: server's metrics are None where the run had none), and the run's counts
SCALAR_KEYS: tuple[str, ...] = (
    *SCALAR_METRICS,
    "duration",
    "num_requests",
    "num_ok",
    "num_errors",
    "num_gpus",
)
#: workload fields that must match for two runs to be comparable
WORKLOAD_KEYS: tuple[str, ...] = (
    "scenario",
    "concurrency",
    "rate",
    "rate_infinite",
    "burstiness",
    "max_concurrency",
    "extra_body",
)
#: testbed fields always present (None where unknown)
TESTBED_KEYS: tuple[str, ...] = (
    "gpu_model",
    "gpu_count",
    "driver",
    "engine",
    "engine_version",
    "model",
    "server_options",
)
_SAMPLE_DECIMALS = 7  # seconds: 0.1 µs

# server argv flags whose value changes from one start to the next (ports, temp files, pids)
_VOLATILE_FLAGS = frozenset(
    {
        "--host",
        "--port",
        "--port-file",
        "--parent-pid",
        "--log-file",
        "--trace-file",
        "--master-port",
        "--master_port",
        "--dist-init-addr",
        "--nccl-port",
    }
)


# -- errors --------------------------------------------------------------------------


#: why a run without a single sample is refused, in a file and when it would be saved
HOLLOW = (
    "a run has no samples (not one successful request): it measured no latency, and as a "
    "baseline it would be compared on throughput alone"
)

#: the largest per-request latency a baseline sample may hold (seconds; about 115 days)
MAX_SAMPLE_SECONDS = 1e7


class BaselineError(Exception):
    """A baseline cannot be used; the message says why and what to do."""

    __test__ = False  # not a pytest test class, even when imported into a test module


class CorruptBaselineError(BaselineError):
    """A baseline file is not valid JSON or not a pytest-infmax baseline."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"baseline file {self.path} is unusable: {reason}. Rewrite it with --infmax-update "
            f"(or `infmax` compare against another file), or delete it to start a new history"
        )


@dataclass(frozen=True)
class Difference:
    """One field that differs between the baseline and the current run."""

    where: str  # "testbed" or "workload"
    name: str
    baseline: Any
    current: Any

    def __str__(self) -> str:
        return f"{self.where} {self.name}: baseline {_show(self.baseline)}, current {_show(self.current)}"


class BaselineMismatch(BaselineError):
    """The baseline was recorded on another testbed or with another workload."""

    __test__ = False

    def __init__(self, key: str, differences: Sequence[Difference], path: Path | None = None) -> None:
        self.key = key
        self.differences = list(differences)
        self.path = path
        fields = "; ".join(str(d) for d in self.differences)
        where = f" ({path})" if path else ""
        super().__init__(
            f"baseline for {key}{where} was recorded on a different testbed or workload, so the numbers "
            f"are not comparable: {fields}. Compare anyway with force (--infmax-compare-force, "
            f"`infmax compare --force`), or start a new baseline with --infmax-update"
        )

    @property
    def fields(self) -> list[str]:
        return [d.name for d in self.differences]


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return repr(" ".join(str(v) for v in value))
    return repr(value)


# -- one run ---------------------------------------------------------------------------


@dataclass
class BaselineRun:
    """One measured run in compact form: what comparisons need, nothing more.

    ``samples`` are per-request values in send order (time-contiguous, which the
    block bootstrap relies on), seconds. ``scalars`` are run-level figures
    (``None`` where not measured).
    """

    name: str
    samples: dict[str, list[float]]
    scalars: dict[str, float | None]
    workload: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    recorded_at: str = ""
    started_at: float | None = None

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_result(
        cls,
        result: LoadResult | Mapping[str, Any],
        *,
        price: Price | float | None = None,
        environment_info: Mapping[str, Any] | None = None,
    ) -> BaselineRun:
        """Compact a ``LoadResult`` (or its ``to_dict()`` with records, as xdist workers send).

        ``price`` ($/GPU-hour, or a :class:`~pytest_infmax.measure.cost.Price`) adds
        ``cost_per_mtok`` ($ per million total tokens at the measured throughput).
        """
        if isinstance(result, Mapping):
            return cls._from_dict_result(result, price=price, environment_info=environment_info)
        metrics = result.metrics
        run = result.run
        return cls._build(
            name=result.name,
            records=[r for r in result.records if not r.warmup],
            summary=metrics.to_dict(),
            workload=result.config.to_dict(),
            num_gpus=result.num_gpus,
            started_at=run.epoch_origin,
            price=price,
            environment_info=environment_info,
        )

    @classmethod
    def _from_dict_result(
        cls, result: Mapping[str, Any], *, price: Price | float | None, environment_info: Mapping[str, Any] | None
    ) -> BaselineRun:
        try:
            raw_records = result["records"]
            summary = dict(result["metrics"])
            name = str(result["name"])
        except (KeyError, TypeError) as exc:
            raise BaselineError(
                f"result {result.get('name', '?')} has no {exc}: "
                "a baseline needs per-request records (LoadResult.to_dict(include_records=True))"
            ) from None
        records = [RequestRecord.from_dict(r) for r in raw_records]
        return cls._build(
            name=name,
            records=[r for r in records if not r.warmup],
            summary=summary,
            workload=dict(result.get("load") or {}),
            num_gpus=int(result.get("num_gpus") or summary.get("num_gpus") or 1),
            started_at=result.get("started_at"),
            price=price,
            environment_info=environment_info,
        )

    @classmethod
    def _build(
        cls,
        *,
        name: str,
        records: Sequence[RequestRecord],
        summary: dict[str, Any],
        workload: dict[str, Any],
        num_gpus: int,
        started_at: float | None,
        price: Price | float | None,
        environment_info: Mapping[str, Any] | None,
    ) -> BaselineRun:
        scalars: dict[str, float | None] = {key: _finite(summary.get(key)) for key in SCALAR_KEYS}
        scalars["num_gpus"] = float(num_gpus)
        if price is not None:  # re-price (a results file written without a price, say)
            usd = float(price if isinstance(price, (int, float)) else price.usd_per_gpu_hour)
            for cost, tput in (
                ("cost_per_mtok", "throughput"),
                ("input_cost_per_mtok", "input_throughput"),
                ("output_cost_per_mtok", "output_throughput"),
            ):
                tps = scalars.get(tput)
                scalars[cost] = cost_per_million_tokens(usd, num_gpus, tps) if tps is not None else None
        env = environment()
        env.pop("written_at", None)
        env.update(environment_info or {})
        return cls(
            name=name,
            samples=compact_samples(records),
            scalars=scalars,
            workload=workload_of(workload),
            summary=summary,
            environment=env,
            recorded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            started_at=started_at,
        )

    # -- access -------------------------------------------------------------------

    def values(self, metric: str) -> np.ndarray:
        """Per-request samples of a metric (send order); empty when not kept."""
        return np.asarray(self.samples.get(metric) or [], dtype=np.float64)

    def scalar(self, metric: str) -> float | None:
        return _finite(self.scalars.get(metric))

    @property
    def concurrency(self) -> int | None:
        c = self.workload.get("concurrency") or self.workload.get("max_concurrency")
        return int(c) if c else None

    # -- serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "recorded_at": self.recorded_at,
            "started_at": self.started_at,
            "workload": self.workload,
            "samples": {k: [round(float(x), _SAMPLE_DECIMALS) for x in v] for k, v in self.samples.items()},
            "scalars": self.scalars,
            "summary": self.summary,
            "environment": self.environment,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BaselineRun:
        """Parse and validate; raises ValueError saying what is wrong."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a run must be an object, got {type(d).__name__}")
        samples = d.get("samples")
        if not isinstance(samples, Mapping):
            raise ValueError("a run has no 'samples' object")
        clean: dict[str, list[float]] = {}
        for key, values in samples.items():
            if not isinstance(values, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in values
            ):
                raise ValueError(f"samples[{key!r}] must be a list of numbers")
            # every sample is a request's latency in seconds: 1e308 (or 1e400, read as inf) is no
            # measurement, and its mean or variance overflows the comparison
            bad = next((x for x in values if not 0 <= x <= MAX_SAMPLE_SECONDS), None)
            if bad is not None:
                raise ValueError(
                    f"samples[{key!r}] holds {bad!r}, which is not a latency: each sample is seconds "
                    f"between 0 and {MAX_SAMPLE_SECONDS:g}"
                )
            clean[str(key)] = [float(x) for x in values]
        scalars = d.get("scalars")
        if not isinstance(scalars, Mapping):
            raise ValueError("a run has no 'scalars' object")
        for key, value in scalars.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                raise ValueError(f"scalars[{key!r}] must be a finite number or null, got {value!r}")
        for key in ("workload", "summary", "environment"):
            if not isinstance(d.get(key, {}), Mapping):
                raise ValueError(f"a run's {key!r} must be an object")
        if not any(clean.values()):
            raise ValueError(HOLLOW)
        return cls(
            name=str(d.get("name", "")),
            samples=clean,
            scalars={str(k): (None if v is None else float(v)) for k, v in scalars.items()},
            workload=dict(d.get("workload") or {}),
            summary=dict(d.get("summary") or {}),
            environment=dict(d.get("environment") or {}),
            recorded_at=str(d.get("recorded_at", "")),
            started_at=d.get("started_at"),
        )


def runs_of(
    result: LoadResult | Mapping[str, Any],
    *,
    price: Price | float | None = None,
    environment_info: Mapping[str, Any] | None = None,
) -> list[BaselineRun]:
    """The runs a result stands for in comparisons and histories.

    One run, or with ``--infmax-repeat`` every repeat on its own (each a fresh server
    start); repeats that shared one start (an endpoint cannot be restarted) are merged
    into one run (:func:`merge_runs`). ``result`` is a ``LoadResult`` or its
    ``to_dict()`` with records (``repeats.runs[i].records`` slices its ``records``).
    """
    kw: dict[str, Any] = {"price": price, "environment_info": environment_info}
    if not isinstance(result, Mapping):
        if result.repeats is None:
            return [BaselineRun.from_result(result, **kw)]
        runs = [BaselineRun.from_result(r, **kw) for r in result.repeats.runs]
        fresh = result.repeats.fresh_starts
    else:
        repeats = result.get("repeats")
        if not isinstance(repeats, Mapping) or not repeats.get("runs"):
            return [BaselineRun.from_result(result, **kw)]
        if "records" not in result:
            BaselineRun.from_result(result, **kw)  # raises, saying that records are needed
        runs = []
        for entry in repeats["runs"]:
            lo, hi = entry["records"]
            one = {
                **result,
                "records": result["records"][lo:hi],
                "metrics": entry["metrics"],
                "started_at": entry.get("started_at"),
            }
            runs.append(BaselineRun.from_result(one, **kw))
        fresh = bool(repeats.get("fresh_starts", True))
    return runs if fresh else [merge_runs(runs)]


def merge_runs(runs: Sequence[BaselineRun], name: str | None = None) -> BaselineRun:
    """One run from repeats that shared a server start (one warm server).

    Repeats against the same start share its between-run offset, so they are
    not independent runs; comparing them as separate runs would understate the
    noise. Their samples are concatenated (in order) and their scalars averaged.
    """
    if not runs:
        raise ValueError("merge_runs needs at least one run")
    samples: dict[str, list[float]] = {}
    for run in runs:
        for key, values in run.samples.items():
            samples.setdefault(key, []).extend(values)
    scalars: dict[str, float | None] = {}
    for key in {k for run in runs for k in run.scalars}:
        per_run = [run.scalars.get(key) for run in runs]
        known = [v for v in per_run if v is not None]
        scalars[key] = sum(known) / len(known) if len(known) == len(per_run) else None
    first = runs[0]
    return BaselineRun(
        name=name or first.name,
        samples=samples,
        scalars=scalars,
        workload=dict(first.workload),
        summary={},
        environment=dict(first.environment),
        recorded_at=runs[-1].recorded_at,
        started_at=first.started_at,
    )


def compact_samples(records: Iterable[RequestRecord]) -> dict[str, list[float]]:
    """Per-request arrays of successful measured requests, in send order.

    ``itl_mean`` / ``itl_max`` summarise each request's inter-token latencies
    (the per-token definition of :meth:`RequestRecord.itls`), so the per-chunk
    times need not be kept.
    """
    ok = sorted((r for r in records if r.ok and not r.warmup), key=lambda r: (r.send_time, r.index))
    out: dict[str, list[float]] = {name: [] for name in SAMPLE_METRICS}
    for r in ok:
        for name, value in (("ttft", r.ttft), ("tpot", r.tpot), ("e2e", r.e2e)):
            if value is not None and math.isfinite(value):
                out[name].append(round(value, _SAMPLE_DECIMALS))
        gaps = r.itl_array()
        if gaps.size:
            out["itl_mean"].append(round(float(np.mean(gaps)), _SAMPLE_DECIMALS))
            out["itl_max"].append(round(float(np.max(gaps)), _SAMPLE_DECIMALS))
    return out


def workload_of(load: Mapping[str, Any]) -> dict[str, Any]:
    """The load configuration as stored with a run (``LoadConfig.to_dict()`` fields)."""
    out = {key: load.get(key) for key in WORKLOAD_KEYS}
    for key in ("num_requests", "warmup", "duration", "seed"):
        out[key] = load.get(key)
    return out


def _finite(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# -- testbed ---------------------------------------------------------------------------


def normalise_server_options(command: Sequence[str] | str | None) -> list[str]:
    """The server command without what changes between starts.

    The executable keeps only its base name (virtualenv paths differ between
    machines); ``--host``, ``--port``, ``--port-file``, ``--parent-pid`` and other
    per-start values are dropped, in both ``--flag value`` and ``--flag=value`` forms.
    """
    if command is None:
        return []
    argv = command.split() if isinstance(command, str) else [str(a) for a in command]
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in _VOLATILE_FLAGS:
            skip = not eq
            continue
        if i == 0 and "/" in arg:
            arg = arg.rsplit("/", 1)[-1]
        out.append(arg)
    return out


def build_testbed(
    server: Mapping[str, Any] | None, extra: Mapping[str, Any] | None = None, *, treatment: Iterable[str] = ()
) -> dict[str, Any]:
    """What a baseline is keyed by, from ``LoadResult.server`` plus facts the plugin knows.

    ``extra`` may set ``gpu_model``, ``gpu_count``, ``driver``, ``engine_version``
    (e.g. from :func:`gpu_testbed`) and any further field to key on; its values
    win over those derived from ``server``. Every field in :data:`TESTBED_KEYS`
    is present, ``None`` when unknown. Treatment options (the simulator's ``--slowdown``
    and noise flags, and the ``treatment`` flags a project declares) are not testbed:
    they are left out of ``server_options`` (:mod:`pytest_infmax.baselines.treatment`).
    """
    server = dict(server or {})
    kind = server.get("kind")
    options: Any = normalise_server_options(server.get("command"))
    options, _ = split_treatment(options, treatment_flags_for(kind, treatment))
    if kind == "endpoint":  # nothing is started: the endpoint itself is the option
        options = [str(server.get("base_url"))] if server.get("base_url") else []
    tb: dict[str, Any] = dict.fromkeys(TESTBED_KEYS)
    tb.update(gpu_count=server.get("num_gpus"), engine=kind, model=server.get("model"), server_options=options)
    for key, value in (extra or {}).items():
        tb[str(key)] = _plain(value)
    return tb


def gpu_testbed() -> dict[str, Any]:
    """GPU model, count and driver from NVML; ``{}`` where NVML is not available."""
    try:
        gpus = telemetry.gpus()
    except Exception:  # no NVML, no driver, no GPU: nothing to add
        return {}
    if not gpus:
        return {}
    names = sorted({g.name for g in gpus})
    return {"gpu_model": " + ".join(names), "gpu_count": len(gpus), "driver": gpus[0].driver}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def differences(
    baseline_testbed: Mapping[str, Any] | None,
    current_testbed: Mapping[str, Any] | None,
    baseline_workload: Mapping[str, Any] | None = None,
    current_workload: Mapping[str, Any] | None = None,
) -> list[Difference]:
    """Fields whose values differ (testbed: every field; workload: :data:`WORKLOAD_KEYS`).

    Only known values are compared: a field that is None (unknown) on one side
    is listed by :func:`unknown_fields`, not here: a results file cannot know the
    GPU that a baseline recorded through NVML.
    """
    out: list[Difference] = []
    if baseline_testbed is not None and current_testbed is not None:
        for key in sorted(set(baseline_testbed) | set(current_testbed)):
            a, b = _plain(baseline_testbed.get(key)), _plain(current_testbed.get(key))
            if a is not None and b is not None and a != b:
                out.append(Difference("testbed", key, a, b))
    if baseline_workload is not None and current_workload is not None:
        for key in WORKLOAD_KEYS:
            a, b = _plain(baseline_workload.get(key)), _plain(current_workload.get(key))
            if a != b and not (key == "extra_body" and not a and not b):
                out.append(Difference("workload", key, a, b))
    return out


def unknown_fields(baseline_testbed: Mapping[str, Any] | None, current_testbed: Mapping[str, Any] | None) -> list[str]:
    """Testbed fields known on one side only (not checked by :func:`differences`)."""
    if baseline_testbed is None or current_testbed is None:
        return []
    return sorted(
        key
        for key in set(baseline_testbed) | set(current_testbed)
        if (baseline_testbed.get(key) is None) != (current_testbed.get(key) is None)
    )


# -- one test's history ---------------------------------------------------------------------


@dataclass
class Baseline:
    """The stored history of one result key on one testbed (oldest run first)."""

    key: str
    testbed: dict[str, Any]
    runs: list[BaselineRun]
    history: int = DEFAULT_HISTORY
    path: Path | None = None

    @property
    def latest(self) -> BaselineRun:
        return self.runs[-1]

    @property
    def workload(self) -> dict[str, Any]:
        return self.latest.workload if self.runs else {}

    def differences(
        self, testbed: Mapping[str, Any] | None, workload: Mapping[str, Any] | None = None
    ) -> list[Difference]:
        return differences(self.testbed, testbed, self.workload if workload is not None else None, workload)

    def check(self, testbed: Mapping[str, Any] | None, workload: Mapping[str, Any] | None = None) -> None:
        """Raise :class:`BaselineMismatch` naming each field that differs."""
        diffs = self.differences(testbed, workload)
        if diffs:
            raise BaselineMismatch(self.key, diffs, self.path)

    def with_runs(self, runs: Sequence[BaselineRun]) -> Baseline:
        """A copy with ``runs`` appended and the oldest dropped beyond ``history``; the new
        runs themselves are all kept, even more of them than ``history`` (the repeats of one
        save, e.g. ``--infmax-repeat 30``, belong together)."""
        kept = [*self.runs, *runs][-max(self.history, len(runs)) :]
        return Baseline(self.key, dict(self.testbed), kept, self.history, self.path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "key": self.key,
            "testbed": self.testbed,
            "history": self.history,
            "runs": [r.to_dict() for r in self.runs],
        }

    @classmethod
    def from_dict(cls, d: Any, path: Path | None = None) -> Baseline:
        """Parse and validate a baseline document; ValueError says what is wrong."""
        if not isinstance(d, Mapping):
            raise ValueError(f"the document is a JSON {type(d).__name__}, not an object")
        fmt = d.get("format")
        if not isinstance(fmt, str) or not fmt.startswith(FORMAT_NAME + "/"):
            raise ValueError(f"'format' is {fmt!r}, expected {FORMAT!r}")
        try:
            version = int(fmt.rpartition("/")[2])
        except ValueError:
            raise ValueError(f"'format' is {fmt!r}, expected {FORMAT!r}") from None
        if version > FORMAT_VERSION:
            raise ValueError(f"it was written by a newer pytest-infmax (format {fmt}; this one reads {FORMAT})")
        key = d.get("key")
        if not isinstance(key, str) or not key:
            raise ValueError("'key' is missing")
        testbed = d.get("testbed")
        if not isinstance(testbed, Mapping):
            raise ValueError("'testbed' is missing")
        runs = d.get("runs")
        if not isinstance(runs, list) or not runs:
            raise ValueError("'runs' must be a non-empty list")
        history = d.get("history", DEFAULT_HISTORY)
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"'history' must be a whole number >= 1, got {history!r}")
        parsed = []
        for i, run in enumerate(runs):
            try:
                parsed.append(BaselineRun.from_dict(run))
            except ValueError as exc:
                raise ValueError(f"runs[{i}]: {exc}") from None
        return cls(key, dict(testbed), parsed, history, path)


def load_baseline(path: str | os.PathLike[str]) -> Baseline:
    """Read one baseline file; :class:`CorruptBaselineError` if it cannot be used."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CorruptBaselineError(path, "it is not UTF-8 text") from None
    except OSError as exc:
        raise BaselineError(f"cannot read baseline file {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise CorruptBaselineError(path, "it is empty")
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise CorruptBaselineError(path, f"it is not valid JSON ({exc}); was the write interrupted?") from None
    except RecursionError:
        raise CorruptBaselineError(path, _TOO_DEEP) from None
    try:
        return Baseline.from_dict(doc, path)
    except ValueError as exc:
        raise CorruptBaselineError(path, str(exc)) from None
    except RecursionError:
        raise CorruptBaselineError(path, _TOO_DEEP) from None


# json.loads (and what walks its result) recurses once per level: a file nested deeper than
# Python's recursion limit is no baseline this package wrote, and must not be a traceback
_TOO_DEEP = "its JSON nests deeper than any baseline does (a RecursionError reading it)"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a baseline")


# -- the directory -----------------------------------------------------------------------------


def safe_filename(key: str, max_length: int = 96) -> str:
    """A file name for a result key: readable, safe on every OS, stable, collision-free.

    Characters other than letters, digits, ``.``, ``-`` and ``_`` become ``_``
    (runs collapsed); the name is cut to ``max_length`` and ends with 10 hex digits
    of the key's SHA-1, so two keys never share a file. The same key always gives
    the same name.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "result"
    slug = slug[:max_length].rstrip("._-")
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
    return f"{slug}-{digest}.json"


Mode = Literal["append", "replace"]


class BaselineSet(Protocol):
    """One set of baselines (e.g. ``main``), wherever it is kept: a directory of JSON files
    (:class:`BaselineStore`, the default) or a shared PostgreSQL store
    (:class:`~pytest_infmax.baselines.pgstore.PostgresStore`); ``baselines.stores.open_set``
    picks one by the ``--infmax-baselines`` value."""

    history: int

    @property
    def where(self) -> str:
        """Where the set is, for messages (never a password)."""
        ...

    def load(self, key: str) -> Baseline | None: ...

    def save(
        self, key: str, runs: BaselineRun | Sequence[BaselineRun], testbed: Mapping[str, Any], *, mode: Mode = "append"
    ) -> Baseline: ...

    def keys(self) -> list[str]: ...

    def __iter__(self) -> Iterator[Baseline]: ...


class BaselineStore:
    """A directory of baselines, one file per result key.

    The plugin's options map onto it: ``--infmax-save``/``--infmax-autosave``
    call :meth:`save` (append to the history; refused on another testbed),
    ``--infmax-update`` calls :meth:`save` with ``mode="replace"`` (a new history,
    also over a corrupt file), ``--infmax-compare`` calls :meth:`compare`.
    """

    def __init__(self, directory: str | os.PathLike[str] = DEFAULT_DIR, *, history: int = DEFAULT_HISTORY) -> None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be a whole number >= 1, got {history!r}")
        self.directory = Path(directory)
        self.history = history

    @property
    def where(self) -> str:
        return str(self.directory)

    def path_for(self, key: str) -> Path:
        return self.directory / safe_filename(key)

    def load(self, key: str) -> Baseline | None:
        """The baseline of ``key``; None when there is none; CorruptBaselineError if unusable."""
        path = self.path_for(key)
        if not path.exists():
            return None
        baseline = load_baseline(path)
        if baseline.key != key:
            raise CorruptBaselineError(path, f"it holds the baseline of {baseline.key!r}, not of {key!r}")
        return baseline

    def save(
        self,
        key: str,
        runs: BaselineRun | Sequence[BaselineRun],
        testbed: Mapping[str, Any],
        *,
        mode: Mode = "append",
    ) -> Baseline:
        """Add runs to the history of ``key`` (``append``) or start it anew (``replace``).

        ``append`` refuses (:class:`BaselineMismatch`) when the stored baseline is
        from another testbed or workload, and (:class:`CorruptBaselineError`) when
        the stored file is unusable: both say to use ``--infmax-update``.
        """
        new_runs = [runs] if isinstance(runs, BaselineRun) else list(runs)
        if not new_runs:
            raise ValueError("save() needs at least one run")
        if mode not in ("append", "replace"):
            raise ValueError(f"mode must be 'append' or 'replace', got {mode!r}")
        if any(not any(run.samples.values()) for run in new_runs):
            raise BaselineError(f"{key}: not saved: {HOLLOW}")
        path = self.path_for(key)
        try:
            with _locked(path):  # read-modify-write: sessions saving at once must not lose runs
                return self._save_locked(key, path, new_runs, testbed, mode)
        except OSError as exc:  # a full disk, a read-only checkout: the previous file stands (atomic write)
            why = exc.strerror or str(exc)
            raise BaselineError(
                f"{key}: not saved to {path}: {why}; the baseline there is unchanged. Free space or make "
                f"{self.directory} writable (or point --infmax-baselines elsewhere)"
            ) from None

    def _save_locked(
        self, key: str, path: Path, new_runs: list[BaselineRun], testbed: Mapping[str, Any], mode: Mode
    ) -> Baseline:
        current = None if mode == "replace" else self.load(key)
        plain_testbed: dict[str, Any] = _plain(dict(testbed))
        if current is None:
            baseline = Baseline(key, plain_testbed, [], self.history, path)
        else:
            current.check(plain_testbed, new_runs[0].workload)
            baseline = Baseline(key, current.testbed, current.runs, self.history, path)
        baseline = baseline.with_runs(new_runs)
        write_json_atomic(path, _sorted(baseline.to_dict()))
        baseline.path = path
        return baseline

    def keys(self) -> list[str]:
        return [b.key for b in self]

    def __iter__(self) -> Iterator[Baseline]:
        """Every readable baseline in the directory (a corrupt file raises)."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.json")):
            yield load_baseline(path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock for one baseline file, held across processes (flock on ``PATH.lock``)."""
    import fcntl  # POSIX only: imported where a lock is taken, not where the module is

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a+b") as lock:  # hidden: not a baseline
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _sorted(value: Any) -> Any:
    """Sorted keys all the way down (write_json_atomic keeps insertion order)."""
    if isinstance(value, Mapping):
        return {str(k): _sorted(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [_sorted(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def result_keys(names: Sequence[str]) -> list[str]:
    """Unique keys for the results of one test: a repeated name gets ``#2``, ``#3``...

    A test that calls ``infmax.run`` twice with the same name must not put both
    runs into one history.
    """
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


# -- results files --------------------------------------------------------------------------


def runs_from_results_document(
    doc: Any, source: str = "results"
) -> dict[str, tuple[dict[str, Any], list[BaselineRun]]]:
    """Runs of an ``--infmax-json`` document by result name (repeats together), each
    with its testbed (the result's ``testbed`` if the plugin wrote one, else derived
    from its ``server``)."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("results"), list):
        raise BaselineError(f"{source} is not an --infmax-json results file (no 'results' list)")
    out: dict[str, tuple[dict[str, Any], list[BaselineRun]]] = {}
    for result in doc["results"]:
        if not isinstance(result, Mapping) or "records" not in result:
            raise BaselineError(
                f"{source}: result {result.get('name') if isinstance(result, Mapping) else '?'} has no "
                "per-request records; write it with --infmax-json, which keeps them"
            )
        try:
            runs = runs_of(result)  # --infmax-repeat: each repeat is a run
        except (KeyError, TypeError, ValueError) as exc:
            raise BaselineError(f"{source}: result {result.get('name')!r} cannot be read: {exc}") from None
        testbed = result.get("testbed")
        if not isinstance(testbed, Mapping):
            testbed = build_testbed(result.get("server") if isinstance(result.get("server"), Mapping) else None)
        out.setdefault(runs[0].name, (dict(testbed), []))[1].extend(runs)
    return out


def load_runs(path: str | os.PathLike[str]) -> dict[str, tuple[dict[str, Any], list[BaselineRun]]]:
    """Result key -> (testbed, runs) from a baseline file, a directory of them, or
    an ``--infmax-json`` results file. Unreadable input raises :class:`BaselineError`."""
    path = Path(path)
    if path.is_dir():
        return {b.key: (b.testbed, b.runs) for b in BaselineStore(path)}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise CorruptBaselineError(path, f"it is not valid JSON ({exc}); was the write interrupted?") from None
    except RecursionError:
        raise CorruptBaselineError(path, _TOO_DEEP) from None
    if (
        isinstance(doc, Mapping)
        and "results" in doc
        and "format" in doc
        and not str(doc["format"]).startswith(FORMAT_NAME)
    ):
        try:  # the records' per-chunk stamps, from the sidecar beside the results file
            doc = sidecar.join(dict(doc), path)
        except sidecar.SidecarError as exc:
            raise BaselineError(str(exc)) from None
        return runs_from_results_document(doc, str(path))
    baseline = load_baseline(path)
    return {baseline.key: (baseline.testbed, baseline.runs)}

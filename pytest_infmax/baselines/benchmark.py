"""Results in pytest-benchmark's JSON layout (``--infmax-benchmark-json``), so that
``pytest-benchmark compare`` and the tools built on it read them.

Each result gives one benchmark per latency metric whose "rounds" are its per-request
values, with pytest-benchmark's own statistics, and one for throughput per GPU;
``extra_info`` carries every registered run-level figure (cost and energy included),
its unit and how it was obtained.
"""

from __future__ import annotations

import bisect
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pytest_infmax.baselines.store import BaselineRun, _plain
from pytest_infmax.measure.registry import METRICS
from pytest_infmax.records import RequestRecord

if TYPE_CHECKING:
    from pytest_infmax.run.results import LoadResult


BENCHMARK_METRICS: tuple[str, ...] = ("ttft", "tpot", "e2e", "itl")


def export_benchmark_json(
    results: Iterable[LoadResult | Mapping[str, Any] | BaselineRun],
    *,
    machine_info: Mapping[str, Any] | None = None,
    commit_info: Mapping[str, Any] | None = None,
    include_data: bool = True,
    metrics: Sequence[str] = BENCHMARK_METRICS,
) -> dict[str, Any]:
    """Results in pytest-benchmark's JSON layout (``--benchmark-json`` / saved runs).

    Each result gives one benchmark per latency metric (``<name>::ttft`` ...,
    grouped by result name) whose "rounds" are the per-request values in seconds,
    with pytest-benchmark's statistics (min, max, mean, stddev, rounds, median,
    iqr, q1, q3, outliers, ld15iqr, hd15iqr, ops, total; quartiles by its
    method), plus ``<name>::throughput_per_gpu`` whose one round is seconds per
    token per GPU, so that its ``ops`` is the throughput (tok/s/GPU) and lower is
    better as everywhere in pytest-benchmark. ``extra_info`` keeps the unit, the
    scenario and load, p90/p99 (which pytest-benchmark lacks) and the scalars.
    ``pytest-benchmark compare FILE`` reads the output.
    """
    benchmarks: list[dict[str, Any]] = []
    for result in results:
        name, data, scalars, info = _benchmark_source(result)
        for metric in metrics:
            values = data.get(metric)
            if values is None or len(values) == 0:
                continue
            benchmarks.append(_benchmark_entry(name, metric, [float(v) for v in values], info, scalars, include_data))
        tput = scalars.get("throughput_per_gpu")
        if tput:
            benchmarks.append(_benchmark_entry(name, "throughput_per_gpu", [1.0 / tput], info, scalars, include_data))
    return {
        "machine_info": dict(machine_info) if machine_info is not None else benchmark_machine_info(),
        "commit_info": dict(commit_info) if commit_info is not None else benchmark_commit_info(),
        "benchmarks": benchmarks,
        "datetime": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "version": "5.1.0",  # the pytest-benchmark JSON layout this follows
    }


def _benchmark_source(
    result: LoadResult | Mapping[str, Any] | BaselineRun,
) -> tuple[str, dict[str, Sequence[float]], dict[str, float | None], dict[str, Any]]:
    if isinstance(result, BaselineRun):
        data: dict[str, Sequence[float]] = {m: result.samples.get(m, []) for m in ("ttft", "tpot", "e2e")}
        data["itl"] = result.samples.get("itl_mean", [])
        info = {"workload": result.workload, "itl": "per-request mean"}
        return result.name, data, dict(result.scalars), {**info, **_provenance(result.summary)}
    if isinstance(result, Mapping):
        run = BaselineRun.from_result(result)
        records = [RequestRecord.from_dict(r) for r in result["records"]]
        return run.name, _latencies(records), dict(run.scalars), {"workload": run.workload, **_provenance(run.summary)}
    run = BaselineRun.from_result(result)
    return (
        run.name,
        _latencies(result.records),
        dict(run.scalars),
        {"workload": run.workload, **_provenance(run.summary)},
    )


def _provenance(summary: Mapping[str, Any]) -> dict[str, Any]:
    """How the figures that need more than the records were obtained, and why others are missing."""
    return {key: summary[key] for key in ("provenance", "unmeasured") if isinstance(summary.get(key), Mapping)}


def _latencies(records: Sequence[RequestRecord]) -> dict[str, Sequence[float]]:
    ok = sorted((r for r in records if r.ok and not r.warmup), key=lambda r: r.send_time)
    return {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "e2e": [r.e2e for r in ok if r.e2e is not None],
        "itl": [gap for r in ok for gap in r.itls()],
    }


def _benchmark_entry(
    name: str,
    metric: str,
    data: list[float],
    info: dict[str, Any],
    scalars: dict[str, float | None],
    include_data: bool,
) -> dict[str, Any]:
    stats = benchmark_stats(data)
    if include_data:
        stats["data"] = data
    stats["iterations"] = 1
    unit = "s/token/GPU (ops = tok/s/GPU)" if metric == "throughput_per_gpu" else "s"
    extra: dict[str, Any] = {"metric": metric, "unit": unit, **_plain(info)}
    if metric != "throughput_per_gpu":
        arr = np.asarray(data)
        extra.update({"p90": float(np.percentile(arr, 90)), "p99": float(np.percentile(arr, 99))})
    extra["scalars"] = {k: v for k, v in scalars.items() if v is not None}
    # canonical units: tok/s, fractions, $ per million tokens, J per token, W
    extra["scalar_units"] = {k: METRICS[k].unit for k in extra["scalars"] if k in METRICS}
    return {
        "group": name,
        "name": f"{name}::{metric}",
        "fullname": f"{name}::{metric}",
        "params": None,
        "param": None,
        "extra_info": extra,
        "options": {
            "disable_gc": False,
            "timer": "perf_counter",
            "min_rounds": len(data),
            "max_time": None,
            "min_time": None,
            "warmup": False,
        },
        "stats": stats,
    }


def benchmark_stats(data: Sequence[float]) -> dict[str, Any]:
    """pytest-benchmark's ``Stats.as_dict()`` for these rounds, computed as it does.

    Sample standard deviation (0 for one round); quartiles by its methods
    (median of halves for an even count, Tukey-style weights for an odd one);
    outliers as ``"<stddev outliers>;<iqr outliers>"``; ops = rounds / total.
    """
    values = [float(x) for x in data]
    if not values:
        raise ValueError("benchmark_stats needs at least one value")
    s = sorted(values)
    n = len(s)
    mean = sum(s) / n
    if n > 1:
        stddev = math.sqrt(sum((x - mean) ** 2 for x in s) / (n - 1))
    else:
        stddev = 0.0
    median = _median(s)
    if n == 1:
        q1 = q3 = s[0]
    elif n % 2:
        k, r = n // 4, n % 4
        if r == 1:
            q1 = 0.25 * s[k - 1] + 0.75 * s[k]
            q3 = 0.75 * s[3 * k] + 0.25 * s[3 * k + 1]
        else:
            q1 = 0.75 * s[k] + 0.25 * s[k + 1]
            q3 = 0.25 * s[3 * k + 1] + 0.75 * s[3 * k + 2]
    else:
        q1 = _median(s[: n // 2])
        q3 = _median(s[n // 2 :])
    iqr = q3 - q1
    low, high = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    iqr_outliers = sum(1 for x in s if x < low or x > high)
    stddev_outliers = sum(1 for x in s if x < mean - stddev or x > mean + stddev)
    if n == 1:
        ld15iqr = hd15iqr = s[0]
    else:
        ld15iqr = s[bisect.bisect_left(s, low)]
        pos = bisect.bisect_right(s, high)
        hd15iqr = s[-1] if pos == n else s[pos]
    total = sum(s)
    return {
        "min": s[0],
        "max": s[-1],
        "mean": mean,
        "stddev": stddev,
        "rounds": n,
        "median": median,
        "iqr": iqr,
        "q1": q1,
        "q3": q3,
        "iqr_outliers": iqr_outliers,
        "stddev_outliers": stddev_outliers,
        "outliers": f"{stddev_outliers};{iqr_outliers}",
        "ld15iqr": ld15iqr,
        "hd15iqr": hd15iqr,
        "ops": n / total if total else 0,
        "total": total,
    }


def _median(s: Sequence[float]) -> float:
    n = len(s)
    mid = n // 2
    return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2


def benchmark_machine_info() -> dict[str, Any]:
    """pytest-benchmark's ``machine_info`` keys, from the standard library."""
    return {
        "node": platform.node(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "python_compiler": platform.python_compiler(),
        "python_implementation": platform.python_implementation(),
        "python_implementation_version": platform.python_version(),
        "python_version": platform.python_version(),
        "python_build": list(platform.python_build()),
        "release": platform.release(),
        "system": platform.system(),
        "cpu": {"arch": platform.machine(), "count": os.cpu_count(), "brand_raw": platform.processor()},
    }


def benchmark_commit_info(cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """pytest-benchmark's ``commit_info`` keys, read from git (read-only) where there is one."""
    info: dict[str, Any] = {
        "id": "unversioned",
        "time": None,
        "author_time": None,
        "dirty": False,
        "project": Path(cwd or os.getcwd()).name,
        "branch": "(unknown)",
    }

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
                env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            )  # read-only: no index refresh
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if commit:
        info["id"] = commit
        info["time"] = git("show", "-s", "--pretty=format:%cI")
        info["author_time"] = git("show", "-s", "--pretty=format:%aI")
        info["dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        info["branch"] = "(detached head)" if branch == "HEAD" else (branch or "(unknown)")
    return info

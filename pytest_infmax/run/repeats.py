"""Repeated runs (``--infmax-repeat N``): one load, N runs, each on a fresh server start.

The regression gate's noise is mostly *between* server starts (clocks, placement,
warm-up), not between the requests of one run, so a 5 % change is only visible
with several runs, each a fresh start (docs/baselines.md). :class:`~pytest_infmax.run.results.Repeats` keeps
every run on its own; the :class:`~pytest_infmax.run.results.LoadResult` that holds
them pools their requests for metrics and SLA verdicts:

* distributions (TTFT, TPOT, ...), counts and error rate: over all requests;
* throughputs: all tokens over the *sum* of the runs' measured windows (the
  restarts in between are not load time);
* energy: summed over the runs' measured windows.

The gate and ``--infmax-save`` see the runs one by one
(:func:`pytest_infmax.baselines.store.runs_of`): N runs against the baseline history,
N runs into it. Runs that could not be given fresh starts (an endpoint server is
not ours to restart) share one start, so they are merged into one run there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pytest_infmax.load.plan import RunRecords
from pytest_infmax.measure.energy import EnergyReport, _per_token
from pytest_infmax.measure.metrics import Metrics, compute_metrics, wall_time

if TYPE_CHECKING:
    from pytest_infmax.measure.metrics import GoodputLimits


class RepeatError(ValueError):
    """A repeat count that cannot work."""


def repeat_count(value: Any, where: str = "repeat") -> int:
    """A whole number >= 1 of runs, or :class:`RepeatError` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RepeatError(f"{where} must be a whole number >= 1 (runs, each on a fresh server start), got {value!r}")
    return value


def repeat_marker_count(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    """The N of ``@pytest.mark.infmax_repeat(N)`` (also ``n=N``); RepeatError if malformed."""
    if kwargs and set(kwargs) != {"n"} or len(args) + len(kwargs) != 1:
        raise RepeatError(
            f"takes one whole number >= 1, e.g. @pytest.mark.infmax_repeat(10); "
            f"got args {tuple(args)!r} and keywords {dict(kwargs)!r}"
        )
    return repeat_count(args[0] if args else kwargs["n"], "the number of runs")


def pooled_run(runs: Sequence[RunRecords]) -> RunRecords:
    """Every run's records in one list, on the first run's clock (one process, one
    monotonic clock, runs one after another); the client's limits pooled likewise."""
    first, last = runs[0], runs[-1]
    clients = [r.client for r in runs if r.client is not None]
    client = None
    if clients:
        client = dataclasses.replace(
            clients[0],
            send_lags=[x for c in clients for x in c.send_lags],
            loop_lags=[x for c in clients for x in c.loop_lags],
            cpu_seconds=sum(c.cpu_seconds for c in clients),
            wall_seconds=sum(c.wall_seconds for c in clients),
        )
    return RunRecords(
        records=[rec for r in runs for rec in r.records],
        clock_origin=first.clock_origin,
        epoch_origin=first.epoch_origin,
        measured_start=first.measured_start,
        measured_end=last.measured_end,
        client=client,
    )


def pooled_metrics(
    runs: Sequence[RunRecords], *, num_gpus: int, percentiles: Sequence[float], goodput: GoodputLimits | None
) -> Metrics:
    """Metrics over every run's requests; rates over the summed measured time of the runs."""
    records = [rec for r in runs for rec in r.records]
    m = compute_metrics(records, num_gpus=num_gpus, percentiles=percentiles, goodput=goodput)
    duration = sum(wall_time([rec for rec in r.records if not rec.warmup]) for r in runs)

    def rate(amount: float) -> float:
        return amount / duration if duration > 0 else 0.0

    total = m.total_input_tokens + m.total_output_tokens
    return dataclasses.replace(
        m,
        duration=duration,
        request_throughput=rate(m.num_ok),
        input_throughput=rate(m.total_input_tokens),
        output_throughput=rate(m.total_output_tokens),
        throughput=rate(total),
        input_throughput_per_gpu=rate(m.total_input_tokens) / num_gpus,
        output_throughput_per_gpu=rate(m.total_output_tokens) / num_gpus,
        throughput_per_gpu=rate(total) / num_gpus,
        goodput=rate(m.num_good) if m.num_good is not None else None,  # None: no goodput limits
    )


def pooled_energy(
    reports: Sequence[EnergyReport | None], runs: Sequence[RunRecords], usd_per_kwh: float | None
) -> EnergyReport | None:
    """The runs' energy summed (joules, seconds, tokens); not measured if any run was not."""
    reps = [r for r in reports if r is not None]
    if not reports or len(reps) < len(reports):
        return None
    missing = [(i, r) for i, r in enumerate(reps) if not r.measured]
    if missing:
        i, rep = missing[0]
        why = rep.reason if len(missing) == len(reps) else f"not measured in run {i + 1}: {rep.reason}"
        return EnergyReport.not_measured(why, rep.source)
    duration = sum(r.duration_s or 0.0 for r in reps)
    energy = sum(r.energy_j or 0.0 for r in reps)
    origin = runs[0].measured_start
    timeline = [[round(t + run.measured_start - origin, 6), w] for rep, run in zip(reps, runs) for t, w in rep.timeline]
    peaks = [r.peak_power_w for r in reps if r.peak_power_w is not None]
    methods = {r.method for r in reps}

    def tokens(name: str) -> int | None:
        values = [getattr(r, name) for r in reps]
        return None if any(v is None for v in values) else sum(values)

    rep = EnergyReport(
        measured=True,
        source=reps[0].source,
        modelled=all(r.modelled for r in reps),
        method=methods.pop() if len(methods) == 1 else "mixed",
        duration_s=duration,
        coverage=round(sum((r.coverage or 0.0) * (r.duration_s or 0.0) for r in reps) / duration, 6)
        if duration > 0
        else None,
        samples=sum(r.samples for r in reps),
        read_errors=sum(r.read_errors for r in reps),
        energy_j=energy,
        avg_power_w=energy / duration if duration > 0 else None,
        peak_power_w=max(peaks) if peaks else None,
        input_tokens=tokens("input_tokens"),
        output_tokens=tokens("output_tokens"),
        gpus=reps[-1].gpus,  # the devices of the last start (a restart may land elsewhere)
        timeline=timeline,
    )
    if duration > 0:
        _per_token(rep, usd_per_kwh)
    return rep

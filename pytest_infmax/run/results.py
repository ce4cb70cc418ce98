"""A finished run: its records, the metrics computed from them, and SLA verdicts."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_infmax.load.plan import LoadConfig, RunRecords
from pytest_infmax.measure.cost import Price, TokenCost
from pytest_infmax.measure.energy import EnergyReport
from pytest_infmax.measure.metrics import GoodputLimits, Metrics, compute_metrics
from pytest_infmax.measure.servermetrics import ServerMetrics, compare_ttft
from pytest_infmax.measure.sla import Objective
from pytest_infmax.measure.verdicts import SLA, SLAFailed, Verdict
from pytest_infmax.records import RequestRecord
from pytest_infmax.run.repeats import pooled_energy, pooled_metrics, pooled_run

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0)


@dataclass
class LoadResult:
    """What ``infmax.run(...)`` returns.

    ``metrics`` are computed from the measured (non-warm-up) records on first
    use. Every SLA checked against this result is kept in ``verdicts`` so the
    reports show it whether it passed or not.
    """

    name: str
    config: LoadConfig
    run: RunRecords
    server: dict[str, Any]
    num_gpus: int = 1
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    goodput: GoodputLimits | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    price: Price | None = None  # what the GPU time is costed at; None: not priced
    price_note: str = ""  # why there is no price
    energy: EnergyReport | None = None  # GPU energy during the measured phase
    sequential: dict[str, Any] | None = None  # --infmax-sequential: where the comparison stopped, and why
    repeats: Repeats | None = None  # --infmax-repeat: the runs pooled here, each kept on its own
    server_metrics: ServerMetrics | None = None  # the server's own Prometheus metrics over the run
    interrupted: bool = False  # Ctrl-C stopped the run: its records up to then, those in flight cancelled
    server_died: str | None = None  # the server died during the run, which stopped then: how (run/watch.py)
    worker_lost: str | None = None  # a load worker (a Ray actor, its node) was lost: the run stopped then
    # a load infmax.capacity() measured: its SLA verdicts say met or missed, and fail no test
    capacity_probe: bool = False
    _figures: tuple[Any, Metrics] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def cost(self) -> TokenCost | None:
        """Cost per million total, input and output tokens at ``price``."""
        if self.price is None:
            return None
        m = self.metrics
        return TokenCost.of(self.price, self.num_gpus, m.throughput, m.input_throughput, m.output_throughput)

    @property
    def records(self) -> list[RequestRecord]:
        return self.run.records

    @functools.cached_property
    def request_metrics(self) -> Metrics:
        """The figures of the records alone (no price, energy or server metrics)."""
        return self._metrics(self.goodput)

    @property
    def metrics(self) -> Metrics:
        """Every figure of the run: the records' (computed once), with cost at ``price``,
        ``energy`` and ``server_metrics`` added as they stand now."""
        key = (self.num_gpus, id(self.price), self.price_note, id(self.energy), id(self.server_metrics))
        if self._figures is None or self._figures[0] != key:
            self._figures = (key, self._with_figures(self.request_metrics))
        return self._figures[1]

    def _with_figures(self, metrics: Metrics) -> Metrics:
        return metrics.with_figures(
            price=self.price,
            price_note=self.price_note,
            energy=self.energy,
            server=None if self.server_metrics is None else self.server_metrics.to_dict(),
        )

    def _metrics(self, goodput: GoodputLimits | None) -> Metrics:
        if self.repeats is not None:  # rates over the runs' measured time, not the restarts between
            return pooled_metrics(
                [r.run for r in self.repeats.runs],
                num_gpus=self.num_gpus,
                percentiles=self.percentiles,
                goodput=goodput,
            )
        return compute_metrics(self.run.records, num_gpus=self.num_gpus, percentiles=self.percentiles, goodput=goodput)

    def evaluate(self, *objectives: str | Objective, sla: SLA | None = None) -> list[Verdict]:
        """Verdicts for the objectives, without raising and without recording them: a look
        changes no outcome and no report cell. :meth:`check` is the assertion, and records."""
        sla = sla if sla is not None else SLA(*objectives)
        metrics = self.metrics
        if sla.goodput is not None and sla.goodput != self.goodput:
            metrics = self._with_figures(self._metrics(sla.goodput))
        return sla.evaluate(metrics)

    def check(self, *objectives: str | Objective, sla: SLA | None = None) -> list[Verdict]:
        """Evaluate, record the verdicts on this result (the reports' SLA cell) and raise
        ``SLAFailed`` listing every violated objective."""
        __tracebackhide__ = True  # failures point at the test line that ran the load
        verdicts = self.evaluate(*objectives, sla=sla)
        self.verdicts.extend(verdicts)
        failed = [v for v in verdicts if not v.passed]
        if failed:
            raise SLAFailed(failed, context=self.headline())
        return verdicts

    @property
    def passed(self) -> bool | None:
        """True/False once any SLA was checked, None when none was."""
        if not self.verdicts:
            return None
        return all(v.passed for v in self.verdicts)

    def headline(self) -> str:
        m = self.metrics
        return f"{self.name}: {self.config.scenario.name} {self.config.label}, {m.num_ok}/{m.num_requests} requests ok"

    def server_metrics_report(self) -> dict[str, Any] | None:
        """``server_metrics`` as plain data, with ``comparison``: the client's TTFT against the
        server's (and the client-overhead note when the client's is well above it)."""
        if self.server_metrics is None:
            return None
        out = self.server_metrics.to_dict()
        m = self.metrics
        out["comparison"] = compare_ttft(out, m.value("ttft", "mean"), m.value("ttft", "p50"))
        return out

    def to_dict(self, include_records: bool = True, *, arrays: bool = False) -> dict[str, Any]:
        """Plain data: the ``--infmax-json`` result. ``arrays``: the records' per-chunk stamps as
        numpy arrays, not lists (``RequestRecord.to_dict``): the plugin's own reports, whose
        stamps go to binary files (``sidecar.py``)."""
        run = self.run
        out: dict[str, Any] = {
            "name": self.name,
            "load": self.config.to_dict(),
            "server": self.server,
            "num_gpus": self.num_gpus,
            "started_at": run.epoch_origin,
            "measured_window_s": [
                round(run.measured_start - run.clock_origin, 6),
                round(run.measured_end - run.clock_origin, 6),
            ],
            "metrics": self.metrics.to_dict(),
            "client": run.client.to_dict() if run.client is not None else None,
            "sla": [v.to_dict() for v in self.verdicts],
            "passed": self.passed,
            "cost": self.cost.to_dict() if self.cost is not None else {"not_priced": self.price_note or None},
            "energy": self.energy.to_dict() if self.energy is not None else None,
            "sequential": self.sequential,
            "server_metrics": self.server_metrics_report(),
        }
        if self.repeats is not None:
            out["repeats"] = self.repeats.to_dict(run.clock_origin)
        if self.interrupted:
            out["interrupted"] = True
        if self.server_died is not None:
            out["server_died"] = self.server_died
        if self.worker_lost is not None:
            out["worker_lost"] = self.worker_lost
        if self.capacity_probe:
            out["capacity_probe"] = True
        if include_records:
            out["records"] = [r.to_dict(run.clock_origin, arrays=arrays) for r in run.records]
        return out


@dataclass
class Repeats:
    """The runs of one repeated load, in order. ``fresh_starts``: the server was restarted
    before every run but the first; otherwise ``note`` says why not."""

    runs: list[LoadResult]
    fresh_starts: bool = True
    note: str = ""

    def __len__(self) -> int:
        return len(self.runs)

    def to_dict(self, clock_origin: float) -> dict[str, Any]:
        """Per-run facts; ``records`` is the [start, stop) slice of the result's ``records``
        (one list, every run's records in order, times relative to the first run's origin)."""
        out, start = [], 0
        for i, r in enumerate(self.runs):
            run = r.run
            stop = start + len(run.records)
            server = r.server or {}
            out.append(
                {
                    "index": i,
                    "records": [start, stop],
                    "started_at": run.epoch_origin,
                    "measured_window_s": [
                        round(run.measured_start - clock_origin, 6),
                        round(run.measured_end - clock_origin, 6),
                    ],
                    "server": {k: server.get(k) for k in ("pid", "base_url", "startup_seconds", "log")},
                    "fresh_start": self.fresh_starts or i == 0,
                    "client_bound": run.client_bound,
                    "metrics": r.metrics.to_dict(),
                    "energy": r.energy.to_dict() if r.energy is not None else None,
                    # the server's own metrics cannot be pooled across starts (its counters restart)
                    "server_metrics": r.server_metrics_report(),
                }
            )
            start = stop
        return {"count": len(self.runs), "fresh_starts": self.fresh_starts, "note": self.note, "runs": out}


def combine(runs: Sequence[LoadResult], *, fresh_starts: bool, note: str, usd_per_kwh: float | None) -> LoadResult:
    """One result holding ``runs`` (each a LoadResult of one run), pooled for metrics."""
    first, last = runs[0], runs[-1]
    records = [r.run for r in runs]
    result = LoadResult(
        name=first.name,
        config=first.config,
        run=pooled_run(records),
        server=last.server,  # the start that is still running
        num_gpus=first.num_gpus,
        percentiles=first.percentiles,
        goodput=first.goodput,
        price=first.price,
        price_note=first.price_note,
        energy=pooled_energy([r.energy for r in runs], records, usd_per_kwh),
    )
    result.repeats = Repeats(list(runs), fresh_starts, note)
    return result

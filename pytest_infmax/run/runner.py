"""``infmax.run(...)``: one call from a test to a checked result.

Usable without pytest::

    with running_server(ServerConfig(), Path("logs")) as server:
        result = Infmax(server).run("1k1k-mini", concurrency=4, sla=["p99(ttft) < 500ms"])
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_infmax.load.generator import LoadGenerator, run_coroutine
from pytest_infmax.load.plan import LoadConfig, LoadConfigError, RunRecords
from pytest_infmax.load.progress import Progress
from pytest_infmax.load.rayworkers import WorkerLost
from pytest_infmax.load.scenarios import Endpoint, Scenario, TokenWindow, get_scenario
from pytest_infmax.load.workloads import Workload
from pytest_infmax.measure.cost import Price, Tier, choose_price
from pytest_infmax.measure.energy import EnergyReport, EnergySampler, HttpPowerSource, NvmlPowerSource, gpus_for_pids
from pytest_infmax.measure.metrics import GoodputLimits, per_request_value
from pytest_infmax.measure.servermetrics import Scraper, metrics_url
from pytest_infmax.measure.sla import Objective
from pytest_infmax.measure.verdicts import SLA
from pytest_infmax.records import RequestRecord
from pytest_infmax.run.repeats import RepeatError, repeat_count
from pytest_infmax.run.results import DEFAULT_PERCENTILES, LoadResult, combine
from pytest_infmax.run.watch import ServerWatch
from pytest_infmax.servers import engines, telemetry
from pytest_infmax.servers.launch import Server, ServerError, restart_server

if TYPE_CHECKING:  # imported by sweep() and capacity(): a run() alone does not need them
    from pytest_infmax.run.capacity import CapacityResult, Method, Over, Probe
    from pytest_infmax.run.sweep import SweepResult


class Infmax:
    """Drives load against one server and collects the results."""

    def __init__(
        self,
        server: Server,
        *,
        name: str = "run",
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        request_timeout: float = 600.0,
        on_result: Callable[[LoadResult], None] | None = None,
        on_sweep: Callable[[SweepResult], None] | None = None,
        on_run: Callable[[LoadResult], None] | None = None,
        progress: Callable[[str], None] | None = None,
        sequential: Callable[[str, int | None], Any] | None = None,
        energy: bool = True,
        usd_per_kwh: float | None = None,
        gpu_hour_usd: float | None = None,
        price_tier: Tier = "neocloud",
        price_source: str = "--infmax-gpu-hour-usd",
        server_metrics: bool = True,
        server_metrics_interval: float = 1.0,
        repeat: int = 1,
        restart: Callable[[Server], Server] | None = None,
        workers: int = 1,
        ray: str | None = None,
    ) -> None:
        self.server = server
        # --infmax-repeat: runs per run() / sweep point, the server restarted (a fresh start) between them
        self.repeat = repeat_count(repeat)
        self._restart = restart or restart_server  # (server) -> the same server, started afresh
        self.name = name
        self.workers = workers  # load-generator processes per run (LoadConfig.workers)
        self.ray = ray  # the Ray cluster they run on as actors (LoadConfig.ray), or None: local processes
        self.percentiles = tuple(percentiles)
        self.request_timeout = request_timeout
        self.results: list[LoadResult] = []
        self._on_result = on_result
        self._on_sweep = on_sweep
        # every run the moment it ends (each of a repeat's, a sweep's points, one Ctrl-C stopped):
        # what the plugin's results journal takes, so a kill loses at most the run in flight
        self._on_run = on_run
        self._progress = progress  # receives a progress line every few seconds of a long run
        self._sequential = sequential  # (name, cap) -> SequentialComparison | None
        self.energy = energy
        self.usd_per_kwh = usd_per_kwh
        self._price: tuple[Price | None, str] | None = None
        self._gpu_hour_usd, self._price_tier = gpu_hour_usd, price_tier
        self._price_source = price_source  # where gpu_hour_usd was set, for the price's label
        # The server's own Prometheus metrics, scraped around each run (servermetrics); gauges every N s
        self.server_metrics, self.server_metrics_interval = server_metrics, server_metrics_interval

    def run(self, scenario: str | Scenario | None = None, **kwargs: Any) -> LoadResult:
        """Run load and return its result; see :meth:`arun` for the arguments."""
        __tracebackhide__ = True  # failures point at the test line that ran the load
        _check_arguments(kwargs, "infmax.run()")
        plan = self._plan(scenario, **kwargs)  # validation only: nothing is sent yet
        return self._conclude(_run_sync(self._measure_all(plan), "infmax.run()"), plan)

    async def arun(self, scenario: str | Scenario | None = None, **kwargs: Any) -> LoadResult:
        """Run warm-up and measured load; check ``sla`` if given.

        ``scenario``: a preset's name (default ``1k1k-mini``) or a :class:`Scenario`; or leave it
        out and give ``isl=`` and ``osl=`` (tokens in and out per request) and, if you like,
        ``range_ratio=`` (lengths uniform in [range_ratio·L, L]; default 0.8, InferenceMAX's).
        With a scenario, ``isl=``/``osl=``/``range_ratio=`` replace its own.

        Other keyword arguments: ``concurrency`` (closed loop) or ``rate`` (open loop,
        requests/s; ``math.inf`` sends all at once), exactly one of them;
        ``burstiness``, ``max_concurrency``, ``num_requests``, ``duration``,
        ``warmup``, ``endpoint`` ("completions" or "chat"), ``sla``,
        ``goodput``, ``seed``, ``extra_body``, ``request_timeout``, ``name``,
        ``repeat`` (runs of this load, each on a fresh server start; default
        ``--infmax-repeat``): the result pools their requests and keeps each run;
        ``workers`` (load-generator processes; default ``--infmax-workers``);
        ``ray`` (the address of a Ray cluster the workers run on as actors, past one host;
        default ``--infmax-ray``; docs/scale-out.md);
        ``workload``: ``Sessions(turns=, think_time=, prefixes=, prefix_len=)`` (multi-turn
        conversations, with ``concurrency`` users) or ``Trace.load(path, speedup=)`` (a Mooncake
        trace replayed at its timestamps), see :mod:`pytest_infmax.load.workloads`.

        SLA expressions and goodput limits are validated before any request is
        sent. If an SLA fails, the result is still recorded for the reports
        before ``SLAFailed`` is raised.
        """
        __tracebackhide__ = True
        _check_arguments(kwargs, "infmax.arun()")
        plan = self._plan(scenario, **kwargs)
        return self._conclude(await self._measure_all(plan), plan)

    def sweep(
        self,
        scenario: str | Scenario | None = None,
        *,
        concurrency: Sequence[int] | None = None,
        rate: Sequence[float] | None = None,
        frontier_sla: Sequence[str] = (),
        price: Price | None = None,
        **kwargs: Any,
    ) -> SweepResult:
        """One run per concurrency (or request rate) level; returns every point.

        ``frontier_sla`` expressions (``"throughput_per_gpu@interactivity=50 > 10000 tok/s"``)
        are validated before the first run and checked after the last.
        """
        __tracebackhide__ = True
        _check_arguments(kwargs, "infmax.sweep()", extra=("frontier_sla", "price"))
        if (concurrency is None) == (rate is None):
            raise LoadConfigError("sweep() needs exactly one of concurrency=[...] or rate=[...]")
        counts = list(concurrency) if concurrency is not None else []
        rates = list(rate) if rate is not None else []
        if not counts and not rates:
            raise LoadConfigError("sweep() needs at least one level")
        from pytest_infmax.run.sweep import FrontierObjective, SweepResult

        objectives = [FrontierObjective.parse(o) for o in frontier_sla]
        base = kwargs.pop("name", None) or self.name
        plans = [self._plan(scenario, concurrency=c, name=f"{base}[c={c}]", **kwargs) for c in counts] + [
            self._plan(scenario, rate=r, name=f"{base}[rate={r}]", **kwargs) for r in rates
        ]
        # The sweep and each of its points are priced alike: price= where given, else the
        # session's price (--infmax-gpu-hour-usd, its env/ini, the marker, or the default table).
        if price is not None:
            plans = [dataclasses.replace(plan, price=price) for plan in plans]
            sweep = SweepResult([], price=price)
        else:
            session_price, note = self.price()
            sweep = SweepResult([], price=session_price, price_note=note)
        if self._on_sweep is not None:  # reported even if a point fails its SLA
            self._on_sweep(sweep)
        for plan in plans:
            result = self._conclude(_run_sync(self._measure_all(plan), "infmax.sweep()"), plan)
            sweep.results.append(result)
        if objectives:
            sweep.check(*(o.text for o in objectives))
        return sweep

    def capacity(
        self,
        scenario: str | Scenario | None = None,
        *,
        sla: Sequence[str | Objective] | SLA | str | None = None,
        over: Over = "concurrency",
        lo: float | None = None,
        hi: float | None = None,
        step: float | None = None,
        method: Method = "pchip",
        price: Price | None = None,
        **kwargs: Any,
    ) -> CapacityResult:
        """The largest load (``over="concurrency"`` or ``"rate"``) in [lo, hi] that meets ``sla``.

        Brackets by doubling from ``lo`` (default 1) up to ``hi`` (default 1024), then narrows
        until the last load that met the SLAs and the first that missed them are at most ``step``
        apart (default: 1 for concurrency, ``lo`` for rate): ``method="pchip"`` places each load
        at the root of a PCHIP through the points' SLA margins, ``"bisect"`` halves
        (:mod:`pytest_infmax.run.capacity`). Every load is an ordinary result in the reports,
        judged by ``sla`` (a missed SLA there does not fail the test: the assertion on the
        returned capacity does). Other keyword arguments are ``run()``'s (``isl``, ``osl``,
        ``num_requests``, ``duration``, ``goodput``, ...). Everything is validated before the
        first load is sent.
        """
        __tracebackhide__ = True
        _check_arguments(
            kwargs,
            "infmax.capacity()",
            extra=("over", "lo", "hi", "step", "method", "price"),
            drop=("concurrency", "rate"),
        )
        from pytest_infmax.run.capacity import CapacityResult, Grid, Probe, margin, search

        grid = Grid.of(over, lo, hi, step)
        if method not in ("pchip", "bisect"):
            raise LoadConfigError(f"capacity(method={method!r}): method must be 'pchip' or 'bisect'")
        sla_obj = _as_sla(sla, kwargs.get("goodput"))
        if sla_obj is None or not len(sla_obj):
            raise LoadConfigError("capacity() needs sla=[...]: the objectives a load must meet to count")
        base = kwargs.pop("name", None) or self.name

        def plan_at(load: float) -> _Plan:
            level = {"concurrency": int(load)} if grid.whole else {"rate": float(load)}
            plan = self._plan(scenario, **level, name=f"{base}[{grid.label(load)}]", **kwargs)
            return dataclasses.replace(plan, price=price) if price is not None else plan

        plan_at(grid.lo), plan_at(grid.hi)  # validation only: nothing is sent yet
        if price is not None:
            cap = CapacityResult([], price=price)
        else:
            session_price, note = self.price()
            cap = CapacityResult([], price=session_price, price_note=note)
        cap.over, cap.grid, cap.method = grid.over, grid, method
        cap.sla = tuple(str(o) for o in sla_obj.objectives)
        if self._on_sweep is not None:  # reported even if a load fails
            self._on_sweep(cap)

        def measure(load: float) -> Probe:
            plan = plan_at(load)
            result = _run_sync(self._measure_all(plan), "infmax.capacity()")
            result.capacity_probe = True
            if result.server_died is not None:  # every later load would measure a dead server
                cap.results.append(result)
                raise ServerError(
                    f"{base}: the server died during the capacity search, at {grid.label(load)}: {result.server_died}"
                )
            verdicts = result.evaluate(sla=sla_obj)
            result.verdicts.extend(verdicts)  # the reports' SLA cell: met or missed, not a failed test
            cap.results.append(result)
            probe = Probe(
                load,
                all(v.passed for v in verdicts),
                margin(verdicts),
                result.name,
                tuple(v.message for v in verdicts if not v.passed),
            )
            cap.probes.append(probe)
            if self._progress is not None:
                self._progress(f"{base}: capacity {grid.label(load)} {'met' if probe.met else 'missed'} the SLAs")
            return probe

        search(measure, grid, method)
        return cap

    def _plan(
        self,
        scenario: str | Scenario | None,
        *,
        isl: int | None = None,
        osl: int | None = None,
        range_ratio: float | None = None,
        concurrency: int | None = None,
        rate: float | None = None,
        burstiness: float = 1.0,
        max_concurrency: int | None = None,
        num_requests: int | None = None,
        duration: float | None = None,
        warmup: int | None = None,
        endpoint: Endpoint | None = None,
        sla: Sequence[str | Objective] | SLA | str | None = None,
        goodput: GoodputLimits | str | dict[str, Any] | None = None,
        seed: int = 0,
        extra_body: dict[str, Any] | None = None,
        request_timeout: float | None = None,
        name: str | None = None,
        repeat: int | None = None,
        workers: int | None = None,
        ray: str | None = None,
        workload: Workload | None = None,
    ) -> _Plan:
        """Validate every argument before any request is sent."""
        try:
            runs = self.repeat if repeat is None else repeat_count(repeat, "repeat=")
        except RepeatError as exc:
            raise LoadConfigError(str(exc)) from None
        sla_obj = _as_sla(sla, goodput)
        scen = scenario_of(scenario, isl=isl, osl=osl, range_ratio=range_ratio, endpoint=endpoint)
        config = LoadConfig(
            scenario=scen,
            concurrency=concurrency,
            rate=rate,
            burstiness=burstiness,
            max_concurrency=max_concurrency,
            num_requests=num_requests,
            duration=duration,
            warmup=warmup,
            # 0 is refused by LoadConfig, not replaced by the default
            request_timeout=self.request_timeout if request_timeout is None else request_timeout,
            seed=seed,
            extra_body=dict(extra_body or {}),
            # the session's --infmax-workers never exceeds a level's streams (a sweep's c=1 runs in one)
            workers=(1 if workload is not None else min(self.workers, concurrency or max_concurrency or self.workers))
            if workers is None
            else workers,
            ray=(None if workload is not None else self.ray) if ray is None else ray,
            tokens=self._token_window(),
            workload=workload,
        )
        goodput_limits = sla_obj.goodput if sla_obj is not None else _as_goodput(goodput)
        return _Plan(config, sla_obj, goodput_limits, name or self.name, runs)

    def _token_window(self) -> TokenWindow:
        """Token-id prompts inside the server's model's vocabulary (``Server.vocabulary``)."""
        v = self.server.vocabulary
        source = f"vocabulary of {v.size}: {v.source}" if v.size is not None else v.source
        try:
            return TokenWindow.for_vocabulary(v.size, v.special_ids, source)
        except ValueError as exc:
            raise LoadConfigError(f"{exc} ({v.source})") from None

    async def _measure_all(self, plan: _Plan) -> LoadResult:
        """One run, or ``plan.repeat`` runs with a fresh server start before each but the first."""
        if plan.repeat == 1:
            return await self._measure(plan)
        fresh = self.server.restartable
        notes = (
            []
            if fresh
            else [
                f"{self.server.config.kind} servers cannot be restarted: the {plan.repeat} runs "
                "share one server start, so the gate compares them as one run"
            ]
        )
        if self._sequential is not None:
            notes.append("--infmax-sequential applies to single runs: each repeat ran to its request count")
        runs: list[LoadResult] = []
        for i in range(plan.repeat):
            if i and fresh:
                try:
                    await asyncio.to_thread(self._restart, self.server)  # blocking: stop, start, wait ready
                except ServerError as exc:
                    raise ServerError(
                        f"{plan.name}: fresh start for run {i + 1} of {plan.repeat} failed: {exc}"
                    ) from None
            if self._progress is not None:
                self._progress(f"{plan.name}: run {i + 1}/{plan.repeat} on server pid {self.server.pid or '-'}")
            runs.append(await self._measure(plan, record=False, sequential=False))
        result = combine(runs, fresh_starts=fresh, note="; ".join(notes), usd_per_kwh=self.usd_per_kwh)
        self._record(result)
        return result

    def _record(self, result: LoadResult) -> None:
        self.results.append(result)
        if self._on_result is not None:
            self._on_result(result)

    async def _measure(self, plan: _Plan, *, record: bool = True, sequential: bool = True) -> LoadResult:
        generator = LoadGenerator(self.server.base_url, self.server.model, self.server.api_key)
        watchers: list[Callable[[RequestRecord], None]] = []
        if self._progress is not None:
            total = (plan.config.effective_num_requests or 0) + plan.config.effective_warmup or None
            watchers.append(Progress(self._progress, plan.name, plan.config.label, total).on_record)
        seq = (
            self._sequential(plan.name, plan.config.effective_num_requests)
            if self._sequential and sequential and plan.config.workers == 1 and plan.config.ray is None
            else None
        )
        if seq is not None:
            watchers.append(_feed_sequential(seq))
        # a dead server stops the run (in this process, its worker processes or its Ray actors)
        watch = ServerWatch(self.server)
        watchers.append(watch.on_record)

        def stop() -> bool:
            return (seq is not None and seq.state.stop) or watch.dead()

        def on_record(rec: RequestRecord) -> None:
            for watcher in watchers:
                watcher(rec)

        scraper = await self._metrics_scraper(plan.config.effective_warmup)
        if scraper is not None:  # baseline when warm-up ends; counts the measured requests
            watchers.append(scraper.on_record)
        sampler, not_measured = self._energy_sampler()

        def keep_partial(partial: RunRecords, why: str, *, worker_lost: str | None = None) -> None:
            """A run stopped part-way (Ctrl-C, or a lost Ray worker: ``worker_lost``): what it
            measured until then goes to the session's reports, flagged."""
            result = self._result(plan, partial, None)
            result.interrupted = worker_lost is None
            result.worker_lost = worker_lost
            result.energy = EnergyReport.not_measured(why)
            self._ended(result)
            self._record(result)

        try:
            run = await generator.run(
                plan.config,
                on_record=on_record,
                stop=stop,
                on_interrupted=lambda partial: keep_partial(partial, "the run was interrupted"),
                before_measured=(
                    scraper.measured_phase_starts
                    if scraper is not None and plan.config.workers == 1 and plan.config.ray is None
                    else None
                ),
            )
        except BaseException as exc:
            if isinstance(exc, WorkerLost) and exc.partial is not None:
                keep_partial(exc.partial, "a load worker was lost mid-run", worker_lost=str(exc))
            if scraper is not None:
                await scraper.close()
            raise
        finally:
            if sampler is not None:
                sampler.stop()
        server_metrics = await scraper.finish() if scraper is not None else None
        result = self._result(plan, run, server_metrics)
        # stopped by it, or died with the last requests (a wait of up to 1 s for a crash to show: off the loop)
        if await asyncio.to_thread(watch.dead, now=True):
            result.server_died = watch.note
        if seq is not None:
            result.sequential = {"gate": seq.gate.label, **dataclasses.asdict(seq.state)}
        result.energy = (
            sampler.report_for(result, self.usd_per_kwh)
            if sampler is not None
            else EnergyReport.not_measured(not_measured)
        )
        self._ended(result)
        if record:
            self._record(result)
        return result

    def _ended(self, result: LoadResult) -> None:
        if self._on_run is not None:
            self._on_run(result)

    def _result(self, plan: _Plan, run: RunRecords, server_metrics: Any) -> LoadResult:
        result = LoadResult(
            name=plan.name,
            config=plan.config,
            run=run,
            server=self.server.describe(),
            num_gpus=self.server.num_gpus,
            percentiles=self.percentiles,
            goodput=plan.goodput,
        )
        result.price, result.price_note = (plan.price, "") if plan.price is not None else self.price()
        result.server_metrics = server_metrics
        return result

    def price(self) -> tuple[Price | None, str]:
        """The $/GPU-hour results are costed at (and why there is none, if so); chosen once."""
        if self._price is None:
            config = self.server.config
            gpu_name = None
            if config.kind not in ("sim", "endpoint") and self._gpu_hour_usd is None:
                try:
                    gpu_name = telemetry.gpus()[0].name
                except Exception:  # no NVML here: no GPU to name
                    gpu_name = None
            if config.kind == "sim":
                gpu_name = self.server.modelled_hardware  # what the simulator says it models
            self._price = choose_price(self._gpu_hour_usd, self._price_tier, config.kind, gpu_name, self._price_source)
        return self._price

    async def _metrics_scraper(self, warmup: int) -> Scraper | None:
        """The server's Prometheus metrics page, read once (None when not scraped). Never raises:
        a page that cannot be read gives a result that says why."""
        config = self.server.config
        path = config.prometheus_path if self.server_metrics else None
        if path is None:
            return None
        kind = "vllm" if config.kind == "sim" else config.kind  # the simulator uses vLLM's names
        scraper = Scraper(
            metrics_url(self.server.base_url, path),
            model=self.server.model,
            engine=kind if kind in engines.ENGINES else None,
            api_key=self.server.api_key,
            interval=self.server_metrics_interval,
            warmup=warmup,
            hint=engines.METRICS_HINTS.get(kind, ""),
        )
        await scraper.open()
        return scraper

    def _energy_sampler(self) -> tuple[EnergySampler | None, str]:
        """A running NVML sampler for the server's GPUs, or None and why energy is not measured."""
        kind = self.server.config.kind
        if not self.energy:
            return None, "energy measurement is off (--infmax-energy off)"
        if kind == "sim":
            if not self.server.modelled_power:  # the simulator said so in /sim/stats
                return None, "the default simulator models no power (a --profile hardware does)"
            sampler = EnergySampler(HttpPowerSource(f"{self.server.base_url}/sim/power"))
            sampler.start()
            return sampler, ""
        if kind == "endpoint":
            return None, "a running endpoint's GPUs may be on another machine"
        ok, why = telemetry.available()
        if not ok:
            return None, why
        pids = [p for p in (self.server.pid, *self.server.tracked) if p]
        sampler = EnergySampler(NvmlPowerSource(gpus_for_pids(pids)))
        sampler.start()
        return sampler, ""

    def _conclude(self, result: LoadResult, plan: _Plan) -> LoadResult:
        __tracebackhide__ = True
        if plan.sla is not None and len(plan.sla):
            result.check(sla=plan.sla)
        return result


SEQUENTIAL_BATCH = 8  # requests between looks; the confidence sequence holds at every look


@dataclass(frozen=True)
class _Plan:
    config: LoadConfig
    sla: SLA | None
    goodput: GoodputLimits | None
    name: str
    repeat: int = 1  # runs, each on a fresh server start
    price: Price | None = None  # sweep(price=): this price instead of the session's


# The keyword arguments of run()/arun() (and, with the sweep's own, of sweep()): _plan's.
RUN_ARGUMENTS = tuple(p for p in inspect.signature(Infmax._plan).parameters if p not in ("self", "scenario"))


def scenario_of(
    scenario: str | Scenario | None,
    *,
    isl: int | None = None,
    osl: int | None = None,
    range_ratio: float | None = None,
    endpoint: Endpoint | None = None,
) -> Scenario:
    """The scenario a run's arguments ask for: a preset's name or a ``Scenario`` (None: ``1k1k-mini``,
    unless ``isl=`` and ``osl=`` describe one), with ``isl``/``osl``/``range_ratio``/``endpoint``
    replacing its own. A scenario whose lengths change is renamed after them (``isl512-osl64``)."""
    try:
        if scenario is None and (isl is not None or osl is not None):
            if isl is None or osl is None:
                given, missing = ("isl", "osl") if osl is None else ("osl", "isl")
                raise LoadConfigError(
                    f"{given}= without {missing}=: give both (tokens in and out per request), "
                    f"or a scenario whose {missing} to keep, e.g. run('1k1k-mini', {given}=...)"
                )
            scen = Scenario(isl=isl, osl=osl, range_ratio=0.8 if range_ratio is None else range_ratio)
        else:
            scen = get_scenario("1k1k-mini" if scenario is None else scenario)
            if isl is not None or osl is not None:  # new lengths: a name that says them
                scen = dataclasses.replace(
                    scen, name="", isl=scen.isl if isl is None else isl, osl=scen.osl if osl is None else osl
                )
            if range_ratio is not None:
                scen = dataclasses.replace(scen, range_ratio=range_ratio)
        if endpoint is not None:
            scen = scen.with_endpoint(endpoint)
    except ValueError as exc:
        if isinstance(exc, LoadConfigError):
            raise
        raise LoadConfigError(str(exc)) from None
    return scen


# What vLLM's and SGLang's benchmarks (and InferenceMAX's configs) call a run's arguments
OTHER_TOOLS_NAMES = {
    "input_len": "isl",
    "random_input_len": "isl",
    "input_length": "isl",
    "output_len": "osl",
    "random_output_len": "osl",
    "output_length": "osl",
    "random_range_ratio": "range_ratio",
    "request_rate": "rate",
    "num_prompts": "num_requests",
    "num_warmups": "warmup",
    "max_concurrency": "max_concurrency",
}


def _check_arguments(
    kwargs: dict[str, Any], caller: str, extra: tuple[str, ...] = (), drop: tuple[str, ...] = ()
) -> None:
    """Every keyword a run takes is known; a misspelt one names the closest (before: a
    TypeError naming the private ``_plan``). ``drop``: run()'s that this caller sets itself."""
    known = [*(a for a in RUN_ARGUMENTS if a not in drop), *extra]
    for name in kwargs:
        if name in drop:
            raise LoadConfigError(f"{caller} chooses {name}= itself: give over=, lo= and hi= instead")
        if name not in known:
            alias = OTHER_TOOLS_NAMES.get(name.lower().lstrip("-").replace("-", "_"))
            close = [alias] if alias in known else difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]}=?" if close else ""
            raise LoadConfigError(
                f"{caller} has no argument {name}={kwargs[name]!r}{hint} (its arguments: {', '.join(known)})"
            )


def _feed_sequential(seq: Any) -> Callable[[RequestRecord], None]:
    """Give the sequential comparison its gate's per-request values in batches."""
    metric = "tpot" if seq.gate.metric == "interactivity" else seq.gate.metric  # it inverts TPOTs itself
    batch: list[float] = []

    def feed(rec: RequestRecord) -> None:
        if rec.warmup or not rec.ok or seq.state.stop:
            return
        value = per_request_value(rec, metric)
        if value is not None:
            batch.append(value)
        if len(batch) >= SEQUENTIAL_BATCH:
            seq.update(batch)
            batch.clear()

    return feed


def _run_sync(coro: Any, caller: str) -> Any:
    """Run ``coro`` on a fresh event loop; inside a running one, say what to call instead."""
    if _loop_running():
        coro.close()
        raise RuntimeError(f"{caller} was called inside a running event loop; use `await infmax.arun(...)` there")
    return run_coroutine(coro)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _as_goodput(goodput: GoodputLimits | str | dict[str, Any] | None) -> GoodputLimits | None:
    if goodput is None or isinstance(goodput, GoodputLimits):
        return goodput
    return GoodputLimits.parse(goodput)


def _as_sla(
    sla: Sequence[str | Objective] | SLA | None, goodput: GoodputLimits | str | dict[str, Any] | None
) -> SLA | None:
    if sla is None:
        return SLA(goodput=_as_goodput(goodput)) if goodput is not None else None
    if isinstance(sla, SLA):
        return sla
    if isinstance(sla, (str, Objective)):
        sla = [sla]
    return SLA(*sla, goodput=_as_goodput(goodput))

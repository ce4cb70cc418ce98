"""The pytest plugin: fixtures, markers and report hooks, kept thin.

Everything here wires pytest to the plain modules (servers, runner, sla,
reports). Results travel on test reports (``report.infmax_results``), so they
reach the controller under pytest-xdist as they do in a single process.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_infmax import settings as settings_mod
from pytest_infmax import sidecar
from pytest_infmax.measure.cost import price_marker_options
from pytest_infmax.measure.sla import SLASyntaxError, format_quantity
from pytest_infmax.measure.verdicts import SLA, SLAFailed, excess_errors
from pytest_infmax.redact import add_secret, redact
from pytest_infmax.servers.config import ServerConfig, config_from_mapping
from pytest_infmax.servers.errors import ServerError

# pytest imports this module in every session, perf tests or not: what only a perf test, its
# server or the reports need (the runner, the load generator, the gate, the report writers,
# and numpy, scipy, aiohttp under them) is imported in the function that uses it. A session
# without perf tests pays for the settings alone (docs/performance.md, tests/test_startup.py).
if TYPE_CHECKING:
    from pytest_infmax.baselines.gate import GateSettings
    from pytest_infmax.reports.journal import Journal
    from pytest_infmax.run.results import LoadResult
    from pytest_infmax.run.runner import Infmax
    from pytest_infmax.run.sweep import SweepResult
    from pytest_infmax.servers.launch import Server, ServerPool

RESULTS_KEY: pytest.StashKey[list[LoadResult]] = pytest.StashKey()
SWEEPS_KEY: pytest.StashKey[list[SweepResult]] = pytest.StashKey()
GATE_KEY = pytest.StashKey[list[dict[str, Any]]]()
STATE_KEY = pytest.StashKey["PluginState"]()

# The key figures every perf test leaves in JUnit XML (and report.user_properties), from its row;
# then every registered run-level figure it measured (infmax_cost_per_mtok, infmax_power, ...).
JUNIT_PROPERTIES = (
    "isl",  # the workload: tokens in and out per request, and the API it used
    "osl",
    "endpoint",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "interactivity",
    "throughput_per_gpu",
    "error_rate",
    "requests",
    "usd_per_mtok",  # left out where there is no price
    "j_per_token",  # left out where no energy was measured or modelled
    "sla",  # the SLA's own verdict
    "verdict",  # the test's: PASS, or FAIL with every reason (SLA, regression, errors, client-bound, test)
)
_JUNIT_OPTIONAL = frozenset({"usd_per_mtok", "j_per_token", "isl", "osl"})


@dataclass
class PluginState:
    settings: settings_mod.Settings
    log_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    full_results: list[dict[str, Any]] = field(default_factory=list)
    gate: GateSettings | None = None
    sweeps: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)  # baseline comparisons, for the reports
    written: list[Path] = field(default_factory=list)  # report files, in the order written
    notes: list[str] = field(default_factory=list)  # said once in the terminal summary
    echo: Any = None  # at -v: writes server log lines to the terminal
    baseline_owners: dict[str, str] = field(default_factory=dict)  # baseline key -> the test whose it is
    # this process's results journal (reports/journal.py): the controller's PATH.journal, or an
    # xdist worker's shard of it; None without --infmax-json, or once writing it failed
    journal: Journal | None = None


def _redact_json(data: Any) -> Any:
    """A JSON-like value with every secret in its strings masked (``redact``); unchanged when
    there is nothing to mask (or it is not JSON)."""
    try:
        text = json.dumps(data)
    except (TypeError, ValueError):
        return data
    masked = redact(text)
    return data if masked == text else json.loads(masked)


def _redact_report(report: pytest.TestReport) -> None:
    """Mask secrets in a report's text: what the terminal, JUnit XML and xdist carry."""
    if report.longrepr is not None:
        text = str(report.longrepr)
        masked = redact(text)
        if masked != text:
            report.longrepr = masked
    if report.sections:
        report.sections = [(name, redact(content)) for name, content in report.sections]


def _terminal_echo() -> Any:
    """A writer to the terminal as it is now, before pytest captures output around each test.

    Server logs are copied by a background thread while tests run; writing to a
    duplicate of the terminal's file descriptor keeps those lines out of the
    test's captured output and shows them as they come.
    """
    try:
        fd = os.dup(1)
    except OSError:
        return None
    lock = threading.Lock()

    def echo(line: str) -> None:
        with lock:
            os.write(fd, (redact(line) + "\n").encode("utf-8", errors="replace"))

    return echo


def pytest_addoption(parser: pytest.Parser) -> None:
    settings_mod.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sla(*objectives, goodput=None): SLA expressions every infmax result of this test must meet, "
        "e.g. @pytest.mark.sla('p99(ttft) < 500ms', 'throughput_per_gpu > 5000 tok/s')",
    )
    config.addinivalue_line(
        "markers",
        "infmax_price(gpu_hour_usd=None, tier=None, usd_per_kwh=None): what this test's GPU time and "
        "energy cost (over --infmax-gpu-hour-usd, --infmax-price-tier, --infmax-usd-per-kwh)",
    )
    config.addinivalue_line(
        "markers",
        "infmax_repeat(N): run each infmax.run() (and sweep point) of this test N times, each on a fresh "
        "server start (over --infmax-repeat); the regression gate compares all N runs",
    )
    config.addinivalue_line(
        "markers",
        "infmax_server(**options): server for this test: sim_args=, command=, endpoint=, "
        "engine='trtllm'|'vllm'|'sglang' with tp=, pp=, dp=, ep=, max_batch_size=, max_num_tokens=, "
        "max_seq_len=, gpu_memory_fraction=, engine_options={...}, extra_args=, launcher_prefix=, "
        "engine_config='file.yaml'; model=, num_gpus=, startup_timeout=, shutdown_grace=, env= "
        "(one server per distinct configuration)",
    )
    try:
        settings = settings_mod.resolve(config)
        settings.server_config()
        add_secret(os.environ.get(settings.api_key_env))  # masked in everything the plugin says
    except settings_mod.SettingError as exc:
        raise pytest.UsageError(f"pytest-infmax: {exc}") from None
    log_dir = settings.log_dir
    if not log_dir.is_absolute():
        log_dir = config.rootpath / log_dir
    try:
        gate = settings.gate_settings(config.rootpath)
    except settings_mod.SettingError as exc:
        raise pytest.UsageError(f"pytest-infmax: {exc}") from None
    state = PluginState(settings, log_dir, gate=gate)
    if (config.getoption("verbose") or 0) >= 1 and not hasattr(config, "workerinput"):
        state.echo = _terminal_echo()
    config.stash[STATE_KEY] = state
    if not hasattr(config, "workerinput"):  # xdist workers send their reports to the controller
        json_path = resolve_path(config, settings.json)
        if json_path is not None:
            from pytest_infmax.reports.journal import Journal, journal_path

            state.journal = Journal(journal_path(json_path))
        config.pluginmanager.register(ResultCollector(config, state), "infmax-results")
    else:  # a worker journals its runs to its own shard of the controller's journal, same session
        spec = config.workerinput.get("infmax_journal")
        if isinstance(spec, dict):
            from pytest_infmax.reports.journal import Journal

            state.journal = Journal(Path(spec["path"]), session=spec["session"], writer=spec["worker"])
    _terminate_gracefully()


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is not None and state.journal is not None and hasattr(config, "workerinput"):
        state.journal.close(remove=False)  # the controller removes it once the JSON holds its runs


def resolve_path(config: pytest.Config, value: str | os.PathLike[str] | None) -> Path | None:
    """A report path setting, relative to where pytest was invoked."""
    if value is None:
        return None
    path = Path(value)
    return path if path.is_absolute() else Path(config.invocation_params.dir) / path


def _terminate_gracefully() -> None:
    """Make SIGTERM unwind like Ctrl-C so fixtures stop the servers they started."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def on_sigterm(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt("SIGTERM")

        signal.signal(signal.SIGTERM, on_sigterm)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Validate markers before any server starts or any request is sent."""
    state = config.stash[STATE_KEY]
    base = state.settings.server_config()
    registered = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    for item in items:
        for marker in item.iter_markers():  # pytest only warns of an unknown mark: ours misspelt checked nothing
            typo = settings_mod.marker_typo(marker.name, registered)
            if typo is not None:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{marker.name}: {typo}")
        for marker in item.iter_markers("sla"):
            try:
                if not len(SLA(*marker.args, **marker.kwargs)):
                    raise ValueError(
                        "has no objectives, so it would check nothing; give at least one, e.g. "
                        "@pytest.mark.sla('p99(ttft) < 500ms') (goodput= alone sets limits, it judges nothing)"
                    )
            except (SLASyntaxError, TypeError, ValueError) as exc:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.sla: {exc}") from None
        price = item.get_closest_marker("infmax_price")
        if price is not None:
            try:
                price_marker_options(price.kwargs, price.args)
            except ValueError as exc:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.infmax_price: {exc}") from None
        repeat = item.get_closest_marker("infmax_repeat")
        if repeat is not None:
            from pytest_infmax.run.repeats import RepeatError, repeat_marker_count

            try:
                repeat_marker_count(repeat.args, repeat.kwargs)
            except RepeatError as exc:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.infmax_repeat: {exc}") from None
        server = item.get_closest_marker("infmax_server")
        if server is not None:
            try:
                if server.args:
                    raise ValueError(
                        f"takes keyword arguments only (e.g. sim_args=, engine=, model=), "
                        f"got positional {server.args!r}"
                    )
                config_from_mapping(base, server.kwargs, base_dir=item.path.parent)
            except (ServerError, TypeError, ValueError) as exc:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.infmax_server: {exc}") from None


def _progress_writer(config: pytest.Config) -> Any:
    """Writes progress lines to the terminal even while pytest captures output (no -s needed)."""
    reporter = config.pluginmanager.getplugin("terminalreporter")
    capman = config.pluginmanager.getplugin("capturemanager")
    if reporter is None or hasattr(config, "workerinput"):  # xdist workers have no terminal
        return None

    def write(line: str) -> None:
        line = redact(line)
        if capman is not None:
            with capman.global_and_fixture_disabled():
                reporter.write_line(line)
        else:
            reporter.write_line(line)

    return write


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="session")
def infmax_server_pool(pytestconfig: pytest.Config) -> Iterator[ServerPool]:
    """Every server this session started, one per distinct configuration; stopped at the end."""
    from pytest_infmax.lazy import quiet_blas_threads
    from pytest_infmax.servers.launch import ServerPool, require_gpus_released

    quiet_blas_threads()  # a perf session, before it imports numpy: no BLAS spin beside the server
    state = pytestconfig.stash[STATE_KEY]
    pool = ServerPool(state.log_dir, echo=state.echo, after_stop=require_gpus_released)
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture
def infmax_server_config(request: pytest.FixtureRequest) -> ServerConfig:
    """The server configuration for this test: settings, then the closest marker."""
    base = request.config.stash[STATE_KEY].settings.server_config()
    marker = request.node.get_closest_marker("infmax_server")
    return config_from_mapping(base, marker.kwargs, base_dir=request.node.path.parent) if marker else base


@pytest.fixture
def infmax_server(infmax_server_pool: ServerPool, infmax_server_config: ServerConfig) -> Server:
    """The server under test, started once per configuration and ready to serve."""
    return infmax_server_pool.get(infmax_server_config)


@pytest.fixture
def infmax(request: pytest.FixtureRequest, infmax_server: Server, infmax_server_pool: ServerPool) -> Infmax:
    """Runs load against the server under test: ``infmax.run("1k1k-mini", concurrency=8)``."""
    from pytest_infmax.baselines.gate import sequential_for
    from pytest_infmax.run.runner import Infmax

    state = request.config.stash[STATE_KEY]
    settings = state.settings
    results = request.node.stash.setdefault(RESULTS_KEY, [])
    return Infmax(
        infmax_server,
        name=request.node.nodeid,
        percentiles=settings.percentiles,
        request_timeout=settings.request_timeout,
        on_result=results.append,
        on_sweep=request.node.stash.setdefault(SWEEPS_KEY, []).append,
        on_run=lambda result: _journal_run(request.node, state, result),
        progress=_progress_writer(request.config),
        sequential=(
            sequential_for(state.gate, settings.sequential_gate)
            if settings.sequential and state.gate is not None
            else None
        ),
        energy=settings.energy,
        repeat=_repeat(request.node, settings),
        restart=infmax_server_pool.restart,
        workers=settings.workers,
        ray=settings.ray,
        **_price_options(request.node, settings),
    )


class JournalWarning(pytest.PytestWarning):
    """The results journal could not be written: a kill of pytest would lose this session's runs."""


def _journal_run(item: pytest.Item, state: PluginState, result: LoadResult) -> None:
    """Append a run to this process's journal the moment it ends (fsynced): a kill of pytest
    then loses at most the run in flight. Never fails the test: a journal that cannot be written
    is turned off with a warning (the JSON is still written at the session's end)."""
    journal = state.journal
    if journal is None:
        return
    entry = result.to_dict(include_records=True, arrays=True)  # the stamps go to binary as they are
    entry["outcome"] = _outcome(state.settings, None, test_failed=None)  # the test has not finished yet
    try:
        journal.append("run", entry, test=item.nodeid)
    except (OSError, ValueError) as exc:
        state.journal = None
        journal.close(remove=False)
        warnings.warn(
            JournalWarning(f"could not write the results journal {journal.path} ({exc}); journaling off"),
            stacklevel=1,
        )


def _repeat(item: pytest.Item, settings: settings_mod.Settings) -> int:
    """Runs per load: @pytest.mark.infmax_repeat(N) over --infmax-repeat."""
    from pytest_infmax.run.repeats import repeat_marker_count

    marker = item.get_closest_marker("infmax_repeat")
    return repeat_marker_count(marker.args, marker.kwargs) if marker is not None else settings.repeat


def _price_options(item: pytest.Item, settings: settings_mod.Settings) -> dict[str, Any]:
    """Price and energy tariff: @pytest.mark.infmax_price over the session settings."""
    options = {
        "usd_per_kwh": settings.usd_per_kwh,
        "gpu_hour_usd": settings.gpu_hour_usd,
        "price_tier": settings.price_tier,
        "price_source": settings.sources["gpu_hour_usd"],  # a flag, env or ini: its label says which
    }
    marker = item.get_closest_marker("infmax_price")
    if marker is not None:
        options.update(price_marker_options(marker.kwargs))
        if "gpu_hour_usd" in marker.kwargs:
            options["price_source"] = "@pytest.mark.infmax_price"
    return options


@pytest.fixture
def infmax_openai(infmax_server: Server) -> Iterator[Any]:
    """The official ``openai.OpenAI`` client, pointed at the server under test."""
    import openai  # heavy (pydantic, httpx): only for tests that ask for this fixture

    client = openai.OpenAI(
        base_url=f"{infmax_server.base_url}/v1", api_key=infmax_server.api_key or "EMPTY", max_retries=0
    )
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def infmax_async_openai(infmax_server: Server) -> Any:
    """The official ``openai.AsyncOpenAI`` client, pointed at the server under test."""
    import openai  # heavy (pydantic, httpx): only for tests that ask for this fixture

    return openai.AsyncOpenAI(
        base_url=f"{infmax_server.base_url}/v1", api_key=infmax_server.api_key or "EMPTY", max_retries=0
    )


# -- verdicts and reports -------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Any:
    """After the test body: check its @pytest.mark.sla objectives on every result it made."""
    try:
        outcome = yield
    except KeyboardInterrupt:  # pytest makes no report of it: hand its results to the collector here
        _keep_interrupted(pyfuncitem)
        raise
    _check_server_died(pyfuncitem)
    _check_client(pyfuncitem)
    _check_marker_slas(pyfuncitem)
    _check_errors(pyfuncitem)
    _check_baselines(pyfuncitem)
    return outcome


class ClientBoundWarning(pytest.PytestWarning):
    """The load generator fell behind: latencies measured in that run are upper bounds."""


def _check_client(item: pytest.Item) -> None:
    """Say when a run was limited by the client, not the server (fail with --infmax-client-bound fail)."""
    bound = [r for r in item.stash.get(RESULTS_KEY, []) if r.run.client_bound]
    if not bound:
        return
    reasons = "; ".join(f"{r.name} {r.config.label}: {r.run.client.reason}" for r in bound if r.run.client)
    if item.config.stash[STATE_KEY].settings.client_bound == "fail":
        pytest.fail(f"the load generator fell behind, so the measurement is not the server's: {reasons}", pytrace=False)
    warnings.warn(ClientBoundWarning(f"latencies are upper bounds: {reasons}"), stacklevel=1)


def _check_server_died(item: pytest.Item) -> None:
    """Fail a test during whose run the server died (the run stopped then): its death is the news,
    not the failed requests or SLAs that follow from it."""
    died = [r for r in item.stash.get(RESULTS_KEY, []) if r.server_died]
    if died:
        pytest.fail(
            "the server died during the run:\n  "
            + "\n  ".join(
                f"{r.name} {r.config.label}: the run stopped after {r.metrics.num_requests} requests "
                f"({r.metrics.num_errors} failed): " + str(r.server_died).replace("\n", "\n    ")
                for r in died
            ),
            pytrace=False,
        )


def _check_errors(item: pytest.Item) -> None:
    """Fail a test whose run failed more requests than --infmax-max-error-rate allows, where the
    test set no error_rate SLA of its own: a run of failed requests measured nothing."""
    limit = item.config.stash[STATE_KEY].settings.max_error_rate
    problems = []
    for r in item.stash.get(RESULTS_KEY, []):
        what = excess_errors(r.metrics.to_dict(), [v.to_dict() for v in r.verdicts], limit)
        if what is not None:
            first = next((rec.error_message for rec in r.records if rec.error_message), None)
            problems.append(
                f"{r.name} {r.config.label}: {what}: error rate {r.metrics.error_rate:.1%} > {limit:.1%}"
                + (f"; the first error: {first}" if first else "")
            )
    if not problems:
        return
    from pytest_infmax.servers.launch import Server

    server = getattr(item, "funcargs", {}).get("infmax_server")
    died = server.death_note() if isinstance(server, Server) else None
    if died is not None:  # the failures' cause, with the server's last words
        problems.append(died.replace("\n", "\n  "))
    pytest.fail(
        "too many failed requests (--infmax-max-error-rate):\n  "
        + "\n  ".join(problems)
        + "\nthe results would measure the failures, not the server. If errors are expected, set an "
        "error_rate SLA of your own (@pytest.mark.sla('error_rate < 50%') or infmax.run(..., "
        "sla='error_rate < 50%')), or turn the check off with --infmax-max-error-rate off",
        pytrace=False,
    )


def _check_baselines(item: pytest.Item) -> None:
    """Compare this test's results with their baselines (and save them, as asked)."""
    results = item.stash.get(RESULTS_KEY, [])
    gate = item.config.stash[STATE_KEY].gate
    if not results or gate is None or not gate.active:
        return
    from pytest_infmax.baselines.gate import RegressionFailed, gate_results

    state = item.config.stash[STATE_KEY]
    outcomes = gate_results(results, gate, owners=state.baseline_owners, test=item.nodeid)
    item.stash[GATE_KEY] = [o.to_check(gate) for o in outcomes]
    failing = [o for o in outcomes if o.fails(gate)]
    if failing:
        exc = RegressionFailed(failing)
        exc.from_marker = True  # the table says it all
        raise exc


def _check_marker_slas(pyfuncitem: pytest.Item) -> None:
    markers = list(pyfuncitem.iter_markers("sla"))
    if not markers:
        return
    every = pyfuncitem.stash.get(RESULTS_KEY, [])
    results = [r for r in every if not r.capacity_probe]  # infmax.capacity() judged those by its own sla=
    if not results:
        if every:
            return
        pytest.fail("@pytest.mark.sla is set but the test ran no load: call infmax.run(...)", pytrace=False)
    failures = []
    for marker in markers:
        sla = SLA(*marker.args, **marker.kwargs)
        for result in results:
            try:
                result.check(sla=sla)  # records the verdicts the reports show
            except SLAFailed as failed:
                failures.append(failed)
    if failures:
        exc = SLAFailed(
            [v for f in failures for v in f.verdicts], context="\n".join(f.context for f in failures if f.context)
        )
        exc.from_marker = True  # reported without our traceback
        raise exc


@pytest.hookimpl(wrapper=True)
def pytest_report_to_serializable(config: pytest.Config, report: Any) -> Any:
    """pytest-xdist sends a worker's reports as plain data: the records' stamp arrays as lists."""
    data = yield
    if isinstance(data, dict) and data.get("infmax_results"):
        data["infmax_results"] = sidecar.with_lists(data["infmax_results"])
    return data


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    try:
        return _make_report(item, call, report)
    finally:
        _redact_report(report)  # every phase: a setup error carries a server's log tail


def _make_report(item: pytest.Item, call: pytest.CallInfo[None], report: Any) -> Any:
    if call.when != "call":
        return report
    if call.excinfo is not None and getattr(call.excinfo.value, "from_marker", False):
        # The verdicts are the whole story; the plugin's frames would only distract.
        from pytest_infmax.baselines.gate import RegressionFailed

        exc = call.excinfo.value
        if isinstance(exc, RegressionFailed):
            brief = "; ".join(o.message() for o in exc.outcomes)
            what = "baseline regression" if any(o.report is not None for o in exc.outcomes) else "baseline check failed"
            report.longrepr = f"{what}: {brief}\n\n{exc.tables()}"
        elif isinstance(exc, SLAFailed):  # the only other exception marked from_marker
            brief = "; ".join(f"{v.objective} ({_shown(v)})" for v in exc.failures)
            report.longrepr = f"SLA failed: {brief}\n\n{exc}"
    checks = item.stash.get(GATE_KEY, [])
    if checks:
        report.infmax_checks = checks
    sweeps = item.stash.get(SWEEPS_KEY, [])
    if sweeps:
        from pytest_infmax.reports.markdown import sweep_to_dict

        report.infmax_sweeps = [sweep_to_dict(sw, name=item.nodeid) for sw in sweeps]
    results = item.stash.get(RESULTS_KEY, [])
    if results:
        from pytest_infmax.reports.rows import result_row, verdict_text

        # an exception that names its reason (a sweep's FrontierSLAFailed: "frontier SLA")
        why = getattr(call.excinfo.value, "verdict_reason", None) if call.excinfo is not None else None
        full = _result_entries(item, results, checks, test_failed=report.failed, failure=why)
        report.infmax_results = full
        # Several results (a sweep): each named by its load, e.g. infmax[c=4]_ttft_p50_ms; by
        # its position only where two share a load.
        labels = [r.config.label for r in results]
        by_label = len(set(labels)) == len(labels)
        for i, entry in enumerate(full):
            prefix = "infmax_" if len(results) == 1 else f"infmax[{labels[i]}]_" if by_label else f"infmax_{i}_"
            row = result_row(entry)
            props = [
                (prefix + key, verdict_text(row) if key == "verdict" else row[key])
                for key in JUNIT_PROPERTIES
                if key not in _JUNIT_OPTIONAL or row[key] is not None
            ]
            props += [
                (prefix + f["metric"], f["value"])
                for f in row["figures"]
                if f["source"] != "requests" and f["value"] is not None
            ]
            report.user_properties.extend(props)
            item.user_properties.extend(props)  # junitxml reads them from the teardown report
    return report


def _result_entries(
    item: pytest.Item,
    results: list[LoadResult],
    checks: list[dict[str, Any]],
    *,
    test_failed: bool,
    failure: str | None = None,
) -> list[dict[str, Any]]:
    """The --infmax-json entries of a test's results, with what the row's verdict tells."""
    settings = item.config.stash[STATE_KEY].settings
    # Plots and the HTML report are drawn from the per-request records too.
    want_records = bool(settings.json or settings.html or settings.plots or settings.benchmark_json)
    # the stamps as numpy arrays, which the journal and the sidecar write as they are (lists only
    # where a report crosses to another process: pytest_report_to_serializable)
    full = [r.to_dict(include_records=want_records, arrays=True) for r in results]
    for i, entry in enumerate(full):  # every reason the test failed
        entry["outcome"] = _outcome(settings, checks[i] if len(checks) == len(results) else None, test_failed)
        if test_failed and failure:
            entry["outcome"]["test_failure"] = failure
    return full


def _outcome(settings: settings_mod.Settings, check: dict[str, Any] | None, test_failed: bool | None) -> dict[str, Any]:
    """A result's ``outcome`` (reports/rows.py); ``test_failed`` None: the test has not finished."""
    return {
        "baseline": check,
        "client_bound_fails": settings.client_bound == "fail",
        "test_failed": test_failed,
        "max_error_rate": settings.max_error_rate,
    }


def _keep_interrupted(item: pytest.Item) -> None:
    """Ctrl-C in a test: its results so far (the interrupted run's flagged ``interrupted``) go to
    the session's reports. Where no collector runs (an xdist worker) they are lost."""
    results = item.stash.get(RESULTS_KEY, [])
    collector = item.config.pluginmanager.getplugin("infmax-results")
    if results and isinstance(collector, ResultCollector):
        from pytest_infmax.reports.markdown import sweep_to_dict

        entries = sidecar.apart_from_stamps(
            {"results": _result_entries(item, results, [], test_failed=True)}, _redact_json
        )["results"]
        collector.add(
            entries, [sweep_to_dict(sw, name=item.nodeid) for sw in item.stash.get(SWEEPS_KEY, [])], test=item.nodeid
        )


class _RedactingWriter:
    """The terminal reporter's write_line and write_sep, through the redactor."""

    def __init__(self, reporter: Any) -> None:
        self._reporter = reporter

    def write_line(self, line: str, **markup: bool) -> None:
        self._reporter.write_line(redact(line), **markup)

    def write_sep(self, sep: str, title: str | None = None, **markup: bool) -> None:
        self._reporter.write_sep(sep, redact(title) if title else title, **markup)


def _shown(verdict: Any) -> str:
    if verdict.measured is None:
        return "not measured"
    return "measured " + format_quantity(verdict.measured, verdict.objective.unit)


class ResultCollector:
    """Gathers results from test reports and writes the session's reports.

    Registered only where reports are final (not on xdist workers), so under
    pytest-xdist the controller sees every worker's results exactly once.
    """

    def __init__(self, config: pytest.Config, state: PluginState) -> None:
        self.config = config
        self.state = state
        self.finished: set[str] = set()  # the tests whose results reached the controller

    @pytest.hookimpl(tryfirst=True)  # before pytest-xdist starts its workers
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Start the journal now, so its first line names the session even if no run ends;
        worker journals an earlier session of this path left go."""
        journal = self.state.journal
        if journal is None:
            return
        from pytest_infmax.reports.journal import remove_shards

        remove_shards(journal.path)
        try:
            journal.open()
        except OSError as exc:
            self._journal_failed(exc)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """pytest-xdist: each worker journals its runs to its own shard, of this session."""
        journal = self.state.journal
        if journal is not None:
            from pytest_infmax.reports.journal import shard_path

            worker = str(node.workerinput["workerid"])
            node.workerinput["infmax_journal"] = {
                "path": str(shard_path(journal.path, worker)),
                "session": journal.session,
                "worker": worker,
            }

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.add(
            getattr(report, "infmax_results", None) or (),
            getattr(report, "infmax_sweeps", None) or (),
            getattr(report, "infmax_checks", None) or (),
            test=report.nodeid,
        )

    def add(self, results: Any, sweeps: Any = (), checks: Any = (), *, test: str | None = None) -> None:
        """Take a test's results (from its report, or from a test Ctrl-C interrupted); journal them:
        the ``result`` lines of ``test`` complete the ``run`` lines its runs left."""
        if test is not None and results:
            self.finished.add(redact(test))  # as the journal's lines name it
        for kind, entries, kept in (
            ("result", results, self.state.full_results),
            ("sweep", sweeps, self.state.sweeps),
            ("check", checks, self.state.checks),
        ):
            for entry in entries:
                kept.append(entry)
                if kind == "result":
                    from pytest_infmax.reports.rows import result_row

                    self.state.rows.append(result_row(entry))
                self._journal(kind, entry, test)

    def _journal(self, kind: str, entry: dict[str, Any], test: str | None) -> None:
        if self.state.journal is None:
            return
        try:
            self.state.journal.append(kind, entry, test=test)
        except (OSError, ValueError) as exc:  # the session goes on: the JSON is still written at its end
            self._journal_failed(exc)

    def _journal_failed(self, exc: Exception) -> None:
        journal = self.state.journal
        if journal is not None:
            self.state.notes.append(f"could not write the results journal {journal.path} ({exc}); journaling off")
            journal.close(remove=False)
            self.state.journal = None

    def _path(self, name: str) -> Path | None:
        return resolve_path(self.config, getattr(self.state.settings, name))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Write the reports; one that cannot be written is named, the others are still written,
        and the session fails: results the user asked for are missing."""
        state = self.state
        if state.journal is not None:  # runs a crashed xdist worker journaled, whose tests never reported
            from pytest_infmax.reports.journal import unfinished_runs
            from pytest_infmax.reports.rows import result_row

            left, notes = unfinished_runs(state.journal.path, state.journal.session, self.finished)
            state.notes.extend(notes)
            if left:
                state.notes.append(
                    f"{len(left)} run(s) of tests that never finished (a worker crashed) are kept, flagged unfinished"
                )
                state.full_results.extend(left)  # not journaled again: the worker journals hold them
                state.rows.extend(result_row(entry) for entry in left)
        if not state.full_results:
            if state.journal is not None:  # no run ended (a run's test always reports it): nothing to keep
                from pytest_infmax.reports.journal import remove_shards

                state.journal.close(remove=True)
                remove_shards(state.journal.path)
            return
        from pytest_infmax.reports.document import results_document
        from pytest_infmax.reports.journal import remove_shards
        from pytest_infmax.reports.writer import ReportRequest, write_reports

        settings = state.settings
        # every result names its server (LoadResult.to_dict); a missing one is not a server
        servers = list({repr(sv): sv for r in state.full_results if (sv := r.get("server")) is not None}.values())
        doc = results_document(state.full_results, servers)
        doc["sweeps"] = state.sweeps
        doc["checks"] = state.checks
        # every report is drawn from this: redacted once here (and every text file again as it is written);
        # the stamps, numbers, are set aside: as text they cost a second a million
        doc = sidecar.apart_from_stamps(doc, _redact_json)
        json_path = self._path("json")
        plots_dir = None
        if settings.plots:
            if json_path is None:
                state.notes.append("--infmax-plots needs --infmax-json: the PNGs go next to it")
            else:
                plots_dir = json_path.parent
        outcome = write_reports(
            doc,
            ReportRequest(
                json=json_path,
                benchmark_json=self._path("benchmark_json"),
                html=self._path("html"),
                markdown=self._path("markdown"),
                plots_dir=plots_dir,
                plots_prefix=json_path.stem if json_path is not None else "infmax",
                step_summary=bool(settings.step_summary and os.environ.get("GITHUB_STEP_SUMMARY")),
            ),
        )
        state.written.extend(outcome.written)
        if state.journal is not None:
            # the JSON holds everything the journal did: keep the journal only where the JSON is missing
            saved = json_path in outcome.written
            state.journal.close(remove=saved)
            if saved:
                remove_shards(state.journal.path)
            else:
                state.notes.append(
                    f"the results journal is kept: {state.journal.path}; rebuild the reports with "
                    f"infmax report --from-journal {state.journal.path}"
                )
        state.notes.extend(outcome.notes)
        state.notes.extend(outcome.failures)
        if outcome.failures and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        state = self.state
        if not state.rows:
            return
        from pytest_infmax.reports.table import capacity_lines, format_table, turns_table

        terminalreporter = _RedactingWriter(terminalreporter)
        terminalreporter.write_sep("=", "infmax results")
        terminalreporter.write_line(format_table(state.rows))
        if any(row.get("client_bound") for row in state.rows):
            terminalreporter.write_line(
                "* client-bound: the load generator fell behind in that run; its "
                "latencies are upper bounds (see the warnings)"
            )
        for row in state.rows:  # the client's TTFT well above the server's own (servermetrics)
            if row.get("client_overhead_note"):
                terminalreporter.write_line(f"infmax: {row['test']} {row['load']}: {row['client_overhead_note']}")
        turns = turns_table(state.rows)
        if turns:  # multi-turn sessions: how each turn fared (a later turn's TTFT shows prefix reuse)
            terminalreporter.write_sep("-", "infmax turns")
            terminalreporter.write_line(turns)
        capacities = [s for s in state.sweeps if s.get("capacity")]
        if capacities:
            terminalreporter.write_sep("-", "infmax capacity")
            for line in capacity_lines(capacities):
                terminalreporter.write_line(line)
        if state.checks:
            terminalreporter.write_sep("-", "infmax baselines")
            for check in state.checks:
                mark = "ok  " if check["passed"] else "FAIL"
                terminalreporter.write_line(f"{mark} {check['message']}")
        for path in state.written:
            terminalreporter.write_line(f"infmax: wrote {path}")
        for note in state.notes:
            terminalreporter.write_line(f"infmax: {note}", red=note.startswith("could not write"))

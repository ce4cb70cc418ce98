"""Session settings: one definition per setting, read from CLI, env and ini.

Precedence, highest first: the command line (``--infmax-x``), the environment
(``INFMAX_X``), the ini file (``infmax_x``), the default. Per-test markers
(``@pytest.mark.infmax_server(...)``) override all of these for that test.
Every value is validated at start-up; a bad one names the setting, where it
came from, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytest_infmax.baselines.compare import DEFAULT_GATES, CompareOptions, Gate, parse_gates
from pytest_infmax.baselines.gate import GateSettings
from pytest_infmax.baselines.pgstore import is_store_url, register_secrets
from pytest_infmax.baselines.store import BaselineError
from pytest_infmax.baselines.stores import describe, list_sets
from pytest_infmax.baselines.treatment import parse_treatment_options
from pytest_infmax.measure.cost import TIERS, Tier
from pytest_infmax.measure.verdicts import DEFAULT_MAX_ERROR_RATE
from pytest_infmax.servers import engines
from pytest_infmax.servers.config import ServerConfig, command_from_template, config_from_mapping
from pytest_infmax.servers.errors import ServerError


class SettingError(ValueError):
    """A setting has a value that cannot work."""


def _convert(text: str, kind: Callable[[str], Any], allowed: str) -> Any:
    """``kind(text)``, or a ValueError saying what is allowed (not Python's 'invalid literal')."""
    try:
        return kind(text.strip())
    except (ValueError, OverflowError):
        raise ValueError(f"must be {allowed}") from None


def _positive_float(text: str) -> float:
    value = _convert(text, float, "a positive number")
    if not value > 0 or math.isinf(value):
        raise ValueError("must be a positive number")
    return value


def _positive_int(text: str) -> int:
    value = _convert(text, int, "a whole number >= 1")
    if value < 1:
        raise ValueError("must be a whole number >= 1")
    return value


def _vocab_size(text: str) -> int:
    value = _convert(text, int, "a whole number >= 2 (the model's vocabulary size, e.g. 128256)")
    if value < 2:
        raise ValueError("must be a whole number >= 2 (the model's vocabulary size, e.g. 128256)")
    return value


def _repeat(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            "must be a whole number >= 1: how many runs of each load, each on a fresh server start (e.g. 10)"
        )
    return value


def _percentiles(text: str) -> tuple[float, ...]:
    allowed = "a comma-separated list of numbers in (0, 100], e.g. 50,90,99"
    values = tuple(_convert(p, float, allowed) for p in text.replace(" ", "").split(",") if p)
    if not values or any(not 0 < p <= 100 for p in values):
        raise ValueError(f"must be {allowed}")
    return values


def _on_off(text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError("must be on or off")


def _warn_or_fail(text: str) -> str:
    value = text.strip().lower()
    if value not in ("warn", "fail"):
        raise ValueError("must be warn or fail")
    return value


def _tier(text: str) -> str:
    if text not in TIERS:
        raise ValueError(f"must be one of {', '.join(TIERS)}")
    return text


def _set_name(text: str) -> str:
    name = text.strip()
    if not name or "/" in name or "\\" in name or name in (".", "..") or any(not c.isprintable() for c in name):
        raise ValueError("must be a plain name such as main or default (it names a folder)")
    return name


def _set_name_or_off(text: str) -> str | None:
    return None if text.strip().lower() in ("off", "none", "no") else _set_name(text)


def _fraction(text: str) -> float:
    t = text.strip()
    allowed = "between 0 and 100%, e.g. 5%"
    value = _convert(t[:-1], float, allowed) / 100 if t.endswith("%") else _convert(t, float, allowed)
    if not 0 < value < 1:
        raise ValueError(f"must be {allowed}")
    return value


def _fraction_or_off(text: str) -> float | None:
    return None if text.strip().lower() in ("off", "none", "no") else _fraction(text)


def _text(text: str) -> str:
    return text


def _ray_address(text: str) -> str:
    address = text.strip()
    if not address or any(c.isspace() for c in address):
        raise ValueError("must be a Ray address: auto, local, HOST:6379 or ray://HOST:10001")
    return address


def _path(text: str) -> str:
    if not text.strip():
        raise ValueError("must be a file or directory path, not empty")
    return text


def _flags(text: str, what: str = "flags", example: str = "--profile b200/gpt-oss-120b") -> str:
    try:
        shlex.split(text)
    except ValueError as exc:  # e.g. "No closing quotation"
        raise ValueError(
            f"must be {what} that split as a shell would split them ({str(exc).lower()}), e.g. {example}"
        ) from None
    return text


def _command(text: str) -> str:
    if not text.strip():
        return ""  # empty: not set
    _flags(text, "a command template", "'my-server --port {port}'")
    try:
        command_from_template(text)
    except ServerError as exc:
        raise ValueError(f"must be a command template: {exc}") from None
    if not shlex.split(text):
        raise ValueError("must be a command template, e.g. 'my-server --port {port}'")
    if "{port}" not in text:  # the server must listen where the plugin looks (ServerConfig says so too)
        raise ValueError(
            "must be a command template with {port} in it (the port the plugin picks), e.g. '--port {port}'"
        )
    return text


def _url(text: str) -> str:
    allowed = "an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000"
    if not text.strip():
        return ""  # empty: not set
    try:
        parts = urlsplit(text.strip())
        parts.port  # noqa: B018  (raises ValueError for a port out of range or not a number)
    except ValueError:
        raise ValueError(f"must be {allowed}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be {allowed}")
    return text.strip()


def _engine(text: str) -> str:
    if text not in engines.ENGINES:
        raise ValueError(f"must be one of {', '.join(engines.ENGINES)}")
    return text


@dataclass(frozen=True)
class Setting:
    name: str
    help: str
    default: Any
    parse: Callable[[str], Any] = _text
    metavar: str = "VALUE"
    switch: bool = False  # a bare flag on the command line (on/off in env and ini)

    @property
    def flag(self) -> str:
        return "--infmax-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "infmax_" + self.name

    @property
    def env(self) -> str:
        return "INFMAX_" + self.name.upper()


#: the plugin's pytest markers (registered in plugin.pytest_configure)
MARKERS = ("sla", "infmax_server", "infmax_price", "infmax_repeat")


def marker_typo(name: str, registered: set[str] | frozenset[str] = frozenset()) -> str | None:
    """Why a mark named ``name`` is likely one of :data:`MARKERS` misspelt (``slaa``,
    ``infmax_sever``), or None: pytest only warns of an unknown mark, and the test then runs
    without the SLA or the server it asked for. A mark registered in the project (``markers``
    in the ini file) is the project's own, never a typo."""
    if name in MARKERS or name in registered:
        return None
    close = difflib.get_close_matches(name.lower(), MARKERS, n=1, cutoff=0.8)
    if not close:
        return None
    return (
        f"there is no such mark; did you mean @pytest.mark.{close[0]}? (pytest only warns of an unknown "
        f"mark, so this test would run without it; if it is a mark of your own, register it: "
        f"markers = {name}: ... in the ini file)"
    )


def setting(
    help: str, default: Any, parse: Callable[[str], Any] = _text, metavar: str = "VALUE", *, switch: bool = False
) -> Any:
    """A field of :class:`Settings`: its default, with the help, parser and flag style beside it."""
    return field(default=default, metadata={"setting": (help, parse, metavar, switch)})


@dataclass(frozen=True)
class Settings:
    """The session's settings, typed: one field per setting, and where each value came from.

    This class is the settings table: each field's help, parser and metavar are its
    metadata (:func:`setting`), and :data:`SETTINGS` (the flags, env variables and ini
    keys) is read from it.
    """

    endpoint: str | None = setting(
        "base URL of an OpenAI-compatible server that is already running (instead of starting one)",
        None,
        _url,
        "URL",
    )
    server_command: str | None = setting(
        "command that starts the server under test, split like a shell "
        "would but never run through one; {host}, {port} and {model} are filled in",
        None,
        _command,
        "TEMPLATE",
    )
    sim_args: str = setting("extra flags for the embedded simulator (see `infmax sim --help`)", "", _flags, "FLAGS")
    engine: str | None = setting(
        "start this inference engine: trtllm (trtllm-serve), vllm (vllm serve) or "
        "sglang (python -m sglang.launch_server); needs the model (--infmax-model or the engine "
        "config)",
        None,
        _engine,
        "NAME",
    )
    engine_config: str | None = setting(
        "YAML file with the engine's launch options (engine:, model:, tp:, "
        "max_batch_size:, engine_options:, extra_args:, launcher_prefix:, env:, ...; the keys "
        "of @pytest.mark.infmax_server)",
        None,
        _path,
        "YAML",
    )
    engine_executable: str | None = setting(
        "the engine's program: the vllm (or trtllm-serve) script, or a Python that has the engine, "
        "e.g. a venv of its own: /opt/vllm-venv/bin/python (default: the script on PATH; SGLang: this Python)",
        None,
        _path,
        "PATH",
    )
    model: str | None = setting("model name to request (default: the first one /v1/models lists)", None, metavar="NAME")
    vocab_size: int | None = setting(
        "the model's vocabulary size, so token-id prompts stay inside it (default: learnt from the model's "
        "folder, config.json and tokenizer.json, where this machine can read it; else ids 1000..29999)",
        None,
        _vocab_size,
        "N",
    )
    gpus: int | None = setting(
        "GPUs behind the server, for per-GPU metrics (default: tp x pp x dp of an engine, the GPUs a "
        "simulator --profile models, else 1)",
        None,
        _positive_int,
        "N",
    )
    api_key_env: str = setting(
        "environment variable that holds the server's API key (the key itself is never printed or saved)",
        "INFMAX_API_KEY",
        metavar="VAR",
    )
    startup_timeout: float = setting(
        "seconds to wait for a started server to become ready", 600.0, _positive_float, "SECONDS"
    )
    request_timeout: float = setting(
        "seconds one request may take before it is recorded as a timeout",
        600.0,
        _positive_float,
        "SECONDS",
    )
    percentiles: tuple[float, ...] = setting(
        "percentiles reported for latency distributions", (50.0, 90.0, 95.0, 99.0), _percentiles, "LIST"
    )
    json: str | None = setting(
        "write every result, with per-request records and the environment, to this JSON file (atomically); "
        "until then each result is journaled to PATH.journal as it arrives",
        None,
        _path,
        "PATH",
    )
    html: str | None = setting(
        "write a self-contained HTML report (tables, verdicts, plots) to this file", None, _path, "PATH"
    )
    markdown: str | None = setting("write the Markdown summary to this file", None, _path, "PATH")
    plots: bool = setting(
        "write PNG plots (frontier, latency distributions, throughput over time) next "
        "to the --infmax-json file: on or off (needs the 'plots' extra)",
        False,
        _on_off,
        "on|off",
    )
    step_summary: bool = setting(
        "append the Markdown summary to $GITHUB_STEP_SUMMARY when that is set: on or off",
        True,
        _on_off,
        "on|off",
    )
    log_dir: Path = setting("directory for server logs", Path(".infmax/logs"), _path, "DIR")
    gpu_hour_usd: float | None = setting(
        "$ per GPU-hour for cost per million tokens (default: SemiAnalysis' Aug 2025 "
        "table for the GPU NVML reports or the simulator's profile)",
        None,
        _positive_float,
        "USD",
    )
    price_tier: Tier = setting(
        "row of the default price table: hyperscaler, neocloud or rental-3y", "neocloud", _tier, "TIER"
    )
    energy: bool = setting(
        "measure GPU energy through NVML while load runs (servers started on this machine): on or off",
        True,
        _on_off,
        "on|off",
    )
    usd_per_kwh: float | None = setting("electricity price, to cost the measured energy", None, _positive_float, "USD")
    client_bound: str = setting(
        "when the load generator itself falls behind (event-loop or send lag p99 over 10 ms): warn, or fail the test",
        "warn",
        _warn_or_fail,
        "warn|fail",
    )
    max_error_rate: float | None = setting(
        "fail a test whose run failed more than this share of its requests (InferenceMAX's rule), "
        "unless the test sets an error_rate SLA of its own; e.g. 5% (the default), or off",
        DEFAULT_MAX_ERROR_RATE,
        _fraction_or_off,
        "PCT|off",
    )
    baselines: str = setting(
        "directory of baseline sets (one JSON file per test in each set), or the postgresql:// URL "
        "of a shared store (the postgres extra; docs/baselines.md)",
        ".infmax/baselines",
        _path,
        "DIR|URL",
    )
    compare: str | None = setting(
        "compare each result with its baseline in this set, where one exists "
        "(a missing baseline is recorded, never a failure); off: no comparison",
        "default",
        _set_name_or_off,
        "NAME|off",
    )
    save: str | None = setting(
        "add this run to the history of the baselines in this set (e.g. main)", None, _set_name, "NAME"
    )
    autosave: bool = setting("add this run to the set it was compared with", False, _on_off, switch=True)
    update: bool = setting(
        "rewrite the compared set's baselines of the tests that ran with this run",
        False,
        _on_off,
        switch=True,
    )
    fail_on_unsure: bool = setting(
        "fail a test whose comparison is unsure (not enough evidence either way)",
        False,
        _on_off,
        switch=True,
    )
    compare_force: bool = setting(
        "compare with baselines from another testbed (GPU, driver, engine, model, options) anyway",
        False,
        _on_off,
        switch=True,
    )
    sequential: bool = setting(
        "stop a run as soon as its comparison with the baseline is settled (an "
        "always-valid confidence sequence, looked at every 8 requests; the run's request count "
        "is the cap)",
        False,
        _on_off,
        switch=True,
    )
    sequential_gate: str = setting("the statistic a sequential comparison watches", "p50(tpot)", metavar="STAT")
    repeat: int = setting(
        "run each infmax.run() (and each sweep point) N times, restarting the server "
        "before each run but the first (fresh starts); metrics pool the runs, the regression gate "
        "compares all N with the baseline history and --infmax-save stores all N "
        "(@pytest.mark.infmax_repeat(N) per test)",
        1,
        _repeat,
        "N",
    )
    workers: int = setting(
        "processes the load generator spreads each run's streams over, each with its own "
        "event loop; 1 (the default) keeps up with tens of thousands of events/s, see "
        "docs/load-generator.md",
        1,
        _positive_int,
        "N",
    )
    ray: str | None = setting(
        "run the load workers (--infmax-workers N of them) as Ray actors on the Ray cluster at this "
        "address ('auto', HOST:6379 or ray://HOST:10001) instead of local processes: load past one "
        "host; needs pytest-infmax[ray] on every host, see docs/scale-out.md",
        None,
        _ray_address,
        "ADDRESS",
    )
    min_effect: float = setting("smallest change that counts as a regression, e.g. 5%", 0.05, _fraction, "PCT")
    gates: str | None = setting(
        "metrics the regression gate compares, e.g. 'p50(tpot), p99(ttft), throughput_per_gpu'",
        None,
        metavar="LIST",
    )
    treatment_option: tuple[str, ...] = setting(
        "server options that are the change under test, not the testbed (besides the simulator's "
        "--slowdown and noise flags): a baseline compares across them, e.g. "
        "--infmax-treatment-option=--enable-chunked-prefill,--max-num-seqs",
        (),
        parse_treatment_options,
        "FLAGS",
    )
    benchmark_json: str | None = setting(
        "also write results in pytest-benchmark's JSON layout to this file", None, _path, "PATH"
    )
    #: setting name -> where its value came from: a flag, an environment variable, an ini key or "default"
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def gate_settings(self, root: Path) -> GateSettings:
        """The regression gate's settings; relative directories are under ``root`` (pytest's rootdir)."""
        v = self
        directory = Path(v.baselines)
        compare_set = v.compare
        try:
            gates = parse_gates(v.gates) if v.gates else DEFAULT_GATES
            options = CompareOptions(gates=gates, min_effect=v.min_effect)
        except (ValueError, TypeError) as exc:
            raise SettingError(f"{self.sources['gates']} = {v.gates!r} is not valid: {exc}") from None
        if v.sequential and v.workers > 1:
            raise SettingError(
                f"{self.sources['sequential']} stops a run from its records as they arrive, which "
                f"needs one load process; {self.sources['workers']} = {v.workers} (use 1)"
            )
        if v.sequential and v.ray is not None:
            raise SettingError(
                f"{self.sources['sequential']} stops a run from its records as they arrive, which "
                f"needs one local load process; {self.sources['ray']} = {v.ray!r} (leave it out)"
            )
        if v.sequential:
            try:
                gate = Gate.parse(v.sequential_gate)
            except (ValueError, TypeError) as exc:
                raise SettingError(
                    f"{self.sources['sequential_gate']} = {v.sequential_gate!r} is not valid: {exc}"
                ) from None
            if gate.stat is None:
                raise SettingError(
                    f"--infmax-sequential-gate needs a per-request statistic such as p50(tpot), "
                    f"not {v.sequential_gate!r}"
                )
        if v.update and compare_set is None:
            raise SettingError("--infmax-update rewrites the compared set: don't combine it with --infmax-compare off")
        directory = directory if directory.is_absolute() else root / directory
        store_url = v.baselines if is_store_url(v.baselines) else None
        if store_url is not None:
            register_secrets(store_url)  # its password never reaches any output
        save_set = v.save or (compare_set if v.autosave else None)
        if (compare_set or save_set) and store_url is None:
            self._check_baselines_directory(directory)
        # The default set is compared where it exists and silently skipped where it does not
        # (a project without baselines); a set named on purpose that does not exist is a typo
        # or a missing checkout, and comparing nothing without a word would turn the gate off.
        if compare_set and self.sources["compare"] != "default" and not v.update and save_set != compare_set:
            if store_url is not None:
                self._check_store_set(store_url, compare_set)
            elif not (directory / compare_set).is_dir():
                raise SettingError(self._no_such_set(directory, compare_set))
        return GateSettings(
            directory=directory,
            compare_set=compare_set,
            save_set=save_set,
            update=v.update,
            fail_on_unsure=v.fail_on_unsure,
            force=v.compare_force,
            options=options,
            store_url=store_url,
            treatment=v.treatment_option,
        )

    def _check_store_set(self, url: str, name: str) -> None:
        """A set named on purpose exists in the PostgreSQL store (which must be reachable)."""
        try:
            sets = list_sets(url)
        except BaselineError as exc:
            raise SettingError(f"{self._named('baselines')}: {exc}") from None
        if name in sets:
            return
        where = f"{self._named('compare')} = {name!r}: there is no baseline set {name!r} in {describe(url)}"
        close = difflib.get_close_matches(name, sets, n=1)
        listing = (
            f"; the sets there: {', '.join(sets)}" + (f"; did you mean {close[0]!r}?" if close else "")
            if sets
            else f" (it holds no sets; --infmax-save {name} makes the set)"
        )
        raise SettingError(f"{where}{listing} (--infmax-compare off compares nothing, on purpose)")

    def _named(self, name: str) -> str:
        """Where a setting's value came from, for messages: the flag, variable or ini key."""
        source = self.sources[name]
        return f"{_SETTINGS_BY_NAME[name].flag} (default)" if source == "default" else source

    def _check_baselines_directory(self, directory: Path) -> None:
        """The baselines directory is a directory, or can be made one: no file in its way."""
        try:
            existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
            blocked = existing is not None and not existing.is_dir()
        except OSError:  # unreadable: saving will say what is wrong, with the path
            return
        if blocked:
            what = "is a file" if existing == directory else f"cannot be made: {existing} is a file"
            raise SettingError(
                f"{self._named('baselines')} = {directory} {what}, not a directory of baseline sets; "
                f"point {_SETTINGS_BY_NAME['baselines'].flag} at a directory (one folder per set, made on "
                f"the first --infmax-save), or move the file away"
            )

    def _no_such_set(self, directory: Path, name: str) -> str:
        try:
            sets = sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
        except OSError as exc:
            return f"{self._named('compare')} = {name!r}: the baselines directory {directory} cannot be read: {exc}"
        where = f"{self._named('compare')} = {name!r}: there is no baseline set {name!r} in {directory}"
        if not sets:
            there = "it does not exist" if not directory.exists() else "it holds no sets"
            listing = f" ({there}; --infmax-save {name} makes the set)"
        else:
            close = difflib.get_close_matches(name, sets, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listing = f"; the sets there: {', '.join(sets)}{hint}"
        return f"{where}{listing} (--infmax-compare off compares nothing, on purpose)"

    def server_config(self) -> ServerConfig:
        """The session's default server; markers may override it per test."""
        v = self
        common: dict[str, Any] = dict(
            model=v.model,
            num_gpus=v.gpus,
            api_key_env=v.api_key_env,
            startup_timeout=v.startup_timeout,
            vocab_size=v.vocab_size,
        )
        try:
            if v.engine or v.engine_config:
                return self._engine_config(common)
            if v.endpoint:
                return ServerConfig(kind="endpoint", endpoint=v.endpoint, **common)
            if v.server_command:
                return ServerConfig(kind="command", command=command_from_template(v.server_command), **common)
            return ServerConfig(kind="sim", sim_args=tuple(shlex.split(v.sim_args or "")), **common)
        except ServerError as exc:
            where = f"{self.sources['engine_config']}: " if v.engine_config and "engine config" in str(exc) else ""
            raise SettingError(f"{where}{exc}") from None

    def _engine_config(self, common: dict[str, Any]) -> ServerConfig:
        """An engine server: the engine config file, then settings given explicitly on top."""
        v, sources = self, self.sources
        mapping: dict[str, Any] = {}
        if v.engine_config:
            mapping["engine_config"] = v.engine_config
        if v.engine:
            mapping["engine"] = v.engine
        names = {
            "model": "model",
            "num_gpus": "gpus",
            "api_key_env": "api_key_env",
            "startup_timeout": "startup_timeout",
            "vocab_size": "vocab_size",
        }
        for key, setting in names.items():
            if sources[setting] != "default":  # an explicit setting beats the file
                mapping[key] = common[key]
        if v.engine_executable:
            mapping["executable"] = v.engine_executable
        base = ServerConfig(api_key_env=common["api_key_env"], startup_timeout=common["startup_timeout"])
        config = config_from_mapping(base, mapping)
        if not engines.is_engine(config.kind):
            raise ServerError(
                f"{v.engine_config} names no engine; add engine: trtllm, vllm or sglang (or pass --infmax-engine)"
            )
        return config


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f.name, f.metadata["setting"][0], f.default, *f.metadata["setting"][1:])
    for f in fields(Settings)
    if "setting" in f.metadata
)
_SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


def add_options(parser: Any) -> None:
    """Register every setting as a CLI flag and an ini key (pytest's parser)."""
    group = parser.getgroup("infmax", "LLM inference SLA testing (pytest-infmax)")
    for s in SETTINGS:
        # argparse %-formats help texts when it prints them: a literal % (e.g. "5%") must be doubled
        text = s.help.replace("%", "%%")
        if s.switch:
            group.addoption(
                s.flag,
                dest=f"infmax_{s.name}",
                default=None,
                action="store_const",
                const="on",
                help=f"{text} [env {s.env}, ini {s.ini}: on/off]",
            )
        else:
            group.addoption(
                s.flag,
                dest=f"infmax_{s.name}",
                default=None,
                metavar=s.metavar,
                help=f"{text} [env {s.env}, ini {s.ini}]",
            )
        parser.addini(s.ini, help=s.help, default=None)


def resolve(config: Any) -> Settings:
    """Read every setting with CLI > env > ini > default precedence."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        raw: str | None = config.getoption(f"infmax_{s.name}")
        source = s.flag
        if raw is None and os.environ.get(s.env) is not None:
            raw, source = os.environ[s.env], f"environment variable {s.env}"
        if raw is None:
            ini = config.getini(s.ini)
            if ini not in (None, "", []):
                raw, source = str(ini), f"ini option {s.ini}"
        if raw is None:
            values[s.name], sources[s.name] = s.default, "default"
            continue
        try:
            if "\x00" in raw:
                raise ValueError("must not contain a NUL character")
            values[s.name] = s.parse(raw)
        except ValueError as exc:
            raise SettingError(f"{source} = {raw!r} is not valid: {exc}") from None
        sources[s.name] = source
    if values["endpoint"] and values["server_command"]:
        raise SettingError(
            f"both an endpoint ({sources['endpoint']}) and a server command ({sources['server_command']}) "
            "are set; give one: the endpoint of a running server, or the command that starts one"
        )
    engine_set = [s for s in ("engine", "engine_config") if values[s]]
    other_set = [s for s in ("endpoint", "server_command") if values[s]]
    if engine_set and other_set:
        raise SettingError(
            f"both an engine ({sources[engine_set[0]]}) and {other_set[0].replace('_', ' ')} "
            f"({sources[other_set[0]]}) are set; give one way to reach the server"
        )
    if values["engine_executable"] and not engine_set:
        raise SettingError(
            f"{sources['engine_executable']} = {values['engine_executable']!r} names an engine's program, but no "
            "engine is started: it must come with --infmax-engine vllm (or trtllm, sglang) or an engine config"
        )
    if values["engine_config"]:
        path = Path(values["engine_config"])
        if not path.is_absolute():  # an ini file's paths are relative to it, others to where pytest ran
            anchor = config.rootpath if sources["engine_config"].startswith("ini") else config.invocation_params.dir
            path = Path(anchor) / path
        values["engine_config"] = str(path)
    values["log_dir"] = Path(values["log_dir"])
    return Settings(**values, sources=sources)

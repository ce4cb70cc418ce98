"""What server to test, as a user configures it: :class:`ServerConfig`, validated when built,
and :func:`config_from_mapping`, which reads the server marker's (and an engine config
file's) keys onto it. Nothing here starts a process (that is :mod:`.launch`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pytest_infmax.redact import add_secret, redact, redact_argv
from pytest_infmax.servers import engines
from pytest_infmax.servers.errors import ServerError

ServerKind = Literal["sim", "command", "endpoint", "trtllm", "vllm", "sglang"]


KINDS = ("sim", "command", "endpoint", "trtllm", "vllm", "sglang")


PLACEHOLDERS = ("host", "port", "model")


@dataclass(frozen=True)
class ServerConfig:
    """What server to test and how to start it. Hashable: equal configs share a server."""

    kind: ServerKind = "sim"
    command: tuple[str, ...] = ()  # kind="command": argv template with {host} {port} {model}
    sim_args: tuple[str, ...] = ()  # kind="sim": extra simulator flags
    endpoint: str | None = None  # kind="endpoint": base URL of a running server
    model: str | None = None  # None: ask /v1/models; engines: the model path or name to serve
    num_gpus: int | None = None  # None: tp x pp (x dp) for engines, else 1
    host: str = "127.0.0.1"
    api_key_env: str = "INFMAX_API_KEY"
    startup_timeout: float = 600.0
    shutdown_grace: float = 10.0
    env: tuple[tuple[str, str], ...] = ()
    # kind in engines.ENGINES: options (tp=2, max_batch_size=256, or any engine flag by name)
    engine_options: tuple[tuple[str, Any], ...] = ()
    extra_args: tuple[str, ...] = ()  # engines and commands: appended to the command line untouched
    launcher_prefix: tuple[str, ...] = ()  # engines and commands: e.g. ("mpirun", "-n", "1") or ("srun",)
    # Prometheus metrics page scraped around each run (servermetrics): None: the kind's own
    # (engines.METRICS_PATHS; /metrics for the simulator, commands and endpoints); "": not scraped
    metrics_path: str | None = None
    # the model's vocabulary size, for token-id prompts; None: learnt (servers.vocab)
    vocab_size: int | None = None
    # engines: the engine's script (vllm, trtllm-serve) or a Python that has the engine (its own
    # venv's); None: the script on PATH (SGLang: this interpreter)
    executable: str | None = None

    def __post_init__(self) -> None:
        self._check_types()
        if self.kind not in KINDS:
            raise ServerError(f"server kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "command" and not self.command:
            raise ServerError("a 'command' server needs a command template, e.g. 'my-server --port {port}'")
        if self.kind == "command" and not any("{port}" in arg for arg in self.command):
            # the plugin picks a free port and waits for the server there: without {port} the
            # server cannot know it, and the wait would last the whole startup timeout
            raise ServerError(
                f"the command template {shlex.join(redact_argv(self.command))!r} has no {{port}}: the server must "
                "listen on the port the plugin picks; add e.g. '--port {port}' (and '--host {host}')"
            )
        if self.kind == "endpoint" and not self.endpoint:
            raise ServerError("an 'endpoint' server needs a URL, e.g. --infmax-endpoint http://127.0.0.1:8000")
        if self.num_gpus is not None and (
            isinstance(self.num_gpus, bool) or not isinstance(self.num_gpus, int) or self.num_gpus < 1
        ):
            raise ServerError(f"num_gpus must be a whole number >= 1, got {self.num_gpus!r}")
        if not self.startup_timeout > 0:
            raise ServerError(f"startup_timeout must be > 0 seconds, got {self.startup_timeout}")
        if self.vocab_size is not None and (
            isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 2
        ):
            raise ServerError(
                f"vocab_size must be a whole number >= 2 (the model's token ids), got {self.vocab_size!r}"
            )
        if self.executable is not None and not engines.is_engine(self.kind):
            raise ServerError(
                f"executable={self.executable!r} applies to engines (engine='vllm', 'trtllm', 'sglang'); "
                "a command names its program itself"
            )
        if engines.is_engine(self.kind):
            if not self.model:
                raise ServerError(
                    f"a {self.kind} server needs the model to serve: model='/path/or/hf-id' "
                    f"(--infmax-model, or model: in the engine config)"
                )
            try:
                engines.validate_options(self.kind, dict(self.engine_options))
                if self.num_gpus is None:
                    engines.num_gpus(self.kind, dict(self.engine_options), self.extra_args)
            except engines.EngineOptionError as exc:
                raise ServerError(f"{self.kind}: {exc}") from None
        elif self.engine_options:
            keys = ", ".join(k for k, _ in self.engine_options)
            raise ServerError(
                f"engine options ({keys}) apply to engine servers only; add engine='vllm' "
                f"(or 'trtllm', 'sglang'), or put the flags in the command"
            )
        if (self.extra_args or self.launcher_prefix) and self.kind in ("sim", "endpoint"):
            raise ServerError(
                f"extra_args and launcher_prefix apply to started commands and engines, not to a "
                f"{'simulator (use sim_args)' if self.kind == 'sim' else 'running endpoint'}"
            )
        if self.kind == "endpoint":
            _check_url(self.endpoint or "")
        try:
            hash(self)
        except TypeError:
            raise ServerError(
                f"engine_options values must be numbers, strings, lists or mappings, got {dict(self.engine_options)!r}"
            ) from None

    def _check_types(self) -> None:
        """Each field has its type, so a wrong marker or YAML value fails here, not at server start."""

        def fail(name: str, allowed: str) -> ServerError:
            return ServerError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        if not isinstance(self.kind, str):
            raise fail("kind", f"one of {', '.join(KINDS)}")
        for name in ("host", "api_key_env"):
            if not isinstance(getattr(self, name), str):
                raise fail(name, "a string")
        for name in ("model", "endpoint", "executable"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise fail(name, "a string")
        for name in ("command", "sim_args", "extra_args", "launcher_prefix"):
            value = getattr(self, name)
            try:  # a list (or a string, split as a shell would) is taken as the tuple it stands for
                value = tuple(shlex.split(value)) if isinstance(value, str) else tuple(value)
            except (TypeError, ValueError):
                raise fail(name, "a string or a list of strings") from None
            if not all(isinstance(a, str) for a in value):
                raise fail(name, "a string or a list of strings")
            object.__setattr__(self, name, value)
        for name, low in (("startup_timeout", "> 0"), ("shutdown_grace", ">= 0")):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not (value > 0 if low == "> 0" else value >= 0)
            ):
                raise fail(name, f"a finite number of seconds {low}")
        if isinstance(self.env, list):
            object.__setattr__(self, "env", tuple(tuple(kv) if isinstance(kv, list) else kv for kv in self.env))
        if not isinstance(self.env, tuple) or not all(
            isinstance(kv, tuple) and len(kv) == 2 and all(isinstance(x, str) for x in kv) for kv in self.env
        ):
            raise fail("env", "a mapping of variable names to values, e.g. {'CUDA_VISIBLE_DEVICES': '0'}")
        if not isinstance(self.engine_options, tuple):
            raise fail("engine_options", "a mapping of engine flag names to values")

    @property
    def gpus(self) -> int:
        """GPUs behind the server: as given, else from the engine's launch configuration, else 1."""
        if self.num_gpus is not None:
            return self.num_gpus
        if engines.is_engine(self.kind):
            return engines.num_gpus(self.kind, dict(self.engine_options), self.extra_args)
        return 1

    @property
    def api_key(self) -> str | None:
        key = os.environ.get(self.api_key_env) or None
        add_secret(key)  # read here, masked everywhere from now on (redact)
        return key

    @property
    def prometheus_path(self) -> str | None:
        """Path of the server's Prometheus metrics page; None when it is not to be scraped."""
        if self.metrics_path is not None:
            return self.metrics_path or None
        return engines.METRICS_PATHS.get(self.kind, "/metrics")

    def describe(self) -> str:
        if self.kind == "endpoint":
            return f"endpoint {redact(self.endpoint or '')}"
        if self.kind == "sim":
            return " ".join(["simulator", *redact_argv(self.sim_args, self.api_key)])
        if engines.is_engine(self.kind):
            opts = [f"{k}={engines.thaw(v)!r}" for k, v in self.engine_options]
            argv = [*self.launcher_prefix, self.kind, str(self.model), *opts, *self.extra_args]
            return " ".join(redact_argv(argv, self.api_key))
        return " ".join(redact_argv((*self.launcher_prefix, *self.command, *self.extra_args), self.api_key))


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (a port out of range or not a number raises ValueError)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServerError(
            f"endpoint must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000, got {url!r}"
        )


def command_from_template(template: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Split a command template into argv without a shell; placeholders stay for later."""
    try:
        argv = tuple(shlex.split(template)) if isinstance(template, str) else tuple(template)
    except (TypeError, ValueError) as exc:  # not iterable; "No closing quotation"
        raise ServerError(
            f"command must be a string or a list of strings, split as a shell would ({exc}), got {template!r}"
        ) from None
    if not all(isinstance(arg, str) for arg in argv):
        raise ServerError(f"command must be a string or a list of strings, got {template!r}")
    for arg in argv:
        try:
            arg.format(host="", port="", model="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ServerError(
                f"command template argument {arg!r} has an unknown placeholder ({exc}); "
                f"allowed: {', '.join('{' + p + '}' for p in PLACEHOLDERS)} (write {{{{ }}}} for a literal brace)"
            ) from None
    return argv


# Marker / YAML keys besides the ServerConfig fields.
MAPPING_KEYS = ("engine", "engine_config")


# The keys that each say which server to test; a marker (or YAML mapping) gives at most one.
_SERVER_KEYS = {
    "command": "a command the plugin starts",
    "endpoint": "a server already running",
    "sim_args": "the embedded simulator",
    "engine": "an inference engine the plugin starts",
}


def config_from_mapping(base: ServerConfig, options: Mapping[str, Any], base_dir: Path | None = None) -> ServerConfig:
    """``base`` with the ``infmax_server`` marker's keyword arguments (or a YAML mapping) applied.

    Besides the ServerConfig fields: ``engine="vllm"`` (or "trtllm", "sglang")
    picks an engine; the common engine options (``tp=2``, ``max_batch_size=...``,
    see ``engines.COMMON_OPTIONS``) may be given directly; ``engine_options={...}``
    passes any other engine flag by name; ``engine_config="file.yaml"`` reads
    the same keys from a file (relative to ``base_dir``), the other keywords
    taking precedence over it.
    """
    options = dict(options)
    if "engine_config" in options:
        path = Path(str(options.pop("engine_config")))
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            from_file = engines.load_engine_config(path)
        except engines.EngineOptionError as exc:
            raise ServerError(str(exc)) from None
        from_file.pop("engine_config", None)
        options = {**from_file, **options}
    servers = [key for key in _SERVER_KEYS if key in options]
    if len(servers) > 1:  # each names the server to test: one of them would be silently ignored
        which = " and ".join(f"{key}= ({_SERVER_KEYS[key]})" for key in servers)
        raise ServerError(f"{which} name different servers; give one of them")
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    allowed = known | set(MAPPING_KEYS) | set(engines.COMMON_OPTIONS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ServerError(
            f"unknown infmax_server option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))} "
            f"(other engine flags go in engine_options={{...}} or extra_args=)"
        )
    changes = {k: v for k, v in options.items() if k in known}
    if "engine" in options:
        engine = str(options["engine"])
        if not engines.is_engine(engine):
            raise ServerError(f"engine must be one of {', '.join(engines.ENGINES)}, got {engine!r}")
        changes["kind"] = engine
    if "command" in changes:
        changes["command"] = command_from_template(changes["command"])
        changes.setdefault("kind", "command")
    if "endpoint" in changes:
        changes.setdefault("kind", "endpoint")
    for key in ("sim_args", "extra_args", "launcher_prefix"):
        if key in changes:
            value = changes[key]
            try:
                changes[key] = tuple(shlex.split(value) if isinstance(value, str) else value)
            except (TypeError, ValueError) as exc:
                raise ServerError(f"{key} must be a string or a list of strings ({exc}), got {value!r}") from None
    if "sim_args" in changes:
        changes.setdefault("kind", "sim")
    if "env" in changes and isinstance(changes["env"], Mapping):
        changes["env"] = tuple(sorted((str(k), str(v)) for k, v in changes["env"].items()))
    for key in ("extra_args", "launcher_prefix"):
        if key in changes:
            changes[key] = engines.split_args(changes[key])
    kind = changes.get("kind", base.kind)
    # Engine options: the base's carry over only to the same engine; a new engine starts afresh.
    merged: dict[str, Any] = dict(base.engine_options) if kind == base.kind else {}
    if kind != base.kind:  # another kind of server: nothing of the old launch carries over
        changes.setdefault("extra_args", ())
        changes.setdefault("launcher_prefix", ())
        changes["engine_options"] = ()
    given = options.get("engine_options") or {}
    if not isinstance(given, Mapping):
        raise ServerError(f"engine_options must be a mapping of flag names to values, got {given!r}")
    merged.update({str(k): v for k, v in given.items()})
    merged.update({k: v for k, v in options.items() if k in engines.COMMON_OPTIONS})
    if merged or "engine_options" in changes:
        changes["engine_options"] = tuple(sorted((k, engines.freeze(v)) for k, v in merged.items()))
    return dataclasses.replace(base, **changes)

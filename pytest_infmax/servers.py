"""Servers under test: start, wait until ready, and always tear down.

Every server the plugin starts runs in its own process group (its own
session), so teardown can signal the whole tree an engine spawns (MPI ranks,
engine-core workers, tokenizer processes): SIGTERM to the group, a grace
period, SIGKILL to the group, then a check that nothing of the group is left.

The embedded simulator goes through the same code as any command; it binds
port 0 itself and reports the port through a file, so parallel sessions
(pytest-xdist) can never race for a port.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ServerKind = Literal["sim", "command", "endpoint"]
PLACEHOLDERS = ("host", "port", "model")


class ServerError(RuntimeError):
    """The server under test could not be started, reached, or stopped."""


@dataclass(frozen=True)
class ServerConfig:
    """What server to test and how to start it. Hashable: equal configs share a server."""

    kind: ServerKind = "sim"
    command: tuple[str, ...] = ()  # kind="command": argv template with {host} {port} {model}
    sim_args: tuple[str, ...] = ()  # kind="sim": extra simulator flags
    endpoint: str | None = None  # kind="endpoint": base URL of a running server
    model: str | None = None  # None: ask /v1/models
    num_gpus: int = 1
    host: str = "127.0.0.1"
    api_key_env: str = "INFMAX_API_KEY"
    startup_timeout: float = 600.0
    shutdown_grace: float = 10.0
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("sim", "command", "endpoint"):
            raise ServerError(f"server kind must be 'sim', 'command' or 'endpoint', got {self.kind!r}")
        if self.kind == "command" and not self.command:
            raise ServerError("a 'command' server needs a command template, e.g. 'my-server --port {port}'")
        if self.kind == "endpoint" and not self.endpoint:
            raise ServerError("an 'endpoint' server needs a URL, e.g. --infmax-endpoint http://127.0.0.1:8000")
        if self.num_gpus < 1:
            raise ServerError(f"num_gpus must be >= 1, got {self.num_gpus}")
        if not self.startup_timeout > 0:
            raise ServerError(f"startup_timeout must be > 0 seconds, got {self.startup_timeout}")

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None

    def describe(self) -> str:
        if self.kind == "endpoint":
            return f"endpoint {self.endpoint}"
        if self.kind == "sim":
            return " ".join(["simulator", *redact_argv(self.sim_args, self.api_key)])
        return " ".join(redact_argv(self.command, self.api_key))


# Flags whose value is a secret in the engines' command lines.
SECRET_FLAGS = ("--api-key", "--api_key", "--token", "--hf-token", "--hf_token", "--auth-token")


def redact(text: str, *secrets: str | None) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def redact_argv(argv: tuple[str, ...] | list[str], *secrets: str | None) -> list[str]:
    """argv with known secrets and the values of secret flags replaced by ***."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in SECRET_FLAGS:
            if eq:
                out.append(f"{flag}=***")
                continue
            hide_next = True
        out.append(redact(arg, *secrets))
    return out


def command_from_template(template: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Split a command template into argv without a shell; placeholders stay for later."""
    argv = tuple(shlex.split(template)) if isinstance(template, str) else tuple(template)
    for arg in argv:
        try:
            arg.format(host="", port="", model="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ServerError(
                f"command template argument {arg!r} has an unknown placeholder ({exc}); "
                f"allowed: {', '.join('{' + p + '}' for p in PLACEHOLDERS)} (write {{{{ }}}} for a literal brace)"
            ) from None
    return argv


@dataclass
class Server:
    """A server that is up and answering. ``stop()`` is idempotent."""

    config: ServerConfig
    base_url: str
    model: str
    argv: tuple[str, ...] = ()
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    started_at: float = field(default_factory=time.time)
    startup_seconds: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def num_gpus(self) -> int:
        return self.config.num_gpus

    @property
    def api_key(self) -> str | None:
        return self.config.api_key

    def describe(self) -> dict[str, Any]:
        """Environment facts for reports; the API key never appears."""
        return {
            "kind": self.config.kind,
            "base_url": self.base_url,
            "model": self.model,
            "num_gpus": self.num_gpus,
            "command": redact_argv(self.argv, self.api_key),
            "pid": self.pid,
            "log": str(self.log_path) if self.log_path else None,
            "startup_seconds": round(self.startup_seconds, 3),
        }

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        return tail(self.log_path, lines)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process, self.config.shutdown_grace)
            _LIVE.discard(self)

    def __hash__(self) -> int:
        return id(self)


def tail(path: Path, lines: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


# Servers still running; stopped at interpreter exit whatever else happened.
_LIVE: set[Server] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for server in live:
        with contextlib.suppress(Exception):
            server.stop()


def stop_process_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the group, wait ``grace``, SIGKILL it, then verify it is gone."""
    pgid = proc.pid  # start_new_session=True: the leader's pid is the group id
    if proc.poll() is None:
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Members other than the leader may still run (or ignore SIGTERM).
    _signal_group(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            raise ServerError(f"process group {pgid} survived SIGKILL for 10 s")
        time.sleep(0.05)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now. Only for servers that cannot bind port 0 themselves."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _http_get(url: str, api_key: str | None, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def probe_ready(base_url: str, api_key: str | None, api_key_env: str = "INFMAX_API_KEY") -> str | None:
    """The served model name if the server answers /health and /v1/models, else None.

    A refused connection, a reset and HTTP 503 all mean "not yet"; 401/403 will
    never get better by waiting, so they raise at once.
    """
    try:
        status, _ = _http_get(f"{base_url}/health", api_key)
        if status != 200:
            return None
        status, body = _http_get(f"{base_url}/v1/models", api_key)
    except (OSError, urllib.error.URLError):
        return None
    if status in (401, 403):
        given = f"the key in ${api_key_env} was refused" if api_key else f"${api_key_env} is not set"
        raise ServerError(
            f"{base_url}/v1/models answered HTTP {status}: the server wants an API key and {given}; "
            f"put the key in ${api_key_env} (or name another variable with --infmax-api-key-env)"
        )
    if status != 200:
        return None
    try:
        data = json.loads(body)["data"]
        return str(data[0]["id"]) if data else ""
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def connect_endpoint(config: ServerConfig, timeout: float = 30.0) -> Server:
    """An already-running server: wait (briefly) until it answers."""
    assert config.endpoint
    base_url = config.endpoint.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[:-3]
    deadline = time.monotonic() + timeout
    while True:
        model = probe_ready(base_url, config.api_key, config.api_key_env)
        if model is not None:
            break
        if time.monotonic() > deadline:
            raise ServerError(
                f"endpoint {base_url} did not answer GET /health and /v1/models with 200 within "
                f"{timeout:g} s; is the server running, and is the URL right (scheme, host, port)?"
            )
        time.sleep(0.2)
    return Server(config, base_url, config.model or model or "default")


def start_server(config: ServerConfig, log_dir: Path) -> Server:
    """Start (or connect to) the configured server and return it once ready."""
    if config.kind == "endpoint":
        return connect_endpoint(config)
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    log_path = log_dir / f"server-{config.kind}-{stamp}.log"
    port_file: Path | None = None
    if config.kind == "sim":
        port_file = log_dir / f"sim-{stamp}.port"
        model = config.model or "sim-model"
        argv: tuple[str, ...] = (
            sys.executable, "-m", "pytest_infmax.sim",
            "--host", config.host, "--port", "0", "--port-file", str(port_file),
            "--parent-pid", str(os.getpid()), "--model", model, *config.sim_args,
        )
        port: int | None = None
    else:
        port = free_port(config.host)
        fill = {"host": config.host, "port": str(port), "model": config.model or ""}
        argv = tuple(arg.format(**fill) for arg in config.command)

    env = {**os.environ, **dict(config.env)}
    started = time.monotonic()
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )
    except OSError as exc:
        log.close()
        raise ServerError(f"cannot start {argv[0]!r}: {exc}; is it installed and on PATH?") from None
    finally:
        if not log.closed:
            log.close()
    server = Server(config, "", config.model or "", argv, log_path, proc)
    with _LIVE_LOCK:
        _LIVE.add(server)
    try:
        server.base_url, served = _wait_ready(server, port, port_file)
        server.model = config.model or served or "default"
        server.startup_seconds = time.monotonic() - started
        return server
    except BaseException:
        server.stop()
        raise


def _wait_ready(server: Server, port: int | None, port_file: Path | None) -> tuple[str, str]:
    config, proc = server.config, server.process
    assert proc is not None
    deadline = time.monotonic() + config.startup_timeout
    base_url = f"http://{config.host}:{port}" if port else ""
    while True:
        code = proc.poll()
        if code is not None:
            raise ServerError(
                f"server exited with code {code} before it was ready: {_shown(server)}\n"
                f"last lines of {server.log_path}:\n{server.log_tail()}"
            )
        if not base_url and port_file is not None and port_file.exists():
            text = port_file.read_text().strip()
            if text.isdigit():
                base_url = f"http://{config.host}:{int(text)}"
        if base_url:
            model = probe_ready(base_url, config.api_key, config.api_key_env)
            if model is not None:
                return base_url, model
        if time.monotonic() > deadline:
            raise ServerError(
                f"server not ready after {config.startup_timeout:g} s (startup timeout): {_shown(server)}; "
                f"raise --infmax-startup-timeout if it is just slow to load.\n"
                f"last lines of {server.log_path}:\n{server.log_tail()}"
            )
        time.sleep(0.1)


def _shown(server: Server) -> str:
    return shlex.join(redact_argv(server.argv, server.api_key))


class ServerPool:
    """One server per distinct configuration, shared by every test that asks for it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._servers: dict[ServerConfig, Server] = {}
        self._failed: dict[ServerConfig, str] = {}

    def get(self, config: ServerConfig) -> Server:
        if config in self._failed:  # don't pay a long startup timeout once per test
            raise ServerError(f"{config.describe()} failed to start earlier in this session:\n{self._failed[config]}")
        server = self._servers.get(config)
        if server is None:
            try:
                server = start_server(config, self.log_dir)
            except ServerError as exc:
                self._failed[config] = str(exc)
                raise
            self._servers[config] = server
        return server

    def stop_all(self) -> None:
        errors = []
        for server in self._servers.values():
            try:
                server.stop()
            except ServerError as exc:
                errors.append(str(exc))
        self._servers.clear()
        if errors:
            raise ServerError("; ".join(errors))

    def servers(self) -> list[Server]:
        return list(self._servers.values())


@contextlib.contextmanager
def running_server(config: ServerConfig, log_dir: Path) -> Iterator[Server]:
    """Start a server for the duration of a ``with`` block (outside pytest too)."""
    server = start_server(config, log_dir)
    try:
        yield server
    finally:
        server.stop()


def config_from_mapping(base: ServerConfig, options: Mapping[str, Any]) -> ServerConfig:
    """``base`` with the ``infmax_server`` marker's keyword arguments applied."""
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ServerError(
            f"unknown infmax_server option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
        )
    changes = dict(options)
    if "command" in changes:
        changes["command"] = command_from_template(changes["command"])
        changes.setdefault("kind", "command")
    if "endpoint" in changes:
        changes.setdefault("kind", "endpoint")
    if "sim_args" in changes:
        sim_args = changes["sim_args"]
        changes["sim_args"] = tuple(shlex.split(sim_args) if isinstance(sim_args, str) else sim_args)
        changes.setdefault("kind", "sim")
    if "env" in changes and isinstance(changes["env"], Mapping):
        changes["env"] = tuple(sorted(changes["env"].items()))
    return dataclasses.replace(base, **changes)

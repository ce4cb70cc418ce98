"""Servers under test: start, wait until ready, and always tear down.

Every server the plugin starts runs under a supervisor (``supervisor.py``), in
its own process group (in the plugin's session: ``spawn_in_own_group`` says why not a
session of its own), so teardown can signal the whole tree an engine spawns (MPI
ranks, engine-core workers, tokenizer processes): SIGTERM to the group, a grace
period, SIGKILL, then a check that nothing of the group is left and that nothing
listens on the server's port any more. The supervisor is a child subreaper: a
process that left the group and lost its parent (a daemon's double fork, setsid) is
reparented to it, not to init, so it is stopped with the rest; and it SIGKILLs the
whole tree when the pipe from this process closes, which the kernel does when pytest
dies, even by SIGKILL. Processes that left the group are also found by walking /proc
while the server runs (during startup, at readiness and again just before the
signals) and are signalled and checked the same way.

Real engines (trtllm-serve, vllm serve, SGLang) get their command lines from
``engines``; they cannot bind port 0, so they get ``free_port()`` and are
started again on a new port (up to 3 tries) if the port was taken meanwhile.

The embedded simulator goes through the same code as any command; it binds
port 0 itself and reports the port through a file, so parallel sessions
(pytest-xdist) can never race for a port.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import http.client
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pytest_infmax import boundedhttp
from pytest_infmax.redact import add_secret, redact, redact_argv
from pytest_infmax.servers import engines, telemetry, vocab

ServerKind = Literal["sim", "command", "endpoint", "trtllm", "vllm", "sglang"]
KINDS = ("sim", "command", "endpoint", "trtllm", "vllm", "sglang")
PORT_TRIES = 3  # starts of a server that could not bind its port (another process took it)
PLACEHOLDERS = ("host", "port", "model")


class ServerError(RuntimeError):
    """The server under test could not be started, reached, or stopped."""


class ServerDiedWarning(UserWarning):
    """A pooled server had exited since it was last handed out; it was started afresh."""


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
    # Hook for checks after teardown (e.g. telemetry: GPU memory released by these pids).
    # Called with every pid the server ever had (leader, group members, escaped children).
    after_stop: Callable[[list[int]], None] | None = None
    # pid -> start time (clock ticks) of every descendant seen while running; the start time
    # guards against signalling an unrelated process that reused a pid.
    tracked: dict[int, int] = field(default_factory=dict)
    stopped_pids: list[int] = field(default_factory=list)
    # What the simulator says its --profile deployment models (its /sim/stats), if anything:
    # how many GPUs, which GPU (for the default price table), and whether it models their power
    modelled_gpus: int | None = None
    modelled_hardware: str | None = None
    modelled_power: bool = False
    # The model's token ids, learnt once it is ready (servers.vocab); token-id prompts stay inside them
    vocabulary: vocab.Vocabulary = vocab.UNKNOWN
    # What /v1/models says of the served model (vLLM: root, the model's path, and max_model_len)
    model_card: dict[str, Any] = field(default_factory=dict)
    # How the engine was started (engines.Program.note): the script, or the module fallback and why
    launch_note: str = ""
    _tailer: LogTailer | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def num_gpus(self) -> int:
        return self.modelled_gpus if self.modelled_gpus is not None else self.config.gpus

    def track_descendants(self) -> None:
        """Record the server's descendants now (they may leave its process group later)."""
        if self.process is not None:
            self.tracked.update(descendants(self.process.pid))

    @property
    def api_key(self) -> str | None:
        return self.config.api_key

    def describe(self) -> dict[str, Any]:
        """Environment facts for reports; the API key never appears."""
        return {
            "kind": self.config.kind,
            "base_url": redact(self.base_url),
            "model": self.model,
            "num_gpus": self.num_gpus,
            "command": redact_argv(self.argv, self.api_key),
            "pid": self.pid,
            "log": str(self.log_path) if self.log_path else None,
            "startup_seconds": round(self.startup_seconds, 3),
            "vocabulary": self.vocabulary.to_dict(),
            **({"max_model_len": self.model_card["max_model_len"]} if "max_model_len" in self.model_card else {}),
            **({"launch": self.launch_note} if self.launch_note else {}),
        }

    def exit_code(self) -> int | None:
        """The exit status of a started server that has exited on its own (its supervisor's: the
        leader's, 128 + N when signal N killed it); None while it runs, for an endpoint, and once
        :meth:`stop` stopped it."""
        if self.process is None or self.stopped_pids:
            return None
        return self.process.poll()

    def death_note(self) -> str | None:
        """``the server exited with code N: ARGV``, then its log's last lines; None while it runs."""
        code = self.exit_code()
        if code is None:
            return None
        return f"the server exited with code {code}: {_shown(self)}\nlast lines of {self.log_path}:\n{self.log_tail()}"

    def log_tail(self, lines: int = 30) -> str:
        """The log's last lines, redacted: they go into error messages (terminal, JUnit)."""
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        return redact(tail(self.log_path, lines), self.api_key)

    def stop(self) -> None:
        if self.process is None or self.stopped_pids:
            return
        try:
            self.stopped_pids = stop_process_group(self.process, self.config.shutdown_grace, self.tracked)
        finally:
            if self._tailer is not None:
                self._tailer.stop()
        with _LIVE_LOCK:  # only once it is really gone; else exit-time cleanup tries again
            _LIVE.discard(self)
        port = urlsplit(self.base_url).port if self.base_url else None
        left = listeners(port) if port else []
        if left:
            who = ", ".join(f"pid {pid} ({_cmdline(pid)})" if pid else "a process of another user" for pid in left)
            raise ServerError(
                f"after the server was stopped, something still listens on its port {port}: {who}. A process "
                f"the server started escaped teardown; stop it (kill {' '.join(str(p) for p in left if p)})"
            )
        if self.after_stop is not None:
            self.after_stop(self.stopped_pids)

    @property
    def restartable(self) -> bool:
        """Whether :func:`restart_server` can give this server a fresh start (an endpoint: no)."""
        return self.config.kind != "endpoint"

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


def stop_process_group(
    proc: subprocess.Popen[bytes], grace: float, tracked: Mapping[int, int] | None = None
) -> list[int]:
    """SIGTERM the group and escaped descendants, wait ``grace``, SIGKILL them, verify they are gone.

    A process started under the supervisor (``supervised``, with its stdin a pipe) is told
    to SIGKILL its whole tree first, daemonized descendants included.

    ``tracked`` maps pids seen earlier (pid -> start time) to their start
    time; the tree is walked once more here, before any signal. Returns every
    pid that was stopped (for checks such as GPU memory release).
    """
    pgid = proc.pid  # started as the leader of its own process group (spawn_in_own_group): pid = group id
    known = dict(tracked or {})
    known.update(descendants(pgid))  # before signalling: children may reparent once the leader exits
    others = {pid: start for pid, start in known.items() if pid != pgid}

    def running() -> bool:
        return proc.poll() is None or _group_alive(pgid) or any(_alive(p, s) for p, s in others.items())

    if running():
        _signal_group(pgid, signal.SIGTERM)
        for pid, start in others.items():  # those that left the group get the same chance to clean up
            _signal_pid(pid, start, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while running() and time.monotonic() < deadline:
            time.sleep(0.05)
    # Whatever is left (ignored SIGTERM, or is still cleaning up) is killed: first by the
    # supervisor, which holds every process the server started, daemonized ones too (its
    # stdin closing is its order to SIGKILL them all and exit), then group and pids directly.
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    _signal_group(pgid, signal.SIGKILL)
    for pid, start in others.items():
        _signal_pid(pid, start, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _group_alive(pgid) or any(_alive(p, s) for p, s in others.items()):
        if time.monotonic() > deadline:
            left = sorted(p for p, s in others.items() if _alive(p, s))
            raise ServerError(f"process group {pgid} or its escaped descendants {left} survived SIGKILL for 10 s")
        time.sleep(0.05)
    return sorted({pgid, *others})


def listeners(port: int) -> list[int | None]:
    """Pids of the processes with a TCP socket listening on ``port`` (IPv4 or IPv6; None for a
    socket whose owner cannot be seen), from /proc/net; [] where nothing listens."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            # cols: sl, local address (hex ip:port), remote, state (0A: LISTEN), ..., inode (cols[9])
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return []
    owners: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{entry}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        owners.setdefault(link[8:-1], int(entry))
    return sorted({owners.get(inode) for inode in inodes}, key=lambda p: p or 0)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return shlex.join(redact_argv(f.read().decode(errors="replace").split("\0")[:-1]))[:200]
    except OSError:
        return "gone"


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


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, start time) from /proc/PID/stat, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may contain spaces and parentheses
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root`` (walking /proc ppid links), as pid -> start time."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is None or st[0] in ("Z", "X"):
            continue
        children.setdefault(st[1], []).append(int(entry))
        starts[int(entry)] = st[3]
    found: dict[int, int] = {}
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found[pid] = starts[pid]
        todo.extend(children.get(pid, ()))
    return found


def _alive(pid: int, start: int) -> bool:
    """True while ``pid`` is the same process (same start time) and not a zombie."""
    st = _stat(pid)
    return st is not None and st[3] == start and st[0] not in ("Z", "X")


def _signal_pid(pid: int, start: int, sig: signal.Signals) -> None:
    if _alive(pid, start):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class LogTailer(threading.Thread):
    """Copies new lines of a server log to ``write`` (the terminal at -v) until stopped."""

    def __init__(self, path: Path, prefix: str, write: Callable[[str], None]) -> None:
        super().__init__(name=f"infmax-log-{path.name}", daemon=True)
        self.path, self.prefix, self.write = path, prefix, write
        self._stop_event = threading.Event()

    def run(self) -> None:
        pos, partial = 0, b""
        while True:
            stopping = self._stop_event.is_set()
            with contextlib.suppress(OSError):
                with open(self.path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos += len(chunk)
                *lines, partial = (partial + chunk).split(b"\n")
                for line in lines:
                    with contextlib.suppress(Exception):
                        text = redact(line.decode("utf-8", errors="replace").rstrip())
                        self.write(f"{self.prefix}{text}")
            if stopping:
                return
            self._stop_event.wait(0.2)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout=2)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now. Only for servers that cannot bind port 0 themselves."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# One readiness probe (GET /health, then /v1/models) gets at most this long in all; the
# startup deadline bounds it too, so a server that drips its answer cannot outlast it.
PROBE_TIMEOUT = 5.0


def _http_get(url: str, api_key: str | None, timeout: float = 2.0, deadline: float | None = None) -> tuple[int, bytes]:
    """GET within ``timeout`` seconds in all (or by ``deadline``) and a bounded body
    (``boundedhttp``); the key is never sent on a redirect to another origin."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = boundedhttp.get(url, headers=headers, timeout=timeout, deadline=deadline)
    return response.status, response.body


def probe_ready(
    base_url: str, api_key: str | None, api_key_env: str = "INFMAX_API_KEY", timeout: float = PROBE_TIMEOUT
) -> str | None:
    """The served model name if the server answers /health and /v1/models, else None.

    A refused connection, a reset and HTTP 503 all mean "not yet"; 401/403 will
    never get better by waiting, so they raise at once. Both GETs together take at
    most ``timeout`` seconds, whatever the server does.
    """
    return _probe(base_url, api_key, api_key_env, timeout)[0]


#: /health answers that mean "this server has no such route", not "not ready": many hosted
#: OpenAI-compatible APIs have no /health, and /v1/models answering 200 is enough there
_NO_HEALTH_ROUTE = frozenset({404, 405, 501})


def _probe(base_url: str, api_key: str | None, api_key_env: str, timeout: float) -> tuple[str | None, str]:
    """(model or None, why not ready) of one readiness probe within ``timeout`` seconds.

    ``/health`` is asked first (engines answer 503 there while they load); a server without
    that route is judged by ``/v1/models`` alone. 401 or 403 on either raises at once.
    """
    deadline = time.monotonic() + timeout
    try:
        status, _ = _http_get(f"{base_url}/health", api_key, timeout, deadline)
        _refuse_auth(base_url, "/health", status, api_key, api_key_env)
        if status != 200 and status not in _NO_HEALTH_ROUTE:
            return None, f"GET /health answered HTTP {status}"
        status, body = _http_get(f"{base_url}/v1/models", api_key, timeout, deadline)
    except boundedhttp.HTTPLimitError as exc:
        return None, str(exc)
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    _refuse_auth(base_url, "/v1/models", status, api_key, api_key_env)
    if status != 200:
        return None, f"GET /v1/models answered HTTP {status}"
    try:
        data = json.loads(body)["data"]
        return (str(data[0]["id"]) if data else ""), ""
    except (ValueError, KeyError, IndexError, TypeError):
        return "", ""


def _refuse_auth(base_url: str, route: str, status: int, api_key: str | None, api_key_env: str) -> None:
    """401 and 403 never get better by waiting: say so at once, and what to check."""
    if status not in (401, 403):
        return
    given = f"the key in ${api_key_env} was refused" if api_key else f"${api_key_env} is not set"
    raise ServerError(
        f"authentication failed: {boundedhttp.safe_url(base_url)}{route} answered HTTP {status} ({given}); "
        f"check {api_key_env} (or the variable --infmax-api-key-env names)"
    )


#: how long a refused connection to an endpoint is retried (a restart in progress) before it fails
REFUSED_GRACE_S = 3.0


def connect_endpoint(config: ServerConfig, timeout: float = 30.0) -> Server:
    """An already-running server: wait (briefly) until it answers."""
    assert config.endpoint
    base_url = config.endpoint.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[:-3]
    start = time.monotonic()
    deadline = start + timeout
    while True:
        remaining = deadline - time.monotonic()
        model, why = _probe(base_url, config.api_key, config.api_key_env, max(min(PROBE_TIMEOUT, remaining), 0.1))
        if model is not None:
            break
        # Nothing listens there (or the name does not resolve): a restart in progress is over in
        # seconds, so this fails in seconds rather than after the whole wait.
        refused = why.startswith(("ConnectionRefusedError", "gaierror"))
        timed_out = time.monotonic() >= deadline
        if timed_out or (refused and time.monotonic() - start >= REFUSED_GRACE_S):
            within = f"within {timeout:g} s" if timed_out else f"in {REFUSED_GRACE_S:g} s of retries"
            raise ServerError(
                f"endpoint {boundedhttp.safe_url(base_url)} did not answer GET /v1/models with 200 "
                f"{within} ({why}); is the server running, and is the URL right (scheme, host, port)?"
            )
        time.sleep(0.2)
    server = Server(config, base_url, config.model or model or "default")
    learn_vocabulary(server)
    return server


def _model_card(server: Server) -> dict[str, Any]:
    """The served model's entry in /v1/models (vLLM's has ``root`` and ``max_model_len``); {} if none."""
    try:
        status, body = _http_get(f"{server.base_url}/v1/models", server.api_key, timeout=10.0)
        data = json.loads(body).get("data") if status == 200 else None
    except (OSError, http.client.HTTPException, ValueError, AttributeError):
        return {}
    cards = [c for c in data if isinstance(c, dict)] if isinstance(data, list) else []
    return next((c for c in cards if c.get("id") == server.model), cards[0] if cards else {})


def _on_this_machine(server: Server) -> bool:
    if server.config.kind != "endpoint":
        return True  # started here
    host = urlsplit(server.base_url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def learn_vocabulary(server: Server) -> vocab.Vocabulary:
    """Learn (and keep on ``server``) the model's token ids: see :mod:`pytest_infmax.servers.vocab`."""
    config = server.config
    server.model_card = _model_card(server)
    if config.kind == "sim" and config.vocab_size is None:
        server.vocabulary = vocab.SIMULATOR
        return server.vocabulary
    candidates: list[str | None] = [config.model]
    if _on_this_machine(server):  # paths the server reports are paths here
        root = server.model_card.get("root")
        candidates += [root if isinstance(root, str) else None, server.model]
    server.vocabulary = vocab.learn(
        given_size=config.vocab_size,
        given_source=f"vocab_size {config.vocab_size}, as given",
        candidates=candidates,
        env={**os.environ, **dict(config.env)},
    )
    return server.vocabulary


class PortInUse(ServerError):
    """The server exited because its port was taken between free_port() and its bind."""


# Log text of a server that lost its port (SGLang also derives further ports from --port).
ADDRESS_IN_USE = ("address already in use", "errno 98", "eaddrinuse", "is used by a process already")


def start_server(
    config: ServerConfig,
    log_dir: Path,
    *,
    echo: Callable[[str], None] | None = None,
    after_stop: Callable[[list[int]], None] | None = None,
) -> Server:
    """Start (or connect to) the configured server and return it once ready.

    ``echo`` receives each line of the server's log as it is written (the
    plugin passes the terminal at ``-v``); ``after_stop`` is called with every
    pid of the server once it has been stopped.
    """
    if config.kind == "endpoint":
        # A running server answers at once or never; a short wait covers a restart in progress.
        return connect_endpoint(config, timeout=min(30.0, config.startup_timeout))
    tries = 1 if config.kind == "sim" else PORT_TRIES  # the simulator binds port 0 itself
    failures: list[str] = []
    for attempt in range(1, tries + 1):
        try:
            return _start_once(config, log_dir, echo, after_stop)
        except PortInUse as exc:
            failures.append(str(exc))
            if attempt == tries:
                raise ServerError(
                    f"the server could not bind a port {tries} times (another process took each free "
                    f"port first):\n" + "\n".join(failures)
                ) from None
    raise AssertionError("unreachable")


def _start_once(
    config: ServerConfig,
    log_dir: Path,
    echo: Callable[[str], None] | None,
    after_stop: Callable[[list[int]], None] | None,
) -> Server:
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    log_path = log_dir / f"server-{config.kind}-{stamp}.log"
    port_file: Path | None = None
    launch_note = ""
    if config.kind == "sim":
        port_file = log_dir / f"sim-{stamp}.port"
        model = config.model or "sim-model"
        argv: tuple[str, ...] = (
            sys.executable,
            "-m",
            "pytest_infmax.sim",
            "--host",
            config.host,
            "--port",
            "0",
            "--port-file",
            str(port_file),
            # no --parent-pid: its parent is the supervisor, which ends it when pytest dies
            "--model",
            model,
            *config.sim_args,
        )
        port: int | None = None
    elif engines.is_engine(config.kind):
        port = free_port(config.host)
        assert config.model
        try:
            program = engines.engine_program(config.kind, config.executable, {**os.environ, **dict(config.env)})
            launch_note = program.note
            engine_argv = engines.build_argv(
                config.kind,
                config.model,
                dict(config.engine_options),
                config.extra_args,
                config.host,
                port,
                log_dir,
                program,
            )
        except engines.EngineOptionError as exc:
            raise ServerError(f"{config.kind}: {exc}") from None
        argv = (*config.launcher_prefix, *engine_argv)
    else:
        port = free_port(config.host)
        fill = {"host": config.host, "port": str(port), "model": config.model or ""}
        argv = (*config.launcher_prefix, *(arg.format(**fill) for arg in config.command), *config.extra_args)

    env = {**os.environ, **dict(config.env)}
    if shutil.which(argv[0], path=env.get("PATH")) is None:
        raise ServerError(f"cannot start {argv[0]!r}: no such executable; is it installed and on PATH?")
    started = time.monotonic()
    log = open(log_path, "wb")
    try:
        # The supervisor starts the server and holds every process it starts (a child
        # subreaper); its stdin is a pipe whose end only this process holds (supervisor.py).
        proc = spawn_in_own_group(supervised(argv), log, env, stdin=subprocess.PIPE)
    except OSError as exc:
        raise ServerError(f"cannot start {argv[0]!r}: {exc}; is it installed and on PATH?") from None
    finally:
        if not log.closed:
            log.close()
    server = Server(
        config, "", config.model or "", argv, log_path, proc, after_stop=after_stop, launch_note=launch_note
    )
    with _LIVE_LOCK:
        _LIVE.add(server)
    if echo is not None:
        server._tailer = LogTailer(log_path, f"[{config.kind} {proc.pid}] ", echo)
        server._tailer.start()
    try:
        server.base_url, served = _wait_ready(server, port, port_file)
        server.model = config.model or served or "default"
        if config.kind == "sim":
            server.modelled_gpus, server.modelled_hardware, server.modelled_power = _sim_model(server)
        server.startup_seconds = time.monotonic() - started
        server.track_descendants()
        learn_vocabulary(server)
        return server
    except BaseException:
        server.stop()
        raise


SUPERVISOR = Path(__file__).with_name("supervisor.py")


def supervised(argv: tuple[str, ...] | list[str]) -> list[str]:
    """``argv`` run under the supervisor (``supervisor.py``: isolated, standard library only)."""
    return [sys.executable, "-I", "-S", str(SUPERVISOR), "--", *argv]


def spawn_in_own_group(
    argv: tuple[str, ...] | list[str], log: Any, env: dict[str, str], stdin: Any = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the leader of a process group of its own, in this process's session.

    Its own group: teardown signals the whole group. This session, not a new one: on a
    kernel with ``sched_autogroup_enabled`` (the default of most distributions) every
    session is a scheduler group of its own, and CPU time is shared between the groups;
    a server in a session of its own then kept the load generator's event loop waiting to
    run for 0.5 to 3 s at a time when the server was busy on the same CPUs (vLLM on CPU
    at concurrency 16: 13.4 of 16 requests in flight instead of 15.7; docs/engines.md).
    Python 3.10 has no ``process_group``: there the server gets a session of its own.
    """
    if sys.version_info >= (3, 11):
        return subprocess.Popen(argv, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0)
    return subprocess.Popen(argv, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_ready(server: Server, port: int | None, port_file: Path | None) -> tuple[str, str]:
    config, proc = server.config, server.process
    assert proc is not None
    deadline = time.monotonic() + config.startup_timeout
    base_url = f"http://{config.host}:{port}" if port else ""
    next_track = 0.0
    why = ""
    while True:
        now = time.monotonic()
        if now >= next_track:  # engines spawn their workers while loading; remember them early
            server.track_descendants()
            next_track = now + 1.0
        code = proc.poll()
        if code is not None:
            tail_text = server.log_tail()
            if port is not None and any(s in tail_text.lower() for s in ADDRESS_IN_USE):
                raise PortInUse(
                    f"port {port}: server exited with code {code}: {_shown(server)}\n"
                    f"last lines of {server.log_path}:\n{tail_text}"
                )
            raise ServerError(
                f"server exited with code {code} before it was ready: {_shown(server)}\n"
                f"last lines of {server.log_path}:\n{tail_text}"
            )
        if not base_url and port_file is not None and port_file.exists():
            text = port_file.read_text().strip()
            if text.isdigit():
                base_url = f"http://{config.host}:{int(text)}"
        if base_url:
            budget = max(min(PROBE_TIMEOUT, deadline - time.monotonic()), 0.1)
            model, why = _probe(base_url, config.api_key, config.api_key_env, budget)
            if model is not None:
                return base_url, model
        if time.monotonic() >= deadline:
            last = f" (last probe: {why})" if base_url and why else ""
            raise ServerError(
                f"server not ready after {config.startup_timeout:g} s (startup timeout){last}: {_shown(server)}; "
                f"raise --infmax-startup-timeout if it is just slow to load.\n"
                f"last lines of {server.log_path}:\n{server.log_tail()}"
            )
        time.sleep(0.1)


def _sim_model(server: Server) -> tuple[int | None, str | None, bool]:
    """What the simulator models, from its own /sim/stats: (GPU count, GPU name, power modelled).

    Its flags are parsed once, by the simulator; everything else asks it. Per-GPU throughput
    and cost divide by the count: ``--profile ... --tp 2`` models two GPUs, and a result
    computed for one would be 2x off without a word. The count is checked against ``num_gpus=``.
    """
    try:
        status, body = _http_get(f"{server.base_url}/sim/stats", server.api_key, timeout=10.0)
        stats = json.loads(body) if status == 200 else {}
        gpus = stats.get("gpus")
        hardware = stats.get("hardware")
    except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:
        raise ServerError(f"the simulator at {server.base_url} did not say how many GPUs it models: {exc}") from None
    if gpus is None:
        return None, None, False  # no --profile: no GPU is modelled, the configured count stands
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ServerError(f"the simulator at {server.base_url} reported {gpus!r} GPUs in /sim/stats")
    given = server.config.num_gpus
    if given is not None and given != gpus:
        raise ServerError(
            f"num_gpus={given} conflicts with the simulator, which models {gpus} GPU{'s' * (gpus != 1)} "
            f"({shlex.join(server.config.sim_args)}): drop num_gpus= (the simulator's count is used), "
            "or change the simulator's --tp/--gpus"
        )
    return gpus, str(hardware) if hardware else None, bool(stats.get("power_modelled"))


def _shown(server: Server) -> str:
    return shlex.join(redact_argv(server.argv, server.api_key))


def require_gpus_released(pids: list[int], timeout: float = 60.0) -> None:
    """After a server stopped: wait until no pid of it holds a GPU; raise naming any that does.

    Without NVML (no GPU here) there is nothing to check and nothing is said.
    """
    check = telemetry.wait_released(pids, timeout=timeout)
    if check.measured and not check.released:
        raise ServerError(check.describe() + "; the GPU is still occupied by a process this session started")


class ServerPool:
    """One server per distinct configuration, shared by every test that asks for it."""

    def __init__(
        self,
        log_dir: Path,
        *,
        echo: Callable[[str], None] | None = None,
        after_stop: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.echo = echo  # each server log line, as written (the terminal at -v)
        self.after_stop = after_stop  # called with a stopped server's pids (e.g. GPU release checks)
        self._servers: dict[ServerConfig, Server] = {}
        self._failed: dict[ServerConfig, str] = {}

    def get(self, config: ServerConfig) -> Server:
        if config in self._failed:  # don't pay a long startup timeout once per test
            raise ServerError(f"{config.describe()} failed to start earlier in this session:\n{self._failed[config]}")
        server = self._servers.get(config)
        died = server.death_note() if server is not None else None
        if server is not None and died is not None:
            # A server that died in an earlier test would fail every request of this one with
            # "Connection refused", and say nothing of why: say it, and start it afresh.
            warnings.warn(ServerDiedWarning(f"{died}\nit was started afresh for this test"), stacklevel=2)
            try:
                return self.restart(server)
            except ServerError as exc:
                raise ServerError(f"{died}\nstarting it again failed: {exc}") from None
        if server is None:
            try:
                server = start_server(config, self.log_dir, echo=self.echo, after_stop=self.after_stop)
            except ServerError as exc:
                self._failed[config] = str(exc)
                raise
            self._servers[config] = server
        return server

    def restart(self, server: Server) -> Server:
        """A fresh start of ``server`` (see :func:`restart_server`), in place: every test that
        holds it sees the new process. If the restart fails, its configuration counts as failed
        for the rest of the session, as a failed first start does."""
        try:
            return restart_server(server, self.log_dir, echo=self.echo)
        except ServerError as exc:
            if self._servers.get(server.config) is server:
                del self._servers[server.config]
            self._failed[server.config] = f"restarting it failed: {exc}"
            raise

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


def restart_server(server: Server, log_dir: Path | None = None, *, echo: Callable[[str], None] | None = None) -> Server:
    """Stop ``server`` (its whole process group, as at teardown) and start its configuration
    again through the same launcher: a fresh start, for repeated runs (``--infmax-repeat``).

    The ``Server`` object is updated in place (new process, pid, log file, and base URL:
    the port may change), so whoever holds it keeps working with the new start; clients
    made earlier for the old address must be made again. A new log file is written
    (under ``log_dir``, default the old log's folder). An endpoint cannot be restarted
    (:class:`ServerError`; check :attr:`Server.restartable` first).
    """
    if not server.restartable:
        raise ServerError(f"{server.config.describe()} is a running endpoint; it cannot be restarted from here")
    if log_dir is None:
        log_dir = server.log_path.parent if server.log_path is not None else Path(".infmax/logs")
    if echo is None and server._tailer is not None:
        echo = server._tailer.write
    server.stop()
    fresh = start_server(server.config, log_dir, echo=echo, after_stop=server.after_stop)
    with _LIVE_LOCK:  # the old object stands for the new process from now on
        _LIVE.discard(fresh)
        for f in dataclasses.fields(Server):
            setattr(server, f.name, getattr(fresh, f.name))
        _LIVE.add(server)
    return server


@contextlib.contextmanager
def running_server(config: ServerConfig, log_dir: Path) -> Iterator[Server]:
    """Start a server for the duration of a ``with`` block (outside pytest too)."""
    server = start_server(config, log_dir)
    try:
        yield server
    finally:
        server.stop()


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

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
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytest_infmax import boundedhttp
from pytest_infmax.lazy import quiet_blas_threads
from pytest_infmax.redact import redact, redact_argv
from pytest_infmax.servers import engines, telemetry, vocab
from pytest_infmax.servers.config import (
    ServerConfig,
)
from pytest_infmax.servers.errors import ServerError
from pytest_infmax.servers.processes import (
    descendants,
    describe_pids,
    free_port,
    leader_exit_code,
    listeners,
    listens_on,
    process_states,
    spawn_in_own_group,
    stop_process_group,
    supervised,
)
from pytest_infmax.servers.readiness import (
    PROBE_TIMEOUT,
    REFUSED_GRACE_S,
    _http_get,
    _probe,
)

# how much of a server's log is searched for the files it set up at start-up (_remove_leftovers)
_LOG_HEAD_BYTES = 8 << 20
PORT_TRIES = 3  # starts of a server that could not bind its port (another process took it)


class ServerDiedWarning(UserWarning):
    """A pooled server had exited since it was last handed out; it was started afresh."""


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
    # where the supervisor writes the leader's exit status (supervisor.py), the moment it exits
    exit_file: Path | None = None
    # a folder of the server's own for its runtime files (engines.private_ipc_dir), removed at stop
    scratch_dir: Path | None = None
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
        code = self._exit_status()
        if code is None and leader_exit_code(self.exit_file) == 0 and self.base_url and not self._listens():
            # the leader exited 0 and nothing listens on its port any more: not a daemon that
            # serves on (vLLM's API server exits 0 once its EngineCore died, and leaves helpers)
            return 0
        return code

    def _listens(self) -> bool:
        port = urlsplit(self.base_url).port
        return port is not None and listens_on(port)

    def _exit_status(self) -> int | None:
        """The supervisor's exit status once it is gone; before that, the leader's when it failed.

        The supervisor lives while anything the server started lives (an EngineCore, a worker
        that left its group), so a crashed server is seen by its leader's status. A leader that
        exits 0 may have daemonized: its server lives on in its descendants, and is judged by
        its answers."""
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            return code if code >= 0 else 128 - code  # the supervisor itself killed by signal N: 128 + N
        leader = leader_exit_code(self.exit_file)
        return leader if leader else None

    def death_note(self) -> str | None:
        """``the server exited with code N: ARGV``, the errors its log names, then its last lines;
        None while it runs."""
        code = self.exit_code()
        if code is None:
            return None
        errors = self.log_errors()
        named = f"the errors in its log:\n{errors}\n" if errors else ""
        return (
            f"the server exited with code {code}: {_shown(self)}\n"
            f"{named}last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def log_errors(self, limit: int = 5) -> str:
        """The last ``limit`` distinct error lines of the log (``SomeError: ...``, ``... died``), redacted:
        an engine's cause of death is often pages above its last lines (vLLM's EngineDeadError comes
        before its shutdown noise)."""
        if not self.log_path or not self.log_path.exists():
            return ""
        return redact("\n".join(error_lines(tail(self.log_path, 5000, 1 << 20), limit)), self.api_key)

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
        self._remove_leftovers()
        port = urlsplit(self.base_url).port if self.base_url else None
        left = listeners(port) if port else []
        if left:
            raise ServerError(
                f"after the server was stopped, something still listens on its port {port}: "
                f"{describe_pids(left)}. A process "
                f"the server started escaped teardown; stop it (kill {' '.join(str(p) for p in left if p)})"
            )
        if self.after_stop is not None:
            self.after_stop(self.stopped_pids)

    def _remove_leftovers(self) -> None:
        """What the stopped server's processes left outside its log: its scratch folder, and the
        files its log names as its own (vLLM's file store: engines.file_store_leftovers)."""
        if self.scratch_dir is not None:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)
        if self.log_path is None or not engines.is_engine(self.config.kind):
            return
        try:
            with open(self.log_path, "rb") as log:  # set up at start-up: the log's head names it
                head = log.read(_LOG_HEAD_BYTES).decode(errors="replace")
        except OSError:
            return
        for path in engines.file_store_leftovers(self.config.kind, head, dict(self.config.env)):
            with contextlib.suppress(OSError):
                path.unlink()

    @property
    def restartable(self) -> bool:
        """Whether :func:`restart_server` can give this server a fresh start (an endpoint: no)."""
        return self.config.kind != "endpoint"

    def __hash__(self) -> int:
        return id(self)


def tail(path: Path, lines: int, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a server log (of its last ``max_bytes``); an empty one says why it
    may be empty."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - max_bytes))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) or empty_log_note(path)


# ``SomeError: message`` / ``pkg.SomeException: message``, or a process that died or was killed
_ERROR_LINE = re.compile(
    r"\b(?:[A-Za-z_][\w.]*(?:Error|Exception)\b: .*|.*\b(?:died|fatal|Killed|out of memory)\b.*)",
    re.IGNORECASE,
)
_NOT_AN_ERROR = re.compile(r"\b(?:WARNING|INFO|DEBUG)\b")  # a warning that quotes an error (vLLM's ulimit note)


def error_lines(text: str, limit: int) -> list[str]:
    """The last ``limit`` distinct error lines of ``text``, in their order, without tracebacks' frames."""
    found: dict[str, None] = {}
    for line in text.splitlines():
        if _NOT_AN_ERROR.search(line):
            continue
        match = _ERROR_LINE.search(line)
        if match:
            found.pop(match.group(0).strip(), None)
            found[match.group(0).strip()] = None
    return list(found)[-limit:]


def empty_log_note(path: Path, free_bytes: int | None = None) -> str:
    """``(empty log)``, or, where the disk holding it has no room left, that the server could
    not write its log there (issue 17: a full disk read as a server that said nothing)."""
    if free_bytes is None:
        try:
            stat = os.statvfs(path)
            free_bytes = stat.f_bavail * stat.f_frsize
        except OSError:
            return "(empty log)"
    if free_bytes < 1024 * 1024:
        return f"(empty log: the disk holding {path} has {free_bytes} bytes free, so the server could not write it)"
    return "(empty log)"


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
    exit_file = log_dir / f"server-{config.kind}-{stamp}.exit"
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
    if config.kind == "sim":
        quiet_blas_threads(env)  # the simulator uses no BLAS; it shares the host with the client
    if shutil.which(argv[0], path=env.get("PATH")) is None:
        raise ServerError(f"cannot start {argv[0]!r}: no such executable; is it installed and on PATH?")
    scratch_dir = engines.private_ipc_dir(config.kind, env, config.launcher_prefix)
    started = time.monotonic()
    log = open(log_path, "wb")
    try:
        # The supervisor starts the server and holds every process it starts (a child
        # subreaper); its stdin is a pipe whose end only this process holds (supervisor.py).
        proc = spawn_in_own_group(supervised(argv, exit_file, scratch_dir), log, env, stdin=subprocess.PIPE)
    except OSError as exc:
        if scratch_dir is not None:
            shutil.rmtree(scratch_dir, ignore_errors=True)
        raise ServerError(f"cannot start {argv[0]!r}: {exc}; is it installed and on PATH?") from None
    finally:
        if not log.closed:
            log.close()
    server = Server(
        config,
        "",
        config.model or "",
        argv,
        log_path,
        proc,
        after_stop=after_stop,
        launch_note=launch_note,
        exit_file=exit_file,
        scratch_dir=scratch_dir,
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
        code = server._exit_status()
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
                f"{_squatters(server, port) or 'raise --infmax-startup-timeout if it is just slow to load.'}\n"
                f"its processes: {_process_states(server)}\n"
                f"last lines of {server.log_path}:\n{server.log_tail()}"
            )
        time.sleep(0.1)


def _process_states(server: Server) -> str:
    server.track_descendants()
    return process_states([p for p in (server.pid, *server.tracked) if p is not None])


def _squatters(server: Server, port: int | None) -> str:
    """Who else listens on the server's port, if anyone: then probes reached them, not the server."""
    if port is None:
        return ""
    server.track_descendants()
    others = [pid for pid in listeners(port) if pid not in server.tracked]
    if not others:
        return ""
    return (
        f"its port {port} is held by a process that is not the server's: {describe_pids(others)}; the probes "
        "reached it, not the server. Stop that process, or leave the port to the launcher (it picks a free one)."
    )


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

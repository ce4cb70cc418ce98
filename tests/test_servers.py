"""The launcher: readiness, failures, teardown of whole process groups, redaction."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from _sim_helpers import pid_alive

from pytest_infmax.redact import redact_argv
from pytest_infmax.servers.config import command_from_template
from pytest_infmax.servers.launch import ServerConfig, ServerError, running_server, start_server
from pytest_infmax.servers.processes import listeners, stop_process_group


def test_group_kill_reaches_children_that_ignore_sigterm(tmp_path) -> None:
    # A leader that ignores SIGTERM and a child that does too: only SIGKILL to the group ends both.
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)'],"
        " stdout=subprocess.PIPE)\n"
        "child.stdout.readline()\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    child_pid = int(proc.stdout.readline())
    started = time.monotonic()
    stop_process_group(proc, grace=0.5)
    assert time.monotonic() - started < 10
    assert not pid_alive(proc.pid) and not pid_alive(child_pid)


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10's Popen has no process_group=: a session of its own"
)
def test_the_server_leads_its_own_group_in_the_clients_session(tmp_path) -> None:
    # Issue #16: in a session of its own the server is a scheduler autogroup of its own
    # (sched_autogroup_enabled), and a busy server kept the client's event loop off the CPU
    # for 0.5-3 s at a time. Its own process group is what teardown needs.
    with running_server(ServerConfig(), tmp_path / "logs") as server:
        assert server.pid is not None
        assert os.getpgid(server.pid) == server.pid != os.getpgid(0)
        assert os.getsid(server.pid) == os.getsid(0)


def test_readiness_waits_through_startup_delay(tmp_path) -> None:
    config = ServerConfig(sim_args=("--startup-delay", "1"), startup_timeout=30)
    with running_server(config, tmp_path) as server:
        assert server.startup_seconds >= 1.0
        assert server.model == "sim-model"


def test_startup_timeout_names_the_fix_and_kills_the_server(tmp_path) -> None:
    config = ServerConfig(sim_args=("--startup-delay", "60"), startup_timeout=1)
    with pytest.raises(ServerError, match="not ready after 1 s .startup timeout.*--infmax-startup-timeout"):
        start_server(config, tmp_path)
    (log,) = tmp_path.glob("server-sim-*.log")
    assert not any("pytest_infmax.sim" in _cmdline(p) and str(tmp_path) in _cmdline(p) for p in _pids())


def test_missing_api_key_fails_at_once_with_the_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("INFMAX_SIM_API_KEY", "sk-abc-very-secret")
    monkeypatch.delenv("INFMAX_API_KEY", raising=False)
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"HTTP 401.*\$INFMAX_API_KEY is not set") as info:
        start_server(ServerConfig(startup_timeout=60), tmp_path)
    assert time.monotonic() - started < 20  # not the 60 s startup timeout
    assert "sk-abc-very-secret" not in str(info.value)


def test_unknown_executable_is_a_clear_error(tmp_path) -> None:
    config = ServerConfig(kind="command", command=("no-such-engine-xyz", "--port", "{port}"))
    with pytest.raises(ServerError, match="cannot start 'no-such-engine-xyz'.*on PATH"):
        start_server(config, tmp_path)


def test_command_templates_never_use_a_shell(tmp_path) -> None:
    marker = tmp_path / "pwned"
    argv = command_from_template(f"{sys.executable} -c 'import sys; print(sys.argv)' ; touch {marker} {{port}}")
    filled = [a.format(host="h", port="1", model="m") for a in argv]
    out = subprocess.run(filled, capture_output=True, text=True, timeout=30)
    assert "';'" in out.stdout and not marker.exists()


def test_unknown_placeholder_is_rejected() -> None:
    with pytest.raises(ServerError, match=r"unknown placeholder.*\{host\}, \{port\}, \{model\}"):
        command_from_template("serve --port {prot}")


def test_secret_flags_are_redacted() -> None:
    argv = ("vllm", "serve", "m", "--api-key", "sk-1", "--hf-token=hf_2", "--other", "sk-3")
    assert redact_argv(argv, "sk-3") == ["vllm", "serve", "m", "--api-key", "***", "--hf-token=***", "--other", "***"]


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# -- a server that daemonizes cannot escape teardown (issue 17) -------------------------------

DAEMON = Path(__file__).with_name("_daemonizing_server.py")


def _read_pid(path: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written within {timeout} s"
        time.sleep(0.02)  # polling a file another process writes, bounded by the deadline
    return int(path.read_text())


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _daemon_command(pidfile: Path, leader_exits: str) -> tuple[str, ...]:
    return (sys.executable, str(DAEMON), "--port", "{port}", "--pidfile", str(pidfile), "--leader-exits", leader_exits)


@pytest.mark.parametrize("leader_exits", ["before", "after", "never"])
def test_a_daemonized_grandchild_is_stopped_with_the_server(tmp_path: Path, leader_exits: str) -> None:
    """The server forks, the child calls setsid() and forks again, the grandchild serves and the
    leader exits (before readiness, after it, or never). Before: the grandchild was out of the
    process group and, once orphaned, out of the tree the launcher walked, so it outlived the
    session on its port (and a leader exiting first was 'exited with code 0 before it was ready').
    Now the supervisor adopts it (child subreaper) and stops it with the rest; nothing listens."""
    pidfile = tmp_path / "grandchild.pid"
    config = ServerConfig(kind="command", command=_daemon_command(pidfile, leader_exits), startup_timeout=30)
    server = start_server(config, tmp_path / "logs")
    grandchild = _read_pid(pidfile)
    try:
        assert server.model == "daemon-model" and pid_alive(grandchild)
        port = int(server.base_url.rsplit(":", 1)[1])
        assert listeners(port) == [grandchild]
        server.stop()
        assert not pid_alive(grandchild), "the daemonized grandchild outlived teardown"
        assert listeners(port) == []
    finally:
        _kill(grandchild)


def test_something_still_listening_after_teardown_is_named(tmp_path: Path) -> None:
    """Whatever escapes (here: a socket this test opens on the server's port with SO_REUSEPORT,
    out of the server's reach), teardown says so, naming the port and the pid."""
    config = ServerConfig(kind="command", command=_daemon_command(tmp_path / "g.pid", "never"), startup_timeout=30)
    server = start_server(config, tmp_path / "logs")
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        with pytest.raises(ServerError, match=rf"still listens on its port {port}: pid {os.getpid()} \("):
            server.stop()


def test_sigkill_of_pytest_takes_the_server_and_its_daemons_with_it(pytester: pytest.Pytester) -> None:
    """pytest itself SIGKILLed (an OOM kill, a CI runner's hard stop): no teardown runs. Before: a
    --infmax-server-command server was orphaned and kept listening. Now its supervisor sees its
    pipe from pytest close and SIGKILLs the whole tree, daemonized grandchild included."""
    pidfile = pytester.path / "grandchild.pid"
    command = " ".join(_daemon_command(pidfile, "after"))
    pytester.makepyfile(
        test_perf="""
        import pathlib, time

        def test_x(infmax_server):
            pathlib.Path("supervisor.pid").write_text(str(infmax_server.pid))
            time.sleep(120)  # the session is SIGKILLed here
        """
    )
    inner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--infmax-server-command={command}"],
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    grandchild = supervisor = 0
    try:
        supervisor = _read_pid(pytester.path / "supervisor.pid", timeout=60)
        grandchild = _read_pid(pidfile)
        port = listeners_port(grandchild)
        inner.kill()
        inner.wait(timeout=10)
        assert _wait_gone(grandchild), "the daemonized server outlived a SIGKILLed pytest"
        assert _wait_gone(supervisor)
        assert listeners(port) == []
    finally:
        inner.kill()
        inner.wait(timeout=10)
        for pid in (grandchild, supervisor):
            if pid:
                _kill(pid)


def listeners_port(pid: int) -> int:
    """The port ``pid`` listens on (the daemon serves one)."""
    ports = [c.laddr.port for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert len(ports) == 1, ports
    return ports[0]


def test_an_empty_log_on_a_full_disk_says_the_disk_is_full(tmp_path) -> None:
    """Issue 17: with the log directory on a full disk, a start-up error showed "(empty log)", as if
    the server had said nothing. The note now says the disk was full (the free space is read with
    statvfs; here it is given, as filling a disk is not something a test may do)."""
    from pytest_infmax.servers.launch import empty_log_note, tail

    log = tmp_path / "server.log"
    log.write_bytes(b"")
    assert tail(log, 20) == "(empty log)"  # this disk has room: the server wrote nothing
    full = empty_log_note(log, free_bytes=0)
    assert full.startswith("(empty log: the disk holding ") and "0 bytes free" in full and str(log) in full
    log.write_text("one line\n")
    assert tail(log, 20) == "one line"

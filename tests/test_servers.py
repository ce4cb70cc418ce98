"""The launcher: readiness, failures, teardown of whole process groups, redaction."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from _sim_helpers import pid_alive

from pytest_infmax.servers.launch import (
    ServerConfig,
    ServerError,
    command_from_template,
    redact_argv,
    running_server,
    start_server,
    stop_process_group,
)


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

"""The processes of a server: started under the supervisor in a process group of their own,
followed while they run, and ended, the whole tree, with nothing left listening.

Every server the plugin starts runs under ``supervisor.py`` (a child subreaper that
takes every process of the server with it), as the leader of its own process group
in the plugin's session (:func:`spawn_in_own_group` says why not a session of its
own). :func:`stop_process_group` ends the group and every descendant recorded while
it ran: SIGTERM, a grace period, SIGKILL, and a check that none survived.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from pytest_infmax.redact import redact_argv
from pytest_infmax.servers.errors import ServerError


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


def listens_on(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` (IPv4 or IPv6): /proc/net alone, no scan of
    every process's descriptors (cheap enough for a check during a run)."""
    return bool(_listening_inodes(port))


def listeners(port: int) -> list[int | None]:
    """Pids of the processes with a TCP socket listening on ``port`` (IPv4 or IPv6; None for a
    socket whose owner cannot be seen), from /proc/net; [] where nothing listens."""
    inodes = _listening_inodes(port)
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


def describe_pids(pids: list[int | None]) -> str:
    """``pid N (its command line)`` for each, or ``a process of another user`` where none is seen."""
    return ", ".join(f"pid {pid} ({_cmdline(pid)})" if pid else "a process of another user" for pid in pids)


def process_states(pids: list[int]) -> str:
    """Each live process's name, state and where in the kernel it waits (/proc): what a server
    that neither answers nor exits is doing (``S do_epoll_wait``: idle in its loop)."""
    states = []
    for pid in dict.fromkeys(pids):
        stat = _stat(pid)
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            wchan = Path(f"/proc/{pid}/wchan").read_text().strip() or "-"
        except OSError:
            continue
        if stat is not None:
            states.append(f"pid {pid} ({name}) {stat[0]} {wchan}")
    return "; ".join(states) or "none left"


def _listening_inodes(port: int) -> set[str]:
    """The inodes of the TCP sockets in LISTEN on ``port``, from /proc/net/tcp and tcp6."""
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
    return inodes


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


def descendants(root: int, excluding: Collection[int] = ()) -> dict[int, int]:
    """Every live descendant of ``root`` (walking /proc ppid links), as pid -> start time;
    ``excluding``: processes left out with all their descendants."""
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
        if pid in found or pid in excluding:
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


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now. Only for servers that cannot bind port 0 themselves."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


SUPERVISOR = Path(__file__).with_name("supervisor.py")


def supervised(
    argv: tuple[str, ...] | list[str], exit_file: Path | None = None, scratch: Path | None = None
) -> list[str]:
    """``argv`` run under the supervisor (``supervisor.py``: isolated, standard library only),
    which writes the leader's exit status to ``exit_file`` when the leader exits, and removes
    the folder ``scratch`` once every process of the server has ended."""
    told = ["--exit-file", str(exit_file)] if exit_file is not None else []
    if scratch is not None:
        told += ["--scratch", str(scratch)]
    return [sys.executable, "-I", "-S", str(SUPERVISOR), *told, "--", *argv]


def leader_exit_code(exit_file: Path | None) -> int | None:
    """The leader's exit status as its supervisor wrote it to ``exit_file``; None while it runs."""
    if exit_file is None:
        return None
    try:
        text = exit_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


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

"""The server's supervisor: the one process the launcher starts; it starts the server.

``python -I -S supervisor.py [--exit-file F] [--scratch D] -- ARGV...`` (run by path, standard library only, so it
starts in a few milliseconds and imports nothing of the package) becomes a *child
subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux): every process the server
starts that loses its parent is reparented to the supervisor instead of to init.
A server that daemonizes (forks, the child calls ``setsid()`` and forks again, the
leader exits) therefore stays in the supervisor's tree, whatever it does with
sessions and process groups, and whenever the leader exits. The supervisor:

* runs ``ARGV`` (stdin ``/dev/null``, stdout and stderr its own: the server log)
  with ``PR_SET_PDEATHSIG`` = SIGKILL, so the leader dies with the supervisor;
* lives while any descendant lives (reaping every one of them), then exits with
  the leader's exit status (127 if ``ARGV`` cannot be started, with the reason
  in the log);
* when the leader exits, writes its exit status to ``F`` at once (atomically),
  and says in the log which processes it left: the supervisor itself lives on
  while they do, so without ``F`` a server that crashed while a worker it had
  started lived on (an EngineCore, a process that left its group) would look
  alive, and the launcher would wait out its whole startup timeout;
* on SIGTERM, sends SIGTERM to every descendant (the launcher's grace period);
* when its stdin reaches end of file, SIGKILLs every descendant until none is
  left, then exits. The launcher holds the other end of that pipe: it closes it
  after the grace period, and the kernel closes it when pytest dies, even by
  SIGKILL, so nothing the server started outlives the session;
* with ``--scratch D``, removes the folder ``D`` (the server's runtime files, e.g. vLLM's
  IPC sockets) once none of them is left, however the session ended.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] in (b"Z", b"X"):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _signal_all(sig: signal.Signals) -> None:
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_all_on_eof() -> None:
    """stdin closed (the launcher's teardown after its grace, or pytest died): SIGKILL the tree."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    while True:  # until none is left (the main thread reaps them, then exits)
        _signal_all(signal.SIGKILL)
        if not descendants(os.getpid()):
            return
        time.sleep(0.02)


def _leader_preexec() -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _shell_code(code: int) -> int:
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says


def _leader_exited(pid: int, code: int, exit_file: str | None) -> None:
    """Tell the log, then the launcher (``exit_file``), that the leader is gone, and what it left.

    The log first: the launcher reads the log's tail into its death note the moment the exit
    file appears, so a line written after it could be missing from the note."""
    left = descendants(os.getpid())
    if left:
        print(
            f"[infmax supervisor] the server (pid {pid}) exited with code {code}; "
            f"{len(left)} process(es) it started still run (pids {' '.join(map(str, sorted(left)))}), "
            "held until teardown",
            flush=True,
        )
    if exit_file:
        temp = f"{exit_file}.{os.getpid()}.tmp"
        with open(temp, "w") as f:
            f.write(f"{code}\n")
        os.replace(temp, exit_file)


def main(argv: list[str]) -> int:
    exit_file: str | None = None
    scratch: str | None = None
    while argv[:1] in (["--exit-file"], ["--scratch"]) and len(argv) > 1:
        if argv[0] == "--exit-file":
            exit_file = argv[1]
        else:
            scratch = argv[1]
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("supervisor: no command given", file=sys.stderr, flush=True)
        return 2
    try:
        return _supervise(argv, exit_file)
    finally:
        if scratch:  # nothing the server started runs any more (or it could not start)
            shutil.rmtree(scratch, ignore_errors=True)


def _supervise(argv: list[str], exit_file: str | None) -> int:
    if not _prctl(PR_SET_CHILD_SUBREAPER, 1):
        print("supervisor: cannot become a child subreaper (not Linux?); daemonized children may escape", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: _signal_all(signal.SIGTERM))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides; Ctrl-C reaches pytest
    try:
        leader = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_leader_preexec)
    except OSError as exc:
        print(f"cannot start {argv[0]!r}: {exc}; is it installed and on PATH?", flush=True)
        return 127
    threading.Thread(target=_kill_all_on_eof, daemon=True).start()
    code: int | None = None
    while True:  # reap every child, adopted orphans included, until none is left
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == leader.pid:
            code = _shell_code(os.waitstatus_to_exitcode(status))
            leader.returncode = code
            _leader_exited(pid, code, exit_file)
    return 1 if code is None else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

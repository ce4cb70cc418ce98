"""Shared behaviour of the stand-in engines (tests only).

Each stand-in checks its command line with argparse built from the real
engine's documented flags, then serves through the embedded simulator
(``python -m pytest_infmax.sim``), so the plugin is exercised against the same
command lines, exit codes and process trees as with the real engine.

Environment variables the tests set (through the server's ``env``):

- ``INFMAX_STANDIN_ARGV``: append ``{"prog": ..., "argv": [...]}`` as one JSON line to this file.
- ``INFMAX_STANDIN_SIM_ARGS``: extra simulator flags (e.g. ``--decode-step-ms 2``).
- ``INFMAX_STANDIN_MODE``: comma-separated behaviours:
  ``crash`` (exit 1 at startup with an engine-like error), ``hang`` (never
  listen), ``ignore-sigterm`` (the launched process ignores SIGTERM; the
  simulator runs as its child), ``escape`` (spawn a child that calls setsid,
  like a worker leaving the process group; its pid goes to
  ``INFMAX_STANDIN_PIDFILE``), ``parse-only`` (print the parsed options as
  JSON and exit 0).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any


def modes() -> set[str]:
    return {m.strip() for m in os.environ.get("INFMAX_STANDIN_MODE", "").split(",") if m.strip()}


def record_argv(prog: str) -> None:
    path = os.environ.get("INFMAX_STANDIN_ARGV")
    if path:
        with open(path, "a") as f:
            ipc = os.environ.get("VLLM_RPC_BASE_PATH")  # vLLM's IPC socket folder, as it was given
            f.write(json.dumps({"prog": prog, "argv": sys.argv[1:], "pid": os.getpid(), "ipc": ipc}) + "\n")


def vllm_runtime_files() -> None:
    """What vLLM leaves behind however it ends (vllm/utils/network_utils.py): its ZMQ IPC sockets
    in VLLM_RPC_BASE_PATH, and torch.distributed's file store in the temp folder, named in its
    log. (Without VLLM_RPC_BASE_PATH vLLM binds in the temp folder; the stand-in then binds
    nothing, so that no test leaves a socket in a folder the tests share.)"""
    base = os.environ.get("VLLM_RPC_BASE_PATH")
    if base:
        ipc = socket.socket(socket.AF_UNIX)
        ipc.bind(os.path.join(base, str(uuid.uuid4())))  # closed at exec; its file stays
    store = os.path.join(tempfile.gettempdir(), f"vllm_dist_{uuid.uuid4().hex}")
    open(store, "w").close()
    print(
        "INFO 12-07 16:00:00 [parallel_state.py:1907] world_size=1 rank=0 local_rank=0 "
        f"distributed_init_method=file://{store} backend=gloo",
        flush=True,
    )


def serve(prog: str, host: str, port: int, model: str, parsed: dict[str, Any]) -> None:
    """Behave as the engine would once its arguments are accepted: serve, crash or hang."""
    mode = modes()
    if "parse-only" in mode:
        print(json.dumps({"prog": prog, **parsed}, default=str))
        sys.exit(0)
    if "escape" in mode:
        # A worker that leaves the process group (setsid), as engine-core or MPI children can.
        child = subprocess.Popen(
            [sys.executable, "-c", "import time\nwhile True: time.sleep(3600)", f"escaped-worker-of-{model}"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
        pidfile = os.environ.get("INFMAX_STANDIN_PIDFILE")
        if pidfile:
            with open(pidfile, "w") as f:
                f.write(str(child.pid))
    print(f"[{prog} stand-in] pid {os.getpid()} serving {model} on {host}:{port}", flush=True)
    if "crash" in mode:
        print("RuntimeError: CUDA error: out of memory (stand-in crash during model loading)", flush=True)
        sys.exit(1)
    if "hang" in mode:
        print("Loading model weights... (stand-in hangs here forever)", flush=True)
        while True:
            time.sleep(3600)
    sim = [
        sys.executable,
        "-m",
        "pytest_infmax.sim",
        "--host",
        host,
        "--port",
        str(port),
        "--model",
        model,
        *shlex.split(os.environ.get("INFMAX_STANDIN_SIM_ARGS", "")),
    ]
    if "ignore-sigterm" in mode:
        proc = subprocess.Popen(sim, stdin=subprocess.DEVNULL)  # before SIG_IGN, which children inherit
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        proc.wait()
        print("[stand-in] simulator exited; still ignoring SIGTERM", flush=True)
        while True:
            time.sleep(3600)
    sys.stdout.flush()
    os.execv(sys.executable, sim)

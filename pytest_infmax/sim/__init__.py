"""Embedded LLM-server simulator: the default server under test, no GPU needed.

Run as ``python -m pytest_infmax.sim [options]``. It serves an OpenAI-compatible API
(see :mod:`pytest_infmax.sim.server`) backed by a real-time engine model
(see :mod:`pytest_infmax.sim.engine`), so tests and examples exercise real HTTP,
real SSE streaming and load-dependent latency.

Launchers should pass ``--port 0 --port-file PATH`` (the simulator binds a free
port itself and then writes its number to PATH atomically) and ``--parent-pid``
(the simulator exits when its parent dies, so a killed pytest leaves nothing behind).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the server imports aiohttp; keep `import pytest_infmax.sim` light
    from pytest_infmax.sim.server import SimConfig

logger = logging.getLogger("pytest_infmax.sim")

API_KEY_ENV = "INFMAX_SIM_API_KEY"
PARENT_POLL_INTERVAL_S = 0.5
SHUTDOWN_TIMEOUT_S = 2.0
LISTEN_BACKLOG = 2048


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_infmax.sim",
        description="OpenAI-compatible LLM server simulator with a real-time engine model.",
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=0, help="0 lets the OS pick a free port (default)")
    server.add_argument("--port-file", type=Path, help="write the bound port number here, atomically")
    server.add_argument("--model", default="sim-model", help="served model name (default: %(default)s)")
    server.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV})",
    )
    server.add_argument("--parent-pid", type=int, help="exit when this process is no longer our parent")
    server.add_argument(
        "--startup-delay", type=float, default=0.0, help="seconds of 503 before becoming ready (model loading)"
    )
    server.add_argument("--seed", type=int, default=0, help="seed of the deterministic output text")

    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=int, default=256)
    engine.add_argument("--decode-step-ms", type=float, default=4.0, help="fixed cost of one engine step")
    engine.add_argument("--decode-ms-per-seq", type=float, default=0.05, help="added per running sequence per step")
    engine.add_argument("--prefill-ms-per-1k-tokens", type=float, default=20.0)
    engine.add_argument("--max-prefill-tokens-per-step", type=int, default=8192)
    engine.add_argument("--stream-interval", type=int, default=1, help="tokens per SSE event")
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    from pytest_infmax.sim.engine import EngineConfig, LinearCostModel
    from pytest_infmax.sim.server import SimConfig

    return SimConfig(
        model=args.model,
        api_key=args.api_key,
        startup_delay_s=args.startup_delay,
        seed=args.seed,
        engine=EngineConfig(
            max_num_seqs=args.max_num_seqs,
            max_prefill_tokens_per_step=args.max_prefill_tokens_per_step,
            stream_interval=args.stream_interval,
        ),
        cost_model=LinearCostModel(
            decode_step_ms=args.decode_step_ms,
            decode_ms_per_seq=args.decode_ms_per_seq,
            prefill_ms_per_1k_tokens=args.prefill_ms_per_1k_tokens,
        ),
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so port 0 yields a port that is already
    ours (no probe-then-bind race) and we can report it."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def write_port_file(path: Path, port: int) -> None:
    """Write the port via a temp file and ``os.replace`` so a reader polling for the
    file never sees it empty or half-written."""
    directory = path.parent if str(path.parent) else Path(".")
    descriptor, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as temp_file:
            temp_file.write(f"{port}\n")
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Orphan detection: when the parent dies we are re-parented, so getppid changes."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            logger.warning("infmax-sim: parent process %d is gone, shutting down", parent_pid)
            stop.set()
            return
        await asyncio.sleep(PARENT_POLL_INTERVAL_S)


async def serve(config: SimConfig, host: str, port: int, port_file: Path | None, parent_pid: int | None) -> int:
    """Serve until SIGTERM / SIGINT or the parent's death; then shut down gracefully."""
    from aiohttp import web

    from pytest_infmax.sim.server import build_app

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)

    sock = bind_socket(host, port)
    runner = web.AppRunner(
        build_app(config),
        access_log=None,
        handler_cancellation=True,  # a client disconnect cancels its handler: frees the engine slot
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    watcher: asyncio.Task[None] | None = None
    try:
        await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
        bound_port = sock.getsockname()[1]
        if port_file is not None:
            write_port_file(port_file, bound_port)
        logger.info("infmax-sim: serving %s on %s", config.model, _url(host, bound_port))
        if parent_pid is not None:
            watcher = loop.create_task(_watch_parent(parent_pid, stop))
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        await runner.cleanup()
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        logger.error("infmax-sim: invalid option: %s", exc)
        return 2
    try:
        return asyncio.run(serve(config, args.host, args.port, args.port_file, args.parent_pid))
    except OSError as exc:
        logger.error("infmax-sim: cannot serve on %s: %s", _url(args.host, args.port), exc)
        return 1

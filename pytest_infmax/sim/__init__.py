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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config imports the engine, the server aiohttp: keep `import pytest_infmax.sim` light
    from pytest_infmax.sim.config import SimConfig

logger = logging.getLogger("pytest_infmax.sim")

API_KEY_ENV = "INFMAX_SIM_API_KEY"
PARENT_POLL_INTERVAL_S = 0.5
SHUTDOWN_TIMEOUT_S = 2.0
LISTEN_BACKLOG = 2048
# --sse-writer: the stream writers of sim.streams (SimConfig.sse_writer), the first the default
SSE_WRITERS = ("fast", "aiohttp")
# --front-end: who reads requests (SimConfig.front_end), the first the default
FRONT_ENDS = ("fast", "aiohttp")


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
    server.add_argument(
        "--sse-writer",
        choices=SSE_WRITERS,
        default=SSE_WRITERS[0],
        help="how streams are written: 'fast' (default) writes each step's events straight to the socket from "
        "the engine's step; 'aiohttp' through a task per stream and aiohttp's writer, as before (faulted "
        "streams always take that path)",
    )
    server.add_argument(
        "--front-end",
        choices=FRONT_ENDS,
        default=FRONT_ENDS[0],
        help="who reads requests: 'fast' (default) serves plain streaming completions at the protocol level "
        "(httptools, in the read's callback) and hands every other request's connection to aiohttp; 'aiohttp' "
        "serves everything through aiohttp, as before",
    )
    server.add_argument(
        "--vocab-size",
        type=_vocab_size,
        help="refuse prompt token ids at or above N as vLLM does ('Token id N is out of vocabulary'); default: any id",
    )

    _add_engine_arguments(parser)
    _add_noise_arguments(parser)
    _add_fault_arguments(parser)
    _add_observability_arguments(parser)
    return parser


def _stall_ms(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.replace(":", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH milliseconds (e.g. 5,30), got {text!r}") from None
    return low, high


def _add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    """Timing noise (pytest_infmax.sim.noise and docs/simulator.md); all off by default."""
    noise = parser.add_argument_group(
        "noise",
        "timing noise on every step's cost, off by default: a per-start factor drawn from fresh OS "
        "entropy at each start (not from --seed), and per-step jitter (pytest_infmax.sim.noise)",
    )
    noise.add_argument(
        "--start-jitter",
        type=float,
        default=0.0,
        metavar="SD",
        help="per-start factor on every step's cost, lognormal with this sd (0.02: 2%%; default: 0)",
    )
    noise.add_argument(
        "--prefill-start-jitter",
        type=float,
        default=0.0,
        metavar="SD",
        help="a further per-start factor on the prefill part of each step (default: 0)",
    )
    noise.add_argument(
        "--step-jitter",
        type=float,
        default=0.0,
        metavar="SD",
        help="per-step lognormal multiplier with this sd (default: 0)",
    )
    noise.add_argument(
        "--step-drift",
        type=float,
        default=0.0,
        metavar="SD",
        help="slow drift of step costs: AR(1) on the log scale with this sd (default: 0)",
    )
    noise.add_argument(
        "--step-drift-steps",
        type=float,
        default=200.0,
        metavar="N",
        help="memory of --step-drift, in steps (default: %(default)g)",
    )
    noise.add_argument(
        "--stall-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="chance per step of a stall of --stall-ms added to it (default: 0)",
    )
    noise.add_argument(
        "--stall-ms",
        type=_stall_ms,
        default=(5.0, 30.0),
        metavar="LOW,HIGH",
        help="stall length, uniform in [LOW, HIGH] ms (default: 5,30)",
    )
    noise.add_argument(
        "--start-seed",
        type=int,
        metavar="N",
        help="seed the per-start factors and the per-step noise (default: fresh OS entropy "
        "at each start, which the start-up log line and /sim/stats show)",
    )


def _noise_config(args: argparse.Namespace) -> Any:
    from pytest_infmax.sim.noise import NoiseConfig

    return NoiseConfig(
        start_jitter=args.start_jitter,
        prefill_start_jitter=args.prefill_start_jitter,
        step_jitter=args.step_jitter,
        step_drift=args.step_drift,
        step_drift_steps=args.step_drift_steps,
        stall_rate=args.stall_rate,
        stall_ms=tuple(args.stall_ms),
        start_seed=args.start_seed,
    )


def _add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    """Fault injection; each fault also exists per request as an X-Infmax-Fault header
    (see pytest_infmax.sim.faults and docs/simulator.md)."""
    faults = parser.add_argument_group(
        "faults",
        "applied to a fraction --fault-rate of generation requests; the X-Infmax-Fault "
        "request header overrides them for one request ('none' exempts it)",
    )
    faults.add_argument(
        "--fault-rate",
        type=float,
        default=1.0,
        metavar="P",
        help="fraction of requests the fault flags apply to (default: 1, every request)",
    )
    faults.add_argument(
        "--fault-status",
        type=int,
        metavar="CODE",
        help="answer this HTTP error status (e.g. 429, 500, 503) with an OpenAI error body",
    )
    faults.add_argument(
        "--fault-retry-after",
        type=float,
        metavar="S",
        help="Retry-After seconds sent with --fault-status (default: 1 for 429, else none)",
    )
    faults.add_argument(
        "--fault-stall-seconds",
        type=float,
        default=0.0,
        metavar="S",
        help="pause the stream S seconds once --fault-stall-after tokens were sent",
    )
    faults.add_argument(
        "--fault-stall-after",
        type=int,
        default=1,
        metavar="K",
        help="output tokens sent before the stall (default: %(default)s; 0 stalls the first token)",
    )
    faults.add_argument(
        "--fault-reset-after",
        type=int,
        metavar="K",
        help="reset the connection (TCP RST) once K output tokens were sent",
    )
    faults.add_argument(
        "--fault-malformed",
        metavar="MODES",
        help="malformed SSE, modes joined by + or ',': split, no_space, empty_choices, comment, "
        "no_done, no_finish, no_usage, invalid_json",
    )
    faults.add_argument(
        "--crash-after",
        type=int,
        metavar="N",
        help="serve N generation requests, then exit abruptly (os._exit(1)) when the next arrives",
    )


def _add_observability_arguments(parser: argparse.ArgumentParser) -> None:
    observability = parser.add_argument_group(
        "observability", "ground-truth trace (GET /sim/trace) and Prometheus metrics (GET /metrics)"
    )
    observability.add_argument(
        "--trace-capacity",
        type=int,
        default=100_000,
        metavar="N",
        help="finished requests kept for GET /sim/trace (default: %(default)s; 0: none)",
    )
    observability.add_argument(
        "--trace-file",
        type=Path,
        metavar="PATH",
        help="append every finished request to PATH as a JSON line, as it ends",
    )


def _faults_and_observability(args: argparse.Namespace) -> dict[str, Any]:
    """SimConfig fields of the faults and observability groups."""
    from pytest_infmax.sim.faults import FaultConfig, spec_from_flags

    if args.trace_capacity < 0:
        raise ValueError(f"--trace-capacity must be >= 0, got {args.trace_capacity}")
    spec = spec_from_flags(
        status=args.fault_status,
        retry_after=args.fault_retry_after,
        stall_seconds=args.fault_stall_seconds,
        stall_after=args.fault_stall_after,
        reset_after=args.fault_reset_after,
        malformed=args.fault_malformed,
    )
    return {
        "faults": FaultConfig(spec=spec, rate=args.fault_rate, crash_after=args.crash_after),
        "trace_capacity": args.trace_capacity,
        "trace_file": args.trace_file,
    }


class _ListProfiles(argparse.Action):
    """--list-profiles: print the hardware and model profiles (built-in, then any
    --profile-file given before it) and exit."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *_: Any) -> None:
        from pytest_infmax.sim.roofline import ProfileError, ProfileRegistry

        try:
            registry = ProfileRegistry.with_files(getattr(namespace, "profile_file", None) or ())
        except ProfileError as exc:
            parser.exit(2, f"infmax-sim: {exc}\n")
        lines = ["hardware:"]
        lines += [
            f"  {name:<16} {hw.description or ''} ({hw.origin})" for name, hw in sorted(registry.hardware.items())
        ]
        lines += ["models:"]
        lines += [f"  {name:<16} {m.description or ''} ({m.origin})" for name, m in sorted(registry.models.items())]
        lines += ["use: --profile HARDWARE/MODEL, e.g. --profile b200/gpt-oss-120b"]
        parser.exit(0, "\n".join(lines) + "\n")


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group(
        "engine",
        "continuous-batching scheduler; step times from the linear model (default, fast) or, with "
        "--profile, from a roofline model of a GPU deployment (docs/calibration.md)",
    )
    engine.add_argument(
        "--max-num-seqs",
        type=int,
        default=256,
        help="most sequences running at once (per data-parallel rank with --profile; default: %(default)s)",
    )
    engine.add_argument(
        "--max-num-batched-tokens",
        type=int,
        metavar="N",
        help="token budget of one step, decode + prefill (per rank; default: 8192 with --profile, "
        "else no joint budget)",
    )
    engine.add_argument(
        "--max-prefill-tokens-per-step",
        type=int,
        default=8192,
        help="prompt tokens prefilled per step; longer prompts are chunked (default: %(default)s)",
    )
    engine.add_argument(
        "--kv-cache-tokens",
        type=int,
        metavar="N",
        help="KV-cache capacity; a request is admitted once blocks for prompt + max_tokens are free "
        "(default: computed from --profile, else unlimited)",
    )
    engine.add_argument("--block-size", type=int, default=16, help="KV-cache block, tokens (default: %(default)s)")
    engine.add_argument(
        "--enable-prefix-caching",
        action="store_true",
        help="vLLM's automatic prefix caching: cached prompt blocks skip their prefill, LRU eviction under "
        "the KV capacity, vllm:prefix_cache_queries/_hits in /metrics (default: off)",
    )
    engine.add_argument(
        "--slowdown",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="multiply every step's duration (inject a regression of known size; default: 1)",
    )
    engine.add_argument("--stream-interval", type=int, default=1, help="tokens per SSE event")
    engine.add_argument("--decode-step-ms", type=float, default=4.0, help="linear model: fixed cost of one step")
    engine.add_argument(
        "--decode-ms-per-seq", type=float, default=0.05, help="linear model: added per running sequence per step"
    )
    engine.add_argument("--prefill-ms-per-1k-tokens", type=float, default=20.0, help="linear model: prefill cost")
    engine.add_argument(
        "--profile",
        metavar="HARDWARE/MODEL",
        help="roofline model of a deployment, e.g. b200/gpt-oss-120b (see --list-profiles)",
    )
    engine.add_argument(
        "--profile-file",
        type=Path,
        action="append",
        default=[],
        metavar="FILE.toml",
        help="extra [hardware.NAME] / [model.NAME] profiles (repeatable; replace built-ins of the same name)",
    )
    engine.add_argument("--list-profiles", action=_ListProfiles, help="print the known profiles and exit")
    engine.add_argument(
        "--tp",
        type=int,
        metavar="N",
        help="tensor-parallel GPUs per attention group (default: smallest of 1, 2, 4, 8 that fits)",
    )
    engine.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="GPUs in all (default: --tp); gpus / tp data-parallel attention groups (DEP for MoE)",
    )
    engine.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of GPU memory for weights + KV cache (default: %(default)s)",
    )
    engine.add_argument(
        "--precision", choices=("fp4", "fp8", "bf16"), help="weights and math precision (default: the model profile's)"
    )
    engine.add_argument("--kv-cache-dtype", choices=("fp8", "bf16"), help="default: the model profile's")
    engine.add_argument("--compute-efficiency", type=float, metavar="F", help="override the calibrated value")
    engine.add_argument("--moe-compute-efficiency", type=float, metavar="F", help="override the calibrated value")
    engine.add_argument("--bandwidth-efficiency", type=float, metavar="F", help="override the calibrated value")
    engine.add_argument("--step-overhead-ms", type=float, metavar="MS", help="override the calibrated value")


def _engine_and_cost_model(args: argparse.Namespace) -> dict[str, Any]:
    """SimConfig fields of the engine group: the scheduler's limits and the cost model."""
    from pytest_infmax.sim.engine import EngineConfig, LinearCostModel, StepCostModel

    limits: dict[str, Any] = {
        "max_num_seqs": args.max_num_seqs,
        "max_prefill_tokens_per_step": args.max_prefill_tokens_per_step,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_tokens": args.kv_cache_tokens,
    }
    cost_model: StepCostModel
    if args.profile is None:
        cost_model = LinearCostModel(
            decode_step_ms=args.decode_step_ms,
            decode_ms_per_seq=args.decode_ms_per_seq,
            prefill_ms_per_1k_tokens=args.prefill_ms_per_1k_tokens,
        )
    else:
        from pytest_infmax.sim.roofline import Deployment, ProfileRegistry, RooflineCostModel, auto_deployment

        hardware, model = ProfileRegistry.with_files(args.profile_file).resolve(args.profile)
        options = {
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "precision": args.precision,
            "kv_cache_dtype": args.kv_cache_dtype,
            "compute_efficiency": args.compute_efficiency,
            "moe_compute_efficiency": args.moe_compute_efficiency,
            "bandwidth_efficiency": args.bandwidth_efficiency,
            "step_overhead_ms": args.step_overhead_ms,
        }
        if args.tp is None and args.gpus is None:
            deployment = auto_deployment(hardware, model, **options)
        else:
            tp = args.tp or args.gpus
            deployment = Deployment(hardware, model, tp=tp, gpus=args.gpus or tp, **options)
        cost_model = RooflineCostModel(deployment)
        dp = deployment.dp  # scheduler limits are per data-parallel rank, as in vLLM / TensorRT-LLM
        limits["max_num_seqs"] *= dp
        limits["max_prefill_tokens_per_step"] *= dp
        limits["max_num_batched_tokens"] = (args.max_num_batched_tokens or 8192) * dp
        if args.kv_cache_tokens is None:
            limits["kv_cache_tokens"] = deployment.kv_cache_tokens
        logger.info("infmax-sim: %s", deployment.describe())
    engine = EngineConfig(
        **limits,
        block_size=args.block_size,
        slowdown=args.slowdown,
        stream_interval=args.stream_interval,
        enable_prefix_caching=args.enable_prefix_caching,
    )
    from pytest_infmax.sim.noise import noise_of, with_noise

    cost_model = with_noise(cost_model, _noise_config(args))  # this start's factors are drawn here
    noise = noise_of(cost_model)
    if noise is not None:
        logger.info("%s", noise.log_line())
    return {"engine": engine, "cost_model": cost_model}


def _vocab_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def config_from_args(args: argparse.Namespace) -> SimConfig:
    from pytest_infmax.sim.config import SimConfig

    return SimConfig(
        **_faults_and_observability(args),
        **_engine_and_cost_model(args),
        model=args.model,
        api_key=args.api_key,
        startup_delay_s=args.startup_delay,
        seed=args.seed,
        vocab_size=args.vocab_size,
        sse_writer=args.sse_writer,
        front_end=args.front_end,
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so port 0 yields a port that is already
    ours (no probe-then-bind race) and we can report it."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
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

    from pytest_infmax.collector import CollectorWatch, settle_collector
    from pytest_infmax.sim.frontdoor import FrontDoors
    from pytest_infmax.sim.server import ENGINE_KEY, OBS_KEY, build_app

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)

    sock = bind_socket(host, port)
    app = build_app(config)
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,  # a client disconnect cancels its handler: frees the engine slot
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    watcher: asyncio.Task[None] | None = None
    listener: asyncio.Server | None = None
    doors: FrontDoors | None = None  # the connections the front door serves (sim/frontdoor.py)
    collector: CollectorWatch | None = None
    try:
        if config.front_end == "fast":
            assert runner.server is not None
            doors = FrontDoors(app, runner.server)
            listener = await loop.create_server(doors, sock=sock, backlog=LISTEN_BACKLOG)
        else:
            await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
        bound_port = sock.getsockname()[1]
        if port_file is not None:
            write_port_file(port_file, bound_port)
        logger.info("infmax-sim: serving %s on %s", config.model, _url(host, bound_port))
        # The collector off the schedule: start-up's objects frozen, full collections spaced out
        # (pytest_infmax/collector.py); /sim/stats shows what it did from here on.
        settle_collector()
        collector = app[OBS_KEY].collector
        collector.install()
        if parent_pid is not None:
            watcher = loop.create_task(_watch_parent(parent_pid, stop))
        await stop.wait()
    finally:
        if collector is not None:
            collector.uninstall()
        if watcher is not None:
            watcher.cancel()
        if listener is not None:
            listener.close()
        if doors is not None:
            # the engine's stop ends every stream with an abort event, which the front door
            # writes before it closes; aiohttp's connections end in runner.cleanup, as before
            if ENGINE_KEY in app:
                await app[ENGINE_KEY].stop()
            await doors.close(SHUTDOWN_TIMEOUT_S)
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

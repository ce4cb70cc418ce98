"""Load spread over worker processes (``LoadConfig(workers=N)``).

One asyncio loop on one core runs out at some tens of thousands of SSE events
per second (docs/load-generator.md). Past that, ``workers=N`` starts N
processes, each running ``LoadGenerator.run`` on its own event loop over a
shard of the load, and merges their records:

* closed loop: the streams, warm-up and request count are split as evenly as
  possible; shard ``k`` takes request indices ``k, k+N, k+2N, ...``, so every
  request's content (which depends only on seed and index) is one the
  single-process run could have sent;
* open loop: every shard computes the same arrival schedule and takes every
  N-th arrival, so the merged arrivals are exactly the single-process schedule.

Every shard warms up and opens its connections first; the parent then gives
them one common start time (``perf_counter`` is the system-wide monotonic clock
on Linux and macOS, so it means the same instant in every process), which is
the merged run's measured start.

Workers are ``python -c "...worker_main.main()"`` subprocesses talking JSON lines
over stdin/stdout (nothing is pickled; the API key travels in the environment,
never on a command line). A worker whose stdin closes (its parent died) stops;
a parent that is cancelled or fails kills its workers before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from pytest_infmax.collector import merge_collector_figures
from pytest_infmax.lazy import quiet_blas_threads
from pytest_infmax.load.clientstats import ClientStats
from pytest_infmax.load.plan import LoadConfig, RunRecords
from pytest_infmax.load.scenarios import Scenario, TokenWindow
from pytest_infmax.records import RequestRecord

_API_KEY_ENV = "INFMAX_WORKER_API_KEY"
_START_MARGIN = 0.02  # seconds between the start message and the common start
_LINE_LIMIT = 1 << 28  # one batch of records per line
_STOP_CHECK_S = 0.25  # how often a run that can stop early asks whether it should

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class WorkerError(RuntimeError):
    """A load worker process failed; the message says which and why."""


def share(total: int, k: int, n: int) -> int:
    """Shard ``k``'s part of ``total`` when split as evenly as possible over ``n``."""
    return total // n + (1 if k < total % n else 0)


def config_to_json(config: Any) -> dict[str, Any]:
    """A LoadConfig as the JSON a worker rebuilds it from: every field, exactly
    (``to_dict`` is the report's view, with effective values filled in)."""
    d = dataclasses.asdict(config)
    if d["rate"] == float("inf"):
        d["rate"] = "inf"  # JSON has no infinity
    return d


def config_from_json(d: dict[str, Any]) -> Any:
    d = dict(d)
    d["scenario"] = Scenario(**d["scenario"])
    if "tokens" in d:
        tokens = dict(d["tokens"])
        d["tokens"] = TokenWindow(**{**tokens, "exclude": tuple(tokens.get("exclude", ()))})
    if d.get("rate") == "inf":
        d["rate"] = float("inf")
    return LoadConfig(**d)


class Shard:
    """What one worker process runs: its part of the load, and the common start."""

    def __init__(self, index: int, count: int, wait_start: Callable[[], Any]) -> None:
        self.index = index
        self.count = count
        self._wait_start = wait_start  # async () -> the common start (perf_counter seconds)

    async def start_time(self) -> float:
        return float(await self._wait_start())


async def run_sharded(
    base_url: str,
    model: str,
    api_key: str | None,
    config: Any,
    on_record: Callable[[RequestRecord], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Any:
    """Run ``config`` over ``config.workers`` processes; merged ``RunRecords``.

    ``stop`` is asked every ``_STOP_CHECK_S`` seconds once the common start went out: once
    it answers True every worker is told to stop (no new request starts, those in flight
    end), and the run ends with what they measured (a dead server: runner.ServerWatch)."""
    n = config.workers
    env = dict(os.environ)
    quiet_blas_threads(env)  # a worker uses no BLAS; its cores are the load's
    env.pop(_API_KEY_ENV, None)
    if api_key:
        env[_API_KEY_ENV] = api_key
    procs: list[asyncio.subprocess.Process] = []
    clock_origin, epoch_origin = time.perf_counter(), time.time()
    try:
        for k in range(n):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "from pytest_infmax.load.worker_main import main; main()",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                limit=_LINE_LIMIT,
            )
            procs.append(proc)
            assert proc.stdin is not None
            proc.stdin.write(
                _encode(
                    {
                        "base_url": base_url,
                        "model": model,
                        "config": config_to_json(config),
                        "shard": [k, n],
                    }
                )
                + b"\n"
            )
            await proc.stdin.drain()

        records: list[RequestRecord] = []
        results: list[dict[str, Any] | None] = [None] * n
        ready = [asyncio.get_running_loop().create_future() for _ in range(n)]

        async def follow(k: int, proc: asyncio.subprocess.Process) -> None:
            assert proc.stdout is not None
            while True:
                line = await proc.stdout.readline()
                if not line:
                    code = await proc.wait()
                    raise WorkerError(
                        f"load worker {k} of {n} exited with status {code} before its run ended "
                        "(its error, if any, is on stderr above)"
                    )
                msg = _decode(line)
                kind = msg.get("kind")
                if kind == "ready":
                    ready[k].set_result(None)
                elif kind == "records":
                    for d in msg["records"]:
                        rec = RequestRecord.from_dict(d)
                        records.append(rec)
                        if on_record is not None:
                            on_record(rec)
                elif kind == "done":
                    results[k] = msg
                    return
                elif kind == "error":
                    raise WorkerError(f"load worker {k} of {n} failed: {msg.get('message')}")

        async def watch_stop(stop: Callable[[], bool]) -> None:
            """Started once the common start went out: a worker reads "stop" only after it."""
            while not stop():
                await asyncio.sleep(_STOP_CHECK_S)
            for proc in procs:
                if proc.stdin is not None and not proc.stdin.is_closing():
                    with contextlib.suppress(ConnectionError):
                        proc.stdin.write(_encode({"kind": "stop"}) + b"\n")
                        await proc.stdin.drain()

        followers = [asyncio.ensure_future(follow(k, p)) for k, p in enumerate(procs)]
        watcher: asyncio.Future[None] | None = None
        try:
            # every shard warmed up and connected: one start for all
            waiting = asyncio.ensure_future(asyncio.gather(*ready))
            while not waiting.done():
                await asyncio.wait([waiting, *followers], return_when=asyncio.FIRST_COMPLETED)
                for f in followers:
                    if f.done() and not waiting.done():
                        waiting.cancel()
                        f.result()  # the worker's error
                        raise WorkerError("a load worker ended before the common start")
            start_at = time.perf_counter() + _START_MARGIN
            cpu_at_start = time.process_time()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(_encode({"kind": "start", "at": start_at}) + b"\n")
                await proc.stdin.drain()
            watcher = asyncio.ensure_future(watch_stop(stop)) if stop is not None else None
            await asyncio.gather(*followers)
            coordinator_cpu = time.process_time() - cpu_at_start
        finally:
            for f in followers:
                f.cancel()
            if watcher is not None:
                watcher.cancel()
            await asyncio.gather(*followers, *([watcher] if watcher is not None else []), return_exceptions=True)
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 10)

    parts = [r for r in results if r is not None]
    return merge_shards(records, parts, config, clock_origin, epoch_origin, coordinator_cpu)


def merge_shards(
    records: list[RequestRecord],
    parts: list[dict[str, Any]],
    config: Any,
    clock_origin: float,
    epoch_origin: float,
    coordinator_cpu: float,
) -> RunRecords:
    """One run's ``RunRecords`` from its shards' raw records and their ``done`` messages.

    Shared by worker processes (:func:`run_sharded`) and Ray actors
    (:mod:`pytest_infmax.load.rayworkers`): every record comes back whole, so the merged
    percentiles are exact. ``parts[k]`` holds shard k's ``measured_start`` and
    ``measured_end`` on this process's clock, and its ``client`` figures (loop lags,
    CPU seconds). ``coordinator_cpu``: this process's CPU seconds from the common start to
    the last shard's end (it reads and decodes every record meanwhile), counted in the
    run's ``cpu_seconds`` with the shards'.
    """
    records.sort(key=lambda r: r.index)
    measured_start = min(p["measured_start"] for p in parts)
    measured_end = max(p["measured_end"] for p in parts)
    stats = [p["client"] for p in parts]
    client = ClientStats(
        send_lags=[lag for r in records if not r.warmup and (lag := r.send_lag) is not None],
        loop_lags=[x for s in stats for x in s["loop_lags"]],
        loop_lag_interval=stats[0]["loop_lag_interval"],
        cpu_seconds=sum(s["cpu_seconds"] for s in stats) + coordinator_cpu,
        wall_seconds=measured_end - measured_start,
        threshold=config.client_lag_threshold,
        send_lag_reference=stats[0]["send_lag_reference"],
        workers=len(parts),
        collector=merge_collector_figures([s.get("collector") for s in stats]),
    )
    return RunRecords(records, clock_origin, epoch_origin, measured_start, measured_end, client)


def client_part(run: RunRecords) -> dict[str, Any]:
    """A shard's ``client`` figures as the ``done`` message carries them (plain JSON)."""
    client = run.client
    assert client is not None
    return {
        "loop_lags": client.loop_lags,
        "loop_lag_interval": client.loop_lag_interval,
        "cpu_seconds": client.cpu_seconds,
        "send_lag_reference": client.send_lag_reference,
        "collector": client.collector,
    }

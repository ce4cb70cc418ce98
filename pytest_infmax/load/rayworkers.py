"""Load past one host: the ``workers=N`` shards run as Ray actors (``LoadConfig(ray=ADDRESS)``).

The schedule is :mod:`pytest_infmax.load.workers`' own: actor ``k`` of ``N`` runs
``LoadGenerator.run`` with ``Shard(k, N)``, so it takes request indices ``k, k+N, ...``
(closed loop) or every N-th arrival of the one arrival schedule (open loop), and the
records come back whole (msgspec JSON, never our objects pickled) to be merged by
:func:`~pytest_infmax.load.workers.merge_shards`, exactly as worker processes' are.

**One start instant across hosts.** ``perf_counter`` means nothing on another host, so
the common start is a wall-clock instant (``time.time()``): each actor maps it to its
own ``perf_counter`` when it is told, and sends its stamps back relative to that start;
this process maps them onto its own clock the same way. On one host the merge is exact
(to the microseconds between two clock reads); across hosts it is as good as the hosts'
clock sync (NTP or PTP: docs/scale-out.md).

**A lost actor or node** stops the run with :class:`WorkerLost`, which names the worker,
the Ray actor and its node, and carries every record measured until then
(``.records``, each already handed to ``on_record``); the other actors are killed. A Ray
this run connected to is disconnected at its end (``ray.shutdown``); one the caller had
connected to is left connected.

Ray is imported here only when a run asks for it, and is the optional extra
``pytest-infmax[ray]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

from pytest_infmax.load.plan import RunRecords
from pytest_infmax.load.workers import (
    Shard,
    WorkerError,
    _decode,
    _encode,
    client_part,
    config_from_json,
    config_to_json,
    merge_shards,
)
from pytest_infmax.records import RequestRecord

START_MARGIN = 0.25  # seconds from the start message to the common start: a round trip to every actor
PLACEMENT_TIMEOUT = 60.0  # seconds for the cluster to place every actor
POLL_SECONDS = 0.25  # how often finished records are fetched from the actors
LAST_WORDS_TIMEOUT = 5.0  # seconds the surviving actors get to hand over their records after a loss


class RayMissing(WorkerError):
    """``ray=`` was given where Ray is not installed."""


class WorkerLost(WorkerError):
    """A Ray actor (or the node it ran on) was lost mid-run.

    ``records`` holds every record measured before the loss, from every actor; ``partial``
    the same as a run (its measured phase from the common start to the loss), for the
    runner to report, flagged, as it reports a run Ctrl-C stopped; None before the start.
    """

    def __init__(self, message: str, records: list[RequestRecord], partial: RunRecords | None = None) -> None:
        super().__init__(message)
        self.records = records
        self.partial = partial


def import_ray() -> Any:
    """The ``ray`` module, or :class:`RayMissing` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RayMissing(
            f"ray= (--infmax-ray) runs load workers as Ray actors, but Ray cannot be imported ({exc}): "
            "pip install 'pytest-infmax[ray]' on this host and on every host of the cluster"
        ) from None
    return ray


def _wall_to_perf(epoch: float) -> float:
    """The ``perf_counter`` value that means wall-clock instant ``epoch`` here."""
    # the two clocks read as close together as Python allows; the tighter of three pairs
    best: tuple[float, float] | None = None
    for _ in range(3):
        p0 = time.perf_counter()
        wall = time.time()
        p1 = time.perf_counter()
        if best is None or p1 - p0 < best[0]:
            best = (p1 - p0, (p0 + p1) / 2 - wall)
    assert best is not None
    return epoch + best[1]


class ShardActor:
    """One shard's load generator, as a Ray actor (an async actor: every method runs on its loop).

    ``prepare`` warms up and connects, then returns; ``go`` gives the common start (wall
    clock); ``take`` hands over the records finished since the last call, with stamps
    relative to the common start; ``finish`` waits for the run's end and hands over the rest.
    """

    def __init__(self, generator_class: Any, base_url: str, model: str, api_key: str | None) -> None:
        self._generator = generator_class(base_url, model, api_key)
        self._pending: list[RequestRecord] = []
        self._ready = asyncio.Event()
        self._started = asyncio.Event()
        self._start: float | None = None  # the common start on this host's perf_counter
        self._task: asyncio.Future[RunRecords] | None = None
        self._halted = False  # the driver said stop: no new request starts (a dead server)

    def where(self) -> dict[str, str]:
        import ray

        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "actor_id": context.get_actor_id() or "",
            "ip": ray.util.get_node_ip_address(),
        }

    async def prepare(self, job: bytes) -> None:
        spec = _decode(job)
        k, n = spec["shard"]

        async def wait_start() -> float:
            self._ready.set()
            await self._started.wait()
            assert self._start is not None
            return self._start

        self._task = asyncio.ensure_future(
            self._generator.run(
                config_from_json(spec["config"]),
                on_record=lambda rec: self._pending.append(rec),  # _drain swaps the list
                shard=Shard(k, n, wait_start),
                stop=lambda: self._halted,
            )
        )
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait([ready, self._task], return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.is_set():
            self._task.result()  # the run's error (warm-up failed)
            raise WorkerError("the shard's run ended before the common start")
        ready.cancel()

    async def go(self, start_epoch: float) -> None:
        self._start = _wall_to_perf(start_epoch)
        self._started.set()

    def _drain(self) -> list[dict[str, Any]]:
        if self._start is None:
            return []
        batch, self._pending = self._pending, []
        return [r.to_dict(self._start) for r in batch]

    async def take(self) -> bytes:
        return _encode(self._drain())

    async def halt(self) -> None:
        """No new request starts; those in flight end, and ``finish`` returns."""
        self._halted = True

    async def finish(self) -> bytes:
        assert self._task is not None and self._start is not None
        run = await self._task
        return _encode(
            {
                "records": self._drain(),
                "measured_start": run.measured_start - self._start,
                "measured_end": run.measured_end - self._start,
                "client": client_part(run),
            }
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


async def _get(ref: Any, timeout: float | None = None) -> Any:
    """Await a Ray ObjectRef on this event loop, with a timeout."""
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)


# A wrong address fails here at once instead of in Ray's own wait for a GCS that never
# answers (its retries took over two minutes before ray.init raised).
ADDRESS_CHECK_TIMEOUT_S = 5.0


def check_address(address: str, timeout: float = ADDRESS_CHECK_TIMEOUT_S) -> None:
    """For an address naming a host and port (``HOST:PORT``, ``ray://HOST:PORT``): something
    must accept a TCP connection there within ``timeout`` seconds, else ``WorkerError`` naming
    it. ``auto`` and ``local`` name no port; Ray finds (or starts) those itself."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    host = host.strip("[]")  # an IPv6 literal
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise WorkerError(
            f"could not connect to the Ray cluster at {address!r} (ray=, --infmax-ray): {host}:{port}: "
            f"{reason} within {timeout:g} s; start one with `ray start --head` there, or give the address "
            "`ray status` prints on a node of it (docs/scale-out.md)"
        ) from None


async def run_on_ray(
    generator_class: Any,
    base_url: str,
    model: str,
    api_key: str | None,
    config: Any,
    on_record: Callable[[RequestRecord], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> RunRecords:
    """Run ``config`` over ``config.workers`` Ray actors on the cluster at ``config.ray``; merged ``RunRecords``.

    ``stop`` is asked every ``POLL_SECONDS`` once the run started: once it answers True
    every actor is told to halt (no new request starts), as worker processes are."""
    ray = import_ray()
    owns = not ray.is_initialized()
    if owns:
        await asyncio.to_thread(check_address, config.ray)
        try:
            ray.init(
                address=None if config.ray == "local" else config.ray,
                logging_level="warning",
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise WorkerError(
                f"could not connect to the Ray cluster at {config.ray!r} (ray=, --infmax-ray): {exc}; "
                "start one with `ray start --head` and give its address (docs/scale-out.md)"
            ) from None
    n = config.workers
    actor_class = ray.remote(num_cpus=1)(ShardActor)
    actors: list[Any] = []
    clock_origin, epoch_origin = time.perf_counter(), time.time()
    records: list[RequestRecord] = []
    places: list[dict[str, str]] = [{} for _ in range(n)]

    def keep(batch: list[dict[str, Any]]) -> None:
        for d in batch:
            rec = RequestRecord.from_dict(d, start)
            records.append(rec)
            if on_record is not None:
                on_record(rec)

    def name(k: int) -> str:
        p = places[k]
        where = f" on node {p['node_id'][:12]} ({p['ip']})" if p else ""
        actor = f"Ray actor {p['actor_id'][:12]}" if p else "Ray actor"
        return f"load worker {k} of {n} ({actor}{where})"

    async def each(k: int, ref: Any, timeout: float | None = None) -> Any:
        try:
            return await _get(ref, timeout)
        except ray.exceptions.RayActorError as exc:
            raise WorkerLost(
                f"{name(k)} was lost mid-run ({type(exc).__name__}): its node left the cluster or its process "
                "died; the run stops (the records measured before are kept: WorkerLost.records)",
                sorted(records, key=lambda r: r.index),
            ) from None
        except ray.exceptions.RayTaskError as exc:
            raise WorkerError(f"{name(k)} failed: {type(exc.cause).__name__}: {exc.cause}") from None
        except asyncio.TimeoutError:
            raise WorkerError(
                f"{name(k)} did not answer within {timeout:g} s: the cluster may have fewer free CPUs than "
                f"workers={n} (each actor takes one; `ray status` shows them)"
            ) from None

    start = 0.0
    try:
        for _ in range(n):
            actors.append(
                actor_class.options(scheduling_strategy="SPREAD").remote(generator_class, base_url, model, api_key)
            )
        for k, a in enumerate(actors):
            places[k] = await each(k, a.where.remote(), PLACEMENT_TIMEOUT)
        job = {"config": config_to_json(config)}
        await asyncio.gather(
            *(each(k, a.prepare.remote(_encode({**job, "shard": [k, n]}))) for k, a in enumerate(actors))
        )
        # one wall-clock start for every host; this process's perf_counter for the same instant
        start_epoch = time.time() + START_MARGIN
        start = _wall_to_perf(start_epoch)
        cpu_at_start = time.process_time()
        await asyncio.gather(*(each(k, a.go.remote(start_epoch), PLACEMENT_TIMEOUT) for k, a in enumerate(actors)))
        finishing = {k: asyncio.ensure_future(each(k, a.finish.remote())) for k, a in enumerate(actors)}
        parts: dict[int, dict[str, Any]] = {}
        halted = False
        try:
            while finishing:
                done, _ = await asyncio.wait(finishing.values(), timeout=POLL_SECONDS)
                for k, f in list(finishing.items()):
                    if f in done:
                        msg = f.result()  # a lost actor raises WorkerLost here
                        del finishing[k]
                        done_msg = _decode(msg)
                        keep(done_msg.pop("records"))
                        done_msg["measured_start"] += start
                        done_msg["measured_end"] += start
                        parts[k] = done_msg
                for k in list(finishing):
                    keep(_decode(await each(k, actors[k].take.remote(), PLACEMENT_TIMEOUT)))
                if stop is not None and not halted and stop():
                    halted = True
                    await asyncio.gather(
                        *(each(k, actors[k].halt.remote(), PLACEMENT_TIMEOUT) for k in list(finishing))
                    )
            coordinator_cpu = time.process_time() - cpu_at_start  # this driver's reading of every record
        except WorkerLost as lost:
            # what the other actors measured until now is kept too
            for k in list(finishing):
                with contextlib.suppress(Exception):
                    keep(_decode(await _get(actors[k].take.remote(), LAST_WORDS_TIMEOUT)))
            lost.records = sorted(records, key=lambda r: r.index)
            lost.partial = RunRecords(lost.records, clock_origin, epoch_origin, start, time.perf_counter())
            raise
        finally:
            for f in finishing.values():
                f.cancel()
            await asyncio.gather(*finishing.values(), return_exceptions=True)
    finally:
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        if owns:
            ray.shutdown()
    return merge_shards(records, [parts[k] for k in range(n)], config, clock_origin, epoch_origin, coordinator_cpu)

"""The worker process's side of ``workers=N`` (:mod:`pytest_infmax.load.workers` is the
parent's): started as ``python -c "from pytest_infmax.load.worker_main import main; main()"``,
it reads its job from stdin, runs its shard with a :class:`~pytest_infmax.load.generator.LoadGenerator`
and writes its records to stdout as JSON lines.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

from pytest_infmax.load.generator import LoadGenerator, run_coroutine
from pytest_infmax.load.workers import (
    _API_KEY_ENV,
    _LINE_LIMIT,
    Shard,
    WorkerError,
    _decode,
    _encode,
    client_part,
    config_from_json,
)

_FLUSH_SECONDS = 0.25  # how often a worker sends the records it finished


async def _worker(stdin: asyncio.StreamReader, out: Callable[[dict[str, Any]], None]) -> None:
    job = _decode(await stdin.readline())
    config = config_from_json(job["config"])
    k, n = job["shard"]
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        if pending:
            out({"kind": "records", "records": list(pending)})
            pending.clear()

    run_task: asyncio.Future[Any] | None = None

    stopped = False  # the parent said stop (its run stops early: a dead server)

    async def watch_parent() -> None:
        nonlocal stopped
        while line := await stdin.readline():
            if _decode(line).get("kind") == "stop":
                stopped = True
        # stdin closes when the parent dies: stop rather than load a server for nobody
        if run_task is not None:
            run_task.cancel()

    async def wait_start() -> float:
        out({"kind": "ready"})
        line = await stdin.readline()
        if not line:
            raise WorkerError("the parent closed the pipe before the common start")
        asyncio.ensure_future(watch_parent())
        return float(_decode(line)["at"])

    async def flusher() -> None:
        while True:
            await asyncio.sleep(_FLUSH_SECONDS)
            flush()

    generator = LoadGenerator(job["base_url"], job["model"], os.environ.get(_API_KEY_ENV))
    ticking = asyncio.ensure_future(flusher())
    try:
        run_task = asyncio.ensure_future(
            generator.run(
                config,
                on_record=lambda r: pending.append(r.to_dict()),
                shard=Shard(k, n, wait_start),
                stop=lambda: stopped,
            )
        )
        run = await run_task
    finally:
        ticking.cancel()
    flush()
    out(
        {
            "kind": "done",
            "measured_start": run.measured_start,
            "measured_end": run.measured_end,
            "client": client_part(run),
        }
    )


def main() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader(limit=_LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        stdout = sys.stdout.buffer

        def out(msg: dict[str, Any]) -> None:
            stdout.write(_encode(msg) + b"\n")
            stdout.flush()

        try:
            await _worker(stdin, out)
        except Exception as exc:  # reported to the parent, which raises it as a WorkerError
            out({"kind": "error", "message": f"{type(exc).__name__}: {exc}"})
            raise SystemExit(1) from None

    run_coroutine(go())


if __name__ == "__main__":
    main()

"""Does the simulator's real-time engine keep its schedule under load?

Starts the simulator (``python -m pytest_infmax.sim`` with the flags after ``--``),
keeps ``--concurrency`` streaming completions in flight until ``--requests`` have
finished, then prints the engine's own step lateness (``GET /sim/stats`` ->
``lateness_ms``: actual emit time - scheduled deadline, per step), the client-side
median TPOT and the CPU the simulator process used.

    .venv/bin/python benchmarks/lateness.py --concurrency 256 -- --profile b200/gpt-oss-120b

Only aiohttp is needed (no numpy), so it runs wherever the simulator runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _stream(session: aiohttp.ClientSession, url: str, isl: int, osl: int) -> float | None:
    """One streamed completion; its TPOT in seconds: (last - first event) / (tokens - 1),
    tokens counted as words (the simulator emits one word per token)."""
    body = {"prompt": [7] * isl, "max_tokens": osl, "stream": True, "ignore_eos": True}
    first = last = 0.0
    tokens = 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                words = len((choices[0].get("text") or "").split())
                if words:
                    last = time.perf_counter()
                    first = first or last
                    tokens += words
    if tokens < 2:
        return None
    return (last - first) / (tokens - 1)


async def _drive(url: str, concurrency: int, requests: int, isl: int, osl: int) -> list[float]:
    remaining = requests
    tpots: list[float] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            tpot = await _stream(session, url, isl, osl)
            if tpot is not None:
                tpots.append(tpot)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return tpots


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sim_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, sim_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--requests", type=int, help="default: 2 x concurrency")
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    requests = args.requests or 2 * args.concurrency

    with tempfile.TemporaryDirectory() as workdir:
        port_file = Path(workdir) / "port"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "pytest_infmax.sim", "--port", "0", "--port-file", str(port_file), *sim_args]
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"simulator did not start: {server.stderr.read().decode() if server.stderr else ''}"
                    )
                time.sleep(0.02)
            url = f"http://127.0.0.1:{int(port_file.read_text())}"
            cpu_before, started, client_before = _cpu_seconds(server.pid), time.monotonic(), time.process_time()
            tpots = asyncio.run(_drive(url, args.concurrency, requests, args.isl, args.osl))
            wall = time.monotonic() - started
            server_cpu = (_cpu_seconds(server.pid) - cpu_before) / wall
            client_cpu = (time.process_time() - client_before) / wall
            with urllib.request.urlopen(f"{url}/sim/stats", timeout=10) as response:
                stats = json.load(response)
        finally:
            server.terminate()
            server.wait(timeout=10)
    result = {
        "concurrency": args.concurrency,
        "requests": requests,
        "isl": args.isl,
        "osl": args.osl,
        "sim_args": sim_args,
        "cpus": os.cpu_count(),
        "wall_s": round(wall, 2),
        "server_cpu": round(server_cpu, 3),
        "client_cpu": round(client_cpu, 3),
        "tpot_p50_ms": round(statistics.median(tpots) * 1e3, 3) if tpots else None,
        "lateness_ms": {k: round(v, 3) for k, v in stats["lateness_ms"].items()},
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

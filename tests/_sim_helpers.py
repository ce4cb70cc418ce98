"""Helpers shared by the simulator's tests (imported by name: tests/ is on sys.path)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest


async def poll_stats_until(
    session: aiohttp.ClientSession, base_url: str, predicate: Any, timeout: float = 10.0
) -> dict[str, Any]:
    """GET /sim/stats until ``predicate(stats)`` holds; fail with the last stats after ``timeout``."""
    deadline = time.monotonic() + timeout
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        async with session.get(f"{base_url}/sim/stats") as response:
            stats = await response.json()
        if predicate(stats):
            return stats
        await asyncio.sleep(0.005)
    pytest.fail(f"/sim/stats never matched; last: {stats}")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie or a dead process is not alive)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False

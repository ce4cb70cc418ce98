"""The test's side of tests/_hostile_server.py (imported by name: tests/ is on sys.path)."""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HOSTILE_SERVER = Path(__file__).with_name("_hostile_server.py")


@contextlib.contextmanager
def hostile_server_port() -> Iterator[int]:
    """Start tests/_hostile_server.py in a subprocess and yield its port; it exits when its stdin
    closes, so it cannot outlive the test process even when that one is killed."""
    proc = subprocess.Popen([sys.executable, str(HOSTILE_SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the hostile server did not print its port within 30 s"
        line = proc.stdout.readline().decode()
        assert line.startswith("PORT "), f"unexpected first line from the hostile server: {line!r}"
        yield int(line.split()[1])
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the server exits when its stdin closes
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class HostileClient:
    """The test's side of tests/_hostile_server.py: its address, its script, its log."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"

    def _call(self, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(self.base_url + path, data=body, method="POST" if body is not None else "GET")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def script(self, behaviours: dict[str, str]) -> None:
        """Replace the script (keys: a body's sha256, ``"*"`` for any POST, ``"GET /path"``); clears the log."""
        self._call("/script", json.dumps(behaviours).encode())

    def log(self) -> list[dict[str, Any]]:
        return self._call("/log")

"""The test's side of tests/_hostile_server.py (imported by name: tests/ is on sys.path)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any


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

"""Writing files atomically: readers see the old file or the new one, never half of one.

Results files, baselines and every report go through here, and every text through the
redactor: no secret (an API key, a URL's password, a bearer token) reaches a file from here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from pytest_infmax.redact import redact


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsynced, then renamed.

    The file gets the mode a plain ``open()`` would give (the umask's), not mkstemp's 0600:
    reports and baselines are meant to be read by others.
    """
    return write_stream_atomic(path, lambda f: f.write(data))


def write_stream_atomic(path: str | os.PathLike[str], fill: Callable[[BinaryIO], object]) -> Path:
    """:func:`write_bytes_atomic` of what ``fill`` writes to the file it is given: a large
    binary file (the stamps sidecar) goes to disk without a copy of it in memory first."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def _umask() -> int:
    """The process umask, read without setting it (os.umask sets it, racing other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`write_bytes_atomic`), secrets masked."""
    return write_bytes_atomic(path, redact(text).encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    return write_text_atomic(path, json.dumps(data, indent=1, allow_nan=False) + "\n")

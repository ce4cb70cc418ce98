"""Writing files atomically: readers see the old file or the new one, never half of one.

Results files and baselines both go through here, and through the redactor: no
secret (an API key, a URL's password, a bearer token) reaches a file from here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pytest_infmax.redact import redact


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        text = redact(json.dumps(data, indent=1, allow_nan=False))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target

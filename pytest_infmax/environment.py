"""Facts about where a run happened, stored with results files and baselines alike."""

from __future__ import annotations

import platform
import sys
import time
from typing import Any

from pytest_infmax import __version__


def environment() -> dict[str, Any]:
    """Facts about where the run happened; no secrets, no environment variables."""
    return {
        "plugin_version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

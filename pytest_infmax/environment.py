"""Facts about where a run happened, stored with results files and baselines alike."""

from __future__ import annotations

import platform
import sys
import time
from typing import Any

#: the package's version, in every results file and baseline (``pytest_infmax.__version__``)
__version__ = "0.1.0"


def environment() -> dict[str, Any]:
    """Facts about where the run happened; no secrets, no environment variables."""
    return {
        "plugin_version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

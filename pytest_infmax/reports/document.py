"""The JSON results file (``--infmax-json``): every result, with the servers and
the environment they ran in.

Reports read plain dicts (``LoadResult.summary()`` / ``to_dict()``), because
under pytest-xdist results arrive from workers as serialised data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pytest_infmax.environment import environment


def results_document(results: Sequence[dict[str, Any]], servers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``--infmax-json`` document."""
    return {
        "format": "pytest-infmax/1",
        "environment": environment(),
        "servers": list(servers),
        "results": list(results),
    }

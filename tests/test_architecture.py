"""The package's layout is its data path, and stays so: pyproject.toml's
``[tool.importlinter]`` contracts (each layer imports only the layers below it; no
import cycle between siblings at any depth) checked by import-linter's ``lint-imports``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTRACTS = ("Layers: the data path, top imports bottom only", "No import cycles between siblings, at any depth")


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint_imports), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    broken = [name for name in CONTRACTS if f"{name} BROKEN" in out]
    details = out[out.index("Broken contracts") :] if "Broken contracts" in out else out
    assert proc.returncode == 0 and not broken, f"broken import contracts: {broken or 'see below'}\n{details}"
    for name in CONTRACTS:  # every contract ran (a renamed one would pass unseen otherwise)
        assert f"{name} KEPT" in out, out

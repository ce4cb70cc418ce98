"""benchmarks/start_burst.py at a small scale, so the figures docs/load-generator.md quotes
keep a script that makes them: both ways of starting the first requests run against the
simulator, every request matched to the simulator's trace, and the planning table compares
the packed prompt with the tuple of ints it replaced."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

START_BURST = Path(__file__).resolve().parents[1] / "benchmarks" / "start_burst.py"


def test_both_ways_of_starting_run_and_every_request_is_matched_to_the_trace() -> None:
    command = [
        sys.executable, str(START_BURST), "--streams", "16", "--isl", "32", "--plan-isl", "64", "--runs", "1",
        "--", "--decode-step-ms", "1",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # it exits naming the shortfall when a request is not matched
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert any(row.startswith("| 64 |") for row in rows), done.stdout  # packed against tuple, ISL 64
    assert any(row.startswith("| in slices (now) |") for row in rows), done.stdout
    assert any(row.startswith("| in one block (before) |") for row in rows), done.stdout

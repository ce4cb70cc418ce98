"""benchmarks/lateness.py at a small scale, so its figures keep meaning what docs/calibration.md
says: the simulator's CPU per event divides the whole run's CPU (the warm-up round
included) by the whole run's events, not by the measured requests' alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LATENESS = Path(__file__).resolve().parents[1] / "benchmarks" / "lateness.py"


def test_every_request_of_the_run_counts_in_its_events(tmp_path: Path) -> None:
    out = tmp_path / "runs.json"
    # 32 streams: a warm-up round of 32 requests, then 64 measured ones, 8 tokens each
    command = [
        sys.executable, str(LATENESS), "--concurrency", "32", "--runs", "1", "--requests-per-stream", "2",
        "--isl", "16", "--osl", "8", "--sim-wire", "fast", "--front-end", "fast", "--no-pin",
        "--json", str(out), "--", "--decode-step-ms", "1",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())
    assert row["errors"] == 0 and row["requests"] == 96
    assert row["matched"] == 64  # the measured requests, matched to their traces
    assert row["events"] == 96 * 8  # one content event per token, warm-up included
    assert row["sim_cpu_us_per_event"] == row["sim_cpu_s"] / row["events"] * 1e6
    # the streams' first events' write lateness, read from this simulator's stats (NaN if absent)
    assert 0 <= row["first_write_lateness_p50_ms"] <= row["first_write_lateness_p99_ms"]

"""What a full garbage collection costs the client inside a pytest session, and with the
session's objects frozen as a measured phase holds them (``CollectorHold``,
pytest_infmax/collector.py).

Runs one pytest session (the plugin, its embedded simulator) whose test makes ``--runs``
small runs; after each it counts the objects the collector tracks and times ``gc.collect()``
twice: as the session stands, and with what it holds frozen (``gc.freeze()``, as the hold does
when a measured phase starts), the order alternating. A full collection stops the event loop:
every stream's stamps are as late as it lasts. Prints the median [min-max] of the runs.

    .venv/bin/python benchmarks/client_collector.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _figures import spread_cell  # noqa: E402

_TEST = textwrap.dedent(
    """
    import gc, json, os, time

    def _full_collection_ms():
        started = time.perf_counter()
        gc.collect()
        return (time.perf_counter() - started) * 1e3

    def test_collections(infmax):
        rows = []
        for i in range(int(os.environ["RUNS"])):
            infmax.run("1k1k-mini", concurrency=8)
            tracked = len(gc.get_objects())
            timed = {}
            for frozen in ((False, True) if i % 2 == 0 else (True, False)):
                if frozen:
                    gc.freeze()
                timed[frozen] = _full_collection_ms()
                if frozen:
                    gc.unfreeze()
            rows.append({"tracked": tracked, "as_is_ms": timed[False], "frozen_ms": timed[True]})
        with open(os.environ["OUT"], "w") as out:
            json.dump(rows, out)
    """
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs in the session, each followed by both timings")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        (Path(workdir) / "test_collections.py").write_text(_TEST)
        out = Path(workdir) / "rows.json"
        env = {**os.environ, "RUNS": str(args.runs), "OUT": str(out)}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_collections.py"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise SystemExit(f"the session failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
        rows = json.loads(out.read_text())
    print(f"A full collection in a pytest session with the plugin, after each of {args.runs} runs: median [min-max]")
    print("| objects tracked | as the session stands, ms | its objects frozen, ms |\n|--:|--:|--:|")
    print(
        f"| {statistics.median(r['tracked'] for r in rows):.0f} | {spread_cell([r['as_is_ms'] for r in rows], 1)} "
        f"| {spread_cell([r['frozen_ms'] for r in rows], 1)} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

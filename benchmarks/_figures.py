"""What the side-by-side benchmarks share: a figure as its median with the spread, variants
measured in interleaved rounds and their table, the simulator's flags handed on after ``--``,
and a simulator started for a live part."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def spread_cell(values: list[float], small_digits: int = 2) -> str:
    """``median [min-max]`` (one value: itself), ``small_digits`` decimals below 100, none above."""
    digits = small_digits if max(abs(v) for v in values) < 100 else 0
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def interleaved(runs: int, variants: dict[str, Callable[[], dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Each variant measured ``runs`` times, the variants in turn forwards and backwards from
    round to round (so that none always runs first, or after the same other one); each run
    is printed as it comes. The figures, per variant and per key."""
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    for round_index in range(runs):
        names = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in names:
            result = variants[name]()
            for key, value in result.items():
                figures[name].setdefault(key, []).append(value)
            print(
                f"  round {round_index + 1}, {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()),
                flush=True,
            )
    return figures


def print_spread_table(label: str, columns: dict[str, str], figures: dict[str, dict[str, list[float]]]) -> None:
    """A Markdown table: a row per variant, a ``spread_cell`` per column (``columns``: key -> heading)."""
    print(f"\n| {label} | " + " | ".join(columns.values()) + " |")
    print("|---|" + "--:|" * len(columns))
    for name, values in figures.items():
        print(f"| {name} | " + " | ".join(spread_cell(values[key], 1) for key in columns) + " |")


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that runs ``tree``'s code (another checkout's, for ``--against``): it
    first on PYTHONPATH. Run with ``cwd=tree`` too: ``python -m`` puts the working directory
    first on sys.path, before PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}


def split_simulator_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the benchmark's own arguments, the simulator's: those after ``--``)."""
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    return argv[:split], argv[split + 1 :]


@contextlib.contextmanager
def simulator(model: str, streams: int, sim_args: list[str], trace_capacity: int | None = None) -> Iterator[str]:
    """The embedded simulator in a process of its own, batching up to ``streams`` (at least 256);
    yields its base URL, and ends it."""
    with tempfile.TemporaryDirectory() as workdir:
        port_file = Path(workdir) / "port"
        command = [
            sys.executable, "-m", "pytest_infmax.sim", "--port", "0", "--port-file", str(port_file), "--model", model,
            "--max-num-seqs", str(max(256, streams)),
            *(["--trace-capacity", str(trace_capacity)] if trace_capacity else []), *sim_args,
        ]  # fmt: skip
        server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the simulator did not start")
                time.sleep(0.02)
            yield f"http://127.0.0.1:{int(port_file.read_text())}"
        finally:
            server.terminate()
            server.wait(timeout=30)

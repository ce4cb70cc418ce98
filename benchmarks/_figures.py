"""What the side-by-side benchmarks share: a figure as its median with the spread, and the
simulator's flags handed on after ``--``."""

from __future__ import annotations

import statistics


def spread_cell(values: list[float], small_digits: int = 2) -> str:
    """``median [min-max]`` (one value: itself), ``small_digits`` decimals below 100, none above."""
    digits = small_digits if max(abs(v) for v in values) < 100 else 0
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def split_simulator_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the benchmark's own arguments, the simulator's: those after ``--``)."""
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    return argv[:split], argv[split + 1 :]

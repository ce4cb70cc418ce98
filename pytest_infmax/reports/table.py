"""The terminal table: one row per result, from the one row builder
(:func:`pytest_infmax.reports.rows.result_row`), as in every other report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pytest_infmax.reports.rows import TURN_COLUMNS, range_text, turn_cells, verdict_text

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (key in summary, header, format)
    ("test", "test", "s"),
    ("scenario", "scenario", "s"),
    ("shape", "ISL/OSL", "s"),
    ("endpoint", "endpoint", "s"),
    ("load", "load", "s"),
    ("requests", "reqs", "d"),
    ("ttft_p50_ms", "TTFT p50 ms", ".1f"),
    ("ttft_p99_ms", "TTFT p99 ms", ".1f"),
    # the server's own (Prometheus), beside the client's: the bucket its p50 lies in, and its exact mean
    ("server_ttft_p50_range_ms", "srv TTFT p50 ms (bucket)", "range"),
    ("tpot_p50_ms", "TPOT p50 ms", ".2f"),
    ("interactivity", "tok/s/user", ".1f"),
    ("throughput_per_gpu", "tok/s/GPU", ".0f"),
    ("error_rate", "errors", "%"),
    ("usd_per_mtok", "$/Mtok", ".4f"),
    ("j_per_token", "J/token", ".4f"),
    ("verdict", "verdict", "verdict"),
)


# Left-aligned: words; the others are numbers
LEFT = frozenset({"test", "scenario", "endpoint", "load", "verdict"})

# Shown only where some row has them: a price, measured or modelled energy, server metrics.
OPTIONAL = frozenset({"usd_per_mtok", "j_per_token", "server_ttft_p50_range_ms"})


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if fmt == "verdict":
        return verdict_text(row)
    if fmt == "range":
        return range_text(value, row.get("server_ttft_mean_ms")) or "n/a"
    if value is None:
        return "n/a"
    if fmt == "%":
        return f"{value * 100:.1f}%"
    if fmt == "s":
        return str(value)
    return format(value, fmt)


def format_table(rows: Sequence[dict[str, Any]], max_test_width: int = 48) -> str:
    """A fixed-width table, one row per result."""
    if not rows:
        return ""
    # Columns that only some setups fill (cost needs a price) are left out when empty.
    columns = [c for c in COLUMNS if c[0] not in OPTIONAL or any(row.get(c[0]) is not None for row in rows)]
    keys = [key for key, _, _ in columns]
    cells = []
    for row in rows:
        line = [_cell(row, key, fmt) for key, _, fmt in columns]
        if len(line[0]) > max_test_width:  # keep the tail: it names the test
            line[0] = "…" + line[0][-(max_test_width - 1) :]
        if row.get("ok", row.get("requests")) != row.get("requests"):
            line[keys.index("requests")] = f"{row.get('ok')}/{row.get('requests')}"
        cells.append(line)
    headers = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    left = {keys.index(k) for k in LEFT}

    def fmt_line(items: Sequence[str]) -> str:
        return "  ".join(s.ljust(w) if i in left else s.rjust(w) for i, (s, w) in enumerate(zip(items, widths)))

    out = [fmt_line(headers), "  ".join("-" * w for w in widths)]
    out.extend(fmt_line(c) for c in cells)
    return "\n".join(out)


def turns_table(rows: Sequence[dict[str, Any]]) -> str:
    """Multi-turn runs, one line a turn (rows without turns are left out; empty if none has)."""
    lines = [[row["test"], row["load"], *turn_cells(turn)] for row in rows for turn in row.get("turns") or ()]
    if not lines:
        return ""
    headers = ["test", "load", *(h for _, h, _ in TURN_COLUMNS)]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]

    def fmt_line(items: Sequence[str]) -> str:
        return "  ".join(s.ljust(w) if i < 2 else s.rjust(w) for i, (s, w) in enumerate(zip(items, widths)))

    return "\n".join([fmt_line(headers), "  ".join("-" * w for w in widths), *map(fmt_line, lines)])


def capacity_lines(sweeps: Sequence[dict[str, Any]]) -> list[str]:
    """One line per ``infmax.capacity()`` (a sweep dict with ``capacity``): the test, the capacity
    it found and every load it measured."""
    out = []
    for s in sweeps:
        cap = s.get("capacity") or {}
        if cap:
            out.append(f"{s.get('name', '?')}: {cap.get('text', '?')}")
    return out

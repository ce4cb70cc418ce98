"""The Markdown summary (for ``$GITHUB_STEP_SUMMARY``, PR comments, or a file).

Everything here reads plain data: result dicts as ``LoadResult.to_dict()``
makes them (what arrives from pytest-xdist workers and what ``--infmax-json``
keeps), sweep dicts from :func:`sweep_to_dict`, and optional check dicts
(``{"name", "passed", "message"}``, e.g. baseline comparisons). Per-request
records are not needed.

Rows come from the one row builder, :func:`pytest_infmax.reports.rows.result_row`.
Optional keys a result dict may carry, which the summary shows when present:

* ``"cost"``: ``TokenCost.to_dict()`` (``usd_per_mtok_total`` and its ``price``
  with ``source``). Without it, ``markdown_summary(price=...)`` computes cost
  per million tokens from the result's throughput and GPU count.
* ``"energy"``: ``EnergyReport.to_dict()`` (:mod:`pytest_infmax.measure.energy`).
* ``"server_metrics"``: ``LoadResult.server_metrics_report()`` (:mod:`pytest_infmax.measure.servermetrics`):
  the server's own TTFT, queue time, running/waiting requests and KV-cache use, and
  the comparison of the client's TTFT with the server's.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_infmax.baselines.compare import COMPARISON_HEADERS, comparison_cells
from pytest_infmax.measure.cost import Price
from pytest_infmax.measure.registry import METRICS, SCALAR_METRICS
from pytest_infmax.reports.rows import (
    TURN_COLUMNS,
    VerdictTally,
    base_name,
    failed_verdicts,
    figure_cell,
    range_text,
    result_row,
    turn_cells,
    verdict_text,
)

# GitHub shows at most 1 MiB of step summary per step.
STEP_SUMMARY_LIMIT = 1024 * 1024

Result = Mapping[str, Any]


def sweep_to_dict(sweep: Any, name: str | None = None) -> dict[str, Any]:
    """A ``SweepResult`` as plain data for the reports (send it from workers like results).

    Keys: ``name``, ``scenario``, ``points`` (names of its results), ``frontier``
    (throughput per GPU against interactivity, ``Frontier.to_dict()``),
    ``verdicts`` (frontier SLA verdicts), ``price`` and ``costs`` (when priced),
    ``targets`` (the frontier SLA texts, drawn on the frontier plot), ``capacity`` (a capacity
    search's answer and probes, ``CapacityResult.capacity_summary()``; None for a plain sweep).
    """
    results = list(sweep.results)
    names = [r.name for r in results]
    costs = None
    if sweep.price is not None:
        costs = [c.to_dict() for c in sweep.costs()]
    return {
        "name": name or (base_name(names[0]) if names else "sweep"),
        "scenario": results[0].config.scenario.name if results else None,
        "points": names,
        "frontier": sweep.frontier("throughput_per_gpu", "interactivity").to_dict(),
        "verdicts": [v.to_dict() for v in sweep.verdicts],
        "targets": [v.objective.text for v in sweep.verdicts],
        "price": None if sweep.price is None else sweep.price.to_dict(),
        "costs": costs,
        # infmax.capacity(): the largest load that met its SLAs, and every load it measured
        "capacity": sweep.capacity_summary(),
    }


# -- formatting -------------------------------------------------------------------------


def fmt(value: Any, spec: str) -> str:
    """A cell: ``n/a`` for not measured, ``%`` for ratios, else ``format(value, spec)``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if spec == "%":
        return f"{value * 100:.1f}%"
    if spec == "$":
        return f"${value:.4f}" if value < 10 else f"${value:,.2f}"
    if spec == "g":
        return f"{value:.3g}"
    return format(value, spec)


def errors_cell(row: Mapping[str, Any]) -> str:
    text = fmt(row.get("error_rate"), "%")
    kinds = row.get("errors_by_kind") or {}
    if kinds:
        text += " (" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")"
    return text


def requests_cell(row: Mapping[str, Any]) -> str:
    reqs, ok = row.get("requests"), row.get("ok")
    if reqs is None:
        return "n/a"
    return str(reqs) if ok in (None, reqs) else f"{ok}/{reqs} ok"


_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


def md_text(text: Any) -> str:
    """Plain text safe inside a Markdown table cell (no pipes, no HTML tags, one line)."""
    s = str(text).replace("\\", "\\\\").replace("|", "\\|")
    s = _TAG_START.sub("&lt;", s)
    return " ".join(s.split())


def md_code(text: Any) -> str:
    """Inline code, safe inside a table cell."""
    s = " ".join(str(text).split()).replace("|", "\\|")
    ticks = "``" if "`" in s else "`"
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{ticks}{pad}{s}{pad}{ticks}"


def verdict_badge(row: Mapping[str, Any]) -> str:
    """``✅ PASS``, ``❌ FAIL (SLA, regression)`` or ``–``: the row's verdict with every reason."""
    mark = {"PASS": "✅ ", "FAIL": "❌ "}.get(str(row.get("verdict")), "")
    text = verdict_text(row)
    return "–" + text[1:] if text.startswith("-") else mark + text


def _comparison_table(comparison: Mapping[str, Any]) -> list[str]:
    """The full comparison: every gated metric, unsure rows included."""
    out = [
        "| " + " | ".join(COMPARISON_HEADERS) + " |",
        "|---|--:|--:|--:|---|--:|---|",
    ]
    for row in comparison.get("rows") or ():
        cells = comparison_cells(row)
        if row.get("verdict") == "regressed":
            cells[-1] = f"❌ {cells[-1]}"
        out.append("| " + " | ".join(md_text(c) for c in cells) + " |")
    skipped = comparison.get("skipped") or ()
    if skipped:
        out += ["", "Not compared: " + "; ".join(md_text(x) for x in skipped) + "."]
    advice = comparison.get("advice") or {}
    if advice.get("text"):
        out += ["", f"**Unsure**: {md_text(advice['text'])}."]
    return out


def _figures_table(rows: Sequence[Mapping[str, Any]], source: str) -> list[str]:
    """The registered figures of one source (``price``, ``energy``) for each row, with how they were got."""
    names = [n for n in SCALAR_METRICS if METRICS[n].source == source]
    out = [
        "| test | load | " + " | ".join(f"{n} ({METRICS[n].unit})" for n in names) + " | how |",
        "|---|---|" + "--:|" * len(names) + "---|",
    ]
    for row in rows:
        by_name = {f["metric"]: f for f in row.get("figures") or ()}
        cells = [figure_cell((by_name.get(n) or {}).get("value"), METRICS[n].unit) for n in names]
        how = next((f["provenance"] for f in by_name.values() if f["source"] == source), "")
        out.append(
            f"| {md_code(row['test'])} | {md_text(row['load'])} | "
            + " | ".join(md_text(c) for c in cells)
            + f" | {md_text(how)} |"
        )
    return out


# -- the summary ------------------------------------------------------------------------


def markdown_summary(
    results: Sequence[Result],
    sweeps: Sequence[Mapping[str, Any]] = (),
    checks: Sequence[Mapping[str, Any]] = (),
    *,
    price: Price | Mapping[str, Any] | None = None,
    title: str = "infmax results",
    artifacts: Sequence[str] = (),
    max_rows: int = 200,
) -> str:
    """GitHub-flavoured Markdown: headline, results table, failed SLAs, frontiers, energy.

    ``checks`` are further verdicts to list (``{"name", "passed", "message"}``),
    e.g. regressions against a baseline; ``artifacts`` names report files to
    point readers at (HTML report, PNGs).
    """
    rows = [result_row(r, price) for r in results]
    failed = failed_verdicts(results)
    tally = VerdictTally(rows, sweeps, checks)
    out = [f"## {md_text(title)}", ""]
    if not rows:
        out += ["No perf results were recorded.", ""]
    else:
        head = f"{len(rows)} result{'s' if len(rows) != 1 else ''}"
        if tally.failed:
            out.append(f"**❌ {head}, {tally.failed_text}.**")
        elif tally.checked:
            out.append(f"**✅ {head}, every check passed.**")
        else:
            out.append(f"**{head}, nothing checked.**")
        out.append("")
        out += _results_table(rows, max_rows)
    if failed:
        out += ["", "### Failed SLAs", ""]
        for r, v in failed:
            row = result_row(r)
            out.append(
                f"- {md_code(row['test'])} ({md_text(row['scenario'])} {md_text(row['load'])}): "
                f"{md_text(v.get('message') or v.get('objective'))}"
            )
    if sweeps:
        out += ["", "### Sweeps", ""]
        out += _sweeps_section(sweeps)
    if checks:
        out += ["", "### Baselines", ""]
        for c in checks:
            mark = "✅" if c.get("passed") else "❌"
            name = f"{md_code(c['name'])}: " if c.get("name") else ""
            out.append(f"- {mark} {name}{md_text(c.get('message', ''))}")
            comparison = c.get("comparison") or {}
            if comparison.get("rows"):
                out += ["", *_comparison_table(comparison), ""]
    priced = [r for r in rows if r["usd_per_mtok"] is not None]
    if priced:
        out += ["", "### Cost", ""]
        out += _figures_table(priced, "price")
    energy_rows = [r for r in rows if r["energy"]]
    if any(_measured(r) for r in energy_rows):
        out += ["", "### Energy", ""]
        out += _energy_table(energy_rows)
    elif energy_rows:  # say why once, rather than a column of "not measured"
        reasons = sorted({str(r["energy"].get("reason") or "unknown") for r in energy_rows})
        out += ["", "Energy: not measured (" + "; ".join(md_text(x) for x in reasons) + ")."]
    if any(r["turns"] for r in rows):
        out += ["", "### Turns", ""]
        out += _turns_table(rows)
    server_rows = [r for r in rows if r["server_available"]]
    if server_rows:
        out += ["", "### Server-side metrics", ""]
        out += _server_table(server_rows)
    unavailable = sorted({str(r["server_reason"]) for r in rows if r["server_metrics"] and not r["server_available"]})
    if unavailable:
        out += ["", "Server metrics: " + "; ".join(md_text(x) for x in unavailable) + "."]
    if artifacts:
        out += ["", "Reports: " + ", ".join(md_code(a) for a in artifacts)]
    return "\n".join(out).rstrip() + "\n"


def _results_table(rows: list[dict[str, Any]], max_rows: int) -> list[str]:
    with_cost = any(r["usd_per_mtok"] is not None for r in rows)
    with_energy = any(_measured(r) for r in rows)
    headers = [
        "test",
        "scenario",
        "ISL/OSL",
        "endpoint",
        "load",
        "requests",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "TPOT p50 (ms)",
        "interactivity (tok/s/user)",
        "throughput (tok/s/GPU)",
        "errors",
    ]
    align = ["---", "---", "--:", "---", "---", "--:", "--:", "--:", "--:", "--:", "--:", "--:"]
    sources: dict[str, int] = {}
    if with_cost:
        headers.append("$ / M tokens")
        align.append("--:")
    if with_energy:
        headers.append("J / token")
        align.append("--:")
    headers.append("verdict")
    align.append(":-:")
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    for row in rows[:max_rows]:
        cells = [
            md_code(row["test"]),
            md_text(row["scenario"]),
            md_text(row["shape"]),
            md_text(row["endpoint"]),
            md_text(row["load"]),
            requests_cell(row),
            fmt(row["ttft_p50_ms"], ".1f"),
            fmt(row["ttft_p99_ms"], ".1f"),
            fmt(row["tpot_p50_ms"], ".2f"),
            fmt(row["interactivity"], ".1f"),
            fmt(row["throughput_per_gpu"], ",.0f"),
            md_text(errors_cell(row)),
        ]
        if with_cost:
            cell = fmt(row["usd_per_mtok"], "$")
            if row["usd_per_mtok"] is not None and row["price_source"]:
                n = sources.setdefault(_source_text(row), len(sources) + 1)
                cell += f" [{n}]"
            cells.append(cell)
        if with_energy:
            e = row["energy"]
            cells.append("–" if not e else fmt(row["j_per_token"], ".3g") if e.get("measured") else "not measured")
        cells.append(verdict_badge(row))
        out.append("| " + " | ".join(cells) + " |")
    if len(rows) > max_rows:
        out.append("")
        out.append(f"… and {len(rows) - max_rows} more results (see the JSON or HTML report).")
    if sources:
        out.append("")
        out += [
            f"[{n}] price: {md_text(text)}" + ("  " if i < len(sources) - 1 else "")
            for i, (text, n) in enumerate(sources.items())
        ]
    return out


def _source_text(row: Mapping[str, Any]) -> str:
    per_hour = row.get("usd_per_gpu_hour")
    prefix = f"${per_hour:g}/GPU-hour, " if per_hour is not None else ""
    return prefix + str(row.get("price_source"))


def _sweeps_section(sweeps: Sequence[Mapping[str, Any]]) -> list[str]:
    out: list[str] = []
    for s in sweeps:
        front = (s.get("frontier") or {}).get("front") or []
        points = (s.get("frontier") or {}).get("points") or []
        labels = ", ".join(p.get("label", "?") for p in front) or "none"
        out.append(
            f"- {md_code(s.get('name', 'sweep'))} ({md_text(s.get('scenario') or '?')}): "
            f"{len(front)} of {len(points)} points on the throughput-per-GPU / interactivity "
            f"frontier ({md_text(labels)})"
        )
        for v in s.get("verdicts") or ():
            mark = "✅" if v.get("passed") else "❌"
            out.append(f"  - {mark} {md_text(v.get('message') or v.get('objective'))}")
        if s.get("capacity"):
            out.append(f"  - capacity: {md_text(s['capacity'].get('text', '?'))}")
    return out


def _measured(row: Mapping[str, Any]) -> bool:
    return bool(row.get("energy") and row["energy"].get("measured"))


SERVER_HEADERS = (
    "test",
    "load",
    "TTFT mean server / client (ms)",
    "TTFT p50 server (bucket) / client (ms)",
    "TTFT p99 server (bucket) / client (ms)",
    "queue time mean (ms)",
    "ITL mean (ms)",
    "running mean / max",
    "waiting mean / max",
    "KV cache mean / max",
)


def server_cells(row: Mapping[str, Any]) -> list[str]:
    """The server-side figures of a row as text, after ``test`` and ``load`` (see SERVER_HEADERS)."""

    def pair(a: Any, b: Any, spec: str) -> str:
        return f"{fmt(a, spec)} / {fmt(b, spec)}"

    return [
        pair(row["server_ttft_mean_ms"], row["client_ttft_mean_ms"], ".1f"),
        f"{range_text(row['server_ttft_p50_range_ms']) or 'n/a'} / {fmt(row['ttft_p50_ms'], '.1f')}",
        f"{range_text(row['server_ttft_p99_range_ms']) or 'n/a'} / {fmt(row['ttft_p99_ms'], '.1f')}",
        fmt(row["server_queue_mean_ms"], ".2f"),
        fmt(row["server_itl_mean_ms"], ".2f"),
        pair(row["server_running_mean"], row["server_running_max"], ".1f"),
        pair(row["server_waiting_mean"], row["server_waiting_max"], ".1f"),
        pair(row["server_kv_cache_mean"], row["server_kv_cache_max"], "%"),
    ]


SERVER_NOTE = (
    "From the server's own Prometheus metrics over the measured phase: means exact; a percentile is "
    "known only to lie inside one histogram bucket, so it is shown as that bucket; gauges sampled "
    "during the run."
)


def _turns_table(rows: list[dict[str, Any]]) -> list[str]:
    """Multi-turn runs, one line a turn."""
    out = [
        "| test | load | " + " | ".join(h for _, h, _ in TURN_COLUMNS) + " |",
        "|---|---|" + "--:|" * len(TURN_COLUMNS),
    ]
    for row in rows:
        for turn in row["turns"]:
            cells = [md_code(row["test"]), md_text(row["load"]), *(md_text(c) for c in turn_cells(turn))]
            out.append("| " + " | ".join(cells) + " |")
    return out


def _server_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| " + " | ".join(SERVER_HEADERS) + " |", "|---|---|" + "--:|" * (len(SERVER_HEADERS) - 2)]
    for row in rows:
        out.append(
            "| "
            + " | ".join([md_code(row["test"]), md_text(row["load"]), *(md_text(c) for c in server_cells(row))])
            + " |"
        )
    out += ["", md_text(SERVER_NOTE)]
    notes = [(row, row["client_overhead_note"]) for row in rows if row["client_overhead_note"]]
    if notes:
        out.append("")
        out += [f"- ⚠️ {md_code(row['test'])} ({md_text(row['load'])}): {md_text(note)}" for row, note in notes]
    return out


def _energy_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| test | load | energy | avg power (W) | J / input token | J / output token | "
        "tok/s per MW | energy cost | source |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        e = row["energy"]
        if not e.get("measured"):
            out.append(
                f"| {md_code(row['test'])} | {md_text(row['load'])} | not measured | | | | | | "
                f"{md_text(e.get('reason', ''))} |"
            )
            continue
        joules = fmt(e.get("energy_j"), ",.1f") + " J"
        cost = "n/a"
        if e.get("energy_usd") is not None:
            cost = f"${e['energy_usd']:.6f} (${e.get('usd_per_kwh')}/kWh"
            if e.get("energy_usd_per_mtok") is not None:
                cost += f", ${e['energy_usd_per_mtok']:.4f}/M tok"
            cost += ")"
        kind = "modelled: " if e.get("modelled") else ""
        source = e.get("source", "")
        if source.startswith("modelled: "):
            kind = ""
        out.append(
            f"| {md_code(row['test'])} | {md_text(row['load'])} | {joules} | {fmt(e.get('avg_power_w'), ',.0f')} | "
            f"{fmt(e.get('j_per_input_token'), '.3g')} | {fmt(e.get('j_per_output_token'), '.3g')} | "
            f"{fmt(e.get('tokens_per_s_per_mw'), ',.0f')} | {md_text(cost)} | {md_text(kind + source)} |"
        )
    return out


# -- GitHub ------------------------------------------------------------------------------


def write_github_step_summary(markdown: str, environ: Mapping[str, str] | None = None) -> Path | None:
    """Append ``markdown`` to ``$GITHUB_STEP_SUMMARY`` when it is set; return the file or None.

    GitHub gives each step its own file and shows what the step appended, so
    this appends (never truncates), separated from what is already there by a
    blank line. A summary over GitHub's 1 MiB limit is cut with a note.
    """
    env = os.environ if environ is None else environ
    target = env.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    path = Path(target)
    existing = path.stat().st_size if path.exists() else 0
    text = markdown if markdown.endswith("\n") else markdown + "\n"
    sep = "\n" if existing else ""
    room = STEP_SUMMARY_LIMIT - existing - len(sep.encode())
    data = text.encode("utf-8")
    if len(data) > room:
        note = "\n\n… summary cut at GitHub's 1 MiB step-summary limit; see the report artifacts.\n"
        keep = max(room - len(note.encode()), 0)
        data = data[:keep].decode("utf-8", errors="ignore").rsplit("\n", 1)[0].encode() + note.encode()
        if len(data) > max(room, 0):
            return path  # no room at all: leave the file as it is
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(sep.encode() + data)
    return path

"""One self-contained HTML report: tables, SLA verdicts, plots, energy, environment.

The file needs nothing but itself: plots are PNGs embedded as base64 ``data:``
URIs, styles are inline, there are no scripts, fonts or links to fetch, so it
opens from disk, from a CI artifact or an e-mail attachment, offline.

Input is plain data, as for :mod:`pytest_infmax.reports.markdown`: result dicts
(``LoadResult.to_dict()``; the latency and throughput plots need ``records``),
sweep dicts (``summary.sweep_to_dict``) and optional check dicts
(``{"name", "passed", "message"}``).

From a results file (``--infmax-json``)::

    infmax report results/perf.json            # -> results/perf.html
    infmax report results/perf.json --plots --markdown --step-summary
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_infmax.atomic import write_text_atomic
from pytest_infmax.baselines.compare import COMPARISON_HEADERS, comparison_cells
from pytest_infmax.environment import environment as this_environment
from pytest_infmax.measure.cost import Price
from pytest_infmax.reports import plots as plots_mod
from pytest_infmax.reports.markdown import (
    SERVER_HEADERS,
    SERVER_NOTE,
    errors_cell,
    fmt,
    requests_cell,
    server_cells,
)
from pytest_infmax.reports.rows import (
    TURN_COLUMNS,
    VerdictTally,
    failed_verdicts,
    figure_cell,
    load_label,
    result_row,
    turn_cells,
    verdict_text,
)

Result = Mapping[str, Any]

_CSS = """
:root { --fail: #b42318; --pass: #067647; --muted: #555; --line: #d0d5dd; --head: #f2f4f7; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #101828; margin: 0 auto; padding: 24px; max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.meta { color: var(--muted); margin-bottom: 12px; }
.banner { padding: 10px 14px; border-radius: 6px; font-weight: 600; margin: 12px 0; }
.banner.fail { background: #fef3f2; color: var(--fail); border: 1px solid #fecdca; }
.banner.pass { background: #ecfdf3; color: var(--pass); border: 1px solid #abefc6; }
.banner.none { background: var(--head); color: var(--muted); border: 1px solid var(--line); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; vertical-align: top; }
th { background: var(--head); text-align: left; }
table.results th { max-width: 9em; }
td.test { min-width: 24em; max-width: 40em; overflow-wrap: anywhere; }
td.nowrap { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.test, code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; font-size: 12px; }
.PASS, .met { color: var(--pass); font-weight: 600; } .FAIL, .missed { color: var(--fail); font-weight: 600; }
tr.failrow td { background: #fffbfa; }
figure { margin: 12px 0 24px; } figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 12px; }
.note { color: var(--muted); font-style: italic; }
details { margin: 4px 0; } summary { cursor: pointer; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[tuple[str, str]]],
    cls: str = "",
    row_classes: Sequence[str] | None = None,
) -> str:
    """rows: cells as (escaped html, td class)."""
    out = [f'<div class="scroll"><table class="{_e(cls)}">']
    if headers:
        out += ["<thead><tr>"] + [f"<th>{_e(h)}</th>" for h in headers] + ["</tr></thead>"]
    out.append("<tbody>")
    for i, row in enumerate(rows):
        rc = row_classes[i] if row_classes else ""
        out.append(f'<tr class="{rc}">' if rc else "<tr>")
        out += [f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>" for v, c in row]
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _n(value: Any, spec: str) -> tuple[str, str]:
    return _e(fmt(value, spec)), "num"


def render_html(
    results: Sequence[Result],
    sweeps: Sequence[Mapping[str, Any]] = (),
    checks: Sequence[Mapping[str, Any]] = (),
    *,
    environment: Mapping[str, Any] | None = None,
    servers: Sequence[Mapping[str, Any]] | None = None,
    price: Price | Mapping[str, Any] | None = None,
    plots: Any = "auto",
    targets: Sequence[str] = (),
    title: str = "infmax report",
) -> str:
    """The report as one HTML string.

    ``plots``: ``"auto"`` draws them (with a note instead when matplotlib is
    missing), ``None``/``False`` leaves them out, or a list of
    :class:`pytest_infmax.reports.plots.Plot` already rendered (render once, embed here
    and write the PNGs with ``plots.write_plots(..., plots=...)``).
    ``environment`` defaults to this machine's (:func:`pytest_infmax.environment.environment`);
    ``servers`` defaults to the distinct ``server`` entries of the results.
    """
    env = dict(environment) if environment is not None else this_environment()
    if servers is None:
        seen: dict[str, Any] = {}
        for r in results:
            if r.get("server") is not None:
                seen.setdefault(json.dumps(r["server"], sort_keys=True, default=str), r["server"])
        servers = list(seen.values())
    rows = [result_row(r, price) for r in results]
    failed = failed_verdicts(results)
    tally = VerdictTally(rows, sweeps, checks)
    failed_frontier, failed_checks = tally.failed_frontier, [c for c in checks if not c.get("passed")]

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Nothing may be fetched: no scripts, styles or images from anywhere but this file.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="meta">{len(rows)} result{"s" if len(rows) != 1 else ""}; written '
        f"{_e(env.get('written_at') or time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))}; "
        f"pytest-infmax {_e(env.get('plugin_version', ''))}</div>",
    ]
    if tally.failed:
        parts.append(f'<div class="banner fail" id="verdict">FAILED: {_e(tally.failed_text)}</div>')
    elif tally.checked:
        parts.append('<div class="banner pass" id="verdict">PASSED: every check passed</div>')
    else:
        parts.append('<div class="banner none" id="verdict">Nothing checked</div>')

    parts.append('<h2 id="results">Results</h2>')
    parts.append(_results_table(rows) if rows else '<p class="note">No perf results were recorded.</p>')

    if failed or failed_frontier or failed_checks:
        parts.append('<h2 id="failed">Failed checks</h2><ul class="failed">')
        for r, v in failed:
            row = result_row(r)
            parts.append(
                f"<li><code>{_e(row['test'])}</code> ({_e(row['scenario'])} {_e(row['load'])}): "
                f'<span class="missed">{_e(v.get("message") or v.get("objective"))}</span></li>'
            )
        for s, v in failed_frontier:
            parts.append(
                f"<li><code>{_e(s.get('name', 'sweep'))}</code>: "
                f'<span class="missed">{_e(v.get("message") or v.get("objective"))}</span></li>'
            )
        for c in failed_checks:
            parts.append(
                f"<li><code>{_e(c.get('name', 'check'))}</code>: "
                f'<span class="missed">{_e(c.get("message", ""))}</span></li>'
            )
        parts.append("</ul>")

    parts.append(_plots_section(results, sweeps, targets, plots))
    parts.append(_verdicts_section(results, checks))
    if sweeps:
        parts.append(_sweeps_section(results, sweeps))
    if any((r.get("energy") or {}).get("measured") for r in results):
        parts.append(_energy_section(results))
    if any(r["turns"] for r in rows):
        parts.append(_turns_section(rows))
    if any(r["server_available"] for r in rows):
        parts.append(_server_section(rows))
    parts.append(_details_section(results))
    parts.append(_environment_section(env, servers))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _results_table(rows: list[dict[str, Any]]) -> str:
    with_cost = any(r["usd_per_mtok"] is not None for r in rows)
    with_energy = any((r["energy"] or {}).get("measured") for r in rows)
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
    headers += ["$ / M tokens"] * with_cost + ["J / token"] * with_energy + ["verdict"]
    body, classes = [], []
    sources: dict[str, int] = {}
    for r in rows:
        cells = [
            (_e(r["test"]), "test"),
            (_e(r["scenario"]), "nowrap"),
            (_e(r["shape"]), "num"),
            (_e(r["endpoint"]), "nowrap"),
            (_e(r["load"]), "nowrap"),
            (_e(requests_cell(r)), "num"),
            _n(r["ttft_p50_ms"], ".1f"),
            _n(r["ttft_p99_ms"], ".1f"),
            _n(r["tpot_p50_ms"], ".2f"),
            _n(r["interactivity"], ".1f"),
            _n(r["throughput_per_gpu"], ",.0f"),
            (_e(errors_cell(r)), "num"),
        ]
        if with_cost:
            text = fmt(r["usd_per_mtok"], "$")
            if r["usd_per_mtok"] is not None and r["price_source"]:
                per_hour = r.get("usd_per_gpu_hour")
                src = (f"${per_hour:g}/GPU-hour, " if per_hour is not None else "") + str(r["price_source"])
                text += f" [{sources.setdefault(src, len(sources) + 1)}]"
            cells.append((_e(text), "num"))
        if with_energy:
            e = r["energy"]
            cells.append(
                (_e("–" if not e else fmt(r["j_per_token"], ".3g") if e.get("measured") else "not measured"), "num")
            )
        verdict = r["verdict"] if r["verdict"] in ("PASS", "FAIL") else ""
        cells.append((_e(verdict_text(r)) if verdict else "–", verdict))
        body.append(cells)
        classes.append("failrow" if verdict == "FAIL" else "")
    out = _table(headers, body, "results", classes)
    if sources:
        out += '<p class="note">' + "<br>".join(f"[{n}] price: {_e(s)}" for s, n in sources.items()) + "</p>"
    return out


def _plots_section(
    results: Sequence[Result], sweeps: Sequence[Mapping[str, Any]], targets: Sequence[str], plots: Any
) -> str:
    if plots is None or plots is False:
        return ""
    out = ['<h2 id="plots">Plots</h2>']
    if plots == "auto":
        try:
            plots = plots_mod.render_plots(results, sweeps, targets)
        except plots_mod.PlotsUnavailable as exc:
            out.append(f'<p class="note" id="plots-unavailable">Plots not included: {_e(exc)}</p>')
            return "\n".join(out)
    for p in plots:
        if p.png is None:
            out.append(f'<p class="note">{_e(p.title)}: not drawn ({_e(p.reason)})</p>')
            continue
        data = base64.b64encode(p.png).decode("ascii")
        out.append(
            f'<figure id="plot-{_e(p.name)}"><img class="plot" data-plot="{_e(p.name)}" '
            f'alt="{_e(p.alt or p.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(p.title)}</figcaption></figure>"
        )
    return "\n".join(out)


def _verdicts_section(results: Sequence[Result], checks: Sequence[Mapping[str, Any]]) -> str:
    body = []
    classes = []
    for r in results:
        for v in r.get("sla") or ():
            ok = bool(v.get("passed"))
            body.append(
                [
                    (_e(r.get("name", "?")), "test"),
                    (_e(load_label(r.get("load") or {})), ""),
                    (f"<code>{_e(v.get('objective', ''))}</code>", ""),
                    (_e("met" if ok else "missed"), "met" if ok else "missed"),
                    (_e(v.get("message", "")), ""),
                ]
            )
            classes.append("" if ok else "failrow")
    for c in checks:
        ok = bool(c.get("passed"))
        body.append(
            [
                (_e(c.get("name", "check")), "test"),
                ("", ""),
                ("", ""),
                (_e("met" if ok else "missed"), "met" if ok else "missed"),
                (_e(c.get("message", "")), ""),
            ]
        )
        classes.append("" if ok else "failrow")
    if not body:
        return '<h2 id="sla">SLA verdicts</h2><p class="note">No SLA was checked.</p>'
    out = '<h2 id="sla">SLA verdicts</h2>' + _table(
        ["test", "load", "objective", "verdict", "message"], body, "verdicts", classes
    )
    for c in checks:  # every gated test's whole comparison, unsure rows included
        comparison = c.get("comparison") or {}
        if not comparison.get("rows"):
            continue
        cells = [
            [(_e(x), "num" if i in (1, 2, 3, 5) else "") for i, x in enumerate(comparison_cells(row))]
            for row in comparison["rows"]
        ]
        row_classes = ["failrow" if row.get("verdict") == "regressed" else "" for row in comparison["rows"]]
        out += f"<h3><code>{_e(c.get('name', 'baseline'))}</code>: {_e(comparison.get('verdict', ''))}</h3>"
        out += _table(list(COMPARISON_HEADERS), cells, "comparison", row_classes)
        if comparison.get("skipped"):
            out += f'<p class="note">Not compared: {_e("; ".join(comparison["skipped"]))}.</p>'
        if (comparison.get("advice") or {}).get("text"):
            out += f'<p class="note">Unsure: {_e(comparison["advice"]["text"])}.</p>'
    return out


def _sweeps_section(results: Sequence[Result], sweeps: Sequence[Mapping[str, Any]]) -> str:
    by_name = {r.get("name"): r for r in results}
    out = ['<h2 id="sweeps">Sweeps and frontiers</h2>']
    for s in sweeps:
        fr = s.get("frontier") or {}
        on_front = {(p["x"], p["y"]) for p in fr.get("front") or ()}
        costs = s.get("costs") or []
        out.append(f"<h3><code>{_e(s.get('name', 'sweep'))}</code> ({_e(s.get('scenario') or '?')})</h3>")
        body = []
        for i, p in enumerate(fr.get("points") or ()):
            cost = costs[i].get("usd_per_mtok_total") if i < len(costs) else None
            body.append(
                [
                    (_e(p.get("label", "")), ""),
                    _n(p.get("x"), ".1f"),
                    _n(p.get("y"), ",.0f"),
                    (_e("yes" if (p.get("x"), p.get("y")) in on_front else "no"), ""),
                    _n(cost, "$"),
                ]
            )
        out.append(
            _table(
                ["load", "interactivity (tok/s/user)", "throughput (tok/s/GPU)", "on the frontier", "$ / M tokens"],
                body,
                "frontier",
            )
        )
        if s.get("price"):
            p = s["price"]
            out.append(f'<p class="note">price: ${_e(p.get("usd_per_gpu_hour"))}/GPU-hour, {_e(p.get("source"))}</p>')
        if s.get("verdicts"):
            out.append("<ul>")
            for v in s["verdicts"]:
                cls = "met" if v.get("passed") else "missed"
                out.append(f'<li class="{cls}">{_e(v.get("message") or v.get("objective"))}</li>')
            out.append("</ul>")
        if s.get("capacity"):
            out.append(f'<p class="capacity">capacity: {_e(s["capacity"].get("text", "?"))}</p>')
        missing = [n for n in s.get("points") or () if n not in by_name]
        if missing:
            out.append(f'<p class="note">{len(missing)} of its points are not in this report.</p>')
    return "\n".join(out)


def _energy_section(results: Sequence[Result]) -> str:
    body = []
    for r in results:
        e = r.get("energy")
        if not e:
            continue
        name = (_e(r.get("name", "?")), "test")
        load = (_e(load_label(r.get("load") or {})), "")
        if not e.get("measured"):
            body.append([name, load, ("not measured", "")] + [("", "")] * 7 + [(_e(e.get("reason", "")), "")])
            continue
        cost = "n/a"
        if e.get("energy_usd") is not None:
            cost = f"${e['energy_usd']:.6f} at ${e.get('usd_per_kwh')}/kWh"
            if e.get("energy_usd_per_mtok") is not None:
                cost += f" (${e['energy_usd_per_mtok']:.4f} / M tokens)"
        kind = "modelled" if e.get("modelled") else "measured"
        body.append(
            [
                name,
                load,
                (_e(kind), ""),
                _n(e.get("energy_j"), ",.1f"),
                _n(e.get("avg_power_w"), ",.0f"),
                _n(e.get("peak_power_w"), ",.0f"),
                _n(e.get("j_per_input_token"), ".3g"),
                _n(e.get("j_per_output_token"), ".3g"),
                _n(e.get("j_per_token"), ".3g"),
                _n(e.get("tokens_per_s_per_mw"), ",.0f"),
                (_e(f"{cost}; {e.get('source', '')}; {e.get('samples', 0)} samples, method {e.get('method', '')}"), ""),
            ]
        )
    headers = [
        "test",
        "load",
        "energy",
        "J",
        "avg W",
        "peak W",
        "J / input token",
        "J / output token",
        "J / token",
        "tok/s per MW",
        "cost, source",
    ]
    note = (
        '<p class="note">J per input (output) token: all energy of the measured phase over its input '
        "(output) tokens, as cost per input/output token is computed.</p>"
    )
    return '<h2 id="energy">Energy</h2>' + _table(headers, body, "energy") + note


def _turns_section(rows: list[dict[str, Any]]) -> str:
    body = [
        [(_e(row["test"]), "test"), (_e(row["load"]), ""), *((_e(c), "num") for c in turn_cells(turn))]
        for row in rows
        for turn in row["turns"]
    ]
    headers = ["test", "load", *(h for _, h, _ in TURN_COLUMNS)]
    note = (
        '<p class="note">Multi-turn sessions, one line a turn: TTFT over the turn\'s successful requests; '
        "a later turn's prompt holds the whole conversation so far, and its designed prefix reuse is "
        "the share of it that repeats an earlier prompt's start.</p>"
    )
    return '<h2 id="turns">Turns</h2>' + _table(headers, body, "turns") + note


def _server_section(rows: list[dict[str, Any]]) -> str:
    body = [
        [(_e(r["test"]), "test"), (_e(r["load"]), "nowrap"), *((_e(c), "num") for c in server_cells(r))]
        for r in rows
        if r["server_available"]
    ]
    notes = "".join(
        f"<li><code>{_e(r['test'])}</code> ({_e(r['load'])}): "
        f'<span class="missed">{_e(r["client_overhead_note"])}</span></li>'
        for r in rows
        if r["server_available"] and r["client_overhead_note"]
    )
    return (
        '<h2 id="server-metrics">Server-side metrics</h2>'
        + _table(list(SERVER_HEADERS), body, "server")
        + f'<p class="note">{_e(SERVER_NOTE)}</p>'
        + (f'<ul class="failed">{notes}</ul>' if notes else "")
    )


def _details_section(results: Sequence[Result]) -> str:
    out = ['<h2 id="details">Runs</h2>']
    for r in results:
        m = r.get("metrics") or {}
        load = dict(r.get("load") or {})
        info = {
            "load": load,
            "measured window (s)": r.get("measured_window_s"),
            "duration (s)": m.get("duration"),
            "tokens in / out": [m.get("total_input_tokens"), m.get("total_output_tokens")],
            "GPUs": r.get("num_gpus"),
            "server": (r.get("server") or {}).get("kind"),
        }
        lat = []
        for metric, scale, unit in (
            ("ttft", 1000, "ms"),
            ("tpot", 1000, "ms"),
            ("itl", 1000, "ms"),
            ("e2e", 1000, "ms"),
            ("interactivity", 1, "tok/s/user"),
        ):
            d = m.get(metric) or {}
            keys = ["mean", "median", "std", "min", "max"] + [k for k in d if k.startswith("p")]
            lat.append(
                [(_e(f"{metric} ({unit})"), ""), (_e(d.get("count", "")), "num")]
                + [_n(None if d.get(k) is None else d[k] * scale, ".3g") for k in keys]
            )
            header_keys = keys
        out.append(
            f"<details><summary><code>{_e(r.get('name', '?'))}</code> {_e(load_label(r.get('load') or {}))}</summary>"
        )
        out.append(_table(["metric", "count"] + header_keys, lat, "distributions"))
        figures = [
            [(_e(f["metric"]), ""), (_e(figure_cell(f["value"], f["unit"])), "num"), (_e(f["provenance"]), "")]
            for f in result_row(r)["figures"]
        ]
        out.append(_table(["figure", "value", "how it was obtained"], figures, "figures"))
        out.append(f"<pre>{_e(json.dumps(info, indent=1, default=str))}</pre></details>")
    return "\n".join(out)


def _environment_section(env: Mapping[str, Any], servers: Sequence[Mapping[str, Any]]) -> str:
    body = [[(f"<b>{_e(k)}</b>", ""), (_e(v), "")] for k, v in env.items()]
    out = ['<h2 id="environment">Environment</h2>', _table([], body, "environment")]
    for s in servers:
        cmd = s.get("command")
        shown = {k: v for k, v in s.items() if k != "command"}
        rows = [[(f"<b>{_e(k)}</b>", ""), (_e(v), "")] for k, v in shown.items()]
        if cmd:
            rows.append(
                [
                    ("<b>command</b>", ""),
                    (f"<code>{_e(' '.join(map(str, cmd)) if isinstance(cmd, list) else cmd)}</code>", ""),
                ]
            )
        out.append(f"<h3>server: {_e(s.get('kind', '?'))} {_e(s.get('model', ''))}</h3>")
        out.append(_table([], rows, "server"))
    return "\n".join(out)


def write_html_report(path: str | os.PathLike[str], results: Sequence[Result], **kwargs: Any) -> Path:
    """Write :func:`render_html`'s report to ``path`` atomically; return the path."""
    return write_text_atomic(path, render_html(results, **kwargs))

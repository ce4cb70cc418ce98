"""PNG plots of results (matplotlib, the ``plots`` extra: ``pip install 'pytest-infmax[plots]'``).

* ``frontier``: throughput per GPU against interactivity, every point, the
  Pareto frontier of each series (a sweep, or the results of one test), and SLA
  targets: frontier SLAs (``throughput_per_gpu@interactivity=50 > 10000 tok/s``)
  as marked points, scalar SLAs on either axis as threshold lines.
* ``latency``: TTFT and TPOT distributions, one empirical CDF per result.
* ``throughput``: output tokens per second over the measured phase, in 1 s bins,
  from each request's chunk arrival times.
* ``power``: GPU power over the measured phase, when a result carries energy.

Input is plain data: result dicts (``LoadResult.to_dict()``; the latency and
throughput plots need their per-request ``records``) and sweep dicts
(:func:`pytest_infmax.reports.markdown.sweep_to_dict`). Figures are drawn with
matplotlib's object API on the Agg canvas: no display, no pyplot global state,
safe in any thread. Without matplotlib every entry point raises
:class:`PlotsUnavailable`, whose message says what to install.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_infmax.atomic import write_bytes_atomic
from pytest_infmax.baselines.history import History
from pytest_infmax.measure.frontier import Point, pareto_front
from pytest_infmax.measure.registry import METRICS
from pytest_infmax.measure.sla import SLASyntaxError, parse
from pytest_infmax.reports.rows import base_name, load_label
from pytest_infmax.run.sweep import FrontierObjective

INSTALL_HINT = "pip install 'pytest-infmax[plots]'"

Result = Mapping[str, Any]


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed; ``str()`` says how to get it."""


def plots_available() -> tuple[bool, str]:
    """(True, "") when plots can be drawn, else (False, why not and what to install)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"plots need matplotlib, which cannot be imported here ({exc}); {INSTALL_HINT}"
    return True, ""


def _require() -> None:
    ok, why = plots_available()
    if not ok:
        raise PlotsUnavailable(why)


@dataclass(frozen=True)
class Plot:
    """One figure: ``png`` bytes, or ``None`` with ``reason`` when it could not be drawn."""

    name: str  # file stem suffix: frontier, latency, throughput, power
    title: str
    alt: str  # text alternative (HTML alt attribute)
    png: bytes | None = None
    reason: str = ""


# -- data from result dicts ------------------------------------------------------------------


def _measured(result: Result) -> list[Mapping[str, Any]]:
    return [r for r in result.get("records") or () if not r.get("warmup")]


def _ok(rec: Mapping[str, Any]) -> bool:
    return not rec.get("error_kind")


def ttfts_ms(result: Result) -> list[float]:
    out = []
    for r in _measured(result):
        if _ok(r) and r.get("first_token_time") is not None:
            out.append((r["first_token_time"] - r["send_time"]) * 1000.0)
    return out


def tpots_ms(result: Result) -> list[float]:
    out = []
    for r in _measured(result):
        n = r.get("output_tokens") or 0
        if _ok(r) and n >= 2 and r.get("first_token_time") is not None and r.get("end_time") is not None:
            out.append((r["end_time"] - r["first_token_time"]) / (n - 1) * 1000.0)
    return out


def throughput_series(result: Result, bin_s: float = 1.0) -> tuple[list[float], list[float]]:
    """(bin edges in seconds since the measured phase began, output tokens/s in each bin).

    Every content chunk of a measured, successful request counts its tokens in
    the bin it arrived in. ``len(edges) == len(rates) + 1``; the last bin ends
    where the measured phase ended and its rate is divided by that shorter
    width, so a short tail is not drawn as a drop.
    """
    window = result.get("measured_window_s") or None
    chunks: list[tuple[float, int]] = []
    for r in _measured(result):
        if not _ok(r):
            continue
        # lists (a JSON file's) or numpy arrays (the plugin's own records, to_dict(arrays=True))
        times = r.get("chunk_times")
        times = [] if times is None else times
        tokens = r.get("chunk_tokens")
        tokens = [] if tokens is None else tokens
        for i, t in enumerate(times):
            chunks.append((t, int(tokens[i]) if i < len(tokens) else 1))
    if not chunks:
        return [], []
    t0 = window[0] if window else min(t for t, _ in chunks)
    t1 = max(window[1] if window else t0, max(t for t, _ in chunks))
    span = max(t1 - t0, 1e-9)
    n_bins = max(1, math.ceil(span / bin_s - 1e-9))
    sums = [0] * n_bins
    for t, k in chunks:
        sums[min(max(int((t - t0) // bin_s), 0), n_bins - 1)] += k
    edges = [min(i * bin_s, span) for i in range(n_bins + 1)]
    rates = [s / (b - a) if b - a > 1e-6 else 0.0 for s, a, b in zip(sums, edges, edges[1:])]
    return edges, rates


def _short(result: Result) -> str:
    """The test function (without its path) and the load: ``test_sweep c=4``."""
    name = str(result.get("name", "?")).rsplit("::", 1)[-1]
    label = load_label(result.get("load") or {})
    name = re.sub(r"\[(c|rate)=[^\]]*\]$", "", name)
    text = f"{name} {label}"
    return text if len(text) <= 48 else "…" + text[-47:]


def _scenario(result: Result) -> str:
    return ((result.get("load") or {}).get("scenario") or {}).get("name", "?")


def _no_data_reason(results: Sequence[Result]) -> str:
    if not any(r.get("records") for r in results):
        return "no per-request records (the results were saved without them)"
    return "no successful measured request to draw"


# -- drawing helpers -----------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _legend(ax: Any, n: int) -> None:
    if n == 0:
        return
    ax.legend(fontsize=8 if n > 6 else 9, loc="best", ncol=1 if n <= 8 else 2, framealpha=0.85)


# -- the frontier plot ------------------------------------------------------------------------


def _point_xy(result: Result, y_metric: str = "throughput_per_gpu") -> tuple[float, float] | None:
    m = result.get("metrics") or {}
    x = (m.get("interactivity") or {}).get("p50")
    y = m.get(y_metric)
    if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
        return None
    return float(x), float(y)


def _series(results: Sequence[Result], sweeps: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[Result]]]:
    """scenario -> series name -> results. A sweep's points form one series; other results
    are grouped by test (a test's several runs form one series)."""
    by_name = {r.get("name"): r for r in results}
    claimed: set[str] = set()
    out: dict[str, dict[str, list[Result]]] = {}
    for s in sweeps:
        names = [n for n in s.get("points") or () if n in by_name]
        claimed.update(names)
        for n in names:
            r = by_name[n]
            out.setdefault(_scenario(r), {}).setdefault(str(s.get("name", "sweep")), []).append(r)
    for r in results:
        if r.get("name") in claimed:
            continue
        out.setdefault(_scenario(r), {}).setdefault(base_name(str(r.get("name", "?"))), []).append(r)
    return out


def _targets(
    results: Sequence[Result], sweeps: Sequence[Mapping[str, Any]], extra: Sequence[str], y: str = "throughput_per_gpu"
) -> tuple[list[tuple[float, float, str, bool | None]], list[tuple[str, float, str, bool | None]]]:
    """Frontier SLA points (x, y, text, passed) and scalar threshold lines (axis, value, text, passed)."""
    points: dict[str, tuple[float, float, str, bool | None]] = {}
    lines: dict[str, tuple[str, float, str, bool | None]] = {}

    def frontier_target(text: str, passed: bool | None) -> None:
        try:
            o = FrontierObjective.parse(text)
        except (SLASyntaxError, ValueError):
            return
        if o.x == "interactivity" and o.y == y:
            prev = points.get(text)
            points[text] = (
                o.at,
                o.limit,
                text,
                passed if prev is None or prev[3] is None else prev[3] and bool(passed),
            )

    for s in sweeps:
        for v in s.get("verdicts") or ():
            frontier_target(v.get("objective", ""), v.get("passed"))
        for t in s.get("targets") or ():
            if t not in points:
                frontier_target(t, None)
    for t in extra:
        if "@" in t:
            if t not in points:
                frontier_target(t, None)
            continue
        try:
            o = parse(t)
        except (SLASyntaxError, TypeError):
            continue
        if o.metric in ("interactivity", y):
            lines.setdefault(str(o), ("x" if o.metric == "interactivity" else "y", o.limit, str(o), None))
    for r in results:
        for v in r.get("sla") or ():
            try:
                o = parse(v.get("objective", ""))
            except (SLASyntaxError, TypeError):
                continue
            if o.metric == y or (o.metric == "interactivity" and o.stat in ("p50", "median")):
                key = str(o)
                prev = lines.get(key)
                passed = v.get("passed") if prev is None or prev[3] is None else prev[3] and v.get("passed")
                lines[key] = ("x" if o.metric == "interactivity" else "y", o.limit, key, passed)
    return list(points.values()), list(lines.values())


#: the frontiers drawn, as InferenceMAX draws them: y against interactivity -> (plot name, title)
FRONTIERS: dict[str, tuple[str, str]] = {
    "throughput_per_gpu": ("frontier", "Throughput per GPU vs interactivity"),
    "cost_per_mtok": ("cost-frontier", "Cost per million tokens vs interactivity"),
    "tokens_per_mw": ("power-frontier", "Tokens per second per MW vs interactivity"),
}


def frontier_plot(
    results: Sequence[Result],
    sweeps: Sequence[Mapping[str, Any]] = (),
    targets: Sequence[str] = (),
    y: str = "throughput_per_gpu",
) -> Plot:
    """``y`` (a registered run-level figure) against interactivity, one panel per scenario."""
    _require()
    info = METRICS[y]
    plot_name, title = FRONTIERS.get(y, (f"frontier-{y}", f"{y} vs interactivity"))
    groups = _series(results, sweeps)
    groups = {sc: {k: [r for r in rs if _point_xy(r, y)] for k, rs in series.items()} for sc, series in groups.items()}
    groups = {sc: {k: rs for k, rs in series.items() if rs} for sc, series in groups.items()}
    groups = {sc: series for sc, series in groups.items() if series}
    if not groups:
        return Plot(plot_name, title, "", reason=f"no result has both interactivity and {y}")
    n = len(groups)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = _figure(7.5 * cols if n > 1 else 9.0, 5.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    alt_parts = []
    for k, (scenario, series) in enumerate(sorted(groups.items())):
        ax = axes[k // cols][k % cols]
        # Each panel shows the SLAs of its own scenario's results and sweeps only.
        t_points, t_lines = _targets(
            [r for r in results if _scenario(r) == scenario],
            [sw for sw in sweeps if sw.get("scenario") in (None, scenario)],
            targets,
            y,
        )
        colors = _colors(len(series))
        for series_index, ((name, rs), color) in enumerate(zip(series.items(), colors)):
            pts = [
                Point(*xy, load_label(r.get("load") or {})) for r in rs if (xy := _point_xy(r, y)) is not None
            ]  # every result in rs has a point (filtered above)
            front = pareto_front(pts, True, info.higher_is_better)
            short = name.rsplit("::", 1)[-1]
            ax.scatter(
                [p.x for p in pts],
                [p.y for p in pts],
                color=color,
                alpha=0.45,
                s=36,
                zorder=3,
                label=f"{short}: all points" if len(series) == 1 else None,
            )
            ax.plot(
                [p.x for p in front],
                [p.y for p in front],
                "-o",
                color=color,
                lw=2,
                ms=7,
                zorder=4,
                label=f"{short}: frontier" if len(series) == 1 else short,
            )
            offset = (5, 5) if series_index % 2 == 0 else (5, -13)
            for p in pts:
                ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=offset, fontsize=8, color=color)
            alt_parts.append(f"{scenario} {short}: {len(pts)} points, {len(front)} on the frontier")
        for x, target_y, text, passed in t_points:
            color = {True: "tab:green", False: "tab:red", None: "black"}[passed]
            ax.axvline(x, color=color, ls=":", lw=1.2, zorder=2)
            ax.plot(
                [x],
                [target_y],
                marker="X",
                ms=12,
                color=color,
                mec="white",
                zorder=5,
                label=f"SLA {text}" + {True: " (met)", False: " (missed)", None: ""}[passed],
            )
        for axis, value, text, passed in t_lines:
            color = {True: "tab:green", False: "tab:red", None: "black"}[passed]
            (ax.axvline if axis == "x" else ax.axhline)(
                value,
                color=color,
                ls="--",
                lw=1.2,
                zorder=2,
                label=f"SLA {text}" + {True: " (met)", False: " (missed)", None: ""}[passed],
            )
        ax.set_title(f"{scenario}", fontsize=11)
        ax.set_xlabel("interactivity, median per request (tok/s/user)")
        ax.set_ylabel(f"{y.replace('_', ' ')} ({info.unit})")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        handles = ax.get_legend_handles_labels()[0]
        _legend(ax, len(handles))
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    better = "up and right" if info.higher_is_better else "down and right"
    fig.suptitle(f"{title} ({better} is better)", fontsize=12)
    alt = title + ". " + "; ".join(alt_parts)
    return Plot(plot_name, title, alt, _png(fig))


# -- latency distributions ---------------------------------------------------------------------


def latency_plot(results: Sequence[Result]) -> Plot:
    """Empirical CDFs of TTFT and TPOT, one line per result."""
    _require()
    title = "TTFT and TPOT distributions"
    data = [(r, ttfts_ms(r), tpots_ms(r)) for r in results]
    data = [d for d in data if d[1] or d[2]]
    if not data:
        return Plot("latency", title, "", reason=_no_data_reason(results))
    fig = _figure(12.0, 5.0)
    ax_ttft, ax_tpot = fig.subplots(1, 2)
    colors = _colors(len(data))
    for (r, ttft, tpot), color in zip(data, colors):
        for ax, values in ((ax_ttft, ttft), (ax_tpot, tpot)):
            if not values:
                continue
            xs = sorted(values)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", color=color, lw=1.8, label=f"{_short(r)} (n={len(xs)})")
    for ax, what in ((ax_ttft, "TTFT"), (ax_tpot, "TPOT")):
        ax.set_xlabel(f"{what} (ms)")
        ax.set_ylabel("share of requests ≤ x")
        ax.set_ylim(0, 1.02)
        for q in (0.5, 0.99):
            ax.axhline(q, color="0.5", ls=":", lw=1)
            ax.annotate(
                f"p{int(q * 100)}",
                (1.0, q),
                xycoords=("axes fraction", "data"),
                xytext=(-22, -11),
                textcoords="offset points",
                fontsize=8,
                color="0.35",
            )
        values = [v for _, a, b in data for v in (a if what == "TTFT" else b)]
        if values and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{what}, empirical CDF", fontsize=11)
    _legend(ax_tpot, len(data))
    fig.suptitle(title + " (left is better)", fontsize=12)
    alt = title + " for " + ", ".join(_short(r) for r, _, _ in data)
    return Plot("latency", title, alt, _png(fig))


# -- throughput over time ---------------------------------------------------------------------


def throughput_plot(results: Sequence[Result], bin_s: float = 1.0) -> Plot:
    """Output tokens per second in ``bin_s`` bins across each result's measured phase."""
    _require()
    title = "Output throughput over time"
    data = [(r, *throughput_series(r, bin_s)) for r in results]
    data = [d for d in data if d[1]]
    if not data:
        return Plot("throughput", title, "", reason=_no_data_reason(results))
    fig = _figure(11.0, 4.8)
    ax = fig.subplots()
    colors = _colors(len(data))
    for (r, edges, rates), color in zip(data, colors):
        ax.stairs(rates, edges, color=color, lw=1.8, label=_short(r), baseline=None)
    ax.set_xlabel(f"seconds since the measured phase began ({bin_s:g} s bins)")
    ax.set_ylabel("output tokens / s (all GPUs)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    _legend(ax, len(data))
    fig.suptitle(title, fontsize=12)
    alt = title + " for " + ", ".join(_short(r) for r, _, _ in data)
    return Plot("throughput", title, alt, _png(fig))


# -- power over time ----------------------------------------------------------------------------


def power_plot(results: Sequence[Result]) -> Plot | None:
    """GPU power across each measured phase; None when no result carries a measured energy timeline."""
    data = [
        (r, r["energy"])
        for r in results
        if (r.get("energy") or {}).get("measured") and (r.get("energy") or {}).get("timeline")
    ]
    if not data:
        return None
    _require()
    title = "GPU power over time"
    fig = _figure(11.0, 4.4)
    ax = fig.subplots()
    for (r, e), color in zip(data, _colors(len(data))):
        ts = [p[0] for p in e["timeline"]]
        ws = [p[1] for p in e["timeline"]]
        kind = " (modelled)" if e.get("modelled") else ""
        ax.plot(ts, ws, color=color, lw=1.6, label=f"{_short(r)}: {e.get('avg_power_w', 0):.0f} W avg{kind}")
    ax.set_xlabel("seconds since the measured phase began")
    ax.set_ylabel("power, all sampled GPUs (W)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    _legend(ax, len(data))
    fig.suptitle(title, fontsize=12)
    return Plot("power", title, title + " for " + ", ".join(_short(r) for r, _ in data), _png(fig))


# -- all of them ------------------------------------------------------------------------------


def render_plots(
    results: Sequence[Result], sweeps: Sequence[Mapping[str, Any]] = (), targets: Sequence[str] = (), bin_s: float = 1.0
) -> list[Plot]:
    """Every plot the data allows (a plot that cannot be drawn comes back with its ``reason``)."""
    _require()
    plots = [frontier_plot(results, sweeps, targets), latency_plot(results), throughput_plot(results, bin_s)]
    # cost and energy frontiers where the results were priced and their energy measured
    plots += [
        frontier_plot(results, sweeps, targets, y)
        for y in FRONTIERS
        if y != "throughput_per_gpu" and any(_point_xy(r, y) for r in results)
    ]
    power = power_plot(results)
    if power is not None:
        plots.append(power)
    return plots


def write_plots(
    results: Sequence[Result],
    out_dir: str | Path,
    *,
    prefix: str = "infmax",
    sweeps: Sequence[Mapping[str, Any]] = (),
    targets: Sequence[str] = (),
    bin_s: float = 1.0,
    plots: Sequence[Plot] | None = None,
) -> list[Path]:
    """Write ``{prefix}-frontier.png`` etc. into ``out_dir`` (next to the JSON results); return the paths."""
    if plots is None:
        plots = render_plots(results, sweeps, targets, bin_s)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in plots:
        if p.png is None:
            continue
        paths.append(write_bytes_atomic(out / f"{prefix}-{p.name}.png", p.png))
    return paths


# -- a baseline set's history -------------------------------------------------------------------


def history_plot(history: History) -> Plot:
    """One result key's trend over its saved runs: a point a run, the level between change
    points as a step line, each change point marked with its commit (``infmax history``)."""
    _require()
    gate = history.gate
    scale = 1000.0 if gate.unit == "ms" else 1.0
    title = f"{history.key}: {gate.label} history"
    if not history.points:
        return Plot("history", title, "", reason=f"no saved run has {gate.label}")
    fig = _figure(10.0, 4.5)
    ax = fig.subplots()
    xs = list(range(len(history.points)))
    ys = [p.value * scale for p in history.points]
    ax.plot(xs, ys, "o", color="C0", ms=4, label="saved runs")
    bounds = [0, *(cp.index for cp in history.change_points), len(xs)]
    for lo, hi in zip(bounds, bounds[1:]):
        level = sum(ys[lo:hi]) / max(hi - lo, 1)
        ax.hlines(level, lo - 0.4, hi - 0.6, color="C1", lw=2)
    for cp in history.change_points:
        point = history.points[cp.index]
        ax.axvline(cp.index - 0.5, color="C3", ls="--", lw=1)
        ax.annotate(
            f"{point.short_commit[:8]} {cp.change * 100:+.1f}%",
            (cp.index - 0.5, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
            color="C3",
        )
    ax.set_xlabel("saved run (oldest first)")
    ax.set_ylabel(f"{gate.label} ({gate.unit})" if gate.unit else gate.label)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=11)
    alt = f"{title}: {len(xs)} runs, {len(history.change_points)} change points"
    return Plot("history", title, alt, _png(fig))


def write_history_plot(history: History, path: str | Path) -> Path:
    """Draw :func:`history_plot` to ``path`` (PNG, written atomically); PlotsUnavailable without
    matplotlib, ValueError where there is nothing to draw."""
    plot = history_plot(history)
    if plot.png is None:
        raise ValueError(plot.reason)
    path = Path(path)
    write_bytes_atomic(path, plot.png)
    return path

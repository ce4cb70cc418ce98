"""The one row builder: what every report shows for a result, and its verdict told once.

Every report (the terminal table, ``infmax table``, JUnit properties, Markdown, HTML)
reads its rows from :func:`result_row`, and every row reads a plain result dict as
``LoadResult.to_dict()`` makes it: what pytest-xdist workers send and what
``--infmax-json`` keeps. So a results file and the session that wrote it show the
same cells.

A result dict may carry ``"outcome"`` (the plugin adds it once the test has run):
``{"baseline": <the gate's check for this result, or None>, "client_bound_fails":
<--infmax-client-bound fail>, "test_failed": <the test failed>, "test_failure": <why, where its
exception names it, e.g. "frontier SLA">, "max_error_rate":
<--infmax-max-error-rate, None: off>}``. The row's
``verdict`` names every reason the test failed: ``SLA`` (an objective missed),
``regression`` (against its baseline), ``errors`` (more failed requests than
``--infmax-max-error-rate`` allows, where the test set no ``error_rate`` SLA), ``client-bound`` (the load generator fell
behind, under ``--infmax-client-bound fail``), ``interrupted`` (Ctrl-C stopped the run),
``unfinished`` (the run ended but its test never did: pytest or its worker was killed; a
result rebuilt from the journal, reports/journal.py), ``worker lost`` (a Ray load worker or
its node was lost mid-run: the records up to then are the result), ``frontier SLA`` (a sweep's frontier
SLA failed the test) and ``test`` (the test failed for a
reason of its own, e.g. an assert). A load that ``infmax.capacity()`` measured
(``"capacity_probe"``) says ``met`` or ``missed`` its SLAs instead: missing them above the
capacity is what the search looks for, not a failure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_infmax.measure.cost import Price, cost_per_million_tokens
from pytest_infmax.measure.registry import METRICS, SCALAR_METRICS
from pytest_infmax.measure.sla import format_quantity
from pytest_infmax.measure.verdicts import excess_errors

Result = Mapping[str, Any]


def load_label(load: Mapping[str, Any]) -> str:
    """``c=8``, ``rate=4/s`` or ``rate=inf/s``, as the terminal table writes a load; multi-turn
    sessions ``c=4 4-turn``, a trace replay ``trace x4`` (its speed-up)."""
    workload = load.get("workload") or {}
    if workload.get("kind") == "trace":
        return f"trace x{workload.get('speedup', 1):g}"
    if load.get("concurrency") is not None:
        turns = f" {workload['turns']}-turn" if workload.get("kind") == "sessions" else ""
        return f"c={load['concurrency']}{turns}"
    if load.get("rate_infinite"):
        return "rate=inf/s"
    rate = load.get("rate")
    return f"rate={rate:g}/s" if isinstance(rate, (int, float)) else "?"


def base_name(name: str) -> str:
    """``tests/x.py::test_sweep[c=4]`` -> ``tests/x.py::test_sweep`` (a sweep's points share it)."""
    return re.sub(r"\[(c|rate)=[^\]]*\]$", "", name)


def price_of(price: Price | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if price is None:
        return None
    return price.to_dict() if isinstance(price, Price) else dict(price)


def _stat(metrics: Mapping[str, Any], metric: str, key: str, scale: float = 1.0) -> float | None:
    value = (metrics.get(metric) or {}).get(key)
    return None if value is None else value * scale


def verdict(result: Result) -> tuple[str, list[str]]:
    """("PASS" | "FAIL" | "-", the reasons it failed): every check the result went through."""
    outcome = result.get("outcome") or {}
    baseline = outcome.get("baseline") or None
    client = result.get("client") or {}
    reasons = []
    # a load infmax.capacity() measured: above the capacity it misses the SLAs by design
    probe = bool(result.get("capacity_probe"))
    if result.get("passed") is False and not probe:
        reasons.append("SLA")
    if baseline is not None and not baseline.get("passed", True):
        reasons.append("regression" if baseline.get("verdict") in ("regressed", None) else str(baseline["verdict"]))
    # An interrupted run's requests in flight are cancelled by us, not failed by the server: "interrupted" says it
    interrupted = bool(result.get("interrupted"))
    died = bool(result.get("server_died"))  # the server died: its failed requests are that, not more
    if died:
        reasons.append("server died")
    lost = bool(result.get("worker_lost"))  # a load worker was lost: the run stopped there
    if lost:
        reasons.append("worker lost")
    if (
        not interrupted
        and not died
        and not lost
        and excess_errors(result.get("metrics") or {}, result.get("sla") or (), outcome.get("max_error_rate"))
    ):
        reasons.append("errors")
    if client.get("client_bound") and outcome.get("client_bound_fails"):
        reasons.append("client-bound")
    if interrupted:  # Ctrl-C stopped the run: its figures are of a part of it
        reasons.append("interrupted")
    if result.get("unfinished"):  # pytest was killed (or its worker crashed) before the test ended
        reasons.append("unfinished")
    if outcome.get("test_failed") and not reasons:
        reasons.append(str(outcome.get("test_failure") or "test"))
    if probe and not reasons and result.get("passed") is not None:
        return ("met" if result["passed"] else "missed"), reasons
    checked = result.get("passed") is not None or (baseline is not None and baseline.get("verdict") is not None)
    return ("FAIL" if reasons else "PASS" if checked else "-"), reasons


def verdict_text(row: Mapping[str, Any]) -> str:
    """``PASS``, ``FAIL (SLA, regression)`` or ``-``; ``*``: the client fell behind (latencies are upper bounds)."""
    text = str(row.get("verdict", "-"))
    if row.get("reasons"):
        text += f" ({', '.join(row['reasons'])})"
    return text + ("*" if row.get("client_bound") else "")


def figures(result: Result) -> list[dict[str, Any]]:
    """Every registered run-level figure of a result: name, value (canonical units), unit, and
    how it was obtained, or why it was not measured."""
    m = result.get("metrics") or {}
    provenance = m.get("provenance") or {}
    unmeasured = m.get("unmeasured") or {}
    out = []
    for name in SCALAR_METRICS:
        info = METRICS[name]
        value = m.get(name)
        if value is None and info.source == "requests" and name not in m:
            continue  # an older results file
        how = provenance.get(info.source) if value is not None else unmeasured.get(name, unmeasured.get(info.source))
        out.append(
            {
                "metric": name,
                "value": value,
                "unit": info.unit,
                "source": info.source,
                "provenance": how or ("measured" if value is not None else "not measured"),
            }
        )
    return out


def result_row(result: Result, price: Price | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One table row: the figures every report shows for a result (None: not measured).

    ``price`` costs a result that carries no cost of its own (an older results file).
    """
    m = result.get("metrics") or {}
    load = result.get("load") or {}
    scen = load.get("scenario") or {}
    scenario = scen.get("name", "?")
    if (load.get("workload") or {}).get("kind") == "trace":  # a trace's own lengths, not the scenario's
        scenario = Path(load["workload"].get("source") or "trace").name
    cost = result.get("cost") or None
    usd, source, per_hour = m.get("cost_per_mtok"), None, None
    if cost and cost.get("usd_per_mtok_total") is not None:
        usd = cost["usd_per_mtok_total"]
        p = cost.get("price") or {}
        source, per_hour = p.get("source"), p.get("usd_per_gpu_hour")
    elif price is not None:
        p = price_of(price) or {}
        per_hour = p.get("usd_per_gpu_hour")
        gpus = result.get("num_gpus") or m.get("num_gpus") or 1
        tps = m.get("throughput")
        if per_hour and tps:
            usd = cost_per_million_tokens(per_hour, gpus, tps)
            source = p.get("source")
    energy = result.get("energy") or None
    passed = result.get("passed")
    verdict_cell, reasons = verdict(result)
    client_bound = bool((result.get("client") or {}).get("client_bound"))
    repeats = (result.get("repeats") or {}).get("count")
    return {
        "test": result.get("name", "?"),
        "scenario": scenario,
        # the workload's shape: tokens in/out per request (lengths uniform in [range_ratio·L, L]) and the API
        "isl": scen.get("isl"),
        "osl": scen.get("osl"),
        "range_ratio": scen.get("range_ratio"),
        "shape": "trace"
        if scenario != scen.get("name", "?")  # a trace: its own lengths, line by line
        else f"{scen['isl']}/{scen['osl']}"
        if scen.get("isl") and scen.get("osl")
        else "?",
        "endpoint": scen.get("endpoint", "?"),
        "load": load_label(load) + (f" x{repeats}" if repeats else ""),
        "requests": m.get("num_requests"),
        "ok": m.get("num_ok"),
        "errors_by_kind": dict(m.get("errors_by_kind") or {}),
        "ttft_p50_ms": _stat(m, "ttft", "p50", 1000.0),
        "ttft_p99_ms": _stat(m, "ttft", "p99", 1000.0),
        "tpot_p50_ms": _stat(m, "tpot", "p50", 1000.0),
        "interactivity": _stat(m, "interactivity", "p50"),
        "throughput_per_gpu": m.get("throughput_per_gpu"),
        "error_rate": m.get("error_rate"),
        "usd_per_mtok": usd,
        "usd_per_gpu_hour": per_hour,
        "price_source": source,
        "energy": energy,
        "j_per_token": energy.get("j_per_token") if energy and energy.get("measured") else None,
        "energy_modelled": bool(energy and energy.get("measured") and energy.get("modelled")),
        **server_figures(result),
        "client_bound": client_bound,
        "passed": passed,
        # the SLA's own verdict (JUnit's infmax_sla), and the test's, with every reason it failed
        "sla": {None: "-", True: "PASS", False: "FAIL"}.get(passed, "-"),
        "verdict": verdict_cell,
        "reasons": reasons,
        "baseline": (result.get("outcome") or {}).get("baseline"),
        "figures": figures(result),
        "turns": turn_rows(m),
    }


# Multi-turn sessions: each turn's figures (metrics.turns), one line a turn in every report
# (terminal, Markdown, HTML): (key in turn_rows' dicts, header, format).
TURN_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("turn", "turn", "d"),
    ("requests", "reqs", "d"),
    ("ttft_p50_ms", "TTFT p50 ms", ".1f"),
    ("ttft_p99_ms", "TTFT p99 ms", ".1f"),
    ("e2e_p50_ms", "E2E p50 ms", ".1f"),
    ("mean_prompt_tokens", "mean prompt tokens", ".0f"),
    ("designed_prefix_reuse", "designed prefix reuse", "%"),
)


def turn_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A multi-turn run's figures per turn (empty for any other run)."""
    return [
        {
            "turn": t.get("turn"),
            "requests": t.get("num_requests"),
            "ok": t.get("num_ok"),
            "ttft_p50_ms": _stat(t, "ttft", "p50", 1000.0),
            "ttft_p99_ms": _stat(t, "ttft", "p99", 1000.0),
            "e2e_p50_ms": _stat(t, "e2e", "p50", 1000.0),
            "mean_prompt_tokens": t.get("mean_prompt_tokens"),
            "designed_prefix_reuse": t.get("designed_prefix_reuse"),
        }
        for t in metrics.get("turns") or ()
    ]


def turn_cells(turn: Mapping[str, Any]) -> list[str]:
    """One turn's cells, in TURN_COLUMNS' order, as text ("n/a": not measured)."""
    cells = []
    for key, _, spec in TURN_COLUMNS:
        value = turn.get(key)
        if key == "requests" and turn.get("ok") != value:
            cells.append(f"{turn.get('ok')}/{value}")
        elif value is None:
            cells.append("n/a")
        elif spec == "%":
            cells.append(f"{value * 100:.0f}%")
        else:
            cells.append(format(value, spec))
    return cells


def server_figures(result: Result) -> dict[str, Any]:
    """The server's own figures for a result (``server_metrics``), beside the client's; None where
    the server's metrics were not scraped or lack the figure. Its percentiles come from histogram
    buckets, so they are ranges (``*_range_ms``: the bucket they lie in); its means are exact."""
    sm = result.get("server_metrics") or {}
    available = bool(sm.get("available"))
    hist = sm.get("histograms") or {} if available else {}
    gauges = sm.get("gauges") or {} if available else {}
    comparison = sm.get("comparison") or {}

    def h(role: str, key: str) -> Any:
        return (hist.get(role) or {}).get(key)

    def g(role: str, key: str) -> float | None:
        return (gauges.get(role) or {}).get(key)

    m = result.get("metrics") or {}
    itl = "itl" if h("itl", "mean_ms") is not None else "tpot"
    return {
        "server_metrics": sm or None,
        "server_available": available,
        "server_reason": None if available else sm.get("reason"),
        "server_ttft_mean_ms": h("ttft", "mean_ms"),
        "server_ttft_p50_range_ms": h("ttft", "p50_range_ms"),
        "server_ttft_p99_range_ms": h("ttft", "p99_range_ms"),
        "server_ttft_count": h("ttft", "count"),
        "client_ttft_mean_ms": _stat(m, "ttft", "mean", 1000.0),
        "server_queue_mean_ms": h("queue_time", "mean_ms"),
        "server_itl_mean_ms": h(itl, "mean_ms"),
        "server_running_mean": g("running", "mean"),
        "server_running_max": g("running", "max"),
        "server_waiting_mean": g("waiting", "mean"),
        "server_waiting_max": g("waiting", "max"),
        "server_kv_cache_mean": g("kv_cache_usage", "mean"),
        "server_kv_cache_max": g("kv_cache_usage", "max"),
        "client_overhead_note": comparison.get("note"),
    }


def range_text(span: Sequence[float | None] | None, mean: float | None = None, spec: str = ".1f") -> str | None:
    """A server percentile as the bucket it lies in, with the exact mean: ``10-20 (mean 13.0)``."""
    if not span or span[0] is None or span[1] is None:
        return None if mean is None else f"mean {format(mean, spec)}"
    lo, hi = span
    text = format(lo, spec) if lo == hi else f"{format(lo, spec)}-{format(hi, spec)}"
    return text + ("" if mean is None else f" (mean {format(mean, spec)})")


def failed_verdicts(results: Sequence[Result]) -> list[tuple[Result, Mapping[str, Any]]]:
    """(result, verdict) for every failed SLA verdict, in result order; a capacity search's loads
    (``capacity_probe``) missed theirs by design, and its summary says which."""
    return [(r, v) for r in results if not r.get("capacity_probe") for v in (r.get("sla") or ()) if not v.get("passed")]


class VerdictTally:
    """What failed in a set of rows, sweeps and checks, counted once each: a failed test's row
    (every reason in it), a missed frontier SLA, and a baseline check no row carries."""

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        sweeps: Sequence[Mapping[str, Any]] = (),
        checks: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        carried = {str((row.get("baseline") or {}).get("name")) for row in rows if row.get("baseline")}
        self.failed_rows = [row for row in rows if row.get("verdict") == "FAIL"]
        self.failed_frontier = [(s, v) for s in sweeps for v in (s.get("verdicts") or ()) if not v.get("passed")]
        self.failed_checks = [c for c in checks if not c.get("passed") and str(c.get("name")) not in carried]
        self.checked = sum(1 for row in rows if row.get("verdict") != "-") + len(sweeps) + len(checks)

    @property
    def failed(self) -> int:
        return len(self.failed_rows) + len(self.failed_frontier) + len(self.failed_checks)

    @property
    def failed_text(self) -> str:
        """``2 failed (1 SLA, 1 regression), 1 frontier SLA missed``."""
        parts = []
        if self.failed_rows:
            reasons: dict[str, int] = {}
            for row in self.failed_rows:
                for reason in row.get("reasons") or ["?"]:
                    reasons[reason] = reasons.get(reason, 0) + 1
            why = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
            parts.append(f"{len(self.failed_rows)} failed ({why})")
        if self.failed_frontier:
            n = len(self.failed_frontier)
            parts.append(f"{n} frontier SLA{'s' if n != 1 else ''} missed")
        if self.failed_checks:
            n = len(self.failed_checks)
            parts.append(f"{n} failed check{'s' if n != 1 else ''}")
        return ", ".join(parts)


def figure_cell(value: float | None, unit: str) -> str:
    """A registered figure in its display unit (``$0.1991/Mtok``, ``0.2985 J/token``, ``971.3 W``),
    as the SLA messages write it; ``n/a`` where it was not measured."""
    return "n/a" if value is None else format_quantity(value, unit)

"""The one report writer: every report of a results document, from the plugin and from
``infmax report``, written the same way and failing the same way.

Each report is written atomically (readers see the old file or the new one) and on
its own: one that cannot be written (a read-only directory, a full disk) is named in
:attr:`ReportOutcome.failures` with the reason and the fix, and every other report is
still written. The JSON results go first, since everything else can be rebuilt from
them (``infmax report``); the records' per-chunk stamps go to a binary sidecar beside
the JSON (``pytest_infmax/sidecar.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_infmax.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from pytest_infmax.sidecar import write_results

# Each other report's module is imported where that report is asked for: a session that
# writes the JSON alone (a run's usual end) does not import the HTML, Markdown, plots and
# pytest-benchmark writers.


@dataclass(frozen=True)
class ReportRequest:
    """Which reports to write, and where (None: not that one)."""

    json: Path | None = None
    benchmark_json: Path | None = None
    html: Path | None = None
    markdown: Path | None = None
    plots_dir: Path | None = None  # PNGs go here, named ``{plots_prefix}-frontier.png`` ...
    plots_prefix: str = "infmax"
    step_summary: bool = False  # append the Markdown to $GITHUB_STEP_SUMMARY when it is set
    html_title: str = "infmax report"
    markdown_title: str = "infmax results"


@dataclass
class ReportOutcome:
    """What was written, in order; what could not be (named, with the fix); and notes."""

    written: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _failure(path: Path | None, what: str, exc: BaseException) -> str:
    why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    culprit = getattr(exc, "filename", None)
    if culprit is not None and path is not None and str(culprit) != str(path):
        why = f"{culprit}: {why}"  # e.g. the directory it needs is a file
    return (
        f"could not write the {what} {path or ''}".rstrip()
        + f" ({why}); check that the directory exists, is writable and has room"
    )


def write_reports(doc: Mapping[str, Any], request: ReportRequest) -> ReportOutcome:
    """Write every report ``request`` asks for from an ``--infmax-json`` document."""
    outcome = ReportOutcome()
    results = list(doc.get("results") or [])
    sweeps = list(doc.get("sweeps") or [])
    checks = list(doc.get("checks") or [])

    def attempt(what: str, path: Path | None, write: Callable[[], Path | None]) -> None:
        try:
            written = write()
        except (OSError, ValueError) as exc:  # ValueError: a NaN that JSON cannot hold
            outcome.failures.append(_failure(path, what, exc))
            return
        if written is not None:
            outcome.written.append(written)

    if request.json is not None:
        json_path = request.json

        written: list[Path] = []  # the JSON, then the sidecar of its records' per-chunk stamps (sidecar.py)
        attempt("JSON results", json_path, lambda: written.extend(write_results(json_path, doc)))
        outcome.written.extend(written)
    if request.benchmark_json is not None:
        from pytest_infmax.baselines.benchmark import export_benchmark_json

        bench_path = request.benchmark_json
        attempt(
            "pytest-benchmark JSON", bench_path, lambda: write_json_atomic(bench_path, export_benchmark_json(results))
        )
    rendered: Any = "auto" if request.html is not None else None
    if request.plots_dir is not None:
        from pytest_infmax.reports import plots as plots_mod

        try:
            rendered = plots_mod.render_plots(results, sweeps)
        except plots_mod.PlotsUnavailable as exc:
            outcome.notes.append(str(exc))
        else:
            for plot in rendered:
                if plot.png is not None:
                    path = request.plots_dir / f"{request.plots_prefix}-{plot.name}.png"
                    attempt(f"{plot.name} plot", path, functools.partial(write_bytes_atomic, path, plot.png))
    if request.html is not None:
        from pytest_infmax.reports.html import render_html

        html_path = request.html
        text = render_html(
            results,
            sweeps,
            checks,
            environment=doc.get("environment"),
            servers=doc.get("servers"),
            plots=rendered,
            title=request.html_title,
        )
        attempt("HTML report", html_path, lambda: write_text_atomic(html_path, text))
    if request.markdown is not None or request.step_summary:
        from pytest_infmax.reports.markdown import markdown_summary, write_github_step_summary

        md = markdown_summary(
            results, sweeps, checks, title=request.markdown_title, artifacts=[p.name for p in outcome.written]
        )
        if request.markdown is not None:
            md_path = request.markdown
            attempt("Markdown summary", md_path, lambda: write_text_atomic(md_path, md))
        if request.step_summary:
            attempt("GitHub step summary", None, lambda: write_github_step_summary(md))
    return outcome

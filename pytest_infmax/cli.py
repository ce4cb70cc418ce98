"""The ``infmax`` command: ``infmax sim`` serves the simulator, ``infmax table`` prints a results file,
``infmax report`` writes its HTML report (plots, Markdown summary), ``infmax compare`` compares results
with a baseline (exit 1 on regression), ``infmax history`` shows a baseline set's trend and its change
points, ``infmax baselines migrate`` copies JSON baselines into a PostgreSQL store."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pytest_infmax import __version__
from pytest_infmax.atomic import write_json_atomic
from pytest_infmax.baselines.compare import CompareOptions, compare_files, parse_gates
from pytest_infmax.baselines.pgstore import is_store_url
from pytest_infmax.baselines.store import BaselineError, BaselineMismatch, CorruptBaselineError
from pytest_infmax.baselines.stores import describe, migrate
from pytest_infmax.reports.journal import json_path_for, read_journal
from pytest_infmax.reports.rows import result_row
from pytest_infmax.reports.table import capacity_lines, format_table
from pytest_infmax.reports.writer import ReportRequest, write_reports
from pytest_infmax.sidecar import load_results


def _table(path: str) -> int:
    try:
        doc = load_results(path)
        rows = [result_row(r) for r in doc["results"]]
        capacities = capacity_lines([s for s in doc.get("sweeps") or () if s.get("capacity")])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"infmax: cannot read results from {path}: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if capacities:
        print("\ninfmax capacity:")
        print("\n".join(capacities))
    return 0


def _compare(ns: argparse.Namespace) -> int:
    try:
        options = CompareOptions(
            gates=parse_gates(ns.metrics) if ns.metrics else CompareOptions().gates,
            min_effect=ns.min_effect / 100.0,
            alpha=ns.alpha,
        )
        reports, messages = compare_files(
            ns.baseline, ns.current, options=options, force=ns.force, keys=ns.key, last=ns.last, set_name=ns.set
        )
    except BaselineError as exc:
        print(f"infmax compare: {_compare_error(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"infmax compare: {exc}", file=sys.stderr)
        return 2
    for message in messages:
        print(f"infmax compare: {message}", file=sys.stderr)
    if not reports:
        print("infmax compare: no result is in both files; nothing compared", file=sys.stderr)
        return 2
    for report in reports:
        print(report.format_table(methods=not ns.brief))
        print()
    if ns.json:
        write_json_atomic(ns.json, {"format": "pytest-infmax-compare/1", "comparisons": [r.to_dict() for r in reports]})
    verdicts = [r.verdict for r in reports]
    print(
        "infmax compare: "
        + ", ".join(
            f"{v} {verdicts.count(v)}" for v in ("regressed", "unsure", "improved", "same") if verdicts.count(v)
        )
    )
    if "regressed" in verdicts or (ns.fail_on_unsure and "unsure" in verdicts):
        return 1
    return 0


def _migrate(ns: argparse.Namespace) -> int:
    try:
        report = migrate(ns.directory, ns.url, ns.set)
    except BaselineError as exc:
        print(f"infmax baselines migrate: {exc}", file=sys.stderr)
        return 2
    for (set_name, key), added in sorted(report.added.items()):
        print(f"infmax baselines migrate: {set_name}/{key}: {added} run(s) added")
    for line in report.refused:
        print(f"infmax baselines migrate: refused {line}", file=sys.stderr)
    print(
        f"infmax baselines migrate: {report.runs_added} run(s) added to {describe(ns.url)} "
        f"({len(report.added)} baseline(s) copied, {len(report.refused)} refused)"
    )
    return 1 if report.refused else 0


def _compare_error(exc: BaselineError) -> str:
    """A baseline error in the words of ``infmax compare``: what this command accepts to go on
    (the plugin's messages name pytest's flags, which this command does not take)."""
    if isinstance(exc, BaselineMismatch):
        fields = "; ".join(str(d) for d in exc.differences)
        where = f" ({exc.path})" if exc.path else ""
        return (
            f"baseline for {exc.key}{where} was recorded on a different testbed or workload, so the numbers "
            f"are not comparable: {fields}. Compare anyway with `infmax compare --force`, or compare with "
            f"a baseline recorded on this testbed (pytest's --infmax-update rewrites a set's baselines)"
        )
    if isinstance(exc, CorruptBaselineError):
        return (
            f"baseline file {exc.path} is unusable: {exc.reason}. Compare with another file or directory, "
            f"delete it, or rewrite it by rerunning its test with pytest's --infmax-update"
        )
    return str(exc)


def _history(ns: argparse.Namespace) -> int:
    from pytest_infmax.baselines.changepoints import ChangePointsUnavailable
    from pytest_infmax.baselines.history import format_history, histories_document, set_histories

    location, set_name = ns.baselines, ns.set
    if not is_store_url(ns.baselines) and ("/" in ns.set or os.sep in ns.set):  # the set's own directory
        location, set_name = str(Path(ns.set).parent), Path(ns.set).name
    try:
        histories = set_histories(
            location, set_name, ns.test, ns.metric, max_pvalue=ns.max_pvalue, min_change=ns.min_change / 100.0
        )
    except (BaselineError, ChangePointsUnavailable, ValueError) as exc:
        print(f"infmax history: {exc}", file=sys.stderr)
        return 2
    for history in histories:
        print(format_history(history))
        print()
    if ns.json:
        write_json_atomic(ns.json, histories_document(histories))
    if ns.plot is not None:
        from pytest_infmax.reports.plots import PlotsUnavailable, write_history_plot

        for i, history in enumerate(histories):
            path = Path(ns.plot)
            if len(histories) > 1:
                path = path.with_name(f"{path.stem}-{i + 1}{path.suffix or '.png'}")
            try:
                print(f"infmax: wrote {write_history_plot(history, path)} ({history.key})")
            except (PlotsUnavailable, ValueError, OSError) as exc:
                print(f"infmax history: no plot of {history.key}: {exc}", file=sys.stderr)
                return 2
    found = sum(len(h.change_points) for h in histories)
    print(f"infmax history: {found} change point{'s' if found != 1 else ''} in {len(histories)} histories")
    return 0


def _report(ns: argparse.Namespace) -> int:
    notes: list[str] = []
    if ns.from_journal is not None:  # a SIGKILLed session's results: rebuild the JSON too
        try:
            doc, notes = read_journal(Path(ns.from_journal))
        except (OSError, ValueError) as exc:
            print(f"infmax: cannot read results from {ns.from_journal}: {exc}", file=sys.stderr)
            return 2
        src = Path(ns.json) if ns.json else json_path_for(Path(ns.from_journal))
    elif ns.json is None:
        print("infmax report: give an --infmax-json file, or --from-journal JOURNAL", file=sys.stderr)
        return 2
    else:
        try:
            doc = load_results(ns.json)  # with the records' stamps, from the sidecar beside it
        except (OSError, ValueError) as exc:
            print(f"infmax: cannot read results from {ns.json}: {exc}", file=sys.stderr)
            return 2
        src = Path(ns.json)
    for line in notes:
        print(f"infmax: {line}", file=sys.stderr)
    markdown = None if not ns.markdown else src.with_suffix(".md") if ns.markdown is True else Path(ns.markdown)
    outcome = write_reports(
        doc,
        ReportRequest(
            json=src if ns.from_journal is not None else None,
            html=Path(ns.html) if ns.html else src.with_suffix(".html"),
            markdown=markdown,
            plots_dir=src.parent if ns.plots else None,
            plots_prefix=src.stem,
            step_summary=ns.step_summary,
            html_title=ns.title or f"infmax report: {src.name}",
            markdown_title=ns.title or "infmax results",
        ),
    )
    for path in outcome.written:
        print(f"infmax: wrote {path}")
    for line in outcome.notes + outcome.failures:
        print(f"infmax: {line}", file=sys.stderr)
    return 1 if outcome.failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "sim":  # hand every remaining flag to the simulator's own parser
        from pytest_infmax.sim import main as sim_main  # the simulator's server loads only for `infmax sim`

        return sim_main(args[1:])
    parser = argparse.ArgumentParser(prog="infmax", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pytest-infmax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sim", help="serve the embedded simulator (infmax sim --help)")
    table = sub.add_parser("table", help="print the results table of an --infmax-json file")
    table.add_argument("path")
    cmp = sub.add_parser(
        "compare",
        help="compare current results with a baseline; exit 1 on a regression",
        description="Compare CURRENT with BASELINE: each a baseline file, a set's directory "
        "(.infmax/baselines/SET), an --infmax-json results file, or, with --set SET, a directory of sets "
        "(.infmax/baselines) or a postgresql:// store. Exit 0: no regression; 1: a regression "
        "(or unsure, with --fail-on-unsure); 2: unreadable input or a testbed/workload mismatch.",
    )
    cmp.add_argument("baseline")
    cmp.add_argument("current")
    cmp.add_argument(
        "--min-effect", type=float, default=5.0, metavar="PCT", help="smallest change that matters, percent (default 5)"
    )
    cmp.add_argument("--alpha", type=float, default=0.01, help="false-alarm rate per comparison (default 0.01)")
    cmp.add_argument("--metrics", help="gated metrics, e.g. 'p50(tpot), p99(ttft), throughput_per_gpu'")
    cmp.add_argument(
        "--set", metavar="SET", help="the baseline set, where a side is a directory of sets or a postgresql:// store"
    )
    cmp.add_argument("--key", action="append", help="compare only this result key (repeatable)")
    cmp.add_argument("--last", type=int, metavar="N", help="use only the last N current runs")
    cmp.add_argument("--force", action="store_true", help="compare even across testbeds or workloads")
    cmp.add_argument("--fail-on-unsure", action="store_true", help="exit 1 on unsure as well")
    cmp.add_argument("--brief", action="store_true", help="leave the method column out")
    cmp.add_argument("--json", metavar="PATH", help="also write the comparison as JSON")
    hist = sub.add_parser(
        "history",
        help="a baseline set's trend and its change points, with the commit at each; plots it",
        description="Print the trend of a statistic over the saved runs of a baseline set (one value a "
        "run, with its git commit, branch and time) and the change points in it (Apache Otava's "
        "E-Divisive means: pip install 'pytest-infmax[history]'), and optionally plot it. "
        "Exit 0: shown (change points or not); 2: no such set or test, or unreadable input.",
    )
    hist.add_argument("set", help="the set's name (in --baselines), or its directory (a path with a /)")
    hist.add_argument("test", nargs="?", help="only result keys that contain this (e.g. test_x)")
    hist.add_argument(
        "--baselines",
        default=os.environ.get("INFMAX_BASELINES") or ".infmax/baselines",
        help="the baselines directory, or a postgresql:// store (default: $INFMAX_BASELINES, else .infmax/baselines)",
    )
    hist.add_argument("--metric", default="p50(tpot)", help="the statistic, e.g. p99(ttft) or throughput_per_gpu")
    hist.add_argument("--max-pvalue", type=float, default=0.001, help="how sure a change point must be (default 0.001)")
    hist.add_argument(
        "--min-change", type=float, default=0.0, metavar="PCT", help="smallest step kept, percent (default 0)"
    )
    hist.add_argument(
        "--plot",
        nargs="?",
        const="history.png",
        default=None,
        metavar="PNG",
        help="also draw the trend and its change points (default path: history.png; one file per key)",
    )
    hist.add_argument("--json", metavar="PATH", help="also write the histories and change points as JSON")
    report = sub.add_parser(
        "report",
        help="write the HTML report (and optionally PNG plots and a Markdown summary) of an --infmax-json file",
        description="Write the HTML report (and optionally PNG plots and a Markdown summary) for an "
        "--infmax-json results file.",
    )
    report.add_argument(
        "json",
        nargs="?",
        help="results file written with --infmax-json (with --from-journal: the JSON to write; "
        "default: the journal's name without .journal)",
    )
    report.add_argument(
        "--from-journal",
        metavar="JOURNAL",
        help="rebuild the results from the journal a killed session left (PATH.journal next to its "
        "--infmax-json): writes the JSON results, then the other reports",
    )
    report.add_argument("-o", "--html", help="HTML file to write (default: the JSON's name with .html)")
    report.add_argument("--plots", action="store_true", help="also write PNG plots next to the JSON")
    report.add_argument(
        "--markdown",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="also write the Markdown summary (default path: the JSON's name with .md)",
    )
    report.add_argument(
        "--step-summary", action="store_true", help="append the Markdown summary to $GITHUB_STEP_SUMMARY when it is set"
    )
    report.add_argument("--title", default=None)
    baselines = sub.add_parser("baselines", help="manage baseline stores (infmax baselines migrate --help)")
    baselines_sub = baselines.add_subparsers(dest="baselines_command", required=True)
    mig = baselines_sub.add_parser(
        "migrate",
        help="copy a JSON baseline set into a PostgreSQL store",
        description="Copy the baselines of DIR (a set folder, e.g. .infmax/baselines/main, or a folder of "
        "sets) into the PostgreSQL store at URL. Runs the store already holds are not copied again, so "
        "it can be rerun. Exit 0: copied; 1: some baselines refused (another testbed or workload in the "
        "store); 2: unreadable input or an unreachable store.",
    )
    mig.add_argument("directory", metavar="DIR")
    mig.add_argument("url", metavar="URL", help="postgresql://USER[:PASSWORD]@HOST[:PORT]/DB (or PGPASSWORD)")
    mig.add_argument("--set", metavar="NAME", help="the set to copy into (default: DIR's name)")
    ns = parser.parse_args(args)
    if ns.command == "report":
        return _report(ns)
    if ns.command == "table":
        return _table(ns.path)
    if ns.command == "compare":
        return _compare(ns)
    if ns.command == "baselines":
        return _migrate(ns)
    if ns.command == "history":
        return _history(ns)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

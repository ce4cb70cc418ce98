"""The ``infmax`` command: ``infmax sim`` serves the simulator, ``infmax table`` prints a results file."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__


def _table(path: str) -> int:
    from .reports import format_table

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        rows = [_summary_from_full(r) for r in doc["results"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"infmax: cannot read results from {path}: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


def _summary_from_full(result: dict) -> dict:
    m = result["metrics"]
    load = result["load"]

    def stat(metric: str, key: str, scale: float = 1.0) -> float | None:
        value = (m.get(metric) or {}).get(key)
        return None if value is None else value * scale

    return {
        "test": result["name"],
        "scenario": load["scenario"]["name"],
        "load": f"c={load['concurrency']}" if load.get("concurrency") else f"rate={load.get('rate')}/s",
        "requests": m["num_requests"],
        "ok": m["num_ok"],
        "ttft_p50_ms": stat("ttft", "p50", 1000),
        "ttft_p99_ms": stat("ttft", "p99", 1000),
        "tpot_p50_ms": stat("tpot", "p50", 1000),
        "interactivity": stat("interactivity", "p50"),
        "throughput_per_gpu": m.get("throughput_per_gpu"),
        "error_rate": m.get("error_rate"),
        "sla": {None: "-", True: "PASS", False: "FAIL"}[result.get("passed")],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "sim":  # hand every remaining flag to the simulator's own parser
        from .sim import main as sim_main

        return sim_main(args[1:])
    parser = argparse.ArgumentParser(prog="infmax", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pytest-infmax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sim", help="serve the embedded simulator (infmax sim --help)")
    table = sub.add_parser("table", help="print the results table of an --infmax-json file")
    table.add_argument("path")
    ns = parser.parse_args(args)
    if ns.command == "table":
        return _table(ns.path)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

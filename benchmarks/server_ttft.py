"""The client's TTFT against the server's own over the same requests (docs/load-generator.md,
"Client overhead"): how much of what the client measures is outside the engine's clock.

Against the embedded simulator (``--decode-step-ms 2``), started through the project's
launcher afresh for every run: ``1k1k-mini``, a closed loop at each ``--concurrency``
(default 1 and 8) of 16 requests per stream after 2 warm-up requests, the server's gauges
read every 0.1 s. ``--repeat`` rounds, the concurrencies interleaved in each round
(1, 8, 1, 8, ...). Printed per concurrency, the median [min-max] over the rounds of the
server's TTFT mean and p50 (its Prometheus histogram: the mean exact, the p50 inside a
bucket), the client's, the excess of the client's mean over the server's, the requests
the server ran at once (mean and max of the gauge samples), and the load average at each
run's start.

    .venv/bin/python benchmarks/server_ttft.py --repeat 3    # about 30 s on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pytest_infmax.run.runner import Infmax  # noqa: E402
from pytest_infmax.servers.launch import ServerConfig, running_server  # noqa: E402

FIGURES = (
    ("server TTFT mean / p50 (ms)", ("server_ttft_mean_ms", "server_ttft_p50_ms"), 2),
    ("client TTFT mean / p50 (ms)", ("client_ttft_mean_ms", "client_ttft_p50_ms"), 2),
    ("excess (ms)", ("excess_ms",), 2),
    ("running mean / max", ("running_mean", "running_max"), 1),
)


def measure(concurrency: int, step_ms: float) -> dict[str, Any]:
    """One run on a fresh simulator: the client's and the server's TTFT over the same requests."""
    with tempfile.TemporaryDirectory(prefix="infmax-server-ttft-") as tmp:
        config = ServerConfig(sim_args=("--decode-step-ms", f"{step_ms:g}"))
        with running_server(config, Path(tmp)) as server:
            result = Infmax(server, server_metrics_interval=0.1).run(
                "1k1k-mini", concurrency=concurrency, num_requests=16 * concurrency, warmup=2
            )
    report = result.server_metrics_report()
    if not report or not report.get("available") or not report.get("comparison"):
        raise SystemExit(f"c={concurrency}: the simulator's metrics were not read: {report and report.get('reason')}")
    running = report["gauges"].get("running") or {}
    return {
        "concurrency": concurrency,
        "requests": result.metrics.num_ok,
        **report["comparison"],
        "running_mean": running.get("mean"),
        "running_max": running.get("max"),
    }


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="closed-loop streams (default 1 8)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, the concurrencies interleaved (default 3)")
    parser.add_argument("--decode-step-ms", type=float, default=2.0, help="the simulator's decode step (default 2)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or any(c < 1 for c in args.concurrency):
        parser.error("--repeat and every --concurrency must be at least 1")
    rows: list[dict[str, Any]] = []
    for round_ in range(1, args.repeat + 1):
        for concurrency in args.concurrency:
            load = os.getloadavg()[0]
            row = {**measure(concurrency, args.decode_step_ms), "round": round_, "load_average": load}
            rows.append(row)
            print(
                f"  round {round_}, c={concurrency} (load average {load:.1f}): {row['requests']} requests; "
                f"server TTFT mean {row['server_ttft_mean_ms']:.2f} ms, client {row['client_ttft_mean_ms']:.2f} ms, "
                f"excess {row['excess_ms']:.2f} ms",
                flush=True,
            )
    what = f"median [min–max] of {args.repeat} interleaved rounds" if args.repeat > 1 else "one run"
    print(f"\n{what}, --decode-step-ms {args.decode_step_ms:g}, {os.cpu_count()} CPUs:\n")
    print("| load | requests | " + " | ".join(name for name, _, _ in FIGURES) + " | load average |")
    print("|---|--:|" + "--:|" * len(FIGURES) + "--:|")
    for concurrency in args.concurrency:
        mine = [r for r in rows if r["concurrency"] == concurrency]
        cells = [
            " / ".join(_spread([r[k] for r in mine if r[k] is not None], digits) for k in keys)
            for _, keys, digits in FIGURES
        ]
        load = _spread([r["load_average"] for r in mine], 1)
        print(f"| c={concurrency} | {mine[0]['requests']} | " + " | ".join(cells) + f" | {load} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

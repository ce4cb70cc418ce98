"""Two per-call costs the load generator's design rests on (docs/load-generator.md), timed
in this process, each pair interleaved over ``--repeat`` rounds:

* ``sse-decode``: one vLLM-sized chat-completion chunk decoded the client's way (msgspec
  into Structs holding only what metrics need, the rest skipped unparsed) against the
  standard library's ``json.loads`` plus the dict lookups the client would then do;
* ``metrics-parse``: a gauge sample of a 1,000-line vLLM-like ``/metrics`` page the client's
  way (only the lines of the metrics it reads handed to prometheus_client's parser)
  against parsing the whole page.

Printed: the median [min-max] of the per-call time over the rounds, and their ratio.

    .venv/bin/python benchmarks/micro.py --repeat 5    # about 10 s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from pytest_infmax.load.generator import _decode_chunk  # noqa: E402  (the client's own decoder)
from pytest_infmax.measure.servermetrics import ENGINE_METRICS, GAUGES, HISTOGRAMS, parse  # noqa: E402

# A chunk as vLLM streams it for /v1/chat/completions: one token, every field vLLM sends.
CHUNK = json.dumps(
    {
        "id": "chatcmpl-3f9c2a7d8e1b4c5f9a0b6d2e4f8a1c3b",
        "object": "chat.completion.chunk",
        "created": 1764979200,
        "model": "meta-llama/Llama-3.3-70B-Instruct",
        "choices": [
            {"index": 0, "delta": {"content": " the"}, "logprobs": None, "finish_reason": None, "stop_reason": None}
        ],
    },
    separators=(",", ":"),
).encode()

BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)


def metrics_page(lines: int = 1000) -> str:
    """A vLLM-like page: the figures the client reads, then other histograms of the same
    shape (vLLM's page has dozens: per-phase timings, token counts, iteration stats) until
    it has ``lines`` lines."""
    label = 'engine="0",model_name="m"'
    out: list[str] = []

    def histogram(name: str) -> None:
        out.extend((f"# HELP {name} a histogram", f"# TYPE {name} histogram"))
        for le in (*BUCKETS, "+Inf"):
            out.append(f'{name}_bucket{{{label},le="{le}"}} 12.0')
        out.extend((f"{name}_sum{{{label}}} 3.5", f"{name}_count{{{label}}} 12.0"))

    vllm = ENGINE_METRICS["vllm"]
    for role in HISTOGRAMS:
        histogram(vllm[role][0])
    for role in GAUGES:
        name = vllm[role][0]
        out.extend((f"# HELP {name} a gauge", f"# TYPE {name} gauge", f"{name}{{{label}}} 3.0"))
    i = 0
    while len(out) < lines:
        histogram(f"vllm:other_histogram_{i}_seconds")
        i += 1
    return "\n".join(out[:lines]) + "\n"


PAGE = metrics_page()


def ours_decode() -> object:
    choice = _decode_chunk(CHUNK).choices[0]  # type: ignore[index]
    return choice.delta.content if choice.delta is not None else choice.text


def stdlib_decode() -> object:
    choice = json.loads(CHUNK)["choices"][0]
    delta = choice.get("delta")
    return delta.get("content") if delta is not None else choice.get("text")


def ours_gauges() -> object:
    return parse(PAGE, GAUGES)


def whole_page() -> object:
    return [s for family in text_string_to_metric_families(PAGE) for s in family.samples]


CASES: dict[str, tuple[tuple[str, Callable[[], object]], tuple[str, Callable[[], object]], float]] = {
    "sse-decode": (("ours (msgspec Structs)", ours_decode), ("json.loads + dict lookups", stdlib_decode), 1e6),
    "metrics-parse": (("ours (gauge lines only)", ours_gauges), ("the whole page", whole_page), 1e3),
}


def per_call(fn: Callable[[], object], seconds: float = 0.2) -> float:
    """Seconds per call: the best of three timings of as many calls as take about ``seconds``."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(1, int(number * seconds / 0.2))
    return min(timer.repeat(repeat=3, number=number)) / number


def _spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds, the two ways interleaved (default 5)")
    parser.add_argument("--case", choices=sorted(CASES), nargs="+", default=sorted(CASES), help="default: both")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    assert ours_decode() == stdlib_decode() == " the"
    assert set(ours_gauges()) < {s.name for s in whole_page()}
    print(
        f"chunk {len(CHUNK)} bytes; page {PAGE.count(chr(10))} lines; {args.repeat} interleaved rounds; "
        f"load average {os.getloadavg()[0]:.1f}; Python {sys.version.split()[0]}\n"
    )
    print("| case | ours | the other way | ratio |")
    print("|---|--:|--:|--:|")
    for case in args.case:
        (ours_name, ours), (other_name, other), scale = CASES[case]
        unit = "µs" if scale == 1e6 else "ms"
        times: dict[str, list[float]] = {ours_name: [], other_name: []}
        for _ in range(args.repeat):
            times[ours_name].append(per_call(ours) * scale)
            times[other_name].append(per_call(other) * scale)
        ratio = statistics.median(times[other_name]) / statistics.median(times[ours_name])
        print(
            f"| {case} | {ours_name}: {_spread(times[ours_name], 3)} {unit} | "
            f"{other_name}: {_spread(times[other_name], 3)} {unit} | {ratio:.1f} × |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

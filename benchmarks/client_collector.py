"""What a full garbage collection costs the client inside a pytest session, and with the
session's objects frozen as a measured phase holds them (``CollectorHold``,
pytest_infmax/collector.py).

Runs one pytest session (the plugin, its embedded simulator) whose test makes ``--runs``
small runs; after each it counts the objects the collector tracks and times ``gc.collect()``
twice: as the session stands, and with what it holds frozen (``gc.freeze()``, as the hold does
when a measured phase starts), the order alternating. A full collection stops the event loop:
every stream's stamps are as late as it lasts. Prints the median [min-max] of the runs.

    .venv/bin/python benchmarks/client_collector.py --runs 5

``--live STREAMS``: instead, the young and middle collections of a closed loop of STREAMS
streams against the simulator (started here; flags after ``--`` go to it), 3 x STREAMS
measured requests of ISL 1024 and ``--osl`` tokens in [0.8 L, L], after a warm-up round,
``--runs`` times each way, interleaved: each record's per-chunk token counts kept as an
``array('q')`` (now), and as a list of ints (until 2026-12-07; the generator's own counts
turned into a list), which every collection that meets a record walks item by item.

    .venv/bin/python benchmarks/client_collector.py --live 1000 --osl 256 --runs 3 -- --profile b200/gpt-oss-120b

``--live STREAMS --against DIR``: the same runs, this checkout's client against the client of
another checkout (e.g. ``git archive`` of an earlier commit, its C lane built or copied in),
each run in a process of its own; the simulator is this checkout's for both.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _figures import (  # noqa: E402
    REPO,
    interleaved,
    print_spread_table,
    simulator,
    split_simulator_flags,
    spread_cell,
    tree_env,
)

_TEST = textwrap.dedent(
    """
    import gc, json, os, time

    def _full_collection_ms():
        started = time.perf_counter()
        gc.collect()
        return (time.perf_counter() - started) * 1e3

    def test_collections(infmax):
        rows = []
        for i in range(int(os.environ["RUNS"])):
            infmax.run("1k1k-mini", concurrency=8)
            tracked = len(gc.get_objects())
            timed = {}
            for frozen in ((False, True) if i % 2 == 0 else (True, False)):
                if frozen:
                    gc.freeze()
                timed[frozen] = _full_collection_ms()
                if frozen:
                    gc.unfreeze()
            rows.append({"tracked": tracked, "as_is_ms": timed[False], "frozen_ms": timed[True]})
        with open(os.environ["OUT"], "w") as out:
            json.dump(rows, out)
    """
)


def live(streams: int, osl: int, as_lists: bool, sim_args: list[str]) -> dict[str, float]:
    """One closed-loop run against a fresh simulator: what the client's collector did."""
    from pytest_infmax.load import generator
    from pytest_infmax.load.plan import LoadConfig
    from pytest_infmax.load.scenarios import Scenario

    gc.collect()  # the last run's records go before this one
    scenario = Scenario("collector", 1024, osl, range_ratio=0.8)
    config = LoadConfig(scenario, concurrency=streams, num_requests=3 * streams, warmup=streams, request_timeout=600)
    counts = generator._chunk_tokens
    if as_lists:  # as records kept them until 2026-12-07
        generator._chunk_tokens = lambda *a, **k: (lambda got: (list(got[0]), got[1]))(counts(*a, **k))
    try:
        with simulator("sim-model", streams, sim_args) as url:
            run = generator.run_coroutine(generator.LoadGenerator(url, "sim-model").run(config))
    finally:
        generator._chunk_tokens = counts
    assert run.client is not None and run.client.collector is not None
    figures = run.client.collector
    return {
        "young_collections": figures["collections"][0],
        "young_longest_ms": figures["longest_pause_ms"][0],
        "young_total_ms": figures["total_pause_ms"][0],
        "middle_collections": figures["collections"][1],
        "middle_longest_ms": figures["longest_pause_ms"][1],
        "middle_total_ms": figures["total_pause_ms"][1],
        "loop_lag_max_ms": max(run.client.loop_lags, default=0.0) * 1e3,
    }


def _tree_client(tree: Path, streams: int, osl: int, sim_args: list[str]) -> dict[str, float]:
    """One ``live`` run in a process whose client is ``tree``'s (first on its path); the
    simulator stays this checkout's (``simulator`` starts it with this checkout as its cwd)."""
    env = tree_env(tree)
    command = [sys.executable, __file__, "--live-one", str(streams), "--osl", str(osl), "--", *sim_args]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"the run with {tree}'s client failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    imported = Path(result.pop("client")).resolve()
    if not imported.is_relative_to(tree):
        raise SystemExit(f"{tree}: its run imported the client from {imported}, not its own code")
    wire = result.pop("wire")
    if wire != "c":
        raise SystemExit(
            f"{tree}: its client read with the {wire!r} wire mode, not the C lane (build or copy it in; unset INFMAX_WIRE)"
        )
    return result


def _live_one(streams: int, osl: int, sim_args: list[str]) -> int:
    from pytest_infmax.load import streamclient

    result: dict[str, Any] = dict(live(streams, osl, False, sim_args))
    result["client"] = streamclient.__file__
    result["wire"] = streamclient.wire_mode()  # what the run read with: INFMAX_WIRE, or python where no C lane
    print(json.dumps(result))
    return 0


def live_main(streams: int, osl: int, runs: int, sim_args: list[str], against: Path | None = None) -> int:
    print(f"{streams} streams, ISL 1024, OSL {osl} in [0.8 L, L], simulator: {' '.join(sim_args) or '(defaults)'}")
    if against is None:
        label = "token counts"
        variants = {
            "array('q') (now)": lambda: live(streams, osl, False, sim_args),
            "list of ints (before)": lambda: live(streams, osl, True, sim_args),
        }
    else:
        label = "client"
        variants = {
            "this checkout": lambda: _tree_client(REPO, streams, osl, sim_args),
            against.name: lambda: _tree_client(against, streams, osl, sim_args),
        }
    figures = interleaved(runs, variants)
    columns = {
        "young_collections": "young: collections",
        "young_longest_ms": "longest ms",
        "young_total_ms": "total ms",
        "middle_collections": "middle: collections",
        "middle_longest_ms": "longest ms",
        "middle_total_ms": "total ms",
        "loop_lag_max_ms": "loop lag max ms",
    }
    print_spread_table(label, columns, figures)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv, sim_args = split_simulator_flags(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Flags after -- go to the simulator (--live), e.g. -- --profile b200/gpt-oss-120b (the figures of "
        "docs/load-generator.md); --max-num-seqs (the stream count, at least 256) is set here.",
    )
    parser.add_argument("--runs", type=int, default=5, help="runs in the session, each followed by both timings")
    parser.add_argument(
        "--live", type=int, metavar="STREAMS", help="instead: a closed loop's young and middle collections"
    )
    parser.add_argument("--osl", type=int, default=256, help="--live: output tokens per request, at most (default 256)")
    parser.add_argument(
        "--against", type=Path, metavar="DIR", help="--live: this checkout's client against DIR's (a checkout)"
    )
    parser.add_argument("--live-one", type=int, metavar="STREAMS", help=argparse.SUPPRESS)  # one run, as JSON
    args = parser.parse_args(argv)
    if args.live_one:
        return _live_one(args.live_one, args.osl, sim_args)
    if args.against is not None:
        if not args.live:
            parser.error("--against compares clients in --live runs: give --live STREAMS too")
        if not (args.against / "pytest_infmax" / "load" / "streamclient.py").is_file():
            parser.error(f"--against {args.against}: no pytest_infmax/load there; give a checkout of the project")
        args.against = args.against.resolve()
    if args.live:
        return live_main(args.live, args.osl, args.runs, sim_args, args.against)
    with tempfile.TemporaryDirectory() as workdir:
        (Path(workdir) / "test_collections.py").write_text(_TEST)
        out = Path(workdir) / "rows.json"
        env = {**os.environ, "RUNS": str(args.runs), "OUT": str(out)}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_collections.py"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise SystemExit(f"the session failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
        rows = json.loads(out.read_text())
    print(f"A full collection in a pytest session with the plugin, after each of {args.runs} runs: median [min-max]")
    print("| objects tracked | as the session stands, ms | its objects frozen, ms |\n|--:|--:|--:|")
    print(
        f"| {statistics.median(r['tracked'] for r in rows):.0f} | {spread_cell([r['as_is_ms'] for r in rows], 1)} "
        f"| {spread_cell([r['frozen_ms'] for r in rows], 1)} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The whole run, as a user runs it: ours through pytest against InferenceMAX's client.

Both clients stream from the same exact-timing reference server: client_overhead.py's
emitter, which writes the next one-token SSE event to every open stream every
``--itl-ms`` milliseconds (10 by default), ``--tokens`` events per request (1,000), then
the usage event and ``[DONE]``. Each client is a fresh process, measured from its spawn to
its exit, that is to the last report it wrote:

* **ours**: ``python -m pytest`` on a one-test project (``infmax.run`` of ``streams``
  concurrent requests, ``--rounds`` rounds of them) with ``--infmax-endpoint`` and
  ``--infmax-json``, pytest's start-up, the plugin, the run and every report included;
  pytest loads our plugin alone (``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 -p pytest_infmax.plugin``),
  as a ``pip install pytest-infmax`` leaves it, unless ``--all-plugins``;
* **InferenceMAX**: its ``utils/bench_serving/benchmark_serving.py`` (SemiAnalysisAI/
  InferenceX; Apache-2.0), run from a checkout given with ``--bench-serving`` by an
  interpreter with its requirements (``--peer-python``: transformers, aiohttp, numpy,
  tqdm), with the same requests: the random dataset, ``--max-concurrency streams``,
  ``--ignore-eos``, ``--save-result``. It needs a tokenizer: a word-level one is built
  offline, in which every event's `` tok`` is one token.

Both run with bytecode caching on (a sandbox's ``PYTHONDONTWRITEBYTECODE`` is dropped), after
one untimed warm-up run of each.

Reported per stream count, the median of ``--runs`` interleaved runs with the spread
(min-max): wall seconds, CPU seconds (the client process and its children, user + system)
and CPU seconds per million tokens the emitter streamed to it; for ours also the CPU of
the measured phase alone (the run's own ``client.cpu_seconds``), and the ratio of ours to
InferenceMAX's whole-run CPU per million tokens (issue 20's goal: <= 0.25).

    .venv/bin/python benchmarks/whole_run.py --quick --bench-serving DIR --peer-python PY   # ~1 min
    .venv/bin/python benchmarks/whole_run.py --bench-serving DIR --peer-python PY           # ~12 min on 2 cores

DIR is ``utils/bench_serving`` of an InferenceX checkout; PY an interpreter with its
requirements, e.g. ``python3 -m venv .venv-peer && .venv-peer/bin/pip install -c
requirements/lock.txt transformers tqdm aiohttp numpy`` (docs/performance.md).
``--no-peer`` measures ours alone. ``--floor`` adds client_overhead.py's protocol floor as a
third client, a whole process too (a uvloop protocol that only finds each response's end):
what the kernel and the event loop cost, below which no Python client on this machine goes.

``--phases`` says where ours spends the CPU that is not streaming: the user's project gets a
conftest that reads ``time.process_time()`` at pytest's hooks, and the table splits each run
into start (interpreter, pytest, the plugin, collection), setup (the fixtures: the imports
the first perf test needs), streaming (the load generator's run; its measured phase is the
run's own ``client.cpu_seconds``), then what follows it: the result and its journal line
(after streaming), the test's report and the journal's result line (report hooks), the
JSON and its sidecar (session end), and the interpreter's exit. ``--against DIR`` adds the
plugin of another checkout (first on ``PYTHONPATH``; its C lane built, e.g. the ``.so``
copied in), interleaved with this one, so a change is measured before and after in one run:

    .venv/bin/python benchmarks/whole_run.py --no-peer --phases --streams 256 --against ../base
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import client_overhead  # noqa: E402  (its emitter is the reference server)

from pytest_infmax.lazy import quiet_blas_threads  # noqa: E402

ISL = client_overhead.ISL
CLIENT_TIMEOUT_S = 900  # one client run, at most

OURS_TEST = """
from pytest_infmax import Scenario


def test_whole_run(infmax):
    result = infmax.run(
        Scenario("whole-run", {isl}, {tokens}, range_ratio=1.0),
        concurrency={streams},
        num_requests={requests},
        warmup=0,
        request_timeout={timeout},
    )
    assert result.metrics.num_ok == {requests}
"""

# --phases: the user's project's conftest, reading the process's CPU time at pytest's hooks (and
# where the load generator's run returns: the end of streaming), written out at unconfigure.
PHASES_CONFTEST = """
import json
import os
import time

import pytest

_MARKS = {}


def _mark(name):
    _MARKS.setdefault(name, time.process_time())


def pytest_collection_finish(session):
    _mark("collected")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    try:
        return (yield)
    finally:
        _mark("set up")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    from pytest_infmax.load.generator import LoadGenerator

    run = LoadGenerator.run

    async def timed_run(self, *args, **kwargs):
        try:
            return await run(self, *args, **kwargs)
        finally:
            _mark("streamed")

    LoadGenerator.run = timed_run


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    try:
        return (yield)
    finally:
        _mark("ran")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_logreport(report):
    try:
        return (yield)
    finally:
        if report.when == "call":
            _mark("reported")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    _mark("unconfigured")
    with open(os.environ["WHOLE_RUN_PHASES"], "w") as f:
        json.dump(_MARKS, f)
"""

# (name, from mark, to mark): the CPU seconds between two of PHASES_CONFTEST's marks ("exit": from
# the last mark to the process's end, from its rusage)
PHASES = (
    ("start: interpreter, pytest, plugin, collection", None, "collected"),
    ("setup: the fixtures and their imports", "collected", "set up"),
    ("streaming: the load generator's run", "set up", "streamed"),
    ("after streaming: result, metrics, journal", "streamed", "ran"),
    ("report hooks: the test's report, journal", "ran", "reported"),
    ("session end: the JSON and its sidecar", "reported", "unconfigured"),
    ("exit: the interpreter's end", "unconfigured", None),
)
POST_RUN = PHASES[3:]  # what follows streaming

# A word-level tokenizer, built offline, in which the emitter's " tok" is one token.
MAKE_TOKENIZER = """
import sys
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

words = ["<unk>", "<s>", "</s>", "tok"] + [f"w{i}" for i in range(4000)]
tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
fast.save_pretrained(sys.argv[1])
"""


def _user_env(env: dict[str, str]) -> dict[str, str]:
    """A user's environment: Python caches bytecode (a sandbox may set PYTHONDONTWRITEBYTECODE,
    which makes every run compile every module it imports: transformers for the peer, our
    editable package for us)."""
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _child_run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Runs ``cmd`` to its end: (wall seconds from spawn to exit, CPU seconds of it and its children)."""
    before = client_overhead._children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    wall = time.perf_counter() - start
    return wall, client_overhead._children_cpu() - before, proc


def _fail(what: str, proc: subprocess.CompletedProcess[str]) -> SystemExit:
    tail = (proc.stdout + proc.stderr)[-4000:]
    return SystemExit(f"{what} failed (exit {proc.returncode}):\n{tail}")


def run_ours(
    base: str,
    work: Path,
    streams: int,
    requests: int,
    tokens: int,
    all_plugins: bool = False,
    *,
    phases: bool = False,
    pythonpath: Path | None = None,
) -> dict[str, Any]:
    project = work / f"ours-{streams}"
    project.mkdir(exist_ok=True)
    (project / "pytest.ini").write_text("[pytest]\n")
    conftest = project / "conftest.py"
    if phases:
        conftest.write_text(PHASES_CONFTEST)
    else:
        conftest.unlink(missing_ok=True)
    (project / "test_whole_run.py").write_text(
        textwrap.dedent(OURS_TEST).format(
            isl=ISL, tokens=tokens, streams=streams, requests=requests, timeout=CLIENT_TIMEOUT_S
        )
    )
    out = project / "results.json"
    out.unlink(missing_ok=True)
    env = _user_env({k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "INFMAX_"))})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_whole_run.py"]
    if not all_plugins:
        # pytest with our plugin alone, as `pip install pytest-infmax` leaves it: the dev venv's
        # other plugins (hypothesis, xdist, asyncio, anyio, sybil) are not ours to count
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        cmd += ["-p", "pytest_infmax.plugin"]
    cmd += ["--infmax-endpoint", base, "--infmax-json", str(out)]
    if pythonpath is not None:  # another checkout's plugin (--against)
        env["PYTHONPATH"] = str(pythonpath)
    marks_file = project / "phases.json"
    marks_file.unlink(missing_ok=True)
    env["WHOLE_RUN_PHASES"] = str(marks_file)
    wall, cpu, proc = _child_run(cmd, project, env)
    if proc.returncode != 0 or not out.is_file():
        raise _fail("ours (pytest)", proc)
    result = json.loads(out.read_text())["results"][0]
    client = result.get("client") or {}
    row: dict[str, Any] = {"wall": wall, "cpu": cpu, "streaming_cpu": client.get("cpu_seconds")}
    if phases:
        marks = json.loads(marks_file.read_text())
        for name, start, end in PHASES:
            row[name] = (cpu if end is None else marks[end]) - (0.0 if start is None else marks[start])
        row["post-run"] = sum(row[name] for name, _, _ in POST_RUN)
        row["not streaming"] = cpu - (client.get("cpu_seconds") or 0.0)
    return row


def run_floor(base: str, work: Path, streams: int, requests: int, tokens: int) -> dict[str, Any]:
    """--floor: client_overhead.py's protocol floor as a whole process (its interpreter, uvloop and
    aiohttp's import, then keep-alive connections that only look for each response's end): what
    the kernel and the event loop cost, below which no Python client on this machine goes."""
    cmd = [sys.executable, str(HERE / "client_overhead.py"), "_client", "protocol-floor", base + "/v1/completions"]
    cmd += [str(streams), str(requests), str(tokens)]
    env = _user_env(dict(os.environ))
    quiet_blas_threads(env)  # it imports numpy (our request builder): no BLAS spin in a floor
    wall, cpu, proc = _child_run(cmd, work, env)
    if proc.returncode != 0:
        raise _fail("the protocol floor", proc)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["requests"] != requests:
        raise _fail(f"the protocol floor completed {out['requests']} of {requests} requests:", proc)
    return {"wall": wall, "cpu": cpu, "streaming_cpu": out["cpu"]}


def make_tokenizer(peer_python: str, where: Path) -> Path:
    tokdir = where / "tokenizer"
    proc = subprocess.run([peer_python, "-c", MAKE_TOKENIZER, str(tokdir)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise _fail(f"building a tokenizer with {peer_python} (it needs transformers and tokenizers)", proc)
    return tokdir


def run_peer(
    base: str, work: Path, streams: int, requests: int, tokens: int, bench_serving: Path, peer_python: str, tokdir: Path
) -> dict[str, float | None]:
    results = work / f"peer-{streams}"
    results.mkdir(exist_ok=True)
    cmd = [peer_python, str(bench_serving / "benchmark_serving.py"), "--backend", "vllm", "--base-url", base]
    cmd += ["--endpoint", "/v1/completions", "--model", "whole-run", "--tokenizer", str(tokdir)]
    cmd += ["--dataset-name", "random", "--random-input-len", str(ISL), "--random-output-len", str(tokens)]
    cmd += ["--random-range-ratio", "1.0", "--num-prompts", str(requests), "--max-concurrency", str(streams)]
    cmd += ["--ignore-eos", "--disable-tqdm", "--save-result", "--result-dir", str(results)]
    env = _user_env(
        {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    )
    wall, cpu, proc = _child_run(cmd, bench_serving, env)
    if proc.returncode != 0:
        raise _fail("InferenceMAX's benchmark_serving.py", proc)
    saved = sorted(results.glob("*.json"), key=lambda f: f.stat().st_mtime)
    summary = json.loads(saved[-1].read_text()) if saved else {}
    if summary.get("completed") != requests:
        raise _fail(f"InferenceMAX's client completed {summary.get('completed')} of {requests} requests:", proc)
    for old in saved:
        old.unlink()
    return {"wall": wall, "cpu": cpu, "streaming_cpu": None}  # not measured: it would need instrumenting


def _spread(values: list[float | None], fmt: str = "{:.2f}") -> str:
    got = [v for v in values if v is not None]  # None: not measured
    if not got:
        return "-"
    return f"{fmt.format(statistics.median(got))} ({fmt.format(min(got))}-{fmt.format(max(got))})"


def _median(runs: dict[str, list[dict[str, Any]]], client: str, key: str = "cpu_per_mtok") -> float:
    return statistics.median(r[key] or 0.0 for r in runs[client])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[64, 256], help="concurrent streams (default 64 256)")
    p.add_argument("--tokens", type=int, default=1000, help="one-token events per request (default 1000)")
    p.add_argument("--itl-ms", type=float, default=10.0, help="the emitter's gap between events (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="requests per run = rounds x streams (default 2)")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs of each client (default 3)")
    p.add_argument("--bench-serving", type=Path, help="InferenceX's utils/bench_serving directory")
    p.add_argument("--peer-python", help="an interpreter with bench_serving's requirements (transformers...)")
    p.add_argument("--no-peer", action="store_true", help="measure ours alone")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also run client_overhead.py's protocol floor as a whole process: what no Python client goes under",
    )
    p.add_argument("--quick", action="store_true", help="a check that it works: 8 streams, 50 tokens, 1 run")
    p.add_argument("--json", type=Path, help="also write every run here")
    p.add_argument(
        "--all-plugins", action="store_true", help="ours with every pytest plugin of this venv, not our plugin alone"
    )
    p.add_argument(
        "--phases", action="store_true", help="ours: the CPU of each phase (start, setup, streaming, after it, exit)"
    )
    p.add_argument(
        "--against", type=Path, metavar="DIR", help="also run ours with the plugin of this checkout (on PYTHONPATH)"
    )
    args = p.parse_args(argv)
    if args.against is not None:
        if not (args.against / "pytest_infmax" / "plugin.py").is_file():
            p.error(f"--against {args.against}: no pytest_infmax/plugin.py there; give a checkout of the project")
        args.against = args.against.resolve()
    if args.quick:
        args.streams, args.tokens, args.rounds, args.runs = [8], 50, 1, 1
    if not args.no_peer:
        if args.bench_serving is None or not (args.bench_serving / "benchmark_serving.py").is_file():
            p.error(
                "--bench-serving DIR: InferenceX's utils/bench_serving (with benchmark_serving.py) is needed, "
                "or --no-peer to measure ours alone"
            )
        if not args.peer_python:
            p.error("--peer-python PY: an interpreter with transformers, aiohttp, numpy and tqdm (or --no-peer)")
        args.bench_serving = args.bench_serving.resolve()
    against = f"ours ({args.against.name})" if args.against is not None else None
    clients = ["ours", *([against] if against else []), *([] if args.no_peer else ["InferenceMAX"])]
    clients += ["protocol floor"] if args.floor else []
    ours_clients = {"ours": None, **({against: args.against} if against else {})}  # client -> its PYTHONPATH

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"emitter: one-token events every {args.itl_ms:g} ms, {args.tokens} per request; "
        f"{args.runs} interleaved runs of each client"
    )
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="infmax-whole-run-") as tmp:
        work = Path(tmp)
        tokdir = None if args.no_peer else make_tokenizer(args.peer_python, work)
        for streams in args.streams:
            requests = streams * args.rounds
            emitter_dir = work / f"emitter-{streams}"  # its port file: one per emitter
            emitter_dir.mkdir()
            proc, base, _ = client_overhead._start_emitter(emitter_dir, 1, args.itl_ms / 1000)
            runs: dict[str, list[dict[str, Any]]] = {c: [] for c in clients}
            try:
                # one untimed run of each client first: bytecode and page caches warm, as on a
                # machine that has run its benchmark before
                for path in ours_clients.values():
                    run_ours(base, work, min(streams, 8), min(streams, 8), 10, args.all_plugins, pythonpath=path)
                if tokdir is not None:
                    run_peer(
                        base, work, min(streams, 8), min(streams, 8), 10, args.bench_serving, args.peer_python, tokdir
                    )
                for _ in range(args.runs):
                    for client in clients:  # interleaved: a drift of the machine hits both
                        before = client_overhead._get_stats(base)
                        if client in ours_clients:
                            r = run_ours(
                                base,
                                work,
                                streams,
                                requests,
                                args.tokens,
                                args.all_plugins,
                                phases=args.phases,
                                pythonpath=ours_clients[client],
                            )
                        elif client == "protocol floor":
                            r = run_floor(base, work, streams, requests, args.tokens)
                        else:
                            assert tokdir is not None
                            r = run_peer(
                                base, work, streams, requests, args.tokens, args.bench_serving, args.peer_python, tokdir
                            )
                        after = client_overhead._get_stats(base)
                        mtok = (after["tokens"] - before["tokens"]) / 1e6
                        r["tokens"] = after["tokens"] - before["tokens"]
                        r["requests"] = after["requests"] - before["requests"]
                        r["cpu_per_mtok"] = r["cpu"] / mtok
                        streaming = r["streaming_cpu"]
                        r["streaming_cpu_per_mtok"] = None if streaming is None else streaming / mtok
                        runs[client].append(r)
                        rows.append({"streams": streams, "client": client, **r})
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
            print(f"\n{streams} streams, {requests} requests of {args.tokens} tokens a run:")
            print(
                f"  {'client':<14} {'wall s':>22} {'CPU s':>22} {'CPU s / M tok, whole run':>26} "
                f"{'CPU s / M tok, streaming':>26}"
            )
            for client in clients:
                rs = runs[client]
                print(
                    f"  {client:<14.14} {_spread([r['wall'] for r in rs]):>22} {_spread([r['cpu'] for r in rs]):>22} "
                    f"{_spread([r['cpu_per_mtok'] for r in rs], '{:.1f}'):>26} "
                    f"{_spread([r['streaming_cpu_per_mtok'] for r in rs], '{:.1f}'):>26}"
                )
            if args.phases:
                width = max(len(name) for name, _, _ in PHASES)
                print(f"\n  ours, CPU s per phase, median (min-max) of {args.runs}:")
                print(f"  {'phase':<{width}} " + " ".join(f"{c:>22}" for c in ours_clients))
                for name in [*(n for n, _, _ in PHASES), "post-run", "not streaming"]:
                    print(
                        f"  {name:<{width}} "
                        + " ".join(f"{_spread([r[name] for r in runs[c]], '{:.3f}'):>22}" for c in ours_clients)
                    )
                print(
                    f"  {'  of streaming, the measured phase':<{width}} "
                    + " ".join(f"{_spread([r['streaming_cpu'] for r in runs[c]], '{:.3f}'):>22}" for c in ours_clients)
                )
            if not args.no_peer:
                peer = _median(runs, "InferenceMAX")
                ours = _median(runs, "ours") / peer
                print(f"  ours / InferenceMAX, whole-run CPU per M tokens: {ours:.2f} (goal <= 0.25)")
                if args.floor:
                    floor = _median(runs, "protocol floor") / peer
                    print(f"  protocol floor / InferenceMAX, whole-run CPU per M tokens: {floor:.2f}")
            if args.floor:
                key = "streaming_cpu_per_mtok"
                streaming = _median(runs, "ours", key) / _median(runs, "protocol floor", key)
                print(f"  ours / protocol floor, CPU per M tokens while streaming: {streaming:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

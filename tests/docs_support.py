"""README.md and docs/*.md as tests, through Sybil (wired in by the root conftest.py).

Every ```python and ```console block of the documents is a test item, run in document
order in a per-document working directory:

* a ```python block that defines ``test_*`` functions is a pytest module as a user
  writes it: it is written to a file and run with ``python -m pytest`` in a subprocess
  (the plugin is installed, so the simulator starts by itself). It must pass, unless an
  ``<!-- expect-pytest: failed=1 ... -->`` directive before it states another outcome
  (and, one per line, fnmatch patterns the output must contain);
* any other ```python block is a fragment, executed in the document's namespace (with
  the working directory as current directory), which invisible setup blocks
  (``<!-- invisible-code-block: python ... -->``) prepare: ``docs`` there is the
  :class:`DocsContext`, whose :meth:`DocsContext.enter` keeps a server (or any context)
  open until the document's last example has run;
* every command of a ```console block runs for real, without a shell, unless
  :data:`POLICY` says otherwise (skipped, or only its flags checked against its
  ``--help``); ``pytest``, ``python`` and ``infmax`` are this interpreter's.

Sybil's own ``<!-- skip: next "reason" -->`` skips a block that needs what the suite
cannot have (a GPU, an engine). docs/development.md ("The docs are tests") is the
authors' guide.
"""

from __future__ import annotations

import ast
import enum
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sybil import Document, Example, Region, Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import CodeBlockParser, SkipParser
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer

ROOT = Path(__file__).resolve().parent.parent
DOC_PATTERNS = ("README.md", "docs/*.md")
BIN = Path(sys.executable).parent
# Seconds one documented command may take (a pytest run of the seeded project takes ~7 s).
COMMAND_TIMEOUT_S = 120.0
# The namespace key of a pending expect-pytest directive.
_EXPECT_KEY = "_docs_expect_pytest"
_T = TypeVar("_T")


class Action(enum.Enum):
    RUN = "run"
    FLAGS = "flags-only"  # the program exists and every flag of the command is in its --help
    SKIP = "skipped"


@dataclass(frozen=True)
class Rule:
    """What to do with a documented command whose argv starts with ``prefix``.

    ``when``: the rule applies only if the command has this argument.
    """

    prefix: tuple[str, ...]
    action: Action
    reason: str
    when: str | None = None

    def matches(self, argv: Sequence[str]) -> bool:
        words = normalise(argv)
        return tuple(words[: len(self.prefix)]) == self.prefix and (self.when is None or self.when in argv)


# The policy, in one place: the first rule whose prefix (and `when`) matches decides;
# a command no rule matches runs as written. Prefixes are in normalise()'s terms.
POLICY: tuple[Rule, ...] = (
    Rule(("make", "test"), Action.SKIP, "make test runs this very suite (what CI runs)"),
    Rule(("make", "demo"), Action.SKIP, "make demo creates .venv and runs examples/ (CI runs examples/ as part of it)"),
    Rule(("bash", "tests/gpu/run.sh"), Action.SKIP, "needs a GPU (docs/gpu-checks.md)"),
    Rule(("infmax", "sim"), Action.RUN, "lists the profiles and exits", when="--list-profiles"),
    Rule(("infmax", "sim"), Action.FLAGS, "serves until stopped"),
    Rule(("python", "-m", "pytest_infmax.sim"), Action.FLAGS, "serves until stopped"),
    Rule(
        ("python", "benchmarks/calibration.py"),
        Action.FLAGS,
        "~10 s on a quiet machine, ~30 s on 2 shared cores: the docs' whole budget; "
        "tests/test_sim_engine.py checks the calibrated figures",
    ),
    Rule(("python", "benchmarks/client_overhead.py"), Action.FLAGS, "takes 2 to 9 minutes"),
    Rule(("python", "benchmarks/timing_truth.py"), Action.FLAGS, "takes over a minute"),
    Rule(("python", "benchmarks/lateness.py"), Action.FLAGS, "takes 5 to 10 minutes on 2 cores"),
    Rule(("python", "benchmarks/soak.py"), Action.FLAGS, "takes 1 to 10 minutes"),
    Rule(("python", "benchmarks/startup.py"), Action.FLAGS, "a timing: ~1 minute of interleaved sessions"),
    Rule(("python", "benchmarks/ray_start.py"), Action.FLAGS, "starts a three-node Ray cluster: about a minute"),
    Rule(("python", "benchmarks/whole_run.py"), Action.FLAGS, "needs InferenceX's client; takes 1 to 12 minutes"),
    Rule(
        ("python", "benchmarks/agreement.py"),
        Action.FLAGS,
        "starts real vLLM (make vllm) and takes 3 to 10 minutes; tests/test_vllm.py covers what it compares",
    ),
    Rule(("python", "benchmarks/regression_error_rates_history.py"), Action.FLAGS, "takes 3 to 20 minutes"),
    Rule(("python", "benchmarks/regression_error_rates.py"), Action.FLAGS, "takes 40 s (--quick) to 3 minutes"),
    Rule(
        ("python", "benchmarks/regression_error_rates_sim.py"),
        Action.FLAGS,
        "60 fresh simulator starts: 1.5 (--quick) to 4.5 minutes",
    ),
    Rule(("python", "benchmarks/loop_stall.py"), Action.FLAGS, "starts real vLLM (make vllm); about a minute a run"),
    Rule(("python", "benchmarks/server_ttft.py"), Action.FLAGS, "a simulator start per run: about a minute"),
    Rule(("python", "benchmarks/micro.py"), Action.FLAGS, "a timing: about 30 s of interleaved rounds"),
    Rule(("python", "benchmarks/loopback_send.py"), Action.FLAGS, "a timing: ~10 s with its two processes pinned"),
    Rule(("python", "benchmarks/start_burst.py"), Action.FLAGS, "a simulator start per run: about 5 minutes"),
    Rule(("python", "benchmarks/client_collector.py"), Action.FLAGS, "a timing: a pytest session of ~35 s"),
    Rule(
        ("pytest",),
        Action.FLAGS,
        "each repeat restarts the simulator (~3 s a start on 2 shared cores: 20 repeats take a minute); "
        "tests/test_repeat.py runs the fresh-start path",
        when="--infmax-repeat",
    ),
)

# The small perf test project each document's working directory starts with: the
# README's quick-start test, kept tiny (named test_x, as the README's `-k test_x`). Its
# 20 ms steps dominate TTFT and TPOT, so that the documented baseline comparisons do not
# call a regression when the two shared cores are busy.
SEED_PROJECT: Mapping[str, str] = {
    "pytest.ini": "[pytest]\n",
    "perf/test_perf.py": textwrap.dedent(
        """\
        import pytest

        from pytest_infmax import Scenario


        @pytest.mark.infmax_server(sim_args="--decode-step-ms 20")
        @pytest.mark.sla("p99(ttft) < 500ms", "error_rate < 0.1%")
        def test_x(infmax):
            infmax.run(Scenario("tiny", 32, 16), concurrency=2, num_requests=4, warmup=0)
        """
    ),
}


# -- console commands ------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    text: str  # as documented (continuations joined, prompt and comment dropped)
    argv: tuple[str, ...]


def parse_console(source: str) -> list[Command]:
    """The commands of a console block: ``\\`` continues a line, ``$ `` is an optional
    prompt, ``#`` starts a comment (a line of its own, or trailing)."""
    commands: list[Command] = []
    pending = ""
    for raw in source.splitlines():
        line = (pending + " " + raw.strip()) if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = ""
        if line.startswith("$"):
            line = line[1:].lstrip()
        argv = shlex.split(line, comments=True)
        if argv:
            text = shlex.join(argv)
            commands.append(Command(text, tuple(argv)))
    if pending:
        raise ValueError(f"console block ends in a continuation: {pending!r}")
    return commands


def normalise(argv: Sequence[str]) -> list[str]:
    """argv with the program named as the policy names it: ``.venv/bin/python`` -> ``python``."""
    program = Path(argv[0]).name if argv[0].startswith((".venv/", "/")) or "/bin/" in argv[0] else argv[0]
    if re.fullmatch(r"python3?(\.\d+)?", program):
        program = "python"
    return [program, *argv[1:]]


def resolve(argv: Sequence[str]) -> list[str]:
    """The argv to execute: python, pytest and infmax are this interpreter's; a path into the
    repository's benchmarks/ is made absolute (the working directory is elsewhere)."""
    words = normalise(argv)
    program = words[0]
    if program == "python":
        words[0] = sys.executable
    elif (BIN / program).is_file():
        words[0] = str(BIN / program)
    return [str(ROOT / w) if w.startswith("benchmarks/") else w for w in words]


def decide(argv: Sequence[str]) -> Rule | None:
    """The policy's rule for a command (None: run it as written)."""
    return next((rule for rule in POLICY if rule.matches(argv)), None)


_FLAG = re.compile(r"--?[A-Za-z][\w-]*")


def help_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the command's --help invocation, the flags it uses). The program is argv up to the
    first flag (``python -m MODULE`` and ``python SCRIPT`` count as the program)."""
    words = list(argv)
    if normalise(words)[0] == "python":
        end = 3 if words[1:2] == ["-m"] else 2
    else:
        end = 1
        while end < len(words) and not words[end].startswith("-"):
            end += 1
    flags = [w.split("=", 1)[0] for w in words[end:] if _FLAG.fullmatch(w.split("=", 1)[0])]
    return [*words[:end], "--help"], flags


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    output: str

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def command_env(workdir: Path) -> dict[str, str]:
    """The environment a documented command runs in: the user's, without the outer
    pytest's and xdist's variables or INFMAX_* settings, this venv first on PATH, and the
    GitHub step summary (set in CI) pointed into the working directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "INFMAX_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["GITHUB_STEP_SUMMARY"] = str(workdir / "github-step-summary.md")
    return env


def run_command(argv: Sequence[str], cwd: Path, timeout: float = COMMAND_TIMEOUT_S) -> Completed:
    """Run ``argv`` (no shell) in its own process group, which is killed if it outlives
    ``timeout`` (or if we are interrupted)."""
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=command_env(cwd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=30)
        return Completed(tuple(argv), -1, f"{output}\n[timed out after {timeout:.0f} s]")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return Completed(tuple(argv), proc.returncode, output)


_help_cache: dict[tuple[str, ...], Completed] = {}


def prefetch_help(commands: Iterable[Sequence[str]], cwd: Path) -> None:
    """Run the ``--help`` of every command's program at once, each in its own process, into
    the cache :func:`missing_flags` reads (so that checking many programs takes as long as
    the slowest one, not their sum)."""
    pending = sorted({tuple(help_command(argv)[0]) for argv in commands} - _help_cache.keys())
    if not pending:
        return
    with ThreadPoolExecutor(max_workers=len(pending)) as pool:
        for key, done in zip(pending, pool.map(lambda key: run_command(resolve(key), cwd), pending)):
            _help_cache[key] = done


def missing_flags(argv: Sequence[str], cwd: Path) -> str | None:
    """None if the program's --help exits 0 and names every flag of the command; else why not."""
    help_argv, flags = help_command(argv)
    key = tuple(help_argv)
    if key not in _help_cache:
        _help_cache[key] = run_command(resolve(help_argv), cwd)
    done = _help_cache[key]
    if done.returncode != 0:
        return f"`{shlex.join(help_argv)}` exited {done.returncode}:\n{done.tail()}"
    unknown = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", done.output)]
    if unknown:
        return f"`{shlex.join(help_argv)}` does not list {', '.join(unknown)}"
    return None


class DocsCommandSkipped(UserWarning):
    """A documented command the policy skips, in a block where others ran."""


def evaluate_console(example: Example) -> str | None:
    ctx = docs_context(example)
    skipped: list[str] = []
    for command in parse_console(example.parsed):
        rule = decide(command.argv)
        if rule is not None and rule.action is Action.SKIP:
            skipped.append(f"`{command.text}`: {rule.reason}")
            continue
        if rule is not None and rule.action is Action.FLAGS:
            problem = missing_flags(command.argv, ctx.workdir)
            if problem:
                return f"`{command.text}` (flags-only: {rule.reason}): {problem}"
            continue
        done = run_command(resolve(command.argv), ctx.workdir)
        if done.returncode != 0:
            return f"`{command.text}` exited {done.returncode}; the output ends:\n{done.tail()}"
    if skipped:
        if len(skipped) == len(parse_console(example.parsed)):
            pytest.skip("; ".join(skipped))
        warnings.warn(DocsCommandSkipped("; ".join(skipped)), stacklevel=1)
    return None


# -- python blocks -----------------------------------------------------------------------------


def is_pytest_module(source: str) -> bool:
    """A block that defines test functions (or Test classes) at top level is a test module."""
    tree = ast.parse(source)
    return any(
        (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"))
        or (isinstance(node, ast.ClassDef) and node.name.startswith("Test"))
        for node in tree.body
    )


_OUTCOME = re.compile(r"(passed|failed|errors|skipped)=(\d+)")


@dataclass(frozen=True)
class Expectation:
    """The outcome of a pytest-module block: counts, and fnmatch patterns of output lines."""

    counts: Mapping[str, int]
    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, arguments: str, body: str) -> Expectation:
        words = arguments.split()
        matches = [_OUTCOME.fullmatch(w) for w in words]
        if not words or not all(matches):
            raise ValueError(f"expect-pytest takes passed=N failed=N errors=N skipped=N, not {arguments!r}")
        counts = {m.group(1): int(m.group(2)) for m in matches if m}
        return cls(counts, tuple(line.strip() for line in body.splitlines() if line.strip()))


DEFAULT_EXPECTATION = Expectation({"failed": 0, "errors": 0})


def junit_counts(path: Path) -> dict[str, int]:
    suite = ET.parse(path).getroot()
    if suite.tag == "testsuites":
        suite = suite[0]
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    return {
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
    }


def run_pytest_module(example: Example, expect: Expectation) -> str | None:
    """Run the block as the test module a user writes, the way a user runs it."""
    ctx = docs_context(example)
    stem = Path(example.path).stem.lower().replace("-", "_")
    where = ctx.modules / f"{stem}_line{example.line}"
    where.mkdir()
    (where / "pytest.ini").write_text("[pytest]\n")
    module = where / f"test_{stem}_line{example.line}.py"
    module.write_text(str(example.parsed))
    xml = where / "junit.xml"
    done = run_command(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={xml}", module.name], where
    )
    if not xml.is_file():
        return f"pytest wrote no report (exit {done.returncode}); the output ends:\n{done.tail()}"
    counts = junit_counts(xml)
    wrong = {k: counts[k] for k, n in expect.counts.items() if counts[k] != n}
    if counts["passed"] + counts["failed"] + counts["errors"] == 0 or wrong:
        return (
            f"expected {dict(expect.counts)} of the module's tests, got {counts} (exit {done.returncode}); "
            f"the output ends:\n{done.tail()}"
        )
    if expect.patterns:
        try:
            pytest.LineMatcher(done.output.splitlines()).fnmatch_lines(list(expect.patterns))
        except pytest.fail.Exception as exc:
            return f"the output does not show what the document says:\n{exc}"
    return None


_python = PythonEvaluator()


def evaluate_python(example: Example) -> str | None:
    expect = example.namespace.pop(_EXPECT_KEY, None)
    if is_pytest_module(example.parsed):
        return run_pytest_module(example, expect or DEFAULT_EXPECTATION)
    if expect is not None:
        return "expect-pytest must come before a pytest module (a block that defines test functions)"
    with docs_context(example).inside():
        _python(example)
    return None


class ExpectPytestParser:
    """``<!-- expect-pytest: failed=1`` (then output patterns, one a line) ``-->``:
    the outcome of the next pytest-module block."""

    def __init__(self) -> None:
        self.lexer = DirectiveInHTMLCommentLexer(directive="expect-pytest", arguments=".*?")

    def __call__(self, document: Document) -> Iterable[Region]:
        for region in self.lexer(document):
            region.parsed = Expectation.parse(region.lexemes["arguments"], str(region.lexemes["source"]))
            region.evaluator = self.evaluate
            yield region

    @staticmethod
    def evaluate(example: Example) -> None:
        if _EXPECT_KEY in example.namespace:
            raise ValueError("two expect-pytest directives without a pytest module between them")
        example.namespace[_EXPECT_KEY] = example.parsed


# -- the per-document context ------------------------------------------------------------------


class DocsContext:
    """A document's working directory (seeded with :data:`SEED_PROJECT`) and what its
    examples started, closed after its last example."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="infmax-docs-"))
        self.workdir = self.base / "work"  # the console commands' and fragments' directory
        self.modules = self.base / "modules"  # pytest-module blocks, each in its own directory
        self.modules.mkdir()
        for name, text in SEED_PROJECT.items():
            path = self.workdir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self._stack = ExitStack()

    def enter(self, context: AbstractContextManager[_T]) -> _T:
        """Enter ``context`` (a server, ...) until the document's examples are done."""
        return self._stack.enter_context(context)

    @contextmanager
    def inside(self) -> Iterator[None]:
        """The working directory as current directory, and the step summary pointed into it."""
        old_cwd, old_summary = os.getcwd(), os.environ.get("GITHUB_STEP_SUMMARY")
        os.chdir(self.workdir)
        os.environ["GITHUB_STEP_SUMMARY"] = str(self.workdir / "github-step-summary.md")
        try:
            yield
        finally:
            os.chdir(old_cwd)
            if old_summary is None:
                os.environ.pop("GITHUB_STEP_SUMMARY", None)
            else:
                os.environ["GITHUB_STEP_SUMMARY"] = old_summary

    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def _postgres_support() -> Any:
    """tests/_postgres.py (the suite's PostgreSQL server), loaded as docs_support itself is."""
    if "_postgres" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_postgres", ROOT / "tests" / "_postgres.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["_postgres"] = module
        spec.loader.exec_module(module)
    return sys.modules["_postgres"]


def postgres_available() -> bool:
    """Whether a PostgreSQL server can be started here (docs/baselines.md skips its store example if not)."""
    support = _postgres_support()
    try:
        support.check_available()
    except support.PostgresUnavailable:
        return False
    return True


@contextmanager
def postgres_environment() -> Iterator[None]:
    """A real PostgreSQL server until the document's end, with libpq's variables (PGHOST, PGPORT,
    PGUSER) pointing at it, so that a documented ``postgresql:///postgres`` reaches it."""
    names = ("PGHOST", "PGPORT", "PGUSER")
    saved = {name: os.environ.get(name) for name in names}
    with _postgres_support().running_postgres() as server:
        os.environ.update(PGHOST=str(server.directory), PGPORT=str(server.port), PGUSER=server.user)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def docs_context(example: Example) -> DocsContext:
    ctx = example.namespace["docs"]
    assert isinstance(ctx, DocsContext)
    return ctx


def setup_document(namespace: dict[str, Any]) -> None:
    namespace["docs"] = DocsContext()


def teardown_document(namespace: dict[str, Any]) -> None:
    ctx = namespace.pop("docs", None)
    if isinstance(ctx, DocsContext):
        ctx.close()
    if namespace.pop(_EXPECT_KEY, None) is not None:
        raise ValueError("an expect-pytest directive with no pytest module after it")


def make_sybil(root: Path, patterns: Sequence[str] = DOC_PATTERNS) -> Sybil:
    return Sybil(
        parsers=[
            CodeBlockParser("python", evaluate_python),
            CodeBlockParser("console", evaluate_console),
            ExpectPytestParser(),
            SkipParser(),
        ],
        patterns=list(patterns),
        path=str(root),
        setup=setup_document,
        teardown=teardown_document,
    )


# -- pytest-xdist: a document's examples run on one worker, in order ---------------------------


# Test modules whose tests share one expensive server (a module fixture): one unit of work
# together, so that one worker starts each once (tests/test_vllm.py: real vLLM, a minute to
# start; tests/test_rayworkers.py: a three-node Ray cluster, 10-15 s), and the two never run
# beside each other. Side by side on 2 cores each starved the other: in a fresh-clone run
# (2026-12-07) vLLM's Ctrl-C test took 154 s (48 s alone) and a Ray test's read of the
# simulator's /sim/stats timed out after 10 s (the test took 104 s; under 10 s alone).
ONE_WORKER_MODULES = ("tests/test_vllm.py", "tests/test_rayworkers.py")
HEAVY_SERVERS_UNIT = "heavy servers: " + " ".join(ONE_WORKER_MODULES)

# Tests that run in the vLLM module's unit of work, before or after it, never beside it. Twice
# in CI (2026-12-06) the simulator under a stand-in whose worker had left its process group
# neither listened nor exited for 60 s, while real vLLM started on the other worker; it has
# not been reproduced by hand (12 runs beside the vLLM module passed). A startup timeout now
# says what each of the server's processes is doing (launch._process_states) for the next time.
WITH_VLLM_TESTS = (
    "tests/test_engines.py::test_child_that_left_the_process_group_is_killed",
    "tests/test_engines.py::test_crash_is_seen_at_once_though_a_worker_it_started_lives_on",
    "tests/test_engines.py::test_leader_killed_mid_run_is_a_dead_server_though_a_worker_lives_on",
    "tests/test_engines.py::test_port_taken_by_a_server_whose_worker_lives_on_is_retried",
)


def document_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist load``, except that a document's examples are one unit of work: they share
    a namespace and a working directory, so they must run on one worker, in order. The
    tests of the modules in :data:`ONE_WORKER_MODULES`, and :data:`WITH_VLLM_TESTS`, are
    one unit too, run in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class DocumentScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return DocumentScheduling(config, log)


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to under :func:`document_scheduler` (its node id
    where it is a unit of its own)."""
    path = nodeid.split("::", 1)[0]
    if path in ONE_WORKER_MODULES or nodeid.startswith(WITH_VLLM_TESTS):
        return HEAVY_SERVERS_UNIT
    return path if path.endswith(".md") else nodeid

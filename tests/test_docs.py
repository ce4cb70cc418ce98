"""The docs machinery (tests/docs_support.py): its parsing and policy, and that a document
which drifted from the code fails (README.md and docs/*.md themselves run as tests too)."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from docs_support import (
    POLICY,
    ROOT,
    Action,
    Expectation,
    decide,
    help_command,
    is_pytest_module,
    make_sybil,
    normalise,
    parse_console,
    work_unit,
)

SUPPORT = Path(__file__).with_name("docs_support.py")


def test_console_blocks_are_split_into_commands() -> None:
    source = textwrap.dedent(
        """\
        # a comment line
        $ pytest perf/ --infmax-json results/perf.json \\
             --infmax-html "results/my report.html"   # trailing comment

        .venv/bin/python benchmarks/soak.py --quick         # 60 s
        """
    )
    assert [c.argv for c in parse_console(source)] == [
        ("pytest", "perf/", "--infmax-json", "results/perf.json", "--infmax-html", "results/my report.html"),
        (".venv/bin/python", "benchmarks/soak.py", "--quick"),
    ]
    with pytest.raises(ValueError, match="continuation"):
        parse_console("pytest \\\n")


def test_policy_decisions() -> None:
    assert normalise([".venv/bin/python", "x.py"]) == ["python", "x.py"]
    assert decide(["make", "test"]).action is Action.SKIP  # type: ignore[union-attr]
    assert decide(["infmax", "sim", "--list-profiles"]).action is Action.RUN  # type: ignore[union-attr]
    assert decide(["infmax", "sim", "--profile", "b200/gpt-oss-120b"]).action is Action.FLAGS  # type: ignore[union-attr]
    assert decide(["infmax", "table", "results.json"]) is None  # runs as written
    assert decide(["pytest", "--infmax-compare", "main", "--infmax-repeat", "20"]).action is Action.FLAGS  # type: ignore[union-attr]
    assert help_command(["python", "-m", "pytest_infmax.sim", "--port", "8000", "--stall-ms=5,30"]) == (
        ["python", "-m", "pytest_infmax.sim", "--help"],
        ["--port", "--stall-ms"],
    )
    assert help_command(["infmax", "sim", "--tp", "1"]) == (["infmax", "sim", "--help"], ["--tp"])


def test_the_heavy_servers_share_one_unit_of_work_and_other_tests_spread() -> None:
    """Real vLLM and the Ray cluster run on one xdist worker, one after the other: beside
    each other on 2 cores each starved the other past its timeouts."""
    vllm = work_unit("tests/test_vllm.py::test_vllm_starts_and_is_ready")
    ray = work_unit("tests/test_rayworkers.py::test_open_loop_on_ray_keeps_the_single_process_schedule")
    beside_vllm = work_unit("tests/test_engines.py::test_child_that_left_the_process_group_is_killed")
    assert vllm == ray == beside_vllm
    # a document's examples are one unit each; any other test is a unit of its own
    assert work_unit("README.md::line:181,column:1") == work_unit("README.md::line:280,column:1") == "README.md"
    assert work_unit("tests/test_sim.py::test_a") != work_unit("tests/test_sim.py::test_b")
    assert vllm not in (work_unit("tests/test_sim.py::test_a"), "README.md")


def test_every_rule_is_used_by_a_documented_command() -> None:
    """A rule no document needs any more is dead policy: drop it."""
    sybil = make_sybil(ROOT)
    commands = [
        command.argv
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for example in sybil.parse(path).examples()
        if example.region.evaluator is not None
        and getattr(example.region.evaluator, "__name__", "") == "evaluate_console"
        for command in parse_console(example.parsed)
    ]
    assert len(commands) >= 20
    unused = [rule.prefix for rule in POLICY if not any(rule.matches(argv) for argv in commands)]
    assert not unused, f"policy rules no documented command matches: {unused}"


def test_pytest_modules_and_expectations_are_recognised() -> None:
    assert is_pytest_module("import pytest\n\n@pytest.mark.sla('x')\ndef test_a(infmax):\n    pass\n")
    assert not is_pytest_module("result = infmax.run('1k1k-mini', concurrency=2)\nprint(result)\n")
    expect = Expectation.parse("failed=1 passed=0", "\n*SLA failed*\n")
    assert expect.counts == {"failed": 1, "passed": 0} and expect.patterns == ("*SLA failed*",)
    with pytest.raises(ValueError, match="expect-pytest takes"):
        Expectation.parse("fails", "")


def test_readme_and_docs_are_collected_by_the_suite(pytestconfig: pytest.Config) -> None:
    """Plain `pytest` from the root collects every document: testpaths names them and the
    root conftest's collector (this session's) takes each one with a runnable block."""
    text = (ROOT / "pyproject.toml").read_text()
    testpaths = re.search(r"^testpaths = (\[.*\])$", text, re.MULTILINE)
    assert testpaths is not None and {"tests", "README.md", "docs"} <= set(json.loads(testpaths.group(1)))
    root_conftest = next(
        p for p in pytestconfig.pluginmanager.get_plugins() if getattr(p, "__file__", None) == str(ROOT / "conftest.py")
    )
    sybil = make_sybil(ROOT)
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    runnable = [p for p in documents if re.search(r"^```(python|console)$", p.read_text(), re.MULTILINE)]
    assert len(runnable) >= 8 and all(sybil.should_parse(p) for p in runnable)
    assert root_conftest.pytest_collect_file.__qualname__ == sybil.pytest().__qualname__


DRIFTED = {
    # a flags-only command (serves forever) with a flag the simulator does not have
    "flags_only": """
        ```console
        infmax sim --port 8000 --decode-step-msec 4
        ```
        """,
    # a command that runs, with a flag its program does not have
    "runs": """
        ```console
        infmax table --no-such-flag results.json
        ```
        """,
    # a Python fragment that no longer works
    "fragment": """
        ```python
        from pytest_infmax import Scenario

        assert Scenario("s", 64, 32).no_such_attribute
        ```
        """,
    # a pytest module the document presents as passing
    "module": """
        ```python
        def test_fails():
            assert 1 + 1 == 3
        ```
        """,
    # a pytest module said to fail, which passes
    "expected": """
        <!-- expect-pytest: failed=1 -->

        ```python
        def test_passes():
            pass
        ```
        """,
}

FINE = {
    "fine": """
        ```console
        $ infmax --version
        infmax table --help    # runs
        infmax sim --port 8000 --decode-step-ms 4
        ```

        <!-- invisible-code-block: python
        answer = 42
        -->

        ```python
        assert answer == 42
        ```

        <!-- skip: next "needs a GPU" -->

        ```python
        raise AssertionError("skipped, never run")
        ```

        ```console
        make test
        ```
        """,
}


def test_the_docs_machinery_fails_a_document_that_drifted(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        f"""
        import importlib.util, sys
        from pathlib import Path

        spec = importlib.util.spec_from_file_location("docs_support", {str(SUPPORT)!r})
        docs_support = importlib.util.module_from_spec(spec)
        sys.modules["docs_support"] = docs_support
        spec.loader.exec_module(docs_support)
        pytest_collect_file = docs_support.make_sybil(Path(__file__).parent, patterns=["*.md"]).pytest()
        """
    )
    for name, text in {**DRIFTED, **FINE}.items():
        pytester.makefile(".md", **{name: textwrap.dedent(text)})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    # One failure per drifted document, none elsewhere; the fine document's examples pass or skip.
    failed = {
        line.split()[1].split("::")[0] for line in result.outlines if line.startswith("FAILED ") and ".md::" in line
    }
    assert failed == {f"{name}.md" for name in DRIFTED}, result.stdout.str()
    result.assert_outcomes(failed=len(DRIFTED), passed=5, skipped=2)
    result.stdout.fnmatch_lines_random(
        [
            "*`infmax sim --help` does not list --decode-step-msec*",
            "*`infmax table --no-such-flag results.json` exited 2*",
            "*AttributeError*no_such_attribute*",
            "*expected {'failed': 0, 'errors': 0} of the module's tests, got {'passed': 0, 'failed': 1*",
            "*expected {'failed': 1} of the module's tests, got {'passed': 1, 'failed': 0*",
            "*SKIPPED*needs a GPU*",
            "*SKIPPED*`make test`: make test runs this very suite*",
        ]
    )

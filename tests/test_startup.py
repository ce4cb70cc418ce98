"""pytest imports the plugin in every session of a project that installs it, perf tests or
not. Such a session pays for the settings, not for numpy, scipy, aiohttp and the rest of
the load path: those are imported where they are used (pytest_infmax/lazy.py). What that
is worth in milliseconds is measured by benchmarks/startup.py (docs/performance.md); these
tests hold the property it rests on, which no timing can flake."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pytest_infmax
from pytest_infmax import servers
from pytest_infmax.lazy import HEAVY_MODULES, LazyModule, lazy_module

HEAVY = HEAVY_MODULES

# Prints every module the session imported, as its last act.
MODULES_CONFTEST = """
import json, sys

def pytest_sessionfinish(session):
    sys.stdout.write("\\nINFMAX-MODULES " + json.dumps(sorted(sys.modules)) + "\\n")
"""

PLAIN_TESTS = """
import pytest

def test_one():
    assert 1 + 1 == 2

@pytest.mark.parametrize("n", [1, 2])
def test_two(n):
    assert n
"""

# Perf tests with every marker the plugin checks at collection (the SLA grammar, a price, a
# repeat count, a server configuration): checking them needs no heavy module either.
PERF_TESTS = """
import pytest

@pytest.mark.sla("p99(ttft) < 500ms", "p50(tpot) < 20ms", "error_rate < 1%")
@pytest.mark.infmax_price(gpu_hour_usd=2.5)
@pytest.mark.infmax_repeat(3)
@pytest.mark.infmax_server(startup_timeout=30)
def test_perf(infmax):
    infmax.run("1k1k-mini", concurrency=2)
"""


def _session_modules(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tests: str) -> set[str]:
    """The modules a ``pytest --co`` session of ``tests`` imported, the plugin on and no other
    plugin loaded (an installed one could bring numpy itself)."""
    pytester.makeconftest(MODULES_CONFTEST)
    pytester.makepyfile(test_plain=tests)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = pytester.runpytest_subprocess("--co", "-p", "pytest_infmax.plugin", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    line = next((x for x in result.outlines if x.startswith("INFMAX-MODULES ")), None)
    assert line is not None, result.stdout.str()
    return set(json.loads(line.removeprefix("INFMAX-MODULES ")))


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def test_a_session_without_perf_tests_imports_no_heavy_module(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules = _session_modules(pytester, monkeypatch, PLAIN_TESTS)
    assert "pytest_infmax.plugin" in modules and "pytest_infmax.settings" in modules  # the plugin ran
    assert _heavy(modules) == []
    # nor the load path, the runner or the report writers: they are a perf test's
    later = ("pytest_infmax.load", "pytest_infmax.run", "pytest_infmax.reports")
    assert sorted(m for m in modules if m.startswith(later)) == []


def test_collecting_perf_tests_checks_their_markers_without_a_heavy_module(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules = _session_modules(pytester, monkeypatch, PERF_TESTS)
    assert "pytest_infmax.measure.verdicts" in modules  # the SLA marker was parsed
    assert _heavy(modules) == []


def test_a_bad_marker_is_still_refused_at_collection(pytester: pytest.Pytester) -> None:
    """The checks moved behind imports still run: a malformed SLA stops the session."""
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.sla("p99(ttft) <")
        def test_bad(infmax):
            pass
        """
    )
    result = pytester.runpytest_subprocess("--co")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_bad.py::test_bad: @pytest.mark.sla:*"])


def _run_python(code: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_importing_the_package_imports_no_heavy_module() -> None:
    out = _run_python(
        """
        import json, sys
        import pytest_infmax, pytest_infmax.plugin, pytest_infmax.servers
        print(json.dumps({"modules": sorted(sys.modules)}))
        """
    )
    modules = set(out["modules"])  # type: ignore[call-overload]
    assert _heavy(modules) == []
    assert "pytest_infmax.run.runner" not in modules and "pytest_infmax.servers.launch" not in modules


def test_writing_the_json_alone_imports_no_other_reports_writer(tmp_path: Path) -> None:
    """A run's usual end writes the JSON and its sidecar: the HTML, Markdown, plots and
    pytest-benchmark writers are imported where those reports are asked for."""
    out = _run_python(
        f"""
        import json, sys
        from pathlib import Path
        from pytest_infmax.reports.writer import ReportRequest, write_reports
        doc = {{"format": "pytest-infmax/1", "results": [{{"name": "t", "records": []}}]}}
        assert write_reports(doc, ReportRequest(json=Path({str(tmp_path / "r.json")!r}))).ok
        print(json.dumps({{"modules": sorted(sys.modules)}}))
        """
    )
    others = ["reports.html", "reports.markdown", "reports.plots", "baselines.benchmark"]
    assert [m for m in others if f"pytest_infmax.{m}" in out["modules"]] == []  # type: ignore[operator]


def test_the_load_path_imports_ray_only_for_a_run_that_asks_for_it() -> None:
    out = _run_python(
        """
        import json, sys
        import pytest_infmax.load.generator, pytest_infmax.load.rayworkers, pytest_infmax.run.runner
        print(json.dumps({"modules": sorted(sys.modules)}))
        """
    )
    modules = out["modules"]
    assert "pytest_infmax.load.rayworkers" in modules  # type: ignore[operator]
    assert [m for m in modules if m.split(".")[0] == "ray"] == []  # type: ignore[attr-defined]


def test_every_public_name_is_the_object_its_module_defines() -> None:
    """``from pytest_infmax import X`` works for every name in ``__all__`` (imported at first
    use), and gives the very object of the module that defines it."""
    out = _run_python(
        """
        import json
        from pytest_infmax import *
        import pytest_infmax, pytest_infmax.servers
        names = {
            pkg.__name__: {n: getattr(pkg, n).__module__ if hasattr(getattr(pkg, n), "__module__") else None
                           for n in pkg.__all__}
            for pkg in (pytest_infmax, pytest_infmax.servers)
        }
        print(json.dumps(names))
        """
    )
    assert set(out["pytest_infmax"]) == set(pytest_infmax.__all__)  # type: ignore[call-overload]
    for package in (pytest_infmax, servers):
        for name in package.__all__:
            value = getattr(package, name)
            home = sys.modules[value.__module__] if hasattr(value, "__module__") else None
            assert home is None or getattr(home, name) is value, name
        assert set(package.__all__) <= set(dir(package))
    assert pytest_infmax.__version__
    with pytest.raises(AttributeError, match="no attribute 'Infmaks'"):
        pytest_infmax.Infmaks  # noqa: B018
    with pytest.raises(ImportError, match="Infmaks"):
        from pytest_infmax import Infmaks  # type: ignore[attr-defined]  # noqa: F401


@pytest.mark.parametrize("package", [pytest_infmax, servers], ids=lambda p: p.__name__)
def test_the_lazy_names_are_the_typed_names(package: object) -> None:
    """What mypy reads (the ``if TYPE_CHECKING:`` imports), what ``__getattr__`` imports and
    ``__all__`` are the same names, from the same modules."""
    path = Path(package.__file__)  # type: ignore[attr-defined]
    tree = ast.parse(path.read_text())
    typed: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module is not None
                typed.update({alias.name: imp.module for alias in imp.names})
    lazy = {name: module for module, names in _lazy_table(tree).items() for name in names}
    assert typed == lazy
    assert set(lazy) | ({"__version__"} & set(package.__all__)) == set(package.__all__)  # type: ignore[attr-defined]


def _lazy_table(tree: ast.Module) -> dict[str, tuple[str, ...]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_attributes":
            value = ast.literal_eval(node.args[1])
            assert isinstance(value, dict)
            return value
    raise AssertionError("no lazy_attributes(...) table")


def test_a_lazy_module_is_imported_at_its_first_attribute_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "infmax_lazy_probe.py").write_text("VALUE = 42\n\ndef double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "infmax_lazy_probe", raising=False)
    probe = lazy_module("infmax_lazy_probe")
    assert isinstance(probe, LazyModule) and "infmax_lazy_probe" not in sys.modules
    assert probe.double(probe.VALUE) == 84
    real = sys.modules["infmax_lazy_probe"]
    assert probe.double is real.double and "double" in vars(probe)  # kept: later reads are plain
    with pytest.raises(AttributeError, match="nothing_here"):
        probe.nothing_here  # noqa: B018


def test_a_lazy_module_that_is_missing_says_so_at_first_use() -> None:
    missing = lazy_module("infmax_no_such_module")
    with pytest.raises(ModuleNotFoundError, match="infmax_no_such_module"):
        missing.anything  # noqa: B018


def test_the_load_generator_imports_what_a_request_uses_before_any_clock_starts() -> None:
    """Laziness stops at the load path: numpy loads numpy.random at first use (~25 ms, more on
    a busy machine), which in a worker's first request was a send late by 90 ms. Importing the
    generator (as the runner and every worker do before their run) loads it."""
    out = _run_python(
        """
        import json, sys
        import pytest_infmax.load.generator
        print(json.dumps({"modules": sorted(sys.modules)}))
        """
    )
    modules = set(out["modules"])  # type: ignore[call-overload]
    assert {"numpy", "numpy.random", "msgspec", "httptools"} <= modules

"""Every figure is a metric (issue 15): cost, energy, power and the server's own figures are
registered metrics, so they are SLAs, frontier SLAs, gated, and in every report.

Tried as a user would: before this, ``@pytest.mark.sla("cost_per_mtok < $0.05")`` was
"invalid SLA ... expected a number after '<'", every cost or energy name was "unknown
metric", cost was never gated, a regression-failed test showed ``SLA PASS``, and the
server's bucket-interpolated TTFT p50 was shown as if measured.

The objectives below are generated from the registry, so a figure registered later is
tested here without a new line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_infmax.measure.registry import METRICS, MetricInfo

# prefix caching on: its hit rate is measured (0 for random prompts), not missing
B200 = "--profile b200/gpt-oss-120b --max-num-seqs 8 --enable-prefix-caching"
NEW = [info for info in METRICS.values() if info.source != "requests"]


def _lhs(info: MetricInfo) -> str:
    return f"{info.stats[0]}({info.name})" if info.takes_stat else info.name


def _unit(info: MetricInfo) -> str:
    return {"$/Mtok": "$/Mtok", "%": "%", "": ""}.get(info.unit, f" {info.unit}")


def _holding(info: MetricInfo) -> str:
    if info.dimension == "ratio":
        return f"{_lhs(info)} <= 100%"
    if info.higher_is_better:
        return f"{_lhs(info)} > 0{_unit(info)}"
    if info.dimension == "cost":
        return f"{_lhs(info)} < $1000000"
    return f"{_lhs(info)} < 1e12{_unit(info)}"


def _failing(info: MetricInfo) -> str:
    if info.higher_is_better and info.dimension == "ratio":
        return f"{_lhs(info)} > 100%"
    if info.higher_is_better:
        return f"{_lhs(info)} > 1e18{_unit(info)}"
    if info.dimension == "cost":
        return f"{_lhs(info)} < $0"
    return f"{_lhs(info)} < 0{_unit(info)}"


PROJECT = f"""
import pytest
from pytest_infmax import Scenario

TINY = Scenario("tiny", 64, 16)
HOLDING = {[_holding(i) for i in NEW]!r}
FAILING = {[_failing(i) for i in NEW]!r}

@pytest.mark.infmax_server(sim_args={B200!r})
@pytest.mark.sla(*HOLDING)
def test_holds(infmax):
    infmax.run(TINY, concurrency=2, duration=1.3)

@pytest.mark.infmax_server(sim_args={B200!r})
@pytest.mark.sla(*FAILING)
def test_fails(infmax):
    infmax.run(TINY, concurrency=2, duration=1.3)  # the server's gauges are sampled once a second
"""


@pytest.fixture(scope="module")
def figures_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One session: an SLA on every new figure that holds, and one that fails, with every report."""
    path = tmp_path_factory.mktemp("figures")
    (path / "test_perf.py").write_text(PROJECT)
    (path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--infmax-usd-per-kwh",
            "0.12",
            "--infmax-json",
            "out.json",
            "--infmax-markdown",
            "out.md",
            "--infmax-html",
            "out.html",
            "--infmax-benchmark-json",
            "bench.json",
            "--junitxml",
            "junit.xml",
        ],
        cwd=path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return {"path": path, "out": proc.stdout + proc.stderr, "ret": proc.returncode}


def _result(doc: dict, test: str) -> dict:
    return next(r for r in doc["results"] if r["name"].endswith(test))


def test_an_sla_on_every_new_figure_holds_and_fails_with_its_measured_value(figures_run: dict) -> None:
    assert figures_run["ret"] == 1, figures_run["out"]
    doc = json.loads((figures_run["path"] / "out.json").read_text())
    holds, fails = _result(doc, "test_holds"), _result(doc, "test_fails")
    assert [v["passed"] for v in holds["sla"]] == [True] * len(NEW), holds["sla"]
    assert [v["passed"] for v in fails["sla"]] == [False] * len(NEW)
    for verdict in fails["sla"]:
        assert verdict["measured"] is not None, verdict["message"]
        assert "measured " in verdict["message"] and "not measured" not in verdict["message"], verdict
    messages = {v["objective"].split(" ")[0]: v["message"] for v in fails["sla"]}
    m = fails["metrics"]
    assert f"measured ${m['cost_per_mtok']:.4g}/Mtok" in messages["cost_per_mtok"]
    assert "priced at $2.34/GPU-hour x 1 GPU" in messages["cost_per_mtok"]  # B200 neocloud, the profile's GPU
    assert f"measured {m['energy_per_token']:.4g} J/token" in messages["energy_per_token"]
    assert "modelled (" in messages["energy_per_token"]  # the simulator's power model, said so
    assert f"measured {m['power']:.4g} W" in messages["power"]
    # the server's p50 is a bucket, judged at its worse end; its mean is exact
    assert "within one histogram bucket" not in messages["mean(server_ttft)"]
    # the terminal says it once per failure, with the measured value
    assert "SLA failed: cost_per_mtok < $0/Mtok (measured $" in figures_run["out"]


def test_every_report_carries_the_figures_and_how_they_were_got(figures_run: dict) -> None:
    path = figures_run["path"]
    doc = json.loads((path / "out.json").read_text())
    m = _result(doc, "test_holds")["metrics"]
    assert m["provenance"]["price"].startswith("priced at $2.34/GPU-hour")
    assert m["provenance"]["energy"].startswith("modelled")
    assert m["energy_cost_per_mtok"] > 0  # at the $/kWh given
    # tokens per MW, InferenceMAX's way: throughput per GPU x 1000 / kW per GPU
    assert m["tokens_per_mw"] == pytest.approx(m["throughput_per_gpu"] * 1000 / (m["power_per_gpu"] / 1000), rel=0.02)
    props = {
        p.get("name"): p.get("value")
        for case in ET.parse(path / "junit.xml").getroot().iter("testcase")
        if case.get("name") == "test_holds"
        for p in case.iter("property")
    }
    for info in NEW:
        if info.kind == "scalar" and m[info.name] is not None:
            assert float(props[f"infmax_{info.name}"]) == pytest.approx(m[info.name]), info.name
    assert props["infmax_verdict"] == "PASS"
    assert (props["infmax_isl"], props["infmax_osl"], props["infmax_endpoint"]) == ("64", "16", "completions")
    md = (path / "out.md").read_text()
    assert "### Cost" in md and "cost_per_mtok ($/Mtok)" in md and "priced at $2.34/GPU-hour" in md
    assert "❌ FAIL (SLA)" in md and "✅ PASS" in md
    html = (path / "out.html").read_text()
    assert "how it was obtained" in html and "energy_per_token" in html and "modelled (" in html
    bench = json.loads((path / "bench.json").read_text())
    extra = next(b["extra_info"] for b in bench["benchmarks"] if "test_holds" in b["name"])
    assert extra["scalars"]["cost_per_mtok"] == pytest.approx(m["cost_per_mtok"])
    assert extra["scalar_units"]["energy_per_token"] == "J/token"
    assert extra["provenance"]["price"].startswith("priced at")


def test_a_figure_that_was_not_measured_fails_saying_why_and_how(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf="""
        import pytest

        @pytest.mark.infmax_server(metrics_path="")
        @pytest.mark.sla("cost_per_mtok < $5", "energy_per_token < 5 J", "tokens_per_mw > 1 tok/s/MW",
                         "mean(server_ttft) < 5s")
        def test_unmeasured(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-json", "out.json")
    result.assert_outcomes(failed=1)
    doc = json.loads((pytester.path / "out.json").read_text())
    messages = [v["message"] for v in doc["results"][0]["sla"]]
    assert all(m.startswith("FAILED ") and ": not measured: " in m for m in messages), messages
    assert "--infmax-gpu-hour-usd" in messages[0]  # how to price it
    assert "models no power" in messages[1] and "models no power" in messages[2]
    assert "metrics_path" in messages[3]
    result.stdout.fnmatch_lines(["*SLA failed: cost_per_mtok < $5/Mtok (not measured); *"])


def test_frontier_slas_on_cost_and_energy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf=f"""
        import pytest
        from pytest_infmax import Scenario
        from pytest_infmax.run.sweep import FrontierSLAFailed

        @pytest.mark.infmax_server(sim_args={B200!r})
        def test_sweep(infmax):
            sweep = infmax.sweep(Scenario("tiny", 64, 16), concurrency=[1, 4], num_requests=8, warmup=0)
            lo, hi = sweep.frontier("cost_per_mtok", "interactivity").x_range
            x = (lo + hi) / 2
            (v,) = sweep.check(f"cost_per_mtok@interactivity={{x}} < $1000")
            assert v.passed and "$" in v.message
            sweep.check(f"tokens_per_mw@interactivity={{x}} > 1 tok/s/MW")
            with pytest.raises(FrontierSLAFailed, match=r"cost_per_mtok@interactivity=.* < \\$0.0001: \\$"):
                sweep.check(f"cost_per_mtok@interactivity={{x}} < $0.0001")

        def test_unpriced(infmax):
            sweep = infmax.sweep("1k1k-mini", concurrency=[1, 2], num_requests=2, warmup=0)
            with pytest.raises(FrontierSLAFailed, match="not measured at every point .c=1: the default simulator"):
                sweep.check("cost_per_mtok@interactivity=10 < $1")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_a_failed_frontier_sla_is_the_sweep_rows_verdict(pytester: pytest.Pytester) -> None:
    """A sweep whose frontier SLA failed its test said FAIL (test) on every point, as if an
    assert of the user's had failed; its rows now name the frontier SLA, in every report."""
    pytester.makepyfile(
        test_perf="""
        def test_sweep(infmax):
            sweep = infmax.sweep("1k1k-mini", concurrency=[1, 2], num_requests=4, warmup=0)
            lo, hi = sweep.frontier().x_range
            sweep.check(f"throughput_per_gpu@interactivity={(lo + hi) / 2} > 1M tok/s")
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-markdown", "out.md", "--junitxml", "junit.xml"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_sweep?c=1?*FAIL (frontier SLA)*", "*test_sweep?c=2?*FAIL (frontier SLA)*"])
    props = {p.get("name"): p.get("value") for p in ET.parse(pytester.path / "junit.xml").getroot().iter("property")}
    assert props["infmax[c=1]_verdict"] == props["infmax[c=2]_verdict"] == "FAIL (frontier SLA)"
    assert "❌ FAIL (frontier SLA)" in (pytester.path / "out.md").read_text()


@pytest.mark.slow
def test_cost_is_gated_and_compared_from_results_files(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf="""
        def test_one(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=12, warmup=2)
        """
    )
    pytester.makeini("[pytest]\ninfmax_sim_args = --decode-step-ms 2\nasyncio_default_fixture_loop_scope = function\n")
    args = ("-p", "no:cacheprovider", "--infmax-gpu-hour-usd", "2.0")
    pytester.runpytest_subprocess(*args, "--infmax-save", "default", "--infmax-json", "base.json").assert_outcomes(
        passed=1
    )
    second = pytester.runpytest_subprocess(*args, "--infmax-json", "cur.json")
    second.assert_outcomes(passed=1)
    (check,) = json.loads((pytester.path / "cur.json").read_text())["checks"]
    gated = [row["metric"] for row in check["comparison"]["rows"]]
    assert "cost_per_mtok" in gated, gated  # docs/baselines.md: cost is gated when a price is given
    cli = subprocess.run(
        [sys.executable, "-m", "pytest_infmax.cli", "compare", "base.json", "cur.json", "--metrics", "cost_per_mtok"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode in (0, 1), cli.stderr
    assert "cost_per_mtok" in cli.stdout and "not measured" not in cli.stdout + cli.stderr


@pytest.mark.slow
def test_a_regression_is_the_rows_verdict_in_every_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf="""
        import pytest

        @pytest.mark.sla("p99(ttft) < 10s")
        def test_one(infmax):
            infmax.run("1k1k-mini", concurrency=4, num_requests=24, warmup=4)
        """
    )
    fast = "--decode-step-ms 2 --decode-ms-per-seq 0.01"
    pytester.makeini(f"[pytest]\ninfmax_sim_args = {fast}\nasyncio_default_fixture_loop_scope = function\n")
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-save", "default").assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--infmax-compare-force",
        f"--infmax-sim-args={fast} --slowdown 2",
        "--infmax-json",
        "out.json",
        "--infmax-markdown",
        "out.md",
        "--infmax-html",
        "out.html",
        "--junitxml",
        "junit.xml",
    )
    result.assert_outcomes(failed=1)
    # the SLA held, the regression failed the test: the row says so, not "SLA PASS"
    result.stdout.fnmatch_lines(["*test_perf.py::test_one*FAIL (regression)*"])
    props = {p.get("name"): p.get("value") for p in ET.parse(pytester.path / "junit.xml").getroot().iter("property")}
    assert props["infmax_sla"] == "PASS" and props["infmax_verdict"] == "FAIL (regression)"
    md = (pytester.path / "out.md").read_text()
    assert "❌ FAIL (regression)" in md and "1 failed (1 regression)" in md
    # the whole comparison, every gated metric with baseline, current, change, interval, p, verdict
    assert "| metric | baseline | current | change | interval | p | verdict |" in md
    assert "| p50(tpot) |" in md and "❌ REGRESSED" in md and "| p99(ttft) |" in md
    html = (pytester.path / "out.html").read_text()
    assert "FAIL (regression)" in html and 'class="comparison"' in html
    table = subprocess.run(
        [sys.executable, "-m", "pytest_infmax.cli", "table", "out.json"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "FAIL (regression)" in table.stdout  # infmax table and the session agree: one row builder


def test_the_row_builder_is_the_only_one() -> None:
    """Every report reads rows from reports/rows.py (issue 15: two builders disagreed on the SLA cell)."""
    root = Path(__file__).resolve().parents[1] / "pytest_infmax"
    builders = [
        path.relative_to(root).as_posix()
        for path in root.rglob("*.py")
        if "def result_row(" in path.read_text() or "def summary(self)" in path.read_text()
    ]
    assert builders == ["reports/rows.py"]

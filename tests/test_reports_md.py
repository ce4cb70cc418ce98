"""The Markdown summary and $GITHUB_STEP_SUMMARY, from real results against the simulator."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from pytest_infmax.measure.cost import TokenCost, default_price, user_price
from pytest_infmax.measure.verdicts import SLAFailed
from pytest_infmax.reports.markdown import (
    STEP_SUMMARY_LIMIT,
    markdown_summary,
    sweep_to_dict,
    write_github_step_summary,
)
from pytest_infmax.run.runner import Infmax
from pytest_infmax.run.sweep import FrontierSLAFailed
from pytest_infmax.servers.launch import ServerConfig, running_server

NAME = "tests/test_perf.py::test_chat_c2"


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run with a failed and a met SLA, and a 3-point sweep whose frontier SLA fails."""
    logs = tmp_path_factory.mktemp("logs")
    with running_server(ServerConfig(sim_args=("--decode-step-ms", "2")), logs) as server:
        result = Infmax(server, name=NAME).run("1k1k-mini", concurrency=2, num_requests=6)
        with pytest.raises(SLAFailed):  # check() records the verdicts the report shows
            result.check("p99(ttft) < 0.001ms", "p50(tpot) < 1s")
        sweep_runner = Infmax(server, name="tests/test_perf.py::test_sweep")
        with pytest.raises(FrontierSLAFailed):
            sweep_runner.sweep(
                "1k1k-mini",
                concurrency=[1, 2, 4],
                num_requests=6,
                frontier_sla=["throughput_per_gpu@interactivity=1000000 > 1 tok/s"],
                price=default_price("H200", "hyperscaler"),
            )
    return {
        "result": result,
        "dict": result.to_dict(),
        "sweep_results": [r.to_dict() for r in sweep_runner.results],
        "sweep_runner": sweep_runner,
    }


def table_rows(md: str) -> list[list[str]]:
    """The first table's rows, split on unescaped pipes."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| test |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([c.strip() for c in cells])
    return rows


def test_results_table_and_failed_sla(real: dict[str, Any]) -> None:
    d = real["dict"]
    m = d["metrics"]
    md = markdown_summary([d])
    assert md.startswith("## infmax results\n")
    assert "**❌ 1 result, 1 failed (1 SLA).**" in md
    header, align, row = table_rows(md)
    assert header == [
        "test",
        "scenario",
        "ISL/OSL",
        "endpoint",
        "load",
        "requests",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "TPOT p50 (ms)",
        "interactivity (tok/s/user)",
        "throughput (tok/s/GPU)",
        "errors",
        "verdict",
    ]
    assert len(align) == len(header)
    cells = dict(zip(header, row))
    assert cells["test"] == f"`{NAME}`"
    assert cells["scenario"] == "1k1k-mini" and cells["load"] == "c=2" and cells["requests"] == "6"
    assert cells["TTFT p50 (ms)"] == f"{m['ttft']['p50'] * 1000:.1f}"
    assert cells["TTFT p99 (ms)"] == f"{m['ttft']['p99'] * 1000:.1f}"
    assert cells["TPOT p50 (ms)"] == f"{m['tpot']['p50'] * 1000:.2f}"
    assert cells["interactivity (tok/s/user)"] == f"{m['interactivity']['p50']:.1f}"
    assert cells["throughput (tok/s/GPU)"] == f"{m['throughput_per_gpu']:,.0f}"
    assert cells["errors"] == "0.0%"
    assert cells["verdict"] == "❌ FAIL (SLA)"
    failed = md.split("### Failed SLAs", 1)[1]
    assert f"- `{NAME}` (1k1k-mini c=2): FAILED p99(ttft) < 0.001 ms: measured" in failed
    assert "p50(tpot)" not in failed  # the met objective is not listed as failed


def test_cost_column_with_its_price_source(real: dict[str, Any]) -> None:
    d = real["dict"]
    price = user_price(2.0, "--infmax-gpu-hour-usd")
    md = markdown_summary([d], price=price)
    header, _, row = table_rows(md)
    cells = dict(zip(header, row))
    by_hand = 2.0 * 1 / (d["metrics"]["throughput"] * 3600) * 1e6
    assert cells["$ / M tokens"] == f"${by_hand:.4f} [1]"
    assert "[1] price: $2/GPU-hour, user-set (--infmax-gpu-hour-usd)" in md

    # A cost the result carries wins over the price given to the summary.
    with_cost = copy.deepcopy(d)
    tc = TokenCost.of(default_price("B200", "neocloud"), 1, d["metrics"]["throughput"], 1.0, 1.0)
    with_cost["cost"] = tc.to_dict()
    md = markdown_summary([with_cost], price=price)
    cells = dict(zip(*table_rows(md)[::2]))
    assert cells["$ / M tokens"] == f"${tc.total:.4f} [1]"
    assert "SemiAnalysis TCO survey" in md and "B200 neocloud" in md
    # No price anywhere: no cost column at all.
    assert "$ / M tokens" not in markdown_summary([d])


def test_passing_results_and_errors(real: dict[str, Any]) -> None:
    d = copy.deepcopy(real["dict"])
    d["sla"] = [v for v in d["sla"] if v["passed"]]
    d["passed"] = True
    d["metrics"]["num_ok"], d["metrics"]["error_rate"] = 5, 1 / 6
    d["metrics"]["errors_by_kind"] = {"timeout": 1}
    md = markdown_summary([d])
    assert "**✅ 1 result, every check passed.**" in md and "Failed SLAs" not in md
    cells = dict(zip(*table_rows(md)[::2]))
    assert cells["requests"] == "5/6 ok"
    assert cells["errors"] == "16.7% (1 timeout)"
    assert cells["verdict"] == "✅ PASS"


def test_sweeps_frontier_verdicts_and_checks(real: dict[str, Any]) -> None:
    from pytest_infmax.run.sweep import SweepResult

    runner = real["sweep_runner"]
    sweep = SweepResult(list(runner.results), price=default_price("H200", "hyperscaler"))
    with pytest.raises(FrontierSLAFailed):
        sweep.check("throughput_per_gpu@interactivity=1000000 > 1 tok/s")
    sd = sweep_to_dict(sweep)
    assert sd["name"] == "tests/test_perf.py::test_sweep"
    assert sd["points"] == [f"tests/test_perf.py::test_sweep[c={c}]" for c in (1, 2, 4)]
    assert len(sd["costs"]) == 3 and sd["price"]["tier"] == "hyperscaler"
    checks = [{"name": "baseline", "passed": False, "message": "p99(ttft) 40% above main"}]
    md = markdown_summary(real["sweep_results"], [sd], checks)
    assert "**❌ 3 results, 1 frontier SLA missed, 1 failed check.**" in md
    section = md.split("### Sweeps", 1)[1]
    assert "- `tests/test_perf.py::test_sweep` (1k1k-mini):" in section
    assert "❌ FAILED throughput_per_gpu@interactivity=1000000 > 1 tok/s:" in section
    assert "outside the measured range" in section
    assert "- ❌ `baseline`: p99(ttft) 40% above main" in md


def test_energy_in_the_summary(real: dict[str, Any]) -> None:
    measured = copy.deepcopy(real["dict"])
    measured["energy"] = {
        "measured": True,
        "modelled": False,
        "source": "NVML total-energy counter; GPUs 0 H200",
        "energy_j": 1400.0,
        "avg_power_w": 700.0,
        "j_per_token": 1.0,
        "j_per_input_token": 2.0,
        "j_per_output_token": 2.0,
        "tokens_per_s_per_mw": 1e6,
        "energy_usd": 3.9e-5,
        "usd_per_kwh": 0.1,
        "energy_usd_per_mtok": 0.0278,
    }
    missing = copy.deepcopy(real["dict"])
    missing["name"] = "tests/test_perf.py::test_other"
    missing["energy"] = {"measured": False, "reason": "NVML did not initialise: Driver Not Loaded"}
    md = markdown_summary([measured, missing])
    header, _, row1, row2 = table_rows(md)
    assert dict(zip(header, row1))["J / token"] == "1"
    assert dict(zip(header, row2))["J / token"] == "not measured"
    energy = md.split("### Energy", 1)[1]
    assert "| 1,400.0 J | 700 | 2 | 2 | 1,000,000 | $0.000039 ($0.1/kWh, $0.0278/M tok) |" in energy
    assert "| not measured |" in energy and "Driver Not Loaded" in energy


def test_names_with_pipes_and_tags_stay_in_their_cell(real: dict[str, Any]) -> None:
    d = copy.deepcopy(real["dict"])
    d["name"] = "tests/t.py::test_x[a|b-<script>]"
    d["sla"][0]["message"] = "FAILED <b>bold</b> | pipe"
    md = markdown_summary([d])
    header, _, row = table_rows(md)
    assert len(row) == len(header)
    assert row[0] == "`tests/t.py::test_x[a\\|b-<script>]`"  # inside code: shown literally
    assert "&lt;b>bold&lt;/b> \\| pipe" in md


def test_no_results() -> None:
    assert "No perf results were recorded." in markdown_summary([])


def test_step_summary_is_appended_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "step_summary.md"
    path.write_text("## from an earlier step of this job\n", encoding="utf-8")
    env = {"GITHUB_STEP_SUMMARY": str(path)}
    assert write_github_step_summary("## first\n", env) == path
    assert write_github_step_summary("## second", env) == path
    assert path.read_text(encoding="utf-8") == "## from an earlier step of this job\n\n## first\n\n## second\n"


def test_step_summary_not_set_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.chdir(tmp_path)
    assert write_github_step_summary("## x\n") is None
    assert write_github_step_summary("## x\n", {"GITHUB_STEP_SUMMARY": ""}) is None
    assert list(tmp_path.iterdir()) == []


def test_step_summary_is_cut_at_githubs_limit(tmp_path: Path) -> None:
    path = tmp_path / "summary.md"
    path.write_text("x" * 1000 + "\n", encoding="utf-8")
    huge = "".join(f"| row {i} | {'y' * 100} |\n" for i in range(20_000))  # over 2 MiB
    write_github_step_summary(huge, {"GITHUB_STEP_SUMMARY": str(path)})
    text = path.read_text(encoding="utf-8")
    assert path.stat().st_size <= STEP_SUMMARY_LIMIT
    assert text.startswith("x" * 1000 + "\n\n| row 0 |")
    assert text.rstrip().endswith("see the report artifacts.")

"""Workload sizes as users write them (issue 19, item 1): ``run(isl=, osl=, range_ratio=)``,
``Scenario(isl=, osl=)`` without a name, "did you mean" for a misspelt keyword (and for the
names vLLM's and SGLang's benchmarks use), and ISL/OSL and the endpoint in every report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pytest_infmax import LoadConfigError
from pytest_infmax.load.scenarios import PRESETS, Scenario
from pytest_infmax.reports.html import render_html
from pytest_infmax.reports.markdown import markdown_summary
from pytest_infmax.reports.rows import result_row
from pytest_infmax.reports.table import format_table
from pytest_infmax.run.runner import Infmax, scenario_of
from pytest_infmax.servers.launch import Server, ServerConfig, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # fast steps: each request is a few tens of milliseconds
    config = ServerConfig(sim_args=("--decode-step-ms", "1"), startup_timeout=30.0)
    with running_server(config, tmp_path_factory.mktemp("workloads")) as s:
        yield s


def test_run_takes_isl_and_osl_as_users_write_them(server: Server) -> None:
    """Before: TypeError: Infmax._plan() got an unexpected keyword argument 'isl'."""
    result = Infmax(server).run(isl=40, osl=6, concurrency=2, num_requests=8, warmup=0)
    assert result.config.scenario == Scenario("isl40-osl6", 40, 6, 0.8, "completions")
    measured = [r for r in result.records if not r.warmup]
    assert len(measured) == 8 and all(r.ok for r in measured)
    # lengths uniform in [int(0.8·L), L], counted by the server (usage)
    assert all(32 <= (r.input_tokens or 0) <= 40 for r in measured), [r.input_tokens for r in measured]
    assert all(4 <= (r.output_tokens or 0) <= 6 for r in measured), [r.output_tokens for r in measured]

    exact = Infmax(server).run(isl=24, osl=4, range_ratio=1.0, concurrency=2, num_requests=4, warmup=0)
    assert {r.input_tokens for r in exact.records} == {24} and {r.output_tokens for r in exact.records} == {4}


def test_every_report_shows_isl_osl_and_endpoint(server: Server) -> None:
    infmax = Infmax(server, name="test_x")
    chat = infmax.run(isl=20, osl=3, endpoint="chat", concurrency=1, num_requests=2, warmup=0)
    completions = infmax.run("1k1k-mini", osl=5, concurrency=1, num_requests=2, warmup=0)
    docs = [chat.to_dict(), completions.to_dict()]
    rows = [result_row(d) for d in docs]
    assert [(r["isl"], r["osl"], r["shape"], r["endpoint"]) for r in rows] == [
        (20, 3, "20/3", "chat"),
        (128, 5, "128/5", "completions"),
    ]
    assert rows[1]["scenario"] == "isl128-osl5"  # new lengths, a name that says them
    assert [r["range_ratio"] for r in rows] == [0.8, 0.8]

    table = format_table(rows).splitlines()
    header = table[0].split()
    assert header[1:4] == ["scenario", "ISL/OSL", "endpoint"]
    assert table[2].split()[1:4] == ["isl20-osl3", "20/3", "chat"]
    assert table[3].split()[1:4] == ["isl128-osl5", "128/5", "completions"]

    md = markdown_summary(docs)
    assert "| scenario | ISL/OSL | endpoint | load |" in md
    assert "| isl20-osl3 | 20/3 | chat | c=1 |" in md

    html = render_html(docs, plots=None, environment={})
    assert "<th>scenario</th><th>ISL/OSL</th><th>endpoint</th><th>load</th>" in html
    assert '<td class="num">20/3</td><td class="nowrap">chat</td>' in html
    assert '<td class="num">128/5</td><td class="nowrap">completions</td>' in html


def test_misspelt_and_other_tools_keywords_name_the_right_one(server: Server) -> None:
    infmax = Infmax(server)
    cases = {
        "ils": "did you mean isl=?",
        "random_input_len": "did you mean isl=?",  # vLLM's and SGLang's bench_serving
        "random_output_len": "did you mean osl=?",
        "random_range_ratio": "did you mean range_ratio=?",
        "request_rate": "did you mean rate=?",
        "num_prompts": "did you mean num_requests=?",
        "concurrencey": "did you mean concurrency=?",
    }
    for name, hint in cases.items():
        with pytest.raises(LoadConfigError, match=rf"infmax.run\(\) has no argument {name}=4; {hint}"):
            infmax.run(**{name: 4})
    with pytest.raises(LoadConfigError, match="isl= without osl=: give both"):
        infmax.run(isl=64, concurrency=1)
    with pytest.raises(LoadConfigError, match="unknown scenario '1k1k-mni'; did you mean '1k1k-mini'"):
        infmax.run("1k1k-mni", concurrency=1)
    with pytest.raises(LoadConfigError, match="range_ratio must be in"):
        infmax.run(isl=64, osl=8, range_ratio=0, concurrency=1)
    assert infmax.results == []  # nothing was sent


def test_scenario_without_a_name() -> None:
    s = Scenario(isl=512, osl=64)
    assert (s.name, s.isl, s.osl, s.range_ratio, s.endpoint) == ("isl512-osl64", 512, 64, 0.8, "completions")
    assert s.shape == "512/64"
    assert Scenario("mine", 512, 64).name == "mine"  # the positional form is unchanged
    with pytest.raises(ValueError, match=r"first argument is its name, got 512; write Scenario\(isl=..., osl=...\)"):
        Scenario(512, 64)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs isl= and osl="):
        Scenario(isl=512)


def test_range_ratio_is_inferencemax_s_interval() -> None:
    """range_ratio r draws lengths uniformly from [r·L, L] (InferenceMAX: 0.8), every preset too."""
    assert {s.range_ratio for s in PRESETS.values()} == {0.8}
    rng = np.random.default_rng(0)
    for ratio, low in ((0.8, 80), (0.5, 50), (1.0, 100)):
        lengths = [Scenario(isl=100, osl=10, range_ratio=ratio).sample_lengths(rng)[0] for _ in range(2000)]
        assert min(lengths) == low and max(lengths) == 100
        assert abs(np.mean(lengths) - (low + 100) / 2) < 1.5  # uniform
    # vLLM's symmetric --random-range-ratio b (lengths in [L(1-b), L(1+b)]) written here
    b, length = 0.25, 400
    s = Scenario(isl=round(length * (1 + b)), osl=8, range_ratio=(1 - b) / (1 + b))
    lengths = [s.sample_lengths(rng)[0] for _ in range(2000)]
    assert min(lengths) == 300 and max(lengths) == 500


def test_workload_combines_a_scenario_with_sizes() -> None:
    assert scenario_of(None) == PRESETS["1k1k-mini"]
    assert scenario_of("8k1k", range_ratio=1.0).name == "8k1k"  # same lengths, same name
    assert scenario_of("8k1k", isl=4096) == Scenario("isl4096-osl1024", 4096, 1024)
    assert scenario_of(Scenario(isl=10, osl=2), endpoint="chat").endpoint == "chat"


def test_a_results_file_without_the_shape_still_makes_rows(tmp_path: Path) -> None:
    row = result_row({"name": "old", "load": {"scenario": {"name": "x"}, "concurrency": 1}, "metrics": {}})
    assert (row["shape"], row["endpoint"], row["isl"]) == ("?", "?", None)


def test_sweep_takes_sizes_too(server: Server) -> None:
    sweep = Infmax(server, name="s").sweep(isl=16, osl=3, concurrency=[1, 2], num_requests=2, warmup=0)
    assert [r.config.scenario.name for r in sweep.results] == ["isl16-osl3"] * 2
    assert [r.name for r in sweep.results] == ["s[c=1]", "s[c=2]"]

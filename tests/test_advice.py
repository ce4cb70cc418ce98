"""An ``unsure`` verdict says why and what to do: how many runs settle a regression of the
minimum effect, and which side lacks them, in the terminal table, Markdown, HTML and JSON."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_compare import runs

from pytest_infmax.baselines.advice import runs_advice, settles
from pytest_infmax.baselines.compare import CompareOptions, Gate, compare_runs
from pytest_infmax.baselines.gate import GateOutcome, GateSettings
from pytest_infmax.reports.html import render_html
from pytest_infmax.reports.markdown import markdown_summary

MARGIN = math.log1p(0.05)
ALPHA = 0.001  # one-sided: alpha 1 % over 10 gates


def test_one_baseline_run_lacks_baseline_runs_and_says_how_many() -> None:
    advice = runs_advice(0.03, 1, 1, min_effect=0.05, one_sided_alpha=ALPHA, prior_df=4)
    assert advice.current_needed is None  # 1/k alone is too wide: no number of current runs is enough
    assert advice.lacking in ("baseline", "both")
    assert advice.balanced is not None and settles(0.03, advice.balanced, advice.balanced, MARGIN, ALPHA, 4, 0.95)
    assert not settles(0.03, advice.balanced - 1, advice.balanced - 1, MARGIN, ALPHA, 4, 0.95)
    assert "5% regression" in advice.text() and "run sd 3.0%" in advice.text()


def test_a_long_history_leaves_the_current_side_to_grow_and_the_number_is_the_fewest() -> None:
    advice = runs_advice(0.02, 20, 1, min_effect=0.05, one_sided_alpha=ALPHA, prior_df=4)
    assert advice.lacking == "current"
    n = advice.current_needed
    assert n is not None and n > 1
    assert settles(0.02, 20, n, MARGIN, ALPHA, 4, 0.95) and not settles(0.02, 20, n - 1, MARGIN, ALPHA, 4, 0.95)
    assert f"{n} current runs in all (have 1" in advice.text()
    # a larger minimum effect needs fewer runs; a noisier testbed more
    assert runs_advice(0.02, 20, 1, min_effect=0.10, one_sided_alpha=ALPHA, prior_df=4).current_needed < n
    noisy = runs_advice(0.03, 20, 1, min_effect=0.05, one_sided_alpha=ALPHA, prior_df=4)
    assert noisy.current_needed is None or noisy.current_needed > n


def test_the_advised_runs_do_catch_a_regression_of_the_minimum_effect() -> None:
    """Follow the advice on synthetic runs (2 % between starts): a 5 % TPOT regression is caught."""
    opts = CompareOptions(gates=(Gate.parse("p50(tpot)"),))
    first = compare_runs(runs(1, 12, run_sd=0.02), runs(2, 1, run_sd=0.02, scale=1.05), options=opts)
    advice = first.rows[0].advice if first.verdict == "unsure" else None
    if advice is None:  # the draw settled already: take the advice of an unsure draw
        advice = runs_advice(
            first.rows[0].run_sd, 12, 1, min_effect=0.05, one_sided_alpha=opts.alpha, prior_df=opts.prior_df
        )
    assert advice.lacking == "current" and advice.current_needed is not None
    n = advice.current_needed
    caught = sum(
        compare_runs(runs(100 + t, 12, run_sd=0.02), runs(500 + t, n, run_sd=0.02, scale=1.05), options=opts).verdict
        == "regressed"
        for t in range(20)
    )
    assert caught >= 16, f"{caught}/20 caught with {n} current runs"


def test_unsure_shows_the_advice_in_every_report() -> None:
    """The issue's case: +30 % TPOT from 1 baseline run against 1 current run is unsure, and says why."""
    report = compare_runs(runs(1, 1, run_sd=0.02), runs(2, 1, run_sd=0.02, scale=1.3))
    assert report.verdict == "unsure"
    advice = report.advice
    assert advice is not None and advice.lacking in ("baseline", "both")
    line = report.summary_line()
    assert "to settle a 5% regression of " in line and "lack" in line
    assert f"unsure: {advice.text()}" in report.format_table()
    doc = report.to_dict()
    assert doc["advice"]["lacking"] == advice.lacking and doc["advice"]["text"] == advice.text()
    unsure_rows = [r for r in doc["rows"] if r["verdict"] == "unsure"]
    assert unsure_rows and all(r["advice"]["balanced"] for r in unsure_rows)
    assert all(r["advice"] is None for r in doc["rows"] if r["verdict"] != "unsure")
    check = GateOutcome("t::a", report).to_check(GateSettings(directory=Path(".")))
    md = markdown_summary([], checks=[check])
    assert "to settle a 5% regression" in md and "**Unsure**" in md
    html = render_html([], checks=[check], plots=None)
    assert "Unsure: to settle a 5% regression of " in html


def test_a_settled_comparison_gives_no_advice() -> None:
    report = compare_runs(runs(1, 1), runs(2, 1, scale=2.0))
    assert report.verdict == "regressed" and report.advice is None
    assert "to settle" not in report.summary_line() and report.to_dict()["advice"] is None


@pytest.mark.parametrize("k,n", [(1, 1), (3, 1), (10, 3), (20, 20)])
def test_advice_never_asks_for_fewer_runs_than_there_are(k: int, n: int) -> None:
    advice = runs_advice(0.025, k, n, min_effect=0.05, one_sided_alpha=ALPHA, prior_df=4)
    for needed, have in ((advice.current_needed, n), (advice.baseline_needed, k)):
        assert needed is None or needed >= have

"""The history's predictive distribution: a PR's few fresh starts against a long history."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from test_compare import runs

from pytest_infmax.baselines.compare import CompareOptions, compare_runs
from pytest_infmax.baselines.predictive import max_t_critical, predictive_compare

HISTORY, STARTS = 20, 3


def test_five_percent_slowdown_against_20_runs_of_history_is_regressed_with_3_starts() -> None:
    """20 history runs and 3 fresh starts, each start 1 % apart: a 5 % slower TPOT is flagged."""
    history = runs(1, HISTORY, run_sd=0.01)
    report = compare_runs(history, runs(2, STARTS, run_sd=0.01, scale=1.05))
    assert report.verdict == "regressed", report.format_table()
    row = next(r for r in report.rows if r.label == "p50(tpot)")
    assert row.verdict == "regressed"
    assert row.change == pytest.approx(0.05, abs=0.02)
    assert row.method.startswith(f"predictive: mean of {STARTS} new starts vs {HISTORY}-run history")


@pytest.mark.parametrize("seed", range(6))
def test_no_change_against_20_runs_of_history_is_not_regressed(seed: int) -> None:
    history = runs(10 + seed, HISTORY, run_sd=0.01)
    report = compare_runs(history, runs(100 + seed, STARTS, run_sd=0.01))
    assert report.verdict != "regressed", report.format_table()
    assert all("predictive" in r.method for r in report.rows)


def test_predictive_interval_is_the_student_t_one() -> None:
    """One statistic: mean(x) - mean(y) +- t(1 - alpha, n + m - 2) * s * sqrt(1/n + 1/m), s pooled."""
    rng = np.random.default_rng(5)
    y, x = rng.normal(0, 0.02, (20, 1)), rng.normal(0.05, 0.02, (3, 1))
    pc = predictive_compare(y, x, [1.0], alpha=0.01, skew_correction=False)
    (iv,) = pc.intervals
    s = math.sqrt((np.sum((y - y.mean()) ** 2) + np.sum((x - x.mean()) ** 2)) / 21)
    se = s * math.sqrt(1 / 20 + 1 / 3)
    t = sps.t.ppf(0.99, 21)
    assert pc.df == 21 and pc.critical == pytest.approx(t)
    assert iv.change == pytest.approx(float(x.mean() - y.mean()))
    assert (iv.lo, iv.hi) == pytest.approx((iv.change - t * se, iv.change + t * se))


def test_a_history_skewed_towards_worse_widens_the_worse_side_only() -> None:
    """Tail statistics of short runs are skewed across starts (a stall or none): one new start
    must not be flagged for landing in the long tail the history already shows."""
    rng = np.random.default_rng(8)
    y = np.log(0.010 + rng.exponential(0.002, (20, 1)))
    x = y[:1] + 0.0
    plain = predictive_compare(y, x, [1.0], alpha=0.01, skew_correction=False).intervals[0]
    fixed = predictive_compare(y, x, [1.0], alpha=0.01).intervals[0]
    assert fixed.lo < plain.lo and fixed.hi == pytest.approx(plain.hi)
    assert fixed.worse_critical > plain.worse_critical
    mirrored = predictive_compare(-y, -x, [-1.0], alpha=0.01).intervals[0]  # throughput: larger is better
    assert mirrored.hi == pytest.approx(-fixed.lo) and mirrored.lo == pytest.approx(-fixed.hi)
    left = predictive_compare(-y, -x, [1.0], alpha=0.01).intervals[0]  # skewed towards better: no change
    assert left.lo == pytest.approx(
        predictive_compare(-y, -x, [1.0], alpha=0.01, skew_correction=False).intervals[0].lo
    )


def test_prior_adds_its_pseudo_runs_to_the_variance_and_the_degrees_of_freedom() -> None:
    rng = np.random.default_rng(6)
    y, x = rng.normal(0, 0.01, (20, 1)), rng.normal(0, 0.01, (1, 1))
    flat = predictive_compare(y, x, [1.0], alpha=0.01)
    nig = predictive_compare(y, x, [1.0], alpha=0.01, prior_sd=[0.05], prior_df=4)
    ss = float(np.sum((y - y.mean()) ** 2))
    assert nig.df == flat.df + 4
    assert nig.intervals[0].run_sd == pytest.approx(math.sqrt((4 * 0.05**2 + ss) / 23))
    assert nig.intervals[0].run_sd > flat.intervals[0].run_sd


def test_max_t_critical_lies_between_one_t_and_bonferroni() -> None:
    """Perfectly correlated statistics share one t quantile; independent ones need Bonferroni's (about)."""
    rng = np.random.default_rng(7)
    one = rng.normal(size=(30, 1))
    same = max_t_critical(np.hstack([one] * 5), 29, 0.01, shrink=0.0)
    apart = max_t_critical(rng.normal(size=(400, 5)), 29, 0.01, shrink=0.0)
    t1, bonferroni = sps.t.ppf(0.99, 29), sps.t.ppf(1 - 0.01 / 5, 29)
    assert same == pytest.approx(t1, rel=0.03)
    assert t1 < apart <= bonferroni * 1.02
    assert max_t_critical(np.hstack([one] * 5), 29, 0.01) > same  # shrinking towards independence: more careful
    assert max_t_critical(np.hstack([one] * 5), 29, 0.01) == max_t_critical(np.hstack([one] * 5), 29, 0.01)


def test_short_history_keeps_the_prior_based_comparison() -> None:
    report = compare_runs(runs(1, HISTORY - 1, run_sd=0.01), runs(2, STARTS, run_sd=0.01))
    assert not any("predictive" in r.method for r in report.rows)
    never = compare_runs(runs(1, HISTORY, run_sd=0.01), runs(2, 1), options=CompareOptions(predictive_history=None))
    assert not any("predictive" in r.method for r in never.rows)


def test_bad_input_is_refused_naming_the_problem() -> None:
    y = np.zeros((20, 2))
    with pytest.raises(ValueError, match="same statistics"):
        predictive_compare(y, np.zeros((3, 1)), [1.0, 1.0], alpha=0.01)
    with pytest.raises(ValueError, match=r"worse must be \+1 or -1"):
        predictive_compare(y, np.zeros((3, 2)), [1.0, 0.5], alpha=0.01)
    with pytest.raises(ValueError, match="finite"):
        predictive_compare(y, np.full((3, 2), np.nan), [1.0, 1.0], alpha=0.01)
    with pytest.raises(ValueError, match="predictive_history"):
        CompareOptions(predictive_history=2)


FAST = "--decode-step-ms 1 --decode-ms-per-seq 0.01"


@pytest.mark.slow
def test_gate_uses_the_predictive_distribution_once_the_history_holds_20_runs(pytester: pytest.Pytester) -> None:
    """Main saves 20 fresh-start runs; a PR's 3 fresh starts of a 2x slower server are judged
    against the history's predictive distribution, and fail."""
    pytester.makepyfile(
        test_perf="""
        def test_one(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0)
    """
    )
    pytester.makeini(f"[pytest]\ninfmax_sim_args = {FAST}\nasyncio_default_fixture_loop_scope = function\n")
    saved = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-save", "default", "--infmax-repeat", "20")
    saved.assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--infmax-repeat",
        "3",
        "--infmax-compare-force",
        f"--infmax-sim-args={FAST} --slowdown 2",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_perf.py::test_one: regressed: *p50(tpot) +*(20 baseline vs 3 current runs)*",
            "*p50(tpot)*REGRESSED*predictive: mean of 3 new starts vs 20-run history*",
        ]
    )

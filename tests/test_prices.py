"""A price that is set prices every result and every sweep point, labelled where it was set.

Issue 15's findings, tried as a user: sweep.costs() raised "no price: ... set
--infmax-gpu-hour-usd" while --infmax-gpu-hour-usd was set (and with a --profile whose
price the table showed); the JSON's sweep had "price": null; sweep(price=) left the points
unpriced; a marker's price was labelled as the command line's.
"""

from __future__ import annotations

import json

import pytest

SWEEP_TEST = """
import pytest
from pytest_infmax import Scenario

TINY = Scenario("tiny", 32, 8)

def test_sweep(infmax):
    sweep = infmax.sweep(TINY, concurrency=[1, 2], num_requests=4, warmup=0)
    costs = sweep.costs()  # no price= : the session's
    assert len(costs) == 2
    for result, cost in zip(sweep.results, costs):
        assert cost.price == sweep.price == result.price
        tps = result.metrics.throughput
        assert cost.total == pytest.approx(cost.price.usd_per_gpu_hour * result.num_gpus / (tps * 3600) * 1e6)
        assert result.cost.total == cost.total
    print("PRICE", sweep.price.usd_per_gpu_hour, "|", sweep.price.source)
"""


def _sweep_price(pytester: pytest.Pytester, *args: str) -> tuple[float, str, dict]:
    pytester.makepyfile(test_perf=SWEEP_TEST)
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", "--infmax-json", "out.json", *args)
    assert result.ret == 0, result.stdout.str()
    line = next(x for x in result.outlines if "PRICE " in x)  # -s: after the test's file name
    usd, source = line.split("PRICE ", 1)[1].split(" | ", 1)
    doc = json.loads((pytester.path / "out.json").read_text())
    return float(usd), source, doc


def test_session_price_prices_the_sweep_its_points_and_the_json(pytester: pytest.Pytester) -> None:
    usd, source, doc = _sweep_price(pytester, "--infmax-gpu-hour-usd", "2.0")
    assert usd == 2.0 and source == "user-set (--infmax-gpu-hour-usd)"
    (sweep,) = doc["sweeps"]
    assert sweep["price"]["usd_per_gpu_hour"] == 2.0
    assert all(r["cost"]["price"]["usd_per_gpu_hour"] == 2.0 for r in doc["results"])
    # the sweep's own costs (the HTML's "$ / M tokens" column) are the points' costs
    assert [c["usd_per_mtok_total"] for c in sweep["costs"]] == [
        r["cost"]["usd_per_mtok_total"] for r in doc["results"]
    ]


def test_profile_price_prices_the_sweep(pytester: pytest.Pytester) -> None:
    usd, source, _ = _sweep_price(pytester, "--infmax-sim-args=--profile b200/gpt-oss-120b")
    assert usd == 2.34 and "B200 neocloud" in source  # SemiAnalysis' table, neocloud tier


def test_env_price_is_labelled_as_the_environments(pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.setenv("INFMAX_GPU_HOUR_USD", "1.5")
    usd, source, _ = _sweep_price(pytester)
    assert usd == 1.5 and source == "user-set (environment variable INFMAX_GPU_HOUR_USD)"


def test_marker_price_is_labelled_as_the_markers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf="""
        import pytest
        from pytest_infmax import Scenario

        @pytest.mark.infmax_price(gpu_hour_usd=3.5)
        def test_priced(infmax):
            r = infmax.run(Scenario("tiny", 32, 8), concurrency=1, num_requests=2, warmup=0)
            assert r.price.usd_per_gpu_hour == 3.5
            assert r.price.source == "user-set (@pytest.mark.infmax_price)", r.price.source
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-gpu-hour-usd", "2.0")
    result.assert_outcomes(passed=1)


def test_sweep_price_argument_prices_every_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf="""
        from pytest_infmax import Scenario
        from pytest_infmax.measure.cost import default_price

        def test_sweep(infmax):
            price = default_price("H200", "hyperscaler")
            sweep = infmax.sweep(Scenario("tiny", 32, 8), concurrency=[1, 2], num_requests=4, warmup=0, price=price)
            assert sweep.price == price
            assert [r.price for r in sweep.results] == [price, price]
            assert all(r.cost is not None and r.cost.total > 0 for r in sweep.results)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1)
    assert "$/Mtok" in result.stdout.str()  # the table gains its cost column


def test_no_price_says_why_and_how_to_set_one(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf="""
        import pytest
        from pytest_infmax import Scenario

        def test_sweep(infmax):
            sweep = infmax.sweep(Scenario("tiny", 32, 8), concurrency=[1], num_requests=2, warmup=0)
            with pytest.raises(ValueError, match=r"no price: the default simulator models no GPU: pass "
                                                 r"--infmax-sim-args '--profile b200/...' or --infmax-gpu-hour-usd"):
                sweep.costs()
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_junit_names_sweep_points_by_load_and_carries_cost_and_energy(pytester: pytest.Pytester) -> None:
    # Issue 15: sweep points were infmax_0_..., infmax_1_..., with no cost or energy properties,
    # and the terminal table had $/Mtok but no J/token.
    import xml.etree.ElementTree as ET

    pytester.makepyfile(
        test_perf="""
        from pytest_infmax import Scenario

        def test_sweep(infmax):
            infmax.sweep(Scenario("tiny", 32, 8), concurrency=[1, 2], num_requests=4, warmup=0)
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--junitxml", "junit.xml", "--infmax-sim-args=--profile b200/gpt-oss-120b"
    )
    result.assert_outcomes(passed=1)
    header = next(line for line in result.outlines if line.startswith("test "))
    assert "$/Mtok" in header and "J/token" in header
    props = {p.get("name"): p.get("value") for p in ET.parse(pytester.path / "junit.xml").iter("property")}
    for load in ("c=1", "c=2"):
        assert float(props[f"infmax[{load}]_usd_per_mtok"]) > 0
        assert float(props[f"infmax[{load}]_j_per_token"]) > 0  # the profile's modelled energy
        assert f"infmax[{load}]_ttft_p50_ms" in props
    assert not any(name.startswith("infmax_0_") for name in props)

"""Frontiers, their interpolation, frontier SLAs and cost: against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.interpolate import PchipInterpolator

from pytest_infmax.measure.cost import (
    PriceError,
    TokenCost,
    cost_per_million_tokens,
    default_price,
    gpu_family,
    user_price,
)
from pytest_infmax.measure.frontier import Frontier, FrontierRangeError, Point, pareto_front
from pytest_infmax.measure.sla import SLASyntaxError
from pytest_infmax.run.sweep import FrontierObjective


def test_pareto_front_keeps_only_undominated_points() -> None:
    pts = [Point(10, 900), Point(20, 800), Point(15, 700), Point(40, 400), Point(40, 300), Point(5, 850)]
    front = pareto_front(pts)
    # (15,700) is dominated by (20,800); (40,300) by (40,400); (5,850) by (10,900).
    assert [(p.x, p.y) for p in front] == [(10, 900), (20, 800), (40, 400)]
    # Lower-is-better y (cost): (5, 850) is dominated by (10, ...) only if cheaper; here minimise y.
    low = pareto_front([Point(10, 5.0), Point(20, 4.0), Point(30, 6.0)], y_higher_is_better=False)
    assert [(p.x, p.y) for p in low] == [(20, 4.0), (30, 6.0)]


def test_frontier_reads_pchip_between_points_and_exact_at_points() -> None:
    pts = [Point(10, 1000), Point(20, 800), Point(40, 400)]
    f = Frontier.build("interactivity", "throughput_per_gpu", pts)
    assert f.at(20) == pytest.approx(800)
    expected = float(PchipInterpolator(np.array([10, 20, 40]), np.array([1000, 800, 400]))(30))
    assert f.at(30) == pytest.approx(expected)
    assert 400 < f.at(30) < 800  # monotone: no overshoot
    with pytest.raises(FrontierRangeError, match="interactivity=50 is outside the measured range 10 to 40"):
        f.at(50)


def test_cost_per_million_tokens_by_hand() -> None:
    # $2.34/GPU-h × 8 GPUs / (100,000 tok/s × 3600 s/h) × 1e6 = $0.052 per million tokens.
    assert cost_per_million_tokens(2.34, 8, 100_000) == pytest.approx(0.052)
    assert cost_per_million_tokens(2.34, 8, 0) is None
    price = default_price("NVIDIA B200", "neocloud")
    assert price.usd_per_gpu_hour == 2.34 and "SemiAnalysis" in price.source and "B200" in price.source
    c = TokenCost.of(price, 8, total_tps=100_000, input_tps=50_000, output_tps=50_000)
    assert c.total == pytest.approx(0.052) and c.output == pytest.approx(0.104)


def test_price_table_and_errors() -> None:
    assert gpu_family("NVIDIA GB200 NVL72") == "GB200" and gpu_family("NVIDIA H100 80GB HBM3") == "H100"
    assert default_price("H200", "rental-3y").usd_per_gpu_hour == 1.60
    assert default_price("NVIDIA H100", "hyperscaler").usd_per_gpu_hour == 1.30
    with pytest.raises(PriceError, match="no default price for GPU 'A100'.*--infmax-gpu-hour-usd"):
        default_price("A100")
    with pytest.raises(PriceError, match="positive"):
        user_price(0, "test")


def test_frontier_objective_parses_and_rejects() -> None:
    o = FrontierObjective.parse("throughput_per_gpu@interactivity=50 > 10000 tok/s")
    assert (o.y, o.x, o.at, o.op, o.limit) == ("throughput_per_gpu", "interactivity", 50, ">", 10000)
    o2 = FrontierObjective.parse("throughput_per_gpu @ e2e = 2s >= 5k tok/s/gpu")
    assert (o2.x, o2.at, o2.limit) == ("e2e", 2.0, 5000)
    with pytest.raises(SLASyntaxError, match="frontier SLA.*give a unit"):
        FrontierObjective.parse("throughput_per_gpu@interactivity=50 > 10000")
    with pytest.raises(SLASyntaxError, match="Y@X=VALUE"):
        FrontierObjective.parse("throughput_per_gpu > 10000 tok/s")


def test_price_choice_precedence_and_reasons() -> None:
    from pytest_infmax.measure.cost import choose_price

    user, why = choose_price(3.0, "neocloud", "vllm", "NVIDIA H100")
    assert user.usd_per_gpu_hour == 3.0 and user.source == "user-set (--infmax-gpu-hour-usd)" and why == ""
    sim, _ = choose_price(None, "hyperscaler", "sim", "h200")  # the GPU the simulator says it models
    assert sim.usd_per_gpu_hour == 1.41 and "the GPU the simulator models ('h200'" in sim.source
    nvml, _ = choose_price(None, "rental-3y", "trtllm", "NVIDIA B200")
    assert nvml.usd_per_gpu_hour == 2.90 and "reported by NVML" in nvml.source
    for args, reason in (
        ((None, "neocloud", "sim"), "models no GPU"),
        ((None, "neocloud", "endpoint"), "endpoint"),
        ((None, "neocloud", "vllm", None), "no GPU seen through NVML"),
    ):
        price, why = choose_price(*args)
        assert price is None and reason in why

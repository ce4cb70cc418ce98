"""A concurrency sweep: the throughput-per-GPU vs interactivity frontier, and what tokens cost."""

from pytest_infmax.measure.cost import default_price


def test_frontier_and_cost(infmax):
    sweep = infmax.sweep(
        "1k1k-mini",
        concurrency=[1, 4, 16, 64],
        duration=2.0,
        frontier_sla=["throughput_per_gpu@interactivity=180 > 1000 tok/s"],
        price=default_price("B200", "neocloud"),  # the price table in pytest_infmax/cost.py
    )
    frontier = sweep.frontier("throughput_per_gpu", "interactivity")
    assert len(frontier.front) >= 2
    # Read off the frontier anywhere inside the measured range (PCHIP between points).
    lo, hi = frontier.x_range
    assert sweep.throughput_per_gpu_at(interactivity=(lo + hi) / 2) > 0
    for result, cost in zip(sweep.results, sweep.costs()):
        print(f"{result.config.label:>6}: ${cost.total:.4f} per million tokens")
    print(f"price: ${sweep.price.usd_per_gpu_hour}/GPU-hour ({sweep.price.source})")

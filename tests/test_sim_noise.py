"""The simulator's timing noise: --start-jitter, --step-jitter and the rest."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pytest_infmax.servers.launch import ServerConfig, running_server
from pytest_infmax.sim import build_parser, config_from_args
from pytest_infmax.sim.engine import EngineConfig, LinearCostModel, simulate
from pytest_infmax.sim.noise import NoiseConfig, NoisyCostModel, StepNoise, noise_of, with_noise

FAST = ("--decode-step-ms", "1", "--decode-ms-per-seq", "0.01")
REQUESTS = [(100, 40)] * 24


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


# -- the noise model -------------------------------------------------------------------------------


def test_noise_is_off_by_default_and_the_cost_model_is_left_alone() -> None:
    config = config_from_args(build_parser().parse_args([]))
    assert config.cost_model == LinearCostModel() and noise_of(config.cost_model) is None
    assert not NoiseConfig().enabled
    assert with_noise(LinearCostModel(), NoiseConfig(start_seed=3)) == LinearCostModel()


def test_a_start_seed_repeats_the_start_and_fresh_starts_differ() -> None:
    config = NoiseConfig(start_jitter=0.05, prefill_start_jitter=0.05, step_jitter=0.03, start_seed=11)
    a, b = StepNoise(config), StepNoise(config)
    assert (a.start_factor, a.prefill_start_factor) == (b.start_factor, b.prefill_start_factor) != (1.0, 1.0)
    assert [a.next_step() for _ in range(5)] == [b.next_step() for _ in range(5)]
    fresh = NoiseConfig(start_jitter=0.05)  # no seed: fresh OS entropy per start, not --seed
    factors = {StepNoise(fresh).start_factor for _ in range(20)}
    assert len(factors) == 20


def test_drawn_factors_and_step_jitter_have_the_asked_spread() -> None:
    starts = [
        math.log(StepNoise(NoiseConfig(start_jitter=0.02, prefill_start_jitter=0.04)).start_factor) for _ in range(2000)
    ]
    assert statistics.fmean(starts) == pytest.approx(0.0, abs=0.002)
    assert statistics.stdev(starts) == pytest.approx(0.02, rel=0.1)
    noise = StepNoise(NoiseConfig(step_jitter=0.03, start_seed=1))
    steps = [math.log(noise.next_step()[0]) for _ in range(5000)]
    assert statistics.stdev(steps) == pytest.approx(0.03, rel=0.05)
    # Drift: an AR(1) of sd 1 % with a 200-step memory: neighbours nearly equal, far ones not.
    drift = StepNoise(NoiseConfig(step_drift=0.01, step_drift_steps=200, start_seed=2))
    x = [math.log(drift.next_step()[0]) for _ in range(20000)]
    assert statistics.stdev(x) == pytest.approx(0.01, rel=0.3)
    lag1 = statistics.correlation(x[:-1], x[1:])
    assert lag1 == pytest.approx(math.exp(-1 / 200), abs=0.01)
    stalls = StepNoise(NoiseConfig(stall_rate=0.1, stall_ms=(5.0, 6.0), start_seed=3))
    added = [stalls.next_step()[1] for _ in range(2000)]
    hit = [s for s in added if s]
    assert 150 < len(hit) < 250 and all(0.005 <= s <= 0.006 for s in hit) and stalls.stalls == len(hit)


def test_start_factor_scales_every_step_and_prefill_factor_only_prefill() -> None:
    base = simulate(EngineConfig(), LinearCostModel(), REQUESTS, concurrency=4)
    noise = StepNoise(NoiseConfig(start_jitter=0.2, start_seed=5))
    scaled = simulate(EngineConfig(), NoisyCostModel(LinearCostModel(), noise), REQUESTS, concurrency=4)
    assert scaled.duration == pytest.approx(base.duration * noise.start_factor, rel=1e-9)
    assert scaled.median("tpot") == pytest.approx(base.median("tpot") * noise.start_factor, rel=1e-9)
    assert noise.steps == scaled.steps == base.steps

    cost = LinearCostModel(decode_step_ms=1.0, decode_ms_per_seq=0.0, prefill_ms_per_1k_tokens=1000.0)
    prefill = StepNoise(NoiseConfig(prefill_start_jitter=0.3, start_seed=6))
    noisy = NoisyCostModel(cost, prefill)
    f = prefill.prefill_start_factor
    assert noisy.step_seconds(4, 0, 400) == pytest.approx(0.001)  # decode only: untouched
    assert noisy.step_seconds(4, 100, 500) == pytest.approx(0.001 + 0.1 * f)  # prefill part scaled


def test_noise_keeps_the_wrapped_models_attributes() -> None:
    args = build_parser().parse_args(
        ["--profile", "b200/gpt-oss-120b", "--start-jitter", "0.02", "--step-jitter", "0.03", "--start-seed", "4"]
    )
    config = config_from_args(args)
    noise = noise_of(config.cost_model)
    assert noise is not None and noise.seed == 4
    assert "b200/gpt-oss-120b" in config.cost_model.deployment.label  # type: ignore[attr-defined]
    few = [(512, 16)] * 8
    assert simulate(config.engine, config.cost_model, few, concurrency=4).steps > 10


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--start-jitter", "-0.1"], "--start-jitter must be a standard deviation between 0 and 1"),
        (["--step-jitter", "nan"], "--step-jitter must be a standard deviation"),
        (["--stall-rate", "2"], "--stall-rate must be a probability between 0 and 1"),
        (["--stall-ms", "30,5"], "--stall-ms must be LOW,HIGH milliseconds with 0 <= LOW <= HIGH"),
        (["--step-drift-steps", "0"], "--step-drift-steps must be a number of steps >= 1"),
        (["--start-seed", "-1"], "--start-seed must be a whole number >= 0"),
    ],
)
def test_bad_noise_flags_are_usage_errors_naming_the_flag(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        config_from_args(build_parser().parse_args(flags))


def test_unparsable_stall_ms_is_an_argparse_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest_infmax.sim", "--stall-ms", "five"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "expected LOW,HIGH milliseconds" in result.stderr


# -- over HTTP: each start draws its own factor, shown in /sim/stats and the log -------------------------


def test_each_start_draws_its_factor_and_shows_it(tmp_path: Path) -> None:
    args = (*FAST, "--start-jitter", "0.05", "--step-jitter", "0.03")
    seen = []
    for i in range(2):
        with running_server(ServerConfig(sim_args=args, startup_timeout=20), tmp_path / str(i)) as server:
            noise = _get_json(f"{server.base_url}/sim/stats")["noise"]
            assert server.log_path is not None
            log = server.log_path.read_text()
        assert f"infmax-sim: noise: start factor {noise['start_factor']:.4f} (--start-jitter 0.05)" in log
        assert f"start seed {noise['start_seed']} " in log
        assert noise["start_jitter"] == 0.05 and noise["step_jitter"] == 0.03 and noise["prefill_start_factor"] == 1.0
        seen.append(noise["start_factor"])
    assert seen[0] != seen[1]  # same arguments, fresh entropy: two factors

    seeded = (*args, "--start-seed", "9")
    with running_server(ServerConfig(sim_args=seeded, startup_timeout=20), tmp_path / "seeded") as server:
        noise = _get_json(f"{server.base_url}/sim/stats")["noise"]
    expected = StepNoise(NoiseConfig(start_jitter=0.05, step_jitter=0.03, start_seed=9))
    assert (noise["start_seed"], noise["start_factor"]) == (9, expected.start_factor)


def test_stats_have_no_noise_entry_without_noise(tmp_path: Path) -> None:
    with running_server(ServerConfig(sim_args=FAST, startup_timeout=20), tmp_path) as server:
        assert "noise" not in _get_json(f"{server.base_url}/sim/stats")


# -- benchmarks/regression_error_rates_sim.py: the same noise, through the real simulator ----------------

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def rates_sim():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import regression_error_rates_sim

        yield regression_error_rates_sim
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_benchmark_flags_give_the_simulator_the_synthetic_noise(rates_sim) -> None:  # type: ignore[no-untyped-def]
    noise = rates_sim.NOISE
    args = build_parser().parse_args(list(rates_sim.sim_args(noise, 1.05)))
    config = config_from_args(args)
    drawn = noise_of(config.cost_model)
    assert drawn is not None and config.engine.slowdown == 1.05
    assert drawn.config == NoiseConfig(
        start_jitter=noise.start_decode,
        prefill_start_jitter=noise.start_prefill,
        step_jitter=noise.step_jitter,
        step_drift=noise.drift,
        step_drift_steps=noise.drift_steps,
        stall_rate=noise.hiccup_rate,
        stall_ms=noise.hiccup_ms,
    )
    w = rates_sim.WORKLOAD
    assert config.cost_model.inner == LinearCostModel(w.decode_ms, w.per_seq_ms, w.prefill_ms_per_1k)  # type: ignore[attr-defined]
    assert rates_sim._schedule(4, 2) == [False, False, True, False, False, True]
    assert rates_sim.wilson(0, 200)[1] == pytest.approx(0.0188, abs=1e-4)
    lo, hi = rates_sim.wilson(95, 100)
    assert lo < 0.95 < hi


@pytest.mark.slow
def test_benchmark_collects_fresh_starts_and_reports(
    rates_sim,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    pools = rates_sim.collect_pools(1, 1, tmp_path / "logs", log=lambda _: None)
    assert len(pools["base"]) == len(pools["slow"]) == 1
    assert len(pools["base"][0].samples["tpot"]) == rates_sim.WORKLOAD.num_requests
    factors = [i["start_factor"] for i in pools["base_info"] + pools["slow_info"]]
    assert factors[0] != factors[1]  # two starts, two draws
    # The analysis, on synthetic pools big enough for the quick setups (no more starts).
    rng = np.random.default_rng(0)
    pools["base"] = rates_sim.synthetic_pool(rng, 6)
    pools["slow"] = rates_sim.synthetic_pool(rng, 3, rates_sim.SLOWDOWN)
    pools["base_info"] = pools["base_info"] * 6
    pools["slow_info"] = pools["slow_info"] * 3
    rates_sim.save_pools(pools, str(tmp_path / "pools.json"))
    assert (
        rates_sim.main(
            [
                "--quick",
                "--load-pools",
                str(tmp_path / "pools.json"),
                "--reps",
                "4",
                "--synthetic-pools",
                "1",
                "--jobs",
                "1",
                "--json",
                str(tmp_path / "out.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "NOT independent" in out and "5 vs 1    A/A" in out
    doc = json.loads((tmp_path / "out.json").read_text())
    assert {(r["baseline_runs"], r["current_runs"], r["effect"]) for r in doc["verdicts"]} >= {(5, 1, "A/A")}

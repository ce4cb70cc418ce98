"""The simulator's engine model: scheduler, KV cache, roofline cost model, profiles.

Most checks run the scheduler in simulated time (``engine.simulate``), which steps
the same ``Scheduler`` and ``step_duration`` as the real-time server without
sleeping; a few go through the real server where the wiring is the point.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from _sim_helpers import poll_stats_until

from pytest_infmax.sim import roofline

if roofline.tomllib is None:  # Python 3.10 without the tomli package
    pytest.skip("reading profiles needs Python >= 3.11 or tomli", allow_module_level=True)

from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.run.runner import Infmax
from pytest_infmax.servers.launch import ServerConfig, running_server
from pytest_infmax.sim import build_parser, config_from_args, main
from pytest_infmax.sim.engine import (
    FINISH_LENGTH,
    Engine,
    EngineConfig,
    EngineRequest,
    LatenessHistogram,
    LinearCostModel,
    RequestTooLarge,
    Scheduler,
    StepBatch,
    TokenDelivery,
    simulate,
    step_duration,
)
from pytest_infmax.sim.roofline import (
    Deployment,
    ProfileError,
    ProfileRegistry,
    RooflineCostModel,
    auto_deployment,
)

STARTUP_TIMEOUT_S = 30.0


# -- helpers --------------------------------------------------------------------------------


def _registry() -> ProfileRegistry:
    return ProfileRegistry.builtin()


def _engine_for(spec: str, **engine: int) -> tuple[EngineConfig, RooflineCostModel]:
    deployment = auto_deployment(*_registry().resolve(spec))
    config = EngineConfig(
        max_num_seqs=engine.get("max_num_seqs", 256),
        max_num_batched_tokens=engine.get("max_num_batched_tokens", 8192),
        kv_cache_tokens=engine.get("kv_cache_tokens", deployment.kv_cache_tokens),
    )
    return config, RooflineCostModel(deployment)


def _fitting_profiles() -> list[str]:
    registry = _registry()
    specs = []
    for hardware in sorted(registry.hardware):
        for model in sorted(registry.models):
            try:
                auto_deployment(*registry.resolve(f"{hardware}/{model}"))
            except ProfileError:
                continue
            specs.append(f"{hardware}/{model}")
    return specs


class _Recording:
    """Zero-duration steps that remember their shapes."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int]] = []

    def step_seconds(self, num_decode: int, prefill_tokens: int, context_tokens: int) -> float:
        self.steps.append((num_decode, prefill_tokens, context_tokens))
        return 0.0


PROFILE_TOML = """
[hardware.mygpu]
description = "a made-up GPU"
memory_gb = 100
memory_bandwidth_tb_s = 2.0
dense_tflops = { bf16 = 500, fp8 = 1000 }
compute_efficiency = 0.5
bandwidth_efficiency = 0.5
step_overhead_ms = 2.0

[model.tiny-dense]
total_params_b = 8.0
active_params_b = 7.5
layers = 32
hidden_size = 4096
vocab_size = 128256
attention_heads = 32
kv_heads = 8
head_dim = 128
"""


@pytest.fixture
def profile_file(tmp_path: Path) -> Path:
    path = tmp_path / "my.toml"
    path.write_text(PROFILE_TOML)
    return path


# -- the built-in profiles -------------------------------------------------------------------


def test_builtin_profiles_are_there() -> None:
    registry = _registry()
    assert {"b200", "h200", "h100"} <= set(registry.hardware)
    assert {"gpt-oss-120b", "llama-3.3-70b", "deepseek-r1"} <= set(registry.models)
    b200 = registry.hardware["b200"]
    assert set(b200.dense_tflops) == {"bf16", "fp8", "fp4"}
    assert registry.models["gpt-oss-120b"].is_moe and registry.models["deepseek-r1"].is_mla


def test_every_builtin_pair_but_deepseek_on_h100_fits() -> None:
    specs = _fitting_profiles()
    assert len(specs) == 8 and "h100/deepseek-r1" not in specs
    with pytest.raises(ProfileError, match=r"deepseek-r1 does not fit on 8 x h100: weights need 671\.0 GB"):
        auto_deployment(*_registry().resolve("h100/deepseek-r1"))


@pytest.mark.parametrize("spec", _fitting_profiles())
def test_latency_rises_with_concurrency_and_throughput_saturates(spec: str) -> None:
    config, cost = _engine_for(spec)  # max_num_seqs 256: beyond it requests queue
    rows = []
    for concurrency in (1, 4, 16, 64, 256, 1024):
        result = simulate(config, cost, [(1024, 128)] * (2 * concurrency), concurrency=concurrency)
        rows.append((concurrency, result.median("ttft"), result.median("tpot"), result.output_throughput))
    ttft = [r[1] for r in rows]
    tpot = [r[2] for r in rows]
    throughput = [r[3] for r in rows]
    assert ttft == sorted(ttft) and ttft[-1] > 20 * ttft[0], rows
    assert tpot == sorted(tpot) and tpot[-1] > 3 * tpot[0], rows
    assert throughput == sorted(throughput), rows
    # A knee: near-linear gains at low load, flat once the batch is full.
    assert throughput[2] / throughput[0] > 2.5, rows
    assert throughput[-1] / throughput[-2] < 1.1, rows


# -- the roofline --------------------------------------------------------------------------


def test_single_sequence_decode_is_weight_bandwidth_bound() -> None:
    hardware, model = _registry().resolve("h100/llama-3.3-70b")
    deployment = Deployment(hardware, model, tp=2, gpus=2)
    cost = RooflineCostModel(deployment)
    seconds = cost.batch_seconds(StepBatch(1, 0, 100, [100], []))
    weight_bytes_per_gpu = (70.55e9 - 128256 * 8192) * 1.0 / 2  # fp8, input embedding not streamed
    kv_bytes_per_gpu = 100 * 80 * 2 * 8 * 128 * 1.0 / 2
    expected = (weight_bytes_per_gpu + kv_bytes_per_gpu) / (3.35e12 * hardware.bandwidth_efficiency)
    assert seconds == pytest.approx(expected + hardware.step_overhead_ms / 1e3, rel=1e-9)


def test_large_prefill_is_compute_bound() -> None:
    hardware, model = _registry().resolve("h100/llama-3.3-70b")
    cost = RooflineCostModel(Deployment(hardware, model, tp=2, gpus=2))
    seconds = cost.batch_seconds(StepBatch(0, 8192, 8192, [], [(0, 8192)]))
    linear = 2 * 69.5e9 * 8192
    attention = 4 * 64 * 128 * 80 * (8192 * 8193 // 2)  # causal: token i sees i tokens
    expected = (linear + attention) / (2 * 1979e12 * hardware.compute_efficiency)
    assert seconds == pytest.approx(expected + hardware.step_overhead_ms / 1e3, rel=1e-9)


def test_moe_weight_reads_follow_expected_distinct_experts() -> None:
    hardware, model = _registry().resolve("b200/gpt-oss-120b")
    deployment = Deployment(hardware, model, tp=1, gpus=1, step_overhead_ms=0.0)
    cost = RooflineCostModel(deployment)
    experts, top_k = 128, 4
    per_byte = 1 / (8e12 * hardware.bandwidth_efficiency)
    dense_bytes = deployment.non_expert_params * 2  # bf16
    expert_bytes = 114.70e9 * 4.25 / 8
    for batch in (1, 8, 64, 512):
        touched = experts * (1 - (1 - top_k / experts) ** batch)
        memory_seconds = (dense_bytes + expert_bytes * touched / experts) * per_byte
        seconds = cost.batch_seconds(StepBatch(batch, 0, 0, [0] * batch, []))
        assert seconds >= memory_seconds * (1 - 1e-9)
        if batch <= 64:  # memory-bound there: exactly the bytes over the bandwidth
            assert seconds == pytest.approx(memory_seconds, rel=1e-9), batch


def test_moe_model_built_in_code_without_top_k_is_a_profile_error() -> None:
    # Profile files are checked for experts_per_token; a ModelProfile built in code is
    # not, and the cost model multiplied by None (TypeError) instead of saying what is missing.
    hardware, model = _registry().resolve("b200/gpt-oss-120b")
    deployment = Deployment(hardware, dataclasses.replace(model, experts_per_token=None))
    with pytest.raises(ProfileError, match=r"gpt-oss-120b: a MoE model \(experts > 0\) needs experts_per_token"):
        RooflineCostModel(deployment)


def test_sliding_window_layers_read_at_most_the_window() -> None:
    hardware, model = _registry().resolve("b200/gpt-oss-120b")
    cost = RooflineCostModel(Deployment(hardware, model, step_overhead_ms=0.0))
    short = cost.batch_seconds(StepBatch(1, 0, 0, [100], []))
    base = cost.batch_seconds(StepBatch(1, 0, 0, [0], []))
    long = cost.batch_seconds(StepBatch(1, 0, 0, [100_100], []))
    per_token_full = 18 * 2 * 8 * 64 * 1.0 / (8e12 * hardware.bandwidth_efficiency)  # fp8 KV, 18 full layers
    per_token_window = per_token_full  # 18 window layers, same KV shape
    assert short - base == pytest.approx(100 * (per_token_full + per_token_window), rel=1e-6)
    assert long - base == pytest.approx(100_100 * per_token_full + 128 * per_token_window, rel=1e-6)


def test_kv_capacity_is_free_memory_over_kv_bytes_per_token() -> None:
    hardware, model = _registry().resolve("h100/llama-3.3-70b")
    deployment = Deployment(hardware, model, tp=2, gpus=2, gpu_memory_utilization=0.9)
    weights = 70.55e9 * 1.0  # fp8
    kv_per_token = 80 * 2 * 8 * 128 * 1.0  # layers x (K, V) x heads x dim x fp8
    assert deployment.kv_cache_tokens == int((80e9 * 2 * 0.9 - weights) / kv_per_token)
    bf16 = Deployment(hardware, model, tp=2, gpus=2, kv_cache_dtype="bf16")
    assert bf16.kv_cache_tokens == pytest.approx(deployment.kv_cache_tokens / 2, abs=1)


def test_kv_heads_and_mla_latent_are_replicated_across_tensor_parallel_ranks() -> None:
    registry = _registry()
    llama = Deployment(*registry.resolve("b200/llama-3.3-70b"), tp=8, gpus=8)
    assert llama.kv_replication == 1.0  # 8 KV heads over 8 ranks: one each
    deepseek = Deployment(*registry.resolve("b200/deepseek-r1"), tp=8, gpus=8)
    dep = Deployment(*registry.resolve("b200/deepseek-r1"), tp=1, gpus=8)
    assert deepseek.kv_replication == 8.0 and dep.kv_replication == 1.0
    assert dep.label.endswith("DEP8 (8 GPUs)")


def test_fp4_falls_back_to_fp8_math_on_hopper() -> None:
    hardware, model = _registry().resolve("h200/llama-3.3-70b")
    assert Deployment(hardware, model, precision="fp4").compute_precision == "fp8"
    hardware, model = _registry().resolve("b200/llama-3.3-70b")
    assert Deployment(hardware, model, precision="fp4").compute_precision == "fp4"


# -- scheduler ------------------------------------------------------------------------------


def test_requests_wait_for_kv_blocks_when_the_cache_is_full() -> None:
    # 200 + 100 tokens need 19 blocks of 16; 62 blocks (1000 tokens) hold 3 such requests.
    config = EngineConfig(max_num_seqs=256, kv_cache_tokens=1000, block_size=16)
    result = simulate(config, LinearCostModel(1.0, 0.0, 0.0), [(200, 100)] * 9, concurrency=None)
    assert result.max_running == 3
    ttfts = sorted(r.ttft for r in result.requests)
    one_request = 101e-3  # one prefill step + 99 decode steps of 1 ms
    assert ttfts[2] < 0.01 and ttfts[3] >= one_request * 0.99, ttfts
    assert ttfts[6] >= 2 * one_request * 0.99, ttfts


def test_kv_admission_is_first_come_first_served() -> None:
    delivered: list[tuple[int, TokenDelivery]] = []
    scheduler = Scheduler(
        EngineConfig(kv_cache_tokens=160, block_size=16), lambda r, d: delivered.append((r.request_id, d))
    )
    big = EngineRequest(0, 100, 40, with_queue=False)  # 9 of the 10 blocks
    bigger = EngineRequest(1, 100, 10, with_queue=False)  # 7 blocks: does not fit after big
    small = EngineRequest(2, 1, 1, with_queue=False)  # 1 block: would fit, but waits its turn
    for request in (big, bigger, small):
        scheduler.add(request)
    plan = scheduler.schedule()
    assert plan is not None and [r.request_id for r, _ in plan.prefill] == [0]
    assert scheduler.num_waiting == 2 and scheduler.free_blocks == 1
    assert scheduler.kv_cache_usage == pytest.approx(0.9)


def test_a_request_that_can_never_fit_is_refused() -> None:
    scheduler = Scheduler(EngineConfig(kv_cache_tokens=1024, block_size=16), lambda r, d: None)
    with pytest.raises(
        RequestTooLarge,
        match=r"prompt \(1000 tokens\) \+ max_tokens \(100\) = 1100 tokens exceeds the KV cache \(1024 tokens\)",
    ):
        scheduler.add(EngineRequest(0, 1000, 100, with_queue=False))


def test_token_budget_counts_decode_before_prefill_chunks() -> None:
    cost = _Recording()
    config = EngineConfig(max_num_batched_tokens=100, max_prefill_tokens_per_step=8192)
    simulate(config, cost, [(10, 30)] * 4 + [(500, 2)], concurrency=None)
    assert max(n + p for n, p, _ in cost.steps) <= 100
    # Step 1 prefills the four short prompts and 60 tokens of the long one; then the
    # four decode first and the long prompt gets the remaining 96 tokens of each step.
    assert [(n, p) for n, p, _ in cost.steps[:3]] == [(0, 100), (4, 96), (4, 96)]


def test_slowdown_scales_every_step() -> None:
    config, cost = _engine_for("b200/gpt-oss-120b")
    plan_requests = [(512, 64)] * 32
    base = simulate(config, cost, plan_requests, concurrency=8)
    slowed = simulate(dataclasses.replace(config, slowdown=2.5), cost, plan_requests, concurrency=8)
    assert slowed.duration == pytest.approx(2.5 * base.duration, rel=1e-9)
    assert slowed.median("tpot") == pytest.approx(2.5 * base.median("tpot"), rel=1e-9)


def test_step_duration_prefers_the_batch_hook() -> None:
    class Both:
        def step_seconds(self, num_decode: int, prefill_tokens: int, context_tokens: int) -> float:
            return 1.0

        def batch_seconds(self, batch: StepBatch) -> float:
            return 0.25 + 0 * len(batch.decode_contexts)

    scheduler = Scheduler(EngineConfig(), lambda r, d: None)
    scheduler.add(EngineRequest(0, 8, 2, with_queue=False))
    plan = scheduler.schedule()
    assert plan is not None
    assert step_duration(Both(), plan, slowdown=2.0) == 0.5
    assert step_duration(LinearCostModel(2.0, 0.0, 0.0), plan) == pytest.approx(0.002)


@pytest.mark.asyncio
async def test_simulated_and_real_time_runs_take_the_same_steps() -> None:
    """simulate() steps the real-time engine's scheduler: same inputs, same plans."""
    requests = [(37, 5), (3000, 3), (1, 7), (900, 4)]
    config = EngineConfig(
        max_num_seqs=2, max_prefill_tokens_per_step=1024, max_num_batched_tokens=1500, stream_interval=2
    )
    simulated = _Recording()
    simulate(config, simulated, requests, concurrency=None)
    real = _Recording()
    engine = Engine(config, real)
    engine.start()
    try:
        submitted = [engine.submit(p, m) for p, m in requests]
        for request in submitted:
            while (await request.deliveries.get()).finish_reason != FINISH_LENGTH:
                pass
    finally:
        await engine.stop()
    assert real.steps == simulated.steps and len(real.steps) > 10


# -- profiles from files, and their errors ---------------------------------------------------


def test_user_profile_file_adds_hardware_and_model(profile_file: Path) -> None:
    hardware, model = ProfileRegistry.with_files([profile_file]).resolve("mygpu/tiny-dense")
    assert hardware.origin == str(profile_file) and model.kv_heads == 8
    deployment = auto_deployment(hardware, model)
    assert deployment.tp == 1 and deployment.kv_cache_tokens == int((100e9 * 0.9 - 8e9 * 2) / (32 * 2 * 8 * 128 * 2))
    args = build_parser().parse_args(
        ["--profile-file", str(profile_file), "--profile", "mygpu/tiny-dense", "--slowdown", "1.5"]
    )
    config = config_from_args(args)
    assert isinstance(config.cost_model, RooflineCostModel)
    assert config.engine.kv_cache_tokens == deployment.kv_cache_tokens and config.engine.slowdown == 1.5
    assert config.engine.max_num_batched_tokens == 8192


def test_calibration_table_overrides_efficiency_for_one_pair(tmp_path: Path) -> None:
    path = tmp_path / "cal.toml"
    path.write_text('[calibration."h100/llama-3.3-70b"]\ncompute_efficiency = 0.123\nsource = "mine"\n')
    registry = ProfileRegistry.with_files([path])
    assert registry.resolve("h100/llama-3.3-70b")[0].compute_efficiency == 0.123
    assert registry.resolve("h200/llama-3.3-70b")[0].compute_efficiency != 0.123


def test_dp_multiplies_the_per_rank_limits() -> None:
    args = build_parser().parse_args(
        ["--profile", "b200/gpt-oss-120b", "--tp", "1", "--gpus", "2", "--max-num-seqs", "100"]
    )
    config = config_from_args(args)
    assert config.engine.max_num_seqs == 200 and config.engine.max_num_batched_tokens == 16384
    assert config.cost_model.deployment.label == "b200/gpt-oss-120b DEP2 (2 GPUs)"  # type: ignore[attr-defined]


def test_without_a_profile_the_linear_model_stays_the_default() -> None:
    config = config_from_args(build_parser().parse_args([]))
    assert config.cost_model == LinearCostModel()
    assert config.engine == EngineConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[hardware.x\nmemory_gb = 1", r"bad\.toml: not valid TOML"),
        ("[gpu.x]\nmemory_gb = 1", r"bad\.toml: expected \[hardware\.NAME\].*got top-level key 'gpu'"),
        (
            "[hardware.x]\nmemory_gb = 80\nmemory_bandwidth_tb_s = 3\ndense_tflops = { bf16 = 1 }\nmemory_gib = 3",
            r"bad\.toml: \[hardware\.x\]: unknown key 'memory_gib'; allowed keys: description, source, memory_gb",
        ),
        (
            "[hardware.x]\nmemory_gb = 'lots'\nmemory_bandwidth_tb_s = 3\ndense_tflops = { bf16 = 1 }",
            r"bad\.toml: \[hardware\.x\]: memory_gb must be a number > 0, got 'lots'",
        ),
        (
            "[hardware.x]\nmemory_gb = 80\nmemory_bandwidth_tb_s = 3\ndense_tflops = { int4 = 1 }",
            r"\[hardware\.x\]: dense_tflops must be precisions among fp4, fp8, bf16 \(got 'int4'\)",
        ),
        ("[hardware.x]\nmemory_gb = 80", r"\[hardware\.x\]: missing required keys memory_bandwidth_tb_s, dense_tflops"),
        (
            "[model.m]\ntotal_params_b = 1\nactive_params_b = 1\nlayers = 2\nhidden_size = 8\nvocab_size = 8\n"
            "attention_heads = 2\nkv_heads = 2\nhead_dim = 4\nexperts = 8",
            r"\[model\.m\]: a MoE model \(experts > 0\) needs experts_per_token and expert_params_b",
        ),
        (
            "[model.m]\ntotal_params_b = 1\nactive_params_b = 1\nlayers = 2.5\nhidden_size = 8\nvocab_size = 8\n"
            "attention_heads = 2\nkv_heads = 2\nhead_dim = 4",
            r"\[model\.m\]: layers must be an integer >= 1, got 2\.5",
        ),
        (
            "[model.m]\ntotal_params_b = 1\nactive_params_b = 1\nlayers = 2\nhidden_size = 8\nvocab_size = 8\n"
            "attention_heads = 2\nkv_cache_dtype = 'int8'\nkv_heads = 2\nhead_dim = 4",
            r"\[model\.m\]: kv_cache_dtype must be one of 'fp8', 'bf16', got 'int8'",
        ),
        ("[calibration.b200]\ncompute_efficiency = 0.5", r'\[calibration\."b200"\]: the name must be "HARDWARE/MODEL"'),
    ],
)
def test_bad_profile_files_say_which_file_key_and_what_is_allowed(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=message):
        ProfileRegistry.with_files([path])


def test_unknown_profile_names_list_the_known_ones() -> None:
    registry = _registry()
    with pytest.raises(
        ProfileError, match=r"unknown hardware 'b300'; known: b200, h100, h200 \(add one with --profile-file"
    ):
        registry.resolve("b300/gpt-oss-120b")
    with pytest.raises(ProfileError, match=r"unknown model 'llama-4'; known: deepseek-r1, gpt-oss-120b, llama-3.3-70b"):
        registry.resolve("b200/llama-4")
    with pytest.raises(ProfileError, match=r"expected HARDWARE/MODEL, e\.g\. b200/gpt-oss-120b"):
        registry.resolve("b200")


def test_cli_reports_profile_errors_as_usage_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "nope.toml"
    with caplog.at_level(logging.ERROR, logger="pytest_infmax.sim"):
        assert main(["--profile-file", str(missing), "--profile", "b200/gpt-oss-120b"]) == 2
        assert main(["--profile", "b200/gpt-oss-120b", "--tp", "2", "--gpus", "3"]) == 2
        assert main(["--profile", "b200/gpt-oss-120b", "--slowdown", "0"]) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"--profile-file {missing}: cannot read it" in m for m in messages), messages
    assert any("--gpus (3) must be a multiple of --tp (2)" in m for m in messages), messages
    assert any("slowdown must be a finite number > 0" in m for m in messages), messages


# -- through the real server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_profile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A user profile (about 18 ms per decode step) with a 512-token KV cache."""
    workdir = tmp_path_factory.mktemp("served_profile")
    (workdir / "my.toml").write_text(PROFILE_TOML)
    args = ("--profile-file", str(workdir / "my.toml"), "--profile", "mygpu/tiny-dense", "--kv-cache-tokens", "512")
    config = ServerConfig(sim_args=args, startup_timeout=STARTUP_TIMEOUT_S)
    with running_server(config, workdir / "logs") as server:
        yield server.base_url


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_profile_server_serves_refuses_too_large_and_reports_lateness(served_profile: str) -> None:
    status, body = _post(f"{served_profile}/v1/completions", {"prompt": [1] * 100, "max_tokens": 20})
    assert status == 200 and body["usage"]["completion_tokens"] == 20
    status, body = _post(f"{served_profile}/v1/completions", {"prompt": [1] * 500, "max_tokens": 100})
    assert status == 400 and "exceeds the KV cache (512 tokens)" in body["error"]["message"]
    with urllib.request.urlopen(f"{served_profile}/sim/stats", timeout=10) as response:
        stats = json.load(response)
    lateness = stats["lateness_ms"]
    assert set(lateness) == {"count", "p50", "p99", "max"} and lateness["count"] >= 20
    assert 0 <= lateness["p50"] <= lateness["p99"] <= lateness["max"]


def test_lateness_percentiles_count_the_whole_run_not_its_last_values() -> None:
    """A run's first 10,000 writes 5 ms late and its last 10,000 on time: the p99 is 5 ms (a
    window of the last 8,192, what /sim/stats kept before, said 0)."""
    lateness = LatenessHistogram()
    for seconds in [0.005] * 10_000 + [0.0] * 10_000:
        lateness.add(seconds)
    summary = lateness.summary_ms()
    assert summary["count"] == 20_000 and summary["max"] == 5.0
    assert summary["p50"] == pytest.approx(0.005, abs=0.006)  # on time, to the 10 us bin
    assert summary["p99"] == pytest.approx(5.0, abs=0.006)


def test_lateness_percentiles_are_the_nearest_rank_to_ten_microseconds() -> None:
    values = [i * 7.3e-6 for i in range(5_000)] + [-0.0002, 0.25]  # early, and past the bins' range
    lateness = LatenessHistogram()
    for seconds in values:
        lateness.add(seconds)
    ordered = sorted(values)
    for q in (1, 50, 90, 99):
        nearest_rank = ordered[max(1, -(-q * len(values) // 100)) - 1]
        assert lateness.percentile(q) == pytest.approx(max(nearest_rank, 0.0), abs=5e-6), q
    assert lateness.percentile(100) == lateness.max == 0.25  # the last bin reads as the max
    assert LatenessHistogram().summary_ms() == {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}


@pytest.mark.asyncio
async def test_requests_wait_for_kv_blocks_over_http(served_profile: str) -> None:
    # 200 + 40 tokens = 15 blocks of 16; the 512-token cache (32 blocks) holds two.
    async def stream(session: aiohttp.ClientSession) -> tuple[float, float]:
        started = time.perf_counter()
        first = None
        body = {"prompt": [1] * 200, "max_tokens": 40, "stream": True}
        async with session.post(f"{served_profile}/v1/completions", json=body) as response:
            async for line in response.content:
                if first is None and line.startswith(b"data: {"):
                    first = time.perf_counter()
        assert first is not None
        return first - started, time.perf_counter() - started

    async with aiohttp.ClientSession() as session:
        streams = [asyncio.ensure_future(stream(session)) for _ in range(3)]
        stats = await poll_stats_until(session, served_profile, lambda s: s["running"] == 2 and s["waiting"] == 1)
        results = sorted(await asyncio.gather(*streams))
    assert stats["kv_cache_usage"] == pytest.approx(30 / 32)
    (ttft_a, e2e_a), (ttft_b, e2e_b), (ttft_c, _) = results
    assert ttft_c >= min(e2e_a, e2e_b) - 0.02, results  # the third started when one of the two ended


def _median_tpot(tmp_path: Path, *extra: str) -> float:
    args = ("--profile", "h100/llama-3.3-70b", *extra)  # TP2: about 14 ms per decode step
    with running_server(ServerConfig(sim_args=args, startup_timeout=STARTUP_TIMEOUT_S), tmp_path) as server:
        result = Infmax(server).run(Scenario("tiny", 64, 96, range_ratio=1.0), concurrency=4, num_requests=4, warmup=0)
    assert result.metrics.num_ok == 4
    return statistics.median(r.tpot for r in result.records if r.tpot is not None)


@pytest.mark.slow
def test_slowdown_factor_shows_in_measured_tpot(tmp_path: Path) -> None:
    """End to end, the slowdown reaches what the client measures. The exact factor is checked
    clock-free (test_slowdown_scales_every_step); here wall-clock steps share two cores with
    everything else, whose delays add to both runs, so only a clear margin is asserted."""
    base = _median_tpot(tmp_path / "base")
    slowed = _median_tpot(tmp_path / "slowed", "--slowdown", "1.5")
    assert slowed > 1.2 * base, (base, slowed)

"""Energy per token: sampler arithmetic against sources whose answer is known by hand."""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_infmax.measure.energy import (
    EnergyReport,
    EnergySampler,
    HttpPowerSource,
    ModelledPowerSource,
    NvmlPowerSource,
)
from pytest_infmax.servers import telemetry


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def stepped(sampler: EnergySampler, clock: FakeClock, until: float, step: float = 0.1) -> None:
    """Sample at t = step, 2*step, ... until (the first sample was taken by start at clock.t)."""
    n = round((until - clock.t) / step)
    start = clock.t
    for i in range(1, n + 1):
        clock.t = start + i * step
        sampler.sample_now()


def test_constant_700w_for_2s_with_1400_tokens_is_1_joule_per_token() -> None:
    clock = FakeClock()
    sampler = EnergySampler(ModelledPowerSource(lambda: {"power_w": 700.0}, name="fake 700 W"), clock=clock)
    sampler.start(thread=False)
    stepped(sampler, clock, 2.0)
    sampler.stop()
    rep = sampler.report(0.0, 2.0, input_tokens=400, output_tokens=1000, usd_per_kwh=0.10)
    assert rep.measured and rep.modelled
    assert rep.energy_j == pytest.approx(1400.0)
    assert rep.avg_power_w == pytest.approx(700.0)
    assert rep.j_per_token == pytest.approx(1.0)
    assert rep.j_per_input_token == pytest.approx(1400 / 400)
    assert rep.j_per_output_token == pytest.approx(1400 / 1000)
    # 700 tokens/s at 700 W = 0.0007 MW -> one million tokens per second per MW.
    assert rep.tokens_per_s_per_mw == pytest.approx(1e6)
    assert rep.output_tokens_per_s_per_mw == pytest.approx(500 / 0.0007)
    # 1400 J = 1400 / 3.6e6 kWh, at $0.10/kWh.
    assert rep.energy_kwh == pytest.approx(1400 / 3.6e6)
    assert rep.energy_usd == pytest.approx(1400 / 3.6e6 * 0.10)
    assert rep.energy_usd_per_mtok == pytest.approx(1400 / 3.6e6 * 0.10 / 1400 * 1e6)
    assert rep.method == "power-integration"
    assert rep.coverage == 1.0
    assert rep.peak_power_w == pytest.approx(700.0)
    assert "modelled" in rep.describe() and "1 J/token" in rep.describe()
    json.dumps(rep.to_dict(), allow_nan=False)  # JSON-ready, no NaN
    assert EnergyReport.from_dict(json.loads(json.dumps(rep.to_dict()))) == rep


def test_a_window_inside_the_samples_is_read_between_them() -> None:
    """Power rising linearly 100 -> 300 W over 2 s: the trapezoid rule is exact for it."""
    clock = FakeClock()
    sampler = EnergySampler(ModelledPowerSource(lambda: {"power_w": 100.0 + 100.0 * clock.t}), clock=clock)
    sampler.start(thread=False)
    stepped(sampler, clock, 2.0)
    rep = sampler.report(0.5, 1.5, input_tokens=0, output_tokens=100)
    # integral of 100 + 100 t from 0.5 to 1.5 = 100 + 50 * (1.5^2 - 0.5^2) = 200 J
    assert rep.energy_j == pytest.approx(200.0)
    assert rep.avg_power_w == pytest.approx(200.0)
    assert rep.j_per_output_token == pytest.approx(2.0)
    assert rep.j_per_input_token is None  # no input tokens: no figure, never a division by zero
    assert rep.duration_s == pytest.approx(1.0)
    assert [p[0] for p in rep.timeline][0] == pytest.approx(0.0, abs=1e-9)


def test_the_energy_counter_is_preferred_to_power() -> None:
    """A counter rising 500 J/s beats a power reading of 700 W: counters see every joule."""
    clock = FakeClock()
    sampler = EnergySampler(
        ModelledPowerSource(lambda: {"power_w": 700.0, "energy_j": 1e6 + 500.0 * clock.t}), clock=clock
    )
    sampler.start(thread=False)
    stepped(sampler, clock, 2.0)
    rep = sampler.report(input_tokens=500, output_tokens=500)
    assert rep.method == "counter"
    assert rep.energy_j == pytest.approx(1000.0)
    assert rep.j_per_token == pytest.approx(1.0)


def test_memory_is_bounded_and_thinning_loses_no_energy() -> None:
    clock = FakeClock()
    sampler = EnergySampler(ModelledPowerSource(lambda: {"power_w": 700.0}), clock=clock, max_samples=8)
    sampler.start(thread=False)
    stepped(sampler, clock, 100.0)  # 1000 reads
    assert len(sampler.samples()) <= 9
    rep = sampler.report(0.0, 100.0, output_tokens=70_000)
    assert rep.energy_j == pytest.approx(70_000.0)
    assert rep.j_per_output_token == pytest.approx(1.0)
    assert len(rep.timeline) <= 9


def test_failed_reads_are_counted_and_skipped() -> None:
    clock = FakeClock()
    calls = {"n": 0}

    def flaky() -> dict:
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise ConnectionError("simulated timeout")
        return {"power_w": 400.0}

    sampler = EnergySampler(ModelledPowerSource(flaky), clock=clock)
    sampler.start(thread=False)
    stepped(sampler, clock, 3.0)
    rep = sampler.report(0.0, 3.0, output_tokens=1200)
    assert rep.read_errors == sampler.read_errors > 0
    assert rep.energy_j == pytest.approx(1200.0)  # constant power: longer intervals are still exact
    assert rep.j_per_output_token == pytest.approx(1.0)


def test_a_window_outside_the_samples_is_not_measured_never_zero() -> None:
    clock = FakeClock()
    sampler = EnergySampler(ModelledPowerSource(lambda: {"power_w": 700.0}), clock=clock)
    sampler.start(thread=False)
    stepped(sampler, clock, 1.0)
    rep = sampler.report(5.0, 6.0, output_tokens=10)
    assert not rep.measured
    assert rep.energy_j is None and rep.j_per_token is None
    assert "no power samples during the window" in rep.reason


def test_no_nvml_is_not_measured_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever machine runs this, NVML failing to initialise gives 'not measured', not an error."""
    import pynvml

    def no_driver() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    sampler = EnergySampler()  # NVML, every GPU
    with sampler:
        assert not sampler.running
    rep = sampler.report(input_tokens=10, output_tokens=10)
    assert rep.measured is False
    assert "NVML" in rep.reason and "Driver Not Loaded" in rep.reason
    assert rep.energy_j is None and rep.j_per_token is None and rep.avg_power_w is None
    assert rep.describe().startswith("energy not measured: NVML")


@pytest.mark.skipif(telemetry.available()[0], reason="this machine has NVML and a GPU")
def test_this_machine_without_a_gpu_reports_not_measured() -> None:
    rep = EnergySampler(NvmlPowerSource()).start().report()
    assert rep.measured is False and rep.reason


# -- NVML, through a fake pynvml --------------------------------------------------------


class FakeNvml:
    """Two GPUs: GPU 0 has the total-energy counter (300 J/s), GPU 1 only reports 200 W."""

    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2

    class NVMLError(Exception):
        pass

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetIndex(self, h: int) -> int:
        return h

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H200" if h == 0 else b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h:08d}"

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        if h == 1:
            raise self.NVMLError("Not Supported")
        return int(5_000_000 + 300_000 * self.clock.t)  # mJ

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return 999_000 if h == 0 else 200_000  # mW; GPU 0's power must be ignored for energy

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=90 if h == 0 else 40, memory=50)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(used=(70_000 + h) * 2**20, total=80_000 * 2**20)

    def nvmlDeviceGetClockInfo(self, h: int, kind: int) -> int:
        return 1980 if kind == self.NVML_CLOCK_SM else 2619


def test_nvml_counter_where_present_else_integrated_power(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    fake = FakeNvml(clock)
    monkeypatch.setattr(telemetry, "nvml", lambda: contextlib.nullcontext(fake))
    sampler = EnergySampler(NvmlPowerSource(), clock=clock)
    sampler.start(thread=False)
    stepped(sampler, clock, 2.0)
    sampler.stop()
    rep = sampler.report(0.0, 2.0, input_tokens=0, output_tokens=1000)
    assert rep.method == "mixed"
    gpu0, gpu1 = rep.gpus
    assert gpu0["energy_j"] == pytest.approx(600.0)  # counter: 300 J/s, not its 999 W reading
    assert gpu1["energy_j"] == pytest.approx(400.0)  # 200 W integrated over 2 s
    assert rep.energy_j == pytest.approx(1000.0)
    assert rep.j_per_output_token == pytest.approx(1.0)
    assert gpu0["name"] == "NVIDIA H200" and gpu1["uuid"] == "GPU-00000001"
    assert gpu0["gpu_util_pct"] == pytest.approx(90.0) and gpu1["gpu_util_pct"] == pytest.approx(40.0)
    assert gpu1["memory_used_mib_max"] == pytest.approx(70_001)
    assert gpu0["sm_clock_mhz"] == pytest.approx(1980) and gpu0["mem_clock_mhz"] == pytest.approx(2619)
    assert "counter where available" in rep.source and "H100" in rep.source


def test_nvml_selects_gpus_by_index(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(telemetry, "nvml", lambda: contextlib.nullcontext(FakeNvml(clock)))
    sampler = EnergySampler(NvmlPowerSource(gpus=[1]), clock=clock)
    sampler.start(thread=False)
    stepped(sampler, clock, 1.0)
    rep = sampler.report()
    assert [g["key"] for g in rep.gpus] == ["1"]
    assert rep.energy_j == pytest.approx(200.0) and rep.method == "power-integration"


# -- a real thread against an HTTP power endpoint -----------------------------------------


@contextlib.contextmanager
def power_endpoint(watts: float, path: str = "/sim/power", clock=time.perf_counter):
    t0 = clock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path != path:
                self.send_error(404)
                return
            body = json.dumps({"power_w": watts, "energy_j": watts * (clock() - t0)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_sampler_thread_reads_an_http_power_endpoint() -> None:
    with power_endpoint(250.0) as base:
        sampler = EnergySampler(HttpPowerSource(base + "/sim/power"), period=0.05)
        with sampler:
            assert sampler.running
            deadline = time.monotonic() + 30.0  # a wait with a limit, for six reads on a busy machine
            while len(sampler.samples()) < 6 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert not sampler.running
    rep = sampler.report(input_tokens=100, output_tokens=50)
    assert rep.measured and rep.modelled and rep.method == "counter"
    assert rep.samples >= 6 and base in rep.source
    # Power over wall-clock reads is only as exact as each read's timing: within 50 % here,
    # on any machine; the exact arithmetic is checked below on a clock the test moves.
    assert 125.0 < rep.avg_power_w < 375.0


def test_an_http_counter_read_on_a_shared_clock_gives_its_power_exactly() -> None:
    now = [0.0]
    with power_endpoint(250.0, clock=lambda: now[0]) as base:
        sampler = EnergySampler(HttpPowerSource(base + "/sim/power"), period=0.05, clock=lambda: now[0])
        sampler.start(thread=False)
        for step in range(13):  # 0.6 s in reads 50 ms apart, with no thread and no sleep
            now[0] = step * 0.05
            sampler.sample_now()
        sampler.stop()
    rep = sampler.report(input_tokens=100, output_tokens=50)
    assert rep.measured and rep.samples == 13 and rep.duration_s == pytest.approx(0.6)
    # The endpoint's counter is 250 J per second of the shared clock.
    assert rep.avg_power_w == pytest.approx(250.0, rel=1e-9)
    assert rep.j_per_token == pytest.approx(rep.energy_j / 150)


def test_an_endpoint_that_is_not_there_is_not_measured() -> None:
    with power_endpoint(250.0, path="/elsewhere") as base:
        rep = EnergySampler(HttpPowerSource(base + "/sim/power")).start().report()
    assert rep.measured is False
    assert "404" in rep.reason and "/sim/power" in rep.reason


def test_energy_of_a_real_run_against_the_simulator(tmp_path: Path) -> None:
    """report_for() uses the run's measured window (same clock as records) and its token counts."""
    from pytest_infmax.run.runner import Infmax
    from pytest_infmax.servers.launch import ServerConfig, running_server

    with running_server(ServerConfig(sim_args=("--decode-step-ms", "2")), tmp_path) as server:
        sampler = EnergySampler(ModelledPowerSource(lambda: {"power_w": 100.0}, name="constant 100 W"), period=0.02)
        with sampler:
            result = Infmax(server).run("1k1k-mini", concurrency=2, num_requests=6)
    rep = sampler.report_for(result, usd_per_kwh=0.2)
    m = result.metrics
    window = result.run.measured_end - result.run.measured_start
    assert rep.measured
    assert rep.duration_s == pytest.approx(window)
    assert rep.energy_j == pytest.approx(100.0 * window, rel=1e-6)
    assert (rep.input_tokens, rep.output_tokens) == (m.total_input_tokens, m.total_output_tokens)
    assert rep.j_per_token == pytest.approx(rep.energy_j / (m.total_input_tokens + m.total_output_tokens))
    d = result.to_dict()
    d["energy"] = rep.to_dict()
    json.dumps(d, allow_nan=False)


@pytest.mark.skipif(not telemetry.available()[0], reason="needs NVML and a GPU: " + telemetry.available()[1])
def test_real_gpu_energy_through_nvml() -> None:
    """On a GPU machine: the counter (or power) gives a plausible figure for every GPU."""
    sampler = EnergySampler(NvmlPowerSource(), period=0.1)
    with sampler:
        time.sleep(1.5)
    rep = sampler.report(input_tokens=1000, output_tokens=1000)
    assert rep.measured, rep.reason
    print(json.dumps({k: v for k, v in rep.to_dict().items() if k != "timeline"}, indent=1))
    for g in rep.gpus:
        assert 5.0 < g["avg_power_w"] < 2000.0, g
    assert rep.method in ("counter", "power-integration", "mixed")
    assert math.isfinite(rep.j_per_token) and rep.j_per_token > 0


def test_simulator_modelled_power_flows_into_results(tmp_path) -> None:
    """The whole energy path without a GPU: the simulator's modelled power, sampled during a run."""
    import json
    import urllib.error
    import urllib.request

    from pytest_infmax import Infmax, ServerConfig, running_server

    config = ServerConfig(sim_args=("--profile", "b200/gpt-oss-120b", "--max-num-seqs", "8"))
    with running_server(config, tmp_path) as server:
        result = Infmax(server, usd_per_kwh=0.10).run("1k1k-mini", concurrency=4, num_requests=8, warmup=0)
        with urllib.request.urlopen(f"{server.base_url}/sim/power") as resp:
            power = json.load(resp)
    e = result.energy
    assert e.measured and e.modelled and e.method == "counter", e.reason
    # B200 profile: 150 W idle, 1000 W while steps run, one GPU.
    assert power["tdp_w"] == 1000 and power["idle_w"] == 150 and power["gpus"] == 1
    assert 150 <= e.avg_power_w <= 1000
    m = result.metrics
    assert abs(e.j_per_token - e.energy_j / (m.total_input_tokens + m.total_output_tokens)) < 1e-9
    assert abs(e.energy_usd - e.energy_j / 3.6e6 * 0.10) < 1e-12
    with running_server(ServerConfig(sim_args=("--decode-step-ms", "2")), tmp_path) as plain:
        quiet = Infmax(plain).run("1k1k-mini", concurrency=1, num_requests=1, warmup=0)
        try:
            urllib.request.urlopen(f"{plain.base_url}/sim/power")
            raise AssertionError("the default simulator has no power model")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404 and b"--profile" in exc.read()
    assert not quiet.energy.measured and "models no power" in quiet.energy.reason

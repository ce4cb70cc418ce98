"""On a GPU machine: NVML sees the GPU; a server started on it is measured, torn down, and its memory released.

Run there as one prepared script: ``bash tests/gpu/run.sh`` (see that file).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pytest_infmax import Infmax, Scenario, ServerConfig
from pytest_infmax.atomic import write_json_atomic
from pytest_infmax.servers import telemetry
from pytest_infmax.servers.launch import require_gpus_released, start_server

ENGINE = str(Path(__file__).with_name("tiny_gpu_engine.py"))
RESERVE_GIB = 4.0


def _out(name: str, data: object) -> None:
    out = os.environ.get("INFMAX_GPU_OUT")
    if out:
        write_json_atomic(Path(out) / name, data)


def test_nvml_sees_the_gpu() -> None:
    gpus = telemetry.gpus()
    assert gpus, "NVML initialised but lists no GPU"
    for g in gpus:
        assert g.name and g.uuid.startswith("GPU-")
        assert g.memory_total_mib > 8 * 1024
    print(json.dumps([g.to_dict() for g in gpus], indent=1))
    _out("gpus.json", [g.to_dict() for g in gpus])


def test_server_on_gpu_is_measured_and_released(tmp_path: Path) -> None:
    baseline = telemetry.memory_used_mib()
    assert baseline is not None
    config = ServerConfig(
        kind="command",
        command=(
            sys.executable,
            ENGINE,
            "--host",
            "{host}",
            "--port",
            "{port}",
            "--model",
            "{model}",
            "--reserve-gib",
            str(RESERVE_GIB),
        ),
        model="tiny-gpu",
        startup_timeout=300,
    )
    # The plugin's own teardown path: stop() then require_gpus_released (raises if a pid holds the GPU).
    server = start_server(config, tmp_path, after_stop=require_gpus_released)
    try:
        pid = server.pid
        assert pid is not None
        during = telemetry.memory_used_mib() or {}
        taken = max(during.get(i, 0) - baseline.get(i, 0) for i in during)
        on_gpu = [p for p in telemetry.gpu_processes() if p.pid == pid]
        # Containers may hide pids from NVML; the reserved memory shows either way.
        assert on_gpu or taken >= RESERVE_GIB * 1024 * 0.9, (on_gpu, taken)
        result = Infmax(server, name="gpu-tiny").run(
            Scenario("gpu-256-64", 256, 64),
            concurrency=4,
            num_requests=16,
            warmup=4,
            sla=["error_rate < 1%", "p99(ttft) < 5s"],
        )
        m = result.metrics
        assert m.num_ok == 16 and m.output_throughput > 0
        # Energy through NVML during the measured phase, and a price from the GPU NVML names.
        energy = result.energy
        assert energy is not None and energy.measured, energy and energy.reason
        assert energy.energy_j > 0 and energy.j_per_token > 0 and energy.avg_power_w > 20
        assert result.price is not None and "reported by NVML" in result.price.source
        print(
            f"energy: {energy.energy_j:.0f} J over {energy.duration_s:.1f} s ({energy.method}), "
            f"{energy.avg_power_w:.0f} W, {energy.j_per_token:.3f} J/token; "
            f"cost ${result.cost.total:.2f}/Mtok at {result.price.source}"
        )
        print(
            f"measured on GPU: {m.output_throughput:.0f} output tok/s, "
            f"TTFT p50 {m.ttft.median * 1e3:.1f} ms, TPOT p50 {m.tpot.median * 1e3:.2f} ms; "
            f"server pid {pid} seen by NVML: {bool(on_gpu)}; memory taken {taken:.0f} MiB"
        )
    finally:
        server.stop()
    check = telemetry.wait_released({pid}, baseline, timeout=60)
    print(check.describe())
    _out(
        "gpu_server.json",
        {
            "result": result.to_dict(include_records=False),
            "memory_taken_mib": taken,
            "pid_seen_by_nvml": bool(on_gpu),
            "release": check.describe(),
            "released": check.released,
        },
    )
    assert check.measured and check.released, check.describe()


def test_escaped_cuda_worker_is_killed_and_gpu_released(tmp_path: Path) -> None:
    """A worker that left the process group (setsid) and holds GPU memory is still stopped."""
    baseline = telemetry.memory_used_mib()
    config = ServerConfig(
        kind="command",
        command=(
            sys.executable,
            ENGINE,
            "--host",
            "{host}",
            "--port",
            "{port}",
            "--model",
            "{model}",
            "--reserve-gib",
            "1",
            "--escaped-worker-gib",
            "2",
        ),
        model="tiny-gpu",
        startup_timeout=300,
    )
    server = start_server(config, tmp_path, after_stop=require_gpus_released)
    try:
        log = server.log_path.read_text()
        worker_pid = int(log.split("worker-ready", 1)[1].split()[0])
        assert os.getpgid(worker_pid) != server.pid  # it really left the group
        Infmax(server).run(Scenario("gpu-64-8", 64, 8), concurrency=2, num_requests=4, warmup=0)
    finally:
        server.stop()  # raises ServerError if any of its pids still holds the GPU
    assert worker_pid in server.stopped_pids
    assert not os.path.exists(f"/proc/{worker_pid}") or "Z" in open(f"/proc/{worker_pid}/stat").read().split(")")[1][:3]
    check = telemetry.wait_released(server.stopped_pids, baseline, timeout=60)
    print(f"escaped worker {worker_pid} stopped; {check.describe()}")
    _out(
        "gpu_escaped_worker.json",
        {
            "worker_pid": worker_pid,
            "stopped_pids": server.stopped_pids,
            "release": check.describe(),
            "released": check.released,
        },
    )
    assert check.measured and check.released, check.describe()

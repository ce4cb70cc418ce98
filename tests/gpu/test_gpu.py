"""On a GPU machine: NVML sees the GPU; a server started on it is measured, torn down, and its memory released.

Run there as one prepared script: ``bash tests/gpu/run.sh`` (see that file).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pytest_infmax import Infmax, Scenario, ServerConfig, running_server, telemetry
from pytest_infmax.reports import write_json_atomic

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
        command=(sys.executable, ENGINE, "--host", "{host}", "--port", "{port}", "--model", "{model}",
                 "--reserve-gib", str(RESERVE_GIB)),
        model="tiny-gpu",
        startup_timeout=300,
    )
    with running_server(config, tmp_path) as server:
        pid = server.pid
        assert pid is not None
        during = telemetry.memory_used_mib() or {}
        taken = max(during.get(i, 0) - baseline.get(i, 0) for i in during)
        on_gpu = [p for p in telemetry.gpu_processes() if p.pid == pid]
        # Containers may hide pids from NVML; the reserved memory shows either way.
        assert on_gpu or taken >= RESERVE_GIB * 1024 * 0.9, (on_gpu, taken)
        result = Infmax(server, name="gpu-tiny").run(
            Scenario("gpu-256-64", 256, 64), concurrency=4, num_requests=16, warmup=4,
            sla=["error_rate < 1%", "p99(ttft) < 5s"],
        )
        m = result.metrics
        assert m.num_ok == 16 and m.output_throughput > 0
        print(f"measured on GPU: {m.output_throughput:.0f} output tok/s, "
              f"TTFT p50 {m.ttft.median * 1e3:.1f} ms, TPOT p50 {m.tpot.median * 1e3:.2f} ms; "
              f"server pid {pid} seen by NVML: {bool(on_gpu)}; memory taken {taken:.0f} MiB")
    check = telemetry.wait_released({pid}, baseline, timeout=60)
    print(check.describe())
    _out("gpu_server.json", {
        "result": result.to_dict(include_records=False),
        "memory_taken_mib": taken,
        "pid_seen_by_nvml": bool(on_gpu),
        "release": check.describe(),
        "released": check.released,
    })
    assert check.measured and check.released, check.describe()

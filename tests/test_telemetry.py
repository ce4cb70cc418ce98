"""Telemetry without a GPU: "not measured" with the reason, never zero, never an error."""

from pytest_infmax.servers import telemetry


def test_no_nvml_is_not_measured_with_a_reason(monkeypatch) -> None:
    ok, reason = telemetry.available()
    if ok:  # a GPU machine: the GPU checks in tests/gpu cover it
        return
    assert reason
    assert telemetry.memory_used_mib() is None
    check = telemetry.wait_released({12345}, baseline_mib=None, timeout=0.1)
    assert not check.measured and check.reason == reason
    assert check.describe().startswith("GPU release not measured: ")


def test_release_description_names_what_holds_the_gpu() -> None:
    held = telemetry.ReleaseCheck(
        True, holding=(telemetry.GpuProcess(0, 4242, 1024.0),), memory_excess_mib={1: 2048.0}, waited_s=30.0
    )
    assert not held.released
    assert held.describe() == (
        "GPUs not released after 30.0 s: pid 4242 on GPU 0; GPU 1 holds 2048 MiB more than before the server started"
    )
    assert telemetry.ReleaseCheck(True, waited_s=0.5).released

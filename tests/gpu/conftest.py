"""GPU checks: collected everywhere, run only where NVML sees a GPU and torch has CUDA."""

import pytest

from pytest_infmax.servers import telemetry


def pytest_collection_modifyitems(config, items):
    ok, reason = telemetry.available()
    if ok:
        try:
            import torch

            if not torch.cuda.is_available():
                ok, reason = False, "torch sees no CUDA device"
        except ImportError:
            ok, reason = False, "torch is not installed (the GPU engine needs it)"
    if ok:
        return
    skip = pytest.mark.skip(reason=f"needs a GPU: {reason}")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)

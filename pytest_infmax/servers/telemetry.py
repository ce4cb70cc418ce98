"""GPU telemetry through NVML (``nvidia-ml-py``, imported as ``pynvml``).

No NVML (no GPU, no driver, a container without the library) is a normal
state, reported as "not measured" with the reason, never as zero and never as
an error.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

_LOCK = threading.Lock()
_REFS = 0


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here; ``str()`` says why."""


@contextlib.contextmanager
def nvml() -> Iterator[Any]:
    """Initialise NVML for the block (reference counted); yields the ``pynvml`` module."""
    global _REFS
    try:
        import pynvml
    except ImportError as exc:  # the dependency is declared; a broken install still must not crash
        raise NvmlUnavailable(f"pynvml is not importable ({exc}); pip install nvidia-ml-py") from None
    with _LOCK:
        if _REFS == 0:
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                raise NvmlUnavailable(f"NVML did not initialise: {exc} (no NVIDIA driver or GPU here?)") from None
        _REFS += 1
    try:
        yield pynvml
    finally:
        with _LOCK:
            _REFS -= 1
            if _REFS == 0:
                with contextlib.suppress(Exception):
                    pynvml.nvmlShutdown()


def available() -> tuple[bool, str]:
    """(True, "") when NVML works and sees at least one GPU, else (False, why not)."""
    try:
        with nvml() as n:
            count = n.nvmlDeviceGetCount()
    except NvmlUnavailable as exc:
        return False, str(exc)
    except Exception as exc:  # pynvml.NVMLError subclasses, from a driver in a bad state
        return False, f"NVML error: {exc}"
    return (True, "") if count else (False, "NVML sees no GPU")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total_mib: float
    memory_used_mib: float
    driver: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GpuProcess:
    gpu_index: int
    pid: int
    used_memory_mib: float | None  # None: NVML could not attribute memory (MIG, some containers)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpus() -> list[GpuInfo]:
    """Every GPU NVML sees, with its memory in use now."""
    with nvml() as n:
        driver = _text(n.nvmlSystemGetDriverVersion())
        out = []
        for i in range(n.nvmlDeviceGetCount()):
            h = n.nvmlDeviceGetHandleByIndex(i)
            mem = n.nvmlDeviceGetMemoryInfo(h)
            out.append(
                GpuInfo(
                    i,
                    _text(n.nvmlDeviceGetName(h)),
                    _text(n.nvmlDeviceGetUUID(h)),
                    mem.total / 2**20,
                    mem.used / 2**20,
                    driver,
                )
            )
        return out


def gpu_processes() -> list[GpuProcess]:
    """Processes NVML reports on any GPU (compute and graphics contexts)."""
    with nvml() as n:
        out: list[GpuProcess] = []
        for i in range(n.nvmlDeviceGetCount()):
            h = n.nvmlDeviceGetHandleByIndex(i)
            seen: set[int] = set()
            for getter in (n.nvmlDeviceGetComputeRunningProcesses, n.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    procs = getter(h)
                except n.NVMLError:
                    continue
                for p in procs:
                    if p.pid in seen:
                        continue
                    seen.add(p.pid)
                    used = getattr(p, "usedGpuMemory", None)  # pynvml maps "not available" to None
                    out.append(GpuProcess(i, int(p.pid), None if used is None else used / 2**20))
        return out


@dataclass
class ReleaseCheck:
    """Whether GPUs were given back after a server stopped."""

    measured: bool
    reason: str = ""
    holding: tuple[GpuProcess, ...] = ()  # our processes still on a GPU
    memory_excess_mib: dict[int, float] | None = None  # per GPU: used now minus before start
    waited_s: float = 0.0

    @property
    def released(self) -> bool:
        return not self.holding and not (self.memory_excess_mib or {})

    def describe(self) -> str:
        if not self.measured:
            return f"GPU release not measured: {self.reason}"
        if self.released:
            return f"GPUs released (checked for {self.waited_s:.1f} s)"
        parts = [f"pid {p.pid} on GPU {p.gpu_index}" for p in self.holding]
        parts += [
            f"GPU {i} holds {mib:.0f} MiB more than before the server started"
            for i, mib in (self.memory_excess_mib or {}).items()
        ]
        return "GPUs not released after " + f"{self.waited_s:.1f} s: " + "; ".join(parts)


def memory_used_mib() -> dict[int, float] | None:
    """Memory in use per GPU now, or None without NVML (a baseline before a server starts)."""
    try:
        return {g.index: g.memory_used_mib for g in gpus()}
    except Exception:  # NvmlUnavailable or a driver error: no baseline
        return None


def wait_released(
    pids: Iterable[int],
    baseline_mib: dict[int, float] | None = None,
    timeout: float = 30.0,
    tolerance_mib: float = 512.0,
) -> ReleaseCheck:
    """Wait until none of ``pids`` holds a GPU and memory is back near ``baseline_mib``.

    Drivers free a dead process's memory asynchronously, so this polls (with a
    deadline) instead of checking once. Containers may report host pids or none
    at all; the memory comparison catches what the pid check cannot.
    """
    ok, reason = available()
    if not ok:
        return ReleaseCheck(measured=False, reason=reason)
    ours = set(pids)
    start = time.monotonic()
    while True:
        holding = tuple(p for p in gpu_processes() if p.pid in ours)
        excess: dict[int, float] = {}
        if baseline_mib is not None:
            for i, used in (memory_used_mib() or {}).items():
                extra = used - baseline_mib.get(i, used)
                if extra > tolerance_mib:
                    excess[i] = extra
        waited = time.monotonic() - start
        check = ReleaseCheck(True, holding=holding, memory_excess_mib=excess, waited_s=waited)
        if check.released or waited > timeout:
            return check
        time.sleep(0.2)

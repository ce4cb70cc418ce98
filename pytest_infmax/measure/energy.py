"""Energy per token: GPU power sampled while load runs.

An :class:`EnergySampler` reads a :class:`PowerSource` on a background thread
every ``period`` seconds (100 ms by default) and keeps, per device, the energy
used since it started:

* **NVML** (:class:`NvmlPowerSource`): each GPU's total-energy counter
  (``nvmlDeviceGetTotalEnergyConsumption``, mJ since the driver loaded; Volta
  and later) where the GPU has it, else its power (``nvmlDeviceGetPowerUsage``,
  mW) integrated with the trapezoid rule; plus power, utilisation, memory and
  SM / memory clocks for the report.
* **Modelled** (:class:`ModelledPowerSource`): power a model reports instead of
  a meter, e.g. the simulator. Give it a callable returning
  ``{"power_w": ..., "energy_j": ...}`` or use :class:`HttpPowerSource` for an
  HTTP endpoint that answers that JSON (``energy_j``, a cumulative counter, is
  optional: without it power is integrated). Reports say "modelled".

:meth:`EnergySampler.report` turns the energy of a time window (normally the
measured phase of a run, on the same ``time.perf_counter()`` clock as request
records) into joules per token, average power, tokens per second per MW and,
at a user-set $/kWh, what that energy cost.

Per-token figures follow :mod:`pytest_infmax.measure.cost`: energy is not separable by
token type, so J per input token is the window's whole energy over its input
tokens, J per output token the whole energy over its output tokens, and J per
token the whole energy over all tokens.

No NVML (no GPU, no driver) or a source that cannot be read gives an
``EnergyReport(measured=False, reason=...)``: "not measured", never zero and
never an error. Memory is bounded: beyond ``max_samples`` the kept samples are
thinned (every other one dropped, the stride doubled); energy totals are
cumulative in each sample, so thinning never loses energy, only time detail.
"""

from __future__ import annotations

import json
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pytest_infmax import boundedhttp
from pytest_infmax.servers import telemetry

DEFAULT_PERIOD_S = 0.1
DEFAULT_MAX_SAMPLES = 20_000  # about 33 minutes at 100 ms before thinning starts
TIMELINE_POINTS = 300  # power-over-time points kept in a report


class EnergyUnavailable(RuntimeError):
    """The source cannot be read here; ``str()`` says why."""


@dataclass(frozen=True)
class DeviceReading:
    """One device read once. ``None``: the device does not report that field."""

    power_w: float | None = None
    energy_j: float | None = None  # a cumulative counter (any origin), not a delta
    gpu_util_pct: float | None = None
    mem_util_pct: float | None = None
    memory_used_mib: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None


@dataclass(frozen=True)
class DeviceInfo:
    key: str  # stable name in the report: the NVML index, or the source's device name
    name: str
    uuid: str | None = None


class PowerSource(ABC):
    """Where power comes from. ``open`` raises :class:`EnergyUnavailable` with the reason."""

    modelled: bool = False

    @abstractmethod
    def open(self) -> list[DeviceInfo]:
        """Prepare to read; return the devices ``read`` reports, in that order."""

    @abstractmethod
    def read(self) -> list[DeviceReading]:
        """One reading per device (may raise: the sampler counts it as a failed read)."""

    def close(self) -> None:  # noqa: B027  (optional)
        """Release what ``open`` took."""

    @abstractmethod
    def describe(self) -> str:
        """Where the figures come from, for the report."""


# -- NVML ---------------------------------------------------------------------------


class NvmlPowerSource(PowerSource):
    """GPUs read through NVML: ``gpus`` are NVML indices or UUIDs (default: every GPU).

    NVML numbers GPUs in PCI order, which may differ from CUDA's order and from
    ``CUDA_VISIBLE_DEVICES``; UUIDs (``nvidia-smi -L``) are unambiguous.
    """

    def __init__(self, gpus: Sequence[int | str] | None = None) -> None:
        self.gpus = None if gpus is None else list(gpus)
        self._cm: Any = None
        self._n: Any = None
        self._handles: list[Any] = []
        self._has_counter: list[bool] = []
        self._devices: list[DeviceInfo] = []

    def open(self) -> list[DeviceInfo]:
        cm = telemetry.nvml()
        try:
            n = cm.__enter__()
        except telemetry.NvmlUnavailable as exc:
            raise EnergyUnavailable(str(exc)) from None
        self._cm, self._n = cm, n
        try:
            self._resolve(n)
        except BaseException:
            self.close()
            raise
        return list(self._devices)

    def _resolve(self, n: Any) -> None:
        try:
            count = n.nvmlDeviceGetCount()
        except n.NVMLError as exc:
            raise EnergyUnavailable(f"NVML error listing GPUs: {exc}") from None
        if not count:
            raise EnergyUnavailable("NVML sees no GPU")
        wanted: list[int | str] = list(range(count)) if self.gpus is None else self.gpus
        for g in wanted:
            try:
                if isinstance(g, str) and not g.isdigit():
                    h = n.nvmlDeviceGetHandleByUUID(g)
                else:
                    h = n.nvmlDeviceGetHandleByIndex(int(g))
                index = n.nvmlDeviceGetIndex(h) if hasattr(n, "nvmlDeviceGetIndex") else int(g)
                name = _text(n.nvmlDeviceGetName(h))
                uuid = _text(n.nvmlDeviceGetUUID(h))
            except n.NVMLError as exc:
                raise EnergyUnavailable(f"GPU {g!r} cannot be opened through NVML: {exc}") from None
            counter = _try(n, n.nvmlDeviceGetTotalEnergyConsumption, h) is not None
            power = _try(n, n.nvmlDeviceGetPowerUsage, h) is not None
            if not counter and not power:
                raise EnergyUnavailable(f"GPU {index} ({name}) reports neither its energy counter nor its power")
            self._handles.append(h)
            self._has_counter.append(counter)
            self._devices.append(DeviceInfo(str(index), name, uuid))

    def read(self) -> list[DeviceReading]:
        n = self._n
        out = []
        for h, counter in zip(self._handles, self._has_counter):
            mj = _try(n, n.nvmlDeviceGetTotalEnergyConsumption, h) if counter else None
            mw = _try(n, n.nvmlDeviceGetPowerUsage, h)
            util = _try(n, n.nvmlDeviceGetUtilizationRates, h)
            mem = _try(n, n.nvmlDeviceGetMemoryInfo, h)
            sm = _try(n, n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_SM)
            mc = _try(n, n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_MEM)
            out.append(
                DeviceReading(
                    power_w=None if mw is None else mw / 1000.0,
                    energy_j=None if mj is None else mj / 1000.0,
                    gpu_util_pct=None if util is None else float(util.gpu),
                    mem_util_pct=None if util is None else float(util.memory),
                    memory_used_mib=None if mem is None else mem.used / 2**20,
                    sm_clock_mhz=None if sm is None else float(sm),
                    mem_clock_mhz=None if mc is None else float(mc),
                )
            )
        return out

    def close(self) -> None:
        cm, self._cm = self._cm, None
        if cm is not None:
            try:
                cm.__exit__(None, None, None)
            except Exception:  # shutting NVML down must not fail a report
                pass

    def describe(self) -> str:
        if not self._devices:
            return "NVML"
        counters = sum(self._has_counter)
        how = (
            "total-energy counter"
            if counters == len(self._devices)
            else "power integrated (trapezoid)"
            if counters == 0
            else "total-energy counter where available, else power integrated"
        )
        gpus = ", ".join(f"{d.key} {d.name}" for d in self._devices)
        return f"NVML {how}; GPUs {gpus}"


def _try(n: Any, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except n.NVMLError:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpus_for_pids(pids: Iterable[int]) -> list[int] | None:
    """NVML indices of the GPUs on which any of ``pids`` has a context; None if unknown.

    Useful to sample only the GPUs a server uses. Containers may hide pids from
    NVML: None then, and the caller samples every GPU or names them.
    """
    ours = set(pids)
    try:
        found = sorted({p.gpu_index for p in telemetry.gpu_processes() if p.pid in ours})
    except Exception:  # NvmlUnavailable, driver errors
        return None
    return found or None


# -- modelled power ---------------------------------------------------------------------


class ModelledPowerSource(PowerSource):
    """Power from a model (the simulator), not a meter.

    ``read`` returns ``{"power_w": W, "energy_j": J}`` (``energy_j``, a
    cumulative counter, optional), or per device ``{"devices": [{...}, ...]}``.
    """

    modelled = True

    def __init__(self, read: Callable[[], Mapping[str, Any]], name: str = "modelled power") -> None:
        self._read = read
        self.name = name
        self._devices: list[DeviceInfo] = []

    def open(self) -> list[DeviceInfo]:
        try:
            readings = self._parse(self._read())
        except Exception as exc:
            raise EnergyUnavailable(f"{self.name}: {_why(exc)}") from None
        self._devices = [DeviceInfo(str(i), self.name) for i in range(len(readings))]
        return list(self._devices)

    def read(self) -> list[DeviceReading]:
        readings = self._parse(self._read())
        if len(readings) != len(self._devices):
            raise ValueError(f"{self.name} changed its device count to {len(readings)}")
        return readings

    def describe(self) -> str:
        return f"modelled: {self.name}"

    @staticmethod
    def _parse(doc: Mapping[str, Any]) -> list[DeviceReading]:
        if not isinstance(doc, Mapping):
            raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
        items = doc.get("devices")
        if items is None:
            items = [doc]
        if not isinstance(items, list) or not items:
            raise ValueError("'devices' must be a non-empty list")
        out = []
        for item in items:
            power = _number(item.get("power_w"), "power_w")
            energy = _number(item.get("energy_j"), "energy_j")
            if power is None and energy is None:
                raise ValueError("neither power_w nor energy_j given")
            out.append(
                DeviceReading(
                    power_w=power, energy_j=energy, gpu_util_pct=_number(item.get("gpu_util_pct"), "gpu_util_pct")
                )
            )
        return out


POWER_MAX_BYTES = 1 << 20  # a power reading is a few hundred bytes


class HttpPowerSource(ModelledPowerSource):
    """A JSON endpoint answering ``{"power_w": ..., "energy_j": ...}`` (e.g. the simulator's ``/sim/power``)."""

    def __init__(self, url: str, timeout: float = 1.0, modelled: bool = True) -> None:
        self.url = url
        self.timeout = timeout
        self.modelled = modelled
        super().__init__(self._get, name=url)

    def _get(self) -> Any:
        # bounded in time and size (and never through a proxy from the environment)
        response = boundedhttp.get(self.url, timeout=self.timeout, max_bytes=POWER_MAX_BYTES)
        if response.status != 200:
            raise OSError(f"GET {boundedhttp.safe_url(self.url)}: HTTP {response.status}")
        return json.loads(response.body.decode("utf-8"))

    def describe(self) -> str:
        return f"{'modelled' if self.modelled else 'reported'}: {self.url}"


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite non-negative number, got {value!r}")
    return float(value)


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


# -- the report -------------------------------------------------------------------------


@dataclass
class EnergyReport:
    """Energy of one window. ``measured=False``: not measured, and ``reason`` says why."""

    measured: bool
    reason: str = ""
    source: str = ""
    modelled: bool = False
    method: str = ""  # "counter", "power-integration" or "mixed"
    duration_s: float | None = None
    coverage: float | None = None  # share of the window the samples span (energy scaled up to 1)
    samples: int = 0
    read_errors: int = 0
    energy_j: float | None = None
    avg_power_w: float | None = None
    peak_power_w: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    j_per_input_token: float | None = None
    j_per_output_token: float | None = None
    j_per_token: float | None = None
    tokens_per_s_per_mw: float | None = None
    output_tokens_per_s_per_mw: float | None = None
    usd_per_kwh: float | None = None
    energy_kwh: float | None = None
    energy_usd: float | None = None
    energy_usd_per_mtok: float | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[list[float]] = field(default_factory=list)  # [seconds into the window, watts]

    @classmethod
    def not_measured(cls, reason: str, source: str = "") -> EnergyReport:
        return cls(measured=False, reason=reason, source=source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnergyReport:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def describe(self) -> str:
        if not self.measured:
            return f"energy not measured: {self.reason}"
        kind = "modelled" if self.modelled else "measured"
        parts = [
            f"{self.energy_j:.1f} J over {self.duration_s:.2f} s ({kind}, {self.source})",
            f"{self.avg_power_w:.0f} W average",
        ]
        if self.j_per_token is not None:
            parts.append(f"{self.j_per_token:.4g} J/token")
        if self.energy_usd is not None:
            parts.append(f"${self.energy_usd:.6f} at ${self.usd_per_kwh}/kWh")
        return ", ".join(parts)


# -- the sampler ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Sample:
    t: float
    cum_j: tuple[float, ...]  # per device, energy since the first sample
    readings: tuple[DeviceReading, ...]

    @property
    def total_j(self) -> float:
        return sum(self.cum_j)

    @property
    def power_w(self) -> float | None:
        ps = [r.power_w for r in self.readings]
        return None if any(p is None for p in ps) else sum(ps)  # type: ignore[arg-type]


class EnergySampler:
    """Samples a power source on a thread; stop it, then ask for a window's report.

    ::

        sampler = EnergySampler(NvmlPowerSource())   # or EnergySampler() for NVML, all GPUs
        with sampler:                                 # start() ... stop()
            result = infmax.run("1k1k", concurrency=64)
        report = sampler.report_for(result, usd_per_kwh=0.08)

    ``clock`` is the clock of the windows (``time.perf_counter``, as records use).
    """

    def __init__(
        self,
        source: PowerSource | None = None,
        period: float = DEFAULT_PERIOD_S,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not period > 0:
            raise ValueError(f"period must be positive, got {period!r}")
        if max_samples < 4:
            raise ValueError(f"max_samples must be at least 4, got {max_samples!r}")
        self.source = source if source is not None else NvmlPowerSource()
        self.period = float(period)
        self.max_samples = int(max_samples)
        self.clock = clock
        self.unavailable: str | None = None  # why nothing is measured, once known
        self.read_errors = 0
        self.last_error: str | None = None
        self._devices: list[DeviceInfo] = []
        self._samples: list[_Sample] = []
        self._stride = 1  # keep one read in ``_stride`` (grows as samples are thinned)
        self._reads = 0
        self._prev: _Sample | None = None  # the latest sample, kept even when thinned out
        self._methods: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opened = False

    # -- life cycle --

    def start(self, thread: bool = True) -> EnergySampler:
        """Open the source, take a first sample and start the thread; never raises for a missing GPU.

        ``thread=False`` opens and samples once without a thread: the caller
        then calls :meth:`sample_now` itself (tests with a fake clock).
        """
        if self._thread is not None or self._opened:
            raise RuntimeError("this sampler was already started")
        try:
            self._devices = self.source.open()
            self._opened = True
        except EnergyUnavailable as exc:
            self.unavailable = str(exc)
            return self
        except Exception as exc:  # a broken driver or library: still "not measured"
            self.unavailable = f"{type(exc).__name__}: {_why(exc)}"
            return self
        self.sample_now()
        if not thread:
            return self
        self._thread = threading.Thread(target=self._loop, name="infmax-energy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread, take a last sample and close the source (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=max(5.0, 10 * self.period))
        if self._opened:
            self.sample_now()
            self._opened = False
            self.source.close()

    def __enter__(self) -> EnergySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        next_t = self.clock() + self.period
        while not self._stop.wait(max(0.0, next_t - self.clock())):
            self.sample_now()
            next_t += self.period
            now = self.clock()
            if next_t < now:  # fell behind (slow source): skip, never burst
                next_t = now + self.period

    # -- sampling --

    def sample_now(self) -> None:
        """Read the source once (the thread calls this every period; tests may call it directly)."""
        if not self._opened:
            return
        t = self.clock()
        try:
            readings = tuple(self.source.read())
            if len(readings) != len(self._devices):
                raise ValueError(f"source gave {len(readings)} readings for {len(self._devices)} devices")
        except Exception as exc:
            with self._lock:
                self.read_errors += 1
                self.last_error = f"{type(exc).__name__}: {_why(exc)}"
            return
        with self._lock:
            prev = self._prev
            if prev is None:
                cum = tuple(0.0 for _ in readings)
            else:
                if t <= prev.t:
                    return
                cum = tuple(self._integrate(prev, i, r, t) for i, r in enumerate(readings))
            sample = _Sample(t, cum, readings)
            self._prev = sample
            self._reads += 1
            if (self._reads - 1) % self._stride == 0:
                self._samples.append(sample)
                if len(self._samples) > self.max_samples:
                    self._samples = self._samples[::2]
                    self._stride *= 2

    def _integrate(self, prev: _Sample, i: int, now: DeviceReading, t: float) -> float:
        before = prev.readings[i]
        if before.energy_j is not None and now.energy_j is not None and now.energy_j >= before.energy_j:
            self._methods.add("counter")
            return prev.cum_j[i] + (now.energy_j - before.energy_j)
        p0, p1 = before.power_w, now.power_w
        if p0 is None and p1 is None:
            # Nothing to integrate over this interval: keep the total (and say so in the method).
            self._methods.add("gap")
            return prev.cum_j[i]
        p0 = p1 if p0 is None else p0
        p1 = p0 if p1 is None else p1
        self._methods.add("power-integration")
        return prev.cum_j[i] + 0.5 * (p0 + p1) * (t - prev.t)  # type: ignore[operator]

    def samples(self) -> list[tuple[float, float, float | None]]:
        """``(t, cumulative joules, total watts)`` of the kept samples."""
        with self._lock:
            return [(s.t, s.total_j, s.power_w) for s in self._kept()]

    def _kept(self) -> list[_Sample]:
        out = list(self._samples)
        if self._prev is not None and (not out or out[-1] is not self._prev):
            out.append(self._prev)  # the latest reading always counts, thinned or not
        return out

    # -- reports --

    def report(
        self,
        start: float | None = None,
        end: float | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        usd_per_kwh: float | None = None,
    ) -> EnergyReport:
        """Energy between ``start`` and ``end`` (the sampler's clock; default: everything sampled)."""
        source = self.source.describe()
        if self.unavailable is not None:
            return EnergyReport.not_measured(self.unavailable, source)
        with self._lock:
            kept = self._kept()
            errors = self.read_errors
            last_error = self.last_error
            methods = set(self._methods)
        if len(kept) < 2:
            why = "fewer than two power samples were taken"
            if last_error:
                why += f" ({errors} reads failed; last: {last_error})"
            return EnergyReport.not_measured(why, source)
        t_first, t_last = kept[0].t, kept[-1].t
        start = t_first if start is None else float(start)
        end = t_last if end is None else float(end)
        if not end > start:
            return EnergyReport.not_measured(f"empty window ({start:.3f} to {end:.3f} s)", source)
        lo, hi = max(start, t_first), min(end, t_last)
        if not hi > lo:
            return EnergyReport.not_measured(
                f"no power samples during the window ({start:.3f} to {end:.3f} s; "
                f"sampled {t_first:.3f} to {t_last:.3f} s)",
                source,
            )
        duration = end - start
        coverage = (hi - lo) / duration
        n_dev = len(self._devices)
        dev_j = [(_interp(kept, hi, i) - _interp(kept, lo, i)) / coverage for i in range(n_dev)]
        energy = sum(dev_j)
        inside = [s for s in kept if lo <= s.t <= hi]
        powers = [s.power_w for s in inside if s.power_w is not None]
        rep = EnergyReport(
            measured=True,
            source=source,
            modelled=self.source.modelled,
            method=_method(methods),
            duration_s=duration,
            coverage=round(coverage, 6),
            samples=len(inside),
            read_errors=errors,
            energy_j=energy,
            avg_power_w=energy / duration,
            peak_power_w=max(powers) if powers else None,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            gpus=[_device_summary(d, [s for s in inside], i, dev_j[i], duration) for i, d in enumerate(self._devices)],
            timeline=_timeline(inside, start),
        )
        _per_token(rep, usd_per_kwh)
        return rep

    def report_for(self, result: Any, usd_per_kwh: float | None = None) -> EnergyReport:
        """The report for a ``LoadResult``'s measured phase and its token counts."""
        run, m = result.run, result.metrics
        return self.report(
            run.measured_start,
            run.measured_end,
            input_tokens=m.total_input_tokens,
            output_tokens=m.total_output_tokens,
            usd_per_kwh=usd_per_kwh,
        )


def _interp(samples: list[_Sample], t: float, i: int) -> float:
    """Cumulative joules of device ``i`` at ``t`` (linear between samples)."""
    lo, hi = 0, len(samples) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if samples[mid].t <= t:
            lo = mid
        else:
            hi = mid
    a, b = samples[lo], samples[hi]
    if b.t == a.t:
        return a.cum_j[i]
    f = min(max((t - a.t) / (b.t - a.t), 0.0), 1.0)
    return a.cum_j[i] + f * (b.cum_j[i] - a.cum_j[i])


def _method(methods: set[str]) -> str:
    real = methods - {"gap"}
    if not real:
        return "none"
    return real.pop() if len(real) == 1 else "mixed"


def _mean(values: Iterable[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return sum(vs) / len(vs) if vs else None


def _device_summary(d: DeviceInfo, samples: list[_Sample], i: int, energy: float, duration: float) -> dict[str, Any]:
    rs = [s.readings[i] for s in samples]
    mem = [r.memory_used_mib for r in rs if r.memory_used_mib is not None]
    return {
        "key": d.key,
        "name": d.name,
        "uuid": d.uuid,
        "energy_j": energy,
        "avg_power_w": energy / duration,
        "gpu_util_pct": _mean(r.gpu_util_pct for r in rs),
        "mem_util_pct": _mean(r.mem_util_pct for r in rs),
        "memory_used_mib_max": max(mem) if mem else None,
        "sm_clock_mhz": _mean(r.sm_clock_mhz for r in rs),
        "mem_clock_mhz": _mean(r.mem_clock_mhz for r in rs),
    }


def _timeline(samples: list[_Sample], start: float) -> list[list[float]]:
    pts = [(s.t - start, s.power_w) for s in samples if s.power_w is not None]
    if len(pts) > TIMELINE_POINTS:
        step = len(pts) / TIMELINE_POINTS
        pts = [pts[int(k * step)] for k in range(TIMELINE_POINTS)]
    return [[round(t, 4), round(p, 2)] for t, p in pts]


def _per_token(rep: EnergyReport, usd_per_kwh: float | None) -> None:
    e, d = rep.energy_j, rep.duration_s
    assert e is not None and d is not None
    tin, tout = rep.input_tokens, rep.output_tokens
    total = (tin or 0) + (tout or 0) if (tin is not None or tout is not None) else None
    rep.j_per_input_token = e / tin if tin else None
    rep.j_per_output_token = e / tout if tout else None
    rep.j_per_token = e / total if total else None
    mw = (rep.avg_power_w or 0.0) / 1e6
    rep.tokens_per_s_per_mw = total / d / mw if total and mw > 0 else None
    rep.output_tokens_per_s_per_mw = tout / d / mw if tout and mw > 0 else None
    rep.energy_kwh = e / 3.6e6
    if usd_per_kwh is not None:
        if isinstance(usd_per_kwh, bool) or not usd_per_kwh >= 0 or math.isinf(usd_per_kwh):
            raise ValueError(f"$/kWh must be a non-negative number, got {usd_per_kwh!r}")
        rep.usd_per_kwh = float(usd_per_kwh)
        rep.energy_usd = rep.energy_kwh * usd_per_kwh
        rep.energy_usd_per_mtok = rep.energy_usd / total * 1e6 if total else None

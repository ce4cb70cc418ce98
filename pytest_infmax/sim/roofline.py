"""Roofline step-cost model, and the hardware and model profiles it is built from.

A step of the engine (:mod:`pytest_infmax.sim.engine`) takes, per GPU::

    max(FLOPs / (peak FLOP/s x compute efficiency),
        bytes moved / (HBM bandwidth x bandwidth efficiency)) + fixed step overhead

where the FLOPs of routed experts run at their own, lower, ``moe_compute_efficiency``
(grouped GEMMs, routing, token permutation and expert-parallel exchange: MoE models
reach a fraction of dense models' MFU in every published measurement we fitted).
The efficiencies are fitted to published throughput (docs/calibration.md).

* FLOPs = 2 x active parameters x tokens in the step, plus attention:
  2 x layers x heads x (qk dim + v dim) x context, per token (4 x layers x heads x
  head_dim x context for ordinary attention; MLA's absorbed form uses the latent
  dimensions). Prefill chunks are causal: token i of a chunk attends over the
  cached tokens plus i. Sliding-window layers attend over at most the window.
* Bytes = weights read once per step (for MoE, only the routed experts the step's
  tokens touch: expected distinct experts for B tokens with top-k of E is
  E x (1 - (1 - k/E)^B)) + the KV cache every sequence attends over.

Parallelism: ``tp`` GPUs share each attention group (tensor parallel), ``gpus / tp``
groups run side by side (attention data parallel; "DEP" when the model is MoE).
Work is assumed evenly spread: FLOPs and KV reads divide by ``gpus``, non-expert
weights by ``tp`` (each group holds a copy), routed experts by ``gpus`` (expert
parallel). KV heads are replicated when ``tp`` exceeds them, and MLA's latent is
replicated on every rank of a group. Communication is not modelled separately: it
is folded into the efficiency factors and the step overhead (docs/calibration.md).

KV-cache capacity in tokens = (memory x gpus x gpu_memory_utilization - weights)
/ KV bytes per token, counting full-attention layers only (a sliding-window layer
holds at most ``sliding_window`` tokens per sequence, which the utilization margin
covers, as vLLM's hybrid allocator does).

Profiles are data: TOML files with ``[hardware.NAME]`` and ``[model.NAME]`` tables
(:data:`HARDWARE_KEYS`, :data:`MODEL_KEYS`). The built-in ones live in
``pytest_infmax/sim/profiles/``; ``--profile-file my.toml`` adds more or replaces
built-ins of the same name.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from itertools import repeat
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib

    _HAVE_TOML = True
else:  # Python 3.10
    try:
        import tomli as tomllib

        _HAVE_TOML = True
    except ModuleNotFoundError:  # pragma: no cover - depends on the interpreter
        _HAVE_TOML = False

from pytest_infmax.sim.engine import StepBatch

PROFILES_PACKAGE = "pytest_infmax.sim.profiles"

# Precisions a profile may name, narrowest first. A GPU without a peak for the
# model's compute precision runs it at the next wider one it has (as Hopper runs
# FP4 weights with FP8 math).
PRECISIONS = ("fp4", "fp8", "bf16")
# Weight storage per precision, bits per parameter including block scales
# (fp4 = NVFP4: 4-bit values plus one 8-bit scale per 16).
PRECISION_WEIGHT_BITS = {"fp4": 4.5, "fp8": 8.0, "bf16": 16.0}
KV_CACHE_DTYPE_BYTES = {"fp8": 1.0, "bf16": 2.0}

# A deployment chosen automatically must leave at least this much KV cache.
MIN_AUTO_KV_TOKENS = 65_536
AUTO_TP_CHOICES = (1, 2, 4, 8)


class ProfileError(ValueError):
    """A profile that cannot be found, read or used; the message names the file,
    the key and what is allowed."""


# -- schema --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    name: str
    check: Callable[[Any], Any]  # returns the converted value or raises ValueError(what was expected)
    required: bool = False
    help: str = ""


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError("a number > 0")
    return float(value)


def _non_negative(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
        raise ValueError("a number >= 0")
    return float(value)


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError("a number in (0, 1]")
    return float(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("an integer >= 1")
    return value


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("an integer >= 0")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _precision(value: Any) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"one of {', '.join(repr(p) for p in PRECISIONS)}")
    return value


def _kv_dtype(value: Any) -> str:
    if value not in KV_CACHE_DTYPE_BYTES:
        raise ValueError(f"one of {', '.join(repr(p) for p in KV_CACHE_DTYPE_BYTES)}")
    return value


def _tflops_table(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not value:
        raise ValueError(
            f"a table of precision = TFLOP/s, e.g. {{ bf16 = 989, fp8 = 1979 }}; precisions: {', '.join(PRECISIONS)}"
        )
    table = {}
    for precision, tflops in value.items():
        if precision not in PRECISIONS:
            raise ValueError(f"precisions among {', '.join(PRECISIONS)} (got {precision!r})")
        try:
            table[precision] = _positive(tflops)
        except ValueError:
            raise ValueError(f"TFLOP/s > 0 for {precision} (got {tflops!r})") from None
    return table


HARDWARE_KEYS: tuple[_Key, ...] = (
    _Key("description", _text, help="free text"),
    _Key("source", _text, help="where the numbers come from"),
    _Key("memory_gb", _positive, True, "HBM per GPU, GB"),
    _Key("memory_bandwidth_tb_s", _positive, True, "HBM bandwidth per GPU, TB/s"),
    _Key(
        "dense_tflops",
        _tflops_table,
        True,
        "peak dense tensor TFLOP/s per precision: { bf16 = ..., fp8 = ..., fp4 = ... }",
    ),
    _Key("compute_efficiency", _fraction, help="achieved / peak FLOP/s of dense layers and attention (default 0.5)"),
    _Key(
        "moe_compute_efficiency",
        _fraction,
        help="achieved / peak FLOP/s of routed experts (default: compute_efficiency)",
    ),
    _Key("bandwidth_efficiency", _fraction, help="achieved / peak HBM bandwidth (default 0.8)"),
    _Key("step_overhead_ms", _non_negative, help="fixed cost of every step: launch, scheduling, sampling (default 0)"),
    _Key("tdp_w", _positive, help="board power at full load, W (modelled power; default: none modelled)"),
    _Key("idle_w", _non_negative, help="board power when no step runs, W (default 15 % of tdp_w)"),
)

MODEL_KEYS: tuple[_Key, ...] = (
    _Key("description", _text, help="free text"),
    _Key("source", _text, help="where the numbers come from"),
    _Key("total_params_b", _positive, True, "all parameters, billions"),
    _Key("active_params_b", _positive, True, "parameters used per token, billions"),
    _Key("layers", _positive_int, True, "transformer layers"),
    _Key("hidden_size", _positive_int, True, "model width"),
    _Key("vocab_size", _positive_int, True, "vocabulary size"),
    _Key("attention_heads", _positive_int, True, "query heads"),
    _Key("kv_heads", _positive_int, help="key/value heads (GQA); required unless MLA"),
    _Key("head_dim", _positive_int, help="per-head dimension; required unless MLA"),
    _Key("mla_kv_lora_rank", _positive_int, help="MLA latent dimension (DeepSeek)"),
    _Key("mla_rope_dim", _non_negative_int, help="MLA decoupled RoPE key dimension"),
    _Key("sliding_window", _positive_int, help="window of the sliding-window layers, tokens"),
    _Key("sliding_window_layers", _non_negative_int, help="how many layers use the sliding window"),
    _Key("experts", _non_negative_int, help="routed experts per MoE layer (0: dense)"),
    _Key("experts_per_token", _positive_int, help="top-k routing"),
    _Key("expert_params_b", _positive, help="routed-expert parameters over all layers, billions"),
    _Key("tied_embeddings", _boolean, help="input embedding shares the output projection"),
    _Key("weight_bits", _positive, help="bits per non-expert weight, scales included (default 16)"),
    _Key("expert_weight_bits", _positive, help="bits per routed-expert weight (default: weight_bits)"),
    _Key("compute_dtype", _precision, help="precision of the matmuls (default bf16)"),
    _Key("kv_cache_dtype", _kv_dtype, help="KV-cache precision (default bf16)"),
)


CALIBRATION_KEYS: tuple[_Key, ...] = (
    _Key("description", _text, help="free text"),
    _Key("source", _text, help="the published measurements it was fitted to"),
    _Key("compute_efficiency", _fraction, help="replaces the hardware's for this model"),
    _Key("moe_compute_efficiency", _fraction, help="replaces the hardware's for this model"),
    _Key("bandwidth_efficiency", _fraction, help="replaces the hardware's for this model"),
    _Key("step_overhead_ms", _non_negative, help="replaces the hardware's for this model"),
)


def _allowed(keys: tuple[_Key, ...]) -> str:
    return ", ".join(key.name for key in keys)


def _validate(table: Any, keys: tuple[_Key, ...], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ProfileError(f"{where}: expected a table of keys ({_allowed(keys)}), got {type(table).__name__}")
    by_name = {key.name: key for key in keys}
    values: dict[str, Any] = {}
    for name, raw in table.items():
        key = by_name.get(name)
        if key is None:
            raise ProfileError(f"{where}: unknown key {name!r}; allowed keys: {_allowed(keys)}")
        try:
            values[name] = key.check(raw)
        except ValueError as exc:
            raise ProfileError(f"{where}: {name} must be {exc}, got {raw!r}") from None
    missing = [key.name for key in keys if key.required and key.name not in values]
    if missing:
        raise ProfileError(f"{where}: missing required key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return values


# -- profiles ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    memory_gb: float
    memory_bandwidth_tb_s: float
    dense_tflops: Mapping[str, float]
    compute_efficiency: float = 0.5
    moe_compute_efficiency: float | None = None  # None: compute_efficiency
    bandwidth_efficiency: float = 0.8
    step_overhead_ms: float = 0.0
    tdp_w: float | None = None
    idle_w: float | None = None
    description: str = ""
    source: str = ""
    origin: str = ""  # the file it was read from

    def compute_precision(self, wanted: str) -> str:
        """``wanted`` if this GPU has a peak for it, else the next wider precision it has."""
        for precision in PRECISIONS[PRECISIONS.index(wanted) :]:
            if precision in self.dense_tflops:
                return precision
        raise ProfileError(
            f"{self.origin or 'hardware'}: [hardware.{self.name}] dense_tflops has no peak for {wanted} "
            f"or wider (has {', '.join(self.dense_tflops)})"
        )


@dataclass(frozen=True)
class ModelProfile:
    name: str
    total_params_b: float
    active_params_b: float
    layers: int
    hidden_size: int
    vocab_size: int
    attention_heads: int
    kv_heads: int | None = None
    head_dim: int | None = None
    mla_kv_lora_rank: int | None = None
    mla_rope_dim: int = 0
    sliding_window: int | None = None
    sliding_window_layers: int = 0
    experts: int = 0
    experts_per_token: int | None = None
    expert_params_b: float = 0.0
    tied_embeddings: bool = False
    weight_bits: float = 16.0
    expert_weight_bits: float | None = None
    compute_dtype: str = "bf16"
    kv_cache_dtype: str = "bf16"
    description: str = ""
    source: str = ""
    origin: str = ""

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def is_mla(self) -> bool:
        return self.mla_kv_lora_rank is not None

    @property
    def full_attention_layers(self) -> int:
        return self.layers - self.sliding_window_layers

    @property
    def embedding_params(self) -> float:
        """Input-embedding parameters: stored, looked up by row, never streamed whole."""
        return 0.0 if self.tied_embeddings else float(self.vocab_size * self.hidden_size)

    @property
    def kv_elements_per_token_per_layer(self) -> int:
        if self.is_mla:
            return self.mla_kv_lora_rank + self.mla_rope_dim  # type: ignore[operator]
        return 2 * self.kv_heads * self.head_dim  # type: ignore[operator]

    @property
    def attention_flops_per_context_token(self) -> float:
        """FLOPs one query token spends on one context token in one layer."""
        if self.is_mla:  # absorbed MLA: scores over latent+rope, values over the latent
            return 2.0 * self.attention_heads * (2 * self.mla_kv_lora_rank + self.mla_rope_dim)  # type: ignore[operator]
        return 4.0 * self.attention_heads * self.head_dim  # type: ignore[operator]


def _hardware_from(name: str, table: Any, origin: str) -> HardwareProfile:
    values = _validate(table, HARDWARE_KEYS, f"{origin}: [hardware.{name}]")
    return HardwareProfile(name=name, origin=origin, **values)


def _model_from(name: str, table: Any, origin: str) -> ModelProfile:
    where = f"{origin}: [model.{name}]"
    values = _validate(table, MODEL_KEYS, where)
    if "mla_kv_lora_rank" in values:
        if "kv_heads" in values:
            raise ProfileError(f"{where}: give either mla_kv_lora_rank (MLA) or kv_heads (GQA), not both")
    else:
        missing = [k for k in ("kv_heads", "head_dim") if k not in values]
        if missing:
            raise ProfileError(f"{where}: missing {' and '.join(missing)} (required unless mla_kv_lora_rank is set)")
    if values["active_params_b"] > values["total_params_b"]:
        raise ProfileError(
            f"{where}: active_params_b ({values['active_params_b']:g}) exceeds total_params_b ({values['total_params_b']:g})"
        )
    if values.get("experts", 0):
        missing = [k for k in ("experts_per_token", "expert_params_b") if k not in values]
        if missing:
            raise ProfileError(f"{where}: a MoE model (experts > 0) needs {' and '.join(missing)}")
        if values["experts_per_token"] > values["experts"]:
            raise ProfileError(
                f"{where}: experts_per_token ({values['experts_per_token']}) exceeds experts ({values['experts']})"
            )
        if values["expert_params_b"] >= values["total_params_b"]:
            raise ProfileError(f"{where}: expert_params_b must be less than total_params_b")
    if "sliding_window" in values and "sliding_window_layers" not in values:
        raise ProfileError(f"{where}: sliding_window needs sliding_window_layers (how many layers use it)")
    if values.get("sliding_window_layers", 0) > values["layers"]:
        raise ProfileError(f"{where}: sliding_window_layers exceeds layers ({values['layers']})")
    if values.get("sliding_window_layers", 0) and "sliding_window" not in values:
        raise ProfileError(f"{where}: sliding_window_layers needs sliding_window (the window, tokens)")
    return ModelProfile(name=name, origin=origin, **values)


class ProfileRegistry:
    """Hardware and model profiles by name: the built-in files, then user files.

    Besides ``[hardware.NAME]`` and ``[model.NAME]``, a file may hold
    ``[calibration."HARDWARE/MODEL"]`` tables: efficiency factors fitted for that
    pair, replacing the hardware's defaults when that model runs on it."""

    def __init__(self) -> None:
        self.hardware: dict[str, HardwareProfile] = {}
        self.models: dict[str, ModelProfile] = {}
        self.calibrations: dict[str, dict[str, Any]] = {}

    @classmethod
    def builtin(cls) -> ProfileRegistry:
        registry = cls()
        for entry in sorted(resources.files(PROFILES_PACKAGE).iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".toml"):
                registry.add_text(entry.read_text(encoding="utf-8"), f"built-in profile {entry.name}")
        return registry

    @classmethod
    def with_files(cls, paths: Iterable[str | Path] = ()) -> ProfileRegistry:
        registry = cls.builtin()
        for path in paths:
            registry.add_file(path)
        return registry

    def add_file(self, path: str | Path) -> None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError(f"--profile-file {path}: cannot read it: {exc.strerror or exc}") from None
        self.add_text(text, str(path))

    def add_text(self, text: str, origin: str) -> None:
        if not _HAVE_TOML:  # pragma: no cover
            raise ProfileError(f"{origin}: reading TOML needs Python >= 3.11 or the 'tomli' package")
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ProfileError(f"{origin}: not valid TOML: {exc}") from None
        unknown = [key for key in document if key not in ("hardware", "model", "calibration")]
        if unknown or not document:
            raise ProfileError(
                f'{origin}: expected [hardware.NAME], [model.NAME] or [calibration."HARDWARE/MODEL"] tables'
                + (f", got top-level key {unknown[0]!r}" if unknown else ", the file has none")
            )
        for name, table in _named_tables(document, "hardware", origin).items():
            self.hardware[name] = _hardware_from(name, table, origin)
        for name, table in _named_tables(document, "model", origin).items():
            self.models[name] = _model_from(name, table, origin)
        for name, table in _named_tables(document, "calibration", origin).items():
            self.calibrations[name] = _calibration_from(name, table, origin)

    def resolve(self, spec: str) -> tuple[HardwareProfile, ModelProfile]:
        """``"HARDWARE/MODEL"`` -> the two profiles, or an error listing what exists."""
        hardware_name, slash, model_name = spec.partition("/")
        if not slash or not hardware_name or not model_name:
            raise ProfileError(
                f"--profile {spec!r}: expected HARDWARE/MODEL, e.g. b200/gpt-oss-120b; "
                f"hardware: {', '.join(sorted(self.hardware))}; models: {', '.join(sorted(self.models))}"
            )
        hardware = self.hardware.get(hardware_name.lower()) or self.hardware.get(hardware_name)
        if hardware is None:
            raise ProfileError(
                f"--profile {spec!r}: unknown hardware {hardware_name!r}; known: {', '.join(sorted(self.hardware))} "
                "(add one with --profile-file FILE.toml holding a [hardware.NAME] table)"
            )
        model = self.models.get(model_name.lower()) or self.models.get(model_name)
        if model is None:
            raise ProfileError(
                f"--profile {spec!r}: unknown model {model_name!r}; known: {', '.join(sorted(self.models))} "
                "(add one with --profile-file FILE.toml holding a [model.NAME] table)"
            )
        overrides = self.calibrations.get(f"{hardware.name}/{model.name}")
        if overrides:
            hardware = dataclasses.replace(
                hardware, **{k: v for k, v in overrides.items() if k not in ("description", "source")}
            )
        return hardware, model


def _named_tables(document: dict[str, Any], kind: str, origin: str) -> dict[str, Any]:
    """The ``[kind.NAME]`` tables of a profile document (none: empty)."""
    tables = document.get(kind, {})
    if not isinstance(tables, dict):
        raise ProfileError(f"{origin}: [{kind}] must hold named tables, e.g. [{kind}.my-name]")
    return tables


def _calibration_from(name: str, table: Any, origin: str) -> dict[str, Any]:
    where = f'{origin}: [calibration."{name}"]'
    hardware_name, slash, model_name = name.partition("/")
    if not slash or not hardware_name or not model_name:
        raise ProfileError(f'{where}: the name must be "HARDWARE/MODEL", e.g. [calibration."b200/gpt-oss-120b"]')
    return _validate(table, CALIBRATION_KEYS, where)


# -- a deployment: hardware x model x parallelism ------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """A model served on ``gpus`` GPUs of one kind, ``tp`` per attention group."""

    hardware: HardwareProfile
    model: ModelProfile
    tp: int = 1
    gpus: int = 1
    gpu_memory_utilization: float = 0.9
    precision: str | None = None  # overrides the model's weight and compute precision
    kv_cache_dtype: str | None = None  # overrides the model's
    compute_efficiency: float | None = None  # override the hardware's calibrated values
    moe_compute_efficiency: float | None = None
    bandwidth_efficiency: float | None = None
    step_overhead_ms: float | None = None

    def __post_init__(self) -> None:
        if self.tp < 1 or self.gpus < 1:
            raise ProfileError(f"--tp and --gpus must be >= 1, got tp={self.tp}, gpus={self.gpus}")
        if self.gpus % self.tp:
            raise ProfileError(
                f"--gpus ({self.gpus}) must be a multiple of --tp ({self.tp}): gpus / tp attention groups"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ProfileError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ProfileError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPE_BYTES:
            raise ProfileError(
                f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPE_BYTES)}, got {self.kv_cache_dtype!r}"
            )
        for name in ("compute_efficiency", "moe_compute_efficiency", "bandwidth_efficiency"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ProfileError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
        if self.step_overhead_ms is not None and self.step_overhead_ms < 0:
            raise ProfileError(f"--step-overhead-ms must be >= 0, got {self.step_overhead_ms}")
        if self.kv_cache_bytes <= 0:
            raise ProfileError(
                f"{self.model.name} does not fit on {self.gpus} x {self.hardware.name}: weights need "
                f"{self.weight_memory_bytes / 1e9:.1f} GB of {self.usable_memory_bytes / 1e9:.1f} GB usable "
                f"({self.gpus} x {self.hardware.memory_gb:g} GB x {self.gpu_memory_utilization:g}); "
                "use more GPUs (--tp / --gpus) or a narrower --precision"
            )

    # -- derived quantities ----------------------------------------------------------

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    @property
    def label(self) -> str:
        if self.dp == 1:
            parallel = f"TP{self.tp}"
        elif self.tp == 1:
            parallel = f"{'DEP' if self.model.is_moe else 'DP'}{self.dp}"
        else:
            parallel = f"TP{self.tp}xDP{self.dp}"
        return f"{self.hardware.name}/{self.model.name} {parallel} ({self.gpus} GPU{'s' if self.gpus > 1 else ''})"

    @property
    def weight_bits(self) -> float:
        if self.precision is not None:
            return PRECISION_WEIGHT_BITS[self.precision]
        return self.model.weight_bits

    @property
    def expert_weight_bits(self) -> float:
        if self.precision is not None:
            return PRECISION_WEIGHT_BITS[self.precision]
        return self.model.expert_weight_bits or self.model.weight_bits

    @property
    def compute_precision(self) -> str:
        return self.hardware.compute_precision(self.precision or self.model.compute_dtype)

    @property
    def kv_dtype(self) -> str:
        return self.kv_cache_dtype or self.model.kv_cache_dtype

    @property
    def expert_params(self) -> float:
        return self.model.expert_params_b * 1e9

    @property
    def non_expert_params(self) -> float:
        """Everything but the routed experts and the input embedding: streamed every step."""
        return self.model.total_params_b * 1e9 - self.expert_params - self.model.embedding_params

    @property
    def weight_memory_bytes(self) -> float:
        """Weights in memory over all GPUs: each attention group holds the non-expert
        weights (and embedding); routed experts are held once."""
        dense = (self.non_expert_params + self.model.embedding_params) * self.weight_bits / 8
        return dense * self.dp + self.expert_params * self.expert_weight_bits / 8

    @property
    def usable_memory_bytes(self) -> float:
        return self.hardware.memory_gb * 1e9 * self.gpus * self.gpu_memory_utilization

    @property
    def kv_cache_bytes(self) -> float:
        return self.usable_memory_bytes - self.weight_memory_bytes

    @property
    def kv_replication(self) -> float:
        """Copies of each token's KV across the ranks of one attention group."""
        if self.model.is_mla:
            return float(self.tp)
        return max(1.0, self.tp / self.model.kv_heads)  # type: ignore[operator]

    @property
    def kv_bytes_per_token_per_layer(self) -> float:
        return self.model.kv_elements_per_token_per_layer * KV_CACHE_DTYPE_BYTES[self.kv_dtype] * self.kv_replication

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes one token takes (full-attention layers, replication included)."""
        return self.kv_bytes_per_token_per_layer * self.model.full_attention_layers

    @property
    def kv_cache_tokens(self) -> int:
        return max(0, int(self.kv_cache_bytes / self.kv_bytes_per_token))

    def describe(self) -> str:
        return (
            f"{self.label}: weights {self.weight_memory_bytes / 1e9:.1f} GB, KV cache {self.kv_cache_tokens:,} tokens "
            f"({self.kv_dtype}), compute {self.compute_precision}"
        )


def auto_deployment(hardware: HardwareProfile, model: ModelProfile, **options: Any) -> Deployment:
    """The smallest tensor-parallel size in 1, 2, 4, 8 whose KV cache holds at least
    MIN_AUTO_KV_TOKENS tokens (one attention group, ``gpus = tp``)."""
    last_error: ProfileError | None = None
    for tp in AUTO_TP_CHOICES:
        try:
            deployment = Deployment(hardware, model, tp=tp, gpus=tp, **options)
        except ProfileError as exc:
            last_error = exc
            continue
        last_error = None
        if deployment.kv_cache_tokens >= MIN_AUTO_KV_TOKENS:
            return deployment
    if last_error is not None:
        raise last_error
    raise ProfileError(
        f"{model.name} on up to {AUTO_TP_CHOICES[-1]} x {hardware.name} leaves less than {MIN_AUTO_KV_TOKENS:,} "
        "tokens of KV cache; give --tp / --gpus explicitly"
    )


# -- the cost model ------------------------------------------------------------------------


class RooflineCostModel:
    """Step time of a :class:`Deployment` by the roofline (module docstring)."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        hardware, model = deployment.hardware, deployment.model
        gpus = deployment.gpus
        compute_efficiency = deployment.compute_efficiency or hardware.compute_efficiency
        moe_compute_efficiency = (
            deployment.moe_compute_efficiency or hardware.moe_compute_efficiency or compute_efficiency
        )
        bandwidth_efficiency = deployment.bandwidth_efficiency or hardware.bandwidth_efficiency
        overhead_ms = hardware.step_overhead_ms if deployment.step_overhead_ms is None else deployment.step_overhead_ms
        peak_flops = hardware.dense_tflops[deployment.compute_precision] * 1e12
        # Seconds per unit of work on one GPU, folding in efficiency and the even spread.
        self._seconds_per_flop = 1.0 / (peak_flops * compute_efficiency * gpus)
        self._seconds_per_expert_flop = 1.0 / (peak_flops * moe_compute_efficiency * gpus)
        self._seconds_per_byte = 1.0 / (hardware.memory_bandwidth_tb_s * 1e12 * bandwidth_efficiency)
        self.overhead_s = overhead_ms / 1e3
        # Routed-expert FLOPs per token (top-k of the experts) and the rest.
        top_k = model.experts_per_token
        if top_k is None:
            if model.is_moe:  # profile files are checked for it; a ModelProfile built in code is not
                raise ProfileError(f"{model.name}: a MoE model (experts > 0) needs experts_per_token")
            top_k = 0
        self._expert_flops_per_token = 2.0 * deployment.expert_params * top_k / model.experts if model.is_moe else 0.0
        self._flops_per_token = 2.0 * model.active_params_b * 1e9 - self._expert_flops_per_token
        self._attention_flops = model.attention_flops_per_context_token  # per layer
        self._full_layers = model.full_attention_layers
        self._window_layers = model.sliding_window_layers
        self._window = model.sliding_window or 0
        # Bytes per GPU per step.
        self._dense_bytes = deployment.non_expert_params * deployment.weight_bits / 8 / deployment.tp
        self._expert_bytes = deployment.expert_params * deployment.expert_weight_bits / 8 / gpus
        self._experts = model.experts
        self._miss = 1.0 - top_k / model.experts if model.is_moe else 1.0
        self._kv_bytes_per_layer_token = deployment.kv_bytes_per_token_per_layer / gpus

    # The engine calls this with the per-sequence shape of the step.
    def batch_seconds(self, batch: StepBatch) -> float:
        tokens = batch.num_decode + batch.prefill_tokens
        if tokens == 0:
            return self.overhead_s
        contexts = batch.decode_contexts
        full_context = sum(contexts)  # KV tokens read (and attended, one query each) by decodes
        window = self._window
        window_context = sum(map(min, contexts, repeat(window))) if self._window_layers else 0
        full_attended = full_context
        window_attended = window_context
        for cached, chunk in batch.prefill_chunks:
            full_context += cached
            full_attended += chunk * cached + chunk * (chunk + 1) // 2
            if self._window_layers:
                window_context += min(cached, window)
                # sum over i = 1..chunk of min(cached + i, window)
                k = max(0, min(window - cached, chunk))
                window_attended += k * cached + k * (k + 1) // 2 + (chunk - k) * window
        attended = self._full_layers * full_attended + self._window_layers * window_attended
        flops = self._flops_per_token * tokens + self._attention_flops * attended
        compute_s = (
            flops * self._seconds_per_flop + self._expert_flops_per_token * tokens * self._seconds_per_expert_flop
        )
        kv_tokens_read = self._full_layers * full_context + self._window_layers * window_context
        weight_bytes = self._dense_bytes
        if self._experts:
            weight_bytes += self._expert_bytes * (1.0 - self._miss**tokens)
        memory_bytes = weight_bytes + self._kv_bytes_per_layer_token * kv_tokens_read
        return max(compute_s, memory_bytes * self._seconds_per_byte) + self.overhead_s

    def step_seconds(self, num_decode: int, prefill_tokens: int, context_tokens: int) -> float:
        """The plain protocol: without per-sequence shape, the context is read as
        decode context and the prefill as one fresh chunk."""
        decode_context = max(0, context_tokens - prefill_tokens)
        contexts = [decode_context // num_decode] * num_decode if num_decode else []
        chunks = [(0, prefill_tokens)] if prefill_tokens else []
        return self.batch_seconds(StepBatch(num_decode, prefill_tokens, context_tokens, contexts, chunks))

    def describe(self) -> str:
        return self.deployment.describe()

"""What tokens cost: $/GPU-hour turned into $ per million tokens.

cost per million tokens = $/GPU-hour × GPUs / (tokens/s × 3600) × 10^6

Default prices are SemiAnalysis' August 2025 TCO survey ($/GPU-hour, three
tiers); users override them with their own price. Every cost keeps the price
it used and why that price was chosen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

Tier = Literal["hyperscaler", "neocloud", "rental-3y"]
TIERS: tuple[Tier, ...] = ("hyperscaler", "neocloud", "rental-3y")
PRICE_SOURCE = "SemiAnalysis TCO survey, August 2025 ($/GPU-hour)"

# $/GPU-hour: hyperscaler / neocloud / 3-year rental.
PRICES: dict[str, dict[Tier, float]] = {
    "H100": {"hyperscaler": 1.30, "neocloud": 1.69, "rental-3y": 1.30},
    "H200": {"hyperscaler": 1.41, "neocloud": 1.74, "rental-3y": 1.60},
    "B200": {"hyperscaler": 1.95, "neocloud": 2.34, "rental-3y": 2.90},
    "GB200": {"hyperscaler": 2.21, "neocloud": 2.75, "rental-3y": 3.30},
}


class PriceError(ValueError):
    """No price can be chosen for this GPU."""


@dataclass(frozen=True)
class Price:
    usd_per_gpu_hour: float
    gpu: str | None
    tier: str | None
    source: str  # where the number came from, for the report

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gpu_family(name: str) -> str | None:
    """'NVIDIA H200' / 'NVIDIA GB200 NVL72' / 'b200' -> the table's key, or None."""
    upper = name.upper()
    for key in sorted(PRICES, key=len, reverse=True):  # GB200 before B200
        if key in upper:
            return key
    return None


def default_price(gpu_name: str, tier: Tier = "neocloud", why: str | None = None) -> Price:
    """The table's price for ``gpu_name``; ``why`` says where the GPU name came from."""
    family = gpu_family(gpu_name)
    if family is None:
        raise PriceError(
            f"no default price for GPU {gpu_name!r} (known: {', '.join(PRICES)}); give one with --infmax-gpu-hour-usd"
        )
    if tier not in TIERS:
        raise PriceError(f"unknown price tier {tier!r}; use one of {', '.join(TIERS)}")
    return Price(PRICES[family][tier], family, tier, f"{PRICE_SOURCE}, {family} {tier}, {why or f'GPU {gpu_name!r}'}")


def user_price(usd_per_gpu_hour: float, where: str) -> Price:
    if not usd_per_gpu_hour > 0 or math.isinf(usd_per_gpu_hour):
        raise PriceError(f"$/GPU-hour must be a positive number, got {usd_per_gpu_hour!r} ({where})")
    return Price(float(usd_per_gpu_hour), None, None, f"user-set ({where})")


def cost_per_million_tokens(usd_per_gpu_hour: float, num_gpus: int, tokens_per_second: float) -> float | None:
    """$ per million tokens; None when nothing was produced (no cost per token exists)."""
    if not tokens_per_second > 0:
        return None
    return usd_per_gpu_hour * num_gpus / (tokens_per_second * 3600.0) * 1e6


@dataclass(frozen=True)
class TokenCost:
    """Cost per million total, input and output tokens at one price."""

    total: float | None
    input: float | None
    output: float | None
    price: Price

    @classmethod
    def of(cls, price: Price, num_gpus: int, total_tps: float, input_tps: float, output_tps: float) -> TokenCost:
        p = price.usd_per_gpu_hour
        return cls(
            cost_per_million_tokens(p, num_gpus, total_tps),
            cost_per_million_tokens(p, num_gpus, input_tps),
            cost_per_million_tokens(p, num_gpus, output_tps),
            price,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "usd_per_mtok_total": self.total,
            "usd_per_mtok_input": self.input,
            "usd_per_mtok_output": self.output,
            "price": self.price.to_dict(),
        }


def choose_price(
    user_usd: float | None,
    tier: Tier,
    server_kind: str,
    gpu_name: str | None = None,
    user_source: str = "--infmax-gpu-hour-usd",
) -> tuple[Price | None, str]:
    """The price a result is costed at, and why (the reason is kept when there is none).

    Precedence: the user's $/GPU-hour; else the default table for ``gpu_name``: the GPU
    the simulator says it models (its /sim/stats), or the one NVML reports for a started
    server. ``user_source`` says where the user's price was set (a flag, env, ini or the marker).
    """
    if user_usd is not None:
        return user_price(user_usd, user_source), ""
    if server_kind == "sim":
        if gpu_name is None:
            return (
                None,
                "the default simulator models no GPU: pass --infmax-sim-args '--profile b200/...' or --infmax-gpu-hour-usd",
            )
        return _table_price(gpu_name, tier, f"the GPU the simulator models ({gpu_name!r}, from its --profile)")
    if server_kind == "endpoint":
        return None, "a running endpoint's GPUs are unknown here: pass --infmax-gpu-hour-usd"
    if gpu_name is None:
        return None, "no GPU seen through NVML: pass --infmax-gpu-hour-usd"
    return _table_price(gpu_name, tier, f"GPU {gpu_name!r} reported by NVML")


def _table_price(gpu_name: str, tier: Tier, why: str) -> tuple[Price | None, str]:
    try:
        return default_price(gpu_name, tier, why), ""
    except PriceError as exc:
        return None, str(exc)


def price_marker_options(kwargs: Mapping[str, Any], args: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Validate ``@pytest.mark.infmax_price(gpu_hour_usd=, tier=, usd_per_kwh=)`` into runner options."""
    allowed = {"gpu_hour_usd", "tier", "usd_per_kwh"}
    if args:
        raise ValueError(f"takes keyword arguments only ({'=, '.join(sorted(allowed))}=), got positional {args!r}")
    unknown = sorted((str(k) for k in kwargs if k not in allowed), key=str)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    out: dict[str, Any] = {}
    for key in ("gpu_hour_usd", "usd_per_kwh"):
        if key in kwargs:
            value = kwargs[key]
            number = _finite(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
            if number is None or not number > 0:
                raise ValueError(f"{key} must be a positive, finite number, got {value!r}")
            out[key] = number
    if "tier" in kwargs:
        tier = kwargs["tier"]
        if not isinstance(tier, str) or tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
        out["price_tier"] = tier
    return out


def _finite(value: int | float) -> float | None:
    """``value`` as a finite float, or None (NaN, infinity, an int too large for a float)."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None

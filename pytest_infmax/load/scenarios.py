"""Workload scenarios: input/output length distributions and the requests they make.

InferenceMAX's scenarios are ISL/OSL pairs (1k/1k, 1k/8k, 8k/1k) with each
request's lengths drawn uniformly from [range_ratio * L, L], prompts made of
random token ids (so no request hits a prefix cache), and ``ignore_eos`` with
``max_tokens`` so the output length is exactly what was asked for.
Sending token ids instead of text makes the input length exact without a
tokenizer; the chat endpoint takes text, so there the server's ``usage`` is
the only exact count.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Endpoint = Literal["completions", "chat"]

# Token ids drawn for random prompts. Every tokenizer in use has at least
# 32k entries and keeps its special tokens at the low or high end, so this
# window is ordinary text tokens for all of them.
DEFAULT_TOKEN_ID_RANGE = (1000, 30000)

# Words for chat prompts: common, single-token words in every major tokenizer.
_WORDS = (
    "time year people way day man thing woman life child world school state family "
    "student group country problem hand part place case week company system program "
    "question work government number night point home water room mother area money "
    "story fact month lot right study book eye job word business issue side kind head"
).split()


@dataclass(frozen=True)
class Scenario:
    """An ISL/OSL workload. Lengths are uniform integers in [range_ratio * L, L]."""

    name: str
    isl: int
    osl: int
    range_ratio: float = 0.8
    endpoint: Endpoint = "completions"

    def __post_init__(self) -> None:
        for field_name in ("isl", "osl"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(
                    f"scenario {self.name!r}: {field_name} must be a whole number of tokens >= 1, got {value!r}"
                )
        if isinstance(self.range_ratio, bool) or not isinstance(self.range_ratio, numbers.Real):
            raise ValueError(
                f"scenario {self.name!r}: range_ratio must be a number in (0, 1], got {self.range_ratio!r}"
            )
        if self.isl < 1 or self.osl < 1:
            raise ValueError(f"scenario {self.name!r}: isl and osl must be >= 1, got {self.isl}/{self.osl}")
        if not 0.0 < self.range_ratio <= 1.0:
            raise ValueError(f"scenario {self.name!r}: range_ratio must be in (0, 1], got {self.range_ratio}")
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"scenario {self.name!r}: endpoint must be 'completions' or 'chat', got {self.endpoint!r}")

    def scaled(self, factor: float, name: str | None = None) -> Scenario:
        """The same shape with both lengths multiplied by ``factor`` (for quick runs)."""
        return dataclasses.replace(
            self,
            name=name or f"{self.name}x{factor:g}",
            isl=max(1, round(self.isl * factor)),
            osl=max(2, round(self.osl * factor)),
        )

    def with_endpoint(self, endpoint: Endpoint) -> Scenario:
        return dataclasses.replace(self, endpoint=endpoint)

    def sample_lengths(self, rng: np.random.Generator) -> tuple[int, int]:
        """Uniform lengths in [range_ratio * L, L], never below 1: a 0-token prompt or a
        ``max_tokens=0`` request measures nothing (``Scenario(osl=1)``, a tiny range_ratio)."""
        return (
            int(rng.integers(max(1, int(self.isl * self.range_ratio)), self.isl, endpoint=True)),
            int(rng.integers(max(1, int(self.osl * self.range_ratio)), self.osl, endpoint=True)),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FULL = {
    "1k1k": Scenario("1k1k", 1024, 1024),
    "1k8k": Scenario("1k8k", 1024, 8192),
    "8k1k": Scenario("8k1k", 8192, 1024),
}
# The same shapes at 1/8 size: seconds instead of minutes against the simulator.
PRESETS: dict[str, Scenario] = {
    **_FULL,
    **{f"{name}-mini": s.scaled(1 / 8, name=f"{name}-mini") for name, s in _FULL.items()},
}


def get_scenario(scenario: str | Scenario) -> Scenario:
    if isinstance(scenario, Scenario):
        return scenario
    try:
        return PRESETS[scenario]
    except KeyError:
        known = ", ".join(PRESETS)
        raise ValueError(f"unknown scenario {scenario!r}; use one of {known}, or a Scenario(name, isl, osl)") from None


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request's content, decided before the run so runs are reproducible."""

    index: int
    input_len: int
    output_len: int
    token_ids: tuple[int, ...] | None  # completions: the exact prompt
    text: str | None  # chat: a prompt of input_len words


def plan_request(
    scenario: Scenario,
    index: int,
    seed: int,
    token_id_range: tuple[int, int] = DEFAULT_TOKEN_ID_RANGE,
) -> PlannedRequest:
    """The ``index``-th request of a run; depends only on (seed, index)."""
    rng = np.random.default_rng([seed, index])
    isl, osl = scenario.sample_lengths(rng)
    if scenario.endpoint == "completions":
        ids = rng.integers(token_id_range[0], token_id_range[1], size=isl)
        return PlannedRequest(index, isl, osl, tuple(ids.tolist()), None)
    words = rng.integers(0, len(_WORDS), size=isl)
    return PlannedRequest(index, isl, osl, None, " ".join(_WORDS[w] for w in words))


def request_body(
    plan: PlannedRequest,
    model: str,
    endpoint: Endpoint,
    extra_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body: streaming, usage requested, exact output length.

    ``extra_body`` adds or replaces fields; a field set to None is left out,
    for servers that reject one they do not know (``{"ignore_eos": None}``).
    TensorRT-LLM, vLLM and SGLang all accept every field sent here.
    """
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": plan.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.0,
    }
    if endpoint == "completions":
        body["prompt"] = list(plan.token_ids or ())
    else:
        body["messages"] = [{"role": "user", "content": plan.text or ""}]
    if extra_body:
        body.update(extra_body)
    return {k: v for k, v in body.items() if v is not None}

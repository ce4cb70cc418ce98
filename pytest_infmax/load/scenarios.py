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
import difflib
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pytest_infmax.lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:  # imported at first use, not with this module (pytest_infmax/lazy.py)
    np = lazy_module("numpy")


Endpoint = Literal["completions", "chat"]

# A plan's prompt token ids are kept packed, 4 bytes each (PlannedRequest.packed_ids), not as a
# tuple of Python ints, ~40 bytes each: 1,000 streams of 8k prompts held ~300 MB of them, and
# with that many plans alive planning and encoding a request cost 420 us, 202 packed
# (benchmarks/start_burst.py; docs/load-generator.md, "Requests due at one instant").
PROMPT_ID_DTYPE = "<i4"
PROMPT_ID_LIMIT = 2**31


def pack_token_ids(ids: Any) -> bytes:
    """A prompt's token ids (an integer array or sequence) packed as a plan keeps them."""
    return np.asarray(ids, dtype=PROMPT_ID_DTYPE).tobytes()


# Token ids drawn for random prompts when the vocabulary is large or unknown. Every
# production tokenizer has at least 32k entries and keeps its special tokens at the low or
# high end, so this window is ordinary text tokens for all of them. A smaller vocabulary
# gets a window inside it (TokenWindow.for_vocabulary).
DEFAULT_TOKEN_ID_RANGE = (1000, 30000)

# Words for chat prompts: common, single-token words in every major tokenizer.
_WORDS = (
    "time year people way day man thing woman life child world school state family "
    "student group country problem hand part place case week company system program "
    "question work government number night point home water room mother area money "
    "story fact month lot right study book eye job word business issue side kind head"
).split()


@dataclass(frozen=True)
class TokenWindow:
    """The token ids random prompts are drawn from: ``low`` to ``high - 1``, without ``exclude``.

    ``source`` says how the window was chosen (the vocabulary's size and where it was learnt).
    """

    low: int = DEFAULT_TOKEN_ID_RANGE[0]
    high: int = DEFAULT_TOKEN_ID_RANGE[1]
    exclude: tuple[int, ...] = ()
    source: str = "default window (vocabulary not known)"
    vocab_known: bool = False  # False: the ids are a guess that holds for vocabularies of 30k or more

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(sorted({int(i) for i in self.exclude})))
        if not 0 <= self.low < self.high:
            raise ValueError(f"token window must have 0 <= low < high, got {self.low}..{self.high}")
        if self.high > PROMPT_ID_LIMIT:  # plans keep ids packed in 32 bits (PlannedRequest.packed_ids)
            raise ValueError(f"token window {self.low}..{self.high}: ids must be below {PROMPT_ID_LIMIT}")
        if any(not self.low <= i < self.high for i in self.exclude):
            raise ValueError(f"token window {self.low}..{self.high}: excluded ids must lie inside it")
        if self.high - self.low - len(self.exclude) < 1:
            raise ValueError(f"token window {self.low}..{self.high} has no id left once the special ids are excluded")

    @classmethod
    def for_vocabulary(cls, size: int | None, special_ids: tuple[int, ...] = (), source: str = "") -> TokenWindow:
        """A window of ordinary ids for a vocabulary of ``size`` (None: unknown, the default window).

        The lowest ids (byte and control tokens, most specials) are kept clear: the window
        starts at 1000, or at an eighth of a smaller vocabulary; it ends at 30000 or at the
        vocabulary's end, and leaves out every special id inside it.
        """
        if size is None:
            return cls(source=source or cls.source)
        if size < 2:
            raise ValueError(f"a vocabulary of {size} token ids leaves none for prompts")
        high = min(DEFAULT_TOKEN_ID_RANGE[1], size)
        low = min(DEFAULT_TOKEN_ID_RANGE[0], size // 8)
        exclude = tuple(i for i in special_ids if low <= i < high)
        return cls(low, high, exclude, source or f"vocabulary of {size}", vocab_known=True)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` ids, uniform over the window's ids (the default window: the same ids as ever)."""
        if not self.exclude:
            return rng.integers(self.low, self.high, size=n)
        rank = rng.integers(0, self.high - self.low - len(self.exclude), size=n)
        # the rank-th allowed id: step over each excluded id at or below it
        gaps = np.asarray(self.exclude) - self.low - np.arange(len(self.exclude))
        return self.low + rank + np.searchsorted(gaps, rank, side="right")

    def describe(self) -> str:
        skipped = f", without {len(self.exclude)} special id{'s' * (len(self.exclude) != 1)}" if self.exclude else ""
        return f"token ids {self.low}..{self.high - 1}{skipped} ({self.source})"

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "excluded": list(self.exclude), "source": self.source}


DEFAULT_TOKEN_WINDOW = TokenWindow()


@dataclass(frozen=True)
class Scenario:
    """An ISL/OSL workload. Lengths are uniform integers in [range_ratio * L, L].

    ``range_ratio`` is InferenceMAX's (0.8: lengths in [0.8·L, L]), which is SGLang
    bench_serving's ``--random-range-ratio`` and vLLM's before it became symmetric;
    vLLM's ``--random-range-ratio b`` today draws from [L·(1-b), L·(1+b)], the same as
    ``isl=L·(1+b), range_ratio=(1-b)/(1+b)`` here. ``name`` may be left out:
    ``Scenario(isl=512, osl=64)`` is named ``isl512-osl64``.
    """

    name: str = ""
    isl: int = 0
    osl: int = 0
    range_ratio: float = 0.8
    endpoint: Endpoint = "completions"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ValueError(
                f"a Scenario's first argument is its name, got {self.name!r}; "
                f"write Scenario(isl=..., osl=...) for an unnamed one"
            )
        if self.isl == 0 or self.osl == 0:
            raise ValueError(
                f"scenario {self.name or '(unnamed)'!r} needs isl= and osl= (input and output tokens per request, "
                f"each >= 1), got isl={self.isl!r}, osl={self.osl!r}"
            )
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
        if not self.name:
            object.__setattr__(self, "name", f"isl{self.isl}-osl{self.osl}")

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

    @property
    def shape(self) -> str:
        """``512/64``: ISL/OSL, as the reports write them."""
        return f"{self.isl}/{self.osl}"

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
        close = difflib.get_close_matches(str(scenario), PRESETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown scenario {scenario!r}; {hint}use one of {known}, or isl=/osl= (or a Scenario(isl=, osl=))"
        ) from None


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request's content, decided before the run so runs are reproducible."""

    index: int
    input_len: int
    output_len: int
    packed_ids: bytes | None  # completions: the exact prompt's token ids (pack_token_ids)
    text: str | None  # chat: a prompt of input_len words
    # multi-turn sessions and trace replay (load.workloads): where the request belongs, the prompt
    # tokens designed to repeat an earlier prompt's start, and a chat's whole conversation
    session: int | None = None
    turn: int | None = None
    shared_prefix_tokens: int = 0
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs

    @property
    def token_ids(self) -> tuple[int, ...] | None:
        """Completions: the prompt's token ids (None for chat)."""
        return None if self.packed_ids is None else tuple(self.prompt_ids())

    def prompt_ids(self) -> list[int]:
        """Completions: the prompt's token ids as the fresh list a request body holds."""
        if self.packed_ids is None:
            return []
        ids: list[int] = np.frombuffer(self.packed_ids, dtype=PROMPT_ID_DTYPE).tolist()
        return ids


def plan_request(
    scenario: Scenario,
    index: int,
    seed: int,
    tokens: TokenWindow = DEFAULT_TOKEN_WINDOW,
) -> PlannedRequest:
    """The ``index``-th request of a run; depends only on (seed, index) and the token window."""
    rng = np.random.default_rng([seed, index])
    isl, osl = scenario.sample_lengths(rng)
    if scenario.endpoint == "completions":
        ids = tokens.draw(rng, isl)
        return PlannedRequest(index, isl, osl, pack_token_ids(ids), None)
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
        body["prompt"] = plan.prompt_ids()
    else:
        body["messages"] = (
            [{"role": role, "content": content} for role, content in plan.messages]
            if plan.messages is not None
            else [{"role": "user", "content": plan.text or ""}]
        )
    if extra_body:
        body.update(extra_body)
    return {k: v for k, v in body.items() if v is not None}

"""OpenAI-compatible HTTP front end of the simulator (aiohttp.web).

It speaks the wire format of vLLM / TensorRT-LLM / SGLang's OpenAI servers closely
enough that the official ``openai`` SDK and any load generator parse it unchanged:
``/v1/completions`` and ``/v1/chat/completions`` (streaming SSE or not, with
``stream_options.include_usage`` and vLLM's ``continuous_usage_stats``),
``/v1/models``, ``/health``, plus ``/sim/stats`` for tests, ``/sim/trace`` (what was
sent when, per request: see :mod:`pytest_infmax.sim.trace`) and a Prometheus
``/metrics`` with vLLM's metric names (:mod:`pytest_infmax.sim.metrics`). Faults
(error statuses, stalls, resets, malformed SSE, a crash) are injected per flag or
per request header (:mod:`pytest_infmax.sim.faults`). ``docs/simulator.md`` has it all.

Text is fake but countable: a prompt's token count is the number of matches of
``\\w+|[^\\w\\s]``, and every output token is one word with a leading space, so a
client re-tokenising the output with the same regex gets exactly the token count.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import hmac
import http
import json
import logging
import math
import os
import random
import re
import socket
import struct
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from pytest_infmax.sim.engine import (
    FINISH_ABORT,
    Engine,
    EngineConfig,
    EngineRequest,
    EngineStats,
    EngineStopped,
    LatenessWindow,
    LinearCostModel,
    RequestTooLarge,
    StepCostModel,
    TokenDelivery,
)
from pytest_infmax.sim.faults import (
    COMMENT,
    EMPTY_CHOICES,
    FAULT_HEADER,
    INVALID_JSON,
    NO_DONE,
    NO_FINISH,
    NO_SPACE,
    NO_USAGE,
    SPLIT,
    FaultConfig,
    FaultPlan,
    FaultSpec,
    FaultSpecError,
)
from pytest_infmax.sim.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pytest_infmax.sim.metrics import SimMetrics
from pytest_infmax.sim.noise import noise_of
from pytest_infmax.sim.pollclock import poll_clock
from pytest_infmax.sim.prefixcache import block_hashes
from pytest_infmax.sim.trace import (
    ABORTED,
    CANCELLED,
    CRASHED,
    DEFAULT_TRACE_CAPACITY,
    ERROR,
    OK,
    RESET,
    Clock,
    RequestTrace,
    TraceLog,
)

logger = logging.getLogger("pytest_infmax.sim")

DEFAULT_MAX_TOKENS = 16
CHAT_TOKENS_PER_MESSAGE = 3  # role and separator overhead, like a chat template adds
TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")
OWNED_BY = "pytest-infmax"

# Output vocabulary: plain \w+ words only, so each emitted token is exactly one regex token.
_OUTPUT_WORDS: tuple[str, ...] = tuple(
    " " + word
    for word in (
        "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
        "incididunt ut labore et dolore magna aliqua enim ad minim veniam quis nostrud "
        "exercitation ullamco laboris nisi aliquip ex ea commodo consequat duis aute irure "
        "in reprehenderit voluptate velit esse cillum fugiat nulla pariatur excepteur sint "
        "occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est "
        "laborum"
    ).split()
)

_OUTPUT_WORDS_JSON = tuple(json.dumps(word).encode() for word in _OUTPUT_WORDS)
_OUTPUT_WORD_COUNT = float(len(_OUTPUT_WORDS))

_SSE_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True)
class SimConfig:
    """Everything the HTTP app needs; built from the command line by ``main``."""

    model: str = "sim-model"
    api_key: str | None = None
    startup_delay_s: float = 0.0
    seed: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)
    cost_model: StepCostModel = field(default_factory=LinearCostModel)
    faults: FaultConfig = field(default_factory=FaultConfig)
    trace_capacity: int = DEFAULT_TRACE_CAPACITY
    trace_file: Path | None = None
    # token ids of the model served: a prompt id at or above this is refused as vLLM refuses it
    # ("Token id N is out of vocabulary"); None: any id
    vocab_size: int | None = None
    # "fast": streams without a stream fault are written from the engine's step straight to the
    # socket (_FastSseStream); "aiohttp": every stream through _SseWriter (--sse-writer)
    sse_writer: str = "fast"
    front_end: str = "fast"  # sim/frontdoor.py serves plain streams, or "aiohttp" serves everything


CONFIG_KEY = web.AppKey("infmax_sim_config", SimConfig)
ENGINE_KEY = web.AppKey("infmax_sim_engine", Engine)
READY_AT_KEY = web.AppKey("infmax_sim_ready_at", float)
STARTED_AT_KEY = web.AppKey("infmax_sim_started_at", float)  # monotonic; origin of modelled energy


# -- errors --------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered in the OpenAI shape ``{"error": {...}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | int | None = None,
        error_type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers, dumps=_encode_json)


def _bad_field(param: str, expected: str, value: Any) -> ApiError:
    return ApiError(
        400,
        f"'{param}': expected {expected}, got {type(value).__name__} {_short_repr(value)}",
        param=param,
    )


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _service_unavailable(message: str) -> ApiError:
    return ApiError(503, message, code=503, error_type="service_unavailable_error")


# -- sim tokenizer and output text ------------------------------------------------------


def count_text_tokens(text: str) -> int:
    """Prompt tokens of a text under the simulator's regex tokenizer."""
    return len(TOKEN_PATTERN.findall(text))


class OutputText:
    """Deterministic fake output: one word (with a leading space) per token."""

    __slots__ = ("_rng",)

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def take(self, token_count: int) -> str:
        return "".join(self._rng.choices(_OUTPUT_WORDS, k=token_count))

    def take_json(self, token_count: int) -> bytes:
        """``take``'s text as a JSON string, drawing the same words from the same generator
        (one token: the draw ``random.choices`` makes for k=1, its word encoded once)."""
        if token_count == 1:
            return _OUTPUT_WORDS_JSON[int(self._rng.random() * _OUTPUT_WORD_COUNT)]
        return _encode_json(self.take(token_count)).encode()


# -- request parsing --------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationParams:
    """The parts of a request the simulator acts on; everything else is ignored."""

    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(body: dict[str, Any], name: str, kind: type, expected: str) -> Any:
    """A field that may be absent or null, else must have the given JSON type."""
    value = body.get(name)
    if value is None:
        return None
    if kind is int:
        valid = _is_int(value)
    elif kind is bool:
        valid = isinstance(value, bool)
    else:
        valid = isinstance(value, kind) and not isinstance(value, bool)
    if not valid:
        raise _bad_field(name, expected, value)
    return value


async def _read_json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_model(body: dict[str, Any], served_model: str) -> None:
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise _bad_field("model", "a string", model)
    if model != served_model:
        raise ApiError(
            404,
            f"The model `{model}` does not exist. This server serves `{served_model}`.",
            param="model",
            code="model_not_found",
        )


def _check_unsupported(body: dict[str, Any], *, chat: bool) -> None:
    """Reject options that would change the response shape the simulator produces."""
    n = _optional(body, "n", int, "an integer")
    if n is not None and n != 1:
        raise ApiError(400, f"'n': the simulator supports only n=1, got {n}", param="n")
    if not chat:
        best_of = _optional(body, "best_of", int, "an integer")
        if best_of is not None and best_of != 1:
            raise ApiError(400, f"'best_of': the simulator supports only best_of=1, got {best_of}", param="best_of")
        if _optional(body, "echo", bool, "a boolean"):
            raise ApiError(400, "'echo': not supported by the simulator", param="echo")
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "'logprobs': not supported by the simulator", param="logprobs")
    _optional(body, "ignore_eos", bool, "a boolean")  # accepted; the sim never emits EOS


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage), validated like vLLM does."""
    stream = bool(_optional(body, "stream", bool, "a boolean"))
    options = _optional(body, "stream_options", dict, "an object")
    if options is None:
        return stream, False, False
    if not stream:
        raise ApiError(400, "'stream_options': can only be set when 'stream' is true", param="stream_options")
    include_usage = bool(_optional(options, "include_usage", bool, "a boolean"))
    continuous = bool(_optional(options, "continuous_usage_stats", bool, "a boolean"))
    # vLLM sends per-chunk usage only when include_usage is also set.
    return stream, include_usage, include_usage and continuous


def _max_tokens(body: dict[str, Any], names: tuple[str, ...]) -> int:
    for name in names:
        value = _optional(body, name, int, "a positive integer")
        if value is None:
            continue
        if value < 1:
            raise ApiError(400, f"'{name}': must be at least 1, got {value}", param=name)
        return value
    return DEFAULT_MAX_TOKENS


def _all_ints(values: list[Any]) -> bool:
    """Every item an int (not a bool); at C speed for a JSON list of plain ints (a prompt's
    ids are checked on the request's way in, where a Python loop over them cost ~40 us)."""
    return set(map(type, values)) <= {int} or all(_is_int(item) for item in values)


def _token_id_list(value: list[Any], param: str, vocab_size: int | None = None, ints: bool = False) -> int:
    """``ints``: the caller has checked that every item is an int."""
    if not (ints or _all_ints(value)) or (value and min(value) < 0):
        raise ApiError(400, f"'{param}': token ids must be non-negative integers", param=param)
    if vocab_size is not None and value and max(value) >= vocab_size:
        raise ApiError(400, f"Token id {max(value)} is out of vocabulary", param=param)
    return len(value)


def completion_prompt_tokens(prompt: Any, vocab_size: int | None = None) -> int:
    """Token count of a completions ``prompt``: a string, a token-id list, or a
    one-element list of either. Several prompts in one request are refused."""
    if isinstance(prompt, str):
        return count_text_tokens(prompt)
    if not isinstance(prompt, list):
        raise _bad_field("prompt", "a string, a list of token ids, or a one-element list of those", prompt)
    if not prompt:
        raise ApiError(400, "'prompt': must not be empty", param="prompt")
    if _all_ints(prompt):
        return _token_id_list(prompt, "prompt", vocab_size, ints=True)
    if all(isinstance(item, (str, list)) for item in prompt):
        if len(prompt) != 1:
            raise ApiError(
                400,
                f"'prompt': the simulator serves one prompt per request, got {len(prompt)} prompts",
                param="prompt",
            )
        only = prompt[0]
        if isinstance(only, str):
            return count_text_tokens(only)
        return _token_id_list(only, "prompt", vocab_size)
    raise _bad_field("prompt", "a string, a list of token ids, or a one-element list of those", prompt)


def _message_content_tokens(content: Any, index: int) -> int:
    param = f"messages[{index}].content"
    if content is None:
        return 0
    if isinstance(content, str):
        return count_text_tokens(content)
    if not isinstance(content, list):
        raise _bad_field(param, "a string or a list of content parts", content)
    total = 0
    for part_index, part in enumerate(content):
        part_param = f"{param}[{part_index}]"
        if not isinstance(part, dict):
            raise _bad_field(part_param, "an object", part)
        if part.get("type") != "text":
            raise ApiError(
                400,
                f"'{part_param}.type': the simulator supports only 'text' parts, got {part.get('type')!r}",
                param=f"{part_param}.type",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad_field(f"{part_param}.text", "a string", text)
        total += count_text_tokens(text)
    return total


def chat_prompt_tokens(messages: Any) -> int:
    """Sum over messages of their content tokens plus a fixed per-message overhead."""
    if not isinstance(messages, list) or not messages:
        raise _bad_field("messages", "a non-empty list of message objects", messages)
    total = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad_field(f"messages[{index}]", "an object", message)
        if not isinstance(message.get("role"), str):
            raise _bad_field(f"messages[{index}].role", "a string", message.get("role"))
        total += _message_content_tokens(message.get("content"), index) + CHAT_TOKENS_PER_MESSAGE
    return total


def completion_token_sequence(prompt: Any) -> list[Any]:
    """A (valid) completions prompt as the tokens the prefix cache hashes: the ids, or the
    regex tokens of a text."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    return TOKEN_PATTERN.findall(prompt) if isinstance(prompt, str) else list(prompt)


def chat_token_sequence(messages: list[dict[str, Any]]) -> list[Any]:
    """(Valid) chat messages as the tokens the prefix cache hashes, as a chat template lays
    them out: per message its role, its content's tokens, then separators, as many tokens in
    all as :func:`chat_prompt_tokens` counts."""
    tokens: list[Any] = []
    for message in messages:
        tokens.append(("<role>", message["role"]))
        content = message.get("content")
        parts = [content] if isinstance(content, str) else [p["text"] for p in content or ()]
        for text in parts:
            tokens.extend(TOKEN_PATTERN.findall(text))
        tokens.extend(["<sep>"] * (CHAT_TOKENS_PER_MESSAGE - 1))
    return tokens


def parse_completion_request(
    body: dict[str, Any], served_model: str, vocab_size: int | None = None
) -> GenerationParams:
    _check_model(body, served_model)
    if "prompt" not in body:
        raise ApiError(400, "'prompt': required field is missing", param="prompt")
    prompt_tokens = completion_prompt_tokens(body["prompt"], vocab_size)
    _check_unsupported(body, chat=False)
    stream, include_usage, continuous = _stream_flags(body)
    return GenerationParams(prompt_tokens, _max_tokens(body, ("max_tokens",)), stream, include_usage, continuous)


def parse_chat_request(body: dict[str, Any], served_model: str) -> GenerationParams:
    _check_model(body, served_model)
    if "messages" not in body:
        raise ApiError(400, "'messages': required field is missing", param="messages")
    prompt_tokens = chat_prompt_tokens(body["messages"])
    _check_unsupported(body, chat=True)
    stream, include_usage, continuous = _stream_flags(body)
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    return GenerationParams(prompt_tokens, max_tokens, stream, include_usage, continuous)


# -- response shapes --------------------------------------------------------------------


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _encode_json(payload).encode() + b"\n\n"


class _ResponseShape:
    """The JSON objects of one response; subclasses give the completions / chat forms."""

    id_prefix = ""
    chunk_object = ""

    def __init__(self, model: str) -> None:
        self.model = model
        self.response_id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def preamble_choice(self) -> dict[str, Any] | None:
        """The choice of a chunk sent before any content (chat's role chunk), if any."""
        return None

    def content_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def full_choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError

    full_object = ""

    def chunk(self, choice: dict[str, Any] | None, usage: dict[str, int] | None, with_usage: bool) -> dict[str, Any]:
        payload = self._envelope(self.chunk_object, [choice] if choice is not None else [])
        if with_usage:
            payload["usage"] = usage
        return payload

    def full_response(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        payload = self._envelope(self.full_object, [self.full_choice(text, finish_reason)])
        payload["usage"] = usage
        return payload


class CompletionShape(_ResponseShape):
    id_prefix = "cmpl-"
    chunk_object = "text_completion"
    full_object = "text_completion"

    def content_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def full_choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        return self.content_choice(text, finish_reason)


class ChatShape(_ResponseShape):
    id_prefix = "chatcmpl-"
    chunk_object = "chat.completion.chunk"
    full_object = "chat.completion"

    def preamble_choice(self) -> dict[str, Any] | None:
        return {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def content_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish_reason}

    def full_choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }


# -- observability and faults -------------------------------------------------------------


class Observability:
    """Per-app bookkeeping shared by the handlers: the trace log, the Prometheus
    metrics, the fault plan and the request counter behind ``--crash-after``."""

    def __init__(self, config: SimConfig) -> None:
        self.clock = Clock()
        self.traces = TraceLog(self.clock, config.trace_capacity, config.trace_file)
        self.metrics = SimMetrics(config.model)
        self.faults = FaultPlan(config.faults, config.seed)
        self.crash_after = config.faults.crash_after
        self.generation_requests = 0
        # streams written by each writer (--sse-writer; a faulted stream always takes "aiohttp")
        self.sse_streams = {"fast": 0, "aiohttp": 0}
        # generation requests read by each front end (--front-end; sim/frontdoor.py): "fast" counts
        # those the front door served, "aiohttp" the rest (handed over, or every one under
        # --front-end aiohttp)
        self.front_end_requests = {"fast": 0, "aiohttp": 0}
        # content events of unfaulted streams: their write stamp minus the end of the engine step
        # that produced them (the engine's own lateness is its steps'; this is the wire's)
        self.write_lateness = LatenessWindow()

    def on_generation_request(self, front_end: str) -> None:
        """Count a generation request (read by ``front_end``); past ``--crash-after``, exit
        like a crashed process: no response, no graceful shutdown, every connection dropped."""
        self.generation_requests += 1
        self.front_end_requests[front_end] += 1
        if self.crash_after is not None and self.generation_requests > self.crash_after:
            logger.error(
                "infmax-sim: injected crash (--crash-after %d): exiting with status 1 at request %d",
                self.crash_after,
                self.generation_requests,
            )
            self.traces.commit_open(CRASHED)
            self.traces.close()
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            _close_listening_sockets()
            os._exit(1)

    def choose_fault(self, request: web.Request) -> FaultSpec:
        try:
            return self.faults.choose(request.headers.get(FAULT_HEADER))
        except FaultSpecError as exc:
            raise ApiError(400, f"{FAULT_HEADER}: {exc}", param=FAULT_HEADER) from None

    def begin_trace(
        self,
        path: str,
        arrival: float,
        x_request_id: str | None,
        handler_start: float,
        shape: _ResponseShape,
        params: GenerationParams,
        raw_body: bytes,
        fault: FaultSpec,
    ) -> RequestTrace:
        """The trace of a generation request, opened with what its request says (aiohttp's
        handler and the front door, sim/frontdoor.py, alike)."""
        trace = self.traces.begin(path, arrival, x_request_id, handler_start)
        trace.response_id = shape.response_id
        trace.stream = params.stream
        trace.prompt_tokens = params.prompt_tokens
        trace.max_tokens = params.max_tokens
        trace.body_sha256 = hashlib.sha256(raw_body).hexdigest()
        trace.fault = fault.describe()
        return trace

    def record_chunk(self, trace: RequestTrace, t: float, tokens: int) -> None:
        """A content event with ``tokens`` output tokens is being written at ``t``."""
        previous = trace.chunk_times[-1] if trace.chunk_times else None
        trace.add_chunk(t, tokens)
        if previous is None:
            self.metrics.on_first_token(trace.prompt_tokens or 0, t - trace.arrival)
        self.metrics.on_tokens(tokens, None if previous is None else t - previous)

    def finish(
        self,
        trace: RequestTrace,
        outcome: str,
        engine_request: EngineRequest | None,
        finish_reason: str | None = None,
    ) -> None:
        """Commit the trace (once) and, for a normal finish, the request metrics."""
        if trace.committed:
            return
        if trace.end is None:
            trace.end = time.monotonic()
        if trace.outcome is None:
            trace.outcome = outcome
        if finish_reason is not None:
            trace.finish_reason = finish_reason
        if engine_request is not None:
            trace.scheduled = getattr(engine_request, "scheduled_time", None)
        self.traces.commit(trace)
        if trace.outcome == OK and trace.finish_reason is not None:
            queue = None if trace.scheduled is None or trace.queued is None else trace.scheduled - trace.queued
            ttft = None if trace.first_token is None else trace.first_token - trace.arrival
            self.metrics.on_finished(
                trace.finish_reason, trace.end - trace.arrival, queue, ttft, trace.completion_tokens
            )


OBS_KEY = web.AppKey("infmax_sim_observability", Observability)


def _close_listening_sockets() -> None:
    """Close our listening sockets before an injected crash. Exit closes every
    descriptor, but in no promised order: a client reconnecting the instant its
    connection drops could still be accepted by the kernel into a listen backlog
    that dies a moment later (a reset instead of a refusal). Closing the listeners
    first makes every later request a clean ``connection refused``. Linux only
    (``/proc/self/fd``); elsewhere the race stays, as with a real crash."""
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            try:
                sock = socket.socket(fileno=int(name))
            except (OSError, ValueError):
                continue  # not a socket (or already gone)
            try:
                listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            except OSError:
                listening = 0
            if listening:
                sock.close()
            else:
                sock.detach()  # not ours to close: leave the descriptor as it was


_STATUS_ERROR_TYPES = {
    429: ("rate_limit_exceeded", "rate_limit_error"),
    500: ("internal_error", "server_error"),
    502: ("bad_gateway", "server_error"),
    503: ("service_unavailable", "service_unavailable_error"),
    504: ("gateway_timeout", "server_error"),
}


def injected_status_error(fault: FaultSpec) -> ApiError:
    """The OpenAI-shaped error of ``status=``; 429 carries ``Retry-After``."""
    assert fault.status is not None
    status = fault.status
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    code, error_type = _STATUS_ERROR_TYPES.get(status, (status, default_type))
    headers = None
    retry_after = fault.effective_retry_after()
    if retry_after is not None:
        headers = {"Retry-After": str(math.ceil(retry_after)), "retry-after-ms": str(round(retry_after * 1000))}
    return ApiError(status, f"injected fault: {status} {phrase}", code=code, error_type=error_type, headers=headers)


class _ConnectionResetInjected(Exception):
    """The injected reset happened; the handler must not touch the transport again."""


def _reset_connection(request: web.Request) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0): unsent bytes are dropped."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# -- generation -------------------------------------------------------------------------

# Gap between the pieces of one event under malformed=split, so they leave as
# separate TCP segments rather than being coalesced in the socket buffer.
SPLIT_GAP_S = 0.001
_SSE_COMMENT = b": ping\n\n"


def _sse_no_space(payload: dict[str, Any]) -> bytes:
    return b"data:" + _encode_json(payload).encode() + b"\n\n"


def _split_event(data: bytes) -> list[bytes]:
    """One SSE event in four pieces: inside ``data:``, mid-payload, the first
    newline, the blank line."""
    if len(data) < 8:
        return [data]
    body_end = len(data) - 2
    middle = max(3, body_end // 2)
    return [data[:2], data[2:middle], data[middle : body_end + 1], data[body_end + 1 :]]


async def _next_deliveries(engine_request: EngineRequest) -> list[TokenDelivery]:
    """Wait for the next delivery, then take any others already queued, so a
    consumer that fell behind catches up with one write instead of many."""
    queue = engine_request.deliveries
    deliveries = [await queue.get()]
    while not queue.empty():
        deliveries.append(queue.get_nowait())
    return deliveries


def _aborted_error() -> ApiError:
    return _service_unavailable("the simulator is shutting down; the request was aborted")


class _SseWriter:
    """Writes SSE events and stamps each content event in the trace just before
    the write that completes it. Without stream faults a batch of events is one
    write; with them, events go one by one so a stall, a reset or a split can
    land between any two."""

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        fault: FaultSpec,
        trace: RequestTrace,
        obs: Observability,
    ) -> None:
        self.request = request
        self.response = response
        self.fault = fault
        self.trace = trace
        self.obs = obs
        self.tokens_written = 0
        self.stalled = False

    async def send(
        self,
        events: list[tuple[bytes, int]],
        on_last: Callable[[], None] | None = None,
        emit_times: Sequence[float] = (),
    ) -> None:
        """Write ``(bytes, content tokens)`` events. ``on_last`` runs just before
        the write of the last byte (to commit the trace before the client can
        have seen the end of the stream); ``emit_times``: when the engine produced
        each content event's tokens (for the write lateness)."""
        if not self.fault.rewrites_stream:
            now = time.monotonic()
            for _, tokens in events:
                if tokens:
                    self._record(now, tokens)
            for emitted in emit_times:
                self.obs.write_lateness.add(now - emitted)
            if on_last is not None:
                on_last()
            await self.response.write(b"".join(data for data, _ in events))
            return
        split = SPLIT in self.fault.malformed
        for index, (data, tokens) in enumerate(events):
            await self._before_event()
            pieces = _split_event(data) if split else [data]
            for piece_index, piece in enumerate(pieces):
                if piece_index:
                    await asyncio.sleep(SPLIT_GAP_S)
                if piece_index == len(pieces) - 1:
                    if tokens:
                        self._record(time.monotonic(), tokens)
                    if on_last is not None and index == len(events) - 1:
                        on_last()
                await self.response.write(piece)

    def _record(self, t: float, tokens: int) -> None:
        self.obs.record_chunk(self.trace, t, tokens)
        self.tokens_written += tokens

    async def _before_event(self) -> None:
        fault = self.fault
        if fault.stall_seconds > 0 and not self.stalled and self.tokens_written >= fault.stall_after:
            self.stalled = True
            await asyncio.sleep(fault.stall_seconds)
        if fault.reset_after is not None and self.tokens_written >= fault.reset_after:
            self.trace.outcome = RESET
            _reset_connection(self.request)
            raise _ConnectionResetInjected


def _truncated_json(shape: _ResponseShape) -> bytes:
    """A data line whose JSON stops mid-object (malformed=invalid_json)."""
    text = _encode_json(shape.chunk(shape.content_choice("", None), None, False))
    return b"data: " + text[: len(text) // 2].encode() + b"\n\n"


# -- the fast stream writer ----------------------------------------------------------------
#
# At a few hundred streams the aiohttp path spends ~27 us per SSE event on the one event
# loop: a queue wake-up of the stream's task per step, a dict built and JSON-encoded per
# chunk, an awaited StreamResponse.write. The loop is busy with that for every stream at
# every step, and a new request's bytes wait in its socket meanwhile (the "server read lag"
# of docs/load-generator.md). A stream without a stream fault therefore takes this path:
# the engine hands each delivery to the stream's sink inside its step (EngineRequest.sink),
# which fills a byte template split once around the text and writes the event, framed as
# one HTTP/1.1 chunk, straight to the transport. The handler task only waits for the end
# (and for a paused transport: see _FastSseStream.on_delivery). The bytes on the wire are
# the aiohttp path's, event for event (tests/test_sim_fastpath.py).

_TEXT_MARK = "\x00infmax-text"
_USAGE_MARK = "\x00infmax-usage"
# A reader that fell behind: at most this many deliveries per catch-up write, then the
# writer waits for the transport to drain again, so a catch-up never balloons the buffer.
_FAST_CATCH_UP_DELIVERIES = 64


# A step's events are written in slices of about this long, with the event loop free between
# two: it reads the sockets then (a new request's first bytes get their arrival stamp), so the
# writing of one step delays a request by at most a slice, not by the whole step's writing.
_WRITE_SLICE_S = 0.0002


class _Outbox:
    """The fast streams' deliveries in the order the engine handed them out, written in
    slices (one ``call_soon`` each) so that the loop polls its sockets between two."""

    __slots__ = ("_loop", "_queue", "_scheduled", "_on_drained")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_drained: Callable[[], None]) -> None:
        self._loop = loop
        self._queue: collections.deque[tuple[_FastSseStream, TokenDelivery]] = collections.deque()
        self._scheduled = False
        self._on_drained = on_drained  # the engine's output_drained: a step held for us goes on

    def backlog(self) -> bool:
        """Events of an earlier step are still unwritten (the engine holds its next step)."""
        return bool(self._queue)

    def put(self, stream: _FastSseStream, delivery: TokenDelivery) -> None:
        self._queue.append((stream, delivery))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        queue = self._queue
        end = time.monotonic() + _WRITE_SLICE_S
        while queue:
            stream, delivery = queue.popleft()
            stream.on_delivery(delivery)
            if time.monotonic() >= end:
                break
        if queue:
            self._loop.call_soon(self._flush)
        else:
            self._scheduled = False
            self._on_drained()


def _json_text(text: str) -> bytes:
    return _encode_json(text).encode()


class _FastSseStream:
    """One stream's events, written from the engine's step. See the comment above."""

    __slots__ = (
        "_transport",
        "_protocol",
        "_params",
        "_shape",
        "_engine_request",
        "_output",
        "_trace",
        "_obs",
        "_outbox",
        "_head",
        "_middle",
        "_tail",
        "_waiter",
        "on_wake",
        "pending",
        "completion_tokens",
        "first",
        "finished",
        "error",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: Any,
        params: GenerationParams,
        shape: _ResponseShape,
        engine_request: EngineRequest,
        output: OutputText,
        trace: RequestTrace,
        obs: Observability,
        outbox: _Outbox,
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._params = params
        self._shape = shape
        self._engine_request = engine_request
        self._output = output
        self._trace = trace
        self._obs = obs
        self._outbox = outbox
        # A content event that does not finish the stream, encoded once with marks where its
        # text (and its running usage) go, then split around them.
        usage_mark = _USAGE_MARK if params.continuous_usage else None
        choice = shape.content_choice(_TEXT_MARK, None)
        template = _sse(shape.chunk(choice, usage_mark, params.include_usage))  # type: ignore[arg-type]
        self._head, _, rest = template.partition(_json_text(_TEXT_MARK))
        self._middle, self._tail = rest, b""
        if params.continuous_usage:
            self._middle, _, self._tail = rest.partition(_json_text(_USAGE_MARK))
        self._waiter: asyncio.Future[None] | None = None
        # who writes what waits and ends the body, where no handler awaits ``wait`` (sim/frontdoor.py)
        self.on_wake: Callable[[], None] | None = None
        self.pending: list[TokenDelivery] = []  # deliveries not yet written (a paused transport)
        self.completion_tokens = 0
        self.first = True
        self.finished = False  # the last event was written (or the stream failed): the handler ends it
        self.error: BaseException | None = None

    def attach(self) -> None:
        """Become the engine's sink for its request (deliveries go into the outbox, written in
        its next slice); what it delivered before waits in ``pending``."""
        queue = self._engine_request.deliveries
        while not queue.empty():  # delivered before the sink was set (prepare may have yielded)
            self.pending.append(queue.get_nowait())
        self._engine_request.sink = functools.partial(self._outbox.put, self)  # one call less than a method

    def write_batch(self) -> None:
        """Write the next deliveries that waited (a paused transport), 64 at most at a time."""
        batch = self.pending[:_FAST_CATCH_UP_DELIVERIES]
        del self.pending[:_FAST_CATCH_UP_DELIVERIES]
        self.write(batch)

    def on_delivery(self, delivery: TokenDelivery) -> None:
        """From the outbox: write the event now, unless the client is not
        keeping up (the transport paused writing above its high-water mark, as aiohttp's
        drain waits on) or gone: then the delivery waits here for the handler, which drains
        first. Pending deliveries are token counts (as many as the request's max_tokens at
        most, as in the queue of the aiohttp path); their bytes are made when written."""
        if self.finished:
            return
        if self.pending or self._protocol.writing_paused or self._transport.is_closing():
            self.pending.append(delivery)
            self._wake()
            return
        try:
            if self.first or delivery.finish_reason is not None or self._params.continuous_usage:
                self.write((delivery,))
                return
            # the common event, inline: the template around its text, stamped, written
            self.completion_tokens += delivery.token_count
            data = self._head + self._output.take_json(delivery.token_count) + self._middle
            now = time.monotonic()
            obs = self._obs
            obs.record_chunk(self._trace, now, delivery.token_count)
            obs.write_lateness.add(now - delivery.emit_time)
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        except Exception as exc:  # never into the engine's step: the handler raises it
            self.error = exc
            self.finished = True
            self._wake()

    def write(self, deliveries: Sequence[TokenDelivery]) -> None:
        """Write the events of ``deliveries`` as one HTTP chunk, each content event stamped in
        the trace just before the write; the last one commits the trace first."""
        params, shape = self._params, self._shape
        events: list[bytes] = []
        written: list[TokenDelivery] = []  # the content events' deliveries
        if self.first:
            self.first = False
            preamble = shape.preamble_choice()
            if preamble is not None:
                usage = _usage(params.prompt_tokens, 0) if params.continuous_usage else None
                events.append(_sse(shape.chunk(preamble, usage, params.include_usage)))
        end: tuple[str, str | None] | None = None  # (outcome, finish reason) once the stream ends
        for delivery in deliveries:
            if delivery.finish_reason == FINISH_ABORT:
                events.append(_sse(_aborted_error().body()))
                events.append(_SSE_DONE)
                end = (ABORTED, None)
                break
            count = delivery.token_count
            self.completion_tokens += count
            if delivery.finish_reason is None:
                text_json = self._output.take_json(count)
                if params.continuous_usage:
                    usage_json = _encode_json(_usage(params.prompt_tokens, self.completion_tokens)).encode()
                    events.append(b"".join((self._head, text_json, self._middle, usage_json, self._tail)))
                else:
                    events.append(b"".join((self._head, text_json, self._middle)))
                written.append(delivery)
                continue
            text = self._output.take(count)
            usage = _usage(params.prompt_tokens, self.completion_tokens) if params.continuous_usage else None
            choice = shape.content_choice(text, delivery.finish_reason)
            events.append(_sse(shape.chunk(choice, usage, params.include_usage)))
            written.append(delivery)
            if params.include_usage:
                final_usage = _usage(params.prompt_tokens, self.completion_tokens)
                events.append(_sse(shape.chunk(None, final_usage, True)))
            events.append(_SSE_DONE)
            end = (OK, delivery.finish_reason)
            break
        data = b"".join(events)
        now = time.monotonic()
        obs = self._obs
        for delivery in written:
            obs.record_chunk(self._trace, now, delivery.token_count)
            obs.write_lateness.add(now - delivery.emit_time)
        if end is not None:
            self._obs.finish(self._trace, end[0], self._engine_request, end[1])
        self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        if end is not None:
            self.finished = True
            self._wake()

    def _wake(self) -> None:
        if self.on_wake is not None:
            self.on_wake()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until a delivery is pending, or the stream finished."""
        if self.pending or self.finished:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


OUTBOX_KEY = web.AppKey("infmax_sim_outbox", _Outbox)


def _fast_stream_possible(request: web.Request, writer: Any) -> bool:
    """The fast writer frames HTTP/1.1 chunks itself: only on a chunked, uncompressed body
    whose headers went out in prepare, over a transport and an aiohttp protocol it knows."""
    return (
        request.transport is not None
        and getattr(writer, "chunked", False) is True
        and getattr(writer, "_compress", None) is None
        and getattr(writer, "_headers_buf", None) is None
        and isinstance(getattr(request.protocol, "writing_paused", None), bool)
    )


async def _fast_stream(
    response: web.StreamResponse, writer: Any, stream: _FastSseStream, engine_request: EngineRequest
) -> web.StreamResponse:
    """The handler's part of a fast stream: hand the engine the sink, then wait for the end.
    It writes only what waited for a paused transport (after draining it) and the body's end.
    A client that goes away cancels this task (``handler_cancellation``) or fails the drain;
    either way ``_generate`` drops the request from the engine."""
    stream.attach()
    transport = stream._transport
    try:
        while True:
            if stream.error is not None:
                raise stream.error
            if stream.pending:
                await writer.drain()  # waits while the client does not read
                if transport.is_closing():
                    raise ConnectionResetError("the client closed the connection")
                stream.write_batch()
                continue
            if stream.finished:
                break
            await stream.wait()
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away; the caller drops the request from the engine
    finally:
        engine_request.sink = None
    return response


async def _stream_response(
    request: web.Request,
    params: GenerationParams,
    shape: _ResponseShape,
    engine_request: EngineRequest,
    output: OutputText,
    fault: FaultSpec,
    trace: RequestTrace,
) -> web.StreamResponse:
    """SSE stream: one event per delivery, then the usage chunk and ``[DONE]``.

    Chat's role chunk goes out with the first tokens, as vLLM does, so the first
    event a client sees coincides with the first token."""
    obs = request.app[OBS_KEY]
    if fault.reset_after == 0:  # reset before the status line: the client gets no response at all
        trace.outcome = RESET
        _reset_connection(request)
        raise _ConnectionResetInjected
    response = web.StreamResponse(status=200, headers=_response_headers(_SSE_HEADERS, trace))
    payload_writer = await response.prepare(request)
    if (
        request.app[CONFIG_KEY].sse_writer == "fast"
        and not fault.rewrites_stream
        and _fast_stream_possible(request, payload_writer)
    ):
        assert request.transport is not None
        outbox = request.app[OUTBOX_KEY]
        stream = _FastSseStream(
            request.transport, request.protocol, params, shape, engine_request, output, trace, obs, outbox
        )
        obs.sse_streams["fast"] += 1
        return await _fast_stream(response, payload_writer, stream, engine_request)
    obs.sse_streams["aiohttp"] += 1
    writer = _SseWriter(request, response, fault, trace, obs)
    malformed = fault.malformed
    encode = _sse_no_space if NO_SPACE in malformed else _sse
    with_usage = params.include_usage and NO_USAGE not in malformed
    continuous = params.continuous_usage and NO_USAGE not in malformed
    invalid_json_pending = INVALID_JSON in malformed
    completion_tokens = 0
    first_write = True
    try:
        while True:
            events: list[tuple[bytes, int]] = []
            if first_write:
                if EMPTY_CHOICES in malformed:
                    events.append((encode(shape.chunk(None, None, False)), 0))
                preamble = shape.preamble_choice()
                if preamble is not None:
                    usage = _usage(params.prompt_tokens, 0) if continuous else None
                    events.append((encode(shape.chunk(preamble, usage, with_usage)), 0))
                first_write = False
            finish_reason: str | None = None
            emit_times: list[float] = []
            for delivery in await _next_deliveries(engine_request):
                if delivery.finish_reason == FINISH_ABORT:
                    obs.finish(trace, ABORTED, engine_request)
                    events.append((encode(_aborted_error().body()), 0))
                    events.append((_SSE_DONE, 0))
                    await writer.send(events)
                    return response
                completion_tokens += delivery.token_count
                usage = _usage(params.prompt_tokens, completion_tokens) if continuous else None
                shown_reason = None if NO_FINISH in malformed else delivery.finish_reason
                choice = shape.content_choice(output.take(delivery.token_count), shown_reason)
                if COMMENT in malformed:
                    events.append((_SSE_COMMENT, 0))
                events.append((encode(shape.chunk(choice, usage, with_usage)), delivery.token_count))
                emit_times.append(delivery.emit_time)
                if invalid_json_pending:
                    events.append((_truncated_json(shape), 0))
                    invalid_json_pending = False
                finish_reason = delivery.finish_reason
                if finish_reason is not None:
                    break
            if finish_reason is not None:
                if with_usage:
                    final_usage = _usage(params.prompt_tokens, completion_tokens)
                    events.append((encode(shape.chunk(None, final_usage, True)), 0))
                if NO_DONE not in malformed:
                    events.append((_SSE_DONE, 0))
                await writer.send(
                    events, functools.partial(obs.finish, trace, OK, engine_request, finish_reason), emit_times
                )
                break
            await writer.send(events, emit_times=emit_times)
        await response.write_eof()
    except _ConnectionResetInjected:
        pass  # the transport is gone; aiohttp's own clean-up handles the rest
    except ConnectionError:
        pass  # the client went away; the caller drops the request from the engine
    return response


async def _full_response(
    request: web.Request,
    params: GenerationParams,
    shape: _ResponseShape,
    engine_request: EngineRequest,
    output: OutputText,
    fault: FaultSpec,
    trace: RequestTrace,
) -> web.StreamResponse:
    """Non-streaming: wait for the whole generation (paced by the engine), answer once."""
    obs = request.app[OBS_KEY]
    completion_tokens = 0
    while True:
        delivery = await engine_request.deliveries.get()
        if delivery.finish_reason == FINISH_ABORT:
            trace.outcome = ABORTED
            raise _aborted_error()
        completion_tokens += delivery.token_count
        if delivery.finish_reason is not None:
            break
    if fault.stall_seconds > 0:
        await asyncio.sleep(fault.stall_seconds)
    if fault.reset_after is not None:
        trace.outcome = RESET
        _reset_connection(request)
        raise _ConnectionResetInjected
    payload = shape.full_response(
        output.take(completion_tokens), delivery.finish_reason, _usage(params.prompt_tokens, completion_tokens)
    )
    headers = _response_headers({}, trace)
    obs.record_chunk(trace, time.monotonic(), completion_tokens)
    obs.finish(trace, OK, engine_request, delivery.finish_reason)
    if INVALID_JSON in fault.malformed:
        text = _encode_json(payload)
        return web.Response(text=text[: len(text) // 2], content_type="application/json", headers=headers)
    return web.json_response(payload, headers=headers, dumps=_encode_json)


def _response_headers(base: dict[str, str], trace: RequestTrace) -> dict[str, str]:
    """Echo the client's ``X-Request-Id`` (as vLLM does with request-id headers)."""
    if trace.x_request_id is None:
        return base
    return {**base, "X-Request-Id": trace.x_request_id}


async def _generate(
    request: web.Request,
    params: GenerationParams,
    shape: _ResponseShape,
    handler_start: float,
    blocks: tuple[int, ...] = (),
) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    engine = request.app[ENGINE_KEY]
    obs = request.app[OBS_KEY]
    fault = obs.choose_fault(request)
    trace = obs.begin_trace(
        request.path,
        request_arrival(request, handler_start),
        request.headers.get("X-Request-Id"),
        handler_start,
        shape,
        params,
        await request.read(),
        fault,
    )
    engine_request: EngineRequest | None = None
    try:
        if fault.status is not None:
            raise injected_status_error(fault)
        try:
            engine_request = engine.submit(params.prompt_tokens, params.max_tokens, blocks)
        except EngineStopped:
            trace.outcome = ABORTED
            raise _aborted_error() from None
        except RequestTooLarge as exc:  # vLLM answers a request longer than the context with 400
            raise ApiError(400, str(exc), param="max_tokens") from None
        trace.queued = time.monotonic()
        output = OutputText(config.seed * 1_000_003 + engine_request.request_id)
        if params.stream:
            return await _stream_response(request, params, shape, engine_request, output, fault, trace)
        return await _full_response(request, params, shape, engine_request, output, fault, trace)
    except ApiError as error:
        trace.status = error.status
        trace.error = error.message
        obs.finish(trace, ERROR, engine_request)
        raise
    except _ConnectionResetInjected:
        # The transport is aborted: aiohttp's write of this response fails with a
        # ConnectionError, which it treats as a client that went away (no traceback).
        return web.Response(status=200)
    finally:
        if engine_request is not None:
            engine.cancel(engine_request)  # no-op when finished; frees the slot on disconnect
        obs.finish(trace, CANCELLED, engine_request)


# -- arrival: when a request's first bytes reached the process ---------------------------
#
# A handler starts when the event loop gets to it: after the HTTP layer has read and
# parsed the request, and after whatever else the single loop was doing (writing
# chunks for every other stream, parsing the other requests that arrived together).
# Counting TTFT from there hides the server's own front-end queue, and a client
# compared against it is charged with the server's delay. So every request is stamped
# in ``data_received``, when the first bytes of it reach the process, and that stamp
# is the request's ``arrival`` (trace, TTFT, e2e); the handler start is kept beside it
# (``handler_mono``). The stamp is the return of the poll that reported the bytes, which
# the read in the same iteration can follow by milliseconds (sim/pollclock.py). It is
# still as late as the loop's next poll: ``benchmarks/timing_truth.py --wire`` measures
# that part from kernel timestamps.
#
# aiohttp has no public hook for the per-connection protocol, so ``build_app``
# wraps the app's (private) ``_make_handler``: the Server it returns makes
# ``_ArrivalStampingHandler`` protocols, and its request factory moves each stamp
# onto its request (``request[ARRIVAL_KEY]``). Wherever a stamp is missing (an
# aiohttp whose internals moved, a request parsed from an upgrade's tail), the
# arrival is the handler start, as before.

# aiohttp >= 3.14 types request-scoped values with a RequestKey; older releases take a str
ARRIVAL_KEY: Any = web.RequestKey("infmax_sim_arrival", float) if hasattr(web, "RequestKey") else "infmax_sim_arrival"
_MAX_PENDING_STAMPS = 64  # bounded: stamps of messages that never reach the factory are dropped


class _ArrivalStampingHandler(RequestHandler):
    """aiohttp's HTTP/1 protocol, plus a ``time.monotonic()`` stamp per request of
    when its first bytes were found readable: the return of the loop's poll that reported
    them (sim/pollclock.py), else when they were handed to ``data_received``."""

    __slots__ = ("infmax_stamps", "_infmax_first_rx", "_infmax_body", "_infmax_polls")

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # id(message) -> (message, stamp): the factory looks its message up by identity
        self.infmax_stamps: dict[int, tuple[object, float]] = {}
        self._infmax_first_rx: float | None = None  # first bytes of a request not yet parsed
        self._infmax_body: Any = None  # payload of the latest request, while its body arrives
        self._infmax_polls = poll_clock(asyncio.get_running_loop())

    def data_received(self, data: bytes) -> None:
        # The bytes were readable when the loop's poll that reported them returned, in this
        # same iteration (asyncio reads in the iteration of its select), possibly after every
        # callback queued before that poll and the reads of the sockets before this one
        # (sim/pollclock.py).
        now = self._infmax_polls.arrival()
        body = self._infmax_body
        if data and self._infmax_first_rx is None and (body is None or body.is_eof()):
            self._infmax_first_rx = now  # not the rest of a body: these bytes start a request
        before = self._request_count
        super().data_received(data)
        new = self._request_count - before
        if new <= 0:
            return
        stamps = self.infmax_stamps
        if len(stamps) + new > _MAX_PENDING_STAMPS:
            stamps.clear()
        first = self._infmax_first_rx if self._infmax_first_rx is not None else now
        self._infmax_first_rx = None
        entries = list(self._messages)[-new:]  # data_received appended them last
        for index, (message, _) in enumerate(entries):
            stamps[id(message)] = (message, first if index == 0 else now)
        self._infmax_body = entries[-1][1]


class _ArrivalStampingServer(web.Server):
    """A ``web.Server`` whose connections are :class:`_ArrivalStampingHandler`."""

    def __call__(self) -> RequestHandler:
        try:
            return _ArrivalStampingHandler(self, loop=self._loop, **self._kwargs)
        except TypeError:  # handler arguments this aiohttp does not know: aiohttp's own fallback
            return super().__call__()


def _stamping_request_factory(make_request: Callable[..., web.BaseRequest]) -> Callable[..., web.BaseRequest]:
    def factory(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        request = make_request(message, payload, protocol, writer, task)
        stamps = getattr(protocol, "infmax_stamps", None)
        if stamps:
            entry = stamps.pop(id(message), None)
            if entry is not None and entry[0] is message:
                request[ARRIVAL_KEY] = entry[1]
        return request

    return factory


def _install_arrival_stamps(app: web.Application) -> None:
    if not all(hasattr(RequestHandler, name) for name in ("_request_count", "_messages")):
        return  # an aiohttp whose internals moved: arrival stays the handler start
    make_handler = app._make_handler

    def make_stamping_handler(**kwargs: Any) -> web.Server:
        server = make_handler(**kwargs)
        if type(server) is web.Server:  # only the class we know the state of
            server.__class__ = _ArrivalStampingServer
            server.request_factory = _stamping_request_factory(server.request_factory)
        return server

    app._make_handler = make_stamping_handler  # type: ignore[method-assign]


def request_arrival(request: web.Request, handler_start: float) -> float:
    """When the request's first bytes reached the process (``time.monotonic()``), or
    ``handler_start`` where the HTTP layer did not stamp it; never later than it."""
    stamp = request.get(ARRIVAL_KEY)
    return handler_start if stamp is None else min(stamp, handler_start)


# -- handlers ---------------------------------------------------------------------------


def _prompt_blocks(config: SimConfig, body: dict[str, Any], chat: bool) -> tuple[int, ...]:
    """The prompt's block hashes for prefix caching (none when it is off). Call after the
    body was parsed: its shape is known to be valid."""
    if not config.engine.enable_prefix_caching:
        return ()
    tokens = chat_token_sequence(body["messages"]) if chat else completion_token_sequence(body["prompt"])
    return block_hashes(tokens, config.engine.block_size)


async def handle_completions(request: web.Request) -> web.StreamResponse:
    handler_start = time.monotonic()
    request.app[OBS_KEY].on_generation_request("aiohttp")
    config = request.app[CONFIG_KEY]
    body = await _read_json_body(request)
    params = parse_completion_request(body, config.model, config.vocab_size)
    blocks = _prompt_blocks(config, body, chat=False)
    return await _generate(request, params, CompletionShape(config.model), handler_start, blocks)


async def handle_chat_completions(request: web.Request) -> web.StreamResponse:
    handler_start = time.monotonic()
    request.app[OBS_KEY].on_generation_request("aiohttp")
    config = request.app[CONFIG_KEY]
    body = await _read_json_body(request)
    params = parse_chat_request(body, config.model)
    blocks = _prompt_blocks(config, body, chat=True)
    return await _generate(request, params, ChatShape(config.model), handler_start, blocks)


async def handle_models(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
    model = {"id": config.model, "object": "model", "created": int(time.time()), "owned_by": OWNED_BY}
    return web.json_response({"object": "list", "data": [model]}, dumps=_encode_json)


async def handle_health(request: web.Request) -> web.Response:
    if not _is_ready(request.app):
        raise _service_unavailable("the simulator is starting (startup delay)")
    return web.Response(status=200)


async def handle_power(request: web.Request) -> web.Response:
    """Modelled GPU power and energy: idle power plus (TDP - idle) while a step runs.

    Needs a hardware profile with ``tdp_w`` (``--profile b200/...``); the default
    cost model has no hardware, so there is no power to model.
    """
    config, engine = request.app[CONFIG_KEY], request.app[ENGINE_KEY]
    deployment = getattr(config.cost_model, "deployment", None)
    hardware = getattr(deployment, "hardware", None)
    if deployment is None or hardware is None or hardware.tdp_w is None:
        raise ApiError(
            404,
            "no modelled power: start the simulator with --profile HARDWARE/MODEL (a hardware profile with tdp_w)",
            error_type="not_found_error",
        )
    gpus = deployment.gpus
    idle = hardware.idle_w if hardware.idle_w is not None else 0.15 * hardware.tdp_w
    elapsed = time.monotonic() - request.app[STARTED_AT_KEY]
    energy_j = gpus * (idle * elapsed + (hardware.tdp_w - idle) * engine.busy_seconds)
    power_w = gpus * (hardware.tdp_w if engine.step_running else idle)
    return web.json_response(
        {
            "power_w": power_w,
            "energy_j": energy_j,
            "gpus": gpus,
            "modelled": True,
            "tdp_w": hardware.tdp_w,
            "idle_w": idle,
        },
        dumps=_encode_json,
    )


async def handle_stats(request: web.Request) -> web.Response:
    stats = request.app[ENGINE_KEY].stats()
    body = asdict(stats)
    # The GPUs a --profile deployment models (--tp/--gpus or the profile's choice): launchers
    # compute per-GPU figures with it. None without a profile: no GPU is modelled.
    deployment = getattr(request.app[CONFIG_KEY].cost_model, "deployment", None)
    body["gpus"] = deployment.gpus if deployment is not None else None
    # What it models, so that nobody parses our flags again: the GPU (priced from the default
    # table) and whether /sim/power models its power.
    body["hardware"] = deployment.hardware.name if deployment is not None else None
    body["power_modelled"] = deployment is not None and deployment.hardware.tdp_w is not None
    body["sse_streams"] = dict(request.app[OBS_KEY].sse_streams)  # streams per writer (--sse-writer)
    body["front_end_requests"] = dict(request.app[OBS_KEY].front_end_requests)  # per reader (--front-end)
    body["write_lateness_ms"] = request.app[OBS_KEY].write_lateness.summary_ms()
    noise = noise_of(request.app[CONFIG_KEY].cost_model)
    if noise is not None:  # this start's drawn factors (--start-jitter and friends)
        body["noise"] = noise.describe()
    return web.json_response(body, dumps=_encode_json)


def _query_flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ApiError(400, f"'{name}': expected 1 or 0, got {value!r}", param=name)


async def handle_trace(request: web.Request) -> web.Response:
    """``GET /sim/trace[?since=N][&clear=1]``: finished requests in the order they were
    recorded; ``since`` and ``next_since`` count that order (``commit_seq``), not arrival."""
    since_text = request.query.get("since")
    since: int | None = None
    if since_text is not None:
        try:
            since = int(since_text)
        except ValueError:
            message = f"'since': expected an integer (a previous next_since), got {since_text!r}"
            raise ApiError(400, message, param="since") from None
    clear = _query_flag(request, "clear")
    snapshot = request.app[OBS_KEY].traces.snapshot(since, clear)
    return web.json_response(snapshot, dumps=_encode_json)


def kv_cache_usage(stats: EngineStats, config: SimConfig) -> float:
    """The engine's KV-cache fill when it models a finite KV cache, else the
    fraction of ``--max-num-seqs`` batch slots in use (a stand-in that still rises
    and falls with load)."""
    if getattr(config.engine, "kv_cache_tokens", None) is not None:
        return float(getattr(stats, "kv_cache_usage", 0.0))
    return stats.running / config.engine.max_num_seqs


async def handle_metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format, vLLM's names and buckets."""
    stats = request.app[ENGINE_KEY].stats()
    text = request.app[OBS_KEY].metrics.render(
        stats.running,
        stats.waiting,
        kv_cache_usage(stats, request.app[CONFIG_KEY]),
        prefix_cache=(stats.prefix_cache_queries, stats.prefix_cache_hits),
    )
    return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})


# -- middleware and app -----------------------------------------------------------------


def _is_ready(app: web.Application) -> bool:
    return asyncio.get_running_loop().time() >= app[READY_AT_KEY]


def check_api_key(authorization: str, api_key: str) -> None:
    """Raise the 401 ``ApiError`` unless the ``Authorization`` header's value carries ``api_key``."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _openai_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Auth and readiness for /v1/*, and OpenAI-shaped errors (logged, one line each)."""
    is_api = request.path.startswith("/v1/")
    try:
        if is_api:
            config = request.app[CONFIG_KEY]
            if config.api_key:
                check_api_key(request.headers.get("Authorization", ""), config.api_key)
            if not _is_ready(request.app):
                raise _service_unavailable("the simulator is starting (startup delay)")
        return await handler(request)
    except ApiError as error:
        logger.warning("infmax-sim: %d %s %s: %s", error.status, request.method, request.path, error.message)
        return error.response()
    except web.HTTPException as exc:
        if not is_api or exc.status < 400:
            raise
        logger.warning("infmax-sim: %d %s %s", exc.status, request.method, request.path)
        return ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}", code=exc.status).response()


def build_app(config: SimConfig) -> web.Application:
    """The simulator's aiohttp application. The engine starts with the app and is
    stopped in ``on_shutdown`` so in-flight requests end before the server waits
    for its handlers."""
    app = web.Application(middlewares=[_openai_gate], client_max_size=256 * 1024 * 1024)
    app[CONFIG_KEY] = config
    app[OBS_KEY] = Observability(config)
    _install_arrival_stamps(app)

    async def start_engine(app: web.Application) -> None:
        engine = Engine(config.engine, config.cost_model)
        engine.start()
        app[ENGINE_KEY] = engine
        app[STARTED_AT_KEY] = time.monotonic()
        app[READY_AT_KEY] = asyncio.get_running_loop().time() + config.startup_delay_s
        app[OBS_KEY].traces.open_file()
        outbox = _Outbox(asyncio.get_running_loop(), engine.output_drained)
        if config.sse_writer == "fast":
            engine.backlog = outbox.backlog  # the engine waits for a writer that falls behind
        app[OUTBOX_KEY] = outbox

    async def stop_engine(app: web.Application) -> None:
        if ENGINE_KEY in app:
            await app[ENGINE_KEY].stop()

    async def close_trace(app: web.Application) -> None:
        app[OBS_KEY].traces.close()

    app.on_startup.append(start_engine)
    app.on_shutdown.append(stop_engine)
    app.on_cleanup.append(stop_engine)
    app.on_cleanup.append(close_trace)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_post("/v1/completions", handle_completions)
    app.router.add_post("/v1/chat/completions", handle_chat_completions)
    app.router.add_get("/sim/stats", handle_stats)
    app.router.add_get("/sim/power", handle_power)
    app.router.add_get("/sim/trace", handle_trace)
    app.router.add_get("/metrics", handle_metrics)
    return app

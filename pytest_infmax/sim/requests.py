"""What a generation request asks for, read as vLLM's OpenAI server reads it: the body
checked field by field (refusals are :class:`ApiError`, answered in the OpenAI shape), the
prompt counted in tokens, and the fake output text the request is answered with.

Text is fake but countable: a prompt's token count is the number of matches of
``\\w+|[^\\w\\s]``, and every output token is one word with a leading space, so a
client re-tokenising the output with the same regex gets exactly the token count.

It is a module of its own because two front ends read requests, aiohttp's handlers
(:mod:`pytest_infmax.sim.server`) and the front door (:mod:`pytest_infmax.sim.frontdoor`),
and both parse them here, so both accept and refuse the same bodies.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

DEFAULT_MAX_TOKENS = 16
CHAT_TOKENS_PER_MESSAGE = 3  # role and separator overhead, like a chat template adds
TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")

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

encode_json = json.JSONEncoder(separators=(",", ":")).encode
"""The simulator's JSON encoder (compact separators): every JSON body and SSE payload it writes."""


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
        return web.json_response(self.body(), status=self.status, headers=self.headers, dumps=encode_json)


def _bad_field(param: str, expected: str, value: Any) -> ApiError:
    return ApiError(
        400,
        f"'{param}': expected {expected}, got {type(value).__name__} {_short_repr(value)}",
        param=param,
    )


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def service_unavailable(message: str) -> ApiError:
    """A 503 ``ApiError`` (starting up, shutting down) with ``message``."""
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
        return encode_json(self.take(token_count)).encode()


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


async def read_json_body(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object, else the 400 ``ApiError`` saying what it is."""
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

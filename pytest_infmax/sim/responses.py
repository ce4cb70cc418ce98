"""What a response says, as JSON objects and as bytes: the completions and chat shapes
(:class:`CompletionShape`, :class:`ChatShape`), the usage object, SSE framing, the aborted
request's error, and the malformed variants that fault injection asks for.

It is a module of its own so that every writer makes the same bytes from one definition:
both stream writers (:mod:`pytest_infmax.sim.streams`) and the non-streaming answer
(:mod:`pytest_infmax.sim.server`); and so that the bookkeeping they record into
(:mod:`pytest_infmax.sim.observability`) can name a response's shape without importing the
writers.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pytest_infmax.sim.requests import ApiError, encode_json, service_unavailable

SSE_DONE = b"data: [DONE]\n\n"
"""The event that ends a stream, as OpenAI's servers send it."""
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
"""The headers of a stream's response (both front ends send them)."""
SSE_COMMENT = b": ping\n\n"
"""An SSE comment line, sent before each content event under malformed=comment."""


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The OpenAI ``usage`` object of these token counts."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict[str, Any]) -> bytes:
    """A JSON payload as one SSE event: ``data: {...}`` and a blank line."""
    return b"data: " + encode_json(payload).encode() + b"\n\n"


def sse_no_space(payload: dict[str, Any]) -> bytes:
    """``sse`` without the space after ``data:`` (malformed=no_space)."""
    return b"data:" + encode_json(payload).encode() + b"\n\n"


class ResponseShape:
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


class CompletionShape(ResponseShape):
    id_prefix = "cmpl-"
    chunk_object = "text_completion"
    full_object = "text_completion"

    def content_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def full_choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        return self.content_choice(text, finish_reason)


class ChatShape(ResponseShape):
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


def truncated_json(shape: ResponseShape) -> bytes:
    """A data line whose JSON stops mid-object (malformed=invalid_json)."""
    text = encode_json(shape.chunk(shape.content_choice("", None), None, False))
    return b"data: " + text[: len(text) // 2].encode() + b"\n\n"


def aborted_error() -> ApiError:
    """The 503 of a request the engine aborted as the simulator shuts down."""
    return service_unavailable("the simulator is shutting down; the request was aborted")

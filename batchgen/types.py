"""Typed views of chat-completion responses and stream chunks, as the client returns them.

Every object keeps the server's parsed JSON in `raw`, so fields batchgen does not model
(token ids, vLLM extensions) are never lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

from batchgen.errors import ToolArgumentsError

__all__ = [
    "ChatCompletionResponse",
    "Choice",
    "Function",
    "Reply",
    "TokenLogprob",
    "ToolCall",
    "TopLogprob",
    "Usage",
]


@dataclass(frozen=True, slots=True)
class Function:
    """The function a tool call invokes. `arguments` is the raw string the server sent."""

    name: str | None
    arguments: str

    def parse_arguments(self) -> dict[str, Any]:
        """Parse `arguments` as a JSON object.

        Raises:
            ToolArgumentsError: the string is not JSON, or not a JSON object.
        """
        try:
            value = orjson.loads(self.arguments) if self.arguments else {}
        except orjson.JSONDecodeError as exc:
            raise ToolArgumentsError(
                f"tool call {self.name!r}: arguments are not valid JSON ({exc}): {self.arguments[:200]!r}"
            ) from exc
        if not isinstance(value, dict):
            raise ToolArgumentsError(
                f"tool call {self.name!r}: arguments are JSON {type(value).__name__}, not an object"
            )
        return value


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call: `ToolCall(id, type, function=Function(name, arguments))`."""

    id: str | None
    type: str
    function: Function

    def parse_arguments(self) -> dict[str, Any]:
        """Shortcut for `self.function.parse_arguments()`."""
        return self.function.parse_arguments()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.function.name, "arguments": self.function.arguments},
        }


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts. The details are None unless the server sends them: `cached_tokens` from
    `prompt_tokens_details` (prompt-cache hits), `reasoning_tokens` from `completion_tokens_details`
    (vLLM with a reasoning parser, OpenAI reasoning models)."""

    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        """The flat form of the output's `usage` column."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
        }

    def to_wire(self) -> dict[str, Any]:
        """The OpenAI/vLLM JSON shape, details nested (for an assembled stream's `raw`)."""
        wire: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens is not None:
            wire["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.reasoning_tokens is not None:
            wire["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return wire


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One alternative at a position: the token text and its log-probability."""

    token: str
    logprob: float
    bytes: list[int] | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token with its log-probability and the `top_logprobs` alternatives asked for.

    `bytes` are the token's UTF-8 bytes when the server sends them (a token may hold part of a
    character); `token` is the text as the server sent it.
    """

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]

    def to_dict(self) -> dict[str, Any]:
        """The output column's form: `{token, logprob, top_logprobs: [{token, logprob}]}`."""
        return {
            "token": self.token,
            "logprob": self.logprob,
            "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in self.top_logprobs],
        }


@dataclass(frozen=True, slots=True)
class Choice:
    """One generated alternative (there are several when the request sets `n`).

    `stop_reason` is vLLM's: the stop string that ended the text, or the stop token id (an int),
    None at EOS or length. `logprobs` is the `logprobs.content` list, None when not asked for.
    """

    index: int
    role: str | None
    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class ChatCompletionResponse:
    """A complete chat completion; the top-level shortcuts read the first choice.

    `attempts` counts the tries the client made (1 when no retry was needed), `latency_s` is the
    wall time from the first send to the full answer (retries included), and `ttft_s` the time to
    the first text-bearing chunk of the successful attempt when streaming. `body` is the JSON
    exactly as received for a plain answer (None for a stream, whose `raw` is assembled).
    """

    raw: dict[str, Any]
    id: str | None
    object: str | None
    created: int | None
    model: str | None
    choices: list[Choice]
    usage: Usage | None
    attempts: int = 1
    latency_s: float | None = None
    ttft_s: float | None = None
    body: bytes | None = None

    def raw_json(self) -> str:
        """The answer as JSON text: the body as received, or the assembled stream."""
        return (self.body if self.body is not None else orjson.dumps(self.raw)).decode()

    @property
    def content(self) -> str | None:
        return self.choices[0].content if self.choices else None

    @property
    def reasoning_content(self) -> str | None:
        return self.choices[0].reasoning_content if self.choices else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.choices[0].tool_calls if self.choices else []

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None

    @property
    def stop_reason(self) -> str | int | None:
        return self.choices[0].stop_reason if self.choices else None

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.choices[0].logprobs if self.choices else None


T = TypeVar("T")


class Reply(Generic[T]):
    """What one request gave the worker pool: the answer as its reader made it, and how it went.

    `value` is what `read` returned (see `Client.exchange`), `attempts` the tries made, `latency_s`
    the time from the first send to the full answer, `ttft_s` the time to the first text of a
    stream (None when not streamed), `endpoint` the base URL of the server that answered (set by
    a `ClientPool`). `body` is the answer's JSON as received, or for a stream None
    and `raw` the assembled answer (encoded only if asked for: `raw_json`). A plain class with
    slots, not a dataclass: one is built per row.
    """

    __slots__ = ("value", "attempts", "latency_s", "ttft_s", "body", "raw", "endpoint")

    def __init__(
        self, value: T, attempts: int, latency_s: float, ttft_s: float | None, body: bytes | None,
        raw: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.value = value
        self.attempts = attempts
        self.latency_s = latency_s
        self.ttft_s = ttft_s
        self.body = body
        self.raw = raw
        self.endpoint: str | None = None

    def raw_json(self) -> str:
        """The answer as JSON text: the body as received, or the assembled stream."""
        return (self.body if self.body is not None else orjson.dumps(self.raw)).decode()

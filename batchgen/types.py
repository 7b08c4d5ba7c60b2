"""Typed views of chat-completion responses and stream chunks, as the client returns them.

Every object keeps the server's parsed JSON in `raw`, so fields batchgen does not model
(logprobs, token ids, vLLM extensions) are never lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from batchgen.errors import ToolArgumentsError

__all__ = [
    "ChatCompletionResponse",
    "Choice",
    "Function",
    "ToolCall",
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
    """Token counts. `cached_tokens` is None unless the server reports prompt-cache hits."""

    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class Choice:
    """One generated alternative (there are several when the request sets `n`)."""

    index: int
    role: str | None
    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: Any = None


@dataclass(slots=True)
class ChatCompletionResponse:
    """A complete chat completion; the top-level shortcuts read the first choice.

    `attempts` counts the tries the client made (1 when no retry was needed), `latency_s` is the
    wall time from the first send to the full answer (retries included), and `ttft_s` the time to
    the first text-bearing chunk of the successful attempt when streaming.
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

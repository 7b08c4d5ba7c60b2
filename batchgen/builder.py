"""The fluent request builder: `client.chat.completions.builder().model(...).messages(...).send()`."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from batchgen.stream import Stream
from batchgen.types import ChatCompletionResponse
from batchgen.validation import validate_request

if TYPE_CHECKING:
    from batchgen.client import Completions

__all__ = ["ChatCompletionBuilder"]


class ChatCompletionBuilder:
    """Chainable setters, then `build()` (the body), `await send()` or `await send_stream()`.

    Example:
        r = await (client.chat.completions.builder()
                   .model("qwen3-8b").system("Be brief.").user("Capital of France?")
                   .temperature(0.2).max_tokens(64).send())
    """

    def __init__(self, completions: Completions) -> None:
        self._completions = completions
        self._body: dict[str, Any] = {}

    def _set(self, key: str, value: Any) -> ChatCompletionBuilder:
        if value is None:
            self._body.pop(key, None)
        else:
            self._body[key] = value
        return self

    def model(self, name: str) -> ChatCompletionBuilder:
        return self._set("model", name)

    def messages(self, messages: list[dict[str, Any]]) -> ChatCompletionBuilder:
        return self._set("messages", list(messages))

    def message(self, role: str, content: Any, **fields: Any) -> ChatCompletionBuilder:
        """Append one message (multi-turn conversations, tool results)."""
        self._body.setdefault("messages", []).append({"role": role, "content": content, **fields})
        return self

    def system(self, content: str) -> ChatCompletionBuilder:
        return self.message("system", content)

    def user(self, content: Any) -> ChatCompletionBuilder:
        return self.message("user", content)

    def assistant(self, content: Any, **fields: Any) -> ChatCompletionBuilder:
        return self.message("assistant", content, **fields)

    def temperature(self, value: float | None) -> ChatCompletionBuilder:
        return self._set("temperature", value)

    def max_tokens(self, value: int | None) -> ChatCompletionBuilder:
        return self._set("max_tokens", value)

    def top_p(self, value: float | None) -> ChatCompletionBuilder:
        return self._set("top_p", value)

    def top_k(self, value: int | None) -> ChatCompletionBuilder:
        return self._set("top_k", value)

    def stop(self, value: str | list[str] | None) -> ChatCompletionBuilder:
        return self._set("stop", value)

    def seed(self, value: int | None) -> ChatCompletionBuilder:
        return self._set("seed", value)

    def tools(self, tools: list[dict[str, Any]] | None) -> ChatCompletionBuilder:
        return self._set("tools", tools)

    def tool_choice(self, choice: str | dict[str, Any] | None) -> ChatCompletionBuilder:
        return self._set("tool_choice", choice)

    def response_format(self, value: dict[str, Any] | None) -> ChatCompletionBuilder:
        return self._set("response_format", value)

    def stream(self, enabled: bool = True) -> ChatCompletionBuilder:
        return self._set("stream", True if enabled else None)

    def extra(self, fields: Mapping[str, Any]) -> ChatCompletionBuilder:
        """Merge fields into the body as-is (vLLM extensions such as `chat_template_kwargs`)."""
        self._body.update(fields)
        return self

    def build(self) -> dict[str, Any]:
        """The validated request body (a copy; the builder can be reused)."""
        body = copy.deepcopy(self._body)
        if body.get("stream"):
            body.setdefault("stream_options", {"include_usage": True})
        validate_request(body)
        return body

    async def send(self) -> ChatCompletionResponse:
        """Send and return the whole answer (a streamed request is read to the end)."""
        body = self.build()
        return await self._completions._client.complete(body, validated=True)

    async def send_stream(self) -> Stream:
        """Send with `stream: true` and return the `Stream` of chunks."""
        body = self.build()
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
        return await self._completions._client.open_stream(body)

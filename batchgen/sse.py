"""Server-sent events: a byte-level decoder and the assembler that joins chunks into a response.

The decoder works on raw bytes and keeps partial lines across TCP reads, so an event split
anywhere (even inside a multi-byte UTF-8 character) decodes the same as one read whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchgen.parsing import parse_chunk
from batchgen.types import ChatCompletionChunk, ChatCompletionResponse, Choice, Function, ToolCall, Usage

__all__ = ["DONE", "SSEDecoder", "StreamAssembler"]

DONE = b"[DONE]"


class SSEDecoder:
    """Feed bytes in, get the `data:` payload of every complete event out (as bytes).

    Example:
        decoder = SSEDecoder()
        for payload in decoder.feed(b'data: {"a": 1}\\n\\nda'):
            ...
    """

    __slots__ = ("_buffer", "_data")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()  # the unfinished tail (b"" when the chunk ended on a newline)
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:  # a blank line ends the event
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = self._data = []
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            # event:, id:, retry: and comment lines carry nothing a chat stream needs
        return events

    def flush(self) -> list[bytes]:
        """Events left when the connection closed without a final blank line."""
        events = self.feed(b"\n\n") if (self._buffer or self._data) else []
        return events


@dataclass(slots=True)
class _ToolCallParts:
    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _ChoiceParts:
    role: str | None = None
    content: list[str] = field(default_factory=list)
    saw_content: bool = False
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, _ToolCallParts] = field(default_factory=dict)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class StreamAssembler:
    """Accumulates chunks into the `ChatCompletionResponse` a non-streamed request would give.

    Content and reasoning are concatenated per choice; tool calls are joined per `index`, taking
    id/type/name from the first delta that has them (servers may repeat them or send them once)
    and concatenating every argument piece, including any in the finish chunk.
    """

    __slots__ = ("_choices", "_id", "_model", "_created", "_usage")

    def __init__(self) -> None:
        self._choices: dict[int, _ChoiceParts] = {}
        self._id: str | None = None
        self._model: str | None = None
        self._created: int | None = None
        self._usage: Usage | None = None

    def add(self, chunk: ChatCompletionChunk) -> None:
        if self._id is None:
            self._id = chunk.id
            self._model = chunk.model
            created = chunk.raw.get("created")
            self._created = created if isinstance(created, int) else None
        if chunk.usage is not None:
            self._usage = chunk.usage  # continuous usage stats are cumulative: keep the last
        if chunk.index is None:
            return
        for choice in chunk.raw["choices"]:
            self._add_choice(choice, chunk if choice is chunk.raw["choices"][0] else None)

    def _add_choice(self, choice: dict[str, Any], parsed: ChatCompletionChunk | None) -> None:
        if parsed is None:  # rare: several choices in one chunk; parse this one the same way
            parsed = parse_chunk({"choices": [choice]})
        parts = self._choices.get(parsed.index or 0)
        if parts is None:
            parts = self._choices[parsed.index or 0] = _ChoiceParts()
        if parsed.role and parts.role is None:
            parts.role = parsed.role
        if parsed.content is not None:
            parts.saw_content = True
            if parsed.content:
                parts.content.append(parsed.content)
        if parsed.reasoning_content:
            parts.reasoning.append(parsed.reasoning_content)
        for delta in parsed.tool_calls:
            call = parts.tool_calls.get(delta.index)
            if call is None:
                call = parts.tool_calls[delta.index] = _ToolCallParts()
            call.id = call.id or delta.id
            call.type = call.type or delta.type
            call.name = call.name or delta.name
            if delta.arguments:
                call.arguments.append(delta.arguments)
        if parsed.finish_reason is not None:
            parts.finish_reason = parsed.finish_reason
            stop = choice.get("stop_reason")
            parts.stop_reason = stop if isinstance(stop, (str, int)) else None

    @property
    def finished(self) -> bool:
        """True once every choice seen so far has a finish reason."""
        return bool(self._choices) and all(p.finish_reason for p in self._choices.values())

    def response(self) -> ChatCompletionResponse:
        choices = []
        for index in sorted(self._choices):
            parts = self._choices[index]
            content = "".join(parts.content)
            calls = [
                ToolCall(id=c.id, type=c.type or "function", function=Function(c.name, "".join(c.arguments)))
                for _, c in sorted(parts.tool_calls.items())
            ]
            choices.append(
                Choice(
                    index=index,
                    role=parts.role,
                    # Like a non-streamed answer: null content for tool-call-only or reasoning-only output.
                    content=content if content or (parts.saw_content and not calls and not parts.reasoning) else None,
                    reasoning_content="".join(parts.reasoning) if parts.reasoning else None,
                    tool_calls=calls,
                    finish_reason=parts.finish_reason,
                    stop_reason=parts.stop_reason,
                )
            )
        raw = {
            "id": self._id,
            "object": "chat.completion",
            "created": self._created,
            "model": self._model,
            "choices": [
                {
                    "index": c.index,
                    "message": {
                        "role": c.role or "assistant",
                        "content": c.content,
                        "reasoning_content": c.reasoning_content,
                        "tool_calls": [t.to_dict() for t in c.tool_calls],
                    },
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for c in choices
            ],
            "usage": None if self._usage is None else self._usage.to_dict(),
        }
        return ChatCompletionResponse(
            raw=raw,
            id=self._id,
            object="chat.completion",
            created=self._created,
            model=self._model,
            choices=choices,
            usage=self._usage,
        )

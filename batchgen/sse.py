"""Server-sent events: a byte-level decoder and the assembler that joins chunks into a response.

The decoder works on raw bytes and keeps partial lines across TCP reads, so an event split
anywhere (even inside a multi-byte UTF-8 character) decodes the same as one read whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchgen.chunks import ChatCompletionChunk, parse_chunk
from batchgen.parsing import bad_type, parse_logprobs, stop_reason
from batchgen.types import ChatCompletionResponse, Choice, Function, ToolCall, Usage

__all__ = ["DONE", "SSEDecoder", "StreamAssembler"]

DONE = b"[DONE]"


def _payload(event: bytes) -> bytes | None:
    """The joined `data:` lines of one complete event; None when it has none (comments, `event:` only)."""
    if not event:
        return None
    data = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        # event:, id:, retry: and comment lines carry nothing a chat stream needs
    return b"\n".join(data) if data else None


class SSEDecoder:
    """Feed bytes in, get the `data:` payload of every complete event out (as bytes).

    Events are cut at blank lines with one `bytes.split` per read; the usual single-line
    `data: {...}` event costs a slice, and only unusual events go through line parsing.
    CR and CRLF line ends are folded to LF first (a CR at the end of a read waits for the next).

    Example:
        decoder = SSEDecoder()
        for payload in decoder.feed(b'data: {"a": 1}\\n\\nda'):
            ...
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        held_cr = b""
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):  # maybe the first half of a CRLF
                buffer, held_cr = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        # The usual read: whole `data: {...}` events, one line each. Splitting on the separator and
        # the next event's prefix together gives the payloads without a slice per event (a third of
        # the decoder's time on a 131-event read). It holds when the only newlines before the last
        # separator are the separators themselves; anything else (comments, multi-line data,
        # `data:` without a space, extra blank lines) takes the careful path below.
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._buffer = buffer + held_cr
            return []
        if buffer.startswith(b"data: "):
            payloads = buffer[6:end].split(b"\n\ndata: ")
            if buffer.count(b"\n", 0, end) == 2 * (len(payloads) - 1):
                self._buffer = buffer[end + 2 :] + held_cr
                return payloads
        events = buffer.split(b"\n\n")
        tail = events.pop()  # the unfinished rest
        self._buffer = tail + held_cr
        return [p for p in map(_payload, events) if p is not None]

    def flush(self) -> list[bytes]:
        """The last event when the connection closed without a final blank line."""
        tail, self._buffer = self._buffer.replace(b"\r", b""), b""
        payload = _payload(tail.strip(b"\n")) if tail.strip() else None
        return [] if payload is None else [payload]


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
    logprobs: list[Any] | None = None  # the raw `logprobs.content` entries, parsed once at the end


class StreamAssembler:
    """Accumulates chunks into the `ChatCompletionResponse` a non-streamed request would give.

    Content and reasoning are concatenated per choice; tool calls are joined per `index`, taking
    id/type/name from the first delta that has them (servers may repeat them or send them once)
    and concatenating every argument piece, including any in the finish chunk. Each chunk's
    `logprobs.content` entries are joined per choice; `stop_reason` comes from the finishing chunk
    and usage (with its details) from the last chunk that carried one.
    """

    __slots__ = ("_choices", "_id", "_model", "_created", "_usage")

    def __init__(self) -> None:
        self._choices: dict[int, _ChoiceParts] = {}
        self._id: str | None = None
        self._model: str | None = None
        self._created: int | None = None
        self._usage: Usage | None = None

    def add(self, chunk: ChatCompletionChunk) -> None:
        raw = chunk.raw
        if self._id is None:
            self._id = chunk.id
            self._model = chunk.model
            created = raw.get("created")
            self._created = created if isinstance(created, int) else None
        choices = raw.get("choices")
        if type(choices) is list and len(choices) == 1 and raw.get("usage") is None and self._add_token(choices[0]):
            return
        if chunk.usage is not None:
            self._usage = chunk.usage  # continuous usage stats are cumulative: keep the last
        if chunk.index is None:
            return
        self._add_choice(chunk)
        for extra in choices[1:] if isinstance(choices, list) else ():  # rare: several choices in one chunk; parse each the same way
            self._add_choice(parse_chunk({"choices": [extra]}))

    def _add_token(self, choice: Any) -> bool:
        """The fast path for a plain token delta `{"content": "..."}`; False when it is anything else."""
        if type(choice) is not dict or choice.get("finish_reason") is not None or choice.get("logprobs") is not None:
            return False
        delta = choice.get("delta")
        if type(delta) is not dict or len(delta) != 1:
            return False
        content = delta.get("content")
        parts = self._choices.get(choice.get("index", 0))
        if type(content) is not str or parts is None:
            return False
        parts.saw_content = True
        if content:
            parts.content.append(content)
        return True

    def _add_choice(self, parsed: ChatCompletionChunk) -> None:
        index = parsed.index or 0
        parts = self._choices.get(index)
        if parts is None:
            parts = self._choices[index] = _ChoiceParts(role=parsed.role)
        if parsed.role and parts.role is None:
            parts.role = parsed.role
        content = parsed.content
        if content is not None:
            parts.saw_content = True
            if content:
                parts.content.append(content)
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
        choice = parsed.raw["choices"][0]
        logprobs = choice.get("logprobs")
        if logprobs is not None:
            entries = logprobs.get("content") if type(logprobs) is dict else None
            if entries is not None and type(entries) is not list:
                raise bad_type("chunk logprobs.content", entries, "a list")
            if entries:
                if parts.logprobs is None:
                    parts.logprobs = []
                parts.logprobs.extend(entries)
            elif parts.logprobs is None:
                parts.logprobs = []  # asked for and sent, even if this delta had no token
        if parsed.finish_reason is not None:
            parts.finish_reason = parsed.finish_reason
            parts.stop_reason = stop_reason(choice.get("stop_reason"))

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
                    logprobs=parse_logprobs(parts.logprobs, f"choices[{index}].logprobs.content"),
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
                    "logprobs": None if parts.logprobs is None else {"content": parts.logprobs},
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for c, parts in zip(choices, (self._choices[i] for i in sorted(self._choices)), strict=True)
            ],
            "usage": None if self._usage is None else self._usage.to_wire(),
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

"""Stream chunks: `ChatCompletionChunk`, a lazily parsed view of one SSE event, and `parse_chunk`.

A stream makes one chunk per generated token, so a chunk only keeps the decoded JSON until a
field is read; the fields are then checked and cached together. A caller that only counts or
times chunks never pays for parsing, and one that reads them pays once. `has_text` and `usage`,
which a benchmark reads on every chunk, answer the usual chunk (a text delta, no usage) from the
field they need alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from batchgen.parsing import STR_OR_NONE, bad_type, opt_str, parse_usage, reasoning_of
from batchgen.types import Usage

__all__ = ["ChatCompletionChunk", "ToolCallDelta", "event_usage", "has_text", "parse_chunk"]


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a streamed tool call; only the first piece for an `index` usually has id and name."""

    index: int
    id: str | None
    type: str | None
    name: str | None
    arguments: str | None


_Fields = tuple[
    int | None, str | None, str | None, str | None, Sequence[ToolCallDelta], str | None, "Usage | None"
]
_USAGE_ONLY: Any = (None, None, None, None, (), None)
_NO_TEXT_KEYS = frozenset({"role", "content"})


class ChatCompletionChunk:
    """One SSE event of a streamed chat completion (the first choice's delta on top).

    `raw` is the decoded event. The usage chunk has no choices: then `index` is None and every
    delta field is None. Reading a field of a malformed event raises `IncompleteResponseError`.
    """

    __slots__ = ("_fields", "raw")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self._fields: _Fields | None = None

    def _parse(self) -> _Fields:
        fields = self._fields = _parse_fields(self.raw)
        return fields

    @property
    def id(self) -> str | None:
        return opt_str(self.raw.get("id"), "chunk id")

    @property
    def model(self) -> str | None:
        return opt_str(self.raw.get("model"), "chunk model")

    @property
    def index(self) -> int | None:
        return (self._fields or self._parse())[0]

    @property
    def role(self) -> str | None:
        return (self._fields or self._parse())[1]

    @property
    def content(self) -> str | None:
        return (self._fields or self._parse())[2]

    @property
    def reasoning_content(self) -> str | None:
        return (self._fields or self._parse())[3]

    @property
    def tool_calls(self) -> Sequence[ToolCallDelta]:
        return (self._fields or self._parse())[4]

    @property
    def finish_reason(self) -> str | None:
        return (self._fields or self._parse())[5]

    @property
    def usage(self) -> Usage | None:
        if self._fields is None and self.raw.get("usage") is None:  # most chunks: nothing to parse
            return None
        return (self._fields or self._parse())[6]

    @property
    def has_text(self) -> bool:
        """True when the chunk carries generated text in any channel (used for TTFT and ITL)."""
        fields = self._fields
        if fields is None:
            return has_text(self.raw)
        if fields[2] or fields[3]:
            return True
        return any(d.arguments for d in fields[4])

    def __repr__(self) -> str:
        index, _, content, reasoning, calls, finish, usage = self._fields or self._parse()
        return (
            f"ChatCompletionChunk(index={index!r}, content={content!r}, reasoning_content={reasoning!r}, "
            f"tool_calls={list(calls)!r}, finish_reason={finish!r}, usage={usage!r})"
        )


def has_text(raw: dict[str, Any]) -> bool:
    """`ChatCompletionChunk(raw).has_text` without the chunk: a timing loop asks it of every event.

    The usual token event answers from its content alone; any other shape is parsed in full
    (and a malformed one raises `IncompleteResponseError`).
    """
    choices = raw.get("choices")
    if type(choices) is list:
        if not choices:  # the usage event
            return False
        choice = choices[0]
        delta = choice.get("delta") if type(choice) is dict else None
        if type(delta) is dict:
            content = delta.get("content")
            if type(content) is str and content:
                return True
            # The role event and the finish event: {role?, content: ""} carry no text.
            if delta.keys() <= _NO_TEXT_KEYS and {type(v) for v in delta.values()} <= STR_OR_NONE:
                return False
    _, _, content, reasoning, calls, _, _ = _parse_fields(raw)
    return bool(content or reasoning or any(d.arguments for d in calls))


def event_usage(raw: dict[str, Any]) -> Usage | None:
    """`ChatCompletionChunk(raw).usage` without the chunk (None for most events)."""
    usage = raw.get("usage")
    return None if usage is None else parse_usage(usage)


def parse_chunk(raw: Any) -> ChatCompletionChunk:
    """A chunk with every field checked now (raises `IncompleteResponseError` if malformed)."""
    if type(raw) is not dict:
        raise bad_type("a stream event", raw, "a JSON object")
    chunk = ChatCompletionChunk(raw)
    chunk._parse()
    return chunk


def _parse_fields(raw: dict[str, Any]) -> _Fields:
    usage = raw.get("usage")
    if usage is not None:
        usage = parse_usage(usage)
    choices = raw.get("choices")
    if not choices:  # the usage chunk: "choices": []
        return (*_USAGE_ONLY, usage)
    choice = choices[0] if type(choices) is list else None
    if type(choice) is not dict:
        raise bad_type("chunk choices", choices, "a list of objects")
    delta = choice.get("delta") or {}
    if type(delta) is not dict:
        raise bad_type("delta", delta, "an object")
    finish = choice.get("finish_reason")
    if finish is not None and type(finish) is not str:
        raise bad_type("finish_reason", finish, "a string or null")
    content = delta.get("content")
    if content is not None and type(content) is not str:
        raise bad_type("delta.content", content, "a string or null")
    index = choice.get("index", 0)
    if type(index) is not int:
        raise bad_type("choices[0].index", index, "an integer")
    if len(delta) == 1 and content is not None:  # the usual token delta: {"content": "..."}
        return index, None, content, None, (), finish, usage
    reasoning = reasoning_of(delta)
    if reasoning is not None and type(reasoning) is not str:
        raise bad_type("delta.reasoning", reasoning, "a string or null")
    tool_calls = delta.get("tool_calls")
    deltas = _tool_call_deltas(tool_calls) if tool_calls else ()
    return index, delta.get("role"), content, reasoning, deltas, finish, usage


def _tool_call_deltas(value: Any) -> list[ToolCallDelta]:
    # An empty list counts as none (vLLM <= 0.23 sends `tool_calls: []` on plain deltas).
    if not isinstance(value, list):
        raise bad_type("delta.tool_calls", value, "a list")
    deltas = []
    for position, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad_type(f"delta.tool_calls[{position}]", item, "an object")
        where = f"delta.tool_calls[{position}]"
        fn = item.get("function") or {}
        if not isinstance(fn, dict):
            raise bad_type(where + ".function", fn, "an object")
        arguments = fn.get("arguments")
        if arguments is not None and not isinstance(arguments, str):
            arguments = orjson.dumps(arguments).decode()
        index = item.get("index", position)
        if type(index) is not int:
            raise bad_type(where + ".index", index, "an integer")
        deltas.append(
            ToolCallDelta(
                index=index,
                id=opt_str(item.get("id"), where + ".id"),
                type=opt_str(item.get("type"), where + ".type"),
                name=opt_str(fn.get("name"), where + ".function.name"),
                arguments=arguments,
            )
        )
    return deltas

"""The SSE decoder gives the same events however the bytes are split across reads."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchgen.chunks import ChatCompletionChunk, event_usage, has_text, parse_chunk
from batchgen.errors import IncompleteResponseError
from batchgen.sse import SSEDecoder
from batchgen.types import Usage

STREAM = (
    'data: {"choices":[{"delta":{"content":"Grüße "}}]}\n\n'
    ": a comment line\n"
    'data: {"choices":[{"delta":{"content":"日本"}}]}\r\n\r\n'
    "event: ignored\n"
    'data: {"a":\ndata: 1}\n\n'
    "data: [DONE]\n\n"
).encode()
EXPECTED = [
    '{"choices":[{"delta":{"content":"Grüße "}}]}'.encode(),
    '{"choices":[{"delta":{"content":"日本"}}]}'.encode(),
    b'{"a":\n1}',
    b"[DONE]",
]


def _decode(pieces: list[bytes]) -> list[bytes]:
    decoder = SSEDecoder()
    events = []
    for piece in pieces:
        events.extend(decoder.feed(piece))
    events.extend(decoder.flush())
    return events


def test_whole_stream() -> None:
    assert _decode([STREAM]) == EXPECTED


def test_byte_by_byte() -> None:
    assert _decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_any_split(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    pieces = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert _decode(pieces) == EXPECTED


def test_flush_returns_a_last_event_without_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: [DONE]") == []
    assert decoder.flush() == [b"[DONE]"]


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, False),
        ({"choices": [{"index": 0, "delta": {"content": " word"}}]}, True),
        ({"choices": [{"index": 0, "delta": {"reasoning": "think"}}]}, True),
        ({"choices": [{"index": 0, "delta": {"reasoning_content": "think"}}]}, True),
        ({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}]}, True),
        ({"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]}, False),
        ({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}, False),
    ],
)
def test_has_text_on_raw_events_agrees_with_the_chunk(event: dict[str, Any], expected: bool) -> None:
    assert has_text(event) is expected
    assert ChatCompletionChunk(event).has_text is expected  # unparsed: the same fast path
    assert parse_chunk(event).has_text is expected  # parsed: from the checked fields


def test_has_text_and_event_usage_reject_malformed_events() -> None:
    with pytest.raises(IncompleteResponseError, match="delta.content"):
        has_text({"choices": [{"index": 0, "delta": {"content": 5}}]})
    with pytest.raises(IncompleteResponseError, match="usage"):
        event_usage({"choices": [], "usage": [1, 2]})
    assert event_usage({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}) == Usage(3, 2, 5)
    assert event_usage({"choices": [{"index": 0, "delta": {"content": "x"}}]}) is None

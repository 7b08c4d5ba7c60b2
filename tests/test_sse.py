"""The SSE decoder gives the same events however the bytes are split across reads."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from batchgen.sse import SSEDecoder

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

"""Twin tests (STYLE.md (c)): each measured fast path gives the same result as the careful path it
short-cuts, on generated inputs shaped like what servers really send (wire-format.md §2).

- `chunks.has_text(raw)` vs the full `_parse_fields` (and `_parse_fields`' own one-key shortcut);
- `StreamAssembler._add_token` vs the same stream assembled with the shortcut turned off;
- `SSEDecoder.feed`'s one-split path vs `_payload`, and vs a reference decoder written from the SSE spec;
- `rows._clean_message` vs `_drop_nulls`; `validate_messages`' one-test pass vs `_check_message`.
(`parsing._choice` vs `_checked_choice` lives in test_answer_fields.py.)
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batchgen.chunks import ChatCompletionChunk, _parse_fields, has_text, parse_chunk
from batchgen.errors import ValidationError
from batchgen.rows import _clean_message, _drop_nulls, _usual_messages
from batchgen.sse import SSEDecoder, StreamAssembler, _payload
from batchgen.validation import ROLES, _check_message, validate_messages

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HEAD = {"id": "chatcmpl-5d1f0c2e", "object": "chat.completion.chunk", "created": 1771432015, "model": "qwen3-8b"}
TEXT = st.text(max_size=6)
PIECE = st.one_of(st.just(""), TEXT, st.sampled_from(["\n\n", "Paris", " is", "é", "日本", '{"city": "', '"}']))
FINISH = st.sampled_from(["stop", "length", "tool_calls", "abort", "repetition"])
STOP_REASON = st.one_of(st.none(), st.just("###"), st.integers(0, 200_000))
USAGE = st.builds(
    lambda p, c, cached, reasoning: {
        "prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c,
        **({"prompt_tokens_details": {"cached_tokens": cached}} if cached is not None else {}),
        **({"completion_tokens_details": {"reasoning_tokens": reasoning}} if reasoning is not None else {}),
    },
    st.integers(0, 5000), st.integers(0, 500), st.none() | st.integers(0, 5000), st.none() | st.integers(0, 500),
)  # fmt: skip


def _logprobs(token: str) -> dict[str, Any]:
    entry = {"token": token, "logprob": -0.25, "bytes": list(token.encode())}
    return {"content": [{**entry, "top_logprobs": [entry, {"token": "x", "logprob": -3.0, "bytes": [120]}]}]}


# ---------------------------------------------------------------- deltas, as each vLLM era (and llama.cpp) sends them

ROLE_DELTAS: st.SearchStrategy[dict[str, Any]] = st.sampled_from([
    {"role": "assistant", "content": ""},  # vLLM
    {"role": "assistant", "content": "", "reasoning_content": None},  # vLLM v0.12 - v0.15
    {"role": "assistant"},  # llama.cpp
])  # fmt: skip
CONTENT_DELTAS = st.one_of(
    st.builds(lambda t: {"content": t}, PIECE),
    st.builds(lambda t: {"content": t, "reasoning_content": None}, PIECE),  # v0.12 - v0.15
    st.builds(lambda t: {"content": t, "tool_calls": []}, PIECE),  # <= v0.23 parsers
)
REASONING_DELTAS = st.one_of(
    st.builds(lambda t: {"reasoning_content": t}, PIECE),  # <= v0.11
    st.builds(lambda t: {"reasoning": t, "reasoning_content": t}, PIECE),  # v0.12 - v0.15
    st.builds(lambda t: {"reasoning": t}, PIECE),  # v0.16+
    st.builds(lambda r, c: {"reasoning": r, "content": c}, PIECE, PIECE),  # the </think> boundary
)


def _tool_header(index: int, name: str, arguments: str | None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if arguments is not None:  # harmony / named tool choice send "" or a first piece in the header
        function["arguments"] = arguments
    return {"tool_calls": [{"id": f"chatcmpl-tool-{index}", "type": "function", "index": index, "function": function}]}


def _tool_piece(index: int, arguments: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}


def _llama_tool(index: int, name: str, arguments: str) -> dict[str, Any]:
    # llama.cpp repeats id and name in every piece.
    return {"tool_calls": [{"index": index, "id": f"call_{index}", "type": "function",
                            "function": {"name": name, "arguments": arguments}}]}  # fmt: skip


TOOL_INDEX = st.integers(0, 2)
NAME = st.sampled_from(["get_weather", "get_time"])
TOOL_DELTAS = st.one_of(
    st.builds(_tool_header, TOOL_INDEX, NAME, st.none() | PIECE),
    st.builds(_tool_piece, TOOL_INDEX, PIECE),
    st.builds(_llama_tool, TOOL_INDEX, NAME, PIECE),
    st.builds(lambda i, a: {"tool_calls": [{"index": i, "function": {"arguments": {"city": a}}}]}, TOOL_INDEX, PIECE),
)
ANY_DELTA = st.one_of(ROLE_DELTAS, CONTENT_DELTAS, CONTENT_DELTAS, REASONING_DELTAS, TOOL_DELTAS, st.just({}))


@st.composite
def chunks(draw: st.DrawFn) -> dict[str, Any]:
    """One event of a stream: a choice chunk (any delta) or the final usage chunk."""
    if draw(st.integers(0, 9)) == 0:
        return {**HEAD, "choices": [], "usage": draw(USAGE)}
    delta = draw(ANY_DELTA)
    choice: dict[str, Any] = {"index": draw(st.integers(0, 2)), "delta": delta,
                              "logprobs": draw(st.none() | st.just(_logprobs("a"))),
                              "finish_reason": draw(st.none() | FINISH)}  # fmt: skip
    if choice["finish_reason"] is not None:
        choice["stop_reason"] = draw(STOP_REASON)
    if draw(st.booleans()):
        choice["token_ids"] = None  # ~v0.10.2+
    event = {**HEAD, "choices": [choice]}
    if draw(st.integers(0, 4)) == 0:
        event["usage"] = draw(USAGE)  # continuous_usage_stats
    return event


# ---------------------------------------------------------------- chunks.has_text


def _careful_has_text(raw: dict[str, Any]) -> bool:
    _, _, content, reasoning, calls, _, _ = _parse_fields(raw)
    return bool(content or reasoning or any(d.arguments for d in calls))


@FAST
@given(chunks())
def test_has_text_equals_the_full_parse(raw: dict[str, Any]) -> None:
    expected = _careful_has_text(raw)
    assert has_text(raw) is expected
    assert ChatCompletionChunk(raw).has_text is expected  # unparsed chunk: the fast function
    assert parse_chunk(raw).has_text is expected  # parsed chunk: from the checked fields


def _plain_reading(raw: dict[str, Any]) -> tuple[Any, ...]:
    """What a chunk says, read key by key with no shortcut (for well-formed chunks)."""
    if not raw["choices"]:
        return None, None, None, None, [], None, raw.get("usage")
    choice = raw["choices"][0]
    delta = choice["delta"]
    reasoning = delta.get("reasoning") if delta.get("reasoning") is not None else delta.get("reasoning_content")
    arguments = []
    for call in delta.get("tool_calls") or []:
        value = call["function"].get("arguments")
        arguments.append(value if value is None or isinstance(value, str) else orjson.dumps(value).decode())
    return (choice["index"], delta.get("role"), delta.get("content"), reasoning, arguments, choice["finish_reason"],
            raw.get("usage"))  # fmt: skip


@FAST
@given(chunks())
def test_parse_fields_and_its_one_key_shortcut_equal_a_plain_reading(raw: dict[str, Any]) -> None:
    index, role, content, reasoning, calls, finish, usage = _parse_fields(raw)
    got = (index, role, content, reasoning, [d.arguments for d in calls], finish, None if usage is None else usage.to_wire())
    assert got == _plain_reading(raw)
    _, _, content, reasoning, arguments, _, _ = _plain_reading(raw)
    assert has_text(raw) is bool(content or reasoning or any(arguments))


def test_has_text_answers_plain_token_chunks_without_the_full_parse(monkeypatch: Any) -> None:
    # So the twin above compares two different paths: the usual events never reach _parse_fields.
    import batchgen.chunks as chunks_module

    def fail(raw: Any) -> Any:
        raise AssertionError("the careful path was taken")

    monkeypatch.setattr(chunks_module, "_parse_fields", fail)
    assert has_text({**HEAD, "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}) is True
    assert has_text({**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}) is False
    assert has_text({**HEAD, "choices": [], "usage": {"prompt_tokens": 1}}) is False


# ---------------------------------------------------------------- StreamAssembler._add_token


class _Careful(StreamAssembler):
    __slots__ = ()

    def _add_token(self, choice: Any) -> bool:
        return False  # every chunk takes the careful path


class _Counting(StreamAssembler):
    __slots__ = ("fast",)

    def __init__(self) -> None:
        super().__init__()
        self.fast = 0

    def _add_token(self, choice: Any) -> bool:
        taken = super()._add_token(choice)
        self.fast += taken
        return taken


@st.composite
def _choice_events(draw: st.DrawFn, index: int, continuous: bool) -> list[dict[str, Any]]:
    """One choice's events in order: role chunk, pieces, finish chunk (vLLM's order, n >= 1)."""
    deltas: list[dict[str, Any]] = []
    if draw(st.integers(0, 5)) > 0:
        deltas.append(draw(ROLE_DELTAS))
    kind = draw(st.sampled_from(["content", "reasoning", "tools", "mixed"]))
    body = {"content": CONTENT_DELTAS, "reasoning": st.one_of(REASONING_DELTAS, CONTENT_DELTAS),
            "tools": st.one_of(TOOL_DELTAS, CONTENT_DELTAS), "mixed": ANY_DELTA}[kind]  # fmt: skip
    deltas += draw(st.lists(body, max_size=12))
    events = []
    for delta in deltas:
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        if "content" in delta and len(delta) == 1 and draw(st.integers(0, 3)) == 0:
            choice["logprobs"] = _logprobs(delta["content"] or "-")  # logprobs asked for
        if draw(st.booleans()):
            choice["token_ids"] = None
        events.append(choice)
    last = draw(st.sampled_from([{}, {"content": ""}]) | CONTENT_DELTAS | st.builds(_tool_piece, TOOL_INDEX, PIECE))
    events.append({"index": index, "delta": last, "logprobs": None, "finish_reason": draw(FINISH),
                   "stop_reason": draw(STOP_REASON)})  # fmt: skip
    completion = 0
    wrapped = []
    for choice in events:
        event: dict[str, Any] = {**HEAD, "choices": [choice]}
        if continuous:
            event["usage"] = {"prompt_tokens": 9, "total_tokens": 9 + completion, "completion_tokens": completion}
            completion += 1
        wrapped.append(event)
    return wrapped


@st.composite
def streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A whole stream: n choices interleaved in any order, then (maybe) the usage chunk."""
    n = draw(st.integers(1, 3))
    continuous = draw(st.integers(0, 4)) == 0
    per_choice = [draw(_choice_events(i, continuous)) for i in range(n)]
    order = draw(st.permutations([i for i, events in enumerate(per_choice) for _ in events]))
    cursors = [0] * n
    merged = []
    for i in order:
        merged.append(per_choice[i][cursors[i]])
        cursors[i] += 1
    if draw(st.booleans()):
        merged.append({**HEAD, "choices": [], "usage": draw(USAGE)})
    return merged


A = TypeVar("A", bound=StreamAssembler)


def _assemble(assembler: A, events: list[dict[str, Any]]) -> A:
    for event in events:
        assembler.add(ChatCompletionChunk(orjson.loads(orjson.dumps(event))))  # a fresh decode, as off the wire
    return assembler


_LLAMA_EMPTY = [  # llama.cpp: a role chunk without content, then only empty tokens
    {**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
    {**HEAD, "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]},
    {**HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
]


@FAST
@given(streams())
@example(_LLAMA_EMPTY)
def test_the_assembler_fast_token_path_equals_the_careful_path(events: list[dict[str, Any]]) -> None:
    fast = _assemble(StreamAssembler(), events).response()
    careful = _assemble(_Careful(), events).response()
    assert fast.choices == careful.choices
    assert fast.usage == careful.usage
    assert (fast.id, fast.model, fast.created) == (careful.id, careful.model, careful.created)
    assert fast.raw == careful.raw


def test_a_plain_stream_takes_the_fast_token_path() -> None:
    # So the twin above compares two different paths.
    events = [{**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    events += [{**HEAD, "choices": [{"index": 0, "delta": {"content": t}, "logprobs": None, "finish_reason": None}]}
               for t in ("Par", "is", "")]  # fmt: skip
    events.append({**HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": None}]})
    assembler = _assemble(_Counting(), events)
    assert assembler.fast == 3
    assert assembler.response().content == "Paris"


# ---------------------------------------------------------------- SSEDecoder.feed


PAYLOAD = st.one_of(
    st.just(b"[DONE]"),
    st.builds(lambda e: orjson.dumps({**HEAD, "choices": [e]}), st.fixed_dictionaries({"index": st.just(0), "delta": CONTENT_DELTAS})),
    st.builds(orjson.dumps, st.dictionaries(st.text(max_size=3), st.text(max_size=5) | st.integers(-10**6, 10**6), max_size=3)),
    st.builds(lambda m: f'{{"error": {{"message": "{m}", "code": 500}}}}'.encode(), st.sampled_from(["x", "Gr\\u00fc\\u00dfe"])),
)
DATA_LINE = st.one_of(
    st.builds(lambda p: b"data: " + p, PAYLOAD),
    st.builds(lambda p: b"data:" + p, PAYLOAD),  # no space
    st.builds(lambda p: b"data:  " + p, PAYLOAD),  # two spaces: one is part of the value
    st.sampled_from([b"data:", b"data: "]),  # an empty data line
)
OTHER_LINE = st.sampled_from([b": keep-alive", b":", b"event: message", b"event:error", b"id: 7", b"retry: 1000", b"x-unknown: 1"])
PLAIN_EVENT = st.builds(lambda p: [b"data: " + p], PAYLOAD)  # what vLLM sends: one `data: ` line
ODD_EVENT = st.lists(st.one_of(DATA_LINE, OTHER_LINE), min_size=1, max_size=4)
EOL = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """Complete SSE bytes (every event ends with a blank line) and the same bytes cut into reads."""
    events = draw(st.lists(st.one_of(PLAIN_EVENT, PLAIN_EVENT, ODD_EVENT), max_size=8))
    mixed = draw(st.integers(0, 3)) == 0
    stream_eol = draw(st.sampled_from([b"\n", b"\n", b"\r\n", b"\r"]))
    out = bytearray()

    def eol() -> bytes:
        if not mixed:
            return stream_eol
        # A CR then an LF would be one CRLF line end, not two: after a CR, no bare LF.
        return draw(st.sampled_from([b"\r", b"\r\n"]) if out.endswith(b"\r") else EOL)

    for lines in events:
        for line in lines:
            out += line
            out += eol()
        out += eol()  # the blank line that ends the event
        if draw(st.integers(0, 7)) == 0:
            out += eol()  # an extra blank line
    data = bytes(out)
    if draw(st.integers(0, 9)) == 0:
        return data, [data[i : i + 1] for i in range(len(data))]  # one byte per read
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    after_cr = [i + 1 for i, byte in enumerate(data) if byte == 13]
    if after_cr:  # a read that ends between the CR and the LF of a CRLF
        cuts += draw(st.lists(st.sampled_from(after_cr), max_size=4))
    cuts = sorted(set(cuts))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return data, pieces


def _reference_decode(data: bytes) -> list[bytes]:
    """The WHATWG event-stream rules, line by line (only the `data` field matters to a chat stream)."""
    payloads: list[bytes] = []
    buffer: list[bytes] | None = None
    lines = re.split(rb"\r\n|\r|\n", data)
    for line in lines[:-1]:  # the last piece follows the last line end: nothing (the streams are complete)
        if line == b"":
            if buffer is not None:
                payloads.append(b"\n".join(buffer))
            buffer = None
        elif line.startswith(b":"):
            continue
        else:
            name, _, value = line.partition(b":")
            if name == b"data":
                buffer = [*(buffer or []), value[1:] if value.startswith(b" ") else value]
    assert lines[-1] == b""
    return payloads


def _feed(pieces: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    decoder = SSEDecoder()
    got: list[bytes] = []
    for piece in pieces:
        got += decoder.feed(piece)
    return got, decoder.flush()


@FAST
@given(sse_streams())
def test_the_decoder_gives_the_same_payloads_however_the_stream_is_cut(stream: tuple[bytes, list[bytes]]) -> None:
    data, pieces = stream
    expected = _reference_decode(data)
    whole, whole_rest = _feed([data])
    cut, cut_rest = _feed(pieces)
    assert whole + whole_rest == expected
    assert cut + cut_rest == expected
    assert (cut, cut_rest) == (whole, whole_rest)


@FAST
@given(st.lists(st.one_of(PLAIN_EVENT, PLAIN_EVENT, ODD_EVENT), max_size=8), st.booleans())
def test_the_one_split_fast_path_equals_payload_per_event(events: list[list[bytes]], extra_blank: bool) -> None:
    # One LF-only read holding whole events: the fast slice path vs `_payload` on each event.
    data = b"".join(b"".join(line + b"\n" for line in lines) + b"\n" + (b"\n" if extra_blank else b"") for lines in events)
    careful = [p for p in map(_payload, data.split(b"\n\n")[:-1]) if p is not None]
    assert SSEDecoder().feed(data) == careful


def test_plain_events_take_the_one_split_path(monkeypatch: Any) -> None:
    # So the twins above compare two different paths: vLLM's events never reach `_payload`.
    import batchgen.sse as sse_module

    def fail(event: bytes) -> Any:
        raise AssertionError("the careful path was taken")

    monkeypatch.setattr(sse_module, "_payload", fail)
    assert SSEDecoder().feed(b'data: {"a":1}\n\ndata: [DONE]\n\n') == [b'{"a":1}', b"[DONE]"]


# ---------------------------------------------------------------- rows._clean_message

MAYBE_TEXT = st.none() | st.text(max_size=4)
PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"])},
    optional={"text": MAYBE_TEXT, "image_url": st.none() | st.fixed_dictionaries({"url": st.text(max_size=4)},
                                                                                 optional={"detail": MAYBE_TEXT})},
)  # fmt: skip
TOOL_CALL = st.fixed_dictionaries({
    "id": MAYBE_TEXT, "type": st.none() | st.just("function"),
    "function": st.fixed_dictionaries({"name": st.text(max_size=3), "arguments": MAYBE_TEXT}),
})  # fmt: skip
MESSAGE = st.fixed_dictionaries(
    {"role": st.none() | st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"]),
     "content": st.one_of(MAYBE_TEXT, st.lists(PART, max_size=3))},
    optional={"name": MAYBE_TEXT, "tool_call_id": MAYBE_TEXT, "tool_calls": st.none() | st.lists(TOOL_CALL, max_size=2),
              "weight": st.none() | st.integers() | st.booleans() | st.floats(allow_nan=False)},
)  # fmt: skip
# What a messages column holds per item: a message (Arrow struct or JSON object), or junk.
MESSAGE_ITEM = st.one_of(MESSAGE, MESSAGE, st.none(), st.text(max_size=4), st.integers())


@FAST
@given(MESSAGE_ITEM)
def test_clean_message_equals_drop_nulls(message: Any) -> None:
    assert _clean_message(message) == _drop_nulls(message)


@FAST
@given(st.lists(MESSAGE_ITEM, max_size=5))
def test_a_cleaned_conversation_equals_drop_nulls_of_the_list(messages: list[Any]) -> None:
    assert [_clean_message(m) for m in messages] == _drop_nulls(messages)


def test_the_usual_message_is_kept_without_a_copy() -> None:
    # So the twin above compares two different paths.
    message = {"role": "user", "content": "hi"}
    assert _clean_message(message) is message
    assert _clean_message({"role": "user", "content": "hi", "name": None}) == {"role": "user", "content": "hi"}


# ---------------------------------------------------------------- validation: the one-test pass of usual messages


def _outcome(check: Any) -> str | None:
    try:
        check()
    except ValidationError as exc:
        return str(exc)
    return None


@FAST
@given(MESSAGE_ITEM)
def test_validate_messages_fast_pass_equals_the_full_check(message: Any) -> None:
    cleaned = _drop_nulls(message)
    assert _outcome(lambda: validate_messages([cleaned])) == _outcome(lambda: _check_message(cleaned, "messages[0]"))


# ---------------------------------------------------------------- rows._usual_messages: clean and valid in one pass


@FAST
@given(st.lists(MESSAGE_ITEM, max_size=4))
def test_a_usual_conversation_needs_no_cleaning_and_passes_the_full_check(messages: list[Any]) -> None:
    if _usual_messages(messages):
        assert _drop_nulls(messages) == messages
        assert _outcome(lambda: validate_messages(messages)) is None
        assert all(_outcome(lambda m=m, i=i: _check_message(m, f"messages[{i}]")) is None
                   for i, m in enumerate(messages))  # fmt: skip


@FAST
@given(st.lists(st.fixed_dictionaries({"role": st.sampled_from(sorted(ROLES)), "content": st.text(max_size=4)}),
                min_size=1, max_size=4))  # fmt: skip
def test_role_and_text_content_conversations_take_the_one_pass(messages: list[dict[str, str]]) -> None:
    assert _usual_messages(messages)
    assert not _usual_messages([*messages, {"role": "user", "content": "x", "name": None}])
    assert not _usual_messages([*messages, {"role": "robot", "content": "x"}])
    assert not _usual_messages([])

"""Nothing the server sends that a row asked for is lost: every choice, logprobs, stop_reason and
the usage details, plain or streamed, parsed alike and stored in the typed output columns."""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchgen.chunks import ChatCompletionChunk
from batchgen.io.schema import output_schema, state_schema
from batchgen.parsing import _checked_choice, _choice, parse_completion
from batchgen.errors import IncompleteResponseError
from batchgen.records import Outcome, RowRequest, outcome_record, read_answer, response_columns
from batchgen.sse import StreamAssembler
from batchgen.types import ChatCompletionResponse, Reply


def _entry(token: str, logprob: float, tops: int) -> dict[str, Any]:
    top = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
    top += [{"token": f"alt{i}", "logprob": logprob - 1 - i, "bytes": None} for i in range(tops - 1)]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": top}


# Two choices as (tokens, finish_reason, stop_reason): one cut by a stop string, one by a stop token id.
ANSWERS = [(["Paris", " is", " nice"], "stop", "###"), (["Lyon", "é"], "stop", 128009)]
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
         "prompt_tokens_details": {"cached_tokens": 8}, "completion_tokens_details": {"reasoning_tokens": 2}}


def _plain_body() -> dict[str, Any]:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": "".join(tokens), "tool_calls": []},
         "logprobs": {"content": [_entry(t, -0.5 * (k + 1), 2) for k, t in enumerate(tokens)]},
         "finish_reason": finish, "stop_reason": stop}
        for i, (tokens, finish, stop) in enumerate(ANSWERS)
    ]
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "choices": choices,
            "usage": USAGE}


def _stream_events() -> list[dict[str, Any]]:
    """The same answer as vLLM streams it: one choice per chunk, choices interleaved, usage last."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None}]}
              for i in range(len(ANSWERS))]
    longest = max(len(tokens) for tokens, _, _ in ANSWERS)
    for k in range(longest):
        for i, (tokens, _, _) in enumerate(ANSWERS):
            if k < len(tokens):
                choice = {"index": i, "delta": {"content": tokens[k]},
                          "logprobs": {"content": [_entry(tokens[k], -0.5 * (k + 1), 2)]}, "finish_reason": None}
                events.append({**head, "choices": [choice]})
    for i, (_, finish, stop) in enumerate(ANSWERS):
        choice = {"index": i, "delta": {}, "logprobs": None, "finish_reason": finish, "stop_reason": stop}
        events.append({**head, "choices": [choice]})
    events.append({**head, "choices": [], "usage": USAGE})
    return events


def _assembled() -> ChatCompletionResponse:
    assembler = StreamAssembler()
    for event in _stream_events():
        assembler.add(ChatCompletionChunk(orjson.loads(orjson.dumps(event))))
    return assembler.response()


def test_plain_answer_keeps_every_choice_logprobs_stop_reason_and_usage_details() -> None:
    response = parse_completion(_plain_body())
    assert [c.content for c in response.choices] == ["Paris is nice", "Lyoné"]
    assert [c.stop_reason for c in response.choices] == ["###", 128009]
    assert response.stop_reason == "###"
    logprobs = response.logprobs
    assert logprobs is not None
    assert "".join(t.token for t in logprobs) == "Paris is nice"
    assert [t.logprob for t in logprobs] == [-0.5, -1.0, -1.5]
    assert [[(a.token, a.logprob) for a in t.top_logprobs] for t in logprobs][0] == [("Paris", -0.5), ("alt0", -1.5)]
    assert response.usage is not None
    assert (response.usage.cached_tokens, response.usage.reasoning_tokens) == (8, 2)


def test_a_stream_gives_the_same_values_as_the_plain_answer() -> None:
    plain, streamed = parse_completion(_plain_body()), _assembled()
    assert streamed.choices == plain.choices
    assert streamed.usage == plain.usage
    # The assembled raw keeps the same shape, so --keep-raw holds the logprobs and details too.
    raw_choice = streamed.raw["choices"][1]
    assert raw_choice["stop_reason"] == 128009 and len(raw_choice["logprobs"]["content"]) == 2
    assert streamed.raw["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}


def test_malformed_logprobs_name_the_field() -> None:
    body = _plain_body()
    body["choices"][0]["logprobs"]["content"][1]["logprob"] = "low"
    with pytest.raises(Exception, match=r"choices\[0\]\.logprobs\.content\[1\]\.logprob is str"):
        parse_completion(body)


def _record(answer: dict[str, Any] | ChatCompletionResponse, keep_raw: bool = False) -> dict[str, Any]:
    """A run's record of `answer` (a decoded body, or an assembled stream), as the pipeline makes it."""
    if isinstance(answer, ChatCompletionResponse):  # as Client.exchange replies for a stream
        reply = Reply(read_answer(answer), 1, 0.1, answer.ttft_s, None, answer.raw)
    else:
        reply = Reply(read_answer(answer), 1, 0.1, None, orjson.dumps(answer))
    outcome = Outcome(RowRequest(0, "r0", {}), reply, None, 1, 0.1)
    return outcome_record(outcome, keep_raw=keep_raw)  # type: ignore[return-value]


def _store(record: dict[str, Any]) -> dict[str, Any]:
    """Round-trip one record through the part-file schema, as the writer does."""
    schema, _ = output_schema(pa.schema([]))
    return pa.Table.from_pylist([record], schema=state_schema(schema)).to_pylist()[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("streamed", [False, True])
def test_records_hold_every_choice_and_fit_the_schema(streamed: bool) -> None:
    row = _store(_record(_assembled() if streamed else _plain_body(), keep_raw=True))
    assert row["content"] == "Paris is nice" and row["stop_reason"] == "###"
    assert [t["token"] for t in row["logprobs"]] == ["Paris", " is", " nice"]
    assert row["logprobs"][0]["top_logprobs"] == [{"token": "Paris", "logprob": -0.5}, {"token": "alt0", "logprob": -1.5}]
    assert [c["index"] for c in row["choices"]] == [0, 1]
    assert [c["content"] for c in row["choices"]] == ["Paris is nice", "Lyoné"]
    assert row["choices"][1]["stop_reason"] == "128009"  # a stop token id, stored as text
    assert [t["token"] for t in row["choices"][1]["logprobs"]] == ["Lyon", "é"]
    assert row["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                            "cached_tokens": 8, "reasoning_tokens": 2}
    raw = orjson.loads(row["raw"])
    assert [c["index"] for c in raw["choices"]] == [0, 1]


def test_a_single_choice_leaves_choices_null_and_raw_needs_keep_raw() -> None:
    body = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
    row = _store(_record(body))
    assert row["choices"] is None and row["logprobs"] is None and row["stop_reason"] is None and row["raw"] is None
    assert row["usage"] is None
    assert orjson.loads(_store(_record(body, keep_raw=True))["raw"]) == body  # the body as received


# ---------------------------------------------------------------- twin test of the parsing fast path

_text = st.one_of(st.none(), st.text(max_size=5))
_choices = st.fixed_dictionaries(
    {"message": st.fixed_dictionaries({"role": _text, "content": _text},
                                      optional={"reasoning": _text, "reasoning_content": _text,
                                                "tool_calls": st.just([])})},
    optional={"index": st.integers(0, 3), "finish_reason": _text,
              "stop_reason": st.one_of(st.none(), st.text(max_size=3), st.integers(0, 10**6)),
              "logprobs": st.one_of(st.none(), st.just({"content": [_entry("a", -0.1, 1)]}))},
)


@given(_choices)
def test_fast_choice_parse_equals_the_careful_one(value: dict[str, Any]) -> None:
    assert _choice(value, 0) == _checked_choice(value, 0)


# ------------------------------------------------------- twin test of the record fast path (read_answer)

_odd = st.one_of(st.none(), st.integers(-2, 2), st.booleans(), st.text(max_size=3), st.just([]), st.just({}))


def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` nine times in ten, else an odd value: most bodies reach the fast path, some are malformed."""
    return st.integers(0, 9).flatmap(lambda n: _odd if n == 0 else valid)


_usage = st.one_of(
    st.none(),
    _mostly(st.fixed_dictionaries({}, optional={
        "prompt_tokens": _mostly(st.integers(0, 99)), "completion_tokens": _mostly(st.integers(0, 99)),
        "total_tokens": st.integers(0, 99),
        "prompt_tokens_details": st.one_of(st.none(), st.fixed_dictionaries({"cached_tokens": st.integers(0, 9)})),
        "completion_tokens_details": st.one_of(st.none(), _odd)})),
)  # fmt: skip
_message = st.fixed_dictionaries(
    {}, optional={"role": _mostly(_text), "content": _mostly(_text), "reasoning": _text, "reasoning_content": _text,
                  "tool_calls": _mostly(st.one_of(st.none(), st.just([])))},
)  # fmt: skip
_choice_body = _mostly(
    st.fixed_dictionaries({"message": _mostly(_message)}, optional={
        "index": _mostly(st.integers(0, 3)), "finish_reason": _mostly(_text),
        "stop_reason": _mostly(st.one_of(_text, st.integers(0, 10**6))),
        "logprobs": _mostly(st.one_of(st.none(), st.just({"content": [_entry("a", -0.1, 1)]})))}),
)  # fmt: skip
_bodies = _mostly(
    st.fixed_dictionaries({"choices": _mostly(st.lists(_choice_body, min_size=1, max_size=2))}, optional={
        "id": _mostly(_text), "object": _text, "created": _mostly(st.integers(0, 9)), "model": _mostly(_text),
        "usage": _usage}),
)  # fmt: skip


def _careful_columns(body: Any) -> dict[str, Any] | str:
    try:
        return response_columns(parse_completion(body))
    except IncompleteResponseError as exc:
        return f"error: {exc}"


@given(_bodies)
def test_fast_record_read_equals_the_careful_one(body: Any) -> None:
    try:
        fast: dict[str, Any] | str = read_answer(body)
    except IncompleteResponseError as exc:
        fast = f"error: {exc}"
    assert fast == _careful_columns(body)

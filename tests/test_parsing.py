"""`batchgen.parsing`: every era's answer parses alike, a malformed one names the bad field, and any
error body a server or proxy sends becomes a readable status error."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import orjson
import pytest

from batchgen.errors import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    IncompleteResponseError,
    NotFoundError,
    RateLimitError,
    ServerError,
    UnprocessableEntityError,
)
from batchgen.parsing import (
    error_from_body,
    error_from_event,
    parse_completion,
    parse_logprobs,
    parse_usage,
    stop_reason,
)
from batchgen.types import Choice, Function, TokenLogprob, ToolCall, TopLogprob, Usage

from .conftest import FIXTURES

MANIFEST: dict[str, Any] = json.loads((FIXTURES / "manifest.json").read_text())
ANSWERS = sorted(n for n in MANIFEST if n.endswith(".json") and n.startswith("chat_"))
ERRORS = sorted(n for n in MANIFEST if n.startswith("error_"))


# ---------------------------------------------------------------- recorded answers of every era


@pytest.mark.parametrize("name", ANSWERS)
def test_recorded_answer_parses_as_the_manifest_says(name: str) -> None:
    expect = MANIFEST[name]["expect"]
    raw = json.loads((FIXTURES / name).read_text())
    response = parse_completion(raw)
    assert response.raw is raw
    assert (response.id, response.object, response.created, response.model) == (
        raw["id"], "chat.completion", raw["created"], raw["model"]
    )  # fmt: skip
    assert response.content == expect["content"]
    assert response.reasoning_content == expect["reasoning"]
    assert response.finish_reason == expect["finish_reason"]
    assert [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in response.tool_calls] == (
        expect["tool_calls"]
    )
    usage = response.usage
    assert usage is not None
    assert {k: v for k, v in usage.to_dict().items() if k != "reasoning_tokens"} == expect["usage"]
    assert response.stop_reason == expect.get("stop_reason")
    if "logprob_tokens" in expect:
        assert response.logprobs is not None
        assert [t.token for t in response.logprobs] == expect["logprob_tokens"]
    else:
        assert response.logprobs is None


def test_the_stop_string_fixture_keeps_every_logprob_value() -> None:
    response = parse_completion(json.loads((FIXTURES / "chat_stop_string_logprobs_response.json").read_text()))
    assert response.logprobs == [
        TokenLogprob("Yes", -0.0031, [89, 101, 115], [TopLogprob("Yes", -0.0031, [89, 101, 115]), TopLogprob("No", -5.9, [78, 111])]),
        TokenLogprob(".", -0.2107, [46], [TopLogprob(".", -0.2107, [46]), TopLogprob("!", -1.66, [33])]),
    ]  # fmt: skip
    assert response.usage == Usage(1090, 3, 1093, cached_tokens=1024)


def _answer(message: dict[str, Any], **choice: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1771432015, "model": "qwen3-8b",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "logprobs": None,
                     "finish_reason": "stop", "stop_reason": None, **choice}],
        "usage": {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("message", "content", "reasoning"),
    [
        ({"content": "a", "reasoning_content": "r"}, "a", "r"),  # v0.7.2 - v0.11
        ({"content": "a", "reasoning": "r", "reasoning_content": "r"}, "a", "r"),  # v0.12 - v0.15
        ({"content": "a", "reasoning": "r"}, "a", "r"),  # v0.16+
        ({"content": "a", "reasoning": None, "reasoning_content": "old"}, "a", "old"),
        ({"content": "a", "reasoning": "new", "reasoning_content": "old"}, "a", "new"),
        ({"content": "a", "reasoning": None, "reasoning_content": None}, "a", None),
        ({"content": "a"}, "a", None),  # no reasoning parser, or llama.cpp
        ({"content": None, "reasoning": "cut inside the thinking"}, None, "cut inside the thinking"),
        ({"content": "\n\nanswer", "reasoning": "r"}, "\n\nanswer", "r"),  # not stripped
        ({"content": ""}, "", None),
    ],
)
def test_reasoning_and_content_from_every_era(message: dict[str, Any], content: str | None, reasoning: str | None) -> None:
    response = parse_completion(_answer(message))
    assert (response.content, response.reasoning_content) == (content, reasoning)
    assert response.tool_calls == []


def test_a_2026_answer_with_extra_keys_and_reasoning_tokens() -> None:
    body = _answer({"content": "ok", "reasoning": "r", "refusal": None, "annotations": None}, token_ids=None,
                   routed_experts=None)  # fmt: skip
    body.update(system_fingerprint="vllm-0.25.0-tp2-3f9c2a1b", prompt_text=None, metrics=None)
    body["usage"] = {"prompt_tokens": 19, "total_tokens": 80, "completion_tokens": 61,
                     "prompt_tokens_details": {"cached_tokens": 16}, "completion_tokens_details": {"reasoning_tokens": 41}}  # fmt: skip
    response = parse_completion(body)
    assert response.usage == Usage(19, 61, 80, cached_tokens=16, reasoning_tokens=41)
    assert response.choices == [Choice(0, "assistant", "ok", "r", [], "stop", None, None)]


def test_a_llama_cpp_answer() -> None:
    body = {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "smollm2",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop",
                         "logprobs": {"content": [{"token": "Hi", "logprob": -0.5, "bytes": None,
                                                   "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": None}]}]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}  # fmt: skip
    response = parse_completion(body)
    assert response.stop_reason is None
    assert response.logprobs == [TokenLogprob("Hi", -0.5, None, [TopLogprob("Hi", -0.5, None)])]


def test_tool_calls_keep_their_raw_arguments() -> None:
    calls = [
        {"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}},
        {"id": "functions.g:1", "type": None, "function": {"name": "g", "arguments": "{not json"}},
        {"id": None, "function": {"name": "h", "arguments": {"parsed": ["by", "the server"]}}},
        {"function": {"name": "k", "arguments": None}},
    ]
    response = parse_completion(_answer({"content": None, "tool_calls": calls}, finish_reason="tool_calls"))
    assert response.tool_calls == [
        ToolCall("chatcmpl-tool-1", "function", Function("f", '{"city": "Paris"}')),
        ToolCall("functions.g:1", "function", Function("g", "{not json")),
        ToolCall(None, "function", Function("h", '{"parsed":["by","the server"]}')),
        ToolCall(None, "function", Function("k", "")),
    ]
    assert response.content is None and response.finish_reason == "tool_calls"


@pytest.mark.parametrize("finish", ["stop", "length", "tool_calls", "abort", "repetition", "error", "new_reason", None])
def test_any_finish_reason_is_kept_as_is(finish: str | None) -> None:
    assert parse_completion(_answer({"content": "x"}, finish_reason=finish)).finish_reason == finish


def test_several_choices_and_a_missing_index() -> None:
    body = _answer({"content": "a"})
    body["choices"].append({"message": {"role": "assistant", "content": "b"}, "finish_reason": "length"})
    body["choices"].append({"index": 7, "message": {"content": "c"}})
    response = parse_completion(body)
    assert [(c.index, c.content, c.finish_reason, c.role) for c in response.choices] == [
        (0, "a", "stop", "assistant"), (1, "b", "length", "assistant"), (7, "c", None, None)
    ]  # fmt: skip
    assert response.content == "a"


def test_optional_top_level_keys_may_be_missing_or_null() -> None:
    body: dict[str, Any] = {"choices": [{"message": {"content": "x"}}]}
    response = parse_completion(body)
    assert (response.id, response.object, response.created, response.model, response.usage) == (None,) * 5
    body.update(id=None, object=None, created=None, model=None, usage=None)
    assert parse_completion(body).content == "x"


# ---------------------------------------------------------------- malformed answers name the field


def _set(path: str, value: Any) -> dict[str, Any]:
    body = _answer({"content": "x"})
    node: Any = body
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return body


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ([], "the body is list, expected a JSON object"),
        ("x", "the body is str"),
        ({"id": "a"}, "no choices"),
        (_set("choices", []), "no choices"),
        (_set("choices", {"0": {}}), "no choices"),
        (_set("id", 5), "id is int, expected a string or null"),
        (_set("object", ["x"]), "object is list"),
        (_set("model", 1.5), "model is float"),
        (_set("created", "1771432015"), "created is str, expected an integer or null"),
        (_set("created", True), "created is bool"),
        (_set("choices.0", "x"), "choices[0] is str, expected an object"),
        (_set("choices.0.message", None), "choices[0].message is NoneType, expected an object"),
        (_set("choices.0.message", "hi"), "choices[0].message is str"),
        (_set("choices.0.index", "0"), "choices[0].index is str, expected an integer"),
        (_set("choices.0.finish_reason", 1), "choices[0].finish_reason is int, expected a string or null"),
        (_set("choices.0.message.role", 1), "choices[0].message.role is int"),
        (_set("choices.0.message.content", ["a"]), "choices[0].message.content is list, expected a string or null"),
        (_set("choices.0.message.reasoning", 5), "choices[0].message.reasoning is int"),
        (_set("choices.0.message.reasoning_content", {"a": 1}), "choices[0].message.reasoning is dict"),
        (_set("choices.0.message.tool_calls", {"a": 1}), "choices[0].message.tool_calls is dict, expected a list"),
        (_set("choices.0.message.tool_calls", [{"id": "c"}]), "choices[0].message.tool_calls[0].function is NoneType"),
        (_set("choices.0.message.tool_calls", [{"id": 5, "function": {"name": "f"}}]),
         "choices[0].message.tool_calls[0].id is int"),
        (_set("choices.0.message.tool_calls", [{"type": 1, "function": {"name": "f"}}]),
         "choices[0].message.tool_calls[0].type is int"),
        (_set("choices.0.message.tool_calls", [{"function": {"name": "f"}}, {"function": {"name": ["g"]}}]),
         "choices[0].message.tool_calls[1].function.name is list"),
        (_set("choices.0.logprobs", [1]), "choices[0].logprobs[0] is int, expected an object"),
        (_set("choices.0.logprobs", {"content": {"token": "a"}}), "choices[0].logprobs.content is dict, expected a list"),
        (_set("usage", [1]), "usage is list, expected an object"),
        (_set("usage.prompt_tokens", "3"), "usage.prompt_tokens is str, expected an integer or null"),
        (_set("usage.completion_tokens", 2.0), "usage.completion_tokens is float"),
        (_set("usage.total_tokens", False), "usage.total_tokens is bool"),
    ],
)  # fmt: skip
def test_a_malformed_answer_names_the_field(body: Any, text: str) -> None:
    with pytest.raises(IncompleteResponseError) as caught:
        parse_completion(body)
    assert text in str(caught.value)
    assert str(caught.value).startswith("malformed response: ")


def test_a_malformed_second_choice_is_named_by_its_position() -> None:
    body = _answer({"content": "a"})
    body["choices"].append({"index": 1, "message": {"role": "assistant", "content": 5}})
    with pytest.raises(IncompleteResponseError, match=r"choices\[1\]\.message\.content is int"):
        parse_completion(body)


def test_a_tool_call_that_is_not_an_object_is_named() -> None:
    with pytest.raises(IncompleteResponseError, match=r"tool_calls\[0\] is str, expected an object"):
        parse_completion(_set("choices.0.message.tool_calls", ["get_weather"]))


# ---------------------------------------------------------------- usage


def test_usage() -> None:
    assert parse_usage(None) is None
    assert parse_usage({"prompt_tokens": 24, "total_tokens": 32, "completion_tokens": 8}) == Usage(24, 8, 32)
    assert parse_usage({}) == Usage(None, None, None)
    assert parse_usage({"prompt_tokens": 1, "completion_tokens": None, "total_tokens": 1}) == Usage(1, None, 1)


@pytest.mark.parametrize(
    ("details", "cached", "reasoning"),
    [
        ({"prompt_tokens_details": {"cached_tokens": 1024}}, 1024, None),
        ({"prompt_tokens_details": None}, None, None),  # vLLM without --enable-prompt-tokens-details
        ({"prompt_tokens_details": {}}, None, None),
        ({"completion_tokens_details": {"reasoning_tokens": 41}}, None, 41),
        ({"completion_tokens_details": {"reasoning_tokens": 0, "accepted_prediction_tokens": 0}}, None, 0),
        ({"prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
          "completion_tokens_details": {"reasoning_tokens": 7}}, 0, 7),  # OpenAI's shape
        ({"prompt_tokens_details": [1024]}, None, None),  # not an object: no details
        ({"prompt_tokens_details": "1024"}, None, None),
    ],
)  # fmt: skip
def test_usage_details(details: dict[str, Any], cached: int | None, reasoning: int | None) -> None:
    usage = parse_usage({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, **details})
    assert usage == Usage(5, 2, 7, cached_tokens=cached, reasoning_tokens=reasoning)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("x", "usage is str, expected an object"),
        ([], "usage is list"),
        ({"prompt_tokens": "5"}, "usage.prompt_tokens is str"),
        ({"prompt_tokens": True}, "usage.prompt_tokens is bool"),
        ({"completion_tokens": 1.0}, "usage.completion_tokens is float"),
        ({"total_tokens": [7]}, "usage.total_tokens is list"),
        ({"prompt_tokens_details": {"cached_tokens": "8"}}, "usage.prompt_tokens_details.cached_tokens is str"),
        ({"completion_tokens_details": {"reasoning_tokens": 4.5}},
         "usage.completion_tokens_details.reasoning_tokens is float"),
    ],
)  # fmt: skip
def test_malformed_usage_names_the_field(value: Any, text: str) -> None:
    with pytest.raises(IncompleteResponseError) as caught:
        parse_usage(value)
    assert text in str(caught.value)


# ---------------------------------------------------------------- logprobs


def _lp(token: Any = "a", logprob: Any = -0.5, raw_bytes: Any = None, tops: Any = None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": raw_bytes, "top_logprobs": tops}


def test_logprobs() -> None:
    assert parse_logprobs(None) is None
    assert parse_logprobs({"content": None}) is None
    assert parse_logprobs({"content": []}) == []
    entries = [_lp("Hé", -1, list("Hé".encode()), [{"token": "Hé", "logprob": -1, "bytes": None}, {"token": "x", "logprob": -9999.0}]),
               {"token": "!", "logprob": 0.0}]  # fmt: skip
    expected = [
        TokenLogprob("Hé", -1.0, [72, 195, 169], [TopLogprob("Hé", -1.0, None), TopLogprob("x", -9999.0, None)]),
        TokenLogprob("!", 0.0, None, []),
    ]
    assert parse_logprobs({"content": entries}) == expected
    assert parse_logprobs(entries) == expected  # the content list itself, as an assembled stream holds it
    result = parse_logprobs(entries)
    assert result is not None and type(result[0].logprob) is float  # an int logprob becomes a float


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("x", "logprobs is str, expected a list"),
        ({"content": "x"}, "logprobs.content is str, expected a list"),
        ({"content": [None]}, "logprobs.content[0] is NoneType, expected an object"),
        ({"content": [_lp(token=5)]}, "logprobs.content[0].token is int, expected a string"),
        ({"content": [_lp(), _lp(logprob="low")]}, "logprobs.content[1].logprob is str, expected a number"),
        ({"content": [_lp(logprob=math.nan)]}, "logprobs.content[0].logprob is float"),
        ({"content": [_lp(logprob=True)]}, "logprobs.content[0].logprob is bool"),
        ({"content": [_lp(logprob=None)]}, "logprobs.content[0].logprob is NoneType"),
        ({"content": [_lp(raw_bytes="ab")]}, "logprobs.content[0].bytes is str, expected a list of byte values"),
        ({"content": [_lp(raw_bytes=[1, "2"])]}, "logprobs.content[0].bytes is list"),
        ({"content": [_lp(tops={"a": 1})]}, "logprobs.content[0].top_logprobs is dict, expected a list"),
        ({"content": [_lp(tops=["a"])]}, "logprobs.content[0].top_logprobs[0] is str, expected an object"),
        ({"content": [_lp(tops=[{"logprob": -1}])]}, "logprobs.content[0].top_logprobs[0].token is NoneType"),
        ({"content": [_lp(tops=[{"token": "a", "logprob": -1}, {"token": "b", "logprob": "x"}])]},
         "logprobs.content[0].top_logprobs[1].logprob is str"),
        ({"content": [_lp(tops=[{"token": "a", "logprob": -1, "bytes": 5}])]},
         "logprobs.content[0].top_logprobs[0].bytes is int"),
    ],
)  # fmt: skip
def test_malformed_logprobs_name_the_field(value: Any, text: str) -> None:
    with pytest.raises(IncompleteResponseError) as caught:
        parse_logprobs(value)
    assert text in str(caught.value)


def test_logprobs_where_prefix() -> None:
    with pytest.raises(IncompleteResponseError, match=r"choices\[2\]\.logprobs\.content\[0\]\.token"):
        parse_logprobs([_lp(token=None)], "choices[2].logprobs.content")


# ---------------------------------------------------------------- stop_reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None), ("###", "###"), ("", ""), (128009, 128009), (0, 0),
        (1.5, "1.5"), (True, "true"), ([1, 2], "[1,2]"), ({"a": "é"}, '{"a":"é"}'),
    ],
)  # fmt: skip
def test_stop_reason_keeps_odd_values_as_json_text(value: Any, expected: Any) -> None:
    assert stop_reason(value) == expected
    assert type(stop_reason(value)) is type(expected)
    assert parse_completion(_answer({"content": "x"}, stop_reason=value)).stop_reason == expected


# ---------------------------------------------------------------- error bodies


@pytest.mark.parametrize("name", ERRORS)
def test_recorded_error_bodies(name: str) -> None:
    expect = MANIFEST[name]["expect"]
    err = error_from_body(expect["http_status"], (FIXTURES / name).read_bytes())
    assert err.status_code == expect["http_status"]
    assert expect["error"]["message_contains"] in err.message
    assert (err.type, err.param, err.code) == (expect["error"]["type"], expect["error"]["param"], expect["error"]["code"])


@pytest.mark.parametrize(
    ("status", "body", "message", "fields"),
    [
        # nested (vLLM >= 0.10.1, OpenAI)
        (400, {"error": {"message": "bad", "type": "BadRequestError", "param": "max_tokens", "code": 400}}, "bad",
         ("BadRequestError", 400, "max_tokens")),
        (400, {"error": {"message": "ctx", "type": "invalid_request_error", "param": None,
                         "code": "context_length_exceeded"}}, "ctx",
         ("invalid_request_error", "context_length_exceeded", None)),
        # flat (vLLM <= 0.10.0)
        (404, {"object": "error", "message": "The model `x` does not exist.", "type": "NotFoundError", "param": None,
               "code": 404}, "The model `x` does not exist.", ("NotFoundError", 404, None)),
        # a string (vLLM's --api-key middleware)
        (401, {"error": "Unauthorized"}, "Unauthorized", (None, None, None)),
        # FastAPI
        (404, {"detail": "Not Found"}, "Not Found", (None, None, None)),
        (422, {"detail": [{"loc": ["body", "model"], "msg": "field required"}]},
         '[{"loc":["body","model"],"msg":"field required"}]', (None, None, None)),
        # no message: the type, else a placeholder
        (500, {"error": {"message": "", "type": "InternalServerError", "code": 500}}, "InternalServerError",
         ("InternalServerError", 500, None)),
        (500, {"error": {"message": None}}, "(no message)", (None, None, None)),
        (500, {"error": {}}, "(no message)", (None, None, None)),
        # anything else JSON: its text
        (502, ["upstream", "down"], '["upstream","down"]', (None, None, None)),
        (502, "upstream down", "upstream down", (None, None, None)),
        (418, {"teapot": True}, '{"teapot":true}', (None, None, None)),
    ],
)  # fmt: skip
def test_error_envelopes(status: int, body: Any, message: str, fields: tuple[Any, Any, Any]) -> None:
    err = error_from_body(status, orjson.dumps(body))
    assert err.status_code == status
    assert err.message == message
    assert str(err) == f"HTTP {status}: {message}"
    assert (err.type, err.code, err.param) == fields


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "(empty response body)"),
        (b"   \r\n ", "(empty response body)"),
        (b"<html><body><h1>502 Bad Gateway</h1></body></html>\n", "<html><body><h1>502 Bad Gateway</h1></body></html>"),
        (b"upstream connect error", "upstream connect error"),
        (b"\xff\xfebad bytes", "\ufffd\ufffdbad bytes"),
        (b'{"error": ', '{"error":'),  # cut JSON: kept as text
    ],
)
def test_non_json_error_bodies(body: bytes, message: str) -> None:
    err = error_from_body(502, body)
    assert isinstance(err, ServerError)
    assert err.message == message


@pytest.mark.parametrize(
    "body",
    [
        ("<html>" + "x" * 5000 + "</html>").encode(),
        orjson.dumps({"error": {"message": "y" * 5000, "type": "BadRequestError"}}),
        orjson.dumps({"detail": "z" * 5000}),
        orjson.dumps({"error": "w" * 5000}),
    ],
)
def test_a_long_error_text_is_cut(body: bytes) -> None:
    err = error_from_body(500, body)
    assert len(err.message) == 501
    assert err.message.endswith("…")


def test_an_error_text_at_the_limit_is_kept_whole() -> None:
    assert error_from_body(500, b"a" * 500).message == "a" * 500


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError), (401, AuthenticationError), (404, NotFoundError), (422, UnprocessableEntityError),
        (429, RateLimitError), (408, ServerError), (500, ServerError), (503, ServerError), (418, APIStatusError),
    ],
)  # fmt: skip
def test_the_status_picks_the_error_class(status: int, cls: type[APIStatusError]) -> None:
    err = error_from_body(status, b'{"error": {"message": "m"}}')
    assert type(err) is cls


def test_details_reach_the_error() -> None:
    for body in (b"", b"text", b'{"error": {"message": "m"}}', b'{"detail": "d"}'):
        err = error_from_body(429, body, request_id="req-1", retry_after=2.5)
        assert (err.request_id, err.retry_after) == ("req-1", 2.5)


# ---------------------------------------------------------------- error events inside a 200 stream


def test_an_error_event_takes_its_status_from_the_code() -> None:
    err = error_from_event({"error": {"message": "Internal server error", "type": "InternalServerError", "param": None,
                                      "code": 500}})  # fmt: skip
    assert type(err) is ServerError
    assert (err.status_code, err.message, err.type, err.code) == (500, "Internal server error", "InternalServerError", 500)
    bad = error_from_event({"error": {"object": "error", "message": "bad template", "type": "BadRequestError", "code": 400}})
    assert type(bad) is BadRequestError and bad.message == "bad template"


@pytest.mark.parametrize(
    "event",
    [
        {"error": {"message": "m"}},
        {"error": {"message": "m", "code": "context_length_exceeded"}},
        {"error": {"message": "m", "code": 200}},
        {"error": {"message": "m", "code": 399}},
        {"error": {"message": "m", "code": 600}},
        {"error": {"message": "m", "code": "400"}},
        {"error": "m"},
    ],
)
def test_an_error_event_without_a_usable_code_is_a_500(event: dict[str, Any]) -> None:
    err = error_from_event(copy.deepcopy(event))
    assert type(err) is ServerError
    assert (err.status_code, err.message) == (500, "m")


def test_error_event_boundaries_of_the_code() -> None:
    assert error_from_event({"error": {"message": "m", "code": 400}}).status_code == 400
    assert error_from_event({"error": {"message": "m", "code": 599}}).status_code == 599
    assert error_from_event({"error": {"message": "m", "code": 501}}).status_code == 501


@pytest.mark.parametrize("body", [{"error": None}, {"error": {}}, {"error": {"message": None}}])
def test_an_error_without_a_message_says_so(body: dict[str, Any]) -> None:
    assert error_from_body(500, orjson.dumps(body)).message == "(no message)"

"""`batchgen.validation`: every rule names its field, and each boundary is checked on both sides."""

from __future__ import annotations

import math
from typing import Any

import pytest

from batchgen.errors import ValidationError
from batchgen.validation import (
    ROLES,
    validate_fields,
    validate_messages,
    validate_request,
    validate_tool_choice,
)

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def _check(field: str, value: Any) -> None:
    validate_fields({field: value}, [field])


def _rejects(field: str, value: Any, named: str | None = None) -> ValidationError:
    """The value is rejected, and the error names the field (as its `field` and in its text)."""
    with pytest.raises(ValidationError) as caught:
        _check(field, value)
    err = caught.value
    assert err.field == (named or field)
    assert str(err).startswith(f"{named or field}: ")
    return err


# ---------------------------------------------------------------- numeric ranges, both sides of each bound

ACCEPTED = [
    ("temperature", 0), ("temperature", 0.0), ("temperature", 1), ("temperature", 2), ("temperature", 2.0),
    ("temperature", 1e-9), ("temperature", 1.999999),
    ("top_p", 1e-9), ("top_p", 0.5), ("top_p", 1), ("top_p", 1.0),
    ("max_tokens", 1), ("max_tokens", 4096),
    ("max_completion_tokens", 1), ("n", 1), ("n", 8),
    ("top_k", -1), ("top_k", 0), ("top_k", 1), ("top_k", 50),
    ("seed", 0), ("seed", -5), ("seed", 2**62),
    ("min_p", 0.0), ("min_p", 1), ("presence_penalty", -2.0), ("frequency_penalty", 2),
    ("repetition_penalty", 1.1),
]  # fmt: skip

REJECTED = [
    ("temperature", -1e-9), ("temperature", -1), ("temperature", 2.000001), ("temperature", 3),
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", "0.7"), ("temperature", True),
    ("top_p", 0), ("top_p", 0.0), ("top_p", -0.1), ("top_p", 1.000001), ("top_p", math.nan), ("top_p", "1"),
    ("top_p", True),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1.0), ("max_tokens", "16"), ("max_tokens", True),
    ("max_completion_tokens", 0), ("n", 0), ("n", 2.5),
    ("top_k", -2), ("top_k", -100), ("top_k", 1.0), ("top_k", "5"), ("top_k", True),
    ("seed", 1.5), ("seed", "1"), ("seed", False),
    ("min_p", math.nan), ("min_p", math.inf), ("presence_penalty", -math.inf), ("frequency_penalty", "0"),
    ("repetition_penalty", True),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), ACCEPTED)
def test_values_inside_the_range_pass(field: str, value: Any) -> None:
    _check(field, value)


@pytest.mark.parametrize(("field", "value"), REJECTED)
def test_values_outside_the_range_name_the_field_and_value(field: str, value: Any) -> None:
    err = _rejects(field, value)
    assert err.value is value
    assert repr(value) in str(err)


def test_messages_say_what_is_allowed() -> None:
    assert "[0, 2]" in str(_rejects("temperature", 2.5))
    assert "(0, 1]" in str(_rejects("top_p", 0))
    assert ">= 1" in str(_rejects("max_tokens", 0))
    assert "-1, 0 or >= 1" in str(_rejects("top_k", -2))


def test_a_long_bad_value_is_shortened_in_the_message() -> None:
    err = _rejects("temperature", "x" * 500)
    assert str(err).endswith("...")
    assert len(str(err)) < 200
    assert err.value == "x" * 500  # the full value is kept on the error


# ---------------------------------------------------------------- stop, bools, objects


@pytest.mark.parametrize("value", ["###", "", [], ["a"], ["\n\n", "User:"]])
def test_stop_accepts_a_string_or_a_list_of_strings(value: Any) -> None:
    _check("stop", value)


@pytest.mark.parametrize("value", [5, ["a", 5], [None], {"a": "b"}, ("a",)])
def test_stop_rejects_anything_else(value: Any) -> None:
    _rejects("stop", value)


@pytest.mark.parametrize("field", ["stream", "logprobs"])
def test_bool_fields_take_only_true_or_false(field: str) -> None:
    _check(field, True)
    _check(field, False)
    bad: Any
    for bad in (1, 0, "true", []):
        _rejects(field, bad)


@pytest.mark.parametrize("field", ["chat_template_kwargs", "stream_options"])
def test_object_fields_take_only_objects(field: str) -> None:
    _check(field, {})
    _check(field, {"enable_thinking": False})
    bad: Any
    for bad in ([], "x", 1, [("a", 1)]):
        _rejects(field, bad)


def test_response_format_needs_a_type() -> None:
    _check("response_format", {"type": "json_object"})
    _check("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}})
    for bad in ({}, {"type": 5}, "json", ["json_object"]):
        _rejects("response_format", bad)


def test_model_must_be_a_non_empty_string() -> None:
    _check("model", "qwen3-8b")
    for bad in ("", 5, ["m"]):
        _rejects("model", bad)


# ---------------------------------------------------------------- tools and tool_choice


@pytest.mark.parametrize(
    "tools",
    [
        [TOOL],
        [TOOL, {"type": "function", "function": {"name": "other"}}],
        [{"function": {"name": "no_type_means_function"}}],
    ],
)
def test_tools_accepts_function_specs(tools: list[Any]) -> None:
    _check("tools", tools)


@pytest.mark.parametrize(
    ("tools", "field"),
    [
        ([], "tools"),
        ({"type": "function"}, "tools"),
        ("get_weather", "tools"),
        (["get_weather"], "tools[0]"),
        ([{"type": "function"}], "tools[0]"),
        ([{"type": "function", "function": {"description": "no name"}}], "tools[0]"),
        ([{"type": "function", "function": {"name": 5}}], "tools[0]"),
        ([{"type": "code_interpreter", "function": {"name": "f"}}], "tools[0]"),
        ([TOOL, {"type": "function", "function": "f"}], "tools[1]"),
    ],
)
def test_tools_rejects_a_bad_spec_naming_its_position(tools: Any, field: str) -> None:
    _rejects("tools", tools, named=field)


@pytest.mark.parametrize(
    "choice", ["auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_tool_choice_accepts_the_words_and_a_named_function(choice: Any) -> None:
    _check("tool_choice", choice)


@pytest.mark.parametrize(
    "choice",
    ["any", "AUTO", "", 1, {"type": "function"}, {"type": "function", "function": {}},
     {"type": "tool", "function": {"name": "f"}}, {"function": {"name": "f"}},
     {"type": "function", "function": {"name": 3}}, ["auto"]],
)  # fmt: skip
def test_tool_choice_rejects_anything_else(choice: Any) -> None:
    err = _rejects("tool_choice", choice)
    assert '"auto", "none", "required"' in str(err)


def test_a_tool_choice_other_than_none_needs_tools() -> None:
    for choice in ("auto", "required", {"type": "function", "function": {"name": "f"}}):
        with pytest.raises(ValidationError) as caught:
            validate_tool_choice({"tool_choice": choice})
        assert caught.value.field == "tool_choice"
        assert "no tools" in str(caught.value)
        with pytest.raises(ValidationError):
            validate_tool_choice({"tool_choice": choice, "tools": []})
        validate_tool_choice({"tool_choice": choice, "tools": [TOOL]})
    validate_tool_choice({"tool_choice": "none"})
    validate_tool_choice({"tool_choice": None})
    validate_tool_choice({})


# ---------------------------------------------------------------- validate_fields


def test_validate_fields_checks_only_the_names_given() -> None:
    body = {"temperature": 9, "top_p": 0.5}
    validate_fields(body, ["top_p"])  # the bad temperature is not among the names
    with pytest.raises(ValidationError, match="temperature"):
        validate_fields(body, ["top_p", "temperature"])


def test_null_values_and_unknown_fields_are_left_alone() -> None:
    validate_fields({"temperature": None, "tools": None, "max_tokens": None}, ["temperature", "tools", "max_tokens"])
    validate_fields({"guided_json": 5, "top_logprobs": "x", "vllm_xargs": []}, ["guided_json", "top_logprobs", "vllm_xargs"])
    validate_fields({}, ["temperature"])  # a name not in the body is as good as null


# ---------------------------------------------------------------- messages


@pytest.mark.parametrize("role", sorted(ROLES))
def test_every_known_role_passes(role: str) -> None:
    validate_messages([{"role": role, "content": "x"}])


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "x", "name": "bob"}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "u"}}]}],
        [{"role": "user", "content": []}],
        [{"role": "user", "content": ""}],
        [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]},
         {"role": "tool", "content": "42", "tool_call_id": "c"}],
    ],
)  # fmt: skip
def test_valid_conversations_pass(messages: list[Any]) -> None:
    validate_messages(messages)


@pytest.mark.parametrize(
    ("messages", "field", "text"),
    [
        ([], "messages", "non-empty list"),
        (None, "messages", "non-empty list"),
        ("hi", "messages", "non-empty list"),
        ({"role": "user", "content": "x"}, "messages", "non-empty list"),
        (["hi"], "messages[0]", "must be an object"),
        ([{"role": "user", "content": "x"}, None], "messages[1]", "must be an object"),
        ([{"content": "x"}], "messages[0].role", "got None"),
        ([{"role": "robot", "content": "x"}], "messages[0].role", "got 'robot'"),
        ([{"role": "User", "content": "x"}], "messages[0].role", "got 'User'"),
        ([{"role": ["user"], "content": "x"}], "messages[0].role", "got ['user']"),  # unhashable role
        ([{"role": "user"}], "messages[0].content", "is missing"),
        ([{"role": "user", "content": None}], "messages[0].content", "is missing"),
        ([{"role": "assistant", "content": None}], "messages[0].content", "is missing"),
        ([{"role": "assistant", "content": None, "tool_calls": []}], "messages[0].content", "is missing"),
        ([{"role": "user", "content": None, "tool_calls": [{"id": "c"}]}], "messages[0].content", "is missing"),
        ([{"role": "user", "content": 5}], "messages[0].content", "got 5"),
        ([{"role": "user", "content": ["hi"]}], "messages[0].content", "content parts"),
        ([{"role": "user", "content": [{"text": "no type"}]}], "messages[0].content", "content parts"),
        ([{"role": "user", "content": {"type": "text"}}], "messages[0].content", "content parts"),
    ],
)
def test_bad_messages_name_the_message_and_field(messages: Any, field: str, text: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_messages(messages)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert text in str(caught.value)


def test_the_error_lists_the_allowed_roles() -> None:
    with pytest.raises(ValidationError) as caught:
        validate_messages([{"role": "bot", "content": "x"}])
    assert "assistant, developer, system, tool, user" in str(caught.value)


def test_messages_field_name_can_be_given() -> None:
    with pytest.raises(ValidationError) as caught:
        validate_messages([{"role": "bot", "content": "x"}], field="conversation")
    assert caught.value.field == "conversation[0].role"


# ---------------------------------------------------------------- validate_request


def test_a_full_valid_request_passes() -> None:
    validate_request({
        "model": "m", "messages": USER, "temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "top_k": -1,
        "stop": ["###"], "seed": 1, "tools": [TOOL], "tool_choice": "auto", "stream": True,
        "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2,
        "response_format": {"type": "json_object"}, "chat_template_kwargs": {"enable_thinking": False},
        "guided_json": {"any": "thing"},  # unknown to batchgen: passed through
    })  # fmt: skip


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": USER}, "model"),
        ({"model": "", "messages": USER}, "model"),
        ({"model": None, "messages": USER}, "model"),
        ({"model": 5, "messages": USER}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": USER, "temperature": -0.5}, "temperature"),
        ({"model": "m", "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": USER, "tools": [{"type": "function"}]}, "tools[0]"),
        ({"model": "m", "messages": USER, "tool_choice": "required"}, "tool_choice"),
        ({"model": "m", "messages": USER, "stream": "yes"}, "stream"),
    ],
)
def test_validate_request_names_the_bad_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_request(body)
    assert caught.value.field == field


def test_validate_request_reports_the_model_before_the_messages() -> None:
    with pytest.raises(ValidationError) as caught:
        validate_request({"model": "", "messages": []})
    assert caught.value.field == "model"
    assert "required" in str(caught.value)


def test_validation_error_is_a_value_error() -> None:
    # Callers that catch ValueError (the usual stdlib contract for a bad argument) still catch it.
    with pytest.raises(ValueError):
        validate_fields({"temperature": 5}, ["temperature"])

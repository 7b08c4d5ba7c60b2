"""`RowMapper`: each input row becomes exactly the request body it asks for, or a `RowProblem`
that names the row and the column to fix."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batchgen.errors import ConfigError, InputError
from batchgen.records import RowProblem, RowRequest
from batchgen.rows import JSON_FIELDS, OVERRIDE_FIELDS, RowMapper

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
OTHER_TOOL = {"type": "function", "function": {"name": "get_time"}}
HI = [{"role": "user", "content": "hi"}]


def _mapper(columns: list[str], *, defaults: dict[str, Any] | None = None, **kwargs: Any) -> RowMapper:
    kwargs.setdefault("fmt", "jsonl")
    kwargs.setdefault("model", "m")
    return RowMapper(columns, defaults=defaults or {}, **kwargs)


def _body(mapper: RowMapper, values: dict[str, Any], index: int = 0) -> dict[str, Any]:
    result = mapper.map(index, f"line {index + 1}", values)
    assert isinstance(result, RowRequest), result
    return result.body


def _problem(mapper: RowMapper, values: dict[str, Any], index: int = 2) -> RowProblem:
    result = mapper.map(index, f"line {index + 1}", values)
    assert isinstance(result, RowProblem), result
    assert result.index == index
    assert result.error_type == "invalid_row"
    return result


# ---------------------------------------------------------------- per-row overrides

# field -> (config default, row value): both valid, and different.
SAMPLES: dict[str, tuple[Any, Any]] = {
    "temperature": (1.0, 0.25),
    "max_tokens": (16, 7),
    "max_completion_tokens": (16, 9),
    "top_p": (1.0, 0.5),
    "top_k": (-1, 20),
    "min_p": (0.0, 0.1),
    "stop": (["###"], ["\n\n", "User:"]),
    "seed": (0, 42),
    "n": (1, 3),
    "presence_penalty": (0.0, 0.5),
    "frequency_penalty": (0.0, -0.5),
    "repetition_penalty": (1.0, 1.1),
    "tools": ([OTHER_TOOL], [TOOL, OTHER_TOOL]),
    "tool_choice": ("auto", {"type": "function", "function": {"name": "get_weather"}}),
    "response_format": ({"type": "text"}, {"type": "json_object"}),
    "logprobs": (False, True),
    "top_logprobs": (1, 5),
    "chat_template_kwargs": ({"enable_thinking": True}, {"enable_thinking": False}),
    "reasoning_effort": ("high", "low"),
    "structured_outputs": ({"choice": ["a", "b"]}, {"regex": "[0-9]+"}),
}


def test_every_override_field_has_a_sample() -> None:
    # A new override column must be added to SAMPLES, so the tests below cover it too.
    assert set(SAMPLES) == set(OVERRIDE_FIELDS)


def _override_mapper(field: str) -> RowMapper:
    defaults = {"tools": [TOOL], field: SAMPLES[field][0]}  # tools: so any tool_choice is allowed
    return _mapper(["prompt", field], defaults=defaults)


@pytest.mark.parametrize("field", OVERRIDE_FIELDS)
def test_an_override_column_replaces_the_default(field: str) -> None:
    _, value = SAMPLES[field]
    body = _body(_override_mapper(field), {"prompt": "hi", field: value})
    assert body == {"model": "m", "messages": HI, "tools": [TOOL], field: value}


@pytest.mark.parametrize("field", OVERRIDE_FIELDS)
def test_a_null_override_keeps_the_default(field: str) -> None:
    default, _ = SAMPLES[field]
    mapper = _override_mapper(field)
    expected = {"model": "m", "messages": HI, "tools": [TOOL], field: default}
    assert _body(mapper, {"prompt": "hi", field: None}) == expected
    assert _body(mapper, {"prompt": "hi"}) == expected  # a row without the key: the same


@pytest.mark.parametrize("field", OVERRIDE_FIELDS)
def test_an_override_column_without_a_default_adds_the_field_and_null_leaves_it_out(field: str) -> None:
    _, value = SAMPLES[field]
    tools = {"tools": [TOOL]} if field == "tool_choice" else {}
    mapper = _mapper(["prompt", field], defaults=tools)
    assert _body(mapper, {"prompt": "hi", field: value}) == {"model": "m", "messages": HI, **tools, field: value}
    assert _body(mapper, {"prompt": "hi", field: None}) == {"model": "m", "messages": HI, **tools}


def test_several_overrides_in_one_row_and_the_next_row_starts_from_the_defaults() -> None:
    mapper = _mapper(["prompt", "temperature", "max_tokens", "seed"], defaults={"temperature": 1.0, "max_tokens": 16})
    first = _body(mapper, {"prompt": "a", "temperature": 0.0, "max_tokens": 3, "seed": 7})
    second = _body(mapper, {"prompt": "b", "temperature": None, "max_tokens": None, "seed": None})
    assert first == {"model": "m", "messages": [{"role": "user", "content": "a"}], "temperature": 0.0,
                     "max_tokens": 3, "seed": 7}  # fmt: skip
    assert second == {"model": "m", "messages": [{"role": "user", "content": "b"}], "temperature": 1.0,
                      "max_tokens": 16}  # fmt: skip


def test_a_row_never_changes_the_defaults_of_later_rows() -> None:
    options = {"continuous_usage_stats": True}
    defaults = {"stream_options": options, "chat_template_kwargs": {"enable_thinking": True}}
    mapper = _mapper(["prompt", "chat_template_kwargs", "extra"], defaults=defaults, stream=True)
    _body(mapper, {"prompt": "a", "chat_template_kwargs": {"enable_thinking": False}, "extra": {"seed": 1}})
    assert options == {"continuous_usage_stats": True}  # include_usage went into the row's copy only
    assert _body(mapper, {"prompt": "b"}) == {
        "model": "m", "messages": [{"role": "user", "content": "b"}], "chat_template_kwargs": {"enable_thinking": True},
        "stream": True, "stream_options": {"continuous_usage_stats": True, "include_usage": True},
    }  # fmt: skip


# ---------------------------------------------------------------- JSON text and Arrow shapes


JSON_SAMPLES = {
    "tools": [TOOL],
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    "chat_template_kwargs": {"enable_thinking": False},
    "structured_outputs": {"json": {"type": "object"}},
    "stop": ["###", "\n"],
}


def test_json_samples_cover_every_json_field() -> None:
    assert set(JSON_SAMPLES) == JSON_FIELDS


@pytest.mark.parametrize("field", sorted(JSON_FIELDS))
def test_a_json_text_column_is_decoded(field: str) -> None:
    mapper = _mapper(["prompt", field])
    body = _body(mapper, {"prompt": "hi", field: orjson.dumps(JSON_SAMPLES[field]).decode()})
    assert body == {"model": "m", "messages": HI, field: JSON_SAMPLES[field]}


@pytest.mark.parametrize("field", sorted(JSON_FIELDS - {"stop"}))
def test_bad_json_text_names_the_row_and_column(field: str) -> None:
    problem = _problem(_mapper(["prompt", field, "id"]), {"prompt": "hi", field: '[{"type": ', "id": "r7"})
    assert problem.row_id == "r7"
    assert problem.message.startswith(f"line 3: column {field!r}: is not valid JSON (")


def test_a_plain_stop_string_is_kept_as_text() -> None:
    mapper = _mapper(["prompt", "stop"])
    assert _body(mapper, {"prompt": "hi", "stop": "###"})["stop"] == "###"
    # One that only starts like a JSON list is a stop string too (Llama-2's "[/INST]").
    assert _body(mapper, {"prompt": "hi", "stop": "[/INST]"})["stop"] == "[/INST]"
    assert _body(mapper, {"prompt": "hi", "stop": '["a", "b"]'})["stop"] == ["a", "b"]
    assert _body(mapper, {"prompt": "hi", "stop": "{"})["stop"] == "{"
    assert _body(mapper, {"prompt": "hi", "stop": '["a", "b"]'})["stop"] == ["a", "b"]


def test_tool_choice_as_json_text_or_word() -> None:
    mapper = _mapper(["prompt", "tool_choice"], defaults={"tools": [TOOL]})
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert _body(mapper, {"prompt": "hi", "tool_choice": orjson.dumps(named).decode()})["tool_choice"] == named
    assert _body(mapper, {"prompt": "hi", "tool_choice": "required"})["tool_choice"] == "required"
    # An Arrow struct gives every field to every row: the absent ones are None and dropped.
    struct = {"type": "function", "function": {"name": "get_weather", "description": None}, "extra": None}
    assert _body(mapper, {"prompt": "hi", "tool_choice": struct})["tool_choice"] == named


def test_arrow_structs_lose_their_null_fields_and_maps_become_objects() -> None:
    mapper = _mapper(["prompt", "tools", "response_format", "chat_template_kwargs"])
    tools = [{"type": "function", "function": {"name": "get_weather", "description": None, "parameters": None}},
             {"type": None, "function": {"name": "get_time", "description": "now", "parameters": None}}]  # fmt: skip
    body = _body(mapper, {
        "prompt": "hi",
        "tools": tools,
        "response_format": {"type": "json_object", "json_schema": None},
        "chat_template_kwargs": [("enable_thinking", False), ("budget", 3)],  # an Arrow map column
    })  # fmt: skip
    assert body == {
        "model": "m", "messages": HI,
        "tools": [{"type": "function", "function": {"name": "get_weather"}},
                  {"function": {"name": "get_time", "description": "now"}}],
        "response_format": {"type": "json_object"},
        "chat_template_kwargs": {"enable_thinking": False, "budget": 3},
    }  # fmt: skip


def test_a_bad_value_names_the_row_and_the_column() -> None:
    problem = _problem(_mapper(["prompt", "temperature"]), {"prompt": "hi", "temperature": "hot"})
    assert problem.message == "line 3: column 'temperature': temperature: must be a finite number in [0, 2], got 'hot'"
    assert problem.row_id == "2"


@pytest.mark.parametrize(
    ("field", "value", "text"),
    [
        ("top_p", 0, "top_p: must be a number in (0, 1]"),
        ("max_tokens", 0, "max_tokens: must be an integer >= 1, got 0"),
        ("top_k", -5, "top_k: must be an integer that is -1, 0 or >= 1, got -5"),
        ("tools", "[]", "tools: must be a non-empty list"),
        ("tools", '[{"type": "function"}]', "tools[0]: must be"),
        ("response_format", '{"schema": 1}', 'response_format: must be an object with a "type"'),
        ("stop", '[1, 2]', "stop: must be a string or a list of strings"),
        ("logprobs", "yes", "logprobs: must be true or false"),
    ],
)
def test_bad_override_values_name_the_column(field: str, value: Any, text: str) -> None:
    problem = _problem(_mapper(["prompt", field]), {"prompt": "hi", field: value}, index=4)
    assert problem.message.startswith(f"line 5: column {field!r}: {text}")


def test_a_tool_choice_without_tools_is_a_row_problem() -> None:
    problem = _problem(_mapper(["prompt", "tool_choice"]), {"prompt": "hi", "tool_choice": "required"})
    assert problem.message == "line 3: column 'tool_choice': tool_choice: is set but no tools are given"


# ---------------------------------------------------------------- the extra column


def test_extra_struct_is_merged_without_its_nulls() -> None:
    mapper = _mapper(["prompt", "extra"], defaults={"max_tokens": 16})
    extra = {"seed": 3, "top_k": None, "vllm_xargs": {"a": 1, "b": None}}
    assert _body(mapper, {"prompt": "hi", "extra": extra}) == {
        "model": "m", "messages": HI, "max_tokens": 16, "seed": 3, "vllm_xargs": {"a": 1}
    }


def test_extra_as_an_arrow_map_of_pairs() -> None:
    mapper = _mapper(["prompt", "extra"])
    body = _body(mapper, {"prompt": "hi", "extra": [("min_tokens", 4), ("ignore_eos", True), ("seed", None)]})
    assert body == {"model": "m", "messages": HI, "min_tokens": 4, "ignore_eos": True}


def test_extra_as_json_text() -> None:
    mapper = _mapper(["prompt", "extra"])
    body = _body(mapper, {"prompt": "hi", "extra": '{"guided_choice": ["yes", "no"], "top_k": null}'})
    assert body == {"model": "m", "messages": HI, "guided_choice": ["yes", "no"]}


def test_extra_is_merged_last_and_wins() -> None:
    mapper = _mapper(["prompt", "temperature", "extra"], defaults={"temperature": 1.0, "max_tokens": 16})
    body = _body(mapper, {"prompt": "hi", "temperature": 0.3, "extra": {"temperature": 0.9, "max_tokens": 5}})
    assert body == {"model": "m", "messages": HI, "temperature": 0.9, "max_tokens": 5}


@pytest.mark.parametrize("extra", [None, "null", {}, []])
def test_an_empty_or_null_extra_changes_nothing(extra: Any) -> None:
    mapper = _mapper(["prompt", "extra"], defaults={"seed": 1})
    assert _body(mapper, {"prompt": "hi", "extra": extra}) == {"model": "m", "messages": HI, "seed": 1}


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        ("[1, 2]", "must be an object of request fields, got list"),
        (5, "must be an object of request fields, got int"),
        ("{not json", "is not valid JSON ("),
        ("", "is not valid JSON ("),
    ],
)
def test_a_bad_extra_names_the_extra_column(extra: Any, text: str) -> None:
    problem = _problem(_mapper(["prompt", "extra"]), {"prompt": "hi", "extra": extra})
    assert problem.message.startswith(f"line 3: column 'extra': {text}")


def test_a_bad_value_in_extra_is_a_row_problem() -> None:
    problem = _problem(_mapper(["prompt", "extra"]), {"prompt": "hi", "extra": {"temperature": 5}})
    assert "temperature: must be a finite number in [0, 2], got 5" in problem.message
    assert problem.message.startswith("line 3: ")


def test_a_bad_value_in_extra_names_the_extra_column() -> None:
    problem = _problem(_mapper(["prompt", "extra"]), {"prompt": "hi", "extra": {"temperature": 5}})
    assert problem.message.startswith("line 3: column 'extra': ")


# ---------------------------------------------------------------- prompt column, system prompt


def test_a_prompt_becomes_one_user_message() -> None:
    assert _body(_mapper(["prompt"]), {"prompt": "Bonjour 🌍"}) == {
        "model": "m", "messages": [{"role": "user", "content": "Bonjour 🌍"}]
    }


def test_the_config_system_prompt_comes_first() -> None:
    mapper = _mapper(["prompt"], system_prompt="Be brief.")
    assert _body(mapper, {"prompt": "hi"})["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}
    ]


def test_a_system_column_wins_over_the_config_and_falls_back_when_empty() -> None:
    mapper = _mapper(["prompt", "system"], system_prompt="Be brief.")
    assert _body(mapper, {"prompt": "hi", "system": "Be long."})["messages"] == [
        {"role": "system", "content": "Be long."}, {"role": "user", "content": "hi"}
    ]
    for empty in (None, ""):
        assert _body(mapper, {"prompt": "hi", "system": empty})["messages"][0] == {"role": "system", "content": "Be brief."}


def test_a_system_column_without_config_prompt() -> None:
    mapper = _mapper(["prompt", "system"])
    assert _body(mapper, {"prompt": "hi", "system": "S"})["messages"] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "hi"}
    ]
    assert _body(mapper, {"prompt": "hi", "system": None})["messages"] == HI


@pytest.mark.parametrize(("prompt", "got"), [(None, "got null"), ("", "got ''"), (5, "got 5"), (["hi"], "got ['hi']")])
def test_a_missing_or_odd_prompt_names_the_column(prompt: Any, got: str) -> None:
    problem = _problem(_mapper(["prompt"]), {"prompt": prompt})
    assert problem.message == f"line 3: column 'prompt': must be a non-empty string, {got}"


def test_a_long_bad_prompt_is_shortened_in_the_message() -> None:
    problem = _problem(_mapper(["prompt"]), {"prompt": list(range(1000))})
    assert len(problem.message) < 120


# ---------------------------------------------------------------- messages column


def test_messages_from_arrow_structs_lose_null_fields() -> None:
    mapper = _mapper(["messages"], fmt="parquet")
    messages = [
        {"role": "system", "content": "S", "name": None, "tool_calls": None, "tool_call_id": None},
        {"role": "user", "content": "weather?", "name": "ann", "tool_calls": None, "tool_call_id": None},
        {"role": "assistant", "content": None, "name": None, "tool_call_id": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny", "name": None, "tool_calls": None, "tool_call_id": "c1"},
    ]  # fmt: skip
    assert _body(mapper, {"messages": messages})["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "weather?", "name": "ann"},
        {"role": "assistant",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]  # fmt: skip


def test_content_parts_lose_their_null_fields() -> None:
    mapper = _mapper(["messages"], fmt="parquet")
    parts = [{"type": "text", "text": "look", "image_url": None},
             {"type": "image_url", "text": None, "image_url": {"url": "http://x/i.png", "detail": None}}]  # fmt: skip
    assert _body(mapper, {"messages": [{"role": "user", "content": parts}]})["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "http://x/i.png"}}]}
    ]  # fmt: skip


def test_messages_as_json_text() -> None:
    mapper = _mapper(["messages"])
    text = '[{"role": "system", "content": "S"}, {"role": "user", "content": "hi", "name": null}]'
    assert _body(mapper, {"messages": text})["messages"] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "hi"}
    ]


def test_the_system_prompt_is_added_only_to_conversations_without_one() -> None:
    mapper = _mapper(["messages"], system_prompt="Be brief.")
    assert _body(mapper, {"messages": HI})["messages"] == [{"role": "system", "content": "Be brief."}, *HI]
    own = [{"role": "system", "content": "Mine."}, *HI]
    assert _body(mapper, {"messages": own})["messages"] == own


def test_a_system_column_is_not_used_with_a_messages_column() -> None:
    mapper = _mapper(["messages", "system"])
    assert "system" not in mapper.columns_used
    assert _body(mapper, {"messages": HI, "system": "ignored"})["messages"] == HI


def test_the_messages_column_wins_over_a_prompt_column() -> None:
    mapper = _mapper(["prompt", "messages"])
    assert _body(mapper, {"prompt": "not me", "messages": HI})["messages"] == HI


def test_custom_column_names() -> None:
    assert _body(_mapper(["conv"], messages_column="conv"), {"conv": HI})["messages"] == HI
    assert _body(_mapper(["question"], prompt_column="question"), {"question": "hi"})["messages"] == HI


@pytest.mark.parametrize(
    ("messages", "text"),
    [
        (None, "column 'messages': is null; every row needs a conversation"),
        ('[{"role": "user"', "column 'messages': is not valid JSON ("),
        ("[]", "column 'messages': messages: must be a non-empty list"),
        ('{"role": "user", "content": "hi"}', "column 'messages': messages: must be a non-empty list"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
         "column 'messages': messages[1].role: must be one of assistant, developer, system, tool, user, got 'robot'"),
        ([{"role": "user", "content": None}], "column 'messages': messages[0].content: is missing"),
        (["hi"], "column 'messages': messages[0]: must be an object"),
    ],
)  # fmt: skip
def test_bad_messages_name_the_row_and_column(messages: Any, text: str) -> None:
    problem = _problem(_mapper(["messages"]), {"messages": messages})
    assert problem.message.startswith(f"line 3: {text}")


def test_a_bad_message_is_numbered_as_in_the_row_when_a_system_prompt_is_added() -> None:
    mapper = _mapper(["messages"], system_prompt="Be brief.")
    problem = _problem(mapper, {"messages": [{"role": "robot", "content": "b"}]})
    assert "messages[0].role" in problem.message


# ---------------------------------------------------------------- openai-batch bodies


def _batch(defaults: dict[str, Any] | None = None, **kwargs: Any) -> RowMapper:
    return _mapper(["custom_id", "method", "url", "body"], fmt="openai-batch", defaults=defaults, **kwargs)


def test_a_batch_body_fills_the_gaps_and_wins_over_defaults() -> None:
    mapper = _batch({"temperature": 1.0, "max_tokens": 16})
    body = _body(mapper, {"custom_id": "r1", "body": {"model": "other", "messages": HI, "temperature": 0.2}})
    assert body == {"model": "other", "messages": HI, "temperature": 0.2, "max_tokens": 16}
    assert mapper.map(0, "line 1", {"custom_id": "r1", "body": {"messages": HI}}) == RowRequest(
        0, "r1", {"model": "m", "messages": HI, "temperature": 1.0, "max_tokens": 16}
    )


def test_a_batch_mapper_reads_only_body_and_custom_id() -> None:
    mapper = _batch()
    assert mapper.id_column == "custom_id"
    assert sorted(mapper.columns_used) == ["body", "custom_id"]


def test_a_batch_body_without_stream_mode_gets_no_stream_default() -> None:
    mapper = _batch({"stream": True, "seed": 1})
    assert _body(mapper, {"custom_id": "r", "body": {"messages": HI}}) == {"model": "m", "messages": HI, "seed": 1}


def test_a_batch_body_in_stream_mode_asks_for_usage() -> None:
    body = _body(_batch(stream=True), {"custom_id": "r", "body": {"messages": HI, "stream_options": {"x": 1}}})
    assert body == {"model": "m", "messages": HI, "stream": True, "stream_options": {"x": 1, "include_usage": True}}


@pytest.mark.parametrize(
    ("row_body", "text"),
    [
        ("not an object", "column 'body': must be a JSON object"),
        (None, "column 'body': must be a JSON object"),
        ({"messages": HI, "temperature": 3}, "column 'body': temperature: must be a finite number in [0, 2], got 3"),
        ({"messages": []}, "column 'body': messages: must be a non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "column 'body': messages[0].role: must be one of"),
        ({"messages": HI, "model": ""}, "column 'body': model: is required"),
    ],
)
def test_a_bad_batch_body_names_the_body_column(row_body: Any, text: str) -> None:
    problem = _problem(_batch(), {"custom_id": "r9", "body": row_body})
    assert problem.row_id == "r9"
    assert problem.message.startswith(f"line 3: {text}")


def test_a_problem_from_the_config_is_blamed_on_the_config() -> None:
    # tool_choice needs tools that a row may bring, so a default one is checked per row.
    problem = _problem(_batch({"tool_choice": "required"}), {"custom_id": "r", "body": {"messages": HI}})
    assert problem.message == "line 3: config: tool_choice: is set but no tools are given"
    problem = _problem(_mapper(["prompt"], defaults={"tool_choice": "auto"}), {"prompt": "hi"})
    assert problem.message == "line 3: config: tool_choice: is set but no tools are given"
    assert _body(_mapper(["prompt", "tools"], defaults={"tool_choice": "auto"}), {"prompt": "hi", "tools": [TOOL]})


def test_a_model_still_unknown_is_blamed_on_the_config() -> None:
    problem = _problem(_batch(model=""), {"custom_id": "r", "body": {"messages": HI}})
    assert problem.message.startswith("line 3: config: model: is required")


# ---------------------------------------------------------------- ids


def test_the_id_column_gives_the_row_id_as_text() -> None:
    mapper = _mapper(["prompt", "key"], id_column="key")
    assert mapper.map(0, "line 1", {"prompt": "hi", "key": "abc"}).row_id == "abc"
    assert mapper.map(1, "line 2", {"prompt": "hi", "key": 17}).row_id == "17"
    assert "key" in mapper.columns_used


def test_id_then_custom_id_then_the_row_number() -> None:
    assert _mapper(["prompt", "custom_id", "id"]).id_column == "id"
    assert _mapper(["prompt", "custom_id"]).id_column == "custom_id"
    row_number = _mapper(["prompt"])
    assert row_number.id_column is None
    assert row_number.map(41, "line 42", {"prompt": "hi"}) == RowRequest(41, "41", {"model": "m", "messages": HI})
    assert row_number.row_id(5, None) == "5"


def test_an_id_column_missing_from_the_input_stops_the_run() -> None:
    with pytest.raises(InputError, match=r"id column 'key' is not in the input \(columns: prompt, id\)"):
        _mapper(["prompt", "id"], id_column="key")


def test_a_null_id_is_a_row_problem_without_an_id() -> None:
    mapper = _mapper(["prompt", "id"])
    result = mapper.map(3, "row 3", {"prompt": "hi", "id": None})
    assert result == RowProblem(3, None, "row 3: column 'id' is null; every row needs an id")
    assert mapper.row_id(3, None) is None


def test_a_problem_row_keeps_its_id() -> None:
    problem = _problem(_mapper(["prompt", "id"]), {"prompt": None, "id": "q-1"})
    assert problem.row_id == "q-1"


# ---------------------------------------------------------------- construction: columns and config


def test_neither_a_messages_nor_a_prompt_column_stops_the_run() -> None:
    with pytest.raises(InputError) as caught:
        _mapper(["text", "id"])
    message = str(caught.value)
    assert "neither a 'messages' nor a 'prompt' column" in message
    assert "(columns: text, id)" in message
    with pytest.raises(InputError, match=r"columns: none"):
        _mapper([])


@pytest.mark.parametrize(
    ("defaults", "text"),
    [
        ({"temperature": 9}, "config: temperature: must be a finite number in [0, 2], got 9"),
        ({"max_tokens": 0}, "config: max_tokens: must be an integer >= 1"),
        ({"stop": 5}, "config: stop: must be a string or a list of strings"),
        ({"tools": []}, "config: tools: must be a non-empty list"),
    ],
)
def test_a_bad_default_is_a_config_error(defaults: dict[str, Any], text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _mapper(["prompt"], defaults=defaults)
    assert str(caught.value).startswith(text)


def test_unknown_defaults_pass_through_to_every_row() -> None:
    mapper = _mapper(["prompt"], defaults={"guided_choice": ["a"], "min_tokens": 2})
    assert _body(mapper, {"prompt": "hi"}) == {"model": "m", "messages": HI, "guided_choice": ["a"], "min_tokens": 2}


def test_columns_used() -> None:
    mapper = _mapper(["prompt", "system", "id", "extra", "seed", "temperature", "unused"])
    assert mapper.columns_used == ["prompt", "temperature", "seed", "id", "extra", "system"]
    assert _mapper(["messages", "prompt"]).columns_used == ["messages"]


def test_setting_the_model_later_applies_to_later_rows() -> None:
    mapper = _mapper(["prompt"], model="", defaults={"seed": 1})
    mapper.model = "qwen3-8b"
    assert mapper.model == "qwen3-8b"
    assert _body(mapper, {"prompt": "hi"}) == {"model": "qwen3-8b", "messages": HI, "seed": 1}


# ---------------------------------------------------------------- streaming


def test_stream_asks_for_usage_in_the_stream() -> None:
    mapper = _mapper(["prompt"], stream=True)
    assert _body(mapper, {"prompt": "hi"}) == {
        "model": "m", "messages": HI, "stream": True, "stream_options": {"include_usage": True}
    }


def test_stream_keeps_other_stream_options_and_forces_include_usage() -> None:
    mapper = _mapper(["prompt", "extra"], stream=True,
                     defaults={"stream_options": {"include_usage": False, "continuous_usage_stats": True}})  # fmt: skip
    assert _body(mapper, {"prompt": "hi"})["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    body = _body(mapper, {"prompt": "hi", "extra": {"stream": False}})
    assert body["stream"] is True  # a row cannot turn streaming off behind the client's back


def test_without_stream_a_stream_field_is_dropped() -> None:
    mapper = _mapper(["prompt", "extra"], defaults={"stream": True})
    assert _body(mapper, {"prompt": "hi"}) == {"model": "m", "messages": HI}
    assert _body(mapper, {"prompt": "hi", "extra": {"stream": True}}) == {"model": "m", "messages": HI}


# ---------------------------------------------------------------- bugs found while writing these tests


def test_an_empty_stop_list_is_kept_as_a_list() -> None:
    assert _body(_mapper(["prompt", "stop"]), {"prompt": "hi", "stop": []})["stop"] == []


def test_an_empty_string_in_a_text_column_is_not_read_as_json() -> None:
    body = _body(_mapper(["prompt", "reasoning_effort"]), {"prompt": "hi", "reasoning_effort": ""})
    assert body["reasoning_effort"] == ""

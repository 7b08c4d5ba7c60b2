"""Output schema: column order and types, clash renaming, the part-file `_index` column."""

from __future__ import annotations

import pyarrow as pa
import pytest

from batchgen.errors import InputError, OutputError
from batchgen.io import RESULT_COLUMNS, output_schema, state_schema


def test_result_columns_in_order() -> None:
    assert RESULT_COLUMNS == (
        "content",
        "reasoning_content",
        "tool_calls",
        "finish_reason",
        "stop_reason",
        "logprobs",
        "choices",
        "usage",
        "model",
        "response_id",
        "error",
        "error_type",
        "status_code",
        "attempts",
        "latency_s",
        "ttft_s",
        "endpoint",
        "raw",
    )


def test_layout_id_then_passthrough_then_results() -> None:
    schema, renames = output_schema(pa.schema([("prompt", pa.string()), ("n", pa.int64())]))
    assert schema.names == ["id", "prompt", "n", *RESULT_COLUMNS]
    assert renames == {}
    assert schema.field("n").type == pa.int64()
    assert schema.field("id").type == pa.string()
    assert schema.field("content").type == pa.large_string()
    assert schema.field("usage").type == pa.struct(
        [("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("total_tokens", pa.int64()),
         ("cached_tokens", pa.int64()), ("reasoning_tokens", pa.int64())]
    )
    top = pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float64())]))
    logprobs = pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float64()), ("top_logprobs", top)]))
    assert schema.field("logprobs").type == logprobs
    assert schema.field("stop_reason").type == pa.string()
    choice = schema.field("choices").type.value_type
    assert [f.name for f in choice] == [
        "index", "content", "reasoning_content", "tool_calls", "finish_reason", "stop_reason", "logprobs"
    ]
    assert choice.field("tool_calls").type == schema.field("tool_calls").type
    assert choice.field("logprobs").type == logprobs
    tool_call = schema.field("tool_calls").type.value_type
    assert tool_call.field("function").type == pa.struct([("name", pa.string()), ("arguments", pa.large_string())])
    assert schema.field("status_code").type == pa.int32()
    assert schema.field("ttft_s").type == pa.float64()


def test_empty_passthrough() -> None:
    schema, _ = output_schema(pa.schema([]))
    assert schema.names == ["id", *RESULT_COLUMNS]


def test_clashing_input_columns_are_renamed() -> None:
    passthrough = pa.schema([("content", pa.string()), ("id", pa.int64()), ("model", pa.string()), ("_index", pa.int64())])
    schema, renames = output_schema(passthrough)
    assert renames == {"content": "input_content", "id": "input_id", "model": "input_model", "_index": "input__index"}
    assert schema.names[:5] == ["id", "input_content", "input_id", "input_model", "input__index"]
    assert schema.field("input_id").type == pa.int64()


def test_rename_skips_names_already_taken_by_input_columns() -> None:
    passthrough = pa.schema([("content", pa.string()), ("input_content", pa.string()), ("input_input_content", pa.string())])
    schema, renames = output_schema(passthrough)
    assert renames == {"content": "input_input_input_content"}
    assert schema.names[1:4] == ["input_input_input_content", "input_content", "input_input_content"]
    assert len(set(schema.names)) == len(schema.names)


def test_duplicate_input_columns_are_rejected() -> None:
    with pytest.raises(InputError, match="more than one column named 'a'"):
        output_schema(pa.schema([("a", pa.string()), ("a", pa.int64())]))


def test_state_schema_adds_leading_index() -> None:
    schema, _ = output_schema(pa.schema([("prompt", pa.string())]))
    state = state_schema(schema)
    assert state.names == ["_index", *schema.names]
    assert state.field("_index").type == pa.int64() and not state.field("_index").nullable
    with pytest.raises(OutputError):
        state_schema(state)

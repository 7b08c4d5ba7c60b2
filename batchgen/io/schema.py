"""The Arrow schema of batchgen's output and of its part files (pure; no I/O).

Every output has the same result columns whatever the run did (streaming or not, tool calls
or not), so outputs of different runs can be concatenated and resumed runs never meet a
schema change.
"""

from __future__ import annotations

import pyarrow as pa

from dataclasses import dataclass

from batchgen.errors import InputError, OutputError
from batchgen.records import INDEX_COLUMN

__all__ = ["INDEX_COLUMN", "RESULT_COLUMNS", "RESULT_FIELDS", "OutputLayout", "output_schema", "state_schema"]


_TOOL_CALL = pa.struct(
    [
        pa.field("id", pa.string()),
        pa.field("type", pa.string()),
        pa.field("function", pa.struct([pa.field("name", pa.string()), pa.field("arguments", pa.large_string())])),
    ]
)
_USAGE = pa.struct(
    [
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("total_tokens", pa.int64()),
        pa.field("cached_tokens", pa.int64()),  # usage.prompt_tokens_details.cached_tokens
        pa.field("reasoning_tokens", pa.int64()),  # usage.completion_tokens_details.reasoning_tokens
    ]
)
_LOGPROBS = pa.list_(
    pa.struct(
        [
            pa.field("token", pa.string()),
            pa.field("logprob", pa.float64()),
            pa.field("top_logprobs", pa.list_(pa.struct([pa.field("token", pa.string()), pa.field("logprob", pa.float64())]))),
        ]
    )
)
_TOOL_CALLS = pa.list_(_TOOL_CALL)
_CHOICE = pa.struct(
    [
        pa.field("index", pa.int32()),
        pa.field("content", pa.large_string()),
        pa.field("reasoning_content", pa.large_string()),
        pa.field("tool_calls", _TOOL_CALLS),
        pa.field("finish_reason", pa.string()),
        pa.field("stop_reason", pa.string()),
        pa.field("logprobs", _LOGPROBS),
    ]
)

# Model text can be long (reasoning traces), hence large_string: a plain string column overflows
# its 32-bit offsets at 2 GiB per chunk. The top-level answer columns are choice 0's; `choices`
# holds every choice when the server sent more than one (`n` > 1), else null.
RESULT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("content", pa.large_string()),
    pa.field("reasoning_content", pa.large_string()),
    pa.field("tool_calls", _TOOL_CALLS),
    pa.field("finish_reason", pa.string()),
    pa.field("stop_reason", pa.string()),  # vLLM: the stop string, or the stop token id as text
    pa.field("logprobs", _LOGPROBS),
    pa.field("choices", pa.list_(_CHOICE)),
    pa.field("usage", _USAGE),
    pa.field("model", pa.string()),
    pa.field("response_id", pa.string()),
    pa.field("error", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("status_code", pa.int32()),
    pa.field("attempts", pa.int32()),
    pa.field("latency_s", pa.float64()),
    # Always present (null when not streaming / without keep_raw) so the schema never depends on
    # the run's settings, and a resumed run with other settings still matches its part files.
    pa.field("ttft_s", pa.float64()),
    # The base URL of the server that gave the final answer (or the last failure); null for a row
    # that was never sent. Always present, one server or many.
    pa.field("endpoint", pa.string()),
    pa.field("raw", pa.large_string()),
)
RESULT_COLUMNS: tuple[str, ...] = tuple(field.name for field in RESULT_FIELDS)

_RESERVED = frozenset({"id", INDEX_COLUMN, *RESULT_COLUMNS})


def output_schema(passthrough: pa.Schema, *, reserved: tuple[str, ...] = ()) -> tuple[pa.Schema, dict[str, str]]:
    """The final output schema: `id`, then the passthrough input columns, then `RESULT_COLUMNS`.

    Clash rule: an input column whose name is taken by an output column (`id`, a result column,
    or `_index` of the part files) is renamed `input_<name>`, then `input_input_<name>` and so
    on until the name is free of both output columns and other input columns. This function
    renames an `id` it is given like any other clash; the caller drops the input's `id` column
    from `passthrough` beforehand when that column is the row id.

    Args:
        passthrough: the input columns to carry over, in input order (`InputSource.passthrough_schema`).

    Returns:
        `(schema, renames)`: the output schema, and `{input name: output name}` for the
        renamed columns only (look names up with `renames.get(name, name)`).

    Raises:
        InputError: two input columns share a name (possible in Parquet), so rows could not
            be told apart.

    Example:
        schema, renames = output_schema(pa.schema([("prompt", pa.string()), ("model", pa.string())]))
        # renames == {"model": "input_model"}
    """
    names = passthrough.names
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(f"the input has more than one column named {', '.join(map(repr, duplicates))}")
    taken_names = _RESERVED | set(reserved)
    taken = set(taken_names) | set(names)
    renames: dict[str, str] = {}
    fields = [pa.field("id", pa.string())]
    for field in passthrough:
        name = field.name
        if name in taken_names:
            name = f"input_{name}"
            while name in taken:
                name = f"input_{name}"
            taken.add(name)
            renames[field.name] = name
        fields.append(field.with_name(name))
    fields.extend(RESULT_FIELDS)
    return pa.schema(fields), renames


def state_schema(output: pa.Schema) -> pa.Schema:
    """The part-file schema: `output` with a leading non-null `_index: int64`, the input row number.

    Raises:
        OutputError: `output` already has an `_index` column (build it with `output_schema`, which renames it).
    """
    if INDEX_COLUMN in output.names:
        raise OutputError(f"the output schema already has a {INDEX_COLUMN!r} column")
    return output.insert(0, pa.field(INDEX_COLUMN, pa.int64(), nullable=False))


@dataclass(frozen=True, slots=True)
class OutputLayout:
    """The output's columns: which come from the input (joined to the results) and which from results."""

    schema: pa.Schema  # the whole output
    passthrough_names: list[str]  # input column names carried over
    output_names: list[str]  # the same columns as named in the output (clashes renamed)
    passthrough_schema: pa.Schema
    results_schema: pa.Schema

    @classmethod
    def of(cls, passthrough: pa.Schema, id_column: str | None, *, reserved: tuple[str, ...] = ()) -> OutputLayout:
        """The layout for an input's passthrough columns; an input `id` that is the row id is not repeated.

        `reserved`: more output column names an input column must not take (renamed like a clash).
        """
        if id_column == "id" and "id" in passthrough.names:
            passthrough = passthrough.remove(passthrough.get_field_index("id"))
        schema, renames = output_schema(passthrough, reserved=reserved)
        output_names = [renames.get(n, n) for n in passthrough.names]
        kept = set(output_names)
        return cls(
            schema,
            passthrough.names,
            output_names,
            pa.schema([f for f in schema if f.name in kept]),
            pa.schema([f for f in schema if f.name not in kept]),
        )

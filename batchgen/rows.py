"""Turns one input row into one `/v1/chat/completions` body (pure).

Messages come from a messages column (a list of `{role, content, ...}`, or its JSON text) or from
a prompt column (plain text, with an optional system prompt). Columns named like request fields
override the config defaults for their row; an `extra` column is merged last. A bad row gives a
`RowProblem` that names the column, never an exception that would stop the run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from batchgen.errors import ConfigError, InputError, ValidationError
from batchgen.records import RowProblem, RowRequest
from batchgen.validation import ROLES, validate_fields, validate_messages, validate_request, validate_tool_choice

__all__ = ["OVERRIDE_FIELDS", "RowMapper"]

# Columns that override the request field of the same name for their row.
OVERRIDE_FIELDS = (
    "temperature", "max_tokens", "max_completion_tokens", "top_p", "top_k", "min_p", "stop", "seed", "n",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "tools", "tool_choice", "response_format",
    "logprobs", "top_logprobs", "chat_template_kwargs", "reasoning_effort", "structured_outputs",
)  # fmt: skip
# Fields whose value is an object or list: a JSON string in a column is decoded first.
JSON_FIELDS = frozenset({"tools", "response_format", "chat_template_kwargs", "structured_outputs", "stop"})


def _drop_nulls(value: Any) -> Any:
    # Arrow structs give every field to every row; absent fields come back as None.
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


_ONLY_STR = frozenset({str})


def _usual_messages(messages: Any) -> bool:
    """True for the usual conversation: each message exactly `{role: a known role, content: str}`.

    Such messages need neither cleaning nor `validate_messages`: one pass instead of two
    (measured: ~1 µs a row of two messages). Anything else takes the careful path.
    """
    if type(messages) is not list or not messages:
        return False
    for message in messages:
        if type(message) is not dict or len(message) != 2:
            return False
        role = message.get("role")
        if type(role) is not str or role not in ROLES or type(message.get("content")) is not str:
            return False
    return True


def _clean_message(message: Any) -> Any:
    # The common message is {role: str, content: str}: keep it as it is, without a copy.
    if type(message) is dict and not set(map(type, message.values())) <= _ONLY_STR:
        return _drop_nulls(message)
    return message


def _as_mapping(value: Any) -> Any:
    if isinstance(value, list) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return dict(value)  # an Arrow map column arrives as a list of (key, value) pairs
    return value


class RowMapper:
    """Maps rows of one input to request bodies.

    Args:
        columns: the input's columns (checked once, so a missing column stops the run up front).
        fmt: "parquet", "jsonl" or "openai-batch".
        model: the model every request uses unless the row's body names one.
        defaults: request fields from the config (sampling defaults and `extra`).
        messages_column / prompt_column / system_prompt / id_column: the mapping settings.
        stream: ask for SSE (and usage in the stream).
    """

    def __init__(
        self,
        columns: Sequence[str],
        *,
        fmt: str,
        model: str,
        defaults: Mapping[str, Any],
        messages_column: str = "messages",
        prompt_column: str = "prompt",
        system_prompt: str | None = None,
        id_column: str | None = None,
        stream: bool = False,
    ) -> None:
        self.defaults = dict(defaults)
        try:  # once here, so a bad default is a config error rather than an error on every row
            validate_fields(self.defaults, self.defaults)
        except ValidationError as exc:
            raise ConfigError(f"config: {exc}") from exc
        self.system_prompt = system_prompt
        self.stream = stream
        self.model = model
        names = set(columns)
        self.id_column: str | None
        if fmt == "openai-batch":
            self.mode, self.text_column, self.id_column = "body", "body", "custom_id"
        else:
            if messages_column in names:
                self.mode, self.text_column = "messages", messages_column
            elif prompt_column in names:
                self.mode, self.text_column = "prompt", prompt_column
            else:
                raise InputError(
                    f"the input has neither a {messages_column!r} nor a {prompt_column!r} column "
                    f"(columns: {', '.join(columns) or 'none'}); set --messages-column or --prompt-column"
                )
            if id_column is not None and id_column not in names:
                raise InputError(f"id column {id_column!r} is not in the input (columns: {', '.join(columns)})")
            self.id_column = id_column or next((c for c in ("id", "custom_id") if c in names), None)
        self.overrides = [f for f in OVERRIDE_FIELDS if f in names and f != self.text_column]
        self.has_extra = "extra" in names and self.text_column != "extra"
        self.has_system = "system" in names and self.mode == "prompt"

    @property
    def model(self) -> str:
        return self._model

    @model.setter
    def model(self, model: str) -> None:
        # Every row's body starts as a copy of this: the model, then the config defaults.
        self._model = model
        self._base = {"model": model, **self.defaults}
        if not self.stream:
            self._base.pop("stream", None)

    @property
    def columns_used(self) -> list[str]:
        """The input columns this mapper reads (the rest need not be decoded)."""
        used = [self.text_column, *self.overrides]
        if self.id_column is not None:
            used.append(self.id_column)
        if self.has_extra:
            used.append("extra")
        if self.has_system:
            used.append("system")
        return used

    def row_id(self, index: int, values: Mapping[str, Any] | None) -> str | None:
        """The row's id as text; None when the id column holds null."""
        if self.id_column is None:
            return str(index)
        value = None if values is None else values.get(self.id_column)
        if value is None:
            return None
        return value if isinstance(value, str) else str(value)

    def map(self, index: int, where: str, values: Mapping[str, Any]) -> RowRequest | RowProblem:
        row_id = self.row_id(index, values)
        if row_id is None:
            return RowProblem(index, None, f"{where}: column {self.id_column!r} is null; every row needs an id")
        try:
            body, from_row, usual = self._body(values)
            self._finish(body)
            if self.mode == "body":
                validate_request(body)  # the row's body may replace anything, the model included
            else:  # the defaults were checked once: only what the row brought
                if not usual:
                    validate_messages(body["messages"])
                validate_fields(body, from_row)
                validate_tool_choice(body)
        except ValidationError as exc:
            root = exc.field.split("[")[0].split(".")[0]
            origin = self._origin(root, from_row)
            message = str(exc)
            if root == "messages" and self._added_system(values, body):
                message = _shift_message_numbers(message)  # number messages as the row has them
            return RowProblem(index, row_id, f"{where}: {origin}: {message}")
        except _ColumnError as exc:
            return RowProblem(index, row_id, f"{where}: column {exc.column!r}: {exc.message}")
        return RowRequest(index, row_id, body)

    def _origin(self, root: str, from_row: dict[str, str]) -> str:
        if root == "messages" and self.mode != "body":
            return f"column {self.text_column!r}"
        column = from_row.get(root)
        return "config" if column is None else f"column {column!r}"

    def _added_system(self, values: Mapping[str, Any], body: dict[str, Any]) -> bool:
        """Whether the request's first message is the config's system prompt, not one of the row's."""
        if self.mode != "messages" or not self.system_prompt:
            return False
        messages = body.get("messages")
        row = values.get(self.text_column)
        return isinstance(messages, list) and isinstance(row, (list, str)) and len(messages) > 0 and (
            messages[0] == {"role": "system", "content": self.system_prompt}
            and not (isinstance(row, list) and row and isinstance(row[0], dict) and row[0].get("role") == "system")
        )  # fmt: skip

    def _body(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str], bool]:
        """The request body; for each field the row set, the column it came from; and whether the
        messages are the usual kind, already checked (`_usual_messages`)."""
        body = self._base.copy()
        from_row: dict[str, str] = {}
        if self.mode == "body":
            row_body = values.get("body")
            if not isinstance(row_body, dict):
                raise _ColumnError("body", "must be a JSON object")
            body.update(row_body)  # the row's own request wins; defaults fill the gaps
            from_row.update(dict.fromkeys(row_body, "body"))
            return body, from_row, False
        body["messages"], usual = self._messages(values)
        for name in self.overrides:
            value = values.get(name)
            if value is None:
                continue
            body[name] = self._decode(name, value)
            from_row[name] = name
        if self.has_extra:
            extra = _as_mapping(self._decode("extra", values.get("extra")))
            if extra == []:
                extra = None  # an empty Arrow map column
            if extra is not None:
                if not isinstance(extra, dict):
                    raise _ColumnError("extra", f"must be an object of request fields, got {type(extra).__name__}")
                extra = _drop_nulls(extra)
                body.update(extra)
                from_row.update(dict.fromkeys(extra, "extra"))
        return body, from_row, usual

    def _finish(self, body: dict[str, Any]) -> None:
        if self.stream:
            body["stream"] = True
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        elif self.mode != "body":
            body.pop("stream", None)

    @staticmethod
    def _decode(column: str, value: Any) -> Any:
        if isinstance(value, str) and (column in JSON_FIELDS or column == "extra" or value[:1] in ("{", "[")):
            if column == "stop" and value[:1] != "[":
                return value
            try:
                return orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                if column == "stop":
                    return value  # a stop string that only starts like a list, e.g. "[/INST]"
                raise _ColumnError(column, f"is not valid JSON ({exc})") from exc
        if column == "tool_choice" and isinstance(value, dict):
            return _drop_nulls(value)
        if isinstance(value, (dict, list)):
            return _drop_nulls(_as_mapping(value))
        return value

    def _messages(self, values: Mapping[str, Any]) -> tuple[Any, bool]:
        """The row's conversation, and whether it is the usual kind (then already checked)."""
        column = self.text_column
        value = values.get(column)
        if self.mode == "prompt":
            if not isinstance(value, str) or not value:
                got = "null" if value is None else repr(value)[:60]
                raise _ColumnError(column, f"must be a non-empty string, got {got}")
            system = values.get("system") if self.has_system else None
            system = system or self.system_prompt
            messages = [{"role": "user", "content": value}]
            # A system text from a column is checked by validate_messages.
            return ([{"role": "system", "content": system}, *messages] if system else messages), False
        if value is None:
            raise _ColumnError(column, "is null; every row needs a conversation")
        if isinstance(value, str):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise _ColumnError(column, f"is not valid JSON ({exc})") from exc
        usual = _usual_messages(value)
        if isinstance(value, list):
            if not usual:
                value = [_clean_message(m) for m in value]
            if self.system_prompt and not any(isinstance(m, dict) and m.get("role") == "system" for m in value):
                value = [{"role": "system", "content": self.system_prompt}, *value]
        return value, usual


def _shift_message_numbers(message: str) -> str:
    return re.sub(r"messages\[(\d+)\]", lambda m: f"messages[{int(m.group(1)) - 1}]", message)


class _ColumnError(Exception):
    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column
        self.message = message

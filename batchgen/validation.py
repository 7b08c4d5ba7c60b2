"""Checks a chat-completions request body before it is sent (pure).

Each failure raises `ValidationError` naming the field and the bad value, so a bad row or call
never costs a network round trip. Fields batchgen does not know are passed through untouched:
vLLM accepts many extensions, and the server is the authority on those.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from batchgen.errors import ValidationError

__all__ = ["ROLES", "validate_fields", "validate_messages", "validate_request", "validate_tool_choice"]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
TOOL_CHOICE_WORDS = frozenset({"auto", "none", "required"})


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_temperature(value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or not 0 <= value <= 2:
        raise ValidationError("temperature", f"must be a finite number in [0, 2], got {_short(value)}", value)


def _check_top_p(value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or not 0 < value <= 1:
        raise ValidationError("top_p", f"must be a number in (0, 1], got {_short(value)}", value)


def _positive_int(field: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not _is_int(value) or value < 1:
            raise ValidationError(field, f"must be an integer >= 1, got {_short(value)}", value)

    return check


def _check_top_k(value: Any) -> None:
    if not _is_int(value) or value < -1:
        raise ValidationError("top_k", f"must be an integer that is -1, 0 or >= 1, got {_short(value)}", value)


def _check_stop(value: Any) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValidationError("stop", f"must be a string or a list of strings, got {_short(value)}", value)


def _check_seed(value: Any) -> None:
    if not _is_int(value):
        raise ValidationError("seed", f"must be an integer, got {_short(value)}", value)


def _check_finite(field: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not _is_number(value) or not math.isfinite(value):
            raise ValidationError(field, f"must be a finite number, got {_short(value)}", value)

    return check


def _check_tool_choice(value: Any) -> None:
    if isinstance(value, str) and value in TOOL_CHOICE_WORDS:
        return
    if (
        isinstance(value, dict)
        and value.get("type") == "function"
        and isinstance(value.get("function"), dict)
        and isinstance(value["function"].get("name"), str)
    ):
        return
    raise ValidationError(
        "tool_choice",
        'must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}, '
        f"got {_short(value)}",
        value,
    )


def _check_tools(value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise ValidationError("tools", f"must be a non-empty list of function specs, got {_short(value)}", value)
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function" or not isinstance(fn.get("name"), str):
            raise ValidationError(
                f"tools[{i}]",
                f'must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}, got {_short(tool)}',
                tool,
            )


def _check_response_format(value: Any) -> None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValidationError("response_format", f'must be an object with a "type", got {_short(value)}', value)


def _check_bool(field: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not isinstance(value, bool):
            raise ValidationError(field, f"must be true or false, got {_short(value)}", value)

    return check


def _check_object(field: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not isinstance(value, dict):
            raise ValidationError(field, f"must be an object, got {_short(value)}", value)

    return check


def _check_model(value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValidationError("model", f"must be a non-empty string, got {_short(value)}", value)


# A route table instead of an if/elif chain: one checker per known field.
_CHECKS: dict[str, Callable[[Any], None]] = {
    "model": _check_model,
    "temperature": _check_temperature,
    "top_p": _check_top_p,
    "max_tokens": _positive_int("max_tokens"),
    "max_completion_tokens": _positive_int("max_completion_tokens"),
    "n": _positive_int("n"),
    "top_k": _check_top_k,
    "stop": _check_stop,
    "seed": _check_seed,
    "min_p": _check_finite("min_p"),
    "presence_penalty": _check_finite("presence_penalty"),
    "frequency_penalty": _check_finite("frequency_penalty"),
    "repetition_penalty": _check_finite("repetition_penalty"),
    "tools": _check_tools,
    "tool_choice": _check_tool_choice,
    "response_format": _check_response_format,
    "stream": _check_bool("stream"),
    "logprobs": _check_bool("logprobs"),
    "chat_template_kwargs": _check_object("chat_template_kwargs"),
    "stream_options": _check_object("stream_options"),
}


def validate_messages(messages: Any, field: str = "messages") -> None:
    """Check a conversation: a non-empty list of `{role, content, ...}` objects."""
    if not isinstance(messages, list) or not messages:
        raise ValidationError(field, f"must be a non-empty list of message objects, got {_short(messages)}", messages)
    for i, message in enumerate(messages):
        # The usual message, {role, content: str}, passes in one test; others are checked in full.
        if type(message) is dict:
            role = message.get("role")
            if type(role) is str and role in ROLES and type(message.get("content")) is str:
                continue
        _check_message(message, f"{field}[{i}]")


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise ValidationError(where, f"must be an object with role and content, got {_short(message)}", message)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:  # (a list is unhashable: test the type first)
        raise ValidationError(where + ".role", f"must be one of {', '.join(sorted(ROLES))}, got {_short(role)}", role)
    content = message.get("content")
    if content is None:
        # Only an assistant turn that made tool calls may have no content.
        if role == "assistant" and message.get("tool_calls"):
            return
        raise ValidationError(where + ".content", "is missing", None)
    if not isinstance(content, str) and not (
        isinstance(content, list) and all(isinstance(part, dict) and "type" in part for part in content)
    ):
        raise ValidationError(
            where + ".content",
            f"must be a string or a list of content parts ({{'type': ...}}), got {_short(content)}",
            content,
        )


def validate_request(body: dict[str, Any]) -> None:
    """Check every field batchgen knows; unknown fields pass through.

    Raises:
        ValidationError: naming the first bad field and its value.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValidationError("model", f"is required and must be a non-empty string, got {_short(model)}", model)
    validate_messages(body.get("messages"))
    validate_fields(body, body)
    validate_tool_choice(body)


def validate_fields(body: dict[str, Any], names: Iterable[str]) -> None:
    """Check the fields `names` of `body` that batchgen knows (null ones are left out of a request)."""
    for key in names:
        check = _CHECKS.get(key)
        if check is not None:
            value = body.get(key)
            if value is not None:
                check(value)


def validate_tool_choice(body: dict[str, Any]) -> None:
    """A `tool_choice` other than "none" needs tools (they may come from elsewhere than the choice)."""
    if "tool_choice" in body and body["tool_choice"] not in (None, "none") and not body.get("tools"):
        raise ValidationError("tool_choice", "is set but no tools are given", body["tool_choice"])

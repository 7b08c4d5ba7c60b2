"""Pure parsing of what servers send: chat completions, stream chunks and error bodies.

Accepts every vLLM era (see the project's wire-format notes): reasoning under `reasoning` or
`reasoning_content`, nested or flat error envelopes, any optional key missing or null.
Anything that is not a chat completion raises `IncompleteResponseError` with the reason.
"""

from __future__ import annotations

from typing import Any

import orjson

from batchgen.errors import APIStatusError, IncompleteResponseError, status_error
from batchgen.types import ChatCompletionResponse, Choice, Function, TokenLogprob, ToolCall, TopLogprob, Usage

__all__ = [
    "INT_OR_NONE",
    "STR_OR_NONE",
    "bad_type",
    "error_from_body",
    "error_from_event",
    "opt_str",
    "parse_completion",
    "parse_logprobs",
    "parse_usage",
    "read_response",
    "reasoning_of",
    "stop_reason",
]

# Sets of types: one subset test checks several fields of the usual answer at once.
STR_OR_NONE = frozenset({str, type(None)})
INT_OR_NONE = frozenset({int, type(None)})
STOP_TYPES = frozenset({str, int, type(None)})
_MAX_ERROR_TEXT = 500  # keep error rows readable when a proxy returns a whole HTML page


def bad_type(where: str, value: Any, expected: str) -> IncompleteResponseError:
    return IncompleteResponseError(
        f"malformed response: {where} is {type(value).__name__}, expected {expected}"
    )


def opt_str(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise bad_type(where, value, "a string or null")


def _opt_int(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise bad_type(where, value, "an integer or null")


def reasoning_of(message: dict[str, Any]) -> Any:
    """The reasoning text of a message or delta, unchecked: vLLM renamed `reasoning_content` to
    `reasoning` (v0.12-v0.15 send both, v0.16+ only the new one, older only the old one)."""
    value = message.get("reasoning")
    return message.get("reasoning_content") if value is None else value


def _detail(value: dict[str, Any], key: str, name: str) -> Any:
    details = value.get(key)
    return details.get(name) if type(details) is dict else None


def parse_usage(value: Any) -> Usage | None:
    """Read a `usage` object; None when the server sent none."""
    if value is None:
        return None
    if type(value) is not dict:
        raise bad_type("usage", value, "an object")
    prompt, completion, total = value.get("prompt_tokens"), value.get("completion_tokens"), value.get("total_tokens")
    cached = _detail(value, "prompt_tokens_details", "cached_tokens")
    reasoning = _detail(value, "completion_tokens_details", "reasoning_tokens")
    # The usual case: one check, no field names built.
    if {type(prompt), type(completion), type(total), type(cached), type(reasoning)} <= INT_OR_NONE:
        return Usage(prompt, completion, total, cached, reasoning)
    return Usage(
        prompt_tokens=_opt_int(prompt, "usage.prompt_tokens"),
        completion_tokens=_opt_int(completion, "usage.completion_tokens"),
        total_tokens=_opt_int(total, "usage.total_tokens"),
        cached_tokens=_opt_int(cached, "usage.prompt_tokens_details.cached_tokens"),
        reasoning_tokens=_opt_int(reasoning, "usage.completion_tokens_details.reasoning_tokens"),
    )


def _logprob(value: Any, where: str) -> float:
    if (type(value) is float or type(value) is int) and value == value:  # not NaN
        return float(value)
    raise bad_type(where, value, "a number")


def _token_bytes(value: Any, where: str) -> list[int] | None:
    if value is None or (type(value) is list and all(type(b) is int for b in value)):
        return value
    raise bad_type(where, value, "a list of byte values or null")


def _top_logprobs(value: Any, where: str) -> list[TopLogprob]:
    if value is None:
        return []
    if type(value) is not list:
        raise bad_type(where, value, "a list")
    tops = []
    for i, item in enumerate(value):
        if type(item) is not dict:
            raise bad_type(f"{where}[{i}]", item, "an object")
        token = item.get("token")
        if type(token) is not str:
            raise bad_type(f"{where}[{i}].token", token, "a string")
        tops.append(
            TopLogprob(token, _logprob(item.get("logprob"), f"{where}[{i}].logprob"),
                       _token_bytes(item.get("bytes"), f"{where}[{i}].bytes"))
        )
    return tops


def parse_logprobs(value: Any, where: str = "logprobs") -> list[TokenLogprob] | None:
    """Read a choice's `logprobs` (`{"content": [...]}`, or the `content` list itself, as an
    assembled stream holds it); None when the server sent none."""
    if value is None:
        return None
    if type(value) is dict:
        value, where = value.get("content"), where + ".content"
        if value is None:
            return None
    if type(value) is not list:
        raise bad_type(where, value, "a list")
    tokens = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if type(item) is not dict:
            raise bad_type(at, item, "an object")
        token = item.get("token")
        if type(token) is not str:
            raise bad_type(at + ".token", token, "a string")
        tokens.append(
            TokenLogprob(
                token,
                _logprob(item.get("logprob"), at + ".logprob"),
                _token_bytes(item.get("bytes"), at + ".bytes"),
                _top_logprobs(item.get("top_logprobs"), at + ".top_logprobs"),
            )
        )
    return tokens


def stop_reason(value: Any) -> str | int | None:
    """vLLM's `stop_reason`: the stop string, or the stop token id; None at EOS or length.

    Any other value is kept as its JSON text: an odd extension field must not cost the answer.
    """
    if value is None or type(value) is str or type(value) is int:
        return value
    return orjson.dumps(value).decode()


def _tool_calls(value: Any, where: str) -> list[ToolCall]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_type(where, value, "a list")
    calls = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad_type(f"{where}[{i}]", item, "an object")
        fn = item.get("function")
        if not isinstance(fn, dict):
            raise bad_type(f"{where}[{i}].function", fn, "an object")
        arguments = fn.get("arguments")
        if not isinstance(arguments, str):
            # Some servers send parsed objects; keep a JSON string so the column type never changes.
            arguments = "" if arguments is None else orjson.dumps(arguments).decode()
        calls.append(
            ToolCall(
                id=opt_str(item.get("id"), f"{where}[{i}].id"),
                type=opt_str(item.get("type"), f"{where}[{i}].type") or "function",
                function=Function(name=opt_str(fn.get("name"), f"{where}[{i}].function.name"), arguments=arguments),
            )
        )
    return calls


def _choice(value: Any, position: int) -> Choice:
    if type(value) is dict:
        message = value.get("message")
        if type(message) is dict:
            role, content = message.get("role"), message.get("content")
            reasoning = reasoning_of(message)
            finish, index = value.get("finish_reason"), value.get("index", position)
            calls = message.get("tool_calls")
            texts_ok = {type(role), type(content), type(reasoning), type(finish)} <= STR_OR_NONE
            stop, logprobs = value.get("stop_reason"), value.get("logprobs")
            no_calls = calls is None or calls == []  # not `not calls`: "" or {} is malformed, not empty
            if type(index) is int and texts_ok and no_calls and logprobs is None and type(stop) in STOP_TYPES:
                # The usual answer, checked in one pass; anything else takes the careful path below.
                return Choice(index, role, content, reasoning, [], finish, stop, None)
    return _checked_choice(value, position)


def _checked_choice(value: Any, position: int) -> Choice:
    """`_choice` field by field, so a malformed answer names the field that is wrong."""
    where = f"choices[{position}]"
    if not isinstance(value, dict):
        raise bad_type(where, value, "an object")
    message = value.get("message")
    if not isinstance(message, dict):
        raise bad_type(where + ".message", message, "an object")
    index = value.get("index", position)
    if type(index) is not int:
        raise bad_type(where + ".index", index, "an integer")
    return Choice(
        index=index,
        role=opt_str(message.get("role"), where + ".message.role"),
        content=opt_str(message.get("content"), where + ".message.content"),
        reasoning_content=opt_str(reasoning_of(message), where + ".message.reasoning"),
        tool_calls=_tool_calls(message.get("tool_calls"), where + ".message.tool_calls"),
        finish_reason=opt_str(value.get("finish_reason"), where + ".finish_reason"),
        stop_reason=stop_reason(value.get("stop_reason")),
        logprobs=parse_logprobs(value.get("logprobs"), where + ".logprobs"),
    )


def parse_completion(raw: Any) -> ChatCompletionResponse:
    """Turn a decoded `/v1/chat/completions` body into a `ChatCompletionResponse`.

    Raises:
        IncompleteResponseError: the body is not a chat completion (no choices, wrong types).
    """
    if type(raw) is not dict:
        raise bad_type("the body", raw, "a JSON object")
    choices = raw.get("choices")
    if type(choices) is not list or not choices:
        raise IncompleteResponseError("malformed response: no choices in a 200 response")
    response_id, obj, created, model = raw.get("id"), raw.get("object"), raw.get("created"), raw.get("model")
    if not ({type(response_id), type(obj), type(model)} <= STR_OR_NONE and type(created) in INT_OR_NONE):
        response_id, obj, model = opt_str(response_id, "id"), opt_str(obj, "object"), opt_str(model, "model")
        created = _opt_int(created, "created")
    return ChatCompletionResponse(
        raw,
        response_id,
        obj,
        created,
        model,
        [_choice(c, i) for i, c in enumerate(choices)],
        parse_usage(raw.get("usage")),
    )


def read_response(answer: Any) -> ChatCompletionResponse:
    """`Client.exchange`'s reader for the typed API: a decoded body is parsed, an assembled stream kept."""
    return answer if type(answer) is ChatCompletionResponse else parse_completion(answer)


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= _MAX_ERROR_TEXT else text[:_MAX_ERROR_TEXT] + "…"


def _from_error_object(status: int, err: Any, **details: Any) -> APIStatusError:
    if isinstance(err, dict):
        code = err.get("code")
        return status_error(
            status,
            _text(err.get("message") or err.get("type") or "(no message)"),
            type=err.get("type"),
            code=code,
            param=err.get("param"),
            **details,
        )
    return status_error(status, "(no message)" if err is None else _text(err), **details)


def error_from_body(status: int, body: bytes, **details: Any) -> APIStatusError:
    """Build a readable status error from any error body a server or proxy may send.

    Handles the nested `{"error": {...}}` envelope (vLLM >= 0.10.1, OpenAI), the flat
    `{"object": "error", ...}` one (older vLLM), `{"error": "Unauthorized"}`, FastAPI's
    `{"detail": ...}`, and non-JSON or empty bodies.
    """
    if not body.strip():
        return status_error(status, "(empty response body)", **details)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return status_error(status, _text(body.decode("utf-8", "replace").strip()), **details)
    if isinstance(data, dict):
        if "error" in data:
            return _from_error_object(status, data["error"], **details)
        if "message" in data:  # flat envelope
            return _from_error_object(status, data, **details)
        if "detail" in data:
            return status_error(status, _text(data["detail"]), **details)
    return status_error(status, _text(data), **details)


def error_from_event(data: dict[str, Any]) -> APIStatusError:
    """An `{"error": ...}` event inside a 200 stream: the status comes from the error's code."""
    err = data.get("error")
    code = err.get("code") if isinstance(err, dict) else None
    status = code if isinstance(code, int) and 400 <= code <= 599 else 500
    return _from_error_object(status, err)

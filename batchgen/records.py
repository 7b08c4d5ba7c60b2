"""Result records: one flat dict per input row, the result columns of `batchgen.io.schema` (pure).

The input's own columns are not here: the final merge joins them from the input in Arrow.

A success fills the answer columns; a failure fills `error`, `error_type` and `status_code`
and leaves the answer columns null, so every input row has exactly one record either way.
"""

from __future__ import annotations

from typing import Any

from batchgen.errors import APIStatusError
from batchgen.io.schema import INDEX_COLUMN
from batchgen.rows import RowProblem
from batchgen.types import Choice
from batchgen.worker import Outcome

__all__ = ["outcome_record", "problem_record"]

_EMPTY_ANSWER = {
    "content": None,
    "reasoning_content": None,
    "tool_calls": None,
    "finish_reason": None,
    "stop_reason": None,
    "logprobs": None,
    "choices": None,
    "usage": None,
    "model": None,
    "response_id": None,
    "raw": None,
}


def _stop_text(choice: Choice) -> str | None:
    stop = choice.stop_reason
    return stop if stop is None or type(stop) is str else str(stop)  # a stop token id, as text


def _logprobs(choice: Choice) -> list[dict[str, Any]] | None:
    return None if choice.logprobs is None else [token.to_dict() for token in choice.logprobs]


def _tool_calls(choice: Choice) -> list[dict[str, Any]]:
    return [call.to_dict() for call in choice.tool_calls] if choice.tool_calls else []


def _choice_record(choice: Choice) -> dict[str, Any]:
    return {
        "index": choice.index,
        "content": choice.content,
        "reasoning_content": choice.reasoning_content,
        "tool_calls": _tool_calls(choice),
        "finish_reason": choice.finish_reason,
        "stop_reason": _stop_text(choice),
        "logprobs": _logprobs(choice),
    }


def outcome_record(outcome: Outcome, *, keep_raw: bool = False) -> dict[str, Any]:
    """The record of a request that was sent (answered, or failed after its retries).

    The answer columns are the first choice's; `choices` holds them all when there are several.
    """
    request = outcome.request
    response = outcome.response
    if response is not None:
        choices = response.choices
        choice = choices[0]
        usage = response.usage
        return {
            INDEX_COLUMN: request.index,
            "id": request.row_id,
            "content": choice.content,
            "reasoning_content": choice.reasoning_content,
            "tool_calls": _tool_calls(choice),
            "finish_reason": choice.finish_reason,
            "stop_reason": None if choice.stop_reason is None else _stop_text(choice),
            "logprobs": None if choice.logprobs is None else _logprobs(choice),
            "choices": [_choice_record(c) for c in choices] if len(choices) > 1 else None,
            "usage": None if usage is None else usage.to_dict(),
            "model": response.model,
            "response_id": response.id,
            "error": None,
            "error_type": None,
            "status_code": 200,
            "ttft_s": response.ttft_s,
            "attempts": outcome.attempts,
            "latency_s": outcome.latency_s,
            "raw": response.raw_json() if keep_raw else None,
        }
    error = outcome.error
    assert error is not None
    record: dict[str, Any] = {INDEX_COLUMN: request.index, "id": request.row_id}
    record.update(_EMPTY_ANSWER)
    record.update(
        error=str(error),
        error_type=error.error_type,
        status_code=error.status_code if isinstance(error, APIStatusError) else None,
        ttft_s=None,
        attempts=outcome.attempts,
        latency_s=outcome.latency_s,
    )
    return record


def problem_record(problem: RowProblem) -> dict[str, Any]:
    """The record of a row that never became a request (it could not be read or was invalid)."""
    record: dict[str, Any] = {INDEX_COLUMN: problem.index, "id": problem.row_id}
    record.update(_EMPTY_ANSWER)
    record.update(
        error=problem.message,
        error_type=problem.error_type,
        status_code=None,
        attempts=0,
        latency_s=None,
        ttft_s=None,
    )
    return record

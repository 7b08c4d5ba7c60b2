"""The row contract: what one input row is at each stage of a run, and the record it ends as (pure).

    SourceRow ──RowMapper──▶ RowRequest ──WorkerPool──▶ Outcome ──outcome_record──▶ ResultRecord
        │                        (or)
        └──────────────────▶ RowProblem ──────────────problem_record─────────────▶ ResultRecord

A `ResultRecord` holds the result columns of `batchgen.io.schema` for one row; the input's own
columns are not here (the final merge joins them from the input in Arrow). A success fills the
answer columns; a failure fills `error`, `error_type` and `status_code` and leaves the answer
columns null, so every input row has exactly one record either way.

Adding an output column the parser already produces: its field in `io/schema.py`, its key here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from batchgen.errors import APIError, APIStatusError
from batchgen.parsing import INT_OR_NONE, STR_OR_NONE, parse_completion, parse_usage, reasoning_of
from batchgen.types import ChatCompletionResponse, Choice, Reply

__all__ = [
    "ERROR_COLUMN",
    "INDEX_COLUMN",
    "Outcome",
    "ResultRecord",
    "RowProblem",
    "RowRequest",
    "SourceRow",
    "outcome_record",
    "problem_record",
    "read_answer",
    "response_columns",
    "unstorable_record",
    "usage_record",
]

INDEX_COLUMN = "_index"  # the input row number: a part-file column, the key of resume and merge
ERROR_COLUMN = "error"  # null on success: what resume and the summary read to tell rows apart


@dataclass(slots=True)  # not frozen: one is built per row, and a frozen init costs 3x
class SourceRow:
    """One input row, decoded or not.

    Args:
        index: 0-based row number among data rows (blank JSONL lines are not rows); it is the
            row's position in the final output.
        where: a locator for messages: "line 17" (1-based file line, JSONL) or "row 17" (0-based, Parquet).
        values: the decoded columns, or None when the row could not be decoded. An error row may
            still carry values (a column of the wrong type, an OpenAI batch line with a bad `url`)
            so the feeder can find the row's id for its error record.
        error: why the row is unusable, naming the line and the problem; None when the row is fine.
    """

    index: int
    where: str
    values: dict[str, Any] | None
    error: str | None = None


@dataclass(slots=True)
class RowRequest:
    """A row ready to send: its position, its id and the request body."""

    index: int
    row_id: str
    body: dict[str, Any]


@dataclass(slots=True)
class RowProblem:
    """A row that cannot become a request; it becomes an error row with this message."""

    index: int
    row_id: str | None  # None when the row's id itself could not be read
    message: str
    error_type: str = "invalid_row"


@dataclass(slots=True)
class Outcome:
    """What became of one request: a response, or the error that ended its last attempt."""

    request: RowRequest
    reply: Reply[dict[str, Any]] | None  # its value: the answer columns (`read_answer`)
    error: APIError | None
    attempts: int
    latency_s: float


class UsageRecord(TypedDict):
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None


# `_index` is not a Python identifier, hence the functional form.
ResultRecord = TypedDict(
    "ResultRecord",
    {
        "_index": int,
        "id": str | None,
        "content": str | None,
        "reasoning_content": str | None,
        "tool_calls": list[dict[str, Any]] | None,
        "finish_reason": str | None,
        "stop_reason": str | None,
        "logprobs": list[dict[str, Any]] | None,
        "choices": list[dict[str, Any]] | None,
        "usage": UsageRecord | None,
        "model": str | None,
        "response_id": str | None,
        "error": str | None,
        "error_type": str | None,
        "status_code": int | None,
        "attempts": int | None,
        "latency_s": float | None,
        "ttft_s": float | None,
        "endpoint": str | None,
        "raw": str | None,
    },
)


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


def _failure(
    index: int, row_id: str | None, error: str, error_type: str | None, status_code: int | None,
    attempts: int | None, latency_s: float | None, endpoint: str | None = None,
) -> ResultRecord:  # fmt: skip
    return {
        "_index": index, "id": row_id, "content": None, "reasoning_content": None, "tool_calls": None,
        "finish_reason": None, "stop_reason": None, "logprobs": None, "choices": None, "usage": None, "model": None,
        "response_id": None, "error": error, "error_type": error_type, "status_code": status_code,
        "attempts": attempts, "latency_s": latency_s, "ttft_s": None, "endpoint": endpoint, "raw": None,
    }  # fmt: skip


def read_answer(answer: Any) -> dict[str, Any]:
    """The answer columns of one answer: `Client.exchange`'s reader for a run.

    `answer` is a decoded body, or the assembled `ChatCompletionResponse` of a stream. The usual
    body (one choice, text fields, no tool calls or logprobs) is read in one pass, without the
    typed response in between (measured: ~5 µs a row, 5% of a run against a fast server); any
    other goes through `parse_completion`, which also names what is malformed.

    Raises:
        IncompleteResponseError: the body is not a chat completion.
    """
    if type(answer) is dict:
        choices = answer.get("choices")
        if type(choices) is list and len(choices) == 1 and type(choice := choices[0]) is dict:
            message = choice.get("message")
            if type(message) is dict:
                content, reasoning = message.get("content"), reasoning_of(message)
                finish, stop, index = choice.get("finish_reason"), choice.get("stop_reason"), choice.get("index", 0)
                response_id, model = answer.get("id"), answer.get("model")
                types = {type(message.get("role")), type(content), type(reasoning), type(finish), type(stop),
                         type(response_id), type(answer.get("object")), type(model)}  # fmt: skip
                usage, calls = answer.get("usage"), message.get("tool_calls")
                if (
                    types <= STR_OR_NONE and type(index) is int and type(answer.get("created")) in INT_OR_NONE
                    and (calls is None or calls == []) and choice.get("logprobs") is None
                    and (usage is None or type(usage) is dict)
                ):  # fmt: skip
                    return {
                        "content": content, "reasoning_content": reasoning, "tool_calls": [],
                        "finish_reason": finish, "stop_reason": stop, "logprobs": None, "choices": None,
                        "usage": None if usage is None else usage_record(usage),
                        "model": model, "response_id": response_id, "ttft_s": None,
                    }  # fmt: skip
    if type(answer) is not ChatCompletionResponse:
        answer = parse_completion(answer)
    return response_columns(answer)


def usage_record(value: dict[str, Any]) -> dict[str, int | None]:
    """The usage column of a usage object (details flattened); the usual one without a `Usage` in between."""
    prompt, completion, total = value.get("prompt_tokens"), value.get("completion_tokens"), value.get("total_tokens")
    if (
        {type(prompt), type(completion), type(total)} <= INT_OR_NONE
        and value.get("prompt_tokens_details") is None and value.get("completion_tokens_details") is None
    ):  # fmt: skip
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total,
                "cached_tokens": None, "reasoning_tokens": None}  # fmt: skip
    usage = parse_usage(value)
    assert usage is not None
    return usage.to_dict()


def response_columns(response: ChatCompletionResponse) -> dict[str, Any]:
    """The answer columns of a typed response: the first choice's, and `choices` when there are several."""
    choices = response.choices
    columns = _choice_record(choices[0])
    del columns["index"]  # the first choice's index is no column of its own
    usage = response.usage
    columns.update(
        choices=[_choice_record(c) for c in choices] if len(choices) > 1 else None,
        usage=None if usage is None else usage.to_dict(),
        model=response.model,
        response_id=response.id,
        ttft_s=response.ttft_s,
    )
    return columns


def outcome_record(outcome: Outcome, *, keep_raw: bool = False) -> ResultRecord:
    """The record of a request that was sent (answered, or failed after its retries).

    An answer's columns are what `read_answer` made of it (the reply's value, completed here).
    """
    request = outcome.request
    reply = outcome.reply
    if reply is None:
        error = outcome.error
        assert error is not None
        status = error.status_code if isinstance(error, APIStatusError) else None
        return _failure(request.index, request.row_id, str(error), error.error_type, status,
                        outcome.attempts, outcome.latency_s, error.endpoint)  # fmt: skip
    record = reply.value
    record["_index"] = request.index
    record["id"] = request.row_id
    record["error"] = record["error_type"] = None
    record["status_code"] = 200
    record["attempts"] = outcome.attempts
    record["latency_s"] = outcome.latency_s
    record["endpoint"] = reply.endpoint
    record["raw"] = reply.raw_json() if keep_raw else None
    return record  # type: ignore[return-value]


def problem_record(problem: RowProblem) -> ResultRecord:
    """The record of a row that never became a request (it could not be read or was invalid)."""
    return _failure(problem.index, problem.row_id, problem.message, problem.error_type, None, 0, None)


def unstorable_record(record: ResultRecord, reason: str) -> ResultRecord:
    """An error record in place of an answer that Arrow cannot store (the row is kept, as an error)."""
    row_id, attempts, endpoint = record.get("id"), record.get("attempts"), record.get("endpoint")
    return _failure(
        record["_index"], row_id if isinstance(row_id, str) else None, f"the answer could not be stored: {reason}",
        "unexpected_error", None, attempts if type(attempts) is int and 0 <= attempts < 2**31 else None, None,
        endpoint if isinstance(endpoint, str) else None,
    )  # fmt: skip

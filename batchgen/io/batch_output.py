"""OpenAI Batch API / `vllm run-batch` output lines: how the final merge writes them, and reads them back.

One line per input row, in input order, so a `vllm run-batch` user can swap batchgen in without
changing what reads the results:

    {"id": "batch_req_…", "custom_id": …, "response": {"status_code": 200, "request_id": …, "body": <answer>}, "error": null}

Failures follow vLLM's run_batch (vllm-project/vllm, vllm/entrypoints/openai/run_batch.py at 0056ae7b,
`run_request`, read 2026-11): a server's error answer (an HTTP error status) is
`"response": {"status_code": <status>, "request_id": …, "body": null}` with the server's error
envelope (`ErrorResponse`: `{"error": {"message", "type", "param", "code"}}`) as `"error"`. A row that
got no answer (a bad input line, a timeout, a lost connection) has no response, as in OpenAI's format:
`"response": null, "error": {"code": <error_type>, "message": <error>}` (vLLM writes a made-up 400 and a
bare message there; batchgen does not claim a status no server sent). A rerun reads the lines back
into the result columns, so `--retry-failed` and resumed jobs merge old and new rows; a line that did
not change is written back byte for byte.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from batchgen.errors import APIError, APIStatusError, BatchgenError, OutputError, status_error
from batchgen.records import ERROR_COLUMN, ResultRecord, read_answer
from batchgen.types import Usage

__all__ = [
    "OPENAI_BATCH",
    "batch_lines",
    "batch_output_errors",
    "effective_output_format",
    "is_batch_output",
    "keep_error_body",
    "line_id",
    "line_record",
    "read_batch_output",
]

OPENAI_BATCH = "openai-batch"
_JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
_LINE_KEYS = frozenset({"id", "custom_id", "response", "error"})
# uuid5 namespaces of the line ids: one for rows with an id, one for rows whose id could not be read.
_ID_NAMESPACE = uuid.UUID("68cee22a-7086-47ba-971d-9f4e0075e3dd")
_ROW_NAMESPACE = uuid.UUID("f4fb491c-f3f7-4ac0-a5d7-e2f2570e032c")
_ANSWERED_TAIL = b'},"error":null}'  # after the spliced body of an answered row
_REFUSED_BODY = b'null},"error":'  # between a refused row's response head and its spliced error
_READ_CHUNK = 65_536


def effective_output_format(output_path: str, configured: str | None, input_format: str) -> str:
    """The format the output is written in: `configured` when given, else from the path's suffix,
    except that a `.jsonl` output of an openai-batch input is openai-batch (what `vllm run-batch`
    users expect from `-i batch.jsonl -o results.jsonl`).

    `output_path` is one `RunConfig` accepted (`.parquet` or `.jsonl`); any other suffix reads as Parquet.
    """
    if configured is not None:
        return configured
    if output_path.endswith(".jsonl") and input_format == OPENAI_BATCH:
        return OPENAI_BATCH
    return "jsonl" if output_path.lower().endswith(_JSON_LINES_SUFFIXES) else "parquet"


def line_id(custom_id: str | None, index: int) -> str:
    """The line's `id`: derived from the row's id, so a rerun or a re-merge writes the same one.

    A row whose id could not be read (a line that is not JSON) gets one from its position instead.
    """
    name = uuid.uuid5(_ID_NAMESPACE, custom_id) if custom_id is not None else uuid.uuid5(_ROW_NAMESPACE, str(index))
    return f"batch_req_{name.hex}"


def keep_error_body(record: ResultRecord, error: APIError) -> None:
    """Keep a server's error answer in the record's `raw`, as the envelope vLLM sends, for the line's `error`.

    The client keeps the envelope's fields, not its bytes; for vLLM (>= 0.10.1, the nested
    `{"error": {message, type, param, code}}`) this is the same JSON. Other errors keep `raw` null.
    """
    if isinstance(error, APIStatusError):
        code = error.status_code if error.code is None else error.code
        envelope = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": code}}
        record["raw"] = orjson.dumps(envelope).decode()


# ---------------------------------------------------------------- writing


def _head(line: str, custom_id: str | None, status: int, request_id: str | None) -> bytes:
    """A line with a response, up to where its body goes (shared by writing and reading back)."""
    return b'{"id":%b,"custom_id":%b,"response":{"status_code":%d,"request_id":%b,"body":' % (
        orjson.dumps(line), orjson.dumps(custom_id), status, orjson.dumps(request_id),
    )  # fmt: skip


def _one_line(raw: str) -> bytes:
    """A JSON text as received, on one line: spliced as is unless it spans lines (a pretty-printing server)."""
    data = raw.strip().encode()
    if b"\n" in data or b"\r" in data:
        # The stdlib, not orjson: it keeps integers beyond 64 bits that a server may send.
        data = json.dumps(json.loads(data), ensure_ascii=False, separators=(",", ":")).encode()
    return data


def batch_lines(table: pa.Table, start: int) -> Iterator[bytes]:
    """The rows of a merged window (`id` and the result columns; row 0 is input row `start`) as output lines.

    An answer's `body` is its `raw` JSON as received (a streamed answer's: the chat.completion that
    batchgen assembled from the chunks). `request_id` is the answer's own `id` (vLLM's
    `chatcmpl-<request id>`, the one in the server's logs), else the line's `id`.
    """
    names = ("id", "raw", ERROR_COLUMN, "error_type", "status_code", "response_id")
    ids, raws, errors, error_types, statuses, response_ids = (table.column(n).to_pylist() for n in names)
    for i, (custom_id, raw, error) in enumerate(zip(ids, raws, errors, strict=True)):
        line = line_id(custom_id, start + i)
        status = statuses[i]
        if error is None:
            if raw is None:  # answered by a run that kept no raw answers (another output format then)
                raw = orjson.dumps(_rebuilt_body(table.slice(i, 1).to_pylist()[0])).decode()
            head = _head(line, custom_id, 200 if status is None else status, response_ids[i] or line)
            yield head + _one_line(raw) + _ANSWERED_TAIL + b"\n"
        elif status is not None:
            envelope = raw if raw is not None else orjson.dumps(_envelope(error, error_types[i], status)).decode()
            yield _head(line, custom_id, status, line) + _REFUSED_BODY + _one_line(envelope) + b"}\n"
        else:
            failure = {"code": error_types[i] or "error", "message": error}
            yield orjson.dumps({"id": line, "custom_id": custom_id, "response": None, "error": failure}) + b"\n"


def _envelope(error: str, error_type: str | None, status: int) -> dict[str, Any]:
    """vLLM's error envelope from the columns of an error row that has no `raw` (an older run's)."""
    message = error.removeprefix(f"HTTP {status}: ")
    return {"error": {"message": message, "type": error_type, "param": None, "code": status}}


def _rebuilt_body(row: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion body made from an answer's columns, for an answer stored without `raw`."""
    choices = row["choices"] or [{"index": 0, **row}]
    usage = row["usage"]
    return {
        "id": row["response_id"],
        "object": "chat.completion",
        "model": row["model"],
        "choices": [
            {
                "index": c["index"],
                "message": {"role": "assistant", "content": c["content"], "reasoning_content": c["reasoning_content"],
                            "tool_calls": c["tool_calls"] or []},  # fmt: skip
                "logprobs": None if c["logprobs"] is None else {"content": c["logprobs"]},
                "finish_reason": c["finish_reason"],
                "stop_reason": c["stop_reason"],
            }
            for c in choices
        ],
        "usage": None if usage is None else Usage(**usage).to_wire(),
    }


# ---------------------------------------------------------------- reading back


def is_batch_output(path: Path) -> bool:
    """Whether a JSON-lines output holds openai-batch lines (told by its first line's keys, exactly
    those four; a plain JSONL output has every result column), whatever this run's format is."""
    try:
        with open(path, "rb") as file:
            first = next((line for line in file if line.strip()), None)
        obj = None if first is None else orjson.loads(first)
    except (OSError, orjson.JSONDecodeError):
        return False  # the plain reader then names the problem
    return isinstance(obj, dict) and obj.keys() == _LINE_KEYS


def _answered(obj: dict[str, Any]) -> bool:
    """An answered row: no error, a 200 response and its body."""
    response = obj.get("response")
    return (
        obj.get("error") is None and isinstance(response, dict) and response.get("status_code", 200) == 200
        and isinstance(response.get("body"), dict)
    )  # fmt: skip


def _message(error: Any) -> str:
    """The text of a line's `error`: vLLM's envelope, a flat `{message}` object, or a bare string."""
    if isinstance(error, dict):
        inner = error.get("error")
        found = (inner if isinstance(inner, dict) else error).get("message")
        if isinstance(found, str):
            return found
    if isinstance(error, str):
        return error
    return "(no message)" if error is None else orjson.dumps(error).decode()


def _spliced(line: bytes, head: bytes, tail: bytes, value: Any) -> str:
    """The JSON text between `head` and `tail` as written (exact bytes), else `value` encoded anew."""
    if line.startswith(head) and line.endswith(tail) and len(line) >= len(head) + len(tail):
        return line[len(head) : len(line) - len(tail)].decode()
    return orjson.dumps(value).decode()


def line_record(raw_line: bytes) -> dict[str, Any]:
    """The result columns (and `id`) of one output line, so that `batch_lines` writes it again.

    Raises:
        ValueError: not an openai-batch output line, or a body that is no chat completion.
    """
    obj = orjson.loads(raw_line)
    if not isinstance(obj, dict) or not _LINE_KEYS <= obj.keys():
        raise ValueError(f"not an OpenAI batch output line (keys: {sorted(obj) if isinstance(obj, dict) else obj!r})")
    line, custom_id, response, error = obj["id"], obj["custom_id"], obj["response"], obj["error"]
    text = raw_line.rstrip(b"\r\n")
    record: dict[str, Any] = {"id": custom_id}
    if _answered(obj):
        try:
            record.update(read_answer(response["body"]))
        except BatchgenError as exc:
            raise ValueError(f"its body is not a chat completion ({exc})") from exc
        status = response.get("status_code", 200)
        head = _head(line, custom_id, status, response.get("request_id"))
        record.update(status_code=status, raw=_spliced(text, head, _ANSWERED_TAIL, response["body"]))
    elif isinstance(response, dict) and isinstance(status := response.get("status_code"), int):
        head = _head(line, custom_id, status, response.get("request_id")) + _REFUSED_BODY
        record.update(
            status_code=status, raw=_spliced(text, head, b"}", error),
            error=f"HTTP {status}: {_message(error)}", error_type=status_error(status, "").error_type,
        )  # fmt: skip
    else:
        code = error.get("code") if isinstance(error, dict) else None
        record.update(error=_message(error), error_type=code if isinstance(code, str) else None)
    return record


def read_batch_output(path: Path, results: pa.Schema, chunk: int) -> Iterator[pa.Table]:
    """An earlier openai-batch output as tables of `results` (`id` and the result columns), `chunk` rows each.

    Raises:
        OutputError: a line that does not read back, naming it.
    """
    with open(path, "rb") as file:
        batch: list[dict[str, Any]] = []
        for number, raw_line in enumerate(file, start=1):
            try:
                batch.append(line_record(raw_line))
            except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
                raise OutputError(f"{path}: line {number}: {exc}") from exc
            if len(batch) >= chunk:
                yield pa.Table.from_pylist(batch, schema=results)
                batch = []
        yield pa.Table.from_pylist(batch, schema=results)


def batch_output_errors(path: Path) -> Iterator[list[str | None]]:
    """Per line of an earlier openai-batch output, in chunks: None for an answered row, else its error."""
    with open(path, "rb") as file:
        errors: list[str | None] = []
        for number, raw_line in enumerate(file, start=1):
            obj = orjson.loads(raw_line)
            if not isinstance(obj, dict):
                raise OutputError(f"{path}: line {number}: not an OpenAI batch output line")
            errors.append(None if _answered(obj) else _message(obj.get("error")))
            if len(errors) >= _READ_CHUNK:
                yield errors
                errors = []
        yield errors

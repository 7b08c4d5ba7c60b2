"""Bad responses: over-size bodies, invalid UTF-8, JSON of the wrong types, streams without [DONE] or stalling between chunks; each becomes a retry or an error row with a readable reason, and never costs another row."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from batchgen.pipeline import EXIT_ROW_ERRORS

from .conftest import (
    DONE,
    BadServer,
    Call,
    completion_body,
    echo,
    prompts,
    read_output,
    row_ids,
    run_args,
    run_bounded,
    run_cli_async,
    send_sse,
    sse,
    stream_events,
    write_prompts,
    yaml_config,
)

ROWS = 12
FLAKY, BROKEN = "r5", "r7"  # bad on the first attempt only / on every attempt
MAX_RETRIES = 2
LIMIT = 50_000  # max_response_bytes for the size cases
BIG = 200_000


def _json(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


def _plain(body: dict[str, Any]) -> Callable[[Call], Awaitable[web.StreamResponse]]:
    async def respond(call: Call) -> web.StreamResponse:
        return _json(orjson.dumps(body))

    return respond


def _raw(body: bytes) -> Callable[[Call], Awaitable[web.StreamResponse]]:
    async def respond(call: Call) -> web.StreamResponse:
        return _json(body)

    return respond


async def _chunked_big(call: Call) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.enable_chunked_encoding()  # no Content-Length: the limit must be enforced while reading
    await resp.prepare(call.request)
    await resp.write(orjson.dumps(completion_body("x" * BIG)))
    return resp


def _events(change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]], *, done: bool = True
            ) -> Callable[[Call], Awaitable[web.StreamResponse]]:
    """A stream whose events are the normal ones passed through `change`."""

    async def respond(call: Call) -> web.StreamResponse:
        frames = [sse(e) for e in change(stream_events(call.reply))]
        return await send_sse(call.request, [*frames, DONE] if done else frames)

    return respond


def _frames(*frames: bytes) -> Callable[[Call], Awaitable[web.StreamResponse]]:
    async def respond(call: Call) -> web.StreamResponse:
        return await send_sse(call.request, list(frames))

    return respond


async def _stall_between_chunks(call: Call) -> web.StreamResponse:
    frames = [*(sse(e) for e in stream_events(call.reply)), DONE]
    return await send_sse(call.request, frames, pause_before=2, pause_s=1.5)  # read_timeout is 0.3 s


async def _big_stream(call: Call) -> web.StreamResponse:
    events = stream_events(call.reply)
    piece = {**events[1], "choices": [{"index": 0, "delta": {"content": "x" * 1000}}]}
    return await send_sse(call.request, [sse(events[0]), *[sse(piece)] * (BIG // 1000), *(sse(e) for e in events[2:]), DONE])


async def _html_page(call: Call) -> web.StreamResponse:
    return web.Response(body=b"<html>Proxy login</html>", content_type="text/html")


def _first_delta(change: dict[str, Any]) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    def apply(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events[1] = {**events[1], "choices": [{"index": 0, "delta": change}]}
        return events

    return apply


def _every_event(**fields: Any) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    return lambda events: [{**e, **fields} for e in events]


def _tool_call(**fields: Any) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}, **fields}


@dataclass(frozen=True)
class Case:
    respond: Callable[[Call], Awaitable[web.StreamResponse]]
    error_type: str
    words: tuple[str, ...]  # must appear in the error row's message (case-insensitive)
    stream: bool = False
    retryable: bool = True
    options: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    # -- size limit (max_response_bytes): never worth a retry
    "body_over_limit": Case(_plain(completion_body("x" * BIG)), "response_too_large", ("limit",), retryable=False,
                            options={"max_response_bytes": LIMIT}),
    "chunked_body_over_limit": Case(_chunked_big, "response_too_large", ("limit",), retryable=False,
                                    options={"max_response_bytes": LIMIT}),
    "stream_over_limit": Case(_big_stream, "response_too_large", ("limit",), stream=True, retryable=False,
                              options={"max_response_bytes": LIMIT}),
    # -- bytes and JSON
    "invalid_utf8": Case(_raw(orjson.dumps(completion_body("caf")).replace(b'"caf"', b'"caf\xe9"')),
                         "incomplete_response", ("utf-8",)),
    "body_not_json": Case(_raw(b"<html>502 from a proxy, but with status 200</html>"), "incomplete_response", ("json",)),
    "body_not_an_object": Case(_raw(b"[1, 2]"), "incomplete_response", ("object",)),
    "no_choices": Case(_plain(completion_body("x", choices=[])), "incomplete_response", ("choices",)),
    # -- JSON of the wrong types
    "content_a_number": Case(_plain(completion_body(5)), "incomplete_response", ("content",)),
    "tool_calls_not_a_list": Case(_plain(completion_body(None, message={"tool_calls": "oops"})), "incomplete_response",
                                  ("tool_calls",)),
    "tool_call_function_a_string": Case(_plain(completion_body(None, message={"tool_calls": [_tool_call(function="f")]})),
                                        "incomplete_response", ("function",)),
    "tool_call_type_a_number": Case(_plain(completion_body(None, message={"tool_calls": [_tool_call(type=5)]})),
                                    "incomplete_response", ("type",)),
    "tool_call_id_a_number": Case(_plain(completion_body(None, message={"tool_calls": [_tool_call(id=7)]})),
                                  "incomplete_response", ("id",)),
    "usage_tokens_text": Case(_plain(completion_body("x", usage={"prompt_tokens": "3"})), "incomplete_response",
                              ("usage",)),
    "usage_tokens_over_int64": Case(_raw(orjson.dumps(completion_body("x")).replace(b'"prompt_tokens":3',
                                                                                    b'"prompt_tokens":99999999999999999999999')),
                                    "incomplete_response", ("usage",)),
    "finish_reason_a_number": Case(_plain(completion_body("x", choices=[{"index": 0, "finish_reason": 1, "message": {
        "role": "assistant", "content": "x"}}])), "incomplete_response", ("finish_reason",)),
    # -- streams
    "stream_without_done": Case(_events(lambda e: e, done=False), "incomplete_response", ("[done]",), stream=True),
    "stream_stalls_between_chunks": Case(_stall_between_chunks, "timeout", ("timed out",), stream=True,
                                         options={"read_timeout": 0.3}),
    "stream_event_not_json": Case(_frames(b"data: {\"choices\": [\n\n", DONE), "incomplete_response", ("json",),
                                  stream=True),
    "stream_invalid_utf8": Case(_frames(b'data: {"choices": [{"index": 0, "delta": {"content": "caf\xe9"}}]}\n\n', DONE),
                                "incomplete_response", ("utf-8",), stream=True),
    "stream_not_event_stream": Case(_html_page, "incomplete_response", ("content-type",), stream=True),
    "stream_content_a_number": Case(_events(_first_delta({"content": 5})), "incomplete_response", ("content",),
                                    stream=True),
    "stream_tool_calls_not_a_list": Case(_events(_first_delta({"tool_calls": "oops"})), "incomplete_response",
                                         ("tool_calls",), stream=True),
    "stream_tool_call_function_a_string": Case(_events(_first_delta({"tool_calls": [{"index": 0, "function": "f"}]})),
                                               "incomplete_response", ("function",), stream=True),
    "stream_tool_call_id_a_number": Case(_events(_first_delta({"tool_calls": [{"index": 0, **_tool_call(id=7)}]})),
                                         "incomplete_response", ("id",), stream=True),
    "stream_id_a_number": Case(_events(_every_event(id=123)), "incomplete_response", ("id",), stream=True),
    "stream_model_a_number": Case(_events(_every_event(model=7)), "incomplete_response", ("model",), stream=True),
    "stream_choice_index_text": Case(_events(lambda e: [e[0], {**e[1], "choices": [{"index": "a", "delta": {
        "content": "x"}}]}, *e[2:]]), "incomplete_response", ("index",), stream=True),
}


def _misbehave(case: Case) -> Callable[[Call], Awaitable[web.StreamResponse | None]]:
    async def misbehave(call: Call) -> web.StreamResponse | None:
        if call.row_id == BROKEN or (call.row_id == FLAKY and call.attempt == 1):
            return await case.respond(call)
        return None

    return misbehave


def _readable(message: str) -> bool:
    return 0 < len(message) <= 1000 and message.isprintable() and "Traceback" not in message


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
async def test_bad_response_becomes_a_retry_or_an_error_row(
    name: str, tmp_path: Path, bad_server: Callable[..., Awaitable[BadServer]], figures: Any
) -> None:
    """Row r5 gets the bad response on its first attempt only, row r7 on every attempt (max_retries 2), 10 other rows get good answers. Retryable kinds: r5 succeeds on its retry, r7 ends as an error row of the expected type with a readable reason naming the problem after 3 attempts. Over-size bodies: never retried, both rows are error rows. Every other row holds its own answer, sent once; one row per input row, in order."""
    case = CASES[name]
    server = await bad_server(_misbehave(case))
    settings = {"input": str(write_prompts(tmp_path / "in.parquet", ROWS)), "output": str(tmp_path / "out.parquet"),
                "base_url": server.url, "model": "m", "progress": False, "max_retries": MAX_RETRIES,
                "backoff_base": 0.001, "flush_seconds": 0.1, "stream": case.stream, "timeout": 30.0, **case.options}
    result = await run_bounded(settings, 30)
    assert result.exit_code == EXIT_ROW_ERRORS, result.message
    out = {r["id"]: r for r in read_output(tmp_path / "out.parquet").to_dicts()}
    assert list(out) == row_ids(ROWS)
    calls = Counter(row_id for row_id, _ in server.calls)
    bad_rows = [BROKEN] if case.retryable else [FLAKY, BROKEN]
    for row_id, prompt in zip(row_ids(ROWS), prompts(ROWS), strict=True):
        record = out[row_id]
        if row_id in bad_rows:
            message = record["error"] or ""
            assert record["error_type"] == case.error_type, record
            assert _readable(message), f"unreadable reason: {message!r}"
            for word in case.words:
                assert word in message.lower(), f"the reason does not name {word!r}: {message!r}"
            assert record["content"] is None
            assert record["attempts"] == calls[row_id] == (MAX_RETRIES + 1 if case.retryable else 1), (record, calls)
        else:
            assert record["error"] is None and record["content"] == echo(prompt), record
            assert record["attempts"] == calls[row_id] == (2 if row_id == FLAKY else 1), (record, calls)
    figures(rows=ROWS, requests=len(server.calls), retries=result.stats.retries, error=out[BROKEN]["error"])


@pytest.mark.slow
async def test_a_response_that_breaks_the_writer_neither_hangs_nor_loses_the_run(
    tmp_path: Path, bad_server: Callable[..., Awaitable[BadServer]], figures: Any
) -> None:
    """3,000 streamed rows through `batchgen run`; one row's stream carries a numeric chunk id (wrong JSON type). The run must end within 20 s (it takes ~5 s; it must not hang), with exit code 1 and that row as an error row, every other row answered once, in order."""
    rows = 3000
    broken = "r5"

    async def misbehave(call: Call) -> web.StreamResponse | None:
        if call.row_id == broken:
            return await _events(_every_event(id=123))(call)
        return None

    server = await bad_server(misbehave)
    output = tmp_path / "out.parquet"
    # Parts every 0.1 s: the broken row reaches the writer while most rows are still to come.
    config = yaml_config(tmp_path / "job.yaml", flush_seconds=0.1)
    args = run_args(write_prompts(tmp_path / "in.parquet", rows), output, server.url, "--stream", "--max-retries", "1",
                    "--concurrency", "16", config=config)
    result = await run_cli_async(args, timeout=20)
    figures(rows=rows, exit_code="killed at 20 s deadline" if result.timed_out else result.returncode,
            seconds=round(result.seconds, 1))
    assert not result.timed_out, "the run hung: still running 20 s after it started (a 3,000-row run takes ~5 s)"
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    out = read_output(output)
    assert out["id"].to_list() == row_ids(rows)
    errors = out.filter(out["error"].is_not_null())
    assert errors["id"].to_list() == [broken], errors.select("id", "error").to_dicts()

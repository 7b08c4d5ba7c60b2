"""`batchgen run` writing OpenAI Batch API / `vllm run-batch` output lines, against the mock server."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.config import load_config
from batchgen.errors import OutputError
from batchgen.io.batch_output import effective_output_format, line_id
from batchgen.pipeline import EXIT_OK, EXIT_ROW_ERRORS, run_async
from batchgen.testing.mock_server import MockConfig, MockServer

from .conftest import row_lookup, rows_sent

URL = "/v1/chat/completions"
LINE_KEYS = ["id", "custom_id", "response", "error"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    },
}


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# Every kind of chat body OpenAI's docs show in batch requests (system prompt, conversations, tools,
# structured output, sampling, n, logprobs), each under its custom_id.
BODIES: dict[str, dict[str, Any]] = {
    "plain": {"model": "mock-model", "messages": [_user("Hello world!")]},
    "system": {"model": "mock-model", "max_tokens": 1000, "messages": [
        {"role": "system", "content": "You are a helpful assistant."}, _user("Hello again world!")]},
    "multi-turn": {"model": "mock-model", "messages": [
        {"role": "system", "content": "You are terse."}, _user("Who won in 2020?"),
        {"role": "assistant", "content": "The Dodgers."}, _user("Where was it played?")]},
    "tools-auto": {"model": "mock-model", "messages": [_user("What is the weather like in Paris?")],
                   "tools": [WEATHER], "tool_choice": "auto"},
    "tools-named": {"model": "mock-model", "messages": [_user("Boston please")], "tools": [WEATHER],
                    "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "tool-result": {"model": "mock-model", "tools": [WEATHER], "messages": [
        _user("Weather in Oslo?"),
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"location\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 3}"}, _user("Summarize that")]},
    "json-object": {"model": "mock-model", "messages": [_user("Give me a JSON greeting")],
                    "response_format": {"type": "json_object"}},
    "json-schema": {"model": "mock-model", "messages": [_user("Name a colour")], "response_format": {
        "type": "json_schema", "json_schema": {"name": "colour", "strict": True, "schema": {
            "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}},
    "sampling": {"model": "mock-model", "messages": [_user("one two three four five six")], "max_tokens": 5,
                 "temperature": 0.2, "top_p": 0.9, "stop": ["four"], "seed": 42},
    "n": {"model": "mock-model", "messages": [_user("pick a number")], "n": 3, "temperature": 1.0},
    "logprobs": {"model": "mock-model", "messages": [_user("tell me more")], "logprobs": True, "top_logprobs": 2},
    "parts": {"model": "mock-model", "max_completion_tokens": 2,
              "messages": [{"role": "user", "content": [{"type": "text", "text": "content as parts"}]}]},
    "top-logprobs-alone": {"model": "mock-model", "messages": [_user("alternatives")], "top_logprobs": 2},
    "other-model": {"model": "gpt-4o-mini", "messages": [_user("wrong model")]},
    "too-long": {"model": "mock-model", "messages": [_user("a prompt that asks too much")], "max_tokens": 9000},
}  # fmt: skip
REFUSED = {"top-logprobs-alone": 400, "other-model": 404}  # the server answers these with an error status
UNSENT = {"too-long"}  # batchgen's length check keeps it from the server (a context_length error row)


def _line(custom_id: str, body: dict[str, Any], url: str = URL) -> bytes:
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _batch_input(path: Path) -> list[str | None]:
    """Writes the input file; returns the custom_id of each row as the output must carry it."""
    lines = [_line(cid, body) for cid, body in BODIES.items()]
    lines.insert(3, b'{"custom_id": "broken", "method": "POST", "url": "/v1/chat/')  # not JSON: no id to read
    lines.insert(7, _line("embed-1", {"model": "mock-model", "input": "hi"}, url="/v1/embeddings"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    ids: list[str | None] = list(BODIES)
    ids.insert(3, None)
    ids.insert(7, "embed-1")
    return ids


def _read(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def _run(server: MockServer, input_path: Path, output: Path, **options: Any) -> Any:
    settings = {"input": str(input_path), "output": str(output), "base_url": server.url, "progress": False,
                "flush_seconds": 0.05, **options}  # fmt: skip
    return await run_async(load_config(settings), log=io.StringIO())


async def _direct(server: MockServer, body: dict[str, Any]) -> tuple[int, bytes]:
    """What the server answers to `body` sent straight to it: status and the body's bytes."""
    async with aiohttp.ClientSession() as session, session.post(server.url + "/chat/completions", json=body) as resp:
        return resp.status, await resp.read()


def _check_answered(line: dict[str, Any], raw: bytes, expected: bytes) -> None:
    """`line` answered with `expected`, the bytes the server sends for the same request; only
    `created` (the second the server answered in) may differ."""
    written = line["response"]["body"]["created"]
    expected = expected.replace(b'"created":%d,' % orjson.loads(expected)["created"], b'"created":%d,' % written)
    body = orjson.loads(expected)
    assert line["response"] == {"status_code": 200, "request_id": body["id"], "body": body}
    assert line["error"] is None
    assert b'"body":' + expected + b"}" in raw  # the server's bytes, spliced as received


@pytest.mark.parametrize(
    ("output", "configured", "input_format", "expected"),
    [
        ("out.jsonl", None, "openai-batch", "openai-batch"),
        ("out.jsonl", None, "jsonl", "jsonl"),
        ("out.jsonl", None, "parquet", "jsonl"),
        ("out.parquet", None, "openai-batch", "parquet"),
        ("out.jsonl", "jsonl", "openai-batch", "jsonl"),
        ("out.jsonl", "openai-batch", "parquet", "openai-batch"),
        ("out.parquet", "parquet", "jsonl", "parquet"),
    ],
)
def test_the_effective_output_format(output: str, configured: str | None, input_format: str, expected: str) -> None:
    assert effective_output_format(output, configured, input_format) == expected


def test_lines_read_back_are_written_again_byte_for_byte() -> None:
    """Each kind of line → its result columns → the same line; a body that spans lines is put on one."""
    from batchgen.io.batch_output import batch_lines, line_record
    from batchgen.io.schema import RESULT_FIELDS

    schema = pa.schema([pa.field("id", pa.string()), *RESULT_FIELDS])
    pretty = '{\n  "id": "chatcmpl-1",\n  "object": "chat.completion",\n  "choices": [{"index": 0, "message": ' \
             '{"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],\n  "big": 123456789012345678901234567890\n}\n'
    envelope = '{"error":{"message":"bad","type":"BadRequestError","param":null,"code":400}}'
    records = [
        {"id": "a", "raw": pretty, "status_code": 200, "response_id": "chatcmpl-1", "content": "hi"},
        {"id": "b", "error": "HTTP 400: bad", "error_type": "bad_request", "status_code": 400, "raw": envelope},
        {"id": "c", "error": "HTTP 503: busy", "error_type": "server_error", "status_code": 503},  # no raw kept
        {"id": None, "error": "line 4: invalid JSON", "error_type": "invalid_input"},
        {"id": "e", "error": "timed out after 600 s", "error_type": "timeout"},
    ]  # fmt: skip
    lines = list(batch_lines(pa.Table.from_pylist(records, schema=schema), 7))
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    answered, refused, busy, unread, timed_out = (orjson.loads(line) for line in lines)
    assert answered["response"]["body"]["choices"][0]["message"]["content"] == "hi"
    assert b'"big":123456789012345678901234567890}' in lines[0]  # not cut to 64 bits on the way
    assert refused["error"] == orjson.loads(envelope) and refused["response"]["status_code"] == 400
    assert busy["error"] == {"error": {"message": "busy", "type": "server_error", "param": None, "code": 503}}
    assert unread == {"id": line_id(None, 10), "custom_id": None, "response": None,
                      "error": {"code": "invalid_input", "message": "line 4: invalid JSON"}}  # fmt: skip
    assert timed_out["error"] == {"code": "timeout", "message": "timed out after 600 s"}
    again = list(batch_lines(pa.Table.from_pylist([line_record(line) for line in lines], schema=schema), 7))
    assert again == lines


async def test_every_chat_body_kind_round_trips_as_batch_output_lines(tmp_path: Path) -> None:
    """One line per input line, in input order; each body is the server's JSON as sent; errors as vLLM
    writes them (a server's error status) or as OpenAI does (no response at all); and a rerun that
    re-sends the failed rows rewrites the file byte for byte."""
    source, out = tmp_path / "batch.jsonl", tmp_path / "results.jsonl"
    ids = _batch_input(source)
    async with MockServer() as server:
        result = await _run(server, source, out, input_format="openai-batch", max_retries=0)
        assert result.exit_code == EXIT_ROW_ERRORS, result.message
        sent = list(server.state.requests)
        expected = {cid: await _direct(server, body) for cid, body in BODIES.items() if cid not in UNSENT}
        first = out.read_bytes()
        again = await _run(server, source, out, input_format="openai-batch", max_retries=0, retry_failed=True)
    assert again.exit_code == EXIT_ROW_ERRORS and out.read_bytes() == first

    given = [body for cid, body in BODIES.items() if cid not in UNSENT]
    assert sorted(sent, key=orjson.dumps) == sorted(given, key=orjson.dumps)  # the bodies as given
    raws = first.splitlines()
    lines = [orjson.loads(raw) for raw in raws]
    assert [list(line) for line in lines] == [LINE_KEYS] * len(ids)
    assert [line["custom_id"] for line in lines] == ids
    assert [line["id"] for line in lines] == [line_id(cid, i) for i, cid in enumerate(ids)]
    assert len({line["id"] for line in lines}) == len(ids)
    by_id = {line["custom_id"]: (line, raw) for line, raw in zip(lines, raws, strict=True)}
    for cid, (status, answer) in expected.items():
        line, raw = by_id[cid]
        if cid in REFUSED:
            assert status == REFUSED[cid]
            # vLLM's run_batch: the status in `response`, no body, the server's error envelope as `error`.
            assert line["response"] == {"status_code": status, "request_id": line["id"], "body": None}
            assert line["error"] == orjson.loads(answer)
        else:
            assert status == 200
            _check_answered(line, raw, answer)
    # The answers hold what each kind of request asks for.
    body = {cid: by_id[cid][0]["response"]["body"] for cid in expected if cid not in REFUSED}
    assert body["plain"]["choices"][0]["message"]["content"] == "echo: Hello world!"
    assert body["tools-auto"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert body["tools-named"]["choices"][0]["finish_reason"] == "stop"
    assert body["sampling"]["choices"][0]["stop_reason"] == "four"
    assert [c["index"] for c in body["n"]["choices"]] == [0, 1, 2]
    assert len(body["logprobs"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert body["parts"]["choices"][0]["finish_reason"] == "length"
    # Rows that never became a request: OpenAI's non-HTTP error form.
    broken, embed = lines[3], lines[7]
    assert broken["response"] is None and broken["error"]["code"] == "invalid_input"
    assert broken["error"]["message"].startswith("line 4:")
    assert embed["response"] is None and embed["error"]["code"] == "invalid_input"
    assert "'url'" in embed["error"]["message"] and "/v1/embeddings" in embed["error"]["message"]
    too_long = by_id["too-long"][0]
    assert too_long["response"] is None and too_long["error"]["code"] == "context_length"


async def test_a_jsonl_output_is_plain_jsonl_unless_the_input_is_an_openai_batch(tmp_path: Path) -> None:
    batch, plain = tmp_path / "batch.jsonl", tmp_path / "plain.jsonl"
    batch.write_bytes(_line("a", BODIES["plain"]) + b"\n")
    plain.write_bytes(orjson.dumps({"id": "a", "prompt": "Hello world!"}) + b"\n")
    async with MockServer() as server:
        assert (await _run(server, batch, tmp_path / "b.jsonl", input_format="openai-batch")).exit_code == EXIT_OK
        assert (await _run(server, plain, tmp_path / "p.jsonl")).exit_code == EXIT_OK
        as_plain = await _run(server, batch, tmp_path / "c.jsonl", input_format="openai-batch", output_format="jsonl")
        assert as_plain.exit_code == EXIT_OK
    [line] = _read(tmp_path / "b.jsonl")
    assert list(line) == LINE_KEYS and line["custom_id"] == "a"
    assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: Hello world!"
    for name in ("p.jsonl", "c.jsonl"):
        [row] = _read(tmp_path / name)
        assert row["id"] == "a" and row["content"] == "echo: Hello world!" and row["raw"] is None


async def test_output_format_openai_batch_from_a_parquet_input(tmp_path: Path) -> None:
    """custom_id is the row id: the id column's value, else the row number."""
    with_ids, without = tmp_path / "ids.parquet", tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "prompt": ["first", "second"], "topic": ["t1", "t2"]}), with_ids)
    pq.write_table(pa.table({"prompt": ["first", "second"]}), without)
    async with MockServer() as server:
        for source, out in ((with_ids, "ids.jsonl"), (without, "rows.jsonl")):
            result = await _run(server, source, tmp_path / out, output_format="openai-batch", max_tokens=8)
            assert result.exit_code == EXIT_OK, result.message
        answer = await _direct(server, {"model": "mock-model", "messages": [_user("first")], "max_tokens": 8})
    for name, ids in (("ids.jsonl", ["x", "y"]), ("rows.jsonl", ["0", "1"])):
        raws = (tmp_path / name).read_bytes().splitlines()
        lines = [orjson.loads(raw) for raw in raws]
        assert [line["custom_id"] for line in lines] == ids and [list(line) for line in lines] == [LINE_KEYS] * 2
        assert lines[1]["response"]["body"]["choices"][0]["message"]["content"] == "echo: second"
        _check_answered(lines[0], raws[0], answer[1])  # no input column leaks into the lines


async def test_retry_failed_after_server_errors_completes_the_file(tmp_path: Path) -> None:
    n = 30
    source, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    prompts = {f"prompt {i}": f"req-{i}" for i in range(n)}
    source.write_bytes(b"".join(_line(cid, {"messages": [_user(p)]}) + b"\n" for p, cid in prompts.items()))
    async with MockServer(MockConfig(fault_rate=0.5, faults=("500",), seed=1)) as flaky:
        first = await _run(flaky, source, out, input_format="openai-batch", max_retries=0)
    assert first.exit_code == EXIT_ROW_ERRORS
    before = out.read_bytes().splitlines()
    failed = [orjson.loads(raw) for raw in before if orjson.loads(raw)["error"] is not None]
    assert 0 < len(failed) < n
    for line in failed:  # the mock's 500 answer, as vLLM's run_batch records an error status
        assert line["response"] == {"status_code": 500, "request_id": line["id"], "body": None}
        assert line["error"] == {"error": {"message": "Internal server error", "type": "InternalServerError",
                                           "param": None, "code": 500}}  # fmt: skip
    async with MockServer() as healthy:
        nothing = await _run(healthy, source, out, input_format="openai-batch")
        assert healthy.state.requests == [] and "nothing to do" in nothing.message
        fixed = await _run(healthy, source, out, input_format="openai-batch", retry_failed=True)
    assert fixed.exit_code == EXIT_OK, fixed.message
    assert sorted(rows_sent(healthy.state.requests, row_lookup(prompts))) == sorted(line["custom_id"] for line in failed)
    after = out.read_bytes().splitlines()
    lines = [orjson.loads(raw) for raw in after]
    assert [line["custom_id"] for line in lines] == list(prompts.values())
    assert [line["id"] for line in lines] == [orjson.loads(raw)["id"] for raw in before]  # stable ids
    assert all(line["error"] is None and line["response"]["status_code"] == 200 for line in lines)
    assert [line["response"]["body"]["choices"][0]["message"]["content"] for line in lines] == [
        f"echo: {p}" for p in prompts
    ]
    kept = [i for i, raw in enumerate(before) if orjson.loads(raw)["error"] is None]
    assert [after[i] for i in kept] == [before[i] for i in kept]  # read back and written again byte for byte


async def test_limit_then_a_crash_at_the_merge_then_a_rerun_give_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first rows from an earlier output, the rest from the parts a run left when it died before
    its merge: the rerun sends nothing and writes every line."""
    import batchgen.pipeline as pipeline

    n = 12
    source, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    prompts = {f"row {i}": f"r{i}" for i in range(n)}
    source.write_bytes(b"".join(_line(cid, {"messages": [_user(p)]}) + b"\n" for p, cid in prompts.items()))
    real_finalize = pipeline.finalize

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise OutputError("killed during the merge")

    async with MockServer() as server:
        assert (await _run(server, source, out, input_format="openai-batch", limit=4)).exit_code == EXIT_OK
        head = out.read_bytes()
        assert len(head.splitlines()) == 4
        monkeypatch.setattr(pipeline, "finalize", crash)
        with pytest.raises(OutputError, match="killed"):
            await _run(server, source, out, input_format="openai-batch")
        assert out.read_bytes() == head and any((tmp_path / "out.jsonl.batchgen").glob("part-*.parquet"))
        monkeypatch.setattr(pipeline, "finalize", real_finalize)
        server.state.reset()
        done = await _run(server, source, out, input_format="openai-batch")
    assert done.exit_code == EXIT_OK, done.message
    assert server.state.requests == []
    lines = _read(out)
    assert out.read_bytes().startswith(head) and [line["custom_id"] for line in lines] == list(prompts.values())
    assert [line["response"]["body"]["choices"][0]["message"]["content"] for line in lines] == [
        f"echo: {p}" for p in prompts
    ]


async def test_a_crashed_runs_journal_becomes_lines(tmp_path: Path) -> None:
    """Journaled answers (written with their raw body) come out as they were received; one stored
    without `raw` (an earlier run with another output format) gets a body rebuilt from its columns."""
    from batchgen.io.journal import JournalSegment, segment_path
    from batchgen.io.schema import output_schema, state_schema

    source, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(b"".join(_line(f"r{i}", {"messages": [_user(f"row {i}")]}) + b"\n" for i in range(4)))
    state_dir = tmp_path / "out.jsonl.batchgen"
    state_dir.mkdir()
    schema = state_schema(output_schema(pa.schema([("custom_id", pa.string())]))[0])
    kept = (b'{"id": "chatcmpl-kept", "object": "chat.completion", "choices": [{"index": 0, '
            b'"message": {"role": "assistant", "content": "kept"}, "finish_reason": "stop"}]}')
    usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3, "cached_tokens": None, "reasoning_tokens": None}
    records = [
        {"_index": 0, "id": "r0", "content": "kept", "finish_reason": "stop", "status_code": 200,
         "response_id": "chatcmpl-kept", "raw": kept.decode()},
        {"_index": 1, "id": "r1", "content": "rebuilt", "finish_reason": "stop", "status_code": 200,
         "response_id": "chatcmpl-old", "model": "mock-model", "usage": usage, "tool_calls": []},
    ]  # fmt: skip
    segment = JournalSegment(segment_path(state_dir, 0, 0))
    segment.append(pa.Table.from_pylist(records, schema=schema))
    segment.close()
    async with MockServer() as server:
        result = await _run(server, source, out, input_format="openai-batch")
    assert result.exit_code == EXIT_OK, result.message
    assert sorted(rows_sent(server.state.requests, row_lookup({"row 2": "r2", "row 3": "r3"}))) == ["r2", "r3"]
    raws = out.read_bytes().splitlines()
    lines = [orjson.loads(raw) for raw in raws]
    assert [line["custom_id"] for line in lines] == ["r0", "r1", "r2", "r3"]
    assert b'"body":' + kept + b"}" in raws[0]  # spaces and all: the bytes as received
    assert lines[0]["response"]["request_id"] == "chatcmpl-kept"
    assert lines[1]["response"] == {"status_code": 200, "request_id": "chatcmpl-old", "body": {
        "id": "chatcmpl-old", "object": "chat.completion", "model": "mock-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "rebuilt", "reasoning_content": None,
                     "tool_calls": []}, "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}}  # fmt: skip
    assert lines[3]["response"]["body"]["choices"][0]["message"]["content"] == "echo: row 3"


async def test_a_streamed_row_carries_the_answer_assembled_in_the_chat_completion_shape(tmp_path: Path) -> None:
    source, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(b"".join(_line(cid, BODIES[cid]) + b"\n" for cid in ("plain", "n", "tools-auto")))
    async with MockServer() as server:
        result = await _run(server, source, out, input_format="openai-batch", stream=True)
        assert result.exit_code == EXIT_OK, result.message
        plain = {cid: orjson.loads((await _direct(server, BODIES[cid]))[1]) for cid in ("plain", "n", "tools-auto")}
    for line in _read(out):
        body, expected = line["response"]["body"], plain[line["custom_id"]]
        assert line["response"]["request_id"] == body["id"] and body["id"].startswith("chatcmpl-")
        assert body["object"] == "chat.completion" and body["model"] == expected["model"]
        assert [c["message"]["content"] for c in body["choices"]] == [c["message"]["content"] for c in expected["choices"]]
        assert [[t["function"] for t in c["message"]["tool_calls"]] for c in body["choices"]] == [
            [t["function"] for t in c["message"]["tool_calls"]] for c in expected["choices"]
        ]  # the ids differ: the mock derives them from the request, which asked for a stream
        assert [c["finish_reason"] for c in body["choices"]] == [c["finish_reason"] for c in expected["choices"]]
        assert body["usage"]["total_tokens"] == expected["usage"]["total_tokens"]


def test_the_cli_takes_vllm_run_batch_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`batchgen run -i in.jsonl -o out.jsonl --model M`, as `vllm run-batch -i ... -o ... --model M`: the
    input is told an OpenAI batch file by its first line, and the output follows it."""
    from batchgen.cli import main
    from batchgen.testing.mock_server import mock_server_thread

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(_line("request-1", BODIES["system"]) + b"\n" + _line("request-2", BODIES["plain"]) + b"\n")
    with mock_server_thread() as server:
        code = main(["run", "-i", str(source), "-o", str(out), "--model", "mock-model", "--base-url", server.url,
                     "--no-progress"])  # fmt: skip
    assert code == EXIT_OK, capsys.readouterr().err
    lines = _read(out)
    assert [line["custom_id"] for line in lines] == ["request-1", "request-2"]
    assert [line["response"]["body"]["choices"][0]["message"]["content"] for line in lines] == [
        "echo: Hello again world!", "echo: Hello world!"
    ]

"""`batchgen run` end to end against the built-in mock server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.config import load_config
from batchgen.errors import InputError
from batchgen.pipeline import EXIT_OK, EXIT_ROW_ERRORS, run_async
from batchgen.testing.mock_server import MockConfig, MockServer

from .conftest import prompt_of, row_lookup, rows_sent

MSG = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _conversation(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def _run(server: MockServer, tmp_path: Path, input_path: Path, output: str = "out.parquet", **options: Any) -> Any:
    settings = {"input": str(input_path), "output": str(tmp_path / output), "base_url": server.url, "progress": False,
                "flush_seconds": 0.05, **options}
    return await run_async(load_config(settings), log=io.StringIO())


def _sent_by_row(server: MockServer, ids_by_prompt: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The body the server received for each row, the row told by its prompt."""
    rows = rows_sent(server.state.requests, row_lookup(ids_by_prompt))
    return dict(zip(rows, server.state.requests, strict=True))


async def test_overrides_reach_the_server_and_every_column_is_filled(tmp_path: Path) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    rows = [
        {"id": "plain", "messages": _conversation("hello there"), "temperature": 0.1, "max_tokens": None, "tools": None,
         "tool_choice": None, "chat_template_kwargs": None, "extra": None},
        {"id": "length", "messages": _conversation("one two three four five six"), "temperature": None, "max_tokens": 2,
         "tools": None, "tool_choice": None, "chat_template_kwargs": None, "extra": None},
        {"id": "reason", "messages": _conversation("think hard"), "temperature": None, "max_tokens": None, "tools": None,
         "tool_choice": None, "chat_template_kwargs": '{"enable_thinking": true}', "extra": '{"min_p": 0.05}'},
        {"id": "tool", "messages": _conversation("weather in Paris"), "temperature": None, "max_tokens": None,
         "tools": orjson.dumps(tools).decode(), "tool_choice": "required", "chat_template_kwargs": None, "extra": None},
    ]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    async with MockServer() as server:
        result = await _run(server, tmp_path, path, temperature=0.7, max_tokens=50, seed=3)
    assert result.exit_code == EXIT_OK, result.message
    sent = _sent_by_row(server, {prompt_of(row): row["id"] for row in rows})
    assert sent["plain"]["temperature"] == 0.1 and sent["plain"]["max_tokens"] == 50 and sent["plain"]["seed"] == 3
    assert sent["length"]["temperature"] == 0.7 and sent["length"]["max_tokens"] == 2
    assert sent["reason"]["chat_template_kwargs"] == {"enable_thinking": True} and sent["reason"]["min_p"] == 0.05
    assert sent["tool"]["tools"] == tools and sent["tool"]["tool_choice"] == "required"
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == ["plain", "length", "reason", "tool"]
    plain, length, reason, tool = out.to_dicts()
    assert plain["content"] == "echo: hello there" and plain["finish_reason"] == "stop"
    assert plain["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
                              "cached_tokens": None, "reasoning_tokens": None}
    assert plain["stop_reason"] is None and plain["logprobs"] is None and plain["choices"] is None
    assert plain["raw"] is None
    assert plain["model"] == "mock-model" and plain["response_id"] and plain["status_code"] == 200
    assert plain["attempts"] == 1 and plain["latency_s"] > 0 and plain["error"] is None
    assert plain["tool_calls"] == [] and plain["reasoning_content"] is None and plain["ttft_s"] is None
    assert length["finish_reason"] == "length" and length["usage"]["completion_tokens"] == 2 and length["error"] is None
    assert reason["reasoning_content"] and reason["content"].startswith("\n\n")
    assert reason["usage"]["reasoning_tokens"] == len(reason["reasoning_content"].split())
    assert tool["content"] is None and tool["finish_reason"] == "tool_calls"
    assert tool["tool_calls"][0]["function"]["name"] == "lookup"
    assert orjson.loads(tool["tool_calls"][0]["function"]["arguments"]) == {"query": "weather in Paris"}
    assert out.schema["tool_calls"] == pl.List(pl.Struct({"id": pl.String, "type": pl.String,
                                                           "function": pl.Struct({"name": pl.String, "arguments": pl.String})}))


async def test_stream_records_ttft(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(orjson.dumps({"prompt": f"row {i}"}).decode() + "\n" for i in range(5)))
    async with MockServer(MockConfig(ttft_ms=30)) as server:
        result = await _run(server, tmp_path, path, stream=True)
    assert result.exit_code == EXIT_OK
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == [str(i) for i in range(5)]
    assert all(t >= 0.03 for t in out["ttft_s"].to_list())
    assert all(b["stream"] is True and b["stream_options"]["include_usage"] for b in server.state.requests)
    assert out["usage"].to_list()[0]["completion_tokens"] == 3


async def test_bad_rows_become_error_rows_and_good_rows_survive(tmp_path: Path) -> None:
    lines = [
        orjson.dumps({"id": "a", "messages": _conversation("fine")}),
        b'{"id": "b", "messages": [',  # invalid JSON
        orjson.dumps({"id": "c", "messages": _conversation("x"), "temperature": "hot"}),
        orjson.dumps({"id": "d", "messages": [{"role": "wizard", "content": "x"}]}),
        orjson.dumps({"id": "e", "messages": "[not json"}),
        orjson.dumps({"id": "f", "messages": _conversation("also fine"), "extra": {"model": "no-such-model"}}),
        orjson.dumps({"id": "g", "messages": _conversation("last")}),
    ]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    async with MockServer() as server:
        result = await _run(server, tmp_path, path, "out.jsonl", max_retries=3)
    assert result.exit_code == EXIT_ROW_ERRORS
    out = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert [r["id"] for r in out] == ["a", None, "c", "d", "e", "f", "g"]
    by_id = {r["id"]: r for r in out}
    assert by_id["a"]["content"] == "echo: fine" and by_id["g"]["error"] is None
    # Input columns are kept; a column of mixed JSON types (row e holds a string) is kept as JSON text.
    assert orjson.loads(by_id["a"]["messages"]) == _conversation("fine") and out[1]["messages"] is None
    assert "line 2" in out[1]["error"] and "JSON" in out[1]["error"]
    assert "column 'temperature'" in by_id["c"]["error"] and "'hot'" in by_id["c"]["error"]
    assert "line 4" in by_id["d"]["error"] and "role" in by_id["d"]["error"]
    assert "column 'messages'" in by_id["e"]["error"]
    assert by_id["f"]["status_code"] == 404 and by_id["f"]["error_type"] == "not_found" and by_id["f"]["attempts"] == 1
    sent = rows_sent(server.state.requests, row_lookup({"fine": "a", "also fine": "f", "last": "g"}))
    assert sorted(sent) == ["a", "f", "g"]  # bad rows never reached the server; the 404 was tried once


async def test_openai_batch_input_body_wins_over_defaults(tmp_path: Path) -> None:
    path = tmp_path / "batch.jsonl"
    lines = [
        {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "mock-model", "messages": _conversation("first"), "max_tokens": 1}},
        {"custom_id": "req-2", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": _conversation("second")}},
    ]
    path.write_bytes(b"\n".join(orjson.dumps(x) for x in lines) + b"\n")
    async with MockServer() as server:
        result = await _run(server, tmp_path, path, input_format="openai-batch", max_tokens=20, temperature=0.5)
    assert result.exit_code == EXIT_OK, result.message
    sent = _sent_by_row(server, {"first": "req-1", "second": "req-2"})
    assert sent["req-1"]["max_tokens"] == 1 and sent["req-2"]["max_tokens"] == 20
    assert sent["req-2"]["model"] == "mock-model" and sent["req-2"]["temperature"] == 0.5
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == ["req-1", "req-2"] and out["finish_reason"].to_list() == ["length", "stop"]


async def test_order_and_exactly_once_under_faults(tmp_path: Path) -> None:
    n = 300
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "prompt": [f"p {i}" for i in range(n)]}), path)
    config = MockConfig(fault_rate=0.3, faults=("429", "500", "503", "disconnect", "malformed", "truncated"),
                        retry_after_s=0.0, seed=7)
    async with MockServer(config) as server:
        result = await _run(server, tmp_path, path, concurrency=16, max_retries=12, backoff_base=0.001)
    assert result.exit_code == EXIT_OK, result.message
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == [f"r{i}" for i in range(n)]
    assert out["content"].to_list() == [f"echo: p {i}" for i in range(n)]
    assert sum(server.state.faults_injected.values()) > 0
    assert out["attempts"].sum() == len(server.state.requests)
    assert server.state.max_in_flight <= 16


async def test_rerun_of_a_finished_job_sends_nothing_and_retry_failed_resends_only_errors(tmp_path: Path) -> None:
    n = 40
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"p {i}" for i in range(n)]}), path)
    async with MockServer(MockConfig(fault_rate=0.5, faults=("500",), seed=1)) as flaky:
        first = await _run(flaky, tmp_path, path, max_retries=0)
    assert first.exit_code == EXIT_ROW_ERRORS
    before = pl.read_parquet(tmp_path / "out.parquet")
    failed = before.filter(pl.col("error").is_not_null())["id"].to_list()
    assert 0 < len(failed) < n and set(before.filter(pl.col("error").is_not_null())["error_type"]) == {"server_error"}
    async with MockServer() as healthy:
        again = await _run(healthy, tmp_path, path)
        assert healthy.state.requests == [] and "nothing to do" in again.message
        fixed = await _run(healthy, tmp_path, path, retry_failed=True)
    assert fixed.exit_code == EXIT_OK
    assert sorted(rows_sent(healthy.state.requests, row_lookup({f"p {i}": str(i) for i in range(n)}))) == sorted(failed)
    after = pl.read_parquet(tmp_path / "out.parquet")
    assert after["id"].to_list() == [str(i) for i in range(n)] and after["error"].null_count() == n
    kept = before.filter(pl.col("error").is_null())
    assert after.filter(pl.col("id").is_in(kept["id"].to_list()))["latency_s"].to_list() == kept["latency_s"].to_list()


async def test_duplicate_ids_stop_the_run_before_any_request(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c", "b"], "prompt": ["1", "2", "3", "4"]}), path)
    async with MockServer() as server:
        with pytest.raises(InputError, match="duplicate id 'b'.*row 1 and row 3"):
            await _run(server, tmp_path, path)
    assert server.state.requests == []


async def test_missing_column_stops_the_run_before_any_request(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["x"]}), path)
    async with MockServer() as server:
        with pytest.raises(InputError, match="neither a 'messages' nor a 'prompt' column"):
            await _run(server, tmp_path, path)
    assert server.state.requests == []


def test_python_api_generate(tmp_path: Path) -> None:
    from batchgen import generate
    from batchgen.testing.mock_server import mock_server_thread

    with mock_server_thread() as server:
        out = generate(pl.DataFrame({"prompt": ["a b", "c"], "topic": ["x", "y"]}), base_url=server.url, max_tokens=8)
    assert out["content"].to_list() == ["echo: a b", "echo: c"]
    assert out["topic"].to_list() == ["x", "y"] and out["error"].null_count() == 2


async def test_a_server_that_is_gone_at_the_start_stops_the_run_before_sending_and_it_runs_later(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"p {i}" for i in range(60)]}), path)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    settings = {"input": str(path), "output": str(tmp_path / "out.parquet"), "progress": False, "model": "mock-model",
                "concurrency": 4, "max_retries": 1, "backoff_base": 0.001}
    gone = await run_async(load_config({**settings, "base_url": dead_url}), log=io.StringIO())
    assert gone.exit_code == 3 and f"cannot list models at {dead_url}/models" in gone.message
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "out.parquet.batchgen").exists()
    async with MockServer() as server:
        back = await run_async(load_config({**settings, "base_url": server.url}), log=io.StringIO())
    assert back.exit_code == EXIT_OK, back.message
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["content"].to_list() == [f"echo: p {i}" for i in range(60)]


async def test_duplicate_ids_in_jsonl_name_both_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 7, "prompt": "a"}\nnot json\n{"id": null, "prompt": "b"}\n{"id": "7", "prompt": "c"}\n')
    async with MockServer() as server:
        with pytest.raises(InputError, match="duplicate id '7'.*line 1 and line 4"):
            await _run(server, tmp_path, path)
    assert server.state.requests == []


async def test_a_rerun_resumes_from_a_crashed_runs_journal_and_warns_about_its_torn_tail(tmp_path: Path) -> None:
    """Issue 15, through the whole run (streamed): the journal's whole records count as done, its torn
    last record is named in a warning and its rows are sent again, and the journal is gone at the end."""
    from batchgen.io.journal import JournalSegment, segment_path
    from batchgen.io.schema import output_schema, state_schema

    path = tmp_path / "in.jsonl"
    path.write_text("".join(orjson.dumps({"prompt": f"row {i}"}).decode() + "\n" for i in range(10)))
    state_dir = tmp_path / "out.parquet.batchgen"
    state_dir.mkdir()
    schema = state_schema(output_schema(pa.schema([]))[0])
    segment = JournalSegment(segment_path(state_dir, 0, 0))
    for rows in (range(0, 4), range(4, 6)):
        records = [{"_index": i, "id": str(i), "content": f"journaled {i}", "status_code": 200} for i in rows]
        segment.append(pa.Table.from_pylist(records, schema=schema))
    segment.close()
    segment.path.write_bytes(segment.path.read_bytes()[:-3])  # the crash tore the second record
    log = io.StringIO()
    async with MockServer() as server:
        settings = {"input": str(path), "output": str(tmp_path / "out.parquet"), "base_url": server.url,
                    "progress": False, "stream": True}  # fmt: skip
        result = await run_async(load_config(settings), log=log)
    assert result.exit_code == EXIT_OK, result.message
    assert "warning: journal-0000-000000.arrows: a torn record" in log.getvalue()
    assert sorted(rows_sent(server.state.requests, row_lookup({f"row {i}": str(i) for i in range(10)}))) == [
        str(i) for i in range(4, 10)
    ]
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["content"].to_list() == [f"journaled {i}" for i in range(4)] + [f"echo: row {i}" for i in range(4, 10)]
    assert not state_dir.exists()


async def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    """Two runs on one output would resend each other's rows and convert each other's journal."""
    from batchgen.errors import OutputError

    path = tmp_path / "in.jsonl"
    path.write_text("".join(orjson.dumps({"prompt": f"row {i}"}).decode() + "\n" for i in range(40)))
    async with MockServer(MockConfig(latency_ms=50)) as server:
        settings = {"input": str(path), "output": str(tmp_path / "out.parquet"), "base_url": server.url,
                    "progress": False, "concurrency": 2}  # fmt: skip
        first = asyncio.create_task(run_async(load_config(settings), log=io.StringIO()))
        async with asyncio.timeout(10):
            while not server.state.requests:
                await asyncio.sleep(0.01)
        sent = len(server.state.requests)
        with pytest.raises(OutputError, match=rf"being written by another batchgen run \(pid {os.getpid()}\)"):
            await run_async(load_config(settings), log=io.StringIO())
        assert len(server.state.requests) <= sent + 2  # the second run sent nothing (the first goes on)
        result = await first
        assert result.exit_code == EXIT_OK
        assert not (tmp_path / "out.parquet.lock").exists()
        rerun = await run_async(load_config(settings), log=io.StringIO())  # once it is over, the output is free
    assert rerun.exit_code == EXIT_OK and "nothing to do" in rerun.message
    assert pl.read_parquet(tmp_path / "out.parquet")["id"].to_list() == [str(i) for i in range(40)]

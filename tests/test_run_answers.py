"""`batchgen run` keeps everything a row asked for (every choice, logprobs, stop_reason, usage
details, the raw answer), and a streamed run writes the same values as a plain one."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.config import load_config
from batchgen.pipeline import EXIT_OK, run_async
from batchgen.testing.mock_server import MockServer

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "name a city"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "another one please"},
]
# Columns whose values depend on timing or on the request shape, not on the answer.
VARYING = {"latency_s", "ttft_s", "raw", "response_id"}  # the mock derives the id from the body


def _input(tmp_path: Path) -> Path:
    rows = [
        {"id": "best-of-3", "messages": orjson.dumps(CONVERSATION).decode(), "n": 3, "logprobs": True,
         "top_logprobs": 2, "stop": None, "chat_template_kwargs": None},
        {"id": "stopped", "messages": orjson.dumps([{"role": "user", "content": "alpha beta ### gamma"}]).decode(),
         "n": None, "logprobs": None, "top_logprobs": None, "stop": "###", "chat_template_kwargs": None},
        {"id": "thinking", "messages": orjson.dumps([{"role": "user", "content": "why is the sky blue"}]).decode(),
         "n": None, "logprobs": True, "top_logprobs": None, "stop": None,
         "chat_template_kwargs": '{"enable_thinking": true}'},
    ]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


async def _run(server: MockServer, tmp_path: Path, stream: bool) -> dict[str, dict[str, Any]]:
    output = tmp_path / f"out-{stream}.parquet"
    settings = {"input": str(_input(tmp_path)), "output": str(output), "base_url": server.url, "progress": False,
                "stream": stream, "keep_raw": True, "flush_seconds": 0.05}
    result = await run_async(load_config(settings), log=io.StringIO())
    assert result.exit_code == EXIT_OK, result.message
    return {row["id"]: row for row in pl.read_parquet(output).to_dicts()}


def _joined(logprobs: list[dict[str, Any]]) -> str:
    return "".join(token["token"] for token in logprobs)


@pytest.fixture
async def outputs(tmp_path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    async with MockServer() as server:
        return await _run(server, tmp_path, False), await _run(server, tmp_path, True)


async def test_every_choice_and_its_logprobs_are_kept(outputs: Any) -> None:
    for rows in outputs:
        row = rows["best-of-3"]
        assert [c["index"] for c in row["choices"]] == [0, 1, 2]
        assert row["choices"][0]["content"] == row["content"] == "echo: another one please"
        for choice in row["choices"]:
            assert _joined(choice["logprobs"]) == choice["content"]
            assert all(len(token["top_logprobs"]) == 2 for token in choice["logprobs"])
            assert all(token["top_logprobs"][0]["token"] == token["token"] for token in choice["logprobs"])
        assert row["logprobs"] == row["choices"][0]["logprobs"]
        # The cached prefix: every message but the last ("be brief", "name a city", "Paris").
        assert row["usage"]["cached_tokens"] == 6
        assert row["usage"]["completion_tokens"] == 3 * 4
        assert row["input_logprobs"] is True and row["n"] == 3  # the input's own columns, the clash renamed
        assert len(orjson.loads(row["raw"])["choices"]) == 3


async def test_stop_reason_and_reasoning_tokens_are_kept(outputs: Any) -> None:
    for rows in outputs:
        stopped, thinking = rows["stopped"], rows["thinking"]
        assert stopped["content"] == "echo: alpha beta " and stopped["finish_reason"] == "stop"
        assert stopped["stop_reason"] == "###" and stopped["choices"] is None and stopped["logprobs"] is None
        reasoning = thinking["reasoning_content"]
        assert thinking["usage"]["reasoning_tokens"] == len(reasoning.split())
        assert _joined(thinking["logprobs"]) == reasoning + thinking["content"]  # reasoning tokens first


async def test_a_streamed_run_writes_the_same_answers(outputs: Any) -> None:
    plain, streamed = outputs
    assert plain.keys() == streamed.keys()
    for row_id in plain:
        expected = {k: v for k, v in plain[row_id].items() if k not in VARYING}
        assert {k: v for k, v in streamed[row_id].items() if k not in VARYING} == expected
        assert streamed[row_id]["ttft_s"] is not None and plain[row_id]["ttft_s"] is None
        # raw: the plain answer's body as received, the stream's assembled answer; same choices either way
        assert [c["index"] for c in orjson.loads(streamed[row_id]["raw"])["choices"]] == \
            [c["index"] for c in orjson.loads(plain[row_id]["raw"])["choices"]]


async def test_a_crash_after_the_output_rename_leaves_nothing_behind_on_rerun(tmp_path: Path) -> None:
    """Killed between renaming the output into place and removing the state dir: the rerun sends
    nothing, says so, and removes the (empty) state dir."""
    async with MockServer() as server:
        first = await _run(server, tmp_path, False)
        state_dir = tmp_path / "out-False.parquet.batchgen"
        state_dir.mkdir()
        (state_dir / "part-0000-000000.parquet.tmp").write_bytes(b"half a part")
        sent = len(server.state.requests)
        settings = {"input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out-False.parquet"),
                    "base_url": server.url, "progress": False, "keep_raw": True}
        result = await run_async(load_config(settings), log=io.StringIO())
    assert result.exit_code == EXIT_OK and "nothing to do" in result.message
    assert len(server.state.requests) == sent and not state_dir.exists()
    assert {row["id"]: row["content"] for row in pl.read_parquet(tmp_path / "out-False.parquet").to_dicts()} == \
        {row_id: row["content"] for row_id, row in first.items()}

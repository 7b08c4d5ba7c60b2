"""A row llama.cpp's server refuses (a prompt longer than its context) becomes an error row; the rest succeed.

Plain, the server answers 400 with an OpenAI error envelope (code `context_length_exceeded`), and
the row's `error` carries its message. Streamed, it answers 200 and then an empty body: no event,
no error, no `[DONE]` (the exception is only in its log). batchgen can only call that an incomplete
response, retry it, and record it as such.
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.config import load_config
from batchgen.pipeline import EXIT_ROW_ERRORS, run_async
from tests.real.conftest import LlamaServer

PROMPTS = {
    "before": "What is the capital of France?",
    "too-long": "word " * 10_000,  # 10,031 tokens as a chat, five times the server's n_ctx of 2048
    "after": "What is 2 + 2?",
}
MAX_RETRIES = 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_context_overflow_is_an_error_row(llama_server: LlamaServer, tmp_path: Path, stream: bool) -> None:
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(PROMPTS), "prompt": list(PROMPTS.values())}), source)
    cfg = load_config({
        "input": str(source), "output": str(tmp_path / "out.parquet"), "base_url": llama_server.url,
        "concurrency": 2, "temperature": 0, "max_tokens": 16, "stream": stream, "max_retries": MAX_RETRIES,
        "progress": False,
    })  # fmt: skip
    result = await run_async(cfg, log=io.StringIO())
    assert result.exit_code == EXIT_ROW_ERRORS, result.message
    rows = {row["id"]: row for row in pl.read_parquet(tmp_path / "out.parquet").iter_rows(named=True)}
    assert list(rows) == list(PROMPTS)
    refused = rows["too-long"]
    if stream:
        assert refused["error_type"] == "incomplete_response" and "no event at all" in refused["error"], refused
        assert refused["status_code"] is None and refused["attempts"] == MAX_RETRIES + 1  # retried, as it should be
    else:
        assert refused["error_type"] == "bad_request" and refused["status_code"] == 400, refused
        assert refused["attempts"] == 1  # a 400 is never retried
        assert refused["error"].endswith(
            f"This model's maximum context length is {llama_server.n_ctx} tokens. However, you requested 10047 "
            "tokens (10031 in the messages, 16 in the completion). Please reduce the length of the messages or "
            "completion."
        ), refused["error"]
    assert refused["content"] is None and refused["finish_reason"] is None and refused["usage"] is None
    for row_id in ("before", "after"):
        row = rows[row_id]
        assert row["error"] is None and row["error_type"] is None, row
        assert row["content"] and row["finish_reason"] in ("stop", "length"), row
    assert "Paris" in rows["before"]["content"]

"""Rate limits and the length check in a whole run, against the mock server holding the same quota
or context (the mock's rules: batchgen/testing/mock_quota.py, mock_replies.py)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from batchgen.config import load_config
from batchgen.pipeline import EXIT_OK, EXIT_ROW_ERRORS, run_async
from batchgen.testing.mock_server import MockConfig, MockServer


def _input(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


async def _run(server: MockServer, tmp_path: Path, source: Path, **options: Any) -> Any:
    settings = {"input": str(source), "output": str(tmp_path / "out.parquet"), "base_url": server.url,
                "progress": False, "flush_seconds": 0.05, "backoff_base": 0.01, "backoff_max": 0.05, **options}
    return await run_async(load_config(settings), log=io.StringIO())


async def test_a_client_kept_to_the_servers_quota_meets_no_429(tmp_path: Path) -> None:
    source = _input(tmp_path, [{"prompt": f"row {i}"} for i in range(40)])
    async with MockServer(MockConfig(requests_per_minute=1200)) as server:  # 20 a second
        result = await _run(server, tmp_path, source, concurrency=16, max_requests_per_minute=1200)
    assert result.exit_code == EXIT_OK, result.message
    assert server.state.rate_limited == 0 and len(server.state.requests) == 40
    assert result.stats.retries == 0


async def test_without_a_configured_quota_the_servers_announced_quota_is_followed(tmp_path: Path) -> None:
    source = _input(tmp_path, [{"prompt": f"row {i}"} for i in range(60)])
    async with MockServer(MockConfig(requests_per_minute=1200)) as server:
        result = await _run(server, tmp_path, source, concurrency=4)
    assert result.exit_code == EXIT_OK, result.message
    # Only requests sent before the first answer's headers arrived can meet a 429.
    assert server.state.rate_limited <= 4
    assert pl.read_parquet(tmp_path / "out.parquet")["error"].null_count() == 60


async def test_rows_that_cannot_fit_are_refused_unsent_and_the_estimate_never_refuses_one_that_fits(tmp_path: Path) -> None:
    long_prompt = " ".join(f"w{i}" for i in range(60))  # 60 words: 60 of the mock's tokens, 239 bytes
    rows = [
        {"id": "fits", "prompt": "a short question", "max_tokens": 5},
        {"id": "answer-too-long", "prompt": "hi", "max_tokens": 50},  # 1 + 50 > 50: certain
        {"id": "prompt-too-long", "prompt": long_prompt, "max_tokens": 5},  # only an exact count knows
    ]
    source = _input(tmp_path, rows)
    async with MockServer(MockConfig(max_model_len=50)) as server:
        estimated = await _run(server, tmp_path, source)
        by_id = {row["id"]: row for row in pl.read_parquet(tmp_path / "out.parquet").to_dicts()}
        sent_estimated = len(server.state.requests)
        exact = await _run(server, tmp_path, source, check_length="exact", overwrite=True)
        exact_rows = {row["id"]: row for row in pl.read_parquet(tmp_path / "out.parquet").to_dicts()}
    assert estimated.exit_code == exact.exit_code == EXIT_ROW_ERRORS
    assert by_id["fits"]["error"] is None
    assert by_id["answer-too-long"]["error_type"] == "context_length" and by_id["answer-too-long"]["attempts"] == 0
    assert "max_tokens 50" in by_id["answer-too-long"]["error"]
    # The estimate cannot be sure of the long prompt: it is sent, and the server refuses it.
    assert by_id["prompt-too-long"]["status_code"] == 400 and "maximum context length" in by_id["prompt-too-long"]["error"]
    assert sent_estimated == 2
    # The exact count knows: refused before sending, the server's count in the message.
    assert exact_rows["prompt-too-long"]["error_type"] == "context_length"
    assert exact_rows["prompt-too-long"]["status_code"] is None and exact_rows["fits"]["error"] is None
    assert len(server.state.requests) == sent_estimated + 1  # only "fits" was sent by the exact run


async def test_check_length_off_sends_every_row(tmp_path: Path) -> None:
    source = _input(tmp_path, [{"id": "a", "prompt": "hi", "max_tokens": 50}])
    async with MockServer(MockConfig(max_model_len=50)) as server:
        result = await _run(server, tmp_path, source, check_length="off")
    assert result.exit_code == EXIT_ROW_ERRORS and len(server.state.requests) == 1
    assert pl.read_parquet(tmp_path / "out.parquet")["status_code"].to_list() == [400]

"""`batchgen run` against llama.cpp's server: a dozen questions, plain (in-process) and streamed (the CLI).

The model is SmolLM2-135M at temperature 0, so the only assertions on its text are ones a
135M model gets right every time ("Paris") and ones that are about the protocol, not the model
(finish_reason "length" at max_tokens 5, logprob tokens that spell the content).
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.config import load_config
from batchgen.pipeline import EXIT_OK, run_async
from tests.real.conftest import LlamaServer

QUESTIONS = {
    "france": "What is the capital of France?",
    "colour": "What colour is the sky on a clear day?",
    "legs": "How many legs does a spider have?",
    "water": "What is the chemical formula of water?",
    "short": "Tell me a long story about a dragon.",  # max_tokens 5: ends with finish_reason "length"
    "logprobs": "Say hello.",  # logprobs true, top_logprobs 2
    "planet": "Which planet is closest to the Sun?",
    "sum": "What is 2 + 2?",
    "ocean": "Name the largest ocean on Earth.",
    "author": "Who wrote Romeo and Juliet?",
    "freeze": "At what temperature in Celsius does water freeze?",
    "week": "How many days are there in a week?",
}
MAX_TOKENS = 32
TIMEOUT_S = 100.0  # the CLI run; 12 answers of at most 32 tokens take ~10 s on 2 cores


def _write_input(path: Path) -> None:
    ids = list(QUESTIONS)
    table = pa.table({
        "id": ids,
        "prompt": list(QUESTIONS.values()),
        "max_tokens": pa.array([5 if i == "short" else None for i in ids], pa.int64()),
        "logprobs": pa.array([True if i == "logprobs" else None for i in ids], pa.bool_()),
        "top_logprobs": pa.array([2 if i == "logprobs" else None for i in ids], pa.int64()),
    })
    pq.write_table(table, path)


def _check_every_row(out: pl.DataFrame, server: LlamaServer) -> dict[str, dict[str, Any]]:
    """What holds for both runs; returns the rows by id."""
    assert out["id"].to_list() == list(QUESTIONS)
    rows = {row["id"]: row for row in out.iter_rows(named=True)}
    for row_id, row in rows.items():
        assert row["error"] is None and row["error_type"] is None, (row_id, row)
        assert row["attempts"] == 1, (row_id, row["attempts"])
        assert isinstance(row["content"], str) and row["content"].strip(), (row_id, row["content"])
        assert row["finish_reason"] in ("stop", "length"), (row_id, row["finish_reason"])
        # llama.cpp echoes the request's model name: this is the one batchgen found in GET /v1/models.
        assert row["model"] == server.model, (row_id, row["model"])
        # It ignores n (one choice) and reports no stop_reason.
        assert row["choices"] is None and row["stop_reason"] is None, (row_id, row)
        assert row["response_id"].startswith("chatcmpl-"), (row_id, row["response_id"])
        assert row["latency_s"] > 0
    assert "Paris" in rows["france"]["content"]
    assert rows["short"]["finish_reason"] == "length"
    # The input's own columns are carried over; `logprobs` clashes with the output column.
    assert out["prompt"].to_list() == list(QUESTIONS.values())
    assert out["max_tokens"].to_list() == [5 if i == "short" else None for i in QUESTIONS]
    assert out["input_logprobs"].to_list() == [True if i == "logprobs" else None for i in QUESTIONS]
    assert out["top_logprobs"].to_list() == [2 if i == "logprobs" else None for i in QUESTIONS]
    # Logprobs only where the row asked for them, one entry per generated token.
    for row_id, row in rows.items():
        if row_id != "logprobs":
            assert row["logprobs"] is None, (row_id, row["logprobs"])
    logprobs = rows["logprobs"]["logprobs"]
    assert logprobs, rows["logprobs"]
    assert "".join(entry["token"] for entry in logprobs) == rows["logprobs"]["content"]
    for entry in logprobs:
        assert entry["logprob"] <= 0.0, entry
        first, second = entry["top_logprobs"]  # exactly top_logprobs (2) alternatives
        # Most likely first. The chosen token need not be among them even at temperature 0: the
        # server's default repeat_penalty (1.1) acts on the choice, not on the reported logprobs.
        assert first["logprob"] >= second["logprob"] and first["logprob"] >= entry["logprob"], entry
    return rows


async def test_plain_run_answers_every_row(llama_server: LlamaServer, tmp_path: Path) -> None:
    source = tmp_path / "questions.parquet"
    _write_input(source)
    cfg = load_config({
        "input": str(source), "output": str(tmp_path / "answers.parquet"), "base_url": llama_server.url,
        "concurrency": 4, "temperature": 0, "max_tokens": MAX_TOKENS, "progress": False,
    })
    result = await run_async(cfg, log=io.StringIO())
    assert result.exit_code == EXIT_OK, result.message
    out = pl.read_parquet(tmp_path / "answers.parquet")
    rows = _check_every_row(out, llama_server)
    for row_id, row in rows.items():
        usage = row["usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0, (row_id, usage)
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], (row_id, usage)
        assert usage["completion_tokens"] <= MAX_TOKENS, (row_id, usage)
        assert usage["cached_tokens"] is None and usage["reasoning_tokens"] is None, (row_id, usage)  # not reported
        assert row["ttft_s"] is None, (row_id, row["ttft_s"])
    assert rows["short"]["usage"]["completion_tokens"] == 5
    assert len(rows["logprobs"]["logprobs"]) == rows["logprobs"]["usage"]["completion_tokens"]


def test_streamed_run_from_the_cli(llama_server: LlamaServer, tmp_path: Path) -> None:
    source = tmp_path / "questions.parquet"
    _write_input(source)
    output = tmp_path / "answers.parquet"
    command = [
        sys.executable, "-m", "batchgen", "run", "--input", str(source), "--output", str(output),
        "--base-url", llama_server.url, "--concurrency", "4", "--stream", "--temperature", "0",
        "--max-tokens", str(MAX_TOKENS), "--no-progress",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    out = pl.read_parquet(output)
    rows = _check_every_row(out, llama_server)
    for row_id, row in rows.items():
        assert row["ttft_s"] is not None and 0 < row["ttft_s"] <= row["latency_s"], (row_id, row)
        # llama.cpp streams no usage chunk, even asked with stream_options.include_usage; none is invented.
        assert row["usage"] is None, (row_id, row["usage"])

"""`batchgen bench` (the CLI, as a user runs it) against llama.cpp's server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from tests.real.conftest import LlamaServer

NUM_PROMPTS = 8
TIMEOUT_S = 100.0  # 8 answers of 8 tokens to 16-word prompts take a few seconds on 2 cores


def test_bench_random_dataset_every_request_succeeds(llama_server: LlamaServer, tmp_path: Path) -> None:
    result_json = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "batchgen", "bench", "--base-url", llama_server.url,
        "--dataset", "random", "--input-len", "16", "--output-len", "8",
        "--num-prompts", str(NUM_PROMPTS), "--concurrency", "2", "--temperature", "0",
        "--result-json", str(result_json),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    result = orjson.loads(result_json.read_bytes())
    assert result["model_id"] == llama_server.model
    assert (result["num_prompts"], result["completed"], result["failed"]) == (NUM_PROMPTS, NUM_PROMPTS, 0), result
    assert result["error_counts"] == {}
    assert result["max_concurrency"] == 2 and result["max_concurrent_requests"] <= 2
    # llama.cpp streams no usage chunk (even with stream_options.include_usage), so batchgen
    # counts text chunks and says so rather than reporting the requested length.
    assert result["token_source"] == "chunks" and result["requests_without_usage"] == NUM_PROMPTS
    assert "COUNTED AS TEXT CHUNKS" in result["token_note"] and "COUNTED AS TEXT CHUNKS" in done.stdout
    # llama-cpp-python honours min_tokens (= max_tokens = 8: EOS is masked) and sends one chunk per token.
    assert result["total_output_tokens"] == NUM_PROMPTS * 8 and result["total_input_tokens"] == 0  # unknown
    assert 0 < result["median_ttft_ms"] <= result["median_e2el_ms"]
    assert result["request_throughput"] > 0

"""`batchgen run` as a `vllm run-batch` stand-in, against llama.cpp's server: an OpenAI batch file in,
OpenAI batch output lines out, each `body` the server's own JSON as it sent it, and a request the
server refuses written with its status and error as vLLM's run-batch writes it."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from batchgen.cli import main
from tests.real.conftest import LlamaServer


def _request(custom_id: str, content: str, **body: object) -> bytes:
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "ignored", "messages": [{"role": "user", "content": content}], **body}})  # fmt: skip


def test_a_batch_file_through_llama_cpp_gives_openai_batch_lines(
    llama_server: LlamaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "batch.jsonl", tmp_path / "results.jsonl"
    source.write_bytes(b"\n".join([
        _request("france", "What is the capital of France?", max_tokens=16, temperature=0),
        _request("too-long", "word " * 10_000, max_tokens=16),  # five times the server's context
        _request("sum", "What is 2 + 2?", max_tokens=8, temperature=0),
    ]) + b"\n")  # fmt: skip
    code = main(["run", "-i", str(source), "-o", str(out), "--model", llama_server.model, "--base-url",
                 llama_server.url, "--no-progress", "--concurrency", "2"])  # fmt: skip
    assert code == 1, capsys.readouterr().err  # one row refused by the server
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [line["custom_id"] for line in lines] == ["france", "too-long", "sum"]
    assert all(set(line) == {"id", "custom_id", "response", "error"} and line["id"].startswith("batch_req_") for line in lines)
    france = lines[0]
    assert france["error"] is None and france["response"]["status_code"] == 200
    body = france["response"]["body"]
    assert body["object"] == "chat.completion" and "Paris" in body["choices"][0]["message"]["content"]
    assert france["response"]["request_id"] == body["id"] and body["usage"]["completion_tokens"] <= 16
    refused = lines[1]
    assert refused["response"]["status_code"] == 400 and refused["response"]["body"] is None
    assert "maximum context length" in refused["error"]["error"]["message"]
    assert lines[2]["error"] is None and lines[2]["response"]["body"]["choices"][0]["finish_reason"] in ("stop", "length")

"""Several servers against llama.cpp's server: its health as a `ClientPool` probes it, a run shared
with a second server, and a dead server dropped at the start or taken out mid-run."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from batchgen import Client, ClientPool
from batchgen.config import load_config
from batchgen.pipeline import EXIT_OK, run_async
from batchgen.testing.mock_server import MockConfig, MockServer
from tests.real.conftest import LlamaServer

QUESTIONS = [f"What is {i} + {i}?" for i in range(8)]



def _input(tmp_path: Path) -> Path:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": QUESTIONS}), path)
    return path


async def test_the_health_probe_passes_on_llama_cpp_which_has_no_health_route(
    llama_server: LlamaServer, dead_url: Callable[[], str]
) -> None:
    # llama-cpp-python serves no /health (404): the probe falls back to GET /v1/models.
    async with Client(llama_server.url) as client:
        assert await client.check_health()
    async with Client(dead_url()) as dead:
        assert not await dead.check_health()


async def test_a_run_shared_by_llama_cpp_and_a_second_server(llama_server: LlamaServer, tmp_path: Path) -> None:
    async with MockServer(MockConfig(models=(llama_server.model,), latency_ms=50)) as other:
        cfg = load_config({"input": str(_input(tmp_path)), "output": str(tmp_path / "out.parquet"), "progress": False,
                           "base_url": [llama_server.url, other.url], "concurrency": 1, "max_tokens": 8,
                           "temperature": 0})  # fmt: skip
        result = await run_async(cfg, log=io.StringIO())
    assert result.exit_code == EXIT_OK, result.message
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["error"].null_count() == len(QUESTIONS) and out["content"].null_count() == 0
    by_server = {url: out.filter(pl.col("endpoint") == url).height for url in (llama_server.url, other.url)}
    assert all(by_server.values()) and sum(by_server.values()) == len(QUESTIONS), by_server
    assert out.filter(pl.col("endpoint") == llama_server.url)["model"].to_list()[0] == llama_server.model


async def test_a_dead_server_is_skipped_at_the_start_or_taken_out(
    llama_server: LlamaServer, tmp_path: Path, dead_url: Callable[[], str]
) -> None:
    dead = dead_url()
    log = io.StringIO()
    settings = {"input": str(_input(tmp_path)), "output": str(tmp_path / "out.parquet"), "progress": False,
                "base_url": [dead, llama_server.url], "max_tokens": 8, "temperature": 0, "skip_bad_endpoints": True,
                "max_retries": 0}  # fmt: skip
    result = await run_async(load_config(settings), log=log)
    assert result.exit_code == EXIT_OK, result.message
    assert f"warning: skipping endpoint: cannot list models at {dead}/models" in log.getvalue()
    assert set(pl.read_parquet(tmp_path / "out.parquet")["endpoint"].to_list()) == {llama_server.url}
    # Mid-run: a pool whose first server is dead sends every request to llama.cpp after one failure.
    async with ClientPool([dead, llama_server.url], concurrency=1, eject_after=1, max_retries=1) as pool:
        for question in QUESTIONS[:3]:
            reply = await pool.chat.completions.create(model=llama_server.model, max_tokens=4,
                                                       messages=[{"role": "user", "content": question}])  # fmt: skip
            assert reply.content
        assert [e.ejections for e in pool.endpoints] == [1, 0] and pool.endpoints[1].rows == 3


async def test_concurrency_auto_on_llama_cpp_falls_back_to_client_signals(llama_server: LlamaServer, tmp_path: Path) -> None:
    # llama-cpp-python serves no vLLM /metrics: the controller says so and steers by what it sees itself.
    log = io.StringIO()
    settings = {"input": str(_input(tmp_path)), "output": str(tmp_path / "out.parquet"), "progress": False,
                "base_url": llama_server.url, "concurrency": "auto", "concurrency_max": 4, "max_tokens": 8,
                "temperature": 0, "stream": True}  # fmt: skip
    result = await run_async(load_config(settings), log=log)
    assert result.exit_code == EXIT_OK, result.message
    assert "no vLLM /metrics; concurrency auto steers by 429s, timeouts and TTFT only" in log.getvalue()
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["error"].null_count() == len(QUESTIONS) and out["ttft_s"].null_count() == 0
    (figures,) = result.stats.endpoints
    assert all(tick.running is None and 1 <= tick.limit <= 4 for tick in figures.timeline)  # a tick per 1.5 s

"""`batchgen bench` over several servers: one load spread over in-process mock servers on 127.0.0.1.

No timing asserts: which server gets the first requests is fixed (the pool picks synchronously,
ties going to the first server), and the only comparison of speeds is an ordering with a 30x
margin (a slow server frees its slots 30x less often in a closed loop).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

from batchgen.bench.datasets import DatasetSpec, load_dataset
from batchgen.bench.metrics import summarize
from batchgen.bench.runner import LoadSpec, ServerSpec, run_shard
from batchgen.cli import main
from batchgen.errors import ConfigError
from batchgen.testing.mock_server import MockConfig, MockServer, mock_server_thread

FAST = MockConfig(ttft_ms=1, itl_ms=1)


def _bodies(num: int = 6, output_len: int = 5) -> tuple[dict[str, Any], ...]:
    spec = DatasetSpec(name="random", model="mock-model", num_prompts=num, input_len=8, output_len=output_len)
    return load_dataset(spec).bodies


async def test_one_load_over_three_servers_counts_every_request_once() -> None:
    async with MockServer(FAST) as a, MockServer(FAST) as b, MockServer(FAST) as c:
        urls = (a.url, b.url, c.url)
        shard = await run_shard(ServerSpec(base_urls=urls), _bodies(), LoadSpec(concurrency=6, num_prompts=30))
        seen = {s.url: len(s.state.requests) for s in (a, b, c)}
    records = shard.records
    assert sorted(r.index for r in records) == list(range(30)) and all(r.ok for r in records)
    per_server = Counter(r.endpoint for r in records)
    assert per_server == seen  # each record names the server that answered it
    assert all(per_server[url] > 0 for url in urls)
    s = summarize(records, duration_s=shard.load.wall_s, endpoints=urls)
    assert [e.url for e in s.endpoints] == list(urls)
    assert [e.summary.completed for e in s.endpoints] == [per_server[url] for url in urls]
    assert sum(e.summary.completed for e in s.endpoints) == s.completed == 30
    assert sum(e.summary.total_output_tokens for e in s.endpoints) == s.total_output_tokens == 30 * 5


async def test_a_slower_server_gets_fewer_requests_in_a_closed_loop() -> None:
    async with MockServer(FAST) as fast, MockServer(MockConfig(ttft_ms=1, itl_ms=30)) as slow:
        server = ServerSpec(base_urls=(slow.url, fast.url))  # the slow one first: it wins the ties
        shard = await run_shard(server, _bodies(output_len=10), LoadSpec(concurrency=4, num_prompts=40))
    per_server = Counter(r.endpoint for r in shard.records)
    assert sum(per_server.values()) == 40 and all(r.ok for r in shard.records)
    assert 0 < per_server[slow.url] < per_server[fast.url]


async def test_a_server_without_the_model_gives_error_records_of_its_own() -> None:
    async with MockServer(FAST) as good, MockServer(MockConfig(models=("other-model",))) as wrong:
        urls = (good.url, wrong.url)
        shard = await run_shard(ServerSpec(base_urls=urls), _bodies(), LoadSpec(concurrency=2, num_prompts=10))
    s = summarize(shard.records, duration_s=shard.load.wall_s, endpoints=urls)
    by_url = {e.url: e.summary for e in s.endpoints}
    assert by_url[good.url].failed == 0 and by_url[good.url].completed > 0
    assert by_url[wrong.url].completed == 0 and by_url[wrong.url].failed > 0
    assert dict(by_url[wrong.url].errors) == {"not_found": by_url[wrong.url].failed}
    assert by_url[good.url].completed + by_url[wrong.url].failed == len(shard.records) == 10


def _cli(*args: str) -> int:
    return main(["bench", "--input-len", "5", "--output-len", "4", "--concurrency", "4", *args])


def test_the_report_and_the_result_json_break_the_load_down_per_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result, raw = tmp_path / "r.json", tmp_path / "raw.parquet"
    with mock_server_thread(FAST) as a, mock_server_thread(FAST) as b:
        rc = _cli("--base-url", a.url, "--base-url", b.url, "--num-prompts", "24", "--result-json", str(result),
                  "--raw-output", str(raw))  # fmt: skip
        seen = {a.url: len(a.state.requests), b.url: len(b.state.requests)}
    assert rc == 0
    data = orjson.loads(result.read_bytes())
    endpoints = data["endpoints"]
    assert [e["base_url"] for e in endpoints] == [a.url, b.url]
    assert {e["base_url"]: e["requests"] for e in endpoints} == seen
    assert all(e["requests"] > 0 and e["failed"] == 0 and e["mean_ttft_ms"] is not None for e in endpoints)
    assert sum(e["requests"] for e in endpoints) == data["completed"] == 24
    assert sum(e["total_output_tokens"] for e in endpoints) == data["total_output_tokens"]
    assert sum(e["output_throughput"] for e in endpoints) == pytest.approx(data["output_throughput"])
    rows = pq.read_table(raw).to_pylist()
    assert Counter(row["endpoint"] for row in rows) == seen
    lines = capsys.readouterr().out.splitlines()
    assert any("Per endpoint" in line for line in lines)
    for url, count in seen.items():
        (line,) = (line for line in lines if line.startswith(url))
        assert line.split()[1:3] == [str(count), "0"]  # requests, failed


def test_several_mocks_are_several_servers(tmp_path: Path) -> None:
    result = tmp_path / "r.json"
    assert _cli("--base-url", "mock", "--base-url", "mock", "--num-prompts", "8", "--result-json", str(result)) == 0
    data = orjson.loads(result.read_bytes())
    urls = [e["base_url"] for e in data["endpoints"]]
    assert len(set(urls)) == 2 and "mock" not in urls
    assert sum(e["requests"] for e in data["endpoints"]) == data["completed"] == 8


def test_one_server_is_its_own_single_endpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = tmp_path / "r.json"
    with mock_server_thread(FAST) as server:
        assert _cli("--base-url", server.url, "--num-prompts", "4", "--result-json", str(result)) == 0
    (only,) = orjson.loads(result.read_bytes())["endpoints"]
    assert only["base_url"] == server.url and only["requests"] == 4
    assert "Per endpoint" not in capsys.readouterr().out  # the breakdown would repeat the totals


def test_a_base_url_given_twice_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="given twice: http://h:1/v1"):
        ServerSpec(base_urls=("http://h:1/v1", "http://h:2/v1", "http://h:1/v1"))
    with pytest.raises(ConfigError, match="at least one"):
        ServerSpec(base_urls=())
    assert ServerSpec(base_urls=("mock", "mock")).base_url == "mock"
    assert ServerSpec.of("http://h:1/v1", timeout=5.0).base_urls == ("http://h:1/v1",)
    assert _cli("--base-url", "http://h:1/v1", "--base-url", "http://h:1/v1") == 2
    assert "given twice" in capsys.readouterr().err

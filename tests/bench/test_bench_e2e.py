"""`batchgen bench` end to end against the built-in mock server (and a scripted one) on 127.0.0.1.

Timing tolerances: the mock sleeps `ttft_ms` before the first token and `itl_ms` before each later
one, so TTFT >= ttft_ms and E2EL >= ttft_ms + (n-1)·itl_ms hold exactly for every request (the
server cannot answer before it is asked). Per-gap figures can only be checked against a slightly
looser floor (95% of itl_ms), because a late first chunk shortens the next gap. Upper bounds are
generous (+50 ms on medians and means, +100 ms on E2EL, which adds up ten sleeps) so a busy CI
machine never makes these tests flaky.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

from batchgen.bench.datasets import DatasetSpec, load_dataset
from batchgen.bench.metrics import summarize
from batchgen.bench.runner import LoadSpec, ServerSpec, arrival_offsets, run_shard
from batchgen.cli import main
from batchgen.testing.mock_server import MockConfig, MockServer, mock_server_thread
from tests.conftest import Reply

TTFT_MS, ITL_MS, SLACK_MS = 50.0, 10.0, 50.0
OUTPUT_LEN = 10


def _bodies(num: int = 6, output_len: int = OUTPUT_LEN) -> tuple[dict[str, Any], ...]:
    spec = DatasetSpec(name="random", model="mock-model", num_prompts=num, input_len=8, output_len=output_len)
    return load_dataset(spec).bodies


async def test_measured_latencies_match_the_configured_delays() -> None:
    async with MockServer(MockConfig(ttft_ms=TTFT_MS, itl_ms=ITL_MS)) as server:
        shard = await run_shard(ServerSpec.of(server.url), _bodies(), LoadSpec(concurrency=2, num_prompts=6))
        sent = server.state.requests
    assert len(shard.records) == 6 and all(r.ok for r in shard.records)
    for r in shard.records:
        assert r.output_tokens == OUTPUT_LEN and len(r.chunk_times_s) == OUTPUT_LEN
        assert r.chunk_tokens == (1,) * OUTPUT_LEN  # continuous usage: one word per chunk
        assert r.ttft_s is not None and r.e2el_s is not None
        assert r.ttft_s * 1000 >= TTFT_MS
        assert r.e2el_s * 1000 >= TTFT_MS + (OUTPUT_LEN - 1) * ITL_MS
    s = summarize(shard.records, duration_s=shard.load.wall_s, clients=[shard.load])
    assert s.ttft is not None and s.e2el is not None
    assert s.tpot is not None and s.itl is not None and s.itl_per_token is not None
    assert s.ttft.median <= TTFT_MS + SLACK_MS
    assert s.e2el.median <= TTFT_MS + (OUTPUT_LEN - 1) * ITL_MS + 2 * SLACK_MS
    assert 0.95 * ITL_MS <= s.tpot.mean <= ITL_MS + SLACK_MS
    assert 0.95 * ITL_MS <= s.itl.median <= ITL_MS + SLACK_MS
    assert s.itl_per_token.median == pytest.approx(s.itl.median)
    assert s.token_source == "usage" and s.total_output_tokens == 6 * OUTPUT_LEN
    body = sent[0]
    assert body["ignore_eos"] is True and body["min_tokens"] == body["max_tokens"] == OUTPUT_LEN
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


async def test_failures_are_counted_and_warmup_is_not() -> None:
    config = MockConfig(ttft_ms=2, itl_ms=1, fault_rate=0.4, faults=("500", "truncated"), seed=3)
    async with MockServer(config) as server:
        load = LoadSpec(concurrency=4, num_prompts=20, warmup=3)
        shard = await run_shard(ServerSpec.of(server.url), _bodies(), load)
        faults = sum(server.state.faults_injected.values())
        seen = len(server.state.requests)
    failed = [r for r in shard.records if not r.ok]
    assert seen == 23 and len(shard.records) == 20  # warmup requests reach the server, not the report
    assert failed, "seed 3 at 40% must inject faults"
    assert {r.error_type for r in failed} <= {"server_error", "incomplete_response"}
    s = summarize(shard.records, duration_s=shard.load.wall_s)
    assert s.failed == len(failed) and s.completed == 20 - len(failed)
    assert s.failed <= faults  # a fault during warmup is not counted


async def test_open_loop_follows_the_schedule_and_the_cap() -> None:
    async with MockServer(MockConfig(ttft_ms=20, itl_ms=1)) as server:
        url = ServerSpec.of(server.url)
        paced = await run_shard(url, _bodies(), LoadSpec(request_rate=50, num_prompts=8, seed=1))
        server.state.reset()
        capped = await run_shard(url, _bodies(), LoadSpec(max_concurrency=2, num_prompts=6))
        peak = server.state.max_in_flight
    expected = list(arrival_offsets(LoadSpec(request_rate=50, num_prompts=8, seed=1), 8))
    assert [r.scheduled_s for r in sorted(paced.records, key=lambda r: r.index)] == expected
    assert expected[-1] == pytest.approx(8 / 50)
    assert all(r.sent_s >= r.scheduled_s - 1e-3 for r in paced.records)
    assert peak <= 2
    assert any(r.queue_s > 0.01 for r in capped.records)  # waited for a slot: queueing, not lag


def _sse(*events: dict[str, Any]) -> list[bytes]:
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


async def test_a_server_without_usage_is_labelled(scripted_server: Callable[..., Awaitable[Any]]) -> None:
    def delta(d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "x", "model": "m", "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}

    chunks = _sse(delta({"role": "assistant", "content": ""}), delta({"reasoning_content": "hm"}),
                  delta({"content": "a"}), delta({"content": " b"}, "stop"))  # fmt: skip
    server = await scripted_server([Reply(chunks=chunks, content_type="text/event-stream")])
    shard = await run_shard(ServerSpec.of(server.url), _bodies(2), LoadSpec(concurrency=1, num_prompts=2))
    r = shard.records[0]
    assert r.ok and r.output_tokens is None and r.chunk_tokens is None
    assert len(r.chunk_times_s) == 3  # reasoning counts as text; the role chunk does not
    s = summarize(shard.records, duration_s=1.0)
    assert s.token_source == "chunks" and s.total_output_tokens == 6 and s.itl_per_token is None


def _cli(url: str, *extra: str) -> int:
    return main(["bench", "--base-url", url, "--input-len", "5", "--output-len", "4", *extra])


def test_sweep_writes_one_result_per_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result, raw = tmp_path / "r.json", tmp_path / "raw.parquet"
    with mock_server_thread(MockConfig(ttft_ms=5, itl_ms=1)) as server:
        rc = _cli(server.url, "--num-prompts", "4", "--concurrency", "1,2", "--goodput", "ttft:1000",
                  "--result-json", str(result), "--raw-output", str(raw))  # fmt: skip
    assert rc == 0
    levels = [orjson.loads(line) for line in result.read_bytes().splitlines()]
    assert [lv["max_concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["model_id"] == "mock-model"  # discovered from GET /v1/models
        assert lv["completed"] == 4 and lv["failed"] == 0 and lv["total_output_tokens"] == 16
        assert lv["request_goodput"] > 0 and lv["token_source"] == "usage"
        for key in ("duration", "request_throughput", "output_throughput", "total_token_throughput",
                    "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "p99.9_itl_ms",
                    "mean_tpot_ms", "p90_e2el_ms", "request_rate", "burstiness", "p99_send_lag_ms",
                    "client_cpu_util_max"):  # fmt: skip
            assert key in lv, key
    table = pq.read_table(raw).to_pylist()
    assert len(table) == 8 and {row["level"] for row in table} == {0, 1}
    assert all(len(row["chunk_times_s"]) == 4 and row["chunk_tokens"] == [1, 1, 1, 1] for row in table)
    out = capsys.readouterr().out
    assert out.count("Serving Benchmark Result") == 2 and "concurrency 2" in out


def test_client_processes_merge_into_one_report(tmp_path: Path) -> None:
    result, raw = tmp_path / "r.json", tmp_path / "raw.parquet"
    with mock_server_thread(MockConfig(ttft_ms=5, itl_ms=1)) as server:
        rc = _cli(server.url, "--model", "mock-model", "--num-prompts", "6", "--concurrency", "2",
                  "--client-processes", "2", "--result-json", str(result), "--raw-output", str(raw))  # fmt: skip
    assert rc == 0
    data = orjson.loads(result.read_bytes())
    assert data["completed"] == 6 and data["client_processes"] == 2 and data["max_concurrency"] == 2
    rows = pq.read_table(raw).to_pylist()
    assert sorted(row["index"] for row in rows) == list(range(6))
    assert {row["process"] for row in rows} == {0, 1}
    assert all(row["sent_s"] >= 0 for row in rows)


def test_file_and_sharegpt_datasets(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "one two", "max_tokens": 2}\n{"prompt": "three"}\n')
    share = tmp_path / "share.json"
    conversations = [{"conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "x" * 40}]},
                     {"conversations": [{"from": "human", "value": "alone"}]}]  # fmt: skip
    share.write_bytes(orjson.dumps(conversations))
    with mock_server_thread(MockConfig()) as server:
        assert _cli(server.url, "--dataset", str(rows), "--num-prompts", "2", "--concurrency", "1") == 0
        assert main(["bench", "--base-url", server.url, "--dataset", "sharegpt", "--dataset-path", str(share),
                     "--num-prompts", "1", "--concurrency", "1"]) == 0  # fmt: skip
        sent = list(server.state.requests)
    # The row's own max_tokens wins over --output-len, and the answer is pinned to it.
    assert (sent[0]["max_tokens"], sent[0]["min_tokens"]) == (2, 2)
    assert (sent[1]["max_tokens"], sent[1]["min_tokens"], sent[1]["ignore_eos"]) == (4, 4, True)
    assert sent[2]["messages"] == [{"role": "user", "content": "hi there"}]
    assert sent[2]["max_tokens"] == 10 and "ignore_eos" not in sent[2]  # 40 chars ≈ 10 tokens, as a cap only


def test_plot_without_matplotlib_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    assert _cli("http://127.0.0.1:9/v1", "--plot", str(tmp_path / "p.png")) == 2
    assert "needs matplotlib" in capsys.readouterr().err


async def test_a_duration_run_stops_starting_requests_at_the_deadline() -> None:
    async with MockServer(MockConfig(ttft_ms=20, itl_ms=1)) as server:
        load = LoadSpec(max_concurrency=3, num_prompts=None, duration_s=0.3)
        shard = await run_shard(ServerSpec.of(server.url), _bodies(), load)
    assert shard.records and all(r.ok for r in shard.records)
    assert all(r.sent_s < 0.3 + 0.05 for r in shard.records)  # none started after the deadline (+ slack)
    assert server.state.max_in_flight <= 3

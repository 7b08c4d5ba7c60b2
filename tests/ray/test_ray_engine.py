"""`batchgen run --engine ray` on a local Ray: the same output as a local run, and the same guarantees.

Every test sends to the project's mock in a thread of this process, which the actors reach on 127.0.0.1.
"""

from __future__ import annotations

import io
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.config import load_config
from batchgen.errors import OutputError
from batchgen.pipeline import EXIT_OK, EXIT_ROW_ERRORS, RunResult, run
from batchgen.testing.mock_server import MockConfig, mock_server_thread

from ..conftest import prompt_of

# Ray Data warns about its own settings' deprecations when the DataContext is first built.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
VARYING = {"latency_s", "ttft_s"}  # timing; everything else must match a local run exactly
FAST_RETRIES = {"backoff_base": 0.01, "backoff_max": 0.02}


def _mixed_rows(n: int) -> list[bytes]:
    """JSONL lines: overrides, multi-turn, tool calls, reasoning, and rows that cannot be sent."""
    lines = []
    for i in range(n):
        row: dict[str, Any] = {"id": f"r{i}", "messages": [{"role": "user", "content": f"question number {i}"}]}
        if i % 3 == 0:
            row["temperature"] = round(0.1 * (i % 7), 1)
        if i % 5 == 0:
            row["max_tokens"] = 2 + i % 4
        if i % 97 == 3:
            row["tools"], row["tool_choice"] = TOOLS, "required"
        if i % 89 == 5:
            row["chat_template_kwargs"] = {"enable_thinking": True}
        if i % 61 == 7:
            row["messages"] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hi {i}"},
                               {"role": "assistant", "content": "hello"}, {"role": "user", "content": f"again {i}"}]
        if i == 1500:
            row["temperature"] = "hot"  # a value the column's type cannot hold
        if i == 1700:
            row["messages"] = [{"role": "wizard", "content": "x"}]  # an invalid request
        if i == 1800:
            row["max_tokens"] = 9000  # past the mock's context (8192): refused before sending, on both engines
        lines.append(orjson.dumps(row))
    lines[1234] = b'{"id": "r1234", "messages": ['  # not JSON
    lines.insert(10, b"")  # a blank line: not a row, but counted in "line N"
    return lines


def _config(tmp_path: Path, source: Path, output: str, url: str, **options: Any) -> Any:
    settings = {"input": str(source), "output": str(tmp_path / output), "base_url": url, "progress": False,
                "flush_seconds": 0.05, **FAST_RETRIES, **options}
    return load_config(settings)


def _ray_output(path: Path) -> pl.DataFrame:
    """The README's one-liner: the part files back in input order."""
    return pl.read_parquet(path / "*.parquet").sort("input_index")


def test_the_ray_engine_writes_what_a_local_run_writes(tmp_path: Path, ray_address: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(_mixed_rows(2000)) + b"\n")
    with mock_server_thread() as server:
        local = run(_config(tmp_path, source, "local.parquet", server.url, concurrency=16), log=io.StringIO())
        sent_locally = len(server.state.requests)
        log = io.StringIO()
        remote = run(_config(tmp_path, source, "ray-out", server.url, concurrency=16, engine="ray", ray_actors=2,
                             ray_block_rows=150), log=log)  # fmt: skip
    assert local.exit_code == remote.exit_code == EXIT_ROW_ERRORS, (local.message, remote.message)
    assert len(server.state.requests) == 2 * sent_locally  # every good row sent once by each engine
    expected = pl.read_parquet(tmp_path / "local.parquet")
    got = _ray_output(tmp_path / "ray-out")
    # The same schema (Arrow types included), plus the input position.
    local_schema = pq.read_schema(tmp_path / "local.parquet")
    ray_schema = pq.read_schema(next((tmp_path / "ray-out").glob("part-*.parquet")))
    assert ray_schema.names == [*local_schema.names, "input_index"]
    assert ray_schema.remove(ray_schema.get_field_index("input_index")).equals(local_schema, check_metadata=False)
    assert got["input_index"].to_list() == list(range(2000))
    assert got.height == expected.height == 2000
    compared = [c for c in expected.columns if c not in VARYING]
    assert got.select(compared).to_dicts() == expected.select(compared).to_dicts()
    by_id = {row["id"]: row for row in got.to_dicts()}
    assert by_id["r3"]["finish_reason"] == "tool_calls" and by_id["r3"]["tool_calls"][0]["function"]["name"] == "lookup"
    assert "column 'temperature'" in by_id["r1500"]["error"] and "role" in by_id["r1700"]["error"]
    assert "line 1236" in got.row(1234, named=True)["error"]  # the blank line counts; the id was unreadable
    assert by_id["r1800"]["error_type"] == "context_length" and by_id["r1800"]["attempts"] == 0
    assert remote.stats.ok == 1996 and remote.stats.failed == 4
    assert "2000 rows (4 error rows)" in remote.message


def test_a_spent_retry_budget_gives_error_rows_and_never_a_failed_ray_job(tmp_path: Path, ray_address: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"prompt": f"p{i}"}) + b"\n" for i in range(300)))
    with mock_server_thread() as server:
        result = run(_config(tmp_path, source, "out", server.url, engine="ray", ray_actors=2, ray_block_rows=50,
                             max_retries=1, headers={"x-mock-faults": "500,503,500"}), log=io.StringIO())  # fmt: skip
    assert result.exit_code == EXIT_ROW_ERRORS, result.message
    out = _ray_output(tmp_path / "out")
    assert out.height == 300 and out["input_index"].to_list() == list(range(300))
    assert set(out["status_code"].to_list()) == {503} and set(out["attempts"].to_list()) == {2}
    assert len(server.state.requests) == 600  # two attempts per row, no more


def test_a_finished_job_sends_nothing_again_and_a_changed_plan_is_refused(tmp_path: Path, ray_address: str) -> None:
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(120)]}), source, row_group_size=40)
    with mock_server_thread() as server:
        first = run(_config(tmp_path, source, "out", server.url, engine="ray", ray_block_rows=25), log=io.StringIO())
        sent = len(server.state.requests)
        again = run(_config(tmp_path, source, "out", server.url, engine="ray", ray_block_rows=25), log=io.StringIO())
        with pytest.raises(OutputError, match="differs in: ray_block_rows"):
            run(_config(tmp_path, source, "out", server.url, engine="ray", ray_block_rows=30), log=io.StringIO())
        over = run(_config(tmp_path, source, "out", server.url, engine="ray", ray_block_rows=30, overwrite=True),
                   log=io.StringIO())  # fmt: skip
    assert first.exit_code == again.exit_code == over.exit_code == EXIT_OK
    assert sent == 120 and len(server.state.requests) == 240  # the rerun sent nothing, the overwrite all
    assert again.message.startswith("nothing to do") and again.stats.skipped == 120
    assert _ray_output(tmp_path / "out")["input_index"].to_list() == list(range(120))


def test_limit_then_the_rest(tmp_path: Path, ray_address: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"prompt": f"p{i}"}) + b"\n" for i in range(100)))
    with mock_server_thread() as server:
        part = run(_config(tmp_path, source, "out", server.url, engine="ray", ray_block_rows=30, limit=45),
                   log=io.StringIO())  # fmt: skip
        assert _ray_output(tmp_path / "out")["input_index"].to_list() == list(range(45))
        rest = run(_config(tmp_path, source, "out", server.url, engine="ray", ray_block_rows=30), log=io.StringIO())
    assert part.exit_code == rest.exit_code == EXIT_OK
    assert _ray_output(tmp_path / "out")["input_index"].to_list() == list(range(100))
    # The rerun sent the 55 rows not done, and again only the chunk the limit had cut short (30..44).
    assert len(server.state.requests) == 45 + 55 + 15


def test_uris_for_input_and_output(tmp_path: Path, ray_address: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"prompt": f"p{i}"}) + b"\n" for i in range(40)))
    with mock_server_thread() as server:
        settings = {"input": f"file://{source}", "output": f"file://{tmp_path}/uri-out", "base_url": server.url,
                    "engine": "ray", "ray_block_rows": 10, "progress": False}
        result = run(load_config(settings), log=io.StringIO())
    assert result.exit_code == EXIT_OK, result.message
    assert _ray_output(tmp_path / "uri-out")["content"].to_list() == [f"echo: p{i}" for i in range(40)]


def _driver(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as sink:
        return subprocess.Popen([sys.executable, "-m", "batchgen", "run", *args], stdout=sink, stderr=subprocess.STDOUT)


def _wait_for(condition: Any, what: str, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_the_driver_then_rerun_every_row_once_and_nothing_written_sent_again(tmp_path: Path, ray_address: str) -> None:
    rows = 3000
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": [f"prompt {i}" for i in range(rows)]}),
                   source, row_group_size=500)  # fmt: skip
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text("backoff_base: 0.01\nbackoff_max: 0.02\n")
    common = [str(job), "--engine", "ray", "--ray-address", ray_address, "--input", str(source), "--output", str(out),
              "--concurrency", "16", "--ray-actors", "2", "--ray-block-rows", "100", "--no-progress"]  # fmt: skip
    log = tmp_path / "driver.log"
    with mock_server_thread(MockConfig(latency_ms=25)) as first_server:
        driver = _driver([*common, "--base-url", first_server.url], log)
        try:
            _wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 5 or driver.poll() is not None, "5 parts")
            assert driver.poll() is None, log.read_text()
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        finally:
            if driver.poll() is None:
                driver.kill()
        written = set(pl.read_parquet(out / "*.parquet")["id"].to_list())
        assert 500 <= len(written) < rows
    # The rerun sends to a server of its own: what the killed job's actors still send cannot count.
    with mock_server_thread() as second_server:
        rerun = _driver([*common, "--base-url", second_server.url], log)
        assert rerun.wait(timeout=120) == 0, log.read_text()
        resent = {prompt_of(body) for body in second_server.state.requests}
    result = pl.read_parquet(out / "*.parquet").sort("input_index")
    assert result["id"].to_list() == [f"r{i}" for i in range(rows)]  # every row, once, in input order
    assert result["error"].null_count() == rows
    assert not resent & {f"prompt {i[1:]}" for i in written}  # nothing already written was sent again
    assert len(resent) == len(second_server.state.requests)  # and nothing twice
    assert "rows already done" in log.read_text()


def test_the_progress_board_and_summary_count_every_row(tmp_path: Path, ray_address: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"prompt": f"p{i}"}) + b"\n" for i in range(400)))
    log = io.StringIO()
    with mock_server_thread(MockConfig(latency_ms=5)) as server:
        result: RunResult = run(_config(tmp_path, source, "out", server.url, engine="ray", ray_block_rows=50),
                                log=log)  # fmt: skip
    assert result.exit_code == EXIT_OK
    usage = _ray_output(tmp_path / "out")["usage"]
    assert result.stats.ok == 400 and result.stats.failed == 0
    assert result.stats.output_tokens == usage.struct.field("completion_tokens").sum() > 0
    assert result.stats.input_tokens == usage.struct.field("prompt_tokens").sum() > 0
    assert "400 rows to send in 8 blocks" in log.getvalue()


@pytest.mark.slow
def test_when_every_server_is_gone_the_job_stops_unwritten_and_a_rerun_finishes_it(tmp_path: Path, ray_address: str) -> None:
    import threading

    rows = 2000
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"prompt": f"p{i}"}) + b"\n" for i in range(rows)))
    results: list[RunResult | BaseException] = []
    server = mock_server_thread(MockConfig(latency_ms=20))
    url = server.__enter__().url
    cfg = _config(tmp_path, source, "out", url, engine="ray", ray_actors=2, ray_block_rows=50, concurrency=8)

    def drive() -> None:
        try:
            results.append(run(cfg, log=io.StringIO()))
        except BaseException as exc:  # shown by the assertion below
            results.append(exc)

    job = threading.Thread(target=drive)
    job.start()
    try:
        _wait_for(lambda: len(list((tmp_path / "out").glob("part-*.parquet"))) >= 4, "4 parts")
    finally:
        server.__exit__(None, None, None)  # the only server goes away mid-run
    job.join(timeout=90)
    (stopped,) = results
    assert isinstance(stopped, RunResult), repr(stopped)
    assert stopped.exit_code == 3 and "stopped answering" in stopped.message, stopped.message
    kept = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert kept["error"].null_count() == kept.height < rows  # no row was written as a connection error
    with mock_server_thread() as again:
        finished = run(_config(tmp_path, source, "out", again.url, engine="ray", ray_block_rows=50), log=io.StringIO())
    assert finished.exit_code == EXIT_OK, finished.message
    out = _ray_output(tmp_path / "out")
    assert out["content"].to_list() == [f"echo: p{i}" for i in range(rows)]
    assert len(again.state.requests) == rows - kept.height


def test_generate_on_ray_returns_the_frame_a_local_run_returns(ray_address: str) -> None:
    from batchgen import generate

    data = pl.DataFrame({"prompt": [f"item {i}" for i in range(60)], "tag": list(range(60))})
    with mock_server_thread() as server:
        local = generate(data, base_url=server.url)
        remote = generate(data, base_url=server.url, engine="ray", ray_block_rows=7)
    assert remote.columns == local.columns
    assert remote.drop(["latency_s"]).equals(local.drop(["latency_s"]))


def test_the_api_key_reaches_the_server_and_nothing_else(tmp_path: Path, ray_address: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import ray

    key = "sk-ray-secret-4f1d9c0e2b7a"
    monkeypatch.setenv("BATCHGEN_API_KEY", key)  # the driver's; the actors get it from the driver, not their env
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"prompt": f"p{i}"}) + b"\n" for i in range(50)))
    log = io.StringIO()
    with mock_server_thread(MockConfig(api_key=key)) as server:
        result = run(_config(tmp_path, source, "out", server.url, engine="ray", ray_block_rows=20), log=log)
    assert result.exit_code == EXIT_OK, result.message
    places = [p for p in tmp_path.rglob("*") if p.is_file()]
    session_logs = Path(ray._private.worker._global_node.get_session_dir_path())  # every Ray process's logs
    places += [p for p in (session_logs / "logs").rglob("*") if p.is_file()]
    assert len(places) > 10
    assert not [p for p in places if key.encode() in p.read_bytes()]
    assert key not in log.getvalue() and key not in result.message


def test_an_openai_batch_file_on_ray_answers_as_locally(tmp_path: Path, ray_address: str) -> None:
    source = tmp_path / "batch.jsonl"
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "mock-model", "messages": [{"role": "user", "content": f"batch {i}"}], "max_tokens": 3 + i % 3}}
             for i in range(30)]  # fmt: skip
    lines[7]["url"] = "/v1/embeddings"  # not a chat completion: an error row that keeps its custom_id
    source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    with mock_server_thread() as server:
        local = run(_config(tmp_path, source, "local.parquet", server.url, input_format="openai-batch"), log=io.StringIO())
        remote = run(_config(tmp_path, source, "out", server.url, input_format="openai-batch", engine="ray",
                             ray_block_rows=4), log=io.StringIO())  # fmt: skip
    assert local.exit_code == remote.exit_code == EXIT_ROW_ERRORS
    expected = pl.read_parquet(tmp_path / "local.parquet").drop(sorted(VARYING))
    got = _ray_output(tmp_path / "out").drop([*sorted(VARYING), "input_index"])
    assert got.equals(expected)
    assert got["id"].to_list() == [f"req-{i}" for i in range(30)] and "url" in got.row(7, named=True)["error"]


@pytest.mark.slow
def test_sigterm_stops_the_driver_cleanly_and_the_rerun_finishes(tmp_path: Path, ray_address: str) -> None:
    rows = 2000
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"prompt": f"p{i}"}) + b"\n" for i in range(rows)))
    out = tmp_path / "out"
    common = ["--engine", "ray", "--ray-address", ray_address, "--input", str(source), "--output", str(out),
              "--concurrency", "8", "--ray-block-rows", "100", "--no-progress"]  # fmt: skip
    log = tmp_path / "driver.log"
    with mock_server_thread(MockConfig(latency_ms=25)) as server:
        driver = _driver([*common, "--base-url", server.url], log)
        try:
            _wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 2 or driver.poll() is not None, "2 parts")
            driver.send_signal(signal.SIGTERM)
            assert driver.wait(timeout=60) == 130, log.read_text()
        finally:
            if driver.poll() is None:
                driver.kill()
        assert "interrupted:" in log.read_text() and "rerun the same command to resume" in log.read_text()
        rerun = _driver([*common, "--base-url", server.url], log)
        assert rerun.wait(timeout=120) == 0, log.read_text()
    result = _ray_output(out)
    assert result["content"].to_list() == [f"echo: p{i}" for i in range(rows)]


def test_a_quota_is_shared_by_the_actors_and_kept(tmp_path: Path, ray_address: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"prompt": f"p{i}"}) + b"\n" for i in range(60)))
    with mock_server_thread(MockConfig(requests_per_minute=1200)) as server:  # 20 a second, per-second slices
        result = run(_config(tmp_path, source, "out", server.url, engine="ray", ray_actors=2, ray_block_rows=10,
                             concurrency=16, max_requests_per_minute=1200), log=io.StringIO())  # fmt: skip
    assert result.exit_code == EXIT_OK, result.message
    assert server.state.rate_limited == 0 and len(server.state.requests) == 60


@pytest.mark.slow
def test_run_limits_stop_a_ray_job_with_exit_4_and_the_rerun_finishes(tmp_path: Path, ray_address: str) -> None:
    rows = 1500
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"prompt": f"p{i}"}) + b"\n" for i in range(rows)))
    with mock_server_thread(MockConfig(latency_ms=20)) as server:
        slow = _config(tmp_path, source, "out", server.url, engine="ray", ray_actors=2, ray_block_rows=50,
                       concurrency=8, max_duration=3.0, price_input=1.0, price_output=1.0)  # fmt: skip
        stopped = run(slow, log=io.StringIO())
    assert stopped.exit_code == 4 and stopped.message.startswith("stopped: --max-duration 3 s reached"), stopped.message
    saved = int(re.search(r"; (\d+) rows saved", stopped.message).group(1))  # type: ignore[union-attr]
    # Each job has a server of its own: what a stopped job's actors still send while Ray ends them cannot count.
    with mock_server_thread() as errors_server:
        failing = _config(tmp_path, source, "out-errors", errors_server.url, engine="ray", ray_block_rows=50,
                          max_retries=0, max_error_rate=0.5, min_rows_for_error_rate=100,
                          headers={"x-mock-faults": "500"})  # fmt: skip
        errors = run(failing, log=io.StringIO())
    assert errors.exit_code == 4 and "over --max-error-rate 0.5" in errors.message, errors.message
    kept = set(_ray_output(tmp_path / "out")["input_index"].to_list())
    assert 0 < saved <= len(kept) < rows  # the message counts the parts on disk when it was written
    with mock_server_thread() as again:
        finished = run(_config(tmp_path, source, "out", again.url, engine="ray", ray_block_rows=50), log=io.StringIO())
        resent = [prompt_of(body) for body in again.state.requests]
    assert finished.exit_code == EXIT_OK, finished.message
    assert len(resent) == len(set(resent)) and not set(resent) & {f"p{i}" for i in kept}  # none saved, none twice
    assert _ray_output(tmp_path / "out")["content"].to_list() == [f"echo: p{i}" for i in range(rows)]


def test_retry_failed_on_ray_sends_only_the_error_rows_and_keeps_the_rest(tmp_path: Path, ray_address: str) -> None:
    rows = 300
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"prompt": f"p{i}"}) + b"\n" for i in range(rows)))
    with mock_server_thread(MockConfig(fault_rate=0.3, faults=("500",))) as flaky:
        first = run(_config(tmp_path, source, "out", flaky.url, engine="ray", ray_block_rows=40, max_retries=0),
                    log=io.StringIO())  # fmt: skip
    before = _ray_output(tmp_path / "out")
    failed = before.filter(pl.col("error").is_not_null())
    assert first.exit_code == EXIT_ROW_ERRORS and 30 < failed.height < 150
    with mock_server_thread() as healthy:
        again = run(_config(tmp_path, source, "out", healthy.url, engine="ray", ray_block_rows=40, retry_failed=True),
                    log=io.StringIO())  # fmt: skip
        resent = sorted(prompt_of(body) for body in healthy.state.requests)
    assert again.exit_code == EXIT_OK, again.message
    assert resent == sorted(f"p{i}" for i in failed["input_index"].to_list())  # the error rows, each once
    after = _ray_output(tmp_path / "out")
    assert after["content"].to_list() == [f"echo: p{i}" for i in range(rows)] and after["error"].null_count() == rows
    kept = before.filter(pl.col("error").is_null())
    assert after.filter(pl.col("input_index").is_in(kept["input_index"].to_list()))["response_id"].to_list() == \
        kept["response_id"].to_list()  # the answers that were there stayed as they were

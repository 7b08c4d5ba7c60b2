"""Run controls (issue 14): --max-error-rate, --max-duration, --max-cost stop a run like a lost server
(drain, exit 4, a rerun resumes); the cost in the summary; --dry-run sends nothing.

Against the mock server on 127.0.0.1. Its usage is deterministic (a token per word: "question 7" is
2 prompt tokens, "echo: question 7" 3 completion tokens), so costs are exact figures.
"""

from __future__ import annotations

import io
import re
import socket
from pathlib import Path
from typing import Any, cast

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from batchgen._constants import ExitCode
from batchgen.cli import main
from batchgen.config import load_config
from batchgen.control import RunLimits
from batchgen.costs import Prices, format_cost, run_prices
from batchgen.errors import ConfigError
from batchgen.pipeline import RESUME_HINT, RunResult, run_async
from batchgen.progress import Progress, RunStats
from batchgen.records import ResultRecord
from batchgen.testing.mock_server import MockConfig, MockServer, mock_server_thread
from batchgen.workload import WorkEstimate

from .conftest import prompt_of
from .reliability.conftest import (
    assert_every_row_once_in_order,
    read_output,
    row_ids,
    row_of_prompt,
    rows_on_disk,
    state_dir,
    write_prompts,
)

FAIL_EVERY_ROW = {"x-mock-faults": "500"}  # each row's first attempt: a 500 (with max_retries 0, an error row)


async def _run(server: MockServer, input_path: Path, output: Path, **options: Any) -> RunResult:
    settings_ = {"input": str(input_path), "output": str(output), "base_url": server.url, "model": "mock-model",
                 "progress": False, "flush_seconds": 0.05, **options}  # fmt: skip
    return await run_async(load_config(settings_), log=io.StringIO())


def _sent(server: MockServer) -> list[str]:
    """The row id of every chat request the server received, in arrival order."""
    return [row_of_prompt(prompt_of(body)) for body in server.state.requests]


async def _stop_then_resume(
    server: MockServer, input_path: Path, output: Path, **limits: Any
) -> tuple[RunResult, list[str], RunResult, list[str]]:
    """A run (2 in flight) stopped by `limits`, then the same run without them: each result and the rows it sent.
    Between the two, only the rows the first one sent are on disk, and no output yet."""
    stopped = await _run(server, input_path, output, concurrency=2, **limits)
    first = _sent(server)
    assert not output.exists() and len(first) == stopped.stats.done == rows_on_disk(output)
    server.state.reset()
    resumed = await _run(server, input_path, output, concurrency=8)
    return stopped, first, resumed, _sent(server)


def _ids_in_parts(output: Path) -> list[str]:
    parts = sorted(state_dir(output).glob("part-*.parquet"))
    return [i for part in parts for i in pq.read_table(part, columns=["id"])["id"].to_pylist()]


def _expected_cost(out: pl.DataFrame, prices: Prices) -> float:
    usage = out["usage"].struct
    return prices.cost(int(usage.field("prompt_tokens").sum()), int(usage.field("completion_tokens").sum()))


# ---------------------------------------------------------------- --max-error-rate


async def test_max_error_rate_stops_the_run_and_a_rerun_resumes(tmp_path: Path) -> None:
    n = 300
    input_path, output = write_prompts(tmp_path / "in.parquet", n, row_group_size=50), tmp_path / "out.parquet"
    async with MockServer() as server:
        stopped = await _run(server, input_path, output, headers=FAIL_EVERY_ROW, max_retries=0, concurrency=4,
                             max_error_rate=0.2, min_rows_for_error_rate=50)  # fmt: skip
        first = _sent(server)
        # Judged when the 50th row is done: every one failed. In-flight requests (4 at most) finish and are kept.
        assert stopped.exit_code == ExitCode.STOPPED
        saved = stopped.stats.done
        assert re.fullmatch(rf"stopped: 50 of 50 rows failed \(100%\), over --max-error-rate 0\.2; {saved} rows saved; "
                            "rerun the same command to resume", stopped.message), stopped.message  # fmt: skip
        assert 50 <= saved <= 54 and stopped.stats.failed == saved
        assert len(first) == saved, "a request was sent after the stop, or a finished one was not kept"
        assert not output.exists() and rows_on_disk(output) == saved and sorted(_ids_in_parts(output)) == sorted(first)

        server.state.reset()
        resumed = await _run(server, input_path, output, concurrency=4)
        second = _sent(server)
        out = read_output(output)
        server.state.reset()
        retried = await _run(server, input_path, output, concurrency=4, retry_failed=True)
        third = _sent(server)

    # The rerun sends only the rows not done (error rows are done), each once; then the output is whole.
    assert resumed.exit_code == ExitCode.ROW_ERRORS, resumed.message
    assert sorted(second) == sorted(set(row_ids(n)) - set(first)) and len(second) == len(set(second))
    assert out["id"].to_list() == row_ids(n)
    assert set(out.filter(pl.col("error").is_not_null())["id"].to_list()) == set(first)

    # --retry-failed sends the error rows again, and only them.
    assert retried.exit_code == ExitCode.OK, retried.message
    assert sorted(third) == sorted(first)
    assert_every_row_once_in_order(read_output(output), n)


async def test_max_error_rate_waits_for_min_rows(tmp_path: Path) -> None:
    input_path, output = write_prompts(tmp_path / "in.parquet", 40), tmp_path / "out.parquet"
    async with MockServer() as server:
        result = await _run(server, input_path, output, headers=FAIL_EVERY_ROW, max_retries=0, max_error_rate=0.2)
    # 40 rows, every one failed, but fewer than the 100 the rate needs: the run completes.
    assert result.exit_code == ExitCode.ROW_ERRORS, result.message
    assert read_output(output)["error"].is_not_null().sum() == 40


async def test_max_error_rate_counts_invalid_rows(tmp_path: Path) -> None:
    """An invalid input row is an error row like any other: a run of mostly invalid rows stops."""
    lines = [orjson.dumps({"id": f"r{i}", "prompt": f"question {i}" if i % 4 == 0 else None}) for i in range(200)]
    input_path, output = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    input_path.write_bytes(b"\n".join(lines) + b"\n")
    async with MockServer() as server:
        result = await _run(server, input_path, output, max_error_rate=0.5, min_rows_for_error_rate=20)
    assert result.exit_code == ExitCode.STOPPED, result.message
    assert re.match(r"stopped: (1[5-9]|20) of 20 rows failed \(\d+%\), over --max-error-rate 0\.5;", result.message)
    assert result.stats.done < 200


def _record(error: bool, prompt: int, completion: int) -> ResultRecord:
    """The three keys `RunStats.add` reads of a record."""
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    record = {"error": "boom" if error else None, "error_type": "server_error" if error else None,
              "usage": None if error else usage}  # fmt: skip
    return cast(ResultRecord, record)


@settings(max_examples=300, deadline=None)
# Many small rows, both sides paying: the marks must add up the two sides' spending, not judge each alone.
@example(rows=[(False, 500, 500)] * 1000, rate=0.9, min_rows=1, max_cost=1.0, prices=Prices(1.0, 1.0))
@example(rows=[(False, 3, 1)] * 1000, rate=0.9, min_rows=1, max_cost=0.001, prices=Prices(0.15, 0.6))
@example(rows=[(True, 0, 0)] * 30 + [(False, 1, 1)] * 90 + [(True, 0, 0)] * 40, rate=0.2, min_rows=100, max_cost=None,
         prices=Prices(0.15, 0.6))  # fmt: skip
@given(
    rows=st.lists(st.tuples(st.booleans(), st.integers(0, 3000), st.integers(0, 3000)), max_size=400),
    rate=st.sampled_from([0.0, 0.05, 0.2, 0.5, 0.9]),
    min_rows=st.integers(1, 60),
    max_cost=st.sampled_from([None, 0.001, 0.05, 1.0]),
    prices=st.sampled_from([Prices(0.15, 0.6), Prices(0.0, 2.0), Prices(3.0, 0.0), Prices(1e4, 1e4)]),
)
def test_limits_fire_exactly_where_the_careful_check_says(
    rows: list[tuple[bool, int, int]], rate: float, min_rows: int, max_cost: float | None, prices: Prices
) -> None:
    """Twin test of the marks in `RunStats.add`: the stop comes at the first row where judging every
    row would stop, never earlier or later."""
    limits = RunLimits(max_error_rate=rate, min_rows_for_error_rate=min_rows, max_cost=max_cost)
    stats, stops = RunStats(prices=prices), []
    stats.watch(limits, lambda message: stops.append((stats.done, message)))
    expected = None
    ok = failed = tokens_in = tokens_out = 0
    for number, (error, prompt, completion) in enumerate(rows, 1):
        stats.add(_record(error, prompt, completion))
        failed, ok = failed + error, ok + (not error)
        if not error:
            tokens_in, tokens_out = tokens_in + prompt, tokens_out + completion
        if expected is None and (
            (ok + failed >= min_rows and failed > rate * (ok + failed))
            or (max_cost is not None and prices.cost(tokens_in, tokens_out) >= max_cost)
        ):
            expected = number
    assert [done for done, _ in stops] == ([] if expected is None else [expected])


def test_unwatched_stats_stop_nothing() -> None:
    stats, stops = RunStats(), []
    stats.watch(RunLimits(max_error_rate=0.0, min_rows_for_error_rate=1), stops.append)
    stats.watch(None)
    stats.add(_record(True, 0, 0))
    assert stops == [] and stats.failed == 1


# ---------------------------------------------------------------- --max-duration


async def test_max_duration_stops_at_the_deadline_and_a_rerun_finishes(tmp_path: Path) -> None:
    n = 200
    input_path, output = write_prompts(tmp_path / "in.parquet", n), tmp_path / "out.parquet"
    # 2 in flight, 50 ms each: the whole run needs 5 s; the deadline comes at 0.4 s.
    async with MockServer(MockConfig(latency_ms=50)) as server:
        stopped, first, resumed, second = await _stop_then_resume(server, input_path, output, max_duration=0.4)
    assert stopped.exit_code == ExitCode.STOPPED
    assert stopped.message == (f"stopped: --max-duration 0.4 s reached; {stopped.stats.done} rows saved; "
                               "rerun the same command to resume")  # fmt: skip
    assert 0 < stopped.stats.done < n and stopped.stats.failed == 0
    assert resumed.exit_code == ExitCode.OK, resumed.message
    assert sorted(first + second) == sorted(row_ids(n)), "a row was sent twice, or never"
    assert_every_row_once_in_order(read_output(output), n)


# ---------------------------------------------------------------- cost


async def test_the_summary_shows_the_cost_of_the_tokens(tmp_path: Path) -> None:
    input_path, output = write_prompts(tmp_path / "in.parquet", 30), tmp_path / "out.parquet"
    async with MockServer() as server:
        result = await _run(server, input_path, output, price_input=0.15, price_output=0.6)
    assert result.exit_code == ExitCode.OK
    expected = _expected_cost(read_output(output), Prices(0.15, 0.6))
    assert expected == pytest.approx(30 * (2 * 0.15 + 3 * 0.6) / 1e6)
    assert result.stats.cost == pytest.approx(expected)
    summary = result.stats.summary(str(output))
    assert f"cost: {format_cost(expected)} (input 0.15, output 0.6 per million tokens)" in summary.splitlines()
    progress = Progress(result.stats, 30, enabled=False, stream=io.StringIO())
    assert f"cost={format_cost(expected)}" in progress._postfix()


async def test_a_model_s_own_prices_win(tmp_path: Path) -> None:
    input_path, output = write_prompts(tmp_path / "in.parquet", 10), tmp_path / "out.parquet"
    async with MockServer() as server:
        result = await _run(server, input_path, output, price_input=100, price_output=100,
                            prices={"mock-model": {"input": 2}, "other": {"input": 7, "output": 7}})  # fmt: skip
    expected = _expected_cost(read_output(output), Prices(2, 100))  # output: the flat price fills the side left out
    assert "cost: " + format_cost(expected) + " (input 2, output 100 per million tokens; prices of mock-model)" in (
        result.stats.summary(None)
    )


def test_no_prices_no_cost() -> None:
    stats = RunStats()
    stats.add(_record(False, 10, 10))
    assert stats.cost is None and "cost" not in stats.summary(None)
    assert "cost" not in Progress(stats, None, enabled=False, stream=io.StringIO())._postfix()


async def test_max_cost_stops_the_run(tmp_path: Path) -> None:
    n = 200
    input_path, output = write_prompts(tmp_path / "in.parquet", n), tmp_path / "out.parquet"
    # 2 + 3 tokens a row at 100,000 per million: 0.5 a row, so 10 is reached by the 20th row.
    async with MockServer() as server:
        stopped, first, resumed, second = await _stop_then_resume(server, input_path, output, price_input=1e5,
                                                                  price_output=1e5, max_cost=10)  # fmt: skip
    assert stopped.exit_code == ExitCode.STOPPED
    saved = stopped.stats.done
    assert stopped.message == f"stopped: spent 10.00, reaching --max-cost 10; {saved} rows saved{RESUME_HINT}"
    assert 20 <= saved <= 22
    assert f"cost: {format_cost(saved * 0.5)} " in stopped.stats.summary(None)  # the rows in flight were kept and paid
    assert resumed.exit_code == ExitCode.OK and sorted(first + second) == sorted(row_ids(n))
    assert_every_row_once_in_order(read_output(output), n)


async def test_max_cost_without_a_price_for_the_model_sends_nothing(tmp_path: Path) -> None:
    input_path, output = write_prompts(tmp_path / "in.parquet", 5), tmp_path / "out.parquet"
    async with MockServer() as server:
        with pytest.raises(ConfigError, match="max_cost: no price for model 'mock-model'"):
            await _run(server, input_path, output, prices={"other": {"input": 1, "output": 1}}, max_cost=1)
    assert server.state.requests == []


def test_prices_and_their_format() -> None:
    cfg = load_config({"input": "in.parquet", "output": "out.parquet", "price_output": 0.6,
                       "prices": {"a": {"input": 1, "output": 2}, "b": {"output": 5}}})  # fmt: skip
    assert run_prices(cfg, "a") == Prices(1, 2, "a")
    assert run_prices(cfg, "b") == Prices(0, 5, "b")
    assert run_prices(cfg, "c") == Prices(0, 0.6)
    assert run_prices(load_config({"input": "i.parquet", "output": "o.parquet"}), "a") is None
    assert [format_cost(x) for x in (0, 0.0123, 0.000_007_5, 4.999, 1234.5)] == [
        "0", "0.01230", "0.000007500", "5.00", "1,234.50"
    ]  # fmt: skip


# ---------------------------------------------------------------- --dry-run


def _dry_input(path: Path) -> Path:
    """Ten rows: one with its own max_tokens, one invalid (a null prompt)."""
    rows = [{"id": f"r{i}", "prompt": f"question {i}", "max_tokens": None} for i in range(10)]
    rows[3]["max_tokens"] = 200
    rows[7]["prompt"] = None
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _prompt_estimate(prompt: str, max_tokens: int) -> float:
    """The prompt tokens the run's own estimator (`WorkEstimate`, before any answer) gives this row's body."""
    body = {"model": "mock-model", "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]}
    return WorkEstimate().estimate(len(orjson.dumps(body)), max_tokens) - max_tokens


async def test_dry_run_prints_the_figures_and_sends_nothing(tmp_path: Path) -> None:
    input_path, output = _dry_input(tmp_path / "in.parquet"), tmp_path / "out.parquet"
    async with MockServer() as server:
        result = await _run(server, input_path, output, dry_run=True, max_tokens=50, concurrency=4,
                            price_input=1000, price_output=2000)  # fmt: skip
    assert result.exit_code == ExitCode.OK
    assert server.state.requests == [], "a dry run sent a chat request"
    assert not output.exists() and not state_dir(output).exists() and list(tmp_path.iterdir()) == [input_path]
    prompt = sum(_prompt_estimate(f"question {i}", 200 if i == 3 else 50) for i in range(10) if i != 7)
    answer = 8 * 50 + 200
    lines = result.message.splitlines()
    assert lines[0] == "dry run (nothing sent), model mock-model"
    cost = format_cost((prompt * 1000 + answer * 2000) / 1e6)
    assert lines[1:5] == [
        "  rows: 10 in the input, 0 already done, 9 to send, 1 invalid (they would become error rows, unsent)",
        f"  input tokens: ~{prompt:,.0f} (estimated: a token per 4 bytes of request)",
        f"  output tokens: up to {answer:,} (max_tokens of every row)",
        f"  cost: up to {cost} (input 1000, output 2000 per million tokens)",
    ]
    # The longest row (200 tokens at 30 tokens/s) outlasts 600 tokens over 4 requests at a time.
    assert lines[5].startswith("  time: ~7 s at concurrency 4, assuming each request writes 30 tokens/s")


async def test_dry_run_is_resume_aware(tmp_path: Path) -> None:
    input_path, output = _dry_input(tmp_path / "in.parquet"), tmp_path / "out.parquet"
    async with MockServer() as server:
        # A run stopped after some rows: their parts are the checkpoint.
        await _run(server, input_path, output, limit=4, max_tokens=5)
        before = output.read_bytes()
        server.state.reset()
        plain = await _run(server, input_path, output, dry_run=True)
        again = await _run(server, input_path, output, dry_run=True, overwrite=True)
    assert server.state.requests == [] and output.read_bytes() == before
    assert "  rows: 10 in the input, 4 already done, 5 to send, 1 invalid" in plain.message
    assert "  rows: 10 in the input, 0 already done, 9 to send, 1 invalid" in again.message
    assert "note: --overwrite: every earlier result would be discarded first" in again.message
    # Without max_tokens, the estimator's starting guess stands in, and the figure is no bound.
    assert "  output tokens: ~1,280 (no max_tokens: 256 assumed for each row)" in plain.message
    assert "  output tokens: ~2,248 (max_tokens where set; 256 assumed for each of the 8 rows without)" in again.message


async def test_dry_run_asks_only_for_the_model_when_prices_are_per_model(tmp_path: Path) -> None:
    input_path, output = _dry_input(tmp_path / "in.parquet"), tmp_path / "out.parquet"
    async with MockServer() as server:
        settings_ = {"input": str(input_path), "output": str(output), "base_url": server.url, "dry_run": True,
                     "max_tokens": 10, "prices": {"mock-model": {"input": 1, "output": 2}}}  # fmt: skip
        result = await run_async(load_config(settings_), log=io.StringIO())
    assert server.state.requests == []
    assert result.message.startswith("dry run (nothing sent), model mock-model\n")
    assert "(input 1, output 2 per million tokens; prices of mock-model)" in result.message


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


async def test_dry_run_with_a_model_never_touches_the_network(tmp_path: Path) -> None:
    input_path, output = _dry_input(tmp_path / "in.parquet"), tmp_path / "out.parquet"
    settings_ = {"input": str(input_path), "output": str(output), "base_url": _closed_port_url(), "model": "m",
                 "dry_run": True, "max_requests_per_minute": 6, "max_duration": 30}  # fmt: skip
    result = await run_async(load_config(settings_), log=io.StringIO())
    assert result.exit_code == ExitCode.OK
    # 9 requests at 6 a minute: the quota, not generation, sets the time, and it passes the deadline.
    assert "  time: ~90 s, paced by --max-requests-per-minute 6 (generation alone:" in result.message
    assert "note: the time is over --max-duration 30 s: the run would stop then (exit 4)" in result.message


def test_cli_prints_the_dry_run_and_the_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    input_path, output = write_prompts(tmp_path / "in.parquet", 120), tmp_path / "out.parquet"
    with mock_server_thread(MockConfig()) as server:
        common = ["run", "-i", str(input_path), "-o", str(output), "--base-url", server.url, "--model", "mock-model",
                  "--no-progress", "--max-retries", "0", "--concurrency", "4",
                  "--header", "x-mock-faults: 500"]  # fmt: skip
        assert main([*common, "--dry-run", "--max-tokens", "8"]) == 0
        dry = capsys.readouterr().err
        code = main([*common, "--max-error-rate", "0.2", "--price-input", "1", "--price-output", "1"])
        stop = capsys.readouterr().err
        requests = server.state.requests
    assert dry.startswith("batchgen: dry run (nothing sent), model mock-model\n") and "rows: 120 in the input" in dry
    assert code == ExitCode.STOPPED
    assert re.search(r"^batchgen: stopped: 100 of 100 rows failed \(100%\), over --max-error-rate 0\.2; "
                     r"\d+ rows saved; rerun the same command to resume$", stop, re.MULTILINE), stop  # fmt: skip
    assert re.search(r"^cost: 0 \(input 1, output 1 per million tokens\)$", stop, re.MULTILINE), stop
    assert 100 <= len(requests) < 120


"""Server faults: every mock fault kind at rate 0.3; no row lost, duplicated or reordered, and a spent retry budget gives the right error rows."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from aiohttp import web

from batchgen.pipeline import EXIT_OK, EXIT_ROW_ERRORS
from batchgen.testing.mock_server import FAULT_KINDS, MockConfig, MockServer

from .conftest import (
    Attempt,
    BadServer,
    Call,
    assert_every_row_once_in_order,
    echo,
    prompts,
    read_output,
    replay_faults,
    row_ids,
    run_bounded,
    state_dir,
    write_prompts,
)

ROWS = 2000
FAULT_RATE = 0.3
# A stall hangs 1.5 s; the client gives an attempt 1 s, so a stall is a client timeout (the
# issue's "stall longer than the timeout") while normal answers (no latency, a few ms) stay far
# inside it even on a loaded CI machine.
STALL_S = 1.5
TIMEOUT_S = 1.0
# What each fault must become once a row has no retry left.
EXPECTED_ERROR = {
    "429": ("rate_limited", 429),
    "500": ("server_error", 500),
    "503": ("server_error", 503),
    "disconnect": ("connection_error", None),
    "stall": ("timeout", None),
    "malformed": ("incomplete_response", None),
    "truncated": ("incomplete_response", None),
}


def _mock_config(seed: int) -> MockConfig:
    return MockConfig(fault_rate=FAULT_RATE, faults=FAULT_KINDS, seed=seed, retry_after_s=0.01, stall_s=STALL_S)


async def _run(server: MockServer, tmp_path: Path, *, stream: bool, max_retries: int) -> Any:
    settings = {
        "input": str(write_prompts(tmp_path / "in.parquet", ROWS)), "output": str(tmp_path / "out.parquet"),
        "base_url": server.url, "model": "mock-model", "progress": False, "concurrency": 32,
        "max_retries": max_retries, "timeout": TIMEOUT_S, "backoff_base": 0.001, "flush_seconds": 0.2,
        "stream": stream,
    }
    return await run_bounded(settings, 90)


def _by_row(attempts: list[Attempt]) -> dict[str, list[Attempt]]:
    """Each row's attempts, in the order they reached the server (which is their attempt order)."""
    rows: dict[str, list[Attempt]] = defaultdict(list)
    for attempt in attempts:
        rows[attempt.row_id].append(attempt)
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_enough_retries_every_row_succeeds_exactly_once_in_order(
    stream: bool, tmp_path: Path, figures: Any
) -> None:
    """2,000 rows against the mock at fault rate 0.3 over all 7 fault kinds (429 with Retry-After, 500, 503, disconnect, stall past the timeout, malformed 200, truncated body / stream cut before [DONE]) with 15 retries: every row succeeds, once, in input order, with its own answer; on the wire each row got exactly one fault-free attempt."""
    seed = 11
    async with MockServer(_mock_config(seed)) as server:
        result = await _run(server, tmp_path, stream=stream, max_retries=15)
    assert result.exit_code == EXIT_OK, result.message
    out = read_output(tmp_path / "out.parquet")
    assert_every_row_once_in_order(out, ROWS)
    injected = server.state.faults_injected
    assert set(injected) == set(FAULT_KINDS), f"not every fault kind was injected: {dict(injected)}"
    # Each attempt the client counted reached the server, and none the client did not count.
    assert out["attempts"].sum() == len(server.state.requests)
    attempts = replay_faults(server.state.requests, FAULT_RATE, FAULT_KINDS, seed)
    assert sum(a.fault is not None for a in attempts) == sum(injected.values()), "fault replay out of step"
    rows = _by_row(attempts)
    for row_id, attempts_counted in zip(out["id"].to_list(), out["attempts"].to_list(), strict=True):
        tries = rows[row_id]
        clean = [a for a in tries if a.fault is None]
        assert len(clean) == 1 and clean[0] is tries[-1], f"{row_id}: fault-free attempts {clean}, all {tries}"
        # The row's own attempt count is what reached the server for it (no attempt header to compare).
        assert attempts_counted == len(tries), f"{row_id}: {attempts_counted} attempts counted, sent {tries}"
    assert not state_dir(tmp_path / "out.parquet").exists()
    figures(rows=ROWS, faults_injected=sum(injected.values()), retries=result.stats.retries,
            requests=len(server.state.requests), **{f"fault_{k}": v for k, v in sorted(injected.items())})


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_spent_retry_budget_gives_typed_error_rows_and_leaves_other_rows_intact(
    stream: bool, tmp_path: Path, figures: Any
) -> None:
    """Same faults with max_retries=1: a row whose last attempt was faulted is an error row whose error_type, status_code, attempts and message match that fault; every other row holds its own echo answer; one row per input row, in order."""
    seed = 5
    async with MockServer(_mock_config(seed)) as server:
        result = await _run(server, tmp_path, stream=stream, max_retries=1)
    assert result.exit_code == EXIT_ROW_ERRORS, result.message
    out = read_output(tmp_path / "out.parquet")
    assert out["id"].to_list() == row_ids(ROWS)
    rows = _by_row(replay_faults(server.state.requests, FAULT_RATE, FAULT_KINDS, seed))
    assert sorted(rows) == sorted(row_ids(ROWS)), "some row was never sent, or an unknown id was"
    final_faults: Counter[str] = Counter()
    for record, prompt in zip(out.iter_rows(named=True), prompts(ROWS), strict=True):
        tries = rows[record["id"]]
        assert record["attempts"] == len(tries) <= 2, f"{record['id']}: {record['attempts']} attempts, sent {tries}"
        last = tries[-1].fault
        if last is None:
            assert record["error"] is None and record["content"] == echo(prompt), record
            assert record["status_code"] == 200 and record["finish_reason"] == "stop"
            continue
        final_faults[last] += 1
        error_type, status = EXPECTED_ERROR[last]
        assert (record["error_type"], record["status_code"]) == (error_type, status), (last, record)
        assert record["content"] is None and len(record["error"]) > 10, record
        if status is not None:
            assert record["error"].startswith(f"HTTP {status}"), record["error"]
    assert set(final_faults) == set(FAULT_KINDS), f"not every fault kind ended a row: {dict(final_faults)}"
    assert out.filter(pl.col("error").is_not_null()).height == sum(final_faults.values())
    figures(rows=ROWS, faults_injected=sum(server.state.faults_injected.values()),
            error_rows=sum(final_faults.values()), ok_rows=ROWS - sum(final_faults.values()),
            retries=result.stats.retries)


async def test_a_run_of_slow_rows_ends_as_timeout_error_rows_not_as_a_lost_server(
    tmp_path: Path, bad_server: Callable[..., Awaitable[BadServer]], figures: Any
) -> None:
    """A live server that answers every row at once except 40 consecutive rows (r100-r139), which take longer than the client timeout on every attempt (e.g. very long generations). With max_retries 1, those 40 rows must end as `timeout` error rows and the other 260 rows be answered; the run completes (exit 1). The server never went away, so stopping the run as "server unreachable" would leave a job that can never finish: a rerun meets the same slow rows."""
    rows, slow = 300, {f"r{i}" for i in range(100, 140)}

    async def misbehave(call: Call) -> web.StreamResponse | None:
        if call.row_id in slow:
            await asyncio.sleep(1.0)  # the client gives up after 0.3 s
        return None

    server = await bad_server(misbehave)
    settings = {"input": str(write_prompts(tmp_path / "in.parquet", rows)), "output": str(tmp_path / "out.parquet"),
                "base_url": server.url, "model": "m", "progress": False, "concurrency": 4, "max_retries": 1,
                "timeout": 0.3, "backoff_base": 0.001, "flush_seconds": 0.1}
    result = await run_bounded(settings, 20)  # ~7 s of timeouts
    figures(rows=rows, slow_rows=len(slow), exit_code=result.exit_code, message=result.message)
    assert result.exit_code == EXIT_ROW_ERRORS, result.message
    out = read_output(tmp_path / "out.parquet")
    assert out["id"].to_list() == row_ids(rows)
    errors = out.filter(pl.col("error").is_not_null())
    assert sorted(errors["id"].to_list()) == sorted(slow)
    assert set(errors["error_type"].to_list()) == {"timeout"}
    ok = out.filter(pl.col("error").is_null())
    assert ok["content"].to_list() == [echo(p) for i, p in enumerate(prompts(rows)) if f"r{i}" not in slow]

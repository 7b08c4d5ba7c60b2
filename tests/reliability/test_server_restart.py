"""Server going away: the mock server process is killed (SIGKILL) mid-run; the run rides out a restart, and a server that never returns ends the run with a clear message and a resumable state."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import polars as pl
import pytest

from batchgen.config import load_config
from batchgen.pipeline import EXIT_OK, run_async
from batchgen.testing.mock_server import MockConfig, MockServer

from ..conftest import rows_sent
from .conftest import (
    CliResult,
    MockProcess,
    assert_every_row_once_in_order,
    await_until,
    mentions_lost_server,
    ok_ids_on_disk,
    read_output,
    row_of_prompt,
    rows_on_disk,
    run_args,
    run_cli_async,
    state_dir,
    write_prompts,
    yaml_config,
)

ROWS = 2000
OUTAGE_S = 3.0  # how long the server stays dead before it is started again


@pytest.mark.slow
async def test_server_killed_and_restarted_mid_run_the_run_rides_it_out(
    tmp_path: Path, mock_process: Callable[..., MockProcess], figures: Any
) -> None:
    """A 2,000-row run (concurrency 8, 20 ms per answer); once rows are on disk the mock server is SIGKILLed, stays down 3 s, and is started again on the same port: the run completes on its own with every row once, in order, and rows show the retries that bridged the outage."""
    server = mock_process("--latency-ms", "20")
    await server.astart()
    output = tmp_path / "out.parquet"
    settings = {
        "input": str(write_prompts(tmp_path / "in.parquet", ROWS)), "output": str(output), "base_url": server.url,
        "model": "mock-model", "progress": False, "concurrency": 8, "max_retries": 10, "backoff_base": 0.2,
        "timeout": 10.0, "flush_seconds": 0.1,
    }
    run = asyncio.create_task(run_async(load_config(settings), log=io.StringIO()))
    try:
        await await_until(lambda: rows_on_disk(output) >= 200 or run.done(), 60, "200 rows on disk")
        assert not run.done(), "the run finished before the server could be killed"
        done_at_kill = rows_on_disk(output)
        server.kill()
        killed_at = time.monotonic()
        # The outage itself: the run must still be going (retrying), not finished or failed.
        await await_until(lambda: time.monotonic() - killed_at >= OUTAGE_S or run.done(), OUTAGE_S + 5, "the outage")
        assert not run.done(), f"the run ended during the outage: {run.result() if not run.exception() else run.exception()!r}"
        await server.astart()
        result = await asyncio.wait_for(run, 90)
    finally:
        if not run.done():
            run.cancel()
    assert result.exit_code == EXIT_OK, result.message
    out = read_output(output)
    assert_every_row_once_in_order(out, ROWS)
    retried = out.filter(pl.col("attempts") > 1).height
    assert retried > 0, "no row needed a retry: the outage was not felt"
    figures(rows=ROWS, rows_on_disk_at_kill=done_at_kill, outage_s=OUTAGE_S, server_kills=1,
            rows_retried=retried, retries=result.stats.retries, max_attempts=int(out["attempts"].max()))


@pytest.mark.slow
async def test_server_never_comes_back_run_ends_with_clear_message_and_resumes(
    tmp_path: Path, mock_process: Callable[..., MockProcess], figures: Any
) -> None:
    """The server is SIGKILLed mid-run and not restarted: `batchgen run` (max_retries 2) ends by itself with a non-zero exit code and a message saying the server could not be reached, no traceback; after a server comes back on the same address, rerunning the same command with --retry-failed completes every row exactly once and resends only rows that were not done."""
    rows = 600
    server, args, output, result = await _lose_server_mid_run(
        tmp_path, mock_process, rows, backoff_base=0.05, max_retries=2, deadline_s=60
    )
    assert not result.timed_out, "the run did not end within 60 s of losing its server"
    assert result.returncode != 0, "a run that lost its server must not report success"
    assert "Traceback" not in result.stderr, result.stderr
    assert mentions_lost_server(result.stderr), f"the message does not say the server could not be reached:\n{result.stderr}"
    done_before = ok_ids_on_disk(output)
    async with MockServer(MockConfig(), port=server.port) as back:
        again = await run_cli_async([*args, "--retry-failed"], timeout=60)
    assert again.returncode == 0, again.stderr
    assert_every_row_once_in_order(read_output(output), rows)
    resent = rows_sent(back.state.requests, row_of_prompt)
    assert len(resent) == len(set(resent)) == rows - len(done_before), "the resumed run sent a row twice or sent a done row"
    assert not set(resent) & done_before, "the resumed run asked again for rows already done"
    assert not state_dir(output).exists()
    figures(rows=rows, ok_before_resume=len(done_before), resent_on_resume=len(resent),
            first_run_s=round(result.seconds, 1), first_exit_code=result.returncode)


@pytest.mark.slow
async def test_lost_server_stops_the_run_within_the_retry_budget_not_after_every_row(
    tmp_path: Path, mock_process: Callable[..., MockProcess], figures: Any
) -> None:
    """With a realistic retry budget (3 retries, backoff 0.5 s: about 3.5 s per row) and 2,000 rows, losing the server for good must end the run in about one retry budget, with a message that says the server is unreachable and how to resume; not after every remaining row has spent its own budget (here about 2,000 / 4 x 3.5 s = 30 min)."""
    _, _, _, result = await _lose_server_mid_run(
        tmp_path, mock_process, ROWS, backoff_base=0.5, max_retries=3, deadline_s=30
    )
    figures(rows=ROWS, deadline_s=30, run_s=round(result.seconds, 1),
            exit_code="killed at deadline" if result.timed_out else result.returncode)
    assert not result.timed_out, (
        "30 s after losing its server the run was still going: it spends the whole retry budget on every "
        "remaining row instead of stopping"
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert mentions_lost_server(result.stderr), result.stderr
    assert "--retry-failed" in result.stderr or "rerun" in result.stderr.lower(), f"no hint how to resume:\n{result.stderr}"


async def _lose_server_mid_run(
    tmp_path: Path,
    mock_process: Callable[..., MockProcess],
    rows: int,
    *,
    backoff_base: float,
    max_retries: int,
    deadline_s: float,
) -> tuple[MockProcess, list[str], Path, CliResult]:
    """Start a mock and a run against it, SIGKILL the mock once 50 rows are on disk (for good), and
    return the server, the run's arguments, its output path and its result (killed at `deadline_s`)."""
    server = mock_process("--latency-ms", "20")
    await server.astart()
    input_path, output = write_prompts(tmp_path / "in.parquet", rows), tmp_path / "out.parquet"
    config = yaml_config(tmp_path / "job.yaml", flush_seconds=0.1, backoff_base=backoff_base, timeout=5)
    args = run_args(
        input_path, output, server.url, "--concurrency", "4", "--max-retries", str(max_retries), config=config
    )
    first = asyncio.create_task(run_cli_async(args, timeout=deadline_s))
    await await_until(lambda: rows_on_disk(output) >= 50 or first.done(), 60, "50 rows on disk")
    assert not first.done(), "the run finished before the server could be killed"
    server.kill()
    return server, args, output, await first

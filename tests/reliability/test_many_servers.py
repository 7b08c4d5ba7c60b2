"""Several servers in one run: three mock server processes behind one `batchgen run`; one is killed (SIGKILL) mid-run and started again later, one is 5x slower, or all of them die."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchgen.testing.mock_server import MockServer

from ..conftest import rows_sent
from .conftest import (
    MockProcess,
    assert_every_row_once_in_order,
    await_until,
    mentions_lost_server,
    ok_ids_on_disk,
    read_output,
    row_of_prompt,
    rows_on_disk,
    run_cli_async,
    state_dir,
    write_prompts,
    yaml_config,
)


def _args(input_path: Path, output: Path, urls: list[str], config: Path, *extra: str) -> list[str]:
    bases = [flag for url in urls for flag in ("--base-url", url)]
    return ["run", str(config), "--input", str(input_path), "--output", str(output), *bases, "--model", "mock-model",
            "--no-progress", *extra]  # fmt: skip


async def _start(mock_process: Callable[..., MockProcess], *latencies: int) -> list[MockProcess]:
    servers = [mock_process("--latency-ms", str(ms)) for ms in latencies]
    await asyncio.gather(*(s.astart() for s in servers))
    return servers


@pytest.mark.slow
async def test_one_of_three_servers_killed_and_restarted_every_row_once_in_order(
    tmp_path: Path, mock_process: Callable[..., MockProcess], figures: Any
) -> None:
    """3,000 rows over three servers (concurrency 8 each, 20 ms per answer). Once rows are on disk, one server is SIGKILLed, stays down 2 s and comes back on the same port. The run never stops: every row once, in input order; the dead server's rows went to the other two; the summary shows it ejected once and re-admitted once, and it answers rows again after its return."""
    rows = 3000
    servers = await _start(mock_process, 20, 20, 20)
    victim = servers[1]
    output = tmp_path / "out.parquet"
    config = yaml_config(tmp_path / "job.yaml", flush_seconds=0.1, backoff_base=0.1, backoff_max=0.5, timeout=10)
    args = _args(write_prompts(tmp_path / "in.parquet", rows), output, [s.url for s in servers], config,
                 "--concurrency", "8", "--max-retries", "3")  # fmt: skip
    run = asyncio.create_task(run_cli_async(args, timeout=120))
    await await_until(lambda: rows_on_disk(output) >= 300 or run.done(), 60, "300 rows on disk")
    assert not run.done(), "the run finished before a server could be killed"
    victim.kill()
    killed_at = time.monotonic()
    await await_until(lambda: time.monotonic() - killed_at >= 2.0 or run.done(), 10, "the outage")
    assert not run.done(), "the run ended during the outage"
    await victim.astart()
    result = await run
    assert result.returncode == 0, result.stderr
    out = read_output(output)
    assert_every_row_once_in_order(out, rows)
    per_server = {s.url: out.filter(pl.col("endpoint") == s.url).height for s in servers}
    assert sum(per_server.values()) == rows and all(per_server.values()), per_server
    line = next(line for line in result.stderr.splitlines() if line.strip().startswith(f"{victim.url}:"))
    assert "ejected 1x, re-admitted 1x" in line, result.stderr
    assert f"endpoint {victim.url} ejected after" in result.stderr and f"endpoint {victim.url} re-admitted" in result.stderr
    figures(rows=rows, rows_per_server=per_server, retried_rows=out.filter(pl.col("attempts") > 1).height)


@pytest.mark.slow
async def test_a_server_5x_slower_gets_proportionally_fewer_rows(
    tmp_path: Path, mock_process: Callable[..., MockProcess], figures: Any
) -> None:
    """1,500 rows over three servers with concurrency 8 each: two answer in 20 ms, one in 100 ms. Each keeps its 8 slots full, so the slow one should get 1/11 of the rows (its slots turn over 5x slower); the test allows ±50% of that share, and the two fast ones must be within 25% of each other."""
    rows = 1500
    servers = await _start(mock_process, 20, 20, 100)
    output = tmp_path / "out.parquet"
    config = yaml_config(tmp_path / "job.yaml", flush_seconds=0.5)
    args = _args(write_prompts(tmp_path / "in.parquet", rows), output, [s.url for s in servers], config, "--concurrency", "8")
    result = await run_cli_async(args, timeout=120)
    assert result.returncode == 0, result.stderr
    out = read_output(output)
    assert_every_row_once_in_order(out, rows)
    fast_a, fast_b, slow = (out.filter(pl.col("endpoint") == s.url).height for s in servers)
    expected = rows / 11
    figures(rows=rows, fast_a=fast_a, fast_b=fast_b, slow=slow, slow_expected=round(expected))
    assert 0.5 * expected <= slow <= 1.5 * expected, (fast_a, fast_b, slow)
    assert abs(fast_a - fast_b) <= 0.25 * max(fast_a, fast_b), (fast_a, fast_b)


@pytest.mark.slow
async def test_when_every_server_dies_the_run_stops_with_the_server_gone_code_and_a_rerun_completes(
    tmp_path: Path, mock_process: Callable[..., MockProcess], figures: Any
) -> None:
    """2,000 rows over three servers; once rows are on disk all three are SIGKILLed. The run ends by itself with exit code 3 and a message that every server stopped answering (no error rows written for the lost rows); with the servers back, the same command completes every row exactly once, sending only rows not yet done."""
    rows = 2000
    servers = await _start(mock_process, 20, 20, 20)
    output = tmp_path / "out.parquet"
    config = yaml_config(tmp_path / "job.yaml", flush_seconds=0.1, backoff_base=0.05, backoff_max=0.2, timeout=5)
    args = _args(write_prompts(tmp_path / "in.parquet", rows), output, [s.url for s in servers], config,
                 "--concurrency", "4", "--max-retries", "3")  # fmt: skip
    first = asyncio.create_task(run_cli_async(args, timeout=60))
    await await_until(lambda: rows_on_disk(output) >= 100 or first.done(), 60, "100 rows on disk")
    assert not first.done(), "the run finished before the servers could be killed"
    for server in servers:
        server.kill()
    result = await first
    assert result.returncode == 3, result.stderr
    assert "all 3 servers stopped answering" in result.stderr and mentions_lost_server(result.stderr)
    assert "Traceback" not in result.stderr and "rerun" in result.stderr
    done_before = ok_ids_on_disk(output)
    assert not output.exists() and len(done_before) < rows
    async with MockServer(port=servers[0].port) as a, MockServer(port=servers[1].port) as b, \
            MockServer(port=servers[2].port) as c:  # in-process, so what they were asked can be read
        again = await run_cli_async(args, timeout=60)
    assert again.returncode == 0, again.stderr
    out = read_output(output)
    assert_every_row_once_in_order(out, rows)
    assert not state_dir(output).exists()
    resent = [r for back in (a, b, c) for r in rows_sent(back.state.requests, row_of_prompt)]
    assert len(resent) == len(set(resent)) == rows - len(done_before), "the rerun sent a row twice or a done row"
    assert not set(resent) & done_before
    figures(rows=rows, ok_before_rerun=len(done_before), resent=len(resent), first_run_s=round(result.seconds, 1))

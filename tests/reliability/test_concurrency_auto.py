"""Two `batchgen run --concurrency auto` processes share one server (the mock's capacity model as its own process: 64 batch slots): each steers by the same /metrics, and they must end with fair shares."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .conftest import MockProcess, read_output, run_cli_async

ROWS = 2400  # per process: about 20 s at half of the server's ~200 answers a second
TABLE_ROW = re.compile(r"^\s+(\d+\.\d)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(.+)$")


def _input(path: Path) -> Path:
    words = [" ".join(["w"] * (12 + (i * 7) % 17)) for i in range(ROWS)]  # the mock echoes: answers of 14-30 tokens
    pq.write_table(pa.table({"prompt": words}), path)
    return path


def _final_limits(stderr: str) -> list[int]:
    """The limits of the summary's concurrency auto table."""
    return [int(m.group(2)) for line in stderr.splitlines() if (m := TABLE_ROW.match(line))]


@pytest.mark.slow
async def test_two_processes_on_one_server_converge_to_a_fair_share(
    tmp_path: Path, mock_process: Callable[..., MockProcess], figures: Any
) -> None:
    """Two `batchgen run --concurrency auto` processes start together against one mock server with 64 batch slots (KV for 64 × 128 tokens). Each must finish every row, and in the last third of their runs their limits must be within 2x of each other and add up to about the server's batch (48-160: 64 running plus a queue)."""
    server = mock_process("--batch-slots", "64", "--kv-tokens", str(64 * 128))
    await server.astart()
    runs = []
    for name in ("a", "b"):
        args = ["run", "--input", str(_input(tmp_path / f"{name}.parquet")), "--output", str(tmp_path / f"{name}-out.parquet"),
                "--base-url", server.url, "--model", "mock-model", "--concurrency", "auto", "--max-tokens", "200",
                "--no-progress"]  # fmt: skip
        runs.append(run_cli_async(args, timeout=120))
    first, second = await asyncio.gather(*runs)
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    for name in ("a", "b"):
        assert read_output(tmp_path / f"{name}-out.parquet").height == ROWS
    limits_a, limits_b = _final_limits(first.stderr), _final_limits(second.stderr)
    assert len(limits_a) >= 6 and len(limits_b) >= 6, (first.stderr, second.stderr)
    late_a, late_b = limits_a[-len(limits_a) // 3 :], limits_b[-len(limits_b) // 3 :]
    mean_a, mean_b = sum(late_a) / len(late_a), sum(late_b) / len(late_b)
    figures(limits_a=limits_a, limits_b=limits_b, late_mean_a=round(mean_a, 1), late_mean_b=round(mean_b, 1),
            seconds_a=round(first.seconds, 1), seconds_b=round(second.seconds, 1))  # fmt: skip
    assert 0.5 <= mean_a / mean_b <= 2.0, (limits_a, limits_b)
    assert 48 <= mean_a + mean_b <= 160, (limits_a, limits_b)

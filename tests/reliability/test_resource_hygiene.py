"""Resource hygiene: a long in-process run leaks no file descriptor, socket, task or temp file, and closes its connections."""

from __future__ import annotations

import asyncio
import gc
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchgen.pipeline import EXIT_OK

from .conftest import (
    MockProcess,
    assert_every_row_once_in_order,
    files_under,
    read_output,
    run_bounded,
    state_dir,
    write_prompts,
)

ROWS = 3000
CONCURRENCY = 32
# Allowed growth of open fds after the measured run. Zero: the warm-up run has already created
# whatever lives as long as the process (pyarrow / polars thread pools, the loop's default
# executor), so anything new after the second run is a leak.
FD_TOLERANCE = 0


def _fds() -> dict[str, str]:
    """Open descriptors of this process: fd -> what it points to (socket:[inode], a path, ...)."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the fd listing itself, closed meanwhile
            continue
    return found


def _sockets(fds: dict[str, str]) -> int:
    return sum(target.startswith("socket:") for target in fds.values())


def _tcp_connections_to(port: int) -> int:
    """ESTABLISHED (01) or CLOSE_WAIT (08) TCP connections of this machine whose remote port is `port`."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as file:
            next(file)
            for line in file:
                fields = line.split()
                remote_port = int(fields[2].split(":")[1], 16)
                if remote_port == port and fields[3] in ("01", "08"):
                    count += 1
    return count


async def _run(tmp_path: Path, url: str, name: str, rows: int) -> Any:
    settings = {"input": str(write_prompts(tmp_path / f"{name}.in.parquet", rows)),
                "output": str(tmp_path / f"{name}.parquet"), "base_url": url, "model": "mock-model",
                "progress": False, "concurrency": CONCURRENCY, "flush_seconds": 0.2}
    return await run_bounded(settings, 60)


@pytest.mark.slow
async def test_long_run_leaks_no_fd_socket_task_or_temp_file(
    tmp_path: Path, mock_process: Callable[..., MockProcess], figures: Any
) -> None:
    """A 3,000-row run at concurrency 32 against the mock server in another process (so every socket in this process is the client's), after a warm-up run: open fds and sockets are the same before and after (tolerance 0), no TCP connection to the server stays open, no asyncio task is left but the test's own, no ResourceWarning is raised at garbage collection, and only the input and output files remain (no *.tmp, no state dir)."""
    server = mock_process("--latency-ms", "2")
    await server.astart()
    warm = await _run(tmp_path, server.url, "warmup", 200)
    assert warm.exit_code == EXIT_OK, warm.message
    gc.collect()
    before = _fds()
    result = await _run(tmp_path, server.url, "long", ROWS)
    assert result.exit_code == EXIT_OK, result.message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    after = _fds()
    new = {fd: target for fd, target in after.items() if before.get(fd) != target}
    figures(rows=ROWS, concurrency=CONCURRENCY, fds_before=len(before), fds_after=len(after),
            sockets_before=_sockets(before), sockets_after=_sockets(after),
            connections_left=_tcp_connections_to(server.port), tasks_left=len(asyncio.all_tasks()) - 1)
    assert len(after) <= len(before) + FD_TOLERANCE, f"fds leaked: {new}"
    assert _sockets(after) == _sockets(before), f"sockets leaked: {new}"
    assert _tcp_connections_to(server.port) == 0, "connections to the server are still open after the run"
    assert asyncio.all_tasks() == {asyncio.current_task()}, asyncio.all_tasks()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    assert_every_row_once_in_order(read_output(tmp_path / "long.parquet"), ROWS)
    names = sorted(p.name for p in files_under(tmp_path) if not p.name.startswith("mock-"))
    assert names == ["long.in.parquet", "long.parquet", "warmup.in.parquet", "warmup.parquet"], names
    assert not state_dir(tmp_path / "long.parquet").exists()

"""kill -9 of `batchgen run` at random moments, then resume: every row exactly once, in order."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.io.parts import scan_checkpoint
from batchgen.testing.mock_server import MockConfig, mock_server_thread

from .conftest import row_lookup, rows_sent

ROOT = Path(__file__).resolve().parents[1]
ROWS = 400


def _command(url: str, input_path: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batchgen", "run", "--input", str(input_path), "--output", str(output),
            "--base-url", url, "--concurrency", "8", "--no-progress", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _done_ids(state_dir: Path) -> set[str]:
    if not state_dir.exists():
        return set()
    status = scan_checkpoint(state_dir, ROWS).status
    return {str(i) for i, s in enumerate(status) if s}


def _rows_sent(bodies: list[dict[str, Any]]) -> set[str]:
    """Ids of the rows requested: the prompt "question i" is row "i"."""
    return set(rows_sent(bodies, row_lookup({f"question {i}": str(i) for i in range(ROWS)})))


def _output_is_absent_or_valid(output: Path) -> None:
    if output.exists():
        assert pq.read_metadata(output).num_rows == ROWS


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume(tmp_path: Path) -> None:
    input_path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"question {i}" for i in range(ROWS)]}), input_path, row_group_size=50)
    output = tmp_path / "out.parquet"
    state_dir = Path(str(output) + ".batchgen")
    rng = random.Random(1234)
    with mock_server_thread(MockConfig(latency_ms=25)) as server:
        kills = 0
        for _ in range(4):
            before = _done_ids(state_dir)
            server.state.reset()
            proc = subprocess.Popen(_command(server.url, input_path, output), env=_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + rng.uniform(0.6, 1.6)
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.02)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=30)
            _output_is_absent_or_valid(output)
            resent = _rows_sent(server.state.requests)
            assert not (resent & before), "rows already on disk were requested again"
        server.state.reset()
        before = _done_ids(state_dir)
        final = subprocess.run(_command(server.url, input_path, output), env=_env(), capture_output=True, timeout=120)
        assert final.returncode == 0, final.stderr.decode()
        assert not (_rows_sent(server.state.requests) & before)
    assert kills >= 1
    out = pl.read_parquet(output)
    assert out["id"].to_list() == [str(i) for i in range(ROWS)]
    assert out["content"].to_list() == [f"echo: question {i}" for i in range(ROWS)]
    assert not state_dir.exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_sigterm_saves_finished_rows_and_says_how_to_resume(tmp_path: Path) -> None:
    input_path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"q {i}" for i in range(ROWS)]}), input_path)
    output = tmp_path / "out.parquet"
    with mock_server_thread(MockConfig(latency_ms=25)) as server:
        proc = subprocess.Popen(_command(server.url, input_path, output), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while len(server.state.requests) < 50:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err.decode()
        assert b"rerun the same command to resume" in err
        saved = _done_ids(Path(str(output) + ".batchgen"))
        assert saved and not output.exists()
        done = subprocess.run(_command(server.url, input_path, output), env=_env(), capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()
    assert pl.read_parquet(output)["id"].to_list() == [str(i) for i in range(ROWS)]


@pytest.mark.slow
def test_a_kill_costs_only_the_answers_in_flight_and_the_last_journal_step(tmp_path: Path) -> None:
    """Issue 15: with the journal, the rows a rerun sends again number about the concurrency plus
    0.1 s of answers per kill, not the ~2 s of answers that waited for the next part file."""
    rows, concurrency, latency_s = 3000, 8, 0.025
    input_path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"question {i}" for i in range(rows)]}), input_path)
    output = tmp_path / "out.parquet"
    lookup = row_lookup({f"question {i}": str(i) for i in range(rows)})
    rng = random.Random(99)
    sent_before: set[str] = set()
    resent_per_kill: list[int] = []
    with mock_server_thread(MockConfig(latency_ms=latency_s * 1000)) as server:
        for attempt in range(4):
            server.state.reset()
            proc = subprocess.Popen(_command(server.url, input_path, output), env=_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # concurrency 8
            killed = False
            if attempt < 3:
                deadline = time.monotonic() + rng.uniform(1.0, 2.0)
                while time.monotonic() < deadline and proc.poll() is None:
                    time.sleep(0.01)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
            _, err = proc.communicate(timeout=120)
            sent = rows_sent(server.state.requests, lookup)
            if attempt > 0:  # this run follows a kill
                resent_per_kill.append(len(set(sent) & sent_before))
            sent_before |= set(sent)
            if not killed:
                assert proc.returncode == 0, err.decode()
                break
    assert len(resent_per_kill) >= 2
    rate = concurrency / latency_s  # answers per second, at most
    bound = concurrency + 0.1 * rate + concurrency  # in flight, one journal step, and a step's slack
    assert max(resent_per_kill) <= bound, f"rows sent again per kill: {resent_per_kill} (bound {bound:.0f})"
    out = pl.read_parquet(output)
    assert out["id"].to_list() == [str(i) for i in range(rows)]
    assert out["content"].to_list() == [f"echo: question {i}" for i in range(rows)]
    assert not Path(str(output) + ".batchgen").exists()

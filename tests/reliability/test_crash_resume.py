"""Crash: kill -9 of `batchgen run` at 10 random points of one run, resumed each time; the output path is watched throughout."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.testing.mock_server import MockConfig, mock_server_thread

from ..conftest import rows_sent
from .conftest import (
    assert_every_row_once_in_order,
    batchgen_command,
    files_under,
    ok_ids_on_disk,
    read_output,
    row_ids,
    row_of_prompt,
    rows_on_disk,
    run_args,
    run_cli,
    state_dir,
    subprocess_env,
    wait_until,
    write_prompts,
    yaml_config,
)

ROWS = 2000
KILLS = 10
SEED = 20240505
# Columns that must match an uninterrupted run; latency_s, attempts and response_id legitimately differ.
COMPARED = ["id", "prompt", "content", "reasoning_content", "tool_calls", "finish_reason", "usage", "model", "error",
            "error_type", "status_code"]


@dataclass
class Watcher:
    """Reads the output path in a tight loop while runs come and go: it must always hold nothing or a
    complete, valid Parquet file with every row in order."""

    output: Path
    rows: int
    checks: int = 0
    seen_valid: int = 0
    problems: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        expected = row_ids(self.rows)
        while not self.stop.is_set():
            self.checks += 1
            try:
                with open(self.output, "rb") as file:  # one open: the file cannot change under the read
                    table = pq.read_table(file, columns=["id"])
            except FileNotFoundError:
                time.sleep(0.005)
                continue
            except (OSError, pa.ArrowException) as exc:
                self.problems.append(f"check {self.checks}: unreadable output: {exc!r}")
                continue
            self.seen_valid += 1
            if table["id"].to_pylist() != expected:
                self.problems.append(f"check {self.checks}: output with {table.num_rows} rows, ids not the input's")
            time.sleep(0.005)


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(batchgen_command(*args), env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_kill_9_at_ten_random_points_then_resume_equals_uninterrupted_run(tmp_path: Path, figures: Any) -> None:
    """An uninterrupted 2,000-row run is the reference. A second run of the same job is SIGKILLed 10 times, each time once a random number of rows is on disk (seeded RNG) plus a random delay, then resumed (plus one extra kill the moment every row is on disk, aimed at the final merge); a watcher thread reads the output path every few ms throughout. The final output equals the reference (same ids, order, content, each once), the output path only ever held nothing or a complete valid Parquet file, no resumed run re-requested a row already on disk, and no state dir or .tmp file is left."""
    rng = random.Random(SEED)
    input_path = write_prompts(tmp_path / "in.parquet", ROWS, row_group_size=100)
    config = yaml_config(tmp_path / "job.yaml", flush_seconds=0.1)
    with mock_server_thread(MockConfig(latency_ms=10)) as server:
        reference = tmp_path / "reference.parquet"
        ref = run_cli(run_args(input_path, reference, server.url, "--concurrency", "8", config=config), timeout=90)
        assert ref.returncode == 0, ref.stderr

        output = tmp_path / "out.parquet"
        args = run_args(input_path, output, server.url, "--concurrency", "8", config=config)
        watcher = Watcher(output, ROWS)
        thread = threading.Thread(target=watcher.run, daemon=True)
        thread.start()
        kills, kill_points, resent_done = 0, [], []
        # Up to 80 % of the rows: the random extra delay (<= 0.2 s, <= 160 rows) cannot reach the end.
        targets = sorted(rng.randrange(0, int(ROWS * 0.8)) for _ in range(KILLS))
        try:
            for target in targets:
                done = ok_ids_on_disk(output)  # no process is running now
                server.state.reset()
                proc = _spawn(args)
                try:
                    wait_until(lambda: rows_on_disk(output) >= target or proc.poll() is not None, 60,
                               f"{target} rows on disk", interval=0.005)
                    delay = rng.uniform(0.0, 0.2)
                    deadline = time.monotonic() + delay
                    while proc.poll() is None and time.monotonic() < deadline:
                        time.sleep(0.005)
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
                        kills += 1
                        kill_points.append(f"{target}+{delay:.2f}s")
                finally:
                    proc.kill()
                    proc.wait(timeout=30)
                resent_done += sorted(set(rows_sent(server.state.requests, row_of_prompt)) & done)
            # One more, aimed at the merge: kill the moment every row is on disk, when the run is
            # finalizing (or about to). Not counted among the 10: the run may win the race.
            done = ok_ids_on_disk(output)
            server.state.reset()
            proc = _spawn(args)
            try:
                wait_until(lambda: rows_on_disk(output) >= ROWS or proc.poll() is not None, 60, "every row on disk",
                           interval=0.002)
                killed_in_finalize = proc.poll() is None
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait(timeout=30)
            resent_done += sorted(set(rows_sent(server.state.requests, row_of_prompt)) & done)
            done = ok_ids_on_disk(output)
            server.state.reset()
            final = run_cli(args, timeout=90)
            resent_done += sorted(set(rows_sent(server.state.requests, row_of_prompt)) & done)
        finally:
            watcher.stop.set()
            thread.join(timeout=10)
    assert final.returncode == 0, final.stderr
    assert kills == KILLS, f"only {kills} of {KILLS} kill points were reached before the job finished"
    assert not watcher.problems, watcher.problems[:5]
    assert watcher.checks > 100 and watcher.seen_valid > 0, "the watcher hardly ran"
    assert not resent_done, f"rows already on disk were requested again: {resent_done[:10]}"
    out, expected = read_output(output), read_output(reference)
    assert_every_row_once_in_order(out, ROWS)
    assert out.select(COMPARED).equals(expected.select(COMPARED)), "the resumed output differs from the uninterrupted one"
    assert out.columns == expected.columns
    leftovers = [p.name for p in files_under(tmp_path) if p.suffix == ".tmp"]
    assert not leftovers and not state_dir(output).exists(), leftovers
    figures(rows=ROWS, kills=kills, kill_points=" ".join(kill_points), watcher_checks=watcher.checks,
            watcher_saw_output=watcher.seen_valid,
            extra_kill_at_finalize=killed_in_finalize, rows_requested_twice_on_disk=len(resent_done),
            error_rows=out.filter(pl.col("error").is_not_null()).height)

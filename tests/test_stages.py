"""The run's stages on their own: the stop state machine, the lost-server watch and the result sink."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.control import RunControl, RunState, StopCause
from batchgen.errors import APIConnectionError, APITimeoutError, BadRequestError, OutputError
from batchgen.io.journal import list_segments, read_segment
from batchgen.io.parts import PartWriter, list_parts
from batchgen.io.schema import output_schema, state_schema
from batchgen.progress import Progress, RunStats
from batchgen.records import Outcome, ResultRecord, RowRequest, outcome_record
from batchgen.sink import ResultSink
from batchgen.watch import LostServerWatch

# ---------------------------------------------------------------- RunControl


def test_drain_then_abort_keeps_the_first_cause_and_calls_each_callback_once() -> None:
    control, calls = RunControl(), []
    control.on_drain(lambda: calls.append("drain"))
    control.on_abort(lambda: calls.append("abort"))
    assert control.sending and not control.aborted
    control.drain(StopCause.LOST_SERVER, "gone")
    control.drain(StopCause.REQUESTED, "again")  # no effect once stopping
    assert (control.state, control.cause, control.message) == (RunState.DRAINING, StopCause.LOST_SERVER, "gone")
    assert not control.sending and not control.aborted
    control.abort(StopCause.INTERRUPTED)
    control.abort(StopCause.OUTPUT_FAILED)
    assert (control.state, control.cause) == (RunState.ABORTED, StopCause.LOST_SERVER)
    assert calls == ["drain", "abort"]


def test_an_abort_from_running_stops_sending_too() -> None:
    control, calls = RunControl(), []
    control.on_drain(lambda: calls.append("drain"))
    control.on_abort(lambda: calls.append("abort"))
    control.abort(StopCause.INTERRUPTED, "Ctrl-C")
    assert (control.state, control.cause, control.message) == (RunState.ABORTED, StopCause.INTERRUPTED, "Ctrl-C")
    assert calls == ["drain", "abort"]


# ---------------------------------------------------------------- LostServerWatch


def _outcome(index: int, error: Exception | None) -> tuple[Outcome, ResultRecord]:
    outcome = Outcome(RowRequest(index, f"r{index}", {}), None, error, 6, 0.1)  # type: ignore[arg-type]
    return outcome, outcome_record(outcome)


def test_lost_connections_stay_unwritten_once_the_run_is_drained_for_a_lost_server() -> None:
    control = RunControl()
    watch = LostServerWatch(control)
    for i in range(3):
        assert watch.hold(*_outcome(i, APIConnectionError("refused")))
    assert control.sending  # holding decides nothing: the ClientPool says when every server is gone
    control.drain(StopCause.LOST_SERVER, "every server is gone")
    assert watch.release() == []  # a rerun resends them


def test_timeouts_and_other_errors_are_not_a_lost_server_and_release_the_streak() -> None:
    control = RunControl()
    watch = LostServerWatch(control)
    assert watch.hold(*_outcome(0, APIConnectionError("reset")))
    assert not watch.hold(*_outcome(1, APITimeoutError("slow")))
    assert not watch.hold(*_outcome(2, BadRequestError(400, "bad")))
    assert [r["id"] for r in watch.release()] == ["r0"]
    assert watch.release() == [] and control.sending


# ---------------------------------------------------------------- ResultSink

_SCHEMA = state_schema(output_schema(pa.schema([]))[0])


def _record(index: int, **overrides: Any) -> ResultRecord:
    outcome = Outcome(RowRequest(index, f"r{index}", {}), None, BadRequestError(400, "x"), 1, 0.1)
    record = outcome_record(outcome)
    record.update(overrides)  # type: ignore[typeddict-item]
    return record


async def _sink(tmp_path: Path, **options: Any) -> tuple[ResultSink, PartWriter]:
    writer = PartWriter(tmp_path / "state", _SCHEMA, 0)
    stats = RunStats()
    progress = Progress(stats, None, enabled=False, stream=io.StringIO())
    settings = {"flush_seconds": 60.0, "flush_rows": 4, **options}
    return ResultSink(writer, stats, progress, retries=lambda: 0, in_flight=lambda: 0, **settings), writer


async def _emit(sink: ResultSink, record: ResultRecord) -> None:
    """What a producer does: hand over the record, then wait for room if the sink asks to."""
    if (room := sink.emit(record)) is not None:
        await room


def _rows_on_disk(tmp_path: Path) -> list[int]:
    return sorted(i for part in list_parts(tmp_path / "state") for i in pq.read_table(part.path)["_index"].to_pylist())


async def test_a_part_is_written_per_flush_rows_and_the_rest_on_close(tmp_path: Path) -> None:
    sink, _ = await _sink(tmp_path)
    task = asyncio.create_task(sink.run())
    for i in range(9):
        await _emit(sink, _record(i))
    sink.close()
    await asyncio.wait_for(task, 10)
    assert _rows_on_disk(tmp_path) == list(range(9)) and sink.written == 9
    assert sink.stats.failed == 9


async def test_records_are_flushed_after_flush_seconds_without_reaching_flush_rows(tmp_path: Path) -> None:
    sink, _ = await _sink(tmp_path, flush_seconds=0.05, flush_rows=1000)
    task = asyncio.create_task(sink.run())
    await _emit(sink, _record(0))
    async with asyncio.timeout(10):
        while sink.written == 0:  # polls a condition with a deadline, not a fixed sleep
            await asyncio.sleep(0.01)
    assert _rows_on_disk(tmp_path) == [0]
    sink.close()
    await task


async def test_emit_waits_for_room_when_the_writer_is_far_behind(tmp_path: Path) -> None:
    sink, _ = await _sink(tmp_path, flush_rows=2)  # room for 4 x 2 pending records
    for i in range(7):
        await _emit(sink, _record(i))  # no writer yet: these fit
    blocked = asyncio.create_task(_emit(sink, _record(7)))
    await asyncio.sleep(0)
    assert not blocked.done()
    task = asyncio.create_task(sink.run())
    await asyncio.wait_for(blocked, 10)
    sink.close()
    await task
    assert _rows_on_disk(tmp_path) == list(range(8))


async def test_a_record_arrow_cannot_store_becomes_an_error_row(tmp_path: Path) -> None:
    sink, _ = await _sink(tmp_path)
    task = asyncio.create_task(sink.run())
    await _emit(sink, _record(0, error=None, content="fine", status_code=200))
    await _emit(sink, _record(1, error=None, content="x", attempts=2**40))  # overflows int32
    sink.close()
    await task
    rows = {r["_index"]: r for part in list_parts(tmp_path / "state") for r in pq.read_table(part.path).to_pylist()}
    assert rows[0]["content"] == "fine" and rows[0]["error"] is None
    assert rows[1]["error"].startswith("the answer could not be stored") and rows[1]["content"] is None
    assert rows[1]["id"] == "r1"


async def test_a_failing_disk_ends_the_writer_with_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink, writer = await _sink(tmp_path)

    def full(table: Any) -> None:
        raise OutputError("No space left on device")

    monkeypatch.setattr(writer, "write_table", full)
    task = asyncio.create_task(sink.run())
    await _emit(sink, _record(0))
    sink.close()
    with pytest.raises(OutputError, match="No space"):
        await task


# ---------------------------------------------------------------- the journal (issue 15)


def _journaled_rows(state_dir: Path) -> list[int]:
    return sorted(i for seg in list_segments(state_dir) for t in read_segment(seg.path)[0] for i in t["_index"].to_pylist())


async def test_records_reach_the_journal_within_journal_seconds_long_before_their_part(tmp_path: Path) -> None:
    sink, _ = await _sink(tmp_path, journal_seconds=0.05, flush_seconds=60.0, flush_rows=1000)
    task = asyncio.create_task(sink.run())
    for i in range(3):
        await _emit(sink, _record(i))
    async with asyncio.timeout(10):
        while _journaled_rows(tmp_path / "state") != [0, 1, 2]:  # polls a condition with a deadline
            await asyncio.sleep(0.01)
    assert _rows_on_disk(tmp_path) == [] and sink.written == 0  # no part yet: the journal alone holds them
    await _emit(sink, _record(3))
    sink.close()
    await asyncio.wait_for(task, 10)
    assert _rows_on_disk(tmp_path) == [0, 1, 2, 3] and sink.written == 4
    assert list_segments(tmp_path / "state") == []  # the part replaced its segment


async def test_a_part_replaces_its_segment_at_flush_rows(tmp_path: Path) -> None:
    sink, _ = await _sink(tmp_path, journal_seconds=0.01, flush_seconds=60.0, flush_rows=4)
    task = asyncio.create_task(sink.run())
    for i in range(9):
        await _emit(sink, _record(i))
        await asyncio.sleep(0.02)  # a journal step between records
    async with asyncio.timeout(10):
        while _rows_on_disk(tmp_path) != list(range(8)) or _journaled_rows(tmp_path / "state") != [8]:
            await asyncio.sleep(0.01)
    assert len(list_parts(tmp_path / "state")) == 2  # two parts of flush_rows each, the ninth row in the journal
    sink.close()
    await asyncio.wait_for(task, 10)
    assert _rows_on_disk(tmp_path) == list(range(9)) and list_segments(tmp_path / "state") == []


async def test_a_failing_journal_write_ends_the_writer_with_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink, _ = await _sink(tmp_path, journal_seconds=0.01, flush_rows=1000)

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("batchgen.io.journal.os.fsync", no_space)
    task = asyncio.create_task(sink.run())
    await _emit(sink, _record(0))
    with pytest.raises(OutputError, match="cannot write the journal.*No space"):
        await asyncio.wait_for(task, 10)



async def test_a_cancelled_writer_lets_the_thread_finish_its_journal_record_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling the writer mid-step must not close the segment's file under the thread writing it."""
    import batchgen.io.journal as journal_module

    real_write = os.write
    writing = threading.Event()

    def slow_write(fd: int, data: Any) -> int:
        writing.set()
        time.sleep(0.3)
        return real_write(fd, data)

    monkeypatch.setattr(journal_module.os, "write", slow_write)
    sink, _ = await _sink(tmp_path, journal_seconds=0.01, flush_rows=1000)
    task = asyncio.create_task(sink.run())
    await _emit(sink, _record(0))
    async with asyncio.timeout(10):
        while not writing.is_set():
            await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (segment,) = list_segments(tmp_path / "state")
    tables, problem = read_segment(segment.path)
    assert problem is None and [t["_index"].to_pylist() for t in tables] == [[0]]


async def test_a_failed_writer_releases_producers_waiting_for_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink, writer = await _sink(tmp_path, journal_seconds=0.01, flush_rows=2)  # room for 4 x 2 pending records
    sealing = threading.Event()

    def slow_full_disk(table: Any) -> None:
        sealing.set()
        time.sleep(0.2)  # producers fill the pending list meanwhile
        raise OutputError("No space left on device")

    monkeypatch.setattr(writer, "write_table", slow_full_disk)
    task = asyncio.create_task(sink.run())
    await _emit(sink, _record(0))
    await _emit(sink, _record(1))  # flush_rows: journaled, then a part is due
    async with asyncio.timeout(10):
        while not sealing.is_set():
            await asyncio.sleep(0.005)
    rooms = [sink.emit(_record(i)) for i in range(2, 11)]
    waiting = [room for room in rooms if room is not None]
    assert waiting  # the pending list is full while the part is written
    async with asyncio.timeout(10):
        for room in waiting:
            await room  # released, though the writer failed
    with pytest.raises(OutputError, match="No space"):
        await task

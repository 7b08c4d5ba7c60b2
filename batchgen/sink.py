"""`ResultSink`: finished records → the journal within `journal_seconds` → crash-safe part files.

Records wait in a pending list (no queue hop per row). One writer task, in a worker thread:
every `journal_seconds` (or as soon as `flush_rows` are waiting) turns the pending records into
an Arrow table and appends it, fsynced, to the journal segment of the part being built
(`batchgen.io.journal`): from then on a crash costs none of them. Every `flush_seconds` (or once
the segment holds `flush_rows`) it writes the segment's tables as a part file and removes the
segment. `journal_seconds=0` turns the journal off: records wait in memory until their part.
Between steps it refreshes the progress display. When the writer falls far behind
(`4 × flush_rows` pending), `emit` returns a wait for room, which holds the workers, which holds
the feeder: memory stays bounded whatever the disk does. A record Arrow cannot store becomes an
error row; any other write failure ends the writer task with `OutputError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pyarrow as pa

from batchgen.errors import OutputError
from batchgen.io.journal import JournalSegment
from batchgen.io.parts import PartWriter, storable_table
from batchgen.progress import Progress, RunStats
from batchgen.records import ResultRecord

__all__ = ["ResultSink"]

_PROGRESS_EVERY_S = 0.5
_BACKLOG_FLUSHES = 4  # pending records allowed, in flushes' worth, before emit() waits


class ResultSink:
    """Buffers records and writes them as part files.

    Args:
        writer: the part writer (its schema is the part-file schema).
        stats: counts every record emitted.
        progress: refreshed between flushes with `retries()` and `in_flight()`.
        flush_seconds / flush_rows: write a part when its oldest record is this old, or when it
            holds this many.
        journal_seconds: make records durable (journal, fsync) once the oldest pending one is this
            old; 0 = no journal (a crash loses what is not yet in a part).

    Example:
        sink = ResultSink(writer, stats, progress, flush_seconds=2, flush_rows=2000, journal_seconds=0.1, ...)
        task = asyncio.create_task(sink.run())
        if (room := sink.emit(record)) is not None:
            await room
        sink.close(); await task
    """

    def __init__(
        self,
        writer: PartWriter,
        stats: RunStats,
        progress: Progress,
        *,
        flush_seconds: float,
        flush_rows: int,
        journal_seconds: float = 0.0,
        retries: Callable[[], int],
        in_flight: Callable[[], int],
    ) -> None:
        self._writer = writer
        self.stats = stats
        self._progress = progress
        self._flush_seconds = flush_seconds
        self._flush_rows = flush_rows
        self._journal_seconds = journal_seconds
        self._retries = retries
        self._in_flight = in_flight
        self._loop = asyncio.get_running_loop()
        self._pending: list[ResultRecord] = []
        self._pending_since = 0.0
        self._max_pending = _BACKLOG_FLUSHES * flush_rows
        self._wake = asyncio.Event()  # flush now (flush_rows reached, or the end)
        # One future per backpressure episode, resolved when the writer makes room: a future (not
        # an Event's wait() coroutine) may be returned to several callers, or dropped, safely.
        self._room: asyncio.Future[None] | None = None
        self._thread_job: asyncio.Future[object] | None = None  # the writer's step running in a thread
        self._closed = False
        self.written = 0  # records written to part files by this run

    def emit(self, record: ResultRecord) -> Awaitable[None] | None:
        """Keep one finished record for the next part.

        Returns None, or when the writer is far behind, an awaitable that the caller awaits before it
        produces more (backpressure). Not a coroutine: one would be built and awaited per row.
        """
        pending = self._pending
        if not pending:
            self._pending_since = self._loop.time()
            self._wake.set()  # the writer may be asleep until its next progress refresh: arm the step's timer
        pending.append(record)
        self.stats.add(record)
        if len(pending) >= self._flush_rows:
            self._wake.set()
            if len(pending) >= self._max_pending:
                if self._room is None or self._room.done():
                    self._room = self._loop.create_future()
                return self._room
        return None

    def _make_room(self) -> None:
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    async def _in_thread(self, fn: Callable[..., object], *args: object) -> None:
        """Run one step in a worker thread. Shielded: a cancelled writer must not close the journal
        segment while the thread still writes to its file descriptor (`run`'s `finally` waits)."""
        self._thread_job = self._loop.run_in_executor(None, fn, *args)
        await asyncio.shield(self._thread_job)

    def close(self) -> None:
        """No more records: `run()` writes what is pending and returns."""
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        """The single writer: journal steps and parts as their times come, the progress display between."""
        loop, writer, flush_rows, flush_seconds = self._loop, self._writer, self._flush_rows, self._flush_seconds
        durable = self._journal_seconds > 0
        step_seconds = self._journal_seconds if durable else flush_seconds  # without a journal: one step per part
        segment = writer.open_segment()
        segment_since = 0.0  # when the oldest record in the segment arrived
        try:
            while True:
                if not self._closed and len(self._pending) < flush_rows:
                    now = loop.time()
                    due = now + _PROGRESS_EVERY_S
                    if self._pending:
                        due = min(due, self._pending_since + step_seconds)
                    if segment.rows:
                        due = min(due, segment_since + flush_seconds)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, due - now)):
                            await self._wake.wait()
                self._wake.clear()
                self._progress.refresh(self._retries(), self._in_flight())
                pending = self._pending
                if pending and (
                    self._closed or len(pending) >= flush_rows or loop.time() >= self._pending_since + step_seconds
                ):
                    if not segment.rows:
                        segment_since = self._pending_since
                    self._pending = []
                    self._make_room()
                    # At the end the part follows at once: no fsync for a journal record about to be removed.
                    await self._in_thread(_append, writer, segment, pending, durable and not self._closed)
                if segment.rows and (
                    self._closed or segment.rows >= flush_rows or loop.time() >= segment_since + flush_seconds
                ):
                    rows = segment.rows
                    await self._in_thread(writer.seal, segment)
                    self.written += rows
                    segment = writer.open_segment()
                if self._closed and not self._pending and not segment.rows:
                    return
        finally:
            job = self._thread_job
            if job is not None and not job.done():
                await asyncio.wait([job])  # cancelled mid-step: let the thread finish with the file first
            segment.close()
            self._make_room()  # a writer that failed must not leave a producer waiting for room forever


def _append(writer: PartWriter, segment: JournalSegment, records: list[ResultRecord], durable: bool) -> None:
    """Records → one table of the part schema → the segment; a record that cannot be stored becomes an error row."""
    segment.append(storable_table(writer.schema, records), durable=durable)

"""`ResultSink`: finished records → crash-safe part files, with backpressure and a timed flush.

Records wait in a pending list (no queue hop per row). One writer task turns them into a part
file every `flush_seconds`, or as soon as `flush_rows` are waiting, in a worker thread; between
flushes it refreshes the progress display. When the writer falls far behind (`4 × flush_rows`
pending), `emit` returns a wait for room, which holds the workers, which holds the feeder: memory stays
bounded whatever the disk does. A record Arrow cannot store becomes an error row; any other
write failure ends the writer task with `OutputError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pyarrow as pa

from batchgen.errors import OutputError
from batchgen.io.parts import PartWriter
from batchgen.progress import Progress, RunStats
from batchgen.records import ResultRecord, unstorable_record

__all__ = ["ResultSink"]

_PROGRESS_EVERY_S = 0.5
_BACKLOG_FLUSHES = 4  # pending records allowed, in flushes' worth, before emit() waits


class ResultSink:
    """Buffers records and writes them as part files.

    Args:
        writer: the part writer (its schema is the part-file schema).
        stats: counts every record emitted.
        progress: refreshed between flushes with `retries()` and `in_flight()`.
        flush_seconds / flush_rows: write a part when the oldest pending record is this old, or
            when this many are pending.

    Example:
        sink = ResultSink(writer, stats, progress, flush_seconds=2, flush_rows=10_000, ...)
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
        retries: Callable[[], int],
        in_flight: Callable[[], int],
    ) -> None:
        self._writer = writer
        self.stats = stats
        self._progress = progress
        self._flush_seconds = flush_seconds
        self._flush_rows = flush_rows
        self._retries = retries
        self._in_flight = in_flight
        self._loop = asyncio.get_running_loop()
        self._pending: list[ResultRecord] = []
        self._pending_since = 0.0
        self._max_pending = _BACKLOG_FLUSHES * flush_rows
        self._wake = asyncio.Event()  # flush now (flush_rows reached, or the end)
        self._room = asyncio.Event()
        self._closed = False
        self.written = 0  # records written to part files by this run

    def emit(self, record: ResultRecord) -> Awaitable[bool] | None:
        """Keep one finished record for the next part.

        Returns None, or when the writer is far behind, an awaitable that the caller awaits before it
        produces more (backpressure). Not a coroutine: one would be built and awaited per row.
        """
        pending = self._pending
        if not pending:
            self._pending_since = self._loop.time()
        pending.append(record)
        self.stats.add(record)
        if len(pending) >= self._flush_rows:
            self._wake.set()
            if len(pending) >= self._max_pending:
                self._room.clear()
                return self._room.wait()
        return None

    def close(self) -> None:
        """No more records: `run()` writes what is pending and returns."""
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        """The single writer: a part every flush_seconds (or flush_rows), the progress display between."""
        loop, flush_seconds, flush_rows = self._loop, self._flush_seconds, self._flush_rows
        while True:
            if not self._closed and len(self._pending) < flush_rows:
                now = loop.time()
                due = self._pending_since + flush_seconds if self._pending else now + flush_seconds
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, min(due - now, _PROGRESS_EVERY_S))):
                        await self._wake.wait()
            self._wake.clear()
            self._progress.refresh(self._retries(), self._in_flight())
            if not self._pending:
                if self._closed:
                    return
                continue
            if self._closed or len(self._pending) >= flush_rows or loop.time() >= self._pending_since + flush_seconds:
                records, self._pending = self._pending, []
                self._room.set()
                await asyncio.to_thread(_write_part, self._writer, records)
                self.written += len(records)


def _write_part(writer: PartWriter, records: list[ResultRecord]) -> None:
    """Write one part; a record that cannot be stored becomes an error row instead of failing the run."""
    try:
        writer.write(records)
        return
    except OutputError:
        fixed = [_storable(writer.schema, record) for record in records]
        if all(a is b for a, b in zip(fixed, records, strict=True)):
            raise  # not a bad record: the disk or the directory failed
    writer.write(fixed)


def _storable(schema: pa.Schema, record: ResultRecord) -> ResultRecord:
    try:
        pa.Table.from_pylist([record], schema=schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        return unstorable_record(record, str(exc))
    return record

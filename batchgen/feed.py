"""`Feeder`: input rows → requests for the pool, or problem records for the sink.

It reads the input in batches off the event loop, one batch ahead (without the read-ahead the
workers ran dry while a batch was decoded), skips rows the checkpoint says are done (a resumed
run), maps each row to a request body, and dispatches: a request to the worker pool (waiting
while its inbox is full: the reader never runs far ahead), a bad row straight to the sink as an
error record. It stops at `limit` rows, or when the run stops sending.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from batchgen.io.parts import FAILED, SUCCEEDED
from batchgen.io.readers import InputSource
from batchgen.progress import RunStats
from batchgen.records import ResultRecord, RowProblem, RowRequest, SourceRow, problem_record
from batchgen.lengthcheck import LengthCheck
from batchgen.rows import RowMapper

__all__ = ["Feeder", "row_item"]


def row_item(mapper: RowMapper, row: SourceRow) -> RowRequest | RowProblem:
    """What an input row becomes: a request, or a problem (unreadable, or invalid as a request)."""
    if row.error is not None or row.values is None:
        row_id = mapper.row_id(row.index, row.values) if row.values else None
        return RowProblem(row.index, row_id, row.error or f"{row.where}: unreadable", "invalid_input")
    return mapper.map(row.index, row.where, row.values)


class Feeder:
    """Feeds one run.

    Args:
        source: the opened input.
        mapper: turns a row into a request body or a problem.
        status: per input row, from the checkpoint: 0 not done, `SUCCEEDED` or `FAILED`.
        submit: hands a request to the pool (may wait: backpressure).
        try_submit: hands a request to the pool if it has room now (the usual case, no coroutine).
        emit: hands a problem record to the sink; what it returns, when not None, is awaited.
        stats: counts the rows skipped as already done.
        limit: feed only rows with an index below this.
        retry_failed: send again the rows that ended as errors.
        length_check: refuses rows that cannot fit the server's context (their problem records go
            to the sink); exact counts are asked per input batch, before its rows are fed.
    """

    def __init__(
        self,
        source: InputSource,
        mapper: RowMapper,
        status: bytearray,
        *,
        submit: Callable[[RowRequest], Awaitable[None]],
        try_submit: Callable[[RowRequest], bool],
        emit: Callable[[ResultRecord], Awaitable[object] | None],
        stats: RunStats,
        limit: int | None = None,
        retry_failed: bool = False,
        length_check: LengthCheck | None = None,
    ) -> None:
        self._source = source
        self._mapper = mapper
        self._status = status
        self._submit = submit
        self._try_submit = try_submit
        self._emit = emit
        self._stats = stats
        self._limit = limit
        self._retry_failed = retry_failed
        self._length_check = length_check

    async def _batches(self) -> AsyncIterator[list[SourceRow]]:
        """Input batches, decoded off the loop; the next one is read while this one is fed."""
        self._source.decode_only(self._mapper.columns_used)
        batches: Iterator[list[SourceRow]] = self._source.iter_batches()
        ahead = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
        try:
            while (batch := await ahead) is not None:
                ahead = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
                yield batch
        finally:
            ahead.cancel()  # a stop or --limit: the thread finishes its read, and the batch is dropped

    async def run(self) -> None:
        """Feed every row; raises `InputError` if the input becomes unreadable part-way (fatal)."""
        limit, retry_failed, status = self._limit, self._retry_failed, self._status
        mapper, submit, try_submit, check = self._mapper, self._submit, self._try_submit, self._length_check
        async for batch in self._batches():
            todo = []
            for row in batch:
                index = row.index
                if limit is not None and index >= limit:
                    break
                state = status[index] if index < len(status) else 0
                if state == SUCCEEDED or (state == FAILED and not retry_failed):
                    self._stats.skipped += 1
                    continue
                todo.append(row_item(mapper, row))
            if check is not None:
                await check.prepare(item for item in todo if isinstance(item, RowRequest))
            for item in todo:
                if check is not None and isinstance(item, RowRequest):
                    item = check.problem(item) or item
                if isinstance(item, RowProblem):
                    if (room := self._emit(problem_record(item))) is not None:
                        await room
                elif not try_submit(item):
                    await submit(item)
            if limit is not None and len(batch) and batch[-1].index >= limit:
                return

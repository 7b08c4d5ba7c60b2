"""`run(config)`: reader → worker pool → part files → final output, resumable at any point.

Rows stream from the input in batches; each becomes a request (or an error record when the row
itself is bad); at most `concurrency` requests are in flight; finished records go to crash-safe
part files every `flush_seconds`; when every row is done the parts are merged into the output in
input order. The parts are the checkpoint: a rerun skips every row already on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa

from batchgen.client import Client
from batchgen.config import MOCK_URL, RunConfig
from batchgen.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    BatchgenError,
    InputError,
    OutputError,
)
from batchgen.idcheck import find_duplicate_id, source_ids
from batchgen.io.merge import MergeResult, finalize
from batchgen.io.parts import PartWriter, scan_checkpoint
from batchgen.io.readers import InputSource, SourceRow, open_input
from batchgen.io.schema import output_schema, state_schema
from batchgen.progress import Progress, RunStats
from batchgen.records import outcome_record, problem_record
from batchgen.rows import RowMapper, RowProblem, RowRequest
from batchgen.runtime import lean_gc
from batchgen.types import ChatCompletionResponse
from batchgen.worker import Outcome, WorkerPool

__all__ = ["EXIT_CODES", "RunResult", "run", "run_async"]

EXIT_OK = 0
EXIT_ROW_ERRORS = 1  # the run completed, but some rows are error rows
EXIT_CONFIG = 2  # bad config or input; nothing was sent
EXIT_FATAL = 3  # the server could not be used (e.g. model discovery failed)
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM; finished rows are on disk, rerun to resume
EXIT_CODES = {
    EXIT_OK: "every row succeeded",
    EXIT_ROW_ERRORS: "the run completed with some error rows",
    EXIT_CONFIG: "config or input error (nothing was sent), or the output could not be written",
    EXIT_FATAL: "the server could not be used",
    EXIT_INTERRUPTED: "interrupted; rerun the same command to resume",
}
_PROGRESS_EVERY_S = 0.5


@dataclass(slots=True)
class RunResult:
    exit_code: int
    stats: RunStats
    output: str
    message: str


def state_dir_for(output: str) -> Path:
    """Where the part files of a run live until it completes."""
    return Path(output + ".batchgen")


class _Run:
    """One run's wiring; `execute()` does the work. Split out so each step stays short."""

    def __init__(self, cfg: RunConfig, client: Client, source: InputSource, mapper: RowMapper, log: TextIO) -> None:
        self.cfg, self.client, self.source, self.mapper, self.log = cfg, client, source, mapper, log
        self.output = Path(cfg.output)
        self.state_dir = state_dir_for(cfg.output)
        self.previous = self.output if self.output.exists() else None
        passthrough = source.passthrough_schema
        if mapper.id_column == "id" and "id" in passthrough.names:
            passthrough = passthrough.remove(passthrough.get_field_index("id"))
        self.passthrough_names = passthrough.names
        self.schema, renames = output_schema(passthrough)
        self.output_names = [renames.get(n, n) for n in self.passthrough_names]
        # Input columns never travel through the pipeline: the merge joins them from the input.
        kept = set(self.output_names)
        self.passthrough_schema = pa.schema([f for f in self.schema if f.name in kept])
        self.results_schema = pa.schema([f for f in self.schema if f.name not in kept])
        self.stats = RunStats()
        # Finished records wait here for the writer; no queue hop per row.
        self.loop = asyncio.get_running_loop()
        self.pending: list[dict[str, Any]] = []
        self.pending_since = 0.0
        self.max_pending = 4 * cfg.flush_rows  # the writer thread is behind: workers wait for room
        self.wake = asyncio.Event()  # flush now (flush_rows reached, or the end)
        self.room = asyncio.Event()
        self.ended = False
        self.new_records = 0
        self.interrupted = False
        # Connection failures in a row mean the server is gone: hold their records back (so a rerun
        # resends them) and stop the run instead of turning every remaining row into an error row.
        self.down_threshold = max(2 * cfg.concurrency, 10)
        self.down_streak: list[dict[str, Any]] = []
        self.aborted: str | None = None
        self.pool = WorkerPool(self._send, cfg.concurrency, on_outcome=self._on_outcome)
        self.feeder: asyncio.Task[None] | None = None

    async def _batches(self) -> AsyncIterator[list[SourceRow]]:
        """Input batches, decoded off the loop; the next one is read while this one is fed."""
        self.source.decode_only(self.mapper.columns_used)
        batches: Iterator[list[SourceRow]] = self.source.iter_batches()
        ahead = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
        try:
            while (batch := await ahead) is not None:
                # Without the read-ahead the workers ran dry while a batch was being decoded.
                ahead = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
                yield batch
        finally:
            ahead.cancel()  # a stop or --limit: the thread finishes its read, and the batch is dropped

    async def _feed(self, pool: WorkerPool, status: bytearray) -> None:
        limit = self.cfg.limit
        retry_failed = self.cfg.retry_failed
        mapper, submit = self.mapper, pool.submit
        async for batch in self._batches():
            for row in batch:
                index = row.index
                if limit is not None and index >= limit:
                    return
                state = status[index] if index < len(status) else 0
                if state == 1 or (state == 2 and not retry_failed):
                    self.stats.skipped += 1
                    continue
                item: RowRequest | RowProblem
                if row.error is not None or row.values is None:
                    row_id = mapper.row_id(index, row.values) if row.values else None
                    item = RowProblem(index, row_id, row.error or f"{row.where}: unreadable", "invalid_input")
                else:
                    item = mapper.map(index, row.where, row.values)
                if isinstance(item, RowProblem):
                    await self._emit(problem_record(item))
                else:
                    await submit(item)

    def _send(self, request: RowRequest) -> Awaitable[ChatCompletionResponse]:
        # Not a coroutine itself: it hands the pool the client's, one frame fewer per I/O step.
        return self.client.request(request.body)

    async def _on_outcome(self, outcome: Outcome) -> None:
        record = outcome_record(outcome, keep_raw=self.cfg.keep_raw)
        # A refused or reset connection says the server is gone; a timeout only that a row is slow.
        if isinstance(outcome.error, APIConnectionError) and not isinstance(outcome.error, APITimeoutError):
            self.down_streak.append(record)
            if len(self.down_streak) >= self.down_threshold and self.aborted is None:
                self.aborted = (
                    f"the server at {self.client.base_url} stopped answering: {len(self.down_streak)} requests "
                    f"in a row failed after every retry (last: {outcome.error})"
                )
                self._stop(cancel_in_flight=False)
            return
        if self.down_streak and self.aborted is None:  # a passing failure: its rows are real error rows
            await self._release_streak()
        await self._emit(record)

    async def _release_streak(self) -> None:
        for held in self.down_streak:
            await self._emit(held)
        self.down_streak.clear()

    async def _emit(self, record: dict[str, Any]) -> None:
        """Keep one finished record for the next part; waits only when the writer thread is far behind."""
        pending = self.pending
        if not pending:
            self.pending_since = self.loop.time()
        pending.append(record)
        self.stats.add(record)
        if len(pending) >= self.cfg.flush_rows:
            self.wake.set()
            if len(pending) >= self.max_pending:
                self.room.clear()
                await self.room.wait()

    async def _write(self, writer: PartWriter, progress: Progress) -> None:
        """The single writer: a part every flush_seconds (or flush_rows), the progress display between."""
        loop, flush_seconds, flush_rows = self.loop, self.cfg.flush_seconds, self.cfg.flush_rows
        while True:
            if not self.ended and len(self.pending) < flush_rows:
                now = loop.time()
                due = self.pending_since + flush_seconds if self.pending else now + flush_seconds
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, min(due - now, _PROGRESS_EVERY_S))):
                        await self.wake.wait()
            self.wake.clear()
            progress.refresh(self.client.retries_total)
            if not self.pending:
                if self.ended:
                    return
                continue
            if self.ended or len(self.pending) >= flush_rows or loop.time() >= self.pending_since + flush_seconds:
                records, self.pending = self.pending, []
                self.room.set()
                await asyncio.to_thread(_write_part, writer, records)
                self.new_records += len(records)

    def _end_writing(self) -> None:
        self.ended = True
        self.wake.set()

    async def execute(self) -> RunResult:
        total = self.source.total_rows()
        if self.cfg.limit is not None and total is not None:
            total = min(total, self.cfg.limit)
        checkpoint = await asyncio.to_thread(scan_checkpoint, self.state_dir, total, self.previous)
        writer = PartWriter(self.state_dir, state_schema(self.results_schema), checkpoint.next_generation)
        progress = Progress(self.stats, total, enabled=self.cfg.progress, stream=self.log)
        producer = asyncio.create_task(self._produce(checkpoint.status))
        write_task = asyncio.create_task(self._write(writer, progress))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._interrupt)
        try:
            # The writer only ends early by failing (disk full): then stop producing too.
            await asyncio.wait([producer, write_task], return_when=asyncio.FIRST_COMPLETED)
            if write_task.done():
                self._stop(cancel_in_flight=True)
                await asyncio.wait([producer])
                write_task.result()
            if self.aborted is None and not self.interrupted:
                await self._release_streak()
            self._end_writing()
            await write_task
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
            if not producer.done():  # an exception above (or our own cancellation): leave nothing running
                self._stop(cancel_in_flight=True)
                await asyncio.wait([producer])
            write_task.cancel()
            progress.close()
            self.stats.retries = self.client.retries_total
        if self.aborted is not None:
            return self._result(EXIT_FATAL, f"{self.aborted}; {self.stats.done} rows saved; rerun the same command to resume")
        if self.interrupted:
            return self._result(EXIT_INTERRUPTED, f"interrupted: {self.stats.done} rows saved; rerun the same command to resume")
        producer.result()  # re-raise a fatal error (e.g. the input became unreadable part-way)
        # Parquet row counts are exact, so finalize can also prove that the last rows are there.
        expected = total if self.source.format == "parquet" else None
        return await self._complete(checkpoint.failed, expected)

    async def _produce(self, status: bytearray) -> None:
        """Feed the pool and run it; a stop cancels only the feeder, so the pool ends in order."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.pool.run())
            self.feeder = asyncio.create_task(self._feed(self.pool, status))
            try:
                await asyncio.wait([self.feeder])
            finally:
                if not self.feeder.done():
                    self.feeder.cancel()
            if not self.feeder.cancelled():
                self.feeder.result()  # an input error part-way: fatal
            if not self.interrupted:
                await self.pool.close()  # workers drain (and, once stopping, drop) what is queued

    def _stop(self, *, cancel_in_flight: bool) -> None:
        """Send nothing more. In-flight requests finish, unless `cancel_in_flight` (Ctrl-C, writer failure)."""
        if cancel_in_flight:
            self.interrupted = True
            self.pool.abort()
        else:
            self.pool.stop()
        if self.feeder is not None:
            self.feeder.cancel()

    def _interrupt(self) -> None:
        self._stop(cancel_in_flight=True)

    async def _complete(self, failed_before: int, expected_rows: int | None) -> RunResult:
        has_parts = self.state_dir.exists() and any(self.state_dir.glob("part-*.parquet"))
        if self.new_records == 0 and not has_parts and self.previous is not None:
            failed = failed_before
            code = EXIT_ROW_ERRORS if failed else EXIT_OK
            return self._result(code, f"nothing to do: every row is already in {self.output} ({failed} error rows)")
        merged = await asyncio.to_thread(self._finalize, expected_rows)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        rows, failed = merged.rows, merged.errors
        code = EXIT_ROW_ERRORS if failed else EXIT_OK
        return self._result(code, f"wrote {rows} rows ({failed} error rows) to {self.output}")

    def _finalize(self, expected_rows: int | None) -> MergeResult:
        passthrough = None
        if self.passthrough_names:
            names = self.output_names
            passthrough = (t.rename_columns(names) for t in self.source.iter_passthrough(self.passthrough_names))
        return finalize(
            self.state_dir,
            self.output,
            self.schema,
            passthrough=passthrough,
            passthrough_schema=self.passthrough_schema,
            previous_output=self.previous,
            expected_rows=expected_rows,
        )

    def _result(self, code: int, message: str) -> RunResult:
        return RunResult(code, self.stats, str(self.output), message)


def _write_part(writer: PartWriter, records: list[dict[str, Any]]) -> None:
    """Write one part; a record that cannot be stored becomes an error row instead of failing the run."""
    try:
        writer.write(records)
        return
    except OutputError:
        fixed = [_storable(writer.schema, record) for record in records]
        if all(a is b for a, b in zip(fixed, records, strict=True)):
            raise  # not a bad record: the disk or the directory failed
    writer.write(fixed)


def _storable(schema: pa.Schema, record: dict[str, Any]) -> dict[str, Any]:
    try:
        pa.Table.from_pylist([record], schema=schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        return {
            **dict.fromkeys(schema.names),
            "_index": record["_index"],
            "id": record.get("id") if isinstance(record.get("id"), str) else None,
            "error": f"the answer could not be stored: {exc}",
            "error_type": "unexpected_error",
            "attempts": record.get("attempts") if isinstance(record.get("attempts"), int) else None,
        }
    return record


async def _model(client: Client, cfg: RunConfig) -> str:
    if cfg.model:
        return cfg.model
    try:
        models = await client.list_models()
    except APIError as exc:
        raise _FatalError(f"cannot list models at {client.base_url}/models: {exc}; pass --model to skip discovery") from exc
    if not models or not isinstance(models[0].get("id"), str):
        raise _FatalError(f"{client.base_url}/models lists no model; pass --model")
    return str(models[0]["id"])


class _FatalError(BatchgenError):
    pass


@contextlib.asynccontextmanager
async def _server_url(cfg: RunConfig) -> AsyncIterator[str]:
    """The base URL to use; `mock` starts the built-in mock server for the duration of the run."""
    if cfg.base_url != MOCK_URL:
        yield cfg.base_url
        return
    from batchgen.testing.mock_server import MockServer

    async with MockServer() as server:
        yield server.url


def _use_jemalloc() -> None:
    """Arrow's jemalloc pool hands freed memory back; the default mimalloc pool kept ~100 MB more
    RSS through the final merge of a 1M-row job (benchmarks/README.md)."""
    with contextlib.suppress(NotImplementedError, pa.ArrowException):
        pa.set_memory_pool(pa.jemalloc_memory_pool())


async def run_async(cfg: RunConfig, *, log: TextIO | None = None) -> RunResult:
    """Run a job to completion (or interruption) and return its result; see `run`."""
    with lean_gc():
        return await _run_async(cfg, log=log or sys.stderr)


async def _run_async(cfg: RunConfig, *, log: TextIO) -> RunResult:
    _use_jemalloc()
    source = open_input(cfg.input, cfg.input_format)
    mapper = RowMapper(
        source.columns,
        fmt=source.format,
        model="",  # set after discovery: the column checks must come before any request
        defaults=cfg.defaults(),
        messages_column=cfg.messages_column,
        prompt_column=cfg.prompt_column,
        system_prompt=cfg.system_prompt,
        id_column=cfg.id_column,
        stream=cfg.stream,
    )
    if cfg.overwrite:
        shutil.rmtree(state_dir_for(cfg.output), ignore_errors=True)
        Path(cfg.output).unlink(missing_ok=True)
    if mapper.id_column is not None:
        id_column = mapper.id_column
        duplicate = await asyncio.to_thread(lambda: find_duplicate_id(source_ids(source, id_column)))
        if duplicate is not None:
            value, first, second = duplicate
            raise InputError(
                f"duplicate id {value!r} in column {mapper.id_column!r}: {source.where(first)} and {source.where(second)}"
            )
    async with _server_url(cfg) as base_url:
        client = Client(
            base_url,
            cfg.resolve_api_key(),
            timeout=cfg.timeout,
            read_timeout=cfg.read_timeout,
            max_retries=cfg.max_retries,
            backoff_base=cfg.backoff_base,
            max_retry_after=cfg.max_retry_after,
            max_connections=cfg.concurrency,
            max_response_bytes=cfg.max_response_bytes,
            headers=cfg.headers,
            request_id_header=cfg.request_id_header,
        )
        async with client:
            try:
                mapper.model = await _model(client, cfg)
            except _FatalError as exc:
                return RunResult(EXIT_FATAL, RunStats(), cfg.output, str(exc))
            return await _Run(cfg, client, source, mapper, log).execute()


def run(cfg: RunConfig, *, log: TextIO | None = None) -> RunResult:
    """Run a `batchgen run` job from Python and return its `RunResult` (exit code, stats, message).

    Raises:
        ConfigError / InputError: before anything is sent.
    """
    return asyncio.run(run_async(cfg, log=log))

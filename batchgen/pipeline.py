"""`run(config)`: the wiring of a job — reader → worker pool → part files → final output.

Each stage lives in its own module; this one opens the input, runs the up-front checks, builds
the pieces, starts them and turns how they ended into a `RunResult`:

    Feeder (feed.py) ──▶ WorkerPool (worker.py) ──▶ LostServerWatch (watch.py) ──▶ ResultSink (sink.py)
        input rows            requests in flight           held-back failures          part files
                                    │    ▲
                ClientPool (client_pool.py)    RunControl (control.py): one stop state for all of them
                 the servers: dispatch, health; drains the run when every server is gone

When every row is done the parts are merged into the output in input order (io/merge.py). The
parts are the checkpoint: a rerun skips every row already on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pyarrow as pa

from batchgen._constants import ExitCode
from batchgen.client_pool import ClientPool
from batchgen.endpoints import EndpointFigures
from batchgen.config import RunConfig
from batchgen.control import RunControl, RunLimits, RunState, StopCause
from batchgen.costs import checked_prices
from batchgen.errors import InputError, ServerUnusableError
from batchgen.feed import Feeder
from batchgen.idcheck import find_duplicate_id, source_ids
from batchgen.io.batch_output import OPENAI_BATCH, effective_output_format, keep_error_body
from batchgen.io.merge import MergeResult, finalize
from batchgen.io.files import output_lock
from batchgen.io.parts import Checkpoint, PartWriter, scan_checkpoint
from batchgen.io.readers import InputSource, open_input
from batchgen.io.schema import OutputLayout, state_schema
from batchgen.lengthcheck import LengthCheck, length_check_for
from batchgen.progress import Progress, RunStats
from batchgen.records import Outcome, outcome_record, read_answer
from batchgen.rows import RowMapper
from batchgen.runtime import lean_gc
from batchgen.servers import check_endpoints, serving_all
from batchgen.sink import ResultSink
from batchgen.watch import LostServerWatch
from batchgen.worker import WorkerPool

__all__ = ["EXIT_CONFIG", "EXIT_FATAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_ROW_ERRORS", "RunResult", "run", "run_async"]

EXIT_OK, EXIT_ROW_ERRORS, EXIT_CONFIG, EXIT_FATAL, EXIT_INTERRUPTED = (
    ExitCode.OK, ExitCode.ROW_ERRORS, ExitCode.CONFIG, ExitCode.FATAL, ExitCode.INTERRUPTED,
)  # fmt: skip


RESUME_HINT = "; rerun the same command to resume"  # ends the message of a run stopped part-way


@dataclass(slots=True)
class RunResult:
    exit_code: int
    stats: RunStats
    output: str
    message: str


def state_dir_for(output: str) -> Path:
    """Where the part files of a run live until it completes."""
    return Path(output + ".batchgen")


async def _execute(cfg: RunConfig, servers: ClientPool, source: InputSource, mapper: RowMapper, log: TextIO,
                   length_check: LengthCheck | None = None) -> RunResult:  # fmt: skip
    """Run every row not yet done, then merge; the stages end in order: feeder, pool, watch, sink."""
    layout = OutputLayout.of(source.passthrough_schema, mapper.id_column)
    output, state_dir = Path(cfg.output), state_dir_for(cfg.output)
    previous = output if output.exists() else None
    total = source.total_rows()
    if cfg.limit is not None and total is not None:
        total = min(total, cfg.limit)
    checkpoint = await asyncio.to_thread(scan_checkpoint, state_dir, total, previous)
    for warning in checkpoint.warnings:  # a crash tore the journal's last record: those rows go again
        print(f"batchgen: warning: {warning}", file=log)

    stats = RunStats(prices=checked_prices(cfg, mapper.model))
    control = RunControl()
    progress = Progress(stats, total, enabled=cfg.progress, stream=log, endpoints=servers.endpoints)
    writer = PartWriter(state_dir, state_schema(layout.results_schema), checkpoint.next_generation)
    watch = LostServerWatch(control)
    servers.on_event = progress.note
    servers.on_lost = lambda message: control.drain(StopCause.LOST_SERVER, message)

    output_format = effective_output_format(cfg.output, cfg.output_format, source.format)
    # OpenAI batch lines carry each answer's body as received, and each server error's envelope.
    batch_lines = output_format == OPENAI_BATCH
    keep_raw = cfg.keep_raw or batch_lines

    def on_outcome(outcome: Outcome) -> Awaitable[object] | None:
        record = outcome_record(outcome, keep_raw=keep_raw)
        if batch_lines and outcome.error is not None:
            keep_error_body(record, outcome.error)
        if watch.hold(outcome, record):
            return None
        for held in watch.release():  # a passing failure: its rows are real error rows
            sink.emit(held)  # its backpressure is the last record's, below
        return sink.emit(record)

    # A lambda, not a coroutine: the pool awaits ClientPool's own coroutine, one frame fewer per I/O step.
    pool = WorkerPool(lambda request: servers.exchange(request.body, read_answer), servers.capacity,
                      on_outcome=on_outcome, control=control)  # fmt: skip
    sink = ResultSink(writer, stats, progress, flush_seconds=cfg.flush_seconds, flush_rows=cfg.flush_rows,
                      journal_seconds=cfg.journal_seconds, retries=lambda: servers.retries_total,
                      in_flight=lambda: servers.in_flight)  # fmt: skip
    feeder = Feeder(source, mapper, checkpoint.status, submit=pool.submit,
                    try_submit=pool.try_submit, emit=sink.emit, stats=stats,
                    limit=cfg.limit, retry_failed=cfg.retry_failed, length_check=length_check)  # fmt: skip

    # The run controls drain the run like a lost server (exit 4): the counted ones where records are counted.
    limits = RunLimits(max_error_rate=cfg.max_error_rate, min_rows_for_error_rate=cfg.min_rows_for_error_rate,
                       max_cost=cfg.max_cost, max_duration=cfg.max_duration)  # fmt: skip
    stats.watch(limits, lambda message: control.drain(StopCause.LIMIT, message))
    deadline = None
    if limits.max_duration is not None:
        deadline = asyncio.get_running_loop().call_later(
            limits.max_duration, control.drain, StopCause.LIMIT, limits.duration_message()
        )

    def unwatch() -> None:  # every row has its answer: what is still written stops nothing
        stats.watch(None)
        if deadline is not None:
            deadline.cancel()

    producer = asyncio.create_task(_produce(feeder, pool, control))
    write_task = asyncio.create_task(sink.run())
    try:
        with _signals_abort(control):
            # The writer only ends early by failing (disk full): then stop producing too.
            await asyncio.wait([producer, write_task], return_when=asyncio.FIRST_COMPLETED)
            unwatch()
            if write_task.done():
                control.abort(StopCause.OUTPUT_FAILED)
                await asyncio.wait([producer])
                write_task.result()
            if control.state is RunState.RUNNING:
                for held in watch.release():
                    if (room := sink.emit(held)) is not None:
                        await room
            sink.close()
            await write_task
    finally:
        unwatch()
        if not producer.done():  # an exception above (or our own cancellation): leave nothing running
            control.abort(StopCause.INTERRUPTED)
            await asyncio.wait([producer])
        write_task.cancel()
        progress.close()
        stats.retries = servers.retries_total
        stats.endpoints = [EndpointFigures.of(e) for e in servers.endpoints]

    def result(code: int, message: str) -> RunResult:
        return RunResult(code, stats, str(output), message)

    if control.cause is StopCause.LOST_SERVER:
        return result(EXIT_FATAL, f"{control.message}; {stats.done} rows saved{RESUME_HINT}")
    if control.cause is StopCause.INTERRUPTED:
        return result(EXIT_INTERRUPTED, f"interrupted: {stats.done} rows saved{RESUME_HINT}")
    if control.cause is StopCause.LIMIT:
        return result(ExitCode.STOPPED, f"stopped: {control.message}; {stats.done} rows saved{RESUME_HINT}")
    producer.result()  # re-raise a fatal error (e.g. the input became unreadable part-way)

    has_parts = state_dir.exists() and any(state_dir.glob("part-*.parquet"))
    if sink.written == 0 and not has_parts and previous is not None:
        # A crash between the output's rename and the parts' removal leaves an empty state dir.
        shutil.rmtree(state_dir, ignore_errors=True)
        failed = checkpoint.failed
        code = EXIT_ROW_ERRORS if failed else EXIT_OK
        return result(code, f"nothing to do: every row is already in {output} ({failed} error rows)")
    # Parquet row counts are exact, so finalize can also prove that the last rows are there.
    expected = total if source.format == "parquet" else None
    merged = await asyncio.to_thread(_finalize, layout, source, checkpoint, output, previous, expected, output_format)
    shutil.rmtree(state_dir, ignore_errors=True)
    code = EXIT_ROW_ERRORS if merged.errors else EXIT_OK
    return result(code, f"wrote {merged.rows} rows ({merged.errors} error rows) to {output}")


async def _produce(feeder: Feeder, pool: WorkerPool, control: RunControl) -> None:
    """Feed the pool and run it. A stop cancels only the feeder, so the pool ends in order: a drain
    lets in-flight requests finish, an abort cancels them."""
    async with asyncio.TaskGroup() as group:
        group.create_task(pool.run())
        feeding = asyncio.create_task(feeder.run())

        def stop_feeding() -> None:
            feeding.cancel()

        control.on_drain(stop_feeding)
        try:
            await asyncio.wait([feeding])
        finally:
            if not feeding.done():
                feeding.cancel()
        if not feeding.cancelled():
            feeding.result()  # an input error part-way: fatal
        if not control.aborted:
            await pool.close()  # workers drain (and, once draining, drop) what is queued


@contextlib.contextmanager
def _signals_abort(control: RunControl) -> Iterator[None]:
    """Ctrl-C and SIGTERM abort the run (finished rows are on disk; a rerun resumes)."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, control.abort, StopCause.INTERRUPTED)
    try:
        yield
    finally:
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)


def _finalize(
    layout: OutputLayout, source: InputSource, checkpoint: Checkpoint, output: Path, previous: Path | None,
    expected_rows: int | None, output_format: str,
) -> MergeResult:  # fmt: skip
    passthrough = None
    if layout.passthrough_names and output_format != OPENAI_BATCH:  # batch lines hold no input columns
        names = layout.output_names
        passthrough = (t.rename_columns(names) for t in source.iter_passthrough(layout.passthrough_names))
    return finalize(
        state_dir_for(str(output)),
        output,
        layout.schema,
        passthrough=passthrough,
        passthrough_schema=layout.passthrough_schema,
        previous_output=previous,
        expected_rows=expected_rows,
        output_format=output_format,
    )


def _use_jemalloc() -> None:
    """Arrow's jemalloc pool hands freed memory back; the default mimalloc pool kept ~100 MB more
    RSS through the final merge of a 1M-row job (benchmarks/README.md). This reaches what pyarrow
    allocates from Python only: Parquet's own buffers use the C++ default pool, which the CLI
    picks before pyarrow loads (`cli._arrow_allocator`)."""
    with contextlib.suppress(NotImplementedError, pa.ArrowException):
        pa.set_memory_pool(pa.jemalloc_memory_pool())


async def run_async(cfg: RunConfig, *, log: TextIO | None = None) -> RunResult:
    """Run a job to completion (or interruption) and return its result; see `run`."""
    if cfg.engine == "ray":  # Ray's driver API blocks: it runs beside this loop
        from batchgen.ray_engine import run_on_ray

        return await asyncio.to_thread(run_on_ray, cfg, log=log or sys.stderr)
    if cfg.dry_run:  # reads the input and the checkpoint, sends nothing; the report is the message
        from batchgen.dryrun import dry_run

        estimate = await dry_run(cfg, state_dir_for(cfg.output))
        return RunResult(EXIT_OK, RunStats(), cfg.output, estimate.report())
    with lean_gc():
        return await _run_async(cfg, log=log or sys.stderr)


async def _run_async(cfg: RunConfig, *, log: TextIO) -> RunResult:
    _use_jemalloc()
    with output_lock(Path(cfg.output)):
        return await _locked_run(cfg, log=log)


async def _locked_run(cfg: RunConfig, *, log: TextIO) -> RunResult:
    source = open_input(cfg.input, cfg.input_format)
    mapper = cfg.row_mapper(source.columns, source.format)  # the model is set after discovery
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
    api_key = cfg.resolve_api_key()
    def warn(text: str) -> None:
        print(f"batchgen: warning: {text}", file=log)

    with serving_all(cfg.endpoint_specs()) as specs:
        # The progress display takes over `on_event` once it runs.
        servers = cfg.client_pool(specs, api_key, concurrency=cfg.pool_concurrency(),
                                  on_event=lambda text: print(f"batchgen: {text}", file=log))  # fmt: skip
        async with servers:
            try:
                mapper.model, context = await check_endpoints(servers, cfg.model, skip_bad=cfg.skip_bad_endpoints, warn=warn)
            except ServerUnusableError as exc:
                return RunResult(EXIT_FATAL, RunStats(), cfg.output, str(exc))
            length_check = await length_check_for(cfg.check_length, servers, mapper.model, context, warn=warn)
            return await _execute(cfg, servers, source, mapper, log, length_check)


def run(cfg: RunConfig, *, log: TextIO | None = None) -> RunResult:
    """Run a `batchgen run` job from Python and return its `RunResult` (exit code, stats, message).

    With `cfg.engine == "ray"` the job runs on Ray (`batchgen.ray_engine`): same rows, same
    columns plus `input_index`, written as a directory of Parquet files.

    Raises:
        ConfigError / InputError: before anything is sent.
    """
    if cfg.engine == "ray":
        from batchgen.ray_engine import run_on_ray

        return run_on_ray(cfg, log=log or sys.stderr)
    return asyncio.run(run_async(cfg, log=log))

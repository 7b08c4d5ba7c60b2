"""`ChunkRunner`: batchgen's own request engine inside a Ray actor.

Ray Data creates one per actor and calls it with blocks to do (`Dataset.map_batches`); up to
`CALLS_PER_ACTOR` calls run at once on the actor's one event loop, so they share its
`ClientPool` (one aiohttp session, one connection pool per server) and its `WorkerPool`, whose
workers are the actor's share of the job's concurrency. Each call reads its block chunk by
chunk (`batchgen.io.blocks`), sends the rows, and writes each chunk's part file as soon as its
last row is done: the same request bodies, retries, error rows and answer columns as a local
run, because they are the same code.

Nothing here imports Ray: the actor is a plain class, and the driver hands Ray a handle to its
progress board.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batchgen.client_pool import ClientPool
from batchgen.config import RunConfig
from batchgen.control import RunControl, StopCause
from batchgen.endpoints import EndpointSpec
from batchgen.feed import row_item
from batchgen.io.blocks import Block, Chunk, InputShape, chunk_sizes, read_chunks
from batchgen.io.parts import storable_table
from batchgen.io.schema import INDEX_COLUMN, OutputLayout, state_schema
from batchgen.progress import RunStats
from batchgen.ray_engine.output import INPUT_INDEX, OutputDir
from batchgen.lengthcheck import LengthCheck
from batchgen.records import ERROR_COLUMN, Outcome, ResultRecord, RowProblem, RowRequest, outcome_record, problem_record, read_answer
from batchgen.watch import LostServerWatch
from batchgen.worker import WorkerPool

__all__ = ["CALLS_PER_ACTOR", "SUMMARY_SCHEMA", "ChunkRunner", "Job", "Secret", "share"]

CALLS_PER_ACTOR = 2  # blocks an actor works on at once: one can finish its tail while the next starts
REPORT_EVERY_S = 0.5
# One row per chunk written: the driver's exact counts (the progress board's may lag behind). A row
# with `stopped` set instead says the pool gave up: every server stopped answering.
SUMMARY_SCHEMA = pa.schema(
    [*((name, pa.int64()) for name in ("start", "rows", "errors", "input_tokens", "output_tokens")), ("stopped", pa.string())]
)


class _ServersLost(Exception):
    """The pool gave up on every server: the block's unfinished chunks are not written."""


class Secret:
    """The API key on its way to the actors: pickled with them, never shown by `repr` or a log."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"


@dataclass(frozen=True, slots=True)
class Job:
    """Everything an actor needs, built once by the driver and pickled into each actor."""

    cfg: RunConfig
    shape: InputShape
    layout: OutputLayout
    output: OutputDir
    specs: tuple[EndpointSpec, ...]  # with real URLs (a mock the driver started is reachable on this machine)
    model: str
    api_key: Secret | None
    actors: int
    limit: int | None = None
    context: int | None = None  # the servers' max_model_len, when the length check applies
    exact_length: bool = False  # count prompts with the first server's /tokenize
    board: Any = None  # the driver's progress board (a Ray actor handle); None in tests without Ray


def _failed_rows(chunk: Chunk, earlier: pa.Table) -> Chunk:
    """The rows of `chunk` that ended as errors in its earlier part."""
    failed = set(earlier.filter(pc.is_valid(earlier.column(ERROR_COLUMN))).column(INPUT_INDEX).to_pylist())
    keep = [i for i, row in enumerate(chunk.rows) if row.index in failed]
    return Chunk(chunk.start, [chunk.rows[i] for i in keep], chunk.passthrough.take(keep))


def _merged(earlier: pa.Table, again: pa.Table) -> pa.Table:
    """The earlier part with the rows sent again in place of their error rows, in input order."""
    replaced = pc.is_in(earlier.column(INPUT_INDEX), value_set=again.column(INPUT_INDEX))
    kept = earlier.filter(pc.invert(replaced)).cast(again.schema)
    return pa.concat_tables([kept, again]).sort_by(INPUT_INDEX)


def share(total: int, rank: int, parts: int) -> int:
    """Actor `rank`'s share of `total` requests in flight, split as evenly as whole numbers allow (at least 1)."""
    return max(1, total // parts + (1 if rank % parts < total % parts else 0))


@dataclass(slots=True)
class _Pending:
    """A chunk whose rows are on their way: its records, and a signal when the last one is in.

    `earlier`: with `--retry-failed`, the chunk's part as it was; the rows sent again replace its
    error rows, the rest is kept as it is.
    """

    chunk: Chunk
    left: int
    earlier: pa.Table | None = None
    records: list[ResultRecord] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if self.left == 0:
            self.done.set()

    def add(self, record: ResultRecord) -> None:
        self.records.append(record)
        self.left -= 1
        if self.left == 0:
            self.done.set()


class ChunkRunner:
    """The callable class Ray Data runs in each actor (`map_batches(ChunkRunner, fn_constructor_kwargs={"job": job})`).

    Input batches have the columns of `Block` plus `skip` (chunk starts already written); the
    output is one row per chunk written (`SUMMARY_SCHEMA`). A block is never half-written: a
    chunk's part appears whole once all of its rows are done.

    When every server stopped answering (the pool gave up, as in a local run), the summary says so
    in `stopped` and the block's unfinished chunks stay unwritten.

    Raises (failing the Ray job, which the driver reports):
        InputError / OutputError: the input changed since the plan, or a part could not be written.
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        self.stats = RunStats()
        self._starting: asyncio.Lock | None = None
        self._servers: ClientPool | None = None
        self._pool: WorkerPool | None = None
        self._control = RunControl()
        self._watch = LostServerWatch(self._control)
        self._waiting: dict[int, _Pending] = {}
        self._length_check: LengthCheck | None = None  # input index → the chunk it belongs to
        self._rank = 0
        self._tasks: list[asyncio.Task[None]] = []
        cfg = job.cfg
        self._mapper = cfg.row_mapper(job.shape.columns, job.shape.format)
        self._mapper.model = job.model
        self._columns = self._mapper.columns_used
        self._state_schema = state_schema(job.layout.results_schema)
        self._schema = job.layout.schema.append(pa.field(INPUT_INDEX, pa.int64(), nullable=False))

    async def __call__(self, batch: pa.Table) -> pa.Table:
        await self._start()
        summaries: list[dict[str, Any]] = []
        for task in batch.to_pylist():
            skip = frozenset(task.pop("skip") or ())
            retry = frozenset(task.pop("retry", None) or ())
            task["row_groups"] = tuple(task["row_groups"] or ())
            block = Block(**task)
            # Ray retries a block whose actor died: the chunks that actor wrote are not sent again.
            skip |= await asyncio.to_thread(self._written, block, skip | retry)
            try:
                summaries.extend(await self._run_block(block, skip, retry))
            except _ServersLost as lost:
                # An answer, not an exception: Ray would wrap it, and the driver must tell it apart.
                summaries.append({"stopped": str(lost)})
                break
        return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)

    async def aclose(self) -> None:
        """Stop the workers and close the connections (Ray ends an actor with its process; tests call this)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._servers is not None:
            await self._servers.aclose()

    def _written(self, block: Block, skip: frozenset[int]) -> frozenset[int]:
        sizes = chunk_sizes(block, self.job.cfg.ray_block_rows, self.job.limit)
        return frozenset(start for start, rows in sizes if start not in skip and self.job.output.written(start, rows))

    async def _start(self) -> None:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._servers is not None:
                return
            job, cfg = self.job, self.job.cfg
            if job.board is not None:
                self._rank = await job.board.join.remote(os.getpid())
            total = int(cfg.concurrency)
            specs = [dataclasses.replace(spec, concurrency=share(int(spec.concurrency or total), self._rank, job.actors))
                     for spec in job.specs]  # fmt: skip
            api_key = job.api_key.value if job.api_key is not None else None
            # The job's quotas are shared evenly, as its concurrency is.
            quotas = {name: value / job.actors for name in ("max_requests_per_minute", "max_tokens_per_minute")
                      if (value := getattr(cfg, name)) is not None}  # fmt: skip
            mine = dataclasses.replace(cfg, **quotas) if quotas else cfg
            servers = mine.client_pool(specs, api_key, concurrency=share(total, self._rank, job.actors), on_event=self._note)
            servers.on_lost = lambda message: self._control.drain(StopCause.LOST_SERVER, message)
            self._control.on_drain(self._wake_all)
            servers.start()
            self._pool = WorkerPool(lambda request: servers.exchange(request.body, read_answer), servers.capacity,
                                    on_outcome=self._on_outcome, control=self._control)  # fmt: skip
            self._servers = servers
            if job.context is not None:  # as the driver found it; the tokenizer is this actor's own client
                tokenize = servers.endpoints[0].client.tokenize if job.exact_length else None
                self._length_check = LengthCheck(job.context, tokenize=tokenize, model=job.model)
            self._tasks = [asyncio.create_task(self._pool.run()), asyncio.create_task(self._report_forever())]

    def _note(self, text: str) -> None:
        if self.job.board is not None:
            self.job.board.note.remote(f"actor {self._rank}: {text}")

    def _on_outcome(self, outcome: Outcome) -> None:
        record = outcome_record(outcome, keep_raw=self.job.cfg.keep_raw)
        # As in a local run: a failure for want of a server stays unwritten until the run goes on
        # (then it was a real failure) or the pool gives up (then the chunk is never written).
        if self._watch.hold(outcome, record):
            if self._idle():
                self._release()  # nothing left in flight could end the streak: it was real
            return
        self._release()
        self._add(record)

    def _add(self, record: ResultRecord) -> None:
        self.stats.add(record)
        self._waiting.pop(record["_index"]).add(record)

    def _release(self) -> None:
        for held in self._watch.release():
            self._add(held)

    def _idle(self) -> bool:
        pool = self._pool
        return pool is not None and pool.in_flight == 0 and pool.queued == 0

    def _wake_all(self) -> None:
        for pending in self._waiting.values():
            pending.done.set()

    async def _run_block(self, block: Block, skip: frozenset[int], retry: frozenset[int] = frozenset()) -> list[dict[str, int]]:
        assert self._pool is not None
        pool, limit = self._pool, self.job.limit
        chunks: Iterator[Chunk] = read_chunks(self.job.shape, block, self.job.cfg.ray_block_rows,
                                              columns=self._columns, skip=skip)  # fmt: skip
        writes: list[asyncio.Task[dict[str, int]]] = []
        try:
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                if limit is not None and chunk.start >= limit:
                    break
                if limit is not None and chunk.start + len(chunk.rows) > limit:
                    keep = limit - chunk.start
                    chunk = Chunk(chunk.start, chunk.rows[:keep], chunk.passthrough.slice(0, keep))
                earlier = None
                if chunk.start in retry:  # only its error rows go again
                    earlier = await asyncio.to_thread(self.job.output.read, chunk.start)
                    chunk = _failed_rows(chunk, earlier)
                pending = _Pending(chunk, len(chunk.rows), earlier)
                items = [row_item(self._mapper, row) for row in chunk.rows]
                if self._length_check is not None:
                    check = self._length_check
                    await check.prepare(item for item in items if isinstance(item, RowRequest))
                    items = [check.problem(item) or item if isinstance(item, RowRequest) else item for item in items]
                for item in items:
                    self._check_lost()
                    if isinstance(item, RowProblem):
                        record = problem_record(item)
                        self.stats.add(record)
                        pending.add(record)
                        continue
                    self._waiting[item.index] = pending
                    if not pool.try_submit(item):
                        await pool.submit(item)
                if self._idle():
                    self._release()
                writes.append(asyncio.create_task(self._finish(pending)))
            summaries = [await write for write in writes]
            self.report()  # the board hears of the block's last rows before the driver hears it is done
            return summaries
        finally:
            for write in writes:
                write.cancel()

    async def _finish(self, pending: _Pending) -> dict[str, int]:
        """Wait for the chunk's last row, then write its part."""
        await pending.done.wait()
        self._check_lost()
        table = await asyncio.to_thread(self._table, pending)
        whole = table if pending.earlier is None else _merged(pending.earlier, table)
        await asyncio.to_thread(self.job.output.write, pending.chunk.start, whole)
        figures = RunStats()
        for record in pending.records:
            figures.add(record)
        return {"start": pending.chunk.start, "rows": table.num_rows, "errors": figures.failed,
                "input_tokens": figures.input_tokens, "output_tokens": figures.output_tokens}  # fmt: skip

    def _check_lost(self) -> None:
        if self._control.cause is StopCause.LOST_SERVER:
            raise _ServersLost(self._control.message or "every server stopped answering")

    def _table(self, pending: _Pending) -> pa.Table:
        """The chunk's output rows: result columns beside its input columns, in output-schema order."""
        results = storable_table(self._state_schema, sorted(pending.records, key=lambda r: r["_index"]))
        layout = self.job.layout
        inputs = pending.chunk.passthrough.select(layout.passthrough_names).rename_columns(layout.output_names)
        arrays = [results.column(f.name) if f.name in results.column_names else inputs.column(f.name) for f in layout.schema]
        arrays.append(results.column(INDEX_COLUMN))
        return pa.Table.from_arrays(arrays, schema=self._schema)

    async def _report_forever(self) -> None:
        """Tell the driver's progress board how far this actor is, every `REPORT_EVERY_S`."""
        while True:
            self.report()
            await asyncio.sleep(REPORT_EVERY_S)

    def report(self) -> None:
        board, servers = self.job.board, self._servers
        if board is None or servers is None:
            return
        stats = self.stats
        board.add.remote(self._rank, {
            "ok": stats.ok, "failed": stats.failed, "errors": dict(stats.errors), "input_tokens": stats.input_tokens,
            "output_tokens": stats.output_tokens, "retries": servers.retries_total, "in_flight": servers.in_flight,
        })  # fmt: skip

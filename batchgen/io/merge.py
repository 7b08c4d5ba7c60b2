"""The final merge: part files (+ an earlier output) + the input's own columns → the output file.

The output is Parquet, JSON lines (one object of every column per row) or OpenAI batch lines
(`batchgen.io.batch_output`, which need no input columns).

Parts hold only `_index`, `id` and the result columns, in completion order. `finalize` walks the
input order in windows: for each index range it takes the newest result per index from the parts
(the row groups of each part are sorted and carry `_index` statistics, so a filtered scan skips
the rest), takes the same rows' passthrough columns straight from the input in Arrow (never as
Python objects), and appends the joined window to `<output>.tmp`, renamed when complete.

The next window is read and joined in a thread while this one is written. Memory is about two
windows of rows (~9 MB of Arrow data each for 8192 rows of chat prompts), plus the
Parquet writer's footer, which keeps ~40 KB per written row group (~5 MB per million rows) until
the file is closed. Parquet page buffers come from Arrow's C++ default pool, not from the pool
`pa.set_memory_pool` chose, so reads are buffered (`READ_BUFFER_BYTES`) and dictionaries small
(`DICTIONARY_PAGE_BYTES`). The figures behind these choices are in benchmarks/README.md.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchgen.errors import OutputError
from batchgen.io.batch_output import OPENAI_BATCH, batch_lines, is_batch_output, read_batch_output
from batchgen.io.jsonl import count_lines
from batchgen.io.parts import DICTIONARY_PAGE_BYTES, PartFile, atomic_file, list_parts
from batchgen.io.parts import output_format as suffix_format
from batchgen.io.readers import READ_BUFFER_BYTES
from batchgen.io.schema import INDEX_COLUMN, state_schema
from batchgen.records import ERROR_COLUMN

__all__ = ["MergeResult", "finalize"]

DEFAULT_WINDOW = 8192  # rows per merge window; ~8k keeps the merge's peak memory small
T = TypeVar("T")
_RANK = "_rank"  # merge-only column: which part a row came from (-1 = previous output)


@dataclass(frozen=True, slots=True)
class MergeResult:
    rows: int
    errors: int


class _RowStream:
    """Consecutive row ranges of a stream of tables, read once, front to back."""

    def __init__(self, chunks: Iterator[pa.Table], schema: pa.Schema) -> None:
        self._chunks = chunks
        self._buffer = schema.empty_table()

    def take(self, n: int) -> pa.Table:
        """The next `n` rows, or fewer once the stream is exhausted."""
        pieces, have = [self._buffer], self._buffer.num_rows
        while have < n and (chunk := next(self._chunks, None)) is not None:
            pieces.append(chunk)
            have += chunk.num_rows
        table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
        self._buffer = table.slice(n)
        return table.slice(0, n)


def finalize(
    state_dir: Path,
    out_path: Path,
    schema: pa.Schema,
    *,
    passthrough: Iterator[pa.Table] | None = None,
    passthrough_schema: pa.Schema | None = None,
    previous_output: Path | None = None,
    window: int = DEFAULT_WINDOW,
    expected_rows: int | None = None,
    output_format: str | None = None,
) -> MergeResult:
    """Merge the parts (and a previous output) with the input's columns into `out_path`, in input order.

    For an index written more than once, the row from the newest generation (then the highest
    seq) wins; previous-output rows lose to any part. The output is written to `<out_path>.tmp`
    and renamed, so `out_path` is either the old file or the complete new one.

    Args:
        state_dir: the state directory with the part files; removing it afterwards is the caller's job.
        out_path: the final file; `.parquet`, or `.jsonl` / `.ndjson` (one JSON object per line).
        schema: the full output schema (`output_schema(...)[0]`).
        passthrough: tables of the input's passthrough columns, in input order from row 0, named
            and typed as in `passthrough_schema`; None when there are none.
        passthrough_schema: the passthrough columns as they appear in `schema`.
        previous_output: an earlier run's final output (row position = index); its result columns
            are merged under the parts.
        window: rows per merge window.
        expected_rows: the input's exact row count, if known; then a missing last row or an
            index past the end is an error too.
        output_format: "parquet", "jsonl" or "openai-batch" (`batch_output.effective_output_format`);
            None: from `out_path`'s suffix. OpenAI batch lines carry no input columns, so the input
            is not read then.

    Returns:
        The number of rows written and how many of them are error rows.

    Raises:
        OutputError: an input index without a result (which would shift every later row), an
            unreadable part, or a failed write.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    through = passthrough_schema if passthrough_schema is not None else pa.schema([])
    results = pa.schema([f for f in schema if f.name not in through.names and f.name != INDEX_COLUMN])
    state = state_schema(results)
    fmt = suffix_format(out_path) if output_format is None else output_format
    parts = _open_parts(list_parts(state_dir))
    previous, previous_rows = _previous_rows(previous_output, results, window) if previous_output else (None, 0)
    inputs = _RowStream(passthrough, through) if passthrough is not None and fmt != OPENAI_BATCH else None
    end = max([previous_rows, *(part.hi + 1 for part in parts)])
    if expected_rows is not None:
        if end > expected_rows:
            raise OutputError(f"{state_dir}: results exist for row {end - 1}, but the input has {expected_rows} rows")
        end = expected_rows
    errors = 0
    with atomic_file(out_path, "output") as file:
        parquet = (
            pq.ParquetWriter(file, schema, dictionary_pagesize_limit=DICTIONARY_PAGE_BYTES) if fmt == "parquet" else None
        )

        def merged(first: int) -> tuple[int, pa.Table]:
            table = _merge_window(parts, previous, first, min(first + window, end), state)
            return first, table if fmt == OPENAI_BATCH else _join(table, inputs, schema, first)

        with parquet if parquet is not None else contextlib.nullcontext():
            for start, table in _one_ahead(merged(first) for first in range(0, end, window)):
                errors += table.num_rows - table.column(ERROR_COLUMN).null_count
                if parquet is not None:
                    parquet.write_table(table)
                elif fmt == OPENAI_BATCH:
                    file.writelines(batch_lines(table, start))
                else:
                    file.writelines(_json_lines(table))
                del table  # drop the window before the next one is built
    return MergeResult(rows=end, errors=errors)


def _join(merged: pa.Table, inputs: _RowStream | None, schema: pa.Schema, start: int) -> pa.Table:
    """The window's result columns beside the same rows' input columns, in output-schema order."""
    if inputs is None:
        return merged.select(schema.names).cast(schema) if merged.schema != schema else merged
    columns = inputs.take(merged.num_rows)
    if columns.num_rows != merged.num_rows:
        raise OutputError(
            f"the input has fewer rows than the results (row {start + columns.num_rows} is missing); "
            "was the input file changed during the run?"
        )
    arrays = [merged.column(f.name) if f.name in merged.column_names else columns.column(f.name) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


@dataclass(frozen=True, slots=True)
class _Part:
    """A part opened for merging: its path, rank among parts, and each row group's `_index` range."""

    path: Path
    rank: int
    groups: tuple[tuple[int, int], ...]  # (lowest, highest) `_index` per row group

    @property
    def lo(self) -> int:
        return min(lo for lo, _ in self.groups)

    @property
    def hi(self) -> int:
        return max(hi for _, hi in self.groups)


def _open_parts(parts: list[PartFile]) -> list[_Part]:
    """Read each part's footer once: the `_index` range of every row group (parts are sorted by `_index`)."""
    opened: list[_Part] = []
    for rank, part in enumerate(parts):
        try:
            meta = pq.read_metadata(part.path)
            groups = [_index_range(part.path, meta, g) for g in range(meta.num_row_groups)]
        except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
            raise OutputError(f"{part.path}: unreadable part file ({exc})") from exc
        groups = [g for g in groups if g[0] is not None]
        if groups:
            opened.append(_Part(part.path, rank, tuple(groups)))
    return opened


def _index_range(path: Path, meta: pq.FileMetaData, group: int) -> tuple[Any, Any]:
    """The lowest and highest `_index` of one row group, from its statistics when it has them."""
    chunks = meta.row_group(group)
    # Found by path, not through `meta.schema`: that and `meta` refer to each other, which kept
    # every footer read (~160 KB for a part) alive until a cyclic collection, and the run's lean
    # GC makes those rare: +18 MB of heap for the 115 parts of a 1M-row run.
    column = [chunks.column(i).path_in_schema for i in range(chunks.num_columns)].index(INDEX_COLUMN)
    stats = chunks.column(column).statistics
    if stats is not None and stats.has_min_max:
        return stats.min, stats.max
    # Not written by PartWriter: read the column.
    with pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES) as reader:
        values = reader.read_row_group(group, columns=[INDEX_COLUMN]).column(0)
    return pc.min(values).as_py(), pc.max(values).as_py()


def _read_range(part: _Part, start: int, stop: int, state: pa.Schema) -> pa.Table:
    """The rows of `part` with `start <= _index < stop`, reading only the row groups that can hold them.

    Plain single-threaded row-group reads: the dataset scanner's thread pools and read-ahead
    cost more memory than a few row groups are worth.
    """
    wanted = [g for g, (lo, hi) in enumerate(part.groups) if hi >= start and lo < stop]
    try:
        with pq.ParquetFile(part.path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES) as reader:
            table = reader.read_row_groups(wanted, use_threads=False)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{part.path}: unreadable part file ({exc})") from exc
    index = table.column(INDEX_COLUMN)
    table = table.filter(pc.and_(pc.greater_equal(index, start), pc.less(index, stop)))
    return table if table.schema.equals(state) else conform(table, state)


def conform(table: pa.Table, state: pa.Schema) -> pa.Table:
    """`table` in `state`'s columns and types. Columns that an older batchgen did not write yet
    (`stop_reason`, `logprobs`, ...) come back null, so a job started before an upgrade resumes."""
    columns = [
        table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in state
    ]
    try:
        return pa.Table.from_arrays(columns, names=state.names).cast(state)
    except (pa.ArrowException, ValueError) as exc:
        raise OutputError(f"earlier results do not match this run's output columns ({exc}); rerun with --overwrite") from exc


def _merge_window(parts: list[_Part], previous: _RowStream | None, start: int, stop: int, state: pa.Schema) -> pa.Table:
    """Rows `[start, stop)`, one per index in order, newest write winning; `state` columns."""
    pieces: list[pa.Table] = []
    if previous is not None:
        table = previous.take(stop - start)
        indexes = pa.array(range(start, start + table.num_rows), pa.int64())
        table = table.add_column(0, state.field(INDEX_COLUMN), indexes)
        pieces.append(table.append_column(_RANK, pa.repeat(pa.scalar(-1, pa.int32()), table.num_rows)))
    for part in parts:
        if part.hi < start or part.lo >= stop:
            continue
        table = _read_range(part, start, stop, state)
        pieces.append(table.append_column(_RANK, pa.repeat(pa.scalar(part.rank, pa.int32()), table.num_rows)))
    if not pieces:
        raise OutputError(f"no result for input row {start}; the run has not finished every row")
    merged = pa.concat_tables(pieces).sort_by([(INDEX_COLUMN, "ascending"), (_RANK, "descending")])
    indexes = merged.column(INDEX_COLUMN).combine_chunks()
    if len(indexes) > 1:
        # After the sort, the first row of each run of equal indexes is the newest write.
        first = pc.not_equal(indexes.slice(1), indexes.slice(0, len(indexes) - 1))
        if not pc.all(first).as_py():  # copy the window only when an index was written twice
            merged = merged.filter(pa.concat_arrays([pa.array([True]), first]))
    if merged.num_rows != stop - start:
        present = set(merged.column(INDEX_COLUMN).to_pylist())
        missing = next(i for i in range(start, stop) if i not in present)
        raise OutputError(f"no result for input row {missing}; the run has not finished every row")
    return merged.drop_columns([_RANK, INDEX_COLUMN])


def _one_ahead(items: Iterator[T]) -> Iterator[T]:
    """`items`, each next one built in a thread while the caller handles this one.

    Reading and joining window N+1 overlaps writing window N (Arrow and Parquet release the GIL):
    measured ~0.3 s of 0.85 s saved at 200k rows, for one more window held in memory (~9 MB).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="batchgen-merge") as pool:
        ahead = pool.submit(next, items, None)
        while (item := ahead.result()) is not None:
            ahead = pool.submit(next, items, None)
            yield item


def _previous_rows(path: Path, results: pa.Schema, chunk: int) -> tuple[_RowStream, int]:
    """A row stream over the result columns of an earlier final output, and its row count.

    Its format is read from the file (an openai-batch output is told by its lines), not from this
    run's settings: a job whose output format changed between runs still merges its earlier rows.
    """
    if not path.is_file():
        raise OutputError(f"{path}: previous output not found")
    if suffix_format(path) == "jsonl" and is_batch_output(path):
        return _RowStream(_converted(path, read_batch_output(path, results, chunk)), results), count_lines(path)
    if suffix_format(path) == "jsonl":
        rows = count_lines(path)

        def jsonl_chunks() -> Iterator[pa.Table]:
            with open(path, "rb") as file:
                batch: list[dict[str, Any]] = []
                for line in file:
                    batch.append(orjson.loads(line))
                    if len(batch) >= chunk:
                        yield pa.Table.from_pylist(batch, schema=results)
                        batch = []
                yield pa.Table.from_pylist(batch, schema=results)

        return _RowStream(_converted(path, jsonl_chunks()), results), rows
    try:
        rows = pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{path}: unreadable previous output ({exc})") from exc

    def parquet_chunks() -> Iterator[pa.Table]:
        with pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES) as reader:
            stored = set(reader.schema_arrow.names)
            for batch in reader.iter_batches(batch_size=chunk, columns=[n for n in results.names if n in stored]):
                table = pa.Table.from_batches([batch])
                yield table if table.schema.equals(results) else conform(table, results)

    return _RowStream(_converted(path, parquet_chunks()), results), rows


def _converted(path: Path, chunks: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """Re-raise conversion errors of a previous output as OutputError naming it."""
    try:
        yield from chunks
    except (OSError, ValueError, TypeError, pa.ArrowException, orjson.JSONDecodeError) as exc:
        raise OutputError(f"{path}: the previous output does not match this run's output schema ({exc})") from exc


def _json_default(value: Any) -> Any:
    # orjson covers JSON types, datetimes and dates; Parquet passthrough columns may add bytes or decimals.
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _json_lines(table: pa.Table) -> Iterator[bytes]:
    for row in table.to_pylist():
        yield orjson.dumps(row, default=_json_default, option=orjson.OPT_APPEND_NEWLINE)

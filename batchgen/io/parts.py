"""Crash-safe part files in `<output>.batchgen/`, the checkpoint they form, and the final merge.

Results arrive in completion order. `PartWriter` writes each flush as its own Parquet part,
`part-<generation>-<seq>.parquet`, through a `.tmp` file, fsync and rename, so a crash leaves
only whole parts (and `.tmp` debris that `scan_checkpoint` deletes). Each resumed run gets a
new generation; when an input row was written more than once, the newest generation (then the
highest seq) wins, both in `scan_checkpoint` and in `finalize`, which writes the final file in
input order with exactly one row per input row.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow.fs import LocalFileSystem

from batchgen.errors import OutputError
from batchgen.io.jsonl import count_lines
from batchgen.io.schema import INDEX_COLUMN, state_schema

__all__ = [
    "FAILED",
    "NOT_DONE",
    "ROW_GROUP_ROWS",
    "SUCCEEDED",
    "Checkpoint",
    "PartFile",
    "PartWriter",
    "finalize",
    "list_parts",
    "output_format",
    "scan_checkpoint",
]

ROW_GROUP_ROWS = 4096  # small row groups keep `_index` statistics tight, so the merge skips more
_PART_NAME = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
_ARROW_ERRORS = (pa.ArrowException, OverflowError)
_RANK = "_rank"  # merge-only column: which part a row came from (-1 = previous output)
NOT_DONE, SUCCEEDED, FAILED = 0, 1, 2  # the values of `Checkpoint.status`


@dataclass(frozen=True, slots=True, order=True)
class PartFile:
    """A finished part file; instances sort oldest first (generation, then seq)."""

    generation: int
    seq: int
    path: Path


def list_parts(state_dir: Path) -> list[PartFile]:
    """The finished part files in `state_dir`, oldest first (`.tmp` files are not parts); [] if it is missing."""
    if not state_dir.is_dir():
        return []
    found = ((_PART_NAME.match(p.name), p) for p in state_dir.iterdir())
    return sorted(PartFile(int(m[1]), int(m[2]), p) for m, p in found if m)


def output_format(path: Path) -> str:
    """"parquet" or "jsonl" from the output path's suffix; call it early to fail before the run, not after.

    Raises:
        OutputError: the suffix is not `.parquet`, `.jsonl` or `.ndjson`.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise OutputError(f"{path}: unsupported output suffix {suffix!r}; use .parquet, .jsonl or .ndjson")


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable. Some platforms cannot open a directory; the rename is still atomic there.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class PartWriter:
    """Writes batches of result records as part files of one generation.

    `write` blocks on disk I/O and is not thread-safe: call it from the single writer task,
    through `asyncio.to_thread`, one call at a time.

    Args:
        state_dir: the state directory; created if missing.
        schema: the part schema, `state_schema(output_schema)`, with its leading `_index`.
        generation: this run's generation, `scan_checkpoint(...).next_generation`.

    Example:
        writer = PartWriter(state_dir, state_schema(schema), checkpoint.next_generation)
        writer.write([{"_index": 7, "id": "a", "content": "hi", ...}])
    """

    def __init__(self, state_dir: Path, schema: pa.Schema, generation: int) -> None:
        if INDEX_COLUMN not in schema.names:
            raise OutputError(f"a part schema needs an {INDEX_COLUMN!r} column; build it with state_schema()")
        self.state_dir = state_dir
        self.schema = schema
        self.generation = generation
        self._names = frozenset(schema.names)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{state_dir}: cannot create the state directory ({exc})") from exc
        # Continue after parts this generation already has, never overwrite one.
        self._seq = 1 + max((p.seq for p in list_parts(state_dir) if p.generation == generation), default=-1)

    def write(self, records: list[dict[str, Any]]) -> Path | None:
        """Write `records` as one new part file, atomically; returns its path, or None if `records` is empty.

        Records are sorted by `_index` (tightening row-group statistics); keys missing from a
        record are null.

        Raises:
            OutputError: a record without an integer `_index` or with a key not in the schema,
                a value that does not convert (naming the column), or a failed write.
        """
        if not records:
            return None
        for record in records:
            if not isinstance(record.get(INDEX_COLUMN), int):
                raise OutputError(f"a result record has no integer {INDEX_COLUMN!r}: {sorted(record)}")
            if not self._names.issuperset(record):
                unknown = sorted(set(record) - self._names)
                raise OutputError(f"row {record[INDEX_COLUMN]}: columns not in the output schema: {unknown}")
        table = self._to_table(sorted(records, key=lambda r: r[INDEX_COLUMN]))
        final = self.state_dir / f"part-{self.generation:04d}-{self._seq:06d}.parquet"
        tmp = final.with_name(final.name + ".tmp")
        try:
            with open(tmp, "wb") as file:
                pq.write_table(table, file, row_group_size=ROW_GROUP_ROWS, write_statistics=True)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, final)
        except (OSError, pa.ArrowException) as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"{final}: cannot write the part file ({exc})") from exc
        _fsync_dir(self.state_dir)
        self._seq += 1
        return final

    def _to_table(self, records: list[dict[str, Any]]) -> pa.Table:
        try:
            return pa.Table.from_pylist(records, schema=self.schema)
        except _ARROW_ERRORS as exc:
            # Arrow's message names the value, not the column: find the column ourselves.
            for field in self.schema:
                try:
                    pa.array([r.get(field.name) for r in records], type=field.type)
                except _ARROW_ERRORS as column_exc:
                    raise OutputError(f"column {field.name!r} ({field.type}): {column_exc}") from exc
            raise OutputError(f"cannot convert result records: {exc}") from exc


@dataclass(slots=True)
class Checkpoint:
    """What earlier runs left on disk.

    Attributes:
        status: per input index, 0 = not done, 1 = succeeded, 2 = failed (an error row). At least
            `total_rows_hint` long; longer if the parts hold higher indexes.
        next_generation: the generation the next `PartWriter` should use.
        rows_on_disk: the number of distinct indexes with a result.
        failed: how many of those are error rows.
    """

    status: bytearray
    next_generation: int
    rows_on_disk: int
    failed: int


def scan_checkpoint(state_dir: Path, total_rows_hint: int | None, previous_output: Path | None = None) -> Checkpoint:
    """Read which input rows already have results; deletes `.tmp` leftovers of a crashed run.

    Reads only the `_index` and `error` columns of the parts. The previous output counts as
    the oldest generation, so any part overrides it; among parts, later generations (then
    higher seqs) override earlier ones.

    Args:
        state_dir: the state directory (may not exist yet).
        total_rows_hint: the input's row count if known; sizes `status` up front.
        previous_output: the final output (`.parquet` or `.jsonl`, no `_index`: row position is
            the input index) of an earlier completed run.

    Raises:
        OutputError: an unreadable part or previous output, naming the file.
    """
    status = bytearray(total_rows_hint or 0)

    def mark(indexes: list[int], errors: list[Any]) -> None:
        if indexes and max(indexes) >= len(status):
            status.extend(bytes(max(indexes) + 1 - len(status)))
        for index, error in zip(indexes, errors, strict=True):
            status[index] = SUCCEEDED if error is None else FAILED

    if previous_output is not None:
        offset = 0
        for errors in _previous_errors(previous_output):
            mark(list(range(offset, offset + len(errors))), errors)
            offset += len(errors)
    if state_dir.is_dir():
        for leftover in state_dir.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
    parts = list_parts(state_dir)
    for part in parts:
        try:
            with pq.ParquetFile(part.path) as reader:
                for batch in reader.iter_batches(batch_size=65_536, columns=[INDEX_COLUMN, "error"]):
                    mark(batch.column(0).to_pylist(), batch.column(1).to_pylist())
        except (OSError, pa.ArrowException, KeyError, IndexError) as exc:
            raise OutputError(f"{part.path}: unreadable part file ({exc})") from exc
    return Checkpoint(
        status=status,
        next_generation=parts[-1].generation + 1 if parts else 0,
        rows_on_disk=len(status) - status.count(NOT_DONE),
        failed=status.count(FAILED),
    )


def finalize(
    state_dir: Path,
    out_path: Path,
    schema: pa.Schema,
    *,
    previous_output: Path | None = None,
    window: int = 65_536,
    expected_rows: int | None = None,
) -> int:
    """Merge the parts (and a previous output) into `out_path`, in input order, one row per index.

    For an index written more than once, the row from the newest generation (then the highest
    seq) wins; previous-output rows lose to any part. The output is written to `<out_path>.tmp`
    and renamed, so `out_path` is either the old file or the complete new one.

    Memory stays bounded by about `window` rows whatever the input size: the merge walks index
    ranges `[a, a + window)`; for each it reads, through `pyarrow.dataset` with a filter on
    `_index`, only the row groups whose `_index` statistics overlap the range (parts are sorted
    and have row groups of at most 4096 rows), plus the matching slice of the previous output,
    which is read once, front to back. One window holds at most `window` rows per time an
    index was written, and the parts are never loaded whole.

    Args:
        state_dir: the state directory with the part files; removing it afterwards is the caller's job.
        out_path: the final file; `.parquet`, or `.jsonl` / `.ndjson` (one JSON object per line).
        schema: the output schema (`output_schema(...)[0]`); an `_index` column in it is ignored.
        previous_output: an earlier run's final output to merge under the parts (row position = index).
        window: rows per merge window.
        expected_rows: the input's exact row count, if known; then a missing last row or an
            index past the end is an error too.

    Returns:
        The number of rows written.

    Raises:
        OutputError: an input index without a result (which would shift every later row), an
            unreadable part, or a failed write.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if INDEX_COLUMN in schema.names:
        schema = schema.remove(schema.get_field_index(INDEX_COLUMN))
    state = state_schema(schema)
    fmt = output_format(out_path)
    fragments = _open_fragments(list_parts(state_dir), state)
    previous, previous_rows = _previous_rows(previous_output, schema, window) if previous_output else (None, 0)
    end = max([previous_rows, *(hi + 1 for *_, hi in fragments)])
    if expected_rows is not None:
        if end > expected_rows:
            raise OutputError(f"{state_dir}: results exist for row {end - 1}, but the input has {expected_rows} rows")
        end = expected_rows
    windows = (
        _merge_window(fragments, previous, start, min(start + window, end), state).drop_columns([INDEX_COLUMN])
        for start in range(0, end, window)
    )
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            if fmt == "parquet":
                with pq.ParquetWriter(file, schema) as writer:
                    for table in windows:
                        writer.write_table(table)
            else:
                for table in windows:
                    file.writelines(_json_lines(table))
            file.flush()
            os.fsync(file.fileno())
        if previous is not None:
            previous.close()  # before the rename: `previous_output` may be `out_path` itself
        os.replace(tmp, out_path)
    except (OSError, pa.ArrowException) as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out_path}: cannot write the output ({exc})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)  # an OutputError from the merge, or an interrupt: leave no debris
        raise
    finally:
        if previous is not None:
            previous.close()
    _fsync_dir(out_path.parent)
    return end


# A part opened for merging: (fragment, its rank among parts, lowest _index, highest _index).
_Fragment = tuple[ds.ParquetFileFragment, int, int, int]


def _open_fragments(parts: list[PartFile], state: pa.Schema) -> list[_Fragment]:
    """Open every part as a dataset fragment, with its row-group metadata cached, and find its `_index` bounds."""
    parquet, local = ds.ParquetFileFormat(), LocalFileSystem()
    opened: list[_Fragment] = []
    for rank, part in enumerate(parts):
        try:
            fragment = parquet.make_fragment(os.path.abspath(part.path), filesystem=local)
            # Cached metadata lets every later filtered scan skip non-overlapping row groups without I/O.
            fragment.ensure_complete_metadata()
            stats = [rg.statistics.get(INDEX_COLUMN) for rg in fragment.row_groups]
            if stats and all(stats):
                lo, hi = min(s["min"] for s in stats), max(s["max"] for s in stats)
            else:  # empty, or not written by PartWriter: read the column for its bounds
                column = pq.read_table(part.path, columns=[INDEX_COLUMN]).column(0)
                lo, hi = pc.min(column).as_py(), pc.max(column).as_py()
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise OutputError(f"{part.path}: unreadable part file ({exc})") from exc
        if lo is not None:
            opened.append((fragment, rank, lo, hi))
    return opened


def _merge_window(
    fragments: list[_Fragment], previous: _RowStream | None, start: int, stop: int, state: pa.Schema
) -> pa.Table:
    """Rows `[start, stop)`, one per index in order, newest write winning; `state` columns."""
    pieces: list[pa.Table] = []
    if previous is not None:
        table = previous.take(stop - start)
        indexes = pa.array(range(start, start + table.num_rows), pa.int64())
        table = table.add_column(0, state.field(INDEX_COLUMN), indexes)
        pieces.append(table.append_column(_RANK, pa.repeat(pa.scalar(-1, pa.int32()), table.num_rows)))
    in_window = (ds.field(INDEX_COLUMN) >= start) & (ds.field(INDEX_COLUMN) < stop)
    for fragment, rank, lo, hi in fragments:
        if hi < start or lo >= stop:
            continue
        try:
            table = fragment.to_table(schema=state, filter=in_window)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"{fragment.path}: unreadable part file ({exc})") from exc
        pieces.append(table.append_column(_RANK, pa.repeat(pa.scalar(rank, pa.int32()), table.num_rows)))
    if not pieces:
        raise OutputError(f"no result for input row {start}; the run has not finished every row")
    merged = pa.concat_tables(pieces).sort_by([(INDEX_COLUMN, "ascending"), (_RANK, "descending")])
    indexes = merged.column(INDEX_COLUMN).combine_chunks()
    if len(indexes) > 1:
        # After the sort, the first row of each run of equal indexes is the newest write.
        first = pc.not_equal(indexes.slice(1), indexes.slice(0, len(indexes) - 1))
        merged = merged.filter(pa.concat_arrays([pa.array([True]), first]))
    if merged.num_rows != stop - start:
        present = set(merged.column(INDEX_COLUMN).to_pylist())
        missing = next(i for i in range(start, stop) if i not in present)
        raise OutputError(f"no result for input row {missing}; the run has not finished every row")
    return merged.drop_columns([_RANK])


class _RowStream:
    """Consecutive row ranges of a finished output file, read once, front to back."""

    def __init__(self, chunks: Iterator[pa.Table], schema: pa.Schema) -> None:
        self._chunks = chunks
        self._buffer = schema.empty_table()

    def take(self, n: int) -> pa.Table:
        """The next `n` rows, or fewer once the file is exhausted."""
        pieces, have = [self._buffer], self._buffer.num_rows
        while have < n and (chunk := next(self._chunks, None)) is not None:
            pieces.append(chunk)
            have += chunk.num_rows
        table = pa.concat_tables(pieces)
        self._buffer = table.slice(n)
        return table.slice(0, n)

    def close(self) -> None:
        """Close the file (idempotent): on some platforms an open file cannot be replaced."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def _previous_rows(path: Path, schema: pa.Schema, chunk: int) -> tuple[_RowStream, int]:
    """A row stream over an earlier final output, converted to `schema`, and its row count."""
    if not path.is_file():
        raise OutputError(f"{path}: previous output not found")
    if output_format(path) == "jsonl":
        rows = count_lines(path)

        def jsonl_chunks() -> Iterator[pa.Table]:
            with open(path, "rb") as file:
                batch: list[dict[str, Any]] = []
                for line in file:
                    batch.append(orjson.loads(line))
                    if len(batch) >= chunk:
                        yield pa.Table.from_pylist(batch, schema=schema)
                        batch = []
                yield pa.Table.from_pylist(batch, schema=schema)

        return _RowStream(_converted(path, jsonl_chunks()), schema), rows
    try:
        rows = pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{path}: unreadable previous output ({exc})") from exc

    def parquet_chunks() -> Iterator[pa.Table]:
        with pq.ParquetFile(path) as reader:
            for batch in reader.iter_batches(batch_size=chunk):
                table = pa.Table.from_batches([batch])
                yield table if table.schema.equals(schema) else table.cast(schema)

    return _RowStream(_converted(path, parquet_chunks()), schema), rows


def _converted(path: Path, chunks: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """Re-raise conversion errors of a previous output as OutputError naming it."""
    try:
        yield from chunks
    except (OSError, ValueError, TypeError, pa.ArrowException, orjson.JSONDecodeError) as exc:
        raise OutputError(f"{path}: the previous output does not match this run's output schema ({exc})") from exc


def _previous_errors(path: Path) -> Iterator[list[Any]]:
    """The `error` column of an earlier final output, in row order, in chunks."""
    if not path.is_file():
        raise OutputError(f"{path}: previous output not found")
    try:
        if output_format(path) == "jsonl":
            with open(path, "rb") as file:
                errors: list[Any] = []
                for line in file:
                    errors.append(orjson.loads(line).get("error"))
                    if len(errors) >= 65_536:
                        yield errors
                        errors = []
            yield errors
            return
        with pq.ParquetFile(path) as reader:
            for batch in reader.iter_batches(batch_size=65_536, columns=["error"]):
                yield batch.column(0).to_pylist()
    except (OSError, pa.ArrowException, orjson.JSONDecodeError, KeyError, AttributeError) as exc:
        raise OutputError(f"{path}: unreadable previous output ({exc})") from exc


def _json_default(value: Any) -> Any:
    # orjson covers JSON types, datetimes and dates; Parquet passthrough columns may add bytes or decimals.
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _json_lines(table: pa.Table) -> Iterator[bytes]:
    for row in table.to_pylist():
        yield orjson.dumps(row, default=_json_default, option=orjson.OPT_APPEND_NEWLINE)

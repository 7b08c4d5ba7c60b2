"""Crash-safe part files in `<output>.batchgen/`, the checkpoint they form, and the final merge.

Results arrive in completion order. `PartWriter` writes each flush as its own Parquet part,
`part-<generation>-<seq>.parquet`, through a `.tmp` file, fsync and rename, so a crash leaves
only whole parts (and `.tmp` debris that `scan_checkpoint` deletes). Each resumed run gets a
new generation; when an input row was written more than once, the newest generation (then the
highest seq) wins, both in `scan_checkpoint` and in `finalize`, which writes the final file in
input order with exactly one row per input row.

Between two parts, finished records are in the part's journal segment (`batchgen.io.journal`);
`scan_checkpoint` turns the segments a crash left into parts before it reads the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.errors import OutputError
from batchgen.io.batch_output import batch_output_errors, is_batch_output
from batchgen.io.files import atomic_file, fsync_dir
from batchgen.io.journal import JournalSegment, list_segments, read_segment, segment_path
from batchgen.io.readers import READ_BUFFER_BYTES
from batchgen.io.schema import INDEX_COLUMN
from batchgen.records import ERROR_COLUMN, ResultRecord, unstorable_record

__all__ = [
    "DICTIONARY_PAGE_BYTES",
    "FAILED",
    "NOT_DONE",
    "ROW_GROUP_ROWS",
    "SUCCEEDED",
    "Checkpoint",
    "PartFile",
    "PartWriter",
    "atomic_file",
    "list_parts",
    "output_format",
    "fsync_dir",
    "part_name",
    "scan_checkpoint",
    "write_part_file",
]

ROW_GROUP_ROWS = 4096  # small row groups keep `_index` statistics tight, so the merge skips more
# A column chunk whose dictionary outgrows this is written plain from then on (Arrow's default is
# 1 MiB). Answers and prompts are nearly all distinct: their dictionaries grew to 1 MiB, with every
# data page held back until the dictionary page could go first, only to fall back to plain anyway.
# Columns of few values (roles, finish reasons, model) stay dictionary-encoded. In the merge of
# 1M rows: 13 MB less peak RSS, an output 0.4% larger (benchmarks/README.md).
DICTIONARY_PAGE_BYTES = 1 << 16
_PART_NAME = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
_ARROW_ERRORS = (pa.ArrowException, OverflowError)
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

    Only the suffix: a `.jsonl` output may hold OpenAI batch lines instead
    (`batch_output.effective_output_format` decides for a run, `is_batch_output` for a file).

    Raises:
        OutputError: the suffix is not `.parquet`, `.jsonl` or `.ndjson`.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise OutputError(f"{path}: unsupported output suffix {suffix!r}; use .parquet, .jsonl or .ndjson")


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

    def write(self, records: Sequence[Mapping[str, Any]]) -> Path | None:
        """Write `records` as one new part file, atomically; returns its path, or None if `records` is empty.

        Raises:
            OutputError: see `to_table`, or a failed write.
        """
        if not records:
            return None
        return self.write_table(self.to_table(records))

    def to_table(self, records: Sequence[Mapping[str, Any]]) -> pa.Table:
        """`records` as a table of the part schema (see `records_table`)."""
        return records_table(self.schema, records)

    def write_table(self, table: pa.Table) -> Path:
        """Write `table` (part schema) as the next part file, atomically, sorted by `_index`."""
        final = self.state_dir / part_name(self.generation, self._seq)
        write_part_file(final, table)
        self._seq += 1
        return final

    def open_segment(self) -> JournalSegment:
        """The journal segment of the next part (see `batchgen.io.journal`)."""
        return JournalSegment(segment_path(self.state_dir, self.generation, self._seq))

    def seal(self, segment: JournalSegment) -> Path | None:
        """Write what `segment` holds as its part, then remove the segment; None when it holds nothing."""
        if not segment.tables:
            segment.remove()
            return None
        path = self.write_table(pa.concat_tables(segment.tables))
        segment.remove()
        return path


def records_table(schema: pa.Schema, records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """`records` as a table of `schema` (a part schema, with `_index`); keys missing from a record are null.

    Raises:
        OutputError: a record without an integer `_index` or with a key not in the schema, or a
            value that does not convert (naming the column).
    """
    names = frozenset(schema.names)
    for record in records:
        if not isinstance(record.get(INDEX_COLUMN), int):
            raise OutputError(f"a result record has no integer {INDEX_COLUMN!r}: {sorted(record)}")
        if not names.issuperset(record):
            unknown = sorted(set(record) - names)
            raise OutputError(f"row {record[INDEX_COLUMN]}: columns not in the output schema: {unknown}")
    try:
        return pa.Table.from_pylist(records, schema=schema)
    except _ARROW_ERRORS as exc:
        # Arrow's message names the value, not the column: find the column ourselves.
        for field in schema:
            try:
                pa.array([r.get(field.name) for r in records], type=field.type)
            except _ARROW_ERRORS as column_exc:
                raise OutputError(f"column {field.name!r} ({field.type}): {column_exc}") from exc
        raise OutputError(f"cannot convert result records: {exc}") from exc


def storable_table(schema: pa.Schema, records: Sequence[ResultRecord]) -> pa.Table:
    """As `records_table`, but an answer Arrow cannot store becomes an error row (the row is kept)."""
    try:
        return records_table(schema, records)
    except OutputError:
        fixed = [_storable(schema, record) for record in records]
        if all(a is b for a, b in zip(fixed, records, strict=True)):
            raise  # not a bad value: a bug in the record itself, which must not pass silently
        return records_table(schema, fixed)


def _storable(schema: pa.Schema, record: ResultRecord) -> ResultRecord:
    try:
        pa.Table.from_pylist([record], schema=schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        return unstorable_record(record, str(exc))
    return record


def part_name(generation: int, seq: int) -> str:
    return f"part-{generation:04d}-{seq:06d}.parquet"


def write_part_file(path: Path, table: pa.Table) -> None:
    """`table` as a part file at `path`, atomically; rows sorted by `_index` (tighter row-group statistics)."""
    table = table.sort_by(INDEX_COLUMN)
    with atomic_file(path, "part file") as file:
        pq.write_table(
            table, file, row_group_size=ROW_GROUP_ROWS, write_statistics=True, dictionary_pagesize_limit=DICTIONARY_PAGE_BYTES
        )


@dataclass(slots=True)
class Checkpoint:
    """What earlier runs left on disk.

    Attributes:
        status: per input index, 0 = not done, 1 = succeeded, 2 = failed (an error row). At least
            `total_rows_hint` long; longer if the parts hold higher indexes.
        next_generation: the generation the next `PartWriter` should use.
        rows_on_disk: the number of distinct indexes with a result.
        failed: how many of those are error rows.
        warnings: what recovering the journal found wrong (a torn or corrupt last record), to show.
    """

    status: bytearray
    next_generation: int
    rows_on_disk: int
    failed: int
    warnings: list[str]


def scan_checkpoint(state_dir: Path, total_rows_hint: int | None, previous_output: Path | None = None) -> Checkpoint:
    """Read which input rows already have results; deletes `.tmp` leftovers of a crashed run and
    turns the journal segments it left into the parts they were going to be.

    Reads only the `_index` and `error` columns of the parts. The previous output counts as
    the oldest generation, so any part overrides it; among parts, later generations (then
    higher seqs) override earlier ones. The final merge lives in `batchgen.io.merge`.

    Args:
        state_dir: the state directory (may not exist yet).
        total_rows_hint: the input's row count if known; sizes `status` up front.
        previous_output: the final output (`.parquet` or `.jsonl`, plain or OpenAI batch lines;
            no `_index`: row position is the input index) of an earlier completed run.

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
    warnings = _recover_journal(state_dir)
    parts = list_parts(state_dir)
    for part in parts:
        try:
            with pq.ParquetFile(part.path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES) as reader:
                for batch in reader.iter_batches(batch_size=65_536, columns=[INDEX_COLUMN, ERROR_COLUMN]):
                    mark(batch.column(0).to_pylist(), batch.column(1).to_pylist())
        except (OSError, pa.ArrowException, KeyError, IndexError) as exc:
            raise OutputError(f"{part.path}: unreadable part file ({exc})") from exc
    return Checkpoint(
        status=status,
        next_generation=parts[-1].generation + 1 if parts else 0,
        rows_on_disk=len(status) - status.count(NOT_DONE),
        failed=status.count(FAILED),
        warnings=warnings,
    )


def _recover_journal(state_dir: Path) -> list[str]:
    """Each segment a crash left becomes its part (its whole records), then is removed; the warnings.

    A segment whose part exists was already written (the crash came before its removal). Writing
    the part first and removing the segment second keeps this safe to interrupt at any point.
    """
    warnings = []
    for segment in list_segments(state_dir):
        part = state_dir / part_name(segment.generation, segment.seq)
        if not part.exists():
            tables, problem = read_segment(segment.path)
            if problem is not None:
                warnings.append(problem)
            if tables:
                try:
                    table = pa.concat_tables(tables, promote_options="default")
                except (pa.ArrowException, ValueError) as exc:
                    raise OutputError(f"{segment.path}: journal records of different schemas ({exc})") from exc
                write_part_file(part, table)
        try:
            segment.path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"{segment.path}: cannot remove the journal segment ({exc})") from exc
    return warnings


def _previous_errors(path: Path) -> Iterator[list[Any]]:
    """The `error` column of an earlier final output, in row order, in chunks (for OpenAI batch
    lines: None for an answered row, else its error message)."""
    if not path.is_file():
        raise OutputError(f"{path}: previous output not found")
    try:
        if output_format(path) == "jsonl" and is_batch_output(path):
            yield from batch_output_errors(path)
            return
        if output_format(path) == "jsonl":
            with open(path, "rb") as file:
                errors: list[Any] = []
                for line in file:
                    errors.append(orjson.loads(line).get(ERROR_COLUMN))
                    if len(errors) >= 65_536:
                        yield errors
                        errors = []
            yield errors
            return
        with pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES) as reader:
            for batch in reader.iter_batches(batch_size=65_536, columns=[ERROR_COLUMN]):
                yield batch.column(0).to_pylist()
    except (OSError, pa.ArrowException, orjson.JSONDecodeError, KeyError, AttributeError) as exc:
        raise OutputError(f"{path}: unreadable previous output ({exc})") from exc

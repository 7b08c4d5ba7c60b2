"""Stream rows from one Parquet file, a directory of them, or a glob pattern, as `SourceRow`s.

Only footers are read when the source is opened (schemas, row counts); rows are decoded one
record batch at a time, and `read_ids` reads just the id column.

Column chunks are read through a 64 KiB buffer (`READ_BUFFER_BYTES`), not whole: Parquet's
page buffers come from Arrow's C++ default pool (mimalloc), which `pa.set_memory_pool` does not
replace and which keeps most of what it once held (benchmarks/README.md).
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.errors import InputError
from batchgen.io.readers import DEFAULT_BATCH_SIZE, READ_BUFFER_BYTES, InputSource, SourceRow, check_batch_args

__all__ = ["ParquetSource", "common_schema", "list_parquet_files"]


def list_parquet_files(path: str) -> list[Path]:
    """The Parquet files a path names: itself, the `*.parquet` files of a directory, or a glob's matches.

    Directory and glob results are sorted by path so row indexes are stable across runs. In a
    directory, names starting with "." or "_" are skipped: Spark and Hive put markers and
    temporary files there.

    Raises:
        InputError: a missing file, or a directory / pattern that names no Parquet file.
    """
    if "*" in path:
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"{path}: the pattern matches no Parquet files")
        return files
    target = Path(path)
    if target.is_dir():
        files = sorted(p for p in target.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))
        if not files:
            raise InputError(f"{path}: the directory holds no *.parquet files")
        return files
    if not target.exists():
        raise InputError(f"{path}: input file not found")
    return [target]


def common_schema(schemas: list[tuple[str, pa.Schema]]) -> pa.Schema:
    """The one schema of an input's files, given as `(file name, Arrow schema)`; all fields nullable.

    Compared by name and type only: writers disagree on "required" vs "optional" for the same
    data. Passthrough fields are all nullable, so output rows the pipeline fills itself may hold
    nulls. The pandas metadata describes a DataFrame index we never rebuild: it is dropped.

    Raises:
        InputError: two files' schemas differ.
    """
    (first, schema), *others = schemas
    schema = _nullable(schema)
    for file, arrow_schema in others:
        other = _nullable(arrow_schema)
        if not other.equals(schema):
            raise InputError(
                f"{file} has a different schema from {first}: "
                f"[{_describe(other)}] vs [{_describe(schema)}]; all files of one input must match"
            )
    return schema


def _read_footer(path: Path) -> tuple[pa.Schema, pq.FileMetaData]:
    """The file's Arrow schema and footer.

    Through a reader, not `read_metadata(path).schema`: that schema object and its footer refer
    to each other, so the footer would stay in memory until a cyclic garbage collection.
    """
    try:
        with pq.ParquetFile(path, pre_buffer=False) as reader:
            return reader.schema_arrow, reader.metadata
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc


class ParquetSource(InputSource):
    """Parquet input; the row index continues across files in sorted order.

    Args:
        path: a `.parquet` file, a directory of them, or a glob pattern.

    Raises:
        InputError: see `list_parquet_files`; also unreadable footers, files whose schemas
            differ, and inputs with no rows ("... is empty").
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.format = "parquet"
        self.files = list_parquet_files(path)
        schemas, footers = zip(*(_read_footer(f) for f in self.files), strict=True)
        schema = common_schema([(str(f), schema) for f, schema in zip(self.files, schemas, strict=True)])
        self.passthrough_schema = schema
        self.columns = list(schema.names)
        # Rows per row group per file, so `start` can skip whole row groups without reading them.
        self._row_groups = [[footer.row_group(i).num_rows for i in range(footer.num_row_groups)] for footer in footers]
        self._decoded: list[str] | None = None  # None: every column
        self._total = sum(footer.num_rows for footer in footers)
        if self._total == 0:
            raise InputError(f"{path} is empty: no data rows")

    def total_rows(self) -> int:
        """The row count from the footers (no data is read)."""
        return int(self._total)

    def iter_batches(self, batch_size: int = DEFAULT_BATCH_SIZE, start: int = 0) -> Iterator[list[SourceRow]]:
        """Yield rows from `start` on; batches never span two files, so some may be shorter than `batch_size`."""
        check_batch_args(batch_size, start)
        offset = 0  # index of the first row of the current file
        for file, groups in zip(self.files, self._row_groups, strict=True):
            file_rows = sum(groups)
            if offset + file_rows <= start:
                offset += file_rows
                continue
            # Skip whole row groups that end before `start`, then trim the rest in the first batches.
            first_group, index = 0, offset
            while index + groups[first_group] <= start:
                index += groups[first_group]
                first_group += 1
            groups_left = list(range(first_group, len(groups)))
            for batch in self._batches(file, batch_size, row_groups=groups_left, columns=self._decoded):
                if index + batch.num_rows <= start:
                    index += batch.num_rows
                    continue
                if index < start:
                    batch, index = batch.slice(start - index), start
                rows = batch.to_pylist()
                yield [SourceRow(index + i, f"row {index + i}", values) for i, values in enumerate(rows)]
                index += len(rows)
            offset += file_rows

    def read_ids(self, column: str) -> Iterator[tuple[int, Any]]:
        """Yield `(index, value)` reading only `column` from each file.

        Raises:
            InputError: the input has no such column.
        """
        if column not in self.columns:
            raise InputError(f"{self.path}: no column {column!r}; the columns are {', '.join(self.columns)}")
        index = 0
        for file in self.files:
            for batch in self._batches(file, 65_536, columns=[column]):
                for value in batch.column(0).to_pylist():
                    yield index, value
                    index += 1

    def iter_passthrough(self, names: list[str], batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[pa.Table]:
        """The passthrough columns straight from the files, never as Python objects."""
        schema = pa.schema([self.passthrough_schema.field(name) for name in names])
        for file in self.files:
            for batch in self._batches(file, batch_size, columns=names):
                yield pa.Table.from_batches([batch]).cast(schema)

    def decode_only(self, columns: list[str]) -> None:
        """Decode only `columns` (those in the file) in `iter_batches`: the rest never becomes Python objects."""
        self._decoded = [c for c in self.columns if c in set(columns)]

    def read_id_column(self, column: str) -> pa.ChunkedArray:
        """The whole `column` as Arrow data, usually one chunk per file: no Python object per row.

        One chunk, because sorting a chunked array costs a third more memory (`batchgen.idcheck`).
        """
        if column not in self.columns:
            raise InputError(f"{self.path}: no column {column!r}; the columns are {', '.join(self.columns)}")
        chunks: list[pa.Array] = []
        for file in self.files:
            try:
                with _open(file) as reader:
                    chunks.extend(reader.read(columns=[column], use_threads=False).column(0).chunks)
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"{file}: cannot read Parquet data ({exc})") from exc
        return pa.chunked_array(chunks, type=self.passthrough_schema.field(column).type)

    def _batches(self, file: Path, batch_size: int, **options: Any) -> Iterator[pa.RecordBatch]:
        try:
            with _open(file) as reader:
                yield from reader.iter_batches(batch_size=batch_size, use_threads=False, **options)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{file}: cannot read Parquet data ({exc})") from exc


def _open(file: Path) -> pq.ParquetFile:
    # pre_buffer keeps every column chunk it read until the file closes (~190 MB per 1M rows).
    return pq.ParquetFile(file, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)


def _nullable(schema: pa.Schema) -> pa.Schema:
    return pa.schema([field.with_nullable(True) for field in schema])


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{field.name}: {field.type}" for field in schema)


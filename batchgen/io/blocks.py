"""An input cut into blocks that separate processes read on their own (the Ray engine's unit of work).

    InputShape (open_shape)  ──plan()──▶  blocks: where each starts (input index) and what it covers
                                               │
                            read_chunks(block) ▼  in each actor: rows, `chunk_rows` at a time

- A **block** is what one reader opens: a byte range of a JSONL file holding exactly
  `chunk_rows` rows, or whole Parquet row groups of one file (Parquet cannot start reading
  inside a row group, so a large group is one block).
- A **chunk** is `chunk_rows` consecutive rows of a block, from its start; its results become one
  part file, named by the input index of its first row. Chunks are the unit of resume.

The plan is exact: every block knows the input index of its first row, so the output carries each
row's position without any global pass at write time. JSONL row numbers and "line N" locators are
the local reader's (blank lines are not rows, a byte-order mark is dropped), so a row's error
message is the same whichever engine ran it. Paths are anything `batchgen.io.storage` opens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.errors import InputError
from batchgen.io.jsonl import _GZIP_MAGIC, DECODERS, LineDecoder, row_bytes, split_lines
from batchgen.io.parquet import common_schema
from batchgen.io.storage import Location, shown
from batchgen.records import SourceRow

__all__ = ["GROUP_SPLITS", "Block", "Chunk", "InputShape", "chunk_sizes", "chunk_starts", "open_shape", "read_chunks"]

_ID_BATCH = 65_536
GROUP_SPLITS = 16  # blocks a large Parquet row group is split into, at most (see _split_group)
_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl", ".ndjson.gz": "jsonl"}


@dataclass(frozen=True, slots=True)
class Block:
    """One reader's share of the input.

    Attributes:
        file: the file's position in `InputShape.files`.
        start: the input index of its first row.
        rows: how many rows it holds.
        begin / end: JSONL, the byte range of its lines. Parquet: `begin` rows of its row groups
            come before its first row (a large group split into several blocks); `end` unused.
        first_line: JSONL, the file line number at `begin` (1-based); Parquet, 0.
        row_groups: Parquet, the row groups it reads; JSONL, empty.
    """

    file: int
    start: int
    rows: int
    begin: int = 0
    end: int = 0
    first_line: int = 0
    row_groups: tuple[int, ...] = ()


@dataclass(slots=True)
class Chunk:
    """Consecutive rows of a block: decoded for the request builder, and their passthrough columns."""

    start: int
    rows: list[SourceRow]
    passthrough: pa.Table


def chunk_starts(block: Block, chunk_rows: int) -> list[int]:
    """The input index of each chunk of `block`."""
    return list(range(block.start, block.start + block.rows, chunk_rows))


def chunk_sizes(block: Block, chunk_rows: int, limit: int | None = None) -> list[tuple[int, int]]:
    """`(start, rows)` of each chunk of `block` with rows below `limit` (the last one cut short by it)."""
    end = block.start + block.rows if limit is None else min(block.start + block.rows, limit)
    return [(start, min(start + chunk_rows, end) - start) for start in chunk_starts(block, chunk_rows) if start < end]


@dataclass(frozen=True, slots=True)
class InputShape:
    """An input's files, format and passthrough columns, known before any block is planned.

    Attributes:
        files: every file, in input order.
        sizes: each file's size in bytes (a resumed job checks the input did not change).
        columns: as `InputSource.columns`.
        passthrough_schema / json_columns: the columns carried into the output (JSONL: inferred
            from the first rows, exactly as the local reader does).
    """

    input: str
    format: str
    files: tuple[Location, ...]
    sizes: tuple[int, ...]
    columns: list[str]
    passthrough_schema: pa.Schema
    json_columns: frozenset[str] = frozenset()

    def plan(self, chunk_rows: int, *, id_column: str | None = None) -> tuple[list[Block], pa.Table | None]:
        """Cut the input into blocks; with `id_column`, also every row's id, for the duplicate check.

        JSONL files are read once here, line by line (ids decoded only when asked for); Parquet
        plans from the footers alone.

        Returns:
            `(blocks, ids)`: `ids` as `idcheck.find_duplicate_id` takes it, or None.
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if self.format == "parquet":
            return self._plan_parquet(chunk_rows), self._parquet_ids(id_column) if id_column else None
        return self._plan_jsonl(chunk_rows, id_column)

    def _plan_parquet(self, chunk_rows: int) -> list[Block]:
        blocks: list[Block] = []
        start = 0
        for number, file in enumerate(self.files):
            with file.open_read() as handle, pq.ParquetFile(handle) as reader:
                sizes = [reader.metadata.row_group(i).num_rows for i in range(reader.metadata.num_row_groups)]
            groups: list[int] = []
            rows = 0
            for group, size in enumerate(sizes):
                if size == 0:
                    continue
                if size > chunk_rows:  # a large group: split, after the small ones gathered so far
                    if groups:
                        blocks.append(Block(number, start, rows, row_groups=tuple(groups)))
                        start, groups, rows = start + rows, [], 0
                    blocks.extend(_split_group(number, group, start, size, chunk_rows))
                    start += size
                    continue
                groups.append(group)
                rows += size
                if rows >= chunk_rows:  # small groups gather into one block
                    blocks.append(Block(number, start, rows, row_groups=tuple(groups)))
                    start, groups, rows = start + rows, [], 0
            if groups:
                blocks.append(Block(number, start, rows, row_groups=tuple(groups)))
                start += rows
        return blocks

    def _parquet_ids(self, column: str) -> pa.Table:
        if column not in self.columns:
            raise InputError(f"{self.input}: no column {column!r}; the columns are {', '.join(self.columns)}")
        chunks: list[pa.Array] = []
        for file in self.files:
            with file.open_read() as handle, pq.ParquetFile(handle) as reader:
                chunks.extend(reader.read(columns=[column], use_threads=False).column(0).cast(pa.string()).chunks)
        return pa.table({"id": pa.chunked_array(chunks, type=pa.string())})

    def _plan_jsonl(self, chunk_rows: int, id_column: str | None) -> tuple[list[Block], pa.Table | None]:
        blocks: list[Block] = []
        ids: list[Any] = []
        id_rows: list[int] = []
        id_tables: list[pa.Table] = []  # ids as Arrow, a batch at a time: a Python list per row would hold GBs
        index = 0
        for number, file in enumerate(self.files):
            line_no, rows, begin, first_line = 0, 0, 0, 1
            for offset, line in file.iter_lines():
                line_no += 1
                end = offset + len(line)
                if (raw := row_bytes(line_no, line)) is None:
                    continue
                if rows == 0:
                    begin, first_line = offset, line_no
                if id_column is not None:
                    try:
                        obj = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        obj = None
                    if isinstance(obj, dict):
                        ids.append(obj.get(id_column))
                        id_rows.append(index)
                        if len(ids) == _ID_BATCH:
                            id_tables.append(_id_table(id_rows, ids))
                            ids, id_rows = [], []
                rows += 1
                index += 1
                if rows == chunk_rows:
                    blocks.append(Block(number, index - rows, rows, begin, end, first_line))
                    rows = 0
            if rows:
                blocks.append(Block(number, index - rows, rows, begin, self.sizes[number], first_line))
        if id_column is None:
            return blocks, None
        return blocks, pa.concat_tables([*id_tables, _id_table(id_rows, ids)])


def _id_table(rows: list[int], ids: list[Any]) -> pa.Table:
    """Ids as `idcheck.find_duplicate_id` takes them: `row` (input index) and `id` as text."""
    texts = [value if isinstance(value, str) or value is None else str(value) for value in ids]
    return pa.table({"row": pa.array(rows, pa.int64()), "id": pa.array(texts, pa.string())})


def _split_group(file: int, group: int, start: int, size: int, chunk_rows: int) -> list[Block]:
    """A row group larger than a chunk, as up to `GROUP_SPLITS` blocks of whole chunks.

    Parquet reads a row group from its start, so block k of n decodes the k/n of the group before
    its rows: about n/2 decodes of the group in all. A few splits let several actors share a large
    group (writers default to 64k-1M rows per group) for a bounded extra read.
    """
    chunks = -(-size // chunk_rows)
    per_block = -(-chunks // min(chunks, GROUP_SPLITS)) * chunk_rows
    return [
        Block(file, start + offset, min(per_block, size - offset), begin=offset, row_groups=(group,))
        for offset in range(0, size, per_block)
    ]


def open_shape(path: str, fmt: str | None = None) -> InputShape:
    """Open an input as the Ray engine reads it: one Parquet file, a directory or local glob of them,
    or one JSONL / OpenAI batch file, on any filesystem pyarrow knows.

    Raises:
        InputError: as `open_input` does; also a gzip JSONL file, which cannot be read in byte ranges.
    """
    where = Location(path, InputError)
    is_dir = "*" in where.path or where.is_dir()
    if fmt is None:
        fmt = "parquet" if is_dir else next((f for s, f in _SUFFIXES.items() if where.path.lower().endswith(s)), None)
        if fmt is None:
            raise InputError(f"{where.text}: cannot tell the input format from the name; pass --input-format")
    if fmt == "parquet":
        files = where.files(".parquet") if is_dir else [where]
        if not files:
            raise InputError(f"{where.text}: no *.parquet files there")
    elif is_dir:
        raise InputError(f"{where.text}: is a directory; JSONL input must be one file")
    else:
        files = [where]
    infos = [f.info() for f in files]
    for file, info in zip(files, infos, strict=True):
        if info.size is None:
            raise InputError(f"{file.text}: input file not found")
    sizes = tuple(int(info.size) for info in infos)
    if fmt == "parquet":
        schemas = []
        for file in files:
            try:
                with file.open_read() as handle, pq.ParquetFile(handle) as reader:
                    schemas.append((file.text, reader.schema_arrow))
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"{file.text}: not a readable Parquet file ({exc})") from exc
        schema = common_schema(schemas)
        return InputShape(shown(path), fmt, tuple(files), sizes, list(schema.names), schema)
    (file,) = files
    if file.read_range(0, min(2, sizes[0])) == _GZIP_MAGIC:
        raise InputError(
            f"{file.text}: a gzip file cannot be split into byte ranges for the Ray engine; decompress it "
            "(or convert it to Parquet) first"
        )
    blank = DECODERS[fmt](pa.schema([]), frozenset())
    columns, schema, json_columns = blank.infer(split_lines(line for _, line in file.iter_lines()), file.text)
    return InputShape(shown(path), fmt, (file,), sizes, columns, schema, json_columns)


def read_chunks(shape: InputShape, block: Block, chunk_rows: int, *, columns: Sequence[str] | None = None,
                skip: frozenset[int] = frozenset()) -> Iterator[Chunk]:  # fmt: skip
    """The block's rows, `chunk_rows` at a time, in order; chunks whose start is in `skip` are left out.

    Args:
        columns: Parquet: the columns decoded into `SourceRow.values` (the request builder's);
            None decodes all. The passthrough columns are always read, as Arrow data.

    Raises:
        InputError: the file cannot be read, or no longer holds what the plan says (changed since).
    """
    file = shape.files[block.file]
    if shape.format == "parquet":
        yield from _parquet_chunks(shape, file, block, chunk_rows, columns, skip)
    else:
        yield from _jsonl_chunks(shape, file, block, chunk_rows, skip)


def _parquet_chunks(shape: InputShape, file: Location, block: Block, chunk_rows: int,
                    columns: Sequence[str] | None, skip: frozenset[int]) -> Iterator[Chunk]:  # fmt: skip
    decoded = [c for c in shape.columns if columns is None or c in set(columns)]
    schema = shape.passthrough_schema
    try:
        with file.open_read() as handle, pq.ParquetFile(handle) as reader:
            batches = reader.iter_batches(batch_size=chunk_rows, row_groups=list(block.row_groups), use_threads=False)
            pending: list[pa.RecordBatch] = []
            held, start, before = 0, block.start, block.begin
            end = block.start + block.rows
            for batch in batches:
                if before >= batch.num_rows:  # rows of the group that belong to an earlier block
                    before -= batch.num_rows
                    continue
                pending.append(batch.slice(before))
                held += batch.num_rows - before
                before = 0
                while held >= chunk_rows or (held and start + held >= end):
                    table = pa.Table.from_batches(pending).combine_chunks()
                    size = min(chunk_rows, held, end - start)
                    chunk, rest = table.slice(0, size), table.slice(size)
                    pending, held = rest.to_batches(), rest.num_rows
                    if start not in skip:
                        values = chunk.select(decoded).to_pylist()
                        rows = [SourceRow(start + i, f"row {start + i}", row) for i, row in enumerate(values)]
                        yield Chunk(start, rows, chunk.select(schema.names).cast(schema))
                    start += size
                    if start >= end:
                        return  # the group's later rows are the next block's
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{file.text}: cannot read Parquet data ({exc})") from exc
    if start != block.start + block.rows:
        raise InputError(f"{file.text}: holds other rows than when the job was planned; was it changed?")


def _jsonl_chunks(shape: InputShape, file: Location, block: Block, chunk_rows: int, skip: frozenset[int]) -> Iterator[Chunk]:
    if all(start in skip for start in chunk_starts(block, chunk_rows)):
        return
    decoder: LineDecoder = DECODERS[shape.format](shape.passthrough_schema, shape.json_columns)
    data = file.read_range(block.begin, block.end)
    # Lines end at b"\n" only, as when the local reader iterates the file.
    *whole, last = data.split(b"\n")
    lines = [line + b"\n" for line in whole]
    if last:
        lines.append(last)  # the file's last line, without a newline of its own
    raw = list(split_lines(iter(lines), block.first_line))
    if len(raw) != block.rows:
        raise InputError(f"{file.text}: holds other rows than when the job was planned; was it changed?")
    for offset in range(0, block.rows, chunk_rows):
        start = block.start + offset
        if start in skip:
            continue
        rows = decoder.check_types([decoder.decode(start + i, where, line) for i, where, line in raw[offset : offset + chunk_rows]])
        table = pa.Table.from_pylist([decoder.passthrough_values(row) for row in rows], schema=shape.passthrough_schema)
        yield Chunk(start, rows, table)

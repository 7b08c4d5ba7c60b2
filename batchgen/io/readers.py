"""Open an input file (Parquet, JSONL or OpenAI batch JSONL) as a stream of decoded rows.

`open_input` picks the format and returns an `InputSource`; the per-format sources live in
`batchgen.io.parquet` and `batchgen.io.jsonl`. A problem with the file as a whole raises
`InputError`; a problem with one row becomes a `SourceRow` with `error` set, so one bad line
never stops a million-row job.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchgen._constants import INPUT_FORMATS, INPUT_READERS
from batchgen.errors import InputError
from batchgen.records import SourceRow

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "FORMATS",
    "READ_BUFFER_BYTES",
    "InputSource",
    "SourceRow",
    "check_batch_args",
    "detect_format",
    "open_input",
]

FORMATS = INPUT_FORMATS
DEFAULT_BATCH_SIZE = 1024
# Parquet reads go through a buffer of this size instead of reading each column chunk whole: the
# page buffers come from Arrow's C++ default pool, which `pa.set_memory_pool` does not replace.
# In the final merge of 1M rows this took ~15 MB off the peak (benchmarks/README.md).
READ_BUFFER_BYTES = 1 << 16

# Suffixes that name a format on their own; "openai-batch" shares `.jsonl`: it is told by its first line.
_SUFFIX_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl", ".ndjson.gz": "jsonl"}


class InputSource(ABC):
    """An opened input: its shape up front, then its rows in batches, streamed.

    Attributes:
        path: the path (or directory / glob pattern) as given.
        format: "parquet", "jsonl" or "openai-batch".
        columns: Parquet: the schema names. JSONL: the keys in first-seen order over the rows the
            passthrough types were inferred from.
        passthrough_schema: the Arrow types of the columns carried into the output.
    """

    path: str
    format: str
    columns: list[str]
    passthrough_schema: pa.Schema

    @abstractmethod
    def total_rows(self) -> int | None:
        """The number of rows, cheaply (no full decode), or None when it cannot be known cheaply."""

    @abstractmethod
    def iter_batches(self, batch_size: int = DEFAULT_BATCH_SIZE, start: int = 0) -> Iterator[list[SourceRow]]:
        """Yield the rows in input order, at most `batch_size` per list, beginning at row index `start`.

        Never holds more than about one batch in memory. Raises `InputError` if the file becomes
        unreadable part-way (a truncated gzip stream, a corrupt Parquet page).
        """

    @abstractmethod
    def read_ids(self, column: str) -> Iterator[tuple[int, Any]]:
        """Yield `(index, value of column)` for every decodable row, reading as little as the format allows."""

    def passthrough_values(self, row: SourceRow) -> dict[str, Any]:
        """The row's passthrough columns, ready for `pa.Table.from_pylist` with `passthrough_schema`.

        Missing keys become None. Sources that store some columns differently from how they
        decode them (JSONL's JSON-text columns) override this.
        """
        values = row.values or {}
        return {name: values.get(name) for name in self.passthrough_schema.names}

    def decode_only(self, columns: list[str]) -> None:
        """A hint: `iter_batches` may leave out other columns (Parquet does; JSONL decodes whole lines)."""

    def where(self, index: int) -> str:
        """A locator for row `index` in messages ("row 17"; JSONL says "line N")."""
        return f"row {index}"

    def iter_passthrough(self, names: list[str], batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[pa.Table]:
        """The passthrough columns `names` as Arrow tables in input order (every row, good or bad),
        typed as in `passthrough_schema`: the final merge joins them to the results.

        Small batches: decoding 8192 rows of a `messages` column at once doubled the merge's Arrow
        memory, and the merge window concatenates batches without copying them anyway."""
        schema = pa.schema([self.passthrough_schema.field(name) for name in names])
        for rows in self.iter_batches(batch_size):
            yield pa.Table.from_pylist([self.passthrough_values(row) for row in rows], schema=schema)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, format={self.format!r}, columns={self.columns!r})"


def check_batch_args(batch_size: int, start: int) -> None:
    """Reject a `batch_size` below 1 or a negative `start` (shared by every source's `iter_batches`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")


def detect_format(path: str | os.PathLike[str]) -> str:
    """The input format implied by a path: a directory or a glob pattern means Parquet, else the suffix.

    Raises:
        InputError: the suffix names no supported format.
    """
    text = os.fspath(path)
    if "*" in text or Path(text).is_dir():
        return "parquet"
    name = Path(text).name.lower()
    for suffix, fmt in _SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return "openai-batch" if fmt == "jsonl" and _looks_like_batch_file(text) else fmt
    raise InputError(
        f"{text}: cannot tell the input format from the name; use a .parquet file, a directory or glob of "
        f"them, or a .jsonl / .ndjson / .jsonl.gz file, or pass the format explicitly (one of {', '.join(FORMATS)})"
    )


_BATCH_KEYS = frozenset({"custom_id", "method", "url", "body"})


def _looks_like_batch_file(path: str) -> bool:
    """Whether the first line of a JSONL file is an OpenAI batch request (`custom_id`, `method`, `url`,
    `body`): then `vllm run-batch`'s `-i in.jsonl -o out.jsonl` works without naming the format."""
    import gzip

    import orjson

    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as file:
            for line in file:
                if line.strip():
                    first = orjson.loads(line)
                    return isinstance(first, dict) and _BATCH_KEYS <= first.keys()
    except (OSError, EOFError, ValueError):
        return False  # the reader reports what is wrong with the file
    return False


def open_input(path: str | os.PathLike[str], fmt: str | None = None) -> InputSource:
    """Open an input for streaming.

    Args:
        path: a `.parquet` file, a directory (all its `*.parquet` files, sorted), a glob pattern
            containing `*` (the sorted matches, read as Parquet), or a `.jsonl` / `.ndjson` /
            `.jsonl.gz` file.
        fmt: "parquet", "jsonl" or "openai-batch"; None infers it from `path` (a `.jsonl` file whose
            first line is an OpenAI batch request is "openai-batch").

    Returns:
        The opened source. Parquet footers are read now; JSONL sources read their first rows
        now to learn the columns and their types.

    Raises:
        InputError: unknown format, missing or unreadable file, no Parquet files in a directory
            or glob, Parquet files with different schemas, or an input with no data rows.

    Example:
        source = open_input("prompts.jsonl")
        for batch in source.iter_batches(batch_size=512): ...
    """
    fmt = detect_format(path) if fmt is None else fmt
    text = os.fspath(path)
    reader = INPUT_READERS.get(fmt)
    if reader is None:
        raise InputError(f"{text}: unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")
    # Imported here: the reader modules subclass InputSource from this one.
    module, _, name = reader.partition(":")
    source: InputSource = getattr(importlib.import_module(module), name)(text)
    return source

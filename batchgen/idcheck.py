"""Finds the first duplicated row id before any request is sent.

Ids stay in Arrow memory (about 20 MB for a million short ids) and are counted with Arrow's
hash kernel, rather than as Python objects, which would cost several times that at the moment
the run starts. Only rows whose id is duplicated ever become Python values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batchgen.io.readers import InputSource

__all__ = ["find_duplicate_id", "source_ids"]

_BATCH = 65_536


def _as_text(value: Any) -> str | None:
    return value if isinstance(value, str) or value is None else str(value)


def _chunks(pairs: Iterable[tuple[int, Any]]) -> Iterator[pa.RecordBatch]:
    # JSONL ids come as (index, value); skipped lines leave gaps, so keep the index beside each id.
    iterator = iter(pairs)
    while batch := list(islice(iterator, _BATCH)):
        rows = pa.array([i for i, _ in batch], pa.int64())
        yield pa.record_batch([rows, pa.array([_as_text(v) for _, v in batch], pa.string())], names=["row", "id"])


def source_ids(source: InputSource, column: str) -> pa.Table:
    """A table of `row` (input index) and `id` (as text) for every row, nulls included."""
    read_column = getattr(source, "read_id_column", None)
    if read_column is not None:  # Parquet: straight from the column, row number = position
        ids = read_column(column).cast(pa.string())
        return pa.table({"row": pa.array(range(len(ids)), pa.int64()), "id": ids})
    batches = list(_chunks(source.read_ids(column)))
    schema = pa.schema([("row", pa.int64()), ("id", pa.string())])
    return pa.Table.from_batches(batches, schema=schema)


def find_duplicate_id(ids: pa.Table) -> tuple[str, int, int] | None:
    """The duplicate whose second occurrence comes first, as `(id, first row, second row)`, or None.

    Null ids are skipped here; they become error rows of their own. Ids are compared as text,
    the form they take in the output.
    """
    column = ids.column("id")
    counts = pc.value_counts(column)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).drop_null()
    if len(repeated) == 0:
        return None
    positions = pc.indices_nonzero(pc.is_in(column, value_set=repeated)).to_pylist()
    rows = ids.column("row").take(positions).to_pylist()
    values = column.take(positions).to_pylist()
    first_seen: dict[str, int] = {}
    for row, value in zip(rows, values, strict=True):  # in input order: the first repeat wins
        if value in first_seen:
            return value, first_seen[value], row
        first_seen[value] = row
    return None  # pragma: no cover - value_counts said there is a repeat

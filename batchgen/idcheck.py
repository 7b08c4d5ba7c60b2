"""Finds the first duplicated row id before any request is sent.

Ids stay in Arrow memory, one contiguous string array (about 15 MB for a million short ids),
and duplicates are found by sorting: equal ids end up side by side, so comparing neighbours
finds them. A stable sort of the positions costs 8 bytes per row; Arrow's hash kernels
(`value_counts`, `unique`) cost about five times the ids themselves (1M ids: +105 MB of RSS for
`value_counts`, +38 MB for the sort; benchmarks/README.md). Only the duplicate that is reported
ever becomes a Python value.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batchgen.io.readers import InputSource

__all__ = ["find_duplicate_id", "source_ids"]

_BATCH = 65_536  # ids per step when building the table from JSONL, and when comparing neighbours


def _as_text(value: Any) -> str | None:
    return value if isinstance(value, str) or value is None else str(value)


def _chunks(pairs: Iterable[tuple[int, Any]]) -> Iterator[pa.RecordBatch]:
    # JSONL ids come as (index, value); skipped lines leave gaps, so keep the index beside each id.
    iterator = iter(pairs)
    while batch := list(islice(iterator, _BATCH)):
        rows = pa.array([i for i, _ in batch], pa.int64())
        yield pa.record_batch([rows, pa.array([_as_text(v) for _, v in batch], pa.string())], names=["row", "id"])


def source_ids(source: InputSource, column: str) -> pa.Table:
    """A table of `id` (as text) for every row, nulls included, and `row`, the input index of each.

    Parquet tables have no `row` column: there the input index is the position.
    """
    read_column = getattr(source, "read_id_column", None)
    if read_column is not None:  # Parquet: straight from the column
        return pa.table({"id": read_column(column).cast(pa.string())})
    batches = list(_chunks(source.read_ids(column)))
    schema = pa.schema([("row", pa.int64()), ("id", pa.string())])
    return pa.Table.from_batches(batches, schema=schema)


def find_duplicate_id(ids: pa.Table) -> tuple[str, int, int] | None:
    """The duplicate whose second occurrence comes first, as `(id, first row, second row)`, or None.

    Null ids are skipped here; they become error rows of their own. Ids are compared as text,
    the form they take in the output. `ids` has an `id` column and, optionally, `row` (the
    input index of each id; without it, the position is the index).
    """
    column = ids.column("id")
    values = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    # Stable, nulls last: equal ids are neighbours, in input order.
    order = pc.array_sort_indices(values)
    present = len(values) - values.null_count
    second: int | None = None  # the earliest position that repeats an id seen before
    for start in range(0, present - 1, _BATCH):
        positions = order.slice(start, min(_BATCH + 1, present - start))
        sorted_ids = values.take(positions)
        repeats = pc.equal(sorted_ids.slice(1), sorted_ids.slice(0, len(sorted_ids) - 1))
        # Within a run of equal ids the positions ascend, so the smallest "next" position over
        # every repeat is the second occurrence of some id, and the earliest one of all.
        found = pc.min(positions.slice(1).filter(repeats)).as_py()
        if found is not None and (second is None or found < second):
            second = found
    if second is None:
        return None
    value = values[second].as_py()
    first = pc.index(values, value).as_py()  # the first occurrence is the first in input order
    if "row" in ids.column_names:
        rows = ids.column("row")
        return value, rows[first].as_py(), rows[second].as_py()
    return value, first, second

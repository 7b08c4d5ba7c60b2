"""Finds the first duplicated row id before any request is sent (polars does the heavy lifting).

Ids stay in Arrow memory (about 20 MB for a million short ids) rather than as Python objects,
which would cost several times that at the moment the run starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import polars as pl
import pyarrow as pa

from batchgen.io.readers import InputSource

__all__ = ["find_duplicate_id", "source_ids"]

_BATCH = 65_536


def _as_text(value: Any) -> str | None:
    return value if isinstance(value, str) or value is None else str(value)


def _chunks(pairs: Iterable[tuple[int, Any]]) -> Iterator[pa.Array]:
    # JSONL ids come as (index, value); skipped lines leave gaps, so keep the index beside each id.
    iterator = iter(pairs)
    while batch := list(islice(iterator, _BATCH)):
        yield pa.StructArray.from_arrays(
            [pa.array([i for i, _ in batch], pa.int64()), pa.array([_as_text(v) for _, v in batch], pa.string())],
            names=["row", "id"],
        )


def source_ids(source: InputSource, column: str) -> pl.DataFrame:
    """A frame of `row` (input index) and `id` (as text) for every row, nulls included."""
    read_column = getattr(source, "read_id_column", None)
    if read_column is not None:  # Parquet: straight from the column, row number = position
        ids = pl.from_arrow(read_column(column))
        assert isinstance(ids, pl.Series)
        return pl.DataFrame({"id": ids.cast(pl.String)}).with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
    structs = list(_chunks(source.read_ids(column)))
    if not structs:
        return pl.DataFrame(schema={"row": pl.Int64, "id": pl.String})
    frame = pl.from_arrow(pa.Table.from_batches([pa.RecordBatch.from_struct_array(s) for s in structs]))
    assert isinstance(frame, pl.DataFrame)
    return frame


def find_duplicate_id(ids: pl.DataFrame) -> tuple[str, int, int] | None:
    """The duplicate whose second occurrence comes first, as `(id, first row, second row)`, or None.

    Null ids are skipped here; they become error rows of their own. Ids are compared as text,
    the form they take in the output.
    """
    dupes = (
        ids.filter(pl.col("id").is_not_null() & pl.col("id").is_duplicated())
        .group_by("id")
        .agg(pl.col("row").sort().head(2).alias("rows"))
        .with_columns(first=pl.col("rows").list.get(0), second=pl.col("rows").list.get(1))
        .sort("second")
        .head(1)
    )
    if dupes.height == 0:
        return None
    row = dupes.row(0, named=True)
    return row["id"], row["first"], row["second"]

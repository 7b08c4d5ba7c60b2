"""Finds the first duplicated row id before any request is sent (polars does the heavy lifting)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import polars as pl

__all__ = ["find_duplicate_id"]


def find_duplicate_id(pairs: Iterable[tuple[int, Any]]) -> tuple[str, int, int] | None:
    """The duplicate whose second occurrence comes first, as `(id, first row, second row)`, or None.

    Null ids are skipped here; they become error rows of their own. Ids are compared as text,
    the form they take in the output.
    """
    indexes: list[int] = []
    ids: list[str] = []
    for index, value in pairs:
        if value is not None:
            indexes.append(index)
            ids.append(value if isinstance(value, str) else str(value))
    if not ids:
        return None
    frame = pl.DataFrame({"row": indexes, "id": ids}, schema={"row": pl.Int64, "id": pl.String})
    dupes = (
        frame.filter(pl.col("id").is_duplicated())
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

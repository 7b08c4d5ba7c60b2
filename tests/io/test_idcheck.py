"""The duplicate-id check: the sort-based search against a plain scan, on generated ids."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchgen import idcheck
from batchgen.idcheck import find_duplicate_id, source_ids
from batchgen.io import open_input

IDS = st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h", "ab", ""])), max_size=40)


def careful(ids: list[str | None], rows: list[int]) -> tuple[str, int, int] | None:
    """The reference: scan in input order; the first id seen twice wins."""
    first: dict[str, int] = {}
    for row, value in zip(rows, ids, strict=True):
        if value is None:
            continue
        if value in first:
            return value, first[value], row
        first[value] = row
    return None


def chunked(values: list[object], size: int, type_: pa.DataType) -> pa.ChunkedArray:
    return pa.chunked_array([pa.array(values[i : i + size], type_) for i in range(0, len(values), size)] or [], type_)


class _Batch:
    """Temporarily compare neighbours in small steps, so runs of equal ids cross step boundaries."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __enter__(self) -> None:
        self.saved, idcheck._BATCH = idcheck._BATCH, self.size

    def __exit__(self, *exc: object) -> None:
        idcheck._BATCH = self.saved


@settings(max_examples=300, deadline=None)
@given(ids=IDS, chunk=st.integers(1, 7), step=st.integers(1, 5), gaps=st.lists(st.integers(1, 3), min_size=40, max_size=40))
def test_sorted_search_equals_a_plain_scan(ids: list[str | None], chunk: int, step: int, gaps: list[int]) -> None:
    positions = list(range(len(ids)))
    rows = [sum(gaps[: i + 1]) for i in range(len(ids))]  # JSONL: increasing, with gaps (blank lines)
    with _Batch(step):
        # Parquet shape: no row column, the position is the index.
        assert find_duplicate_id(pa.table({"id": chunked(ids, chunk, pa.string())})) == careful(ids, positions)
        # JSONL shape: a row column beside the ids.
        table = pa.table({"row": chunked(rows, chunk, pa.int64()), "id": chunked(ids, chunk, pa.string())})
        assert find_duplicate_id(table) == careful(ids, rows)


def test_no_rows_all_nulls_and_one_id() -> None:
    for ids in ([], [None, None], ["x"], ["x", None, "y"]):
        assert find_duplicate_id(pa.table({"id": pa.array(ids, pa.string())})) is None


def test_the_earliest_second_occurrence_wins_not_the_earliest_first() -> None:
    # "a" is seen first, but "b" repeats first.
    assert find_duplicate_id(pa.table({"id": ["a", "b", "b", "a"]})) == ("b", 1, 2)


def _write_parts(tmp_path: Path, tables: list[pa.Table]) -> Iterator[Path]:
    for i, table in enumerate(tables):
        path = tmp_path / f"part-{i}.parquet"
        pq.write_table(table, path, row_group_size=2)
        yield path


def test_parquet_ids_are_read_as_text_positions_across_files(tmp_path: Path) -> None:
    first = pa.table({"id": [10, 11, 12], "prompt": ["a", "b", "c"]})
    second = pa.table({"id": [13, 11], "prompt": ["d", "e"]})
    list(_write_parts(tmp_path, [first, second]))
    ids = source_ids(open_input(tmp_path), "id")
    assert ids.column_names == ["id"]
    assert ids.column("id").to_pylist() == ["10", "11", "12", "13", "11"]
    assert find_duplicate_id(ids) == ("11", 1, 4)


def test_jsonl_ids_keep_their_line_index(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "1"}\nnot json\n{"id": "b", "prompt": "2"}\n{"id": "a", "prompt": "3"}\n')
    ids = source_ids(open_input(path), "id")
    assert ids.column("row").to_pylist() == [0, 2, 3]
    assert find_duplicate_id(ids) == ("a", 0, 3)


@pytest.mark.parametrize("rows", [1, 70_000])
def test_a_repeat_across_the_comparison_step(rows: int) -> None:
    ids = [f"id-{i:06d}" for i in range(rows)]
    ids.append(ids[-1])
    assert find_duplicate_id(pa.table({"id": ids})) == (ids[-1], rows - 1, rows)

"""Blocks (the Ray engine's unit of reading) give exactly the rows, locators and passthrough
columns of the local readers, whatever the block size."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.errors import InputError
from batchgen.idcheck import find_duplicate_id
from batchgen.io.blocks import GROUP_SPLITS, chunk_starts, open_shape, read_chunks
from batchgen.io.readers import open_input

JSONL_LINES = [
    b'\xef\xbb\xbf{"id": "a", "prompt": "first", "n": 1}\n',
    b"\n",
    b'{"id": "b", "prompt": "second", "n": 2}\n',
    b"   \n",
    b"not json\n",
    b'[1, 2]\n',
    b'{"id": "c", "prompt": "third", "n": "three"}\n',
    b'{"id": "d", "prompt": "fourth", "n": 4, "late": true}\n',
    b'{"id": "e", "prompt": "fifth", "n": 5.5}\n',
    b'{"id": "f", "prompt": "sixth"}\n',
    b'{"id": "g", "prompt": "seventh", "n": 7}',  # no final newline
]


def _local(path: str, fmt: str | None = None) -> tuple[list[tuple[object, ...]], pa.Table]:
    source = open_input(path, fmt)
    rows = [(r.index, r.where, r.values, r.error) for batch in source.iter_batches(3) for r in batch]
    table = pa.concat_tables(source.iter_passthrough(source.passthrough_schema.names))
    return rows, table


def _blocks(path: str, chunk_rows: int, fmt: str | None = None) -> tuple[list[tuple[object, ...]], pa.Table]:
    shape = open_shape(path, fmt)
    blocks, _ = shape.plan(chunk_rows)
    rows: list[tuple[object, ...]] = []
    tables = []
    for block in blocks:
        chunks = list(read_chunks(shape, block, chunk_rows))
        assert [c.start for c in chunks] == chunk_starts(block, chunk_rows)
        for chunk in chunks:
            assert len(chunk.rows) == chunk.passthrough.num_rows <= chunk_rows
            rows.extend((r.index, r.where, r.values, r.error) for r in chunk.rows)
            tables.append(chunk.passthrough)
    return rows, pa.concat_tables(tables)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 4, 100])
@pytest.mark.parametrize("last_newline", [True, False])
def test_jsonl_blocks_read_what_the_local_reader_reads(tmp_path: Path, chunk_rows: int, last_newline: bool) -> None:
    path = tmp_path / "in.jsonl"
    lines = list(JSONL_LINES)
    if last_newline:
        lines[-1] += b"\n"
    path.write_bytes(b"".join(lines))
    local_rows, local_table = _local(str(path))
    rows, table = _blocks(str(path), chunk_rows)
    assert rows == local_rows
    assert table.equals(local_table)
    assert any(error and "line 5" in error for *_, error in rows)  # locators count blank lines too


def test_openai_batch_blocks_keep_the_custom_id_of_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "batch.jsonl"
    path.write_text(
        '{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}\n'
        '{"custom_id": "r2", "method": "GET", "url": "/v1/chat/completions", "body": {}}\n'
        '{"method": "POST"}\n'
    )
    assert _blocks(str(path), 2, "openai-batch") == _local(str(path), "openai-batch")


@pytest.mark.parametrize("chunk_rows", [1, 7, 25, 1000])
def test_parquet_blocks_follow_row_groups_across_files(tmp_path: Path, chunk_rows: int) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for number, (rows, group) in enumerate([(40, 10), (3, 3), (55, 50)]):
        start = sum(r for r, _ in [(40, 10), (3, 3), (55, 50)][:number])
        table = pa.table({"id": [f"r{start + i}" for i in range(rows)], "prompt": [f"p{i}" for i in range(rows)],
                          "score": [float(i) for i in range(rows)]})  # fmt: skip
        pq.write_table(table, folder / f"part-{number}.parquet", row_group_size=group)
    local_rows, local_table = _local(str(folder))
    rows, table = _blocks(str(folder), chunk_rows)
    assert rows == local_rows
    assert table.equals(local_table)
    shape = open_shape(str(folder))
    blocks, ids = shape.plan(chunk_rows, id_column="id")
    assert sum(b.rows for b in blocks) == 98
    assert ids is not None and find_duplicate_id(ids) is None


def test_parquet_chunks_can_be_skipped(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(100)]}), tmp_path / "in.parquet", row_group_size=100)
    shape = open_shape(str(tmp_path / "in.parquet"))
    blocks, _ = shape.plan(3)
    assert chunk_starts(blocks[1], 3) == [9, 12, 15]  # 34 chunks in 16 splits: 3 chunks a block
    chunks = list(read_chunks(shape, blocks[1], 3, skip=frozenset({9, 15})))
    assert [(c.start, [r.index for r in c.rows]) for c in chunks] == [(12, [12, 13, 14])]


def test_jsonl_ids_find_duplicates_by_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "prompt": "a"}\n\n{"id": 2, "prompt": "b"}\n{"id": 1, "prompt": "c"}\n')
    _, ids = open_shape(str(path)).plan(10, id_column="id")
    assert ids is not None and find_duplicate_id(ids) == ("1", 0, 2)


def test_a_changed_file_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    shape = open_shape(str(path))
    (block,), _ = shape.plan(10)
    path.write_text('{"prompt": "a"}\n\n')
    with pytest.raises(InputError, match="other rows than when the job was planned"):
        list(read_chunks(shape, block, 10))


def test_gzip_jsonl_is_refused_with_a_way_out(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "a"}\n'))
    with pytest.raises(InputError, match="decompress it"):
        open_shape(str(path))


def test_uris_name_the_same_files(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert _blocks(f"file://{path}", 1) == _blocks(str(path), 1)
    with pytest.raises(InputError, match="input file not found"):
        open_shape(f"file://{tmp_path}/missing.jsonl")


def test_a_large_row_group_is_shared_by_several_blocks(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(1000)]}), tmp_path / "in.parquet", row_group_size=1000)
    shape = open_shape(str(tmp_path / "in.parquet"))
    blocks, _ = shape.plan(10)
    assert GROUP_SPLITS // 2 < len(blocks) <= GROUP_SPLITS  # several actors share it, for a bounded re-read
    assert all(b.rows % 10 == 0 for b in blocks[:-1])  # chunk boundaries stay where a single block puts them
    rows = [r.index for b in blocks for c in read_chunks(shape, b, 10) for r in c.rows]
    assert rows == list(range(1000))


def test_a_jsonl_file_of_batch_requests_is_told_by_its_first_line(tmp_path: Path) -> None:
    from batchgen.io.readers import detect_format

    batch = tmp_path / "batch.jsonl"
    batch.write_text('\n{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n')
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"custom_id": "a", "prompt": "hi"}\n')
    broken = tmp_path / "broken.jsonl"
    broken.write_text("not json\n")
    assert detect_format(batch) == "openai-batch"
    assert detect_format(plain) == detect_format(broken) == "jsonl"

"""Input readers: Parquet files, directories and globs; JSONL (plain, gzip, broken lines); OpenAI batch files."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.errors import InputError
from batchgen.io import InputSource, SourceRow, detect_format, open_input
from batchgen.io.jsonl import INFER_ROWS

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def rows_of(source: InputSource, batch_size: int = 1024, start: int = 0) -> list[SourceRow]:
    return [row for batch in source.iter_batches(batch_size=batch_size, start=start) for row in batch]


def write_jsonl(path: Path, objects: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(obj) + b"\n" for obj in objects))
    return path


def prompt_table(start: int, stop: int) -> pa.Table:
    return pa.table(
        {
            "id": [f"r{i}" for i in range(start, stop)],
            "n": pa.array(range(start, stop), pa.int64()),
            "messages": pa.array([[{"role": "user", "content": f"q{i}"}] for i in range(start, stop)], MESSAGES),
        }
    )


# --- format detection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("a.parquet", "parquet"), ("a.jsonl", "jsonl"), ("a.ndjson", "jsonl"), ("a.jsonl.gz", "jsonl"), ("d/*.parquet", "parquet")],
)
def test_detect_format_from_suffix(name: str, fmt: str) -> None:
    assert detect_format(name) == fmt


def test_detect_format_directory_is_parquet(tmp_path: Path) -> None:
    assert detect_format(tmp_path) == "parquet"


def test_unknown_suffix_names_path_and_formats() -> None:
    with pytest.raises(InputError, match=r"prompts\.csv.*\.parquet.*\.jsonl"):
        open_input("prompts.csv")


def test_unknown_explicit_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"a": 1}])
    with pytest.raises(InputError, match="unknown input format 'csv'"):
        open_input(path, fmt="csv")


# --- Parquet ------------------------------------------------------------------------------------


def test_parquet_batches_values_and_locators(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(prompt_table(0, 10), path, row_group_size=3)
    source = open_input(path)
    batches = list(source.iter_batches(batch_size=4))
    assert all(len(batch) <= 4 for batch in batches)
    rows = [row for batch in batches for row in batch]
    assert [row.index for row in rows] == list(range(10))
    assert rows[7] == SourceRow(7, "row 7", {"id": "r7", "n": 7, "messages": [{"role": "user", "content": "q7"}]}, None)
    assert source.columns == ["id", "n", "messages"]
    assert source.format == "parquet"


def test_parquet_total_rows_reads_only_the_footer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(prompt_table(0, 25), path, row_group_size=10)
    source = open_input(path)

    def no_data_reads(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("total_rows must not read data")

    monkeypatch.setattr(pq, "ParquetFile", no_data_reads)
    assert source.total_rows() == 25


def test_parquet_start_skips_rows_and_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(prompt_table(0, 10), path, row_group_size=3)
    rows = rows_of(open_input(path), batch_size=2, start=5)
    assert [(row.index, row.values and row.values["id"]) for row in rows] == [(i, f"r{i}") for i in range(5, 10)]
    assert rows_of(open_input(path), start=10) == []


def test_parquet_messages_list_struct_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    messages = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], []]
    pq.write_table(pa.table({"messages": pa.array(messages, MESSAGES)}), path)
    source = open_input(path)
    assert source.passthrough_schema.field("messages").type == MESSAGES
    assert [row.values for row in rows_of(source)] == [{"messages": m} for m in messages]
    assert all(source.passthrough_values(row) == row.values for row in rows_of(source))


def test_parquet_pandas_metadata_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(prompt_table(0, 2).replace_schema_metadata({b"pandas": b"{}"}), path)
    assert open_input(path).passthrough_schema.metadata is None


def test_parquet_directory_continues_index_across_sorted_files(tmp_path: Path) -> None:
    pq.write_table(prompt_table(3, 5), tmp_path / "b.parquet")
    pq.write_table(prompt_table(0, 3), tmp_path / "a.parquet")
    (tmp_path / "_SUCCESS").write_bytes(b"")
    pq.write_table(prompt_table(90, 99), tmp_path / ".scratch.parquet")
    source = open_input(tmp_path)
    assert source.total_rows() == 5
    rows = rows_of(source)
    assert [(row.index, row.values and row.values["id"]) for row in rows] == [(i, f"r{i}") for i in range(5)]
    assert [row.index for row in rows_of(source, start=4)] == [4]
    assert list(source.read_ids("id")) == [(i, f"r{i}") for i in range(5)]


def test_parquet_glob_pattern(tmp_path: Path) -> None:
    pq.write_table(prompt_table(0, 2), tmp_path / "part-1.parquet")
    pq.write_table(prompt_table(2, 4), tmp_path / "part-2.parquet")
    pq.write_table(prompt_table(9, 10), tmp_path / "other.parquet")
    source = open_input(str(tmp_path / "part-*.parquet"))
    assert [row.values and row.values["id"] for row in rows_of(source)] == ["r0", "r1", "r2", "r3"]


def test_parquet_read_ids_reads_one_column(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(prompt_table(0, 3), path)
    source = open_input(path)
    assert list(source.read_ids("n")) == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(InputError, match="no column 'nope'"):
        list(source.read_ids("nope"))


def test_parquet_whole_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"missing\.parquet: input file not found"):
        open_input(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"junk\.parquet: not a readable Parquet file"):
        open_input(tmp_path / "junk.parquet")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="holds no \\*.parquet files"):
        open_input(empty_dir)
    with pytest.raises(InputError, match="matches no Parquet files"):
        open_input(str(tmp_path / "nothing-*.parquet"))
    pq.write_table(prompt_table(0, 0), tmp_path / "zero.parquet")
    with pytest.raises(InputError, match=r"zero\.parquet is empty"):
        open_input(tmp_path / "zero.parquet")


def test_parquet_files_differing_only_in_nullability_match(tmp_path: Path) -> None:
    required = pa.schema([pa.field("id", pa.string(), nullable=False)])
    pq.write_table(pa.table({"id": ["a"]}, schema=required), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["b", None]}), tmp_path / "b.parquet")
    source = open_input(tmp_path)
    assert source.passthrough_schema == pa.schema([pa.field("id", pa.string())])
    assert [row.values for row in rows_of(source)] == [{"id": "a"}, {"id": "b"}, {"id": None}]


def test_parquet_directory_with_different_schemas(tmp_path: Path) -> None:
    pq.write_table(prompt_table(0, 2), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"b\.parquet has a different schema from .*a\.parquet"):
        open_input(tmp_path)


# --- JSONL --------------------------------------------------------------------------------------


def test_jsonl_good_rows_blank_lines_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "x": 1}\n\n  \n{"x": 2, "id": "b", "tags": ["t"]}\r\n{"id": "c"}')
    source = open_input(path)
    assert source.columns == ["id", "x", "tags"]
    assert source.passthrough_schema == pa.schema([("id", pa.string()), ("x", pa.int64()), ("tags", pa.list_(pa.string()))])
    rows = rows_of(source, batch_size=2)
    assert rows == [
        SourceRow(0, "line 1", {"id": "a", "x": 1}, None),
        SourceRow(1, "line 4", {"x": 2, "id": "b", "tags": ["t"]}, None),
        SourceRow(2, "line 5", {"id": "c"}, None),
    ]
    assert source.passthrough_values(rows[2]) == {"id": "c", "x": None, "tags": None}
    # Blank lines are counted by the fast newline count: an upper bound (documented).
    assert source.total_rows() == 5
    assert [row.index for row in rows_of(source, start=1)] == [1, 2]


def test_jsonl_total_rows_exact_without_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": 3}')
    assert open_input(path).total_rows() == 3


def test_jsonl_bad_lines_become_error_rows_and_the_stream_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'{"id": "a"}\n'
        b'{"id": "b",\n'  # line 2: invalid JSON
        b'{"id": "\xff\xfe"}\n'  # line 3: not UTF-8
        b"[1, 2]\n"  # line 4: not an object
        b'{"id": "e"}\n'
        b'{"id": "f", "x": '  # line 6: the writer died mid-line
    )
    rows = rows_of(open_input(path))
    assert [row.index for row in rows] == list(range(6))
    assert [row.values for row in rows if row.error is None] == [{"id": "a"}, {"id": "e"}]
    errors = [row.error for row in rows]
    assert errors[1] is not None and errors[1].startswith("line 2: invalid JSON: ")
    assert errors[2] == "line 3: not valid UTF-8 at byte 8"
    assert errors[3] == "line 4: expected a JSON object, got array"
    assert errors[5] is not None and errors[5].startswith("line 6: truncated last line")
    assert all(rows[i].values is None for i in (1, 2, 3, 5))
    assert list(open_input(path).read_ids("id")) == [(0, "a"), (4, "e")]


def test_jsonl_twenty_megabyte_line(tmp_path: Path) -> None:
    big = "x" * 20_000_000
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "small"}, {"id": "big", "text": big}, {"id": "after"}])
    rows = rows_of(open_input(path))
    assert [row.values and row.values["id"] for row in rows] == ["small", "big", "after"]
    assert rows[1].values is not None and rows[1].values["text"] == big


def test_jsonl_gzip(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wb") as file:
        file.write(b'{"id": "a"}\n\n{"id": "b"}\n')
    source = open_input(path)
    assert source.total_rows() is None
    assert [row.values for row in rows_of(source)] == [{"id": "a"}, {"id": "b"}]


def test_jsonl_truncated_gzip_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"id": "a"}\n' * 50_000)[:-100])
    source = open_input(path)
    with pytest.raises(InputError, match=r"in\.jsonl\.gz: cannot read the file"):
        rows_of(source)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_jsonl_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"in\.jsonl is empty"):
        open_input(path)


def test_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.jsonl: input file not found"):
        open_input(tmp_path / "nope.jsonl")


def test_jsonl_type_mismatch_after_inference_is_an_error_row_keeping_values(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "n": i} for i in range(INFER_ROWS + 10)]
    rows[INFER_ROWS + 3] = {"id": "bad-str", "n": "seven"}
    rows[INFER_ROWS + 5] = {"id": "bad-float", "n": 1.5}
    rows[INFER_ROWS + 6] = {"id": "ok-float", "n": 2.0}
    rows[INFER_ROWS + 7] = {"id": "late-key", "n": 1, "extra": [1, 2]}
    source = open_input(write_jsonl(tmp_path / "in.jsonl", rows))
    assert source.passthrough_schema == pa.schema([("id", pa.string()), ("n", pa.int64())])
    decoded = rows_of(source, batch_size=100)
    bad = decoded[INFER_ROWS + 3]
    assert bad.values == {"id": "bad-str", "n": "seven"}
    assert bad.error == (
        f"line {INFER_ROWS + 4}: column 'n': value of type string does not fit "
        "the column type int64 inferred from the first rows"
    )
    assert source.passthrough_values(bad) == {"id": "bad-str", "n": None}
    assert decoded[INFER_ROWS + 5].error is not None and "column 'n'" in decoded[INFER_ROWS + 5].error
    assert decoded[INFER_ROWS + 6].error is None
    late = decoded[INFER_ROWS + 7]
    assert late.error is None and late.values == {"id": "late-key", "n": 1, "extra": [1, 2]}
    assert "extra" not in source.passthrough_schema.names
    assert sum(row.error is not None for row in decoded) == 2


def test_jsonl_ununifiable_column_is_json_text_and_null_only_is_string(tmp_path: Path) -> None:
    objects = [{"meta": 1, "none": None, "tags": []}, {"meta": "a", "none": None, "tags": []}, {"meta": [1, {"k": 2}]}]
    source = open_input(write_jsonl(tmp_path / "in.jsonl", [*objects, {"tags": ["later"]}]))
    schema = source.passthrough_schema
    assert schema.field("meta").type == pa.large_string()
    assert schema.field("none").type == pa.string()
    assert schema.field("tags").type == pa.list_(pa.string())
    rows = rows_of(source)
    assert all(row.error is None for row in rows)
    stored = [source.passthrough_values(row) for row in rows]
    assert [s["meta"] for s in stored] == ["1", '"a"', '[1,{"k":2}]', None]
    assert stored[3]["tags"] == ["later"]
    pa.Table.from_pylist(stored, schema=schema)  # ready to write


# --- OpenAI batch -------------------------------------------------------------------------------


def batch_line(custom_id: Any = "req-1", **overrides: Any) -> dict[str, Any]:
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": []}}
    line.update(overrides)
    return line


def test_openai_batch_lines(tmp_path: Path) -> None:
    lines = [
        batch_line("a"),
        batch_line("b", url="/chat/completions"),
        batch_line("c", method="GET"),
        batch_line("d", url="/v1/embeddings"),
        batch_line("e", body="not an object"),
        batch_line(7),
        {"method": "POST"},
        batch_line("h", method=None),
    ]
    del lines[7]["method"]
    source = open_input(write_jsonl(tmp_path / "batch.jsonl", lines), fmt="openai-batch")
    assert source.format == "openai-batch"
    assert source.passthrough_schema == pa.schema([("custom_id", pa.string())])
    rows = rows_of(source)
    body = {"model": "m", "messages": []}
    assert rows[0] == SourceRow(0, "line 1", {"custom_id": "a", "body": body}, None)
    assert rows[1].error is None
    assert rows[2].error == 'line 3: field \'method\' must be "POST", got "GET"'
    assert rows[2].values == {"custom_id": "c", "body": body}
    assert rows[3].error is not None and rows[3].error.startswith("line 4: field 'url'")
    assert rows[4].error is not None and rows[4].error.startswith("line 5: field 'body' must be a JSON object")
    assert rows[5].error == "line 6: field 'custom_id' must be a non-empty string, got number" and rows[5].values is None
    assert rows[6].error == "line 7: missing field 'custom_id'"
    assert rows[7].error == "line 8: field 'method' must be \"POST\", got nothing (missing)"
    assert source.passthrough_values(rows[2]) == {"custom_id": "c"}

"""Results written by an older batchgen (before stop_reason, logprobs, choices, raw and the usage
details) still merge: a job started before an upgrade resumes, and the new columns come back null."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.io.merge import finalize
from batchgen.io.parts import PartWriter
from batchgen.io.schema import output_schema, state_schema

NEW = ("stop_reason", "logprobs", "choices", "raw")
OLD_USAGE = pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("total_tokens", pa.int64())])


def _old_results() -> pa.Schema:
    schema, _ = output_schema(pa.schema([]))
    fields = [f.with_type(OLD_USAGE) if f.name == "usage" else f for f in schema if f.name not in NEW]
    return pa.schema(fields)


def _old_record(index: int) -> dict[str, object]:
    return {"_index": index, "id": f"r{index}", "content": f"answer {index}", "finish_reason": "stop",
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, "status_code": 200, "attempts": 1}


def test_old_part_files_merge_with_the_new_columns_null(tmp_path: Path) -> None:
    state_dir = tmp_path / "out.parquet.batchgen"
    writer = PartWriter(state_dir, state_schema(_old_results()), 0)
    writer.write([_old_record(0), _old_record(1)])
    schema, _ = output_schema(pa.schema([]))
    result = finalize(state_dir, tmp_path / "out.parquet", schema, expected_rows=2)
    assert (result.rows, result.errors) == (2, 0)
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema == schema
    rows = out.to_pylist()
    assert [r["content"] for r in rows] == ["answer 0", "answer 1"]
    assert rows[0]["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
                                "cached_tokens": None, "reasoning_tokens": None}
    assert all(r[name] is None for r in rows for name in NEW)


def test_an_old_final_output_is_merged_under_new_parts(tmp_path: Path) -> None:
    old = pa.Table.from_pylist([{k: v for k, v in _old_record(i).items() if k != "_index"} for i in range(2)],
                               schema=_old_results())
    previous = tmp_path / "previous.parquet"
    pq.write_table(old, previous)
    state_dir = tmp_path / "out.parquet.batchgen"
    schema, _ = output_schema(pa.schema([]))
    new = {"_index": 1, "id": "r1", "content": "new answer", "stop_reason": "###", "status_code": 200, "attempts": 1}
    PartWriter(state_dir, state_schema(schema), 1).write([new])
    finalize(state_dir, tmp_path / "out.parquet", schema, previous_output=previous, expected_rows=2)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [(r["content"], r["stop_reason"]) for r in rows] == [("answer 0", None), ("new answer", "###")]

"""Part files, checkpoint scan and the final merge, including a round-trip property over random part layouts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchgen.errors import OutputError
from batchgen.io import PartWriter, finalize, list_parts, output_schema, scan_checkpoint, state_schema

PROMPT = pa.schema([("prompt", pa.string())])
OUTPUT, _ = output_schema(PROMPT)
STATE = state_schema(pa.schema([f for f in OUTPUT if f.name != "prompt"]))  # parts hold results only


def prompts(chunk: int = 3) -> Iterator[pa.Table]:
    """The input's passthrough column, in input order, as the merge reads it: p0, p1, ..."""
    start = 0
    while True:
        yield pa.table({"prompt": [f"p{i}" for i in range(start, start + chunk)]}, schema=PROMPT)
        start += chunk


def merge(state_dir: Path, out: Path, **options: Any) -> int:
    return finalize(state_dir, out, OUTPUT, passthrough=prompts(), passthrough_schema=PROMPT, **options).rows


def record(index: int, tag: str, *, failed: bool = False) -> dict[str, Any]:
    """A result record whose values depend on which write produced it."""
    if failed:
        return {"_index": index, "id": f"r{index}", "error": f"boom {tag}", "attempts": 3}
    return {
        "_index": index,
        "id": f"r{index}",
        "content": f"answer {index} from {tag}",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}] if index % 3 == 0 else None,
        "usage": {"prompt_tokens": index, "completion_tokens": 2, "total_tokens": index + 2},
        "status_code": 200,
        "attempts": 1,
        "latency_s": index / 8,
    }


def as_output(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the final file should hold for these records: every column, `_index` dropped."""
    table = pa.Table.from_pylist(records, schema=STATE)
    table = table.add_column(1, PROMPT.field("prompt"), pa.array([f"p{r['_index']}" for r in records], pa.string()))
    return table.drop_columns(["_index"]).to_pylist()


def read_output(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]
    table = pq.read_table(path)
    assert table.schema.equals(OUTPUT)
    return table.to_pylist()


def write_previous(path: Path, records: list[dict[str, Any]]) -> None:
    """A finished output of an earlier run: no `_index`, row position = index."""
    rows = as_output(records)
    if path.suffix == ".jsonl":
        path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT), path)


# --- PartWriter ---------------------------------------------------------------------------------


def test_part_writer_writes_sorted_readable_parts_without_tmp(tmp_path: Path) -> None:
    state_dir = tmp_path / "out.parquet.batchgen"
    writer = PartWriter(state_dir, STATE, generation=3)
    assert writer.write([]) is None
    first = writer.write([record(i, "a") for i in reversed(range(5000))])
    second = writer.write([record(7, "b")])
    assert first is not None and first.name == "part-0003-000000.parquet"
    assert second is not None and second.name == "part-0003-000001.parquet"
    assert sorted(p.name for p in state_dir.iterdir()) == [first.name, second.name]
    meta = pq.read_metadata(first)
    assert meta.num_row_groups == 2 and meta.row_group(0).num_rows == 4096
    assert meta.row_group(0).column(0).statistics.has_min_max
    table = pq.read_table(first)
    assert table.schema.equals(STATE)
    assert table.column("_index").to_pylist() == list(range(5000))
    # A new writer for the same generation continues the sequence instead of overwriting.
    assert PartWriter(state_dir, STATE, generation=3).write([record(1, "c")]).name == "part-0003-000002.parquet"  # type: ignore[union-attr]


def test_part_writer_renames_a_complete_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int, bool]] = []
    real_replace = os.replace

    def spying_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        # At rename time the temporary file is complete and the final name does not exist yet.
        seen.append((Path(src).name, pq.read_metadata(src).num_rows, Path(dst).exists()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spying_replace)
    PartWriter(tmp_path, STATE, generation=0).write([record(0, "a"), record(1, "a")])
    assert seen == [("part-0000-000000.parquet.tmp", 2, False)]


def test_part_writer_failed_rename_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputError, match="No space left"):
        PartWriter(tmp_path, STATE, generation=0).write([record(0, "a")])
    assert list(tmp_path.iterdir()) == []


def test_part_writer_conversion_errors_name_the_column(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path, STATE, generation=0)
    with pytest.raises(OutputError, match="column 'attempts'"):
        writer.write([record(0, "a"), {**record(1, "a"), "attempts": "three"}])
    with pytest.raises(OutputError, match=r"columns not in the output schema: \['reasoning'\]"):
        writer.write([{**record(0, "a"), "reasoning": "typo"}])
    with pytest.raises(OutputError, match="no integer '_index'"):
        writer.write([{"id": "x"}])
    assert list(tmp_path.iterdir()) == []


# --- scan_checkpoint ----------------------------------------------------------------------------


def test_scan_checkpoint_later_generations_override(tmp_path: Path) -> None:
    PartWriter(tmp_path, STATE, 0).write([record(0, "g0"), record(1, "g0", failed=True), record(3, "g0")])
    PartWriter(tmp_path, STATE, 1).write([record(1, "g1"), record(3, "g1", failed=True)])
    (tmp_path / "part-0002-000000.parquet.tmp").write_bytes(b"half a file")
    checkpoint = scan_checkpoint(tmp_path, total_rows_hint=6)
    assert checkpoint.status == bytearray([1, 1, 0, 2, 0, 0])
    assert checkpoint.next_generation == 2
    assert (checkpoint.rows_on_disk, checkpoint.failed) == (3, 1)
    assert not list(tmp_path.glob("*.tmp"))


def test_scan_checkpoint_grows_past_the_hint_and_handles_no_state(tmp_path: Path) -> None:
    empty = scan_checkpoint(tmp_path / "missing", total_rows_hint=None)
    assert (empty.status, empty.next_generation, empty.rows_on_disk, empty.failed) == (bytearray(), 0, 0, 0)
    PartWriter(tmp_path, STATE, 4).write([record(9, "g4")])
    checkpoint = scan_checkpoint(tmp_path, total_rows_hint=2)
    assert len(checkpoint.status) == 10 and checkpoint.status[9] == 1 and checkpoint.next_generation == 5


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_scan_checkpoint_with_previous_output(tmp_path: Path, suffix: str) -> None:
    previous = tmp_path / f"old{suffix}"
    write_previous(previous, [record(0, "old"), record(1, "old", failed=True), record(2, "old", failed=True)])
    state_dir = tmp_path / "state"
    PartWriter(state_dir, STATE, 0).write([record(2, "retry")])
    checkpoint = scan_checkpoint(state_dir, total_rows_hint=4, previous_output=previous)
    assert checkpoint.status == bytearray([1, 2, 1, 0])
    assert (checkpoint.rows_on_disk, checkpoint.failed, checkpoint.next_generation) == (3, 1, 1)


def test_scan_checkpoint_corrupt_part_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "part-0000-000000.parquet").write_bytes(b"garbage")
    with pytest.raises(OutputError, match=r"part-0000-000000\.parquet: unreadable part file"):
        scan_checkpoint(tmp_path, total_rows_hint=None)


# --- finalize -----------------------------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> dict[str, Any]:
    """A random history: a previous output covering a prefix, first-generation parts covering the rest in a
    random order and chunking, then later generations rewriting random rows."""
    n = draw(st.integers(0, 40))
    previous = draw(st.integers(0, n)) if draw(st.booleans()) else None
    rest = draw(st.permutations(range(previous or 0, n)))
    cuts = sorted(draw(st.lists(st.integers(0, len(rest)), max_size=5)))
    bounds = [0, *cuts, len(rest)]
    writes = [(0, rest[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    if n:
        redo = st.lists(st.integers(0, n - 1), min_size=1, max_size=12, unique=True)
        writes += draw(st.lists(st.tuples(st.integers(0, 3), redo), max_size=5))
    return {
        "n": n,
        "previous": previous,
        "writes": draw(st.permutations(writes)),
        "window": draw(st.integers(1, 12)),
        "suffix": draw(st.sampled_from([".parquet", ".jsonl"])),
    }


@settings(max_examples=60, deadline=None)
@given(layout=layouts())
def test_finalize_round_trip(layout: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        state_dir = root / "state"
        winner: dict[int, tuple[tuple[int, int], dict[str, Any]]] = {}
        previous = None
        if layout["previous"] is not None:
            previous = root / f"previous{layout['suffix']}"
            old = [record(i, "previous") for i in range(layout["previous"])]
            write_previous(previous, old)
            winner.update({r["_index"]: ((-1, 0), r) for r in old})
        writers: dict[int, PartWriter] = {}
        for generation, indexes in layout["writes"]:
            writer = writers.setdefault(generation, PartWriter(state_dir, STATE, generation))
            seq = writer._seq
            records = [record(i, f"g{generation}s{seq}", failed=(i + seq) % 5 == 0) for i in indexes]
            writer.write(records)
            for r in records:
                if r["_index"] not in winner or winner[r["_index"]][0] < (generation, seq):
                    winner[r["_index"]] = ((generation, seq), r)
        out = root / f"out{layout['suffix']}"
        written = merge(state_dir, out, previous_output=previous, window=layout["window"])
        assert written == layout["n"]
        assert read_output(out) == as_output([winner[i][1] for i in range(layout["n"])])
        assert not list(root.glob("*.tmp"))


def test_finalize_previous_output_is_overridden_by_parts(tmp_path: Path) -> None:
    previous = tmp_path / "out.parquet"
    write_previous(previous, [record(i, "run1", failed=i == 1) for i in range(4)])
    PartWriter(tmp_path / "state", STATE, 0).write([record(1, "retry"), record(4, "new")])
    assert merge(tmp_path / "state", previous, previous_output=previous, window=2) == 5
    contents = [row["content"] for row in read_output(previous)]
    assert contents == ["answer 0 from run1", "answer 1 from retry", "answer 2 from run1", "answer 3 from run1", "answer 4 from new"]


def test_finalize_missing_row_is_an_error_and_keeps_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    out.write_bytes(b"old")
    PartWriter(tmp_path / "state", STATE, 0).write([record(0, "a"), record(2, "a")])
    with pytest.raises(OutputError, match="no result for input row 1"):
        merge(tmp_path / "state", out, window=2)
    with pytest.raises(OutputError, match="no result for input row 3"):
        PartWriter(tmp_path / "state", STATE, 0).write([record(1, "a")])
        merge(tmp_path / "state", out, expected_rows=4)
    assert out.read_bytes() == b"old" and not list(tmp_path.glob("*.tmp"))
    assert merge(tmp_path / "state", out, expected_rows=3) == 3


def test_finalize_without_results_writes_an_empty_file(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    assert merge(tmp_path / "state", out) == 0
    assert pq.read_table(out).schema.equals(OUTPUT) and pq.read_table(out).num_rows == 0
    assert list_parts(tmp_path / "state") == []


def test_finalize_rejects_an_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"out\.csv: unsupported output suffix"):
        merge(tmp_path, tmp_path / "out.csv")


def test_finalize_reads_index_ranges_of_parts_without_statistics(tmp_path: Path) -> None:
    # A part not written by PartWriter: `_index` is not the first column and has no statistics.
    state = tmp_path / "state"
    state.mkdir()
    table = pa.Table.from_pylist([record(i, "hand") for i in (3, 1, 2, 0)], schema=STATE)
    table = table.select(["id", "_index", *[n for n in STATE.names if n not in ("id", "_index")]])
    pq.write_table(table, state / "part-0000-000000.parquet", row_group_size=2, write_statistics=False)
    assert merge(state, tmp_path / "out.parquet", window=3) == 4
    assert [row["content"] for row in read_output(tmp_path / "out.parquet")] == [f"answer {i} from hand" for i in range(4)]

"""The journal: segments read back record by record, a torn or corrupt tail is skipped with a
warning (never a crash), and `scan_checkpoint` turns what a crash left into parts, whatever moment
the crash came at (mid-record, mid-recovery, between a part and its segment's removal)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.io.journal import JournalSegment, list_segments, read_segment, segment_path
from batchgen.io.parts import SUCCEEDED, PartWriter, list_parts, part_name, scan_checkpoint, write_part_file
from batchgen.io.schema import output_schema, state_schema

SCHEMA = state_schema(output_schema(pa.schema([]))[0])


def _table(indexes: range) -> pa.Table:
    return pa.Table.from_pylist(
        [{"_index": i, "id": f"r{i}", "content": f"answer {i}", "status_code": 200} for i in indexes], schema=SCHEMA
    )


def _segment(state_dir: Path, *chunks: range, generation: int = 0, seq: int = 0) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    segment = JournalSegment(segment_path(state_dir, generation, seq))
    for chunk in chunks:
        segment.append(_table(chunk))
    segment.close()
    return segment.path


def _done(state_dir: Path, rows: int) -> list[int]:
    return [i for i, s in enumerate(scan_checkpoint(state_dir, rows).status) if s == SUCCEEDED]


def test_a_segment_reads_back_record_by_record(tmp_path: Path) -> None:
    path = _segment(tmp_path, range(0, 3), range(3, 5), range(5, 9))
    tables, problem = read_segment(path)
    assert problem is None
    assert [t["_index"].to_pylist() for t in tables] == [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    assert tables[1]["content"].to_pylist() == ["answer 3", "answer 4"]


@pytest.mark.parametrize("cut", [1, 5, 11, 12, 40, -1])
def test_a_torn_last_record_is_skipped_with_a_warning(tmp_path: Path, cut: int) -> None:
    path = _segment(tmp_path, range(0, 3), range(3, 5), range(5, 9))
    data = path.read_bytes()
    whole = len(data) - len(_segment(tmp_path / "one", range(5, 9)).read_bytes())  # bytes of the first two records
    path.write_bytes(data[: whole + cut if cut > 0 else len(data) + cut])  # the crash came mid-write
    tables, problem = read_segment(path)
    assert [t.num_rows for t in tables] == [3, 2]
    assert problem is not None and "torn" in problem and "after 2 whole records, 5 rows" in problem


def test_a_corrupt_record_and_everything_after_it_are_skipped(tmp_path: Path) -> None:
    path = _segment(tmp_path, range(0, 3), range(3, 5), range(5, 9))
    data = bytearray(path.read_bytes())
    first = len(_segment(tmp_path / "one", range(0, 3)).read_bytes())
    data[first + 40] ^= 0xFF  # a flipped bit inside the second record's payload
    path.write_bytes(bytes(data))
    tables, problem = read_segment(path)
    assert [t.num_rows for t in tables] == [3]
    assert problem is not None and "checksum" in problem


def test_garbage_is_not_a_record(tmp_path: Path) -> None:
    path = tmp_path / "journal-0000-000000.arrows"
    path.write_bytes(b"\x00" * 64)
    tables, problem = read_segment(path)
    assert tables == [] and problem is not None and "no record marker" in problem


def test_recovery_turns_a_segment_into_its_part_and_warns_about_a_torn_tail(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = _segment(state, range(0, 4), range(4, 6), generation=2, seq=7)
    path.write_bytes(path.read_bytes()[:-3])
    checkpoint = scan_checkpoint(state, 10)
    assert [i for i, s in enumerate(checkpoint.status) if s] == [0, 1, 2, 3]
    assert len(checkpoint.warnings) == 1 and "journal-0002-000007.arrows" in checkpoint.warnings[0]
    assert [p.path.name for p in list_parts(state)] == [part_name(2, 7)]
    assert list_segments(state) == [] and checkpoint.next_generation == 3


def test_a_crash_between_the_part_and_the_segments_removal_keeps_the_part(tmp_path: Path) -> None:
    state = tmp_path / "state"
    writer = PartWriter(state, SCHEMA, 0)
    segment = writer.open_segment()
    segment.append(_table(range(0, 5)))
    writer.write_table(pa.concat_tables(segment.tables))  # the part is written; the crash comes before remove()
    segment.close()
    checkpoint = scan_checkpoint(state, 5)
    assert checkpoint.warnings == [] and _done(state, 5) == [0, 1, 2, 3, 4]
    assert len(list_parts(state)) == 1 and list_segments(state) == []


def test_a_crash_during_recovery_leaves_a_state_the_next_scan_finishes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _segment(state, range(0, 3), seq=0)
    _segment(state, range(3, 6), seq=1)
    # The first recovery wrote part 0 and was killed while writing part 1 (a .tmp half-file).
    write_part_file(state / part_name(0, 0), _table(range(0, 3)))
    (state / (part_name(0, 1) + ".tmp")).write_bytes(b"PAR1 half a file")
    assert _done(state, 6) == [0, 1, 2, 3, 4, 5]
    assert [p.seq for p in list_parts(state)] == [0, 1] and list_segments(state) == []
    assert not list(state.glob("*.tmp"))
    assert pq.read_table(state / part_name(0, 1))["_index"].to_pylist() == [3, 4, 5]


def test_an_empty_segment_left_at_creation_is_removed_quietly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    segment_path(state, 0, 0).write_bytes(b"")
    checkpoint = scan_checkpoint(state, 3)
    assert checkpoint.warnings == [] and list_parts(state) == [] and list_segments(state) == []


def test_a_part_from_the_journal_is_sorted_by_index(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _segment(state, range(5, 8), range(0, 2))
    scan_checkpoint(state, 8)
    assert pq.read_table(list_parts(state)[0].path)["_index"].to_pylist() == [0, 1, 5, 6, 7]

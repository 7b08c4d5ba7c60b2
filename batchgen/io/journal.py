"""Journal segments: finished records on disk within `journal_seconds` of arriving, before they are a part.

A part file is written every `flush_seconds` (2 s by default); before the journal, a crash lost
every answer that had come back since the last part, and a rerun paid for them again (~1,000
requests per `kill -9` at 500 answers/s). Now the sink appends what arrived to the segment of the
part it is building, every `journal_seconds` (0.1 s), as one framed record, fsynced. When the part
is written, its segment is removed. After a crash, `scan_checkpoint` turns each segment into the
part it was going to be, reading its records up to the first torn or corrupt one.

A segment is named after its part (`journal-<generation>-<seq>.arrows` ↔ `part-<generation>-<seq>.parquet`),
so a crash between writing the part and removing the segment leaves both, and the part wins.

A record: `BGJ1`, the payload's length and its CRC-32 (little-endian u32 each), then the payload:
an Arrow IPC stream (schema + one batch), so a segment reads back without knowing the run's schema.
The bound is `journal_seconds` plus the time to write one part: the single writer does not journal
while it writes a part (a few ms for a 2000-row part). Cost per record: one Arrow conversion (the one the part needed anyway), one write and one fsync;
at 0.1 s that is 10 fsyncs a second, whatever the answer rate (figures: benchmarks/README.md).
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from batchgen.errors import OutputError
from batchgen.io.files import fsync_dir

__all__ = ["JournalSegment", "SegmentFile", "list_segments", "read_segment", "segment_path"]

_MAGIC = b"BGJ1"
_HEADER = struct.Struct("<4sII")  # magic, payload length, CRC-32 of the payload
_SEGMENT_NAME = re.compile(r"^journal-(\d+)-(\d+)\.arrows$")


@dataclass(frozen=True, slots=True, order=True)
class SegmentFile:
    """A journal segment on disk; it becomes `part-<generation>-<seq>.parquet`."""

    generation: int
    seq: int
    path: Path


def segment_path(state_dir: Path, generation: int, seq: int) -> Path:
    return state_dir / f"journal-{generation:04d}-{seq:06d}.arrows"


def list_segments(state_dir: Path) -> list[SegmentFile]:
    """The journal segments in `state_dir`, oldest first; [] if it is missing."""
    if not state_dir.is_dir():
        return []
    found = ((_SEGMENT_NAME.match(p.name), p) for p in state_dir.iterdir())
    return sorted(SegmentFile(int(m[1]), int(m[2]), p) for m, p in found if m)


def _encode(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    payload = sink.getvalue()
    body: bytes = payload.to_pybytes()
    return _HEADER.pack(_MAGIC, len(body), zlib.crc32(body)) + body


class JournalSegment:
    """The segment of one part being built: records appended and fsynced, kept in memory for the part.

    Not thread-safe: the sink's single writer task calls it, through `asyncio.to_thread`, one call
    at a time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tables: list[pa.Table] = []
        self.rows = 0
        self._fd: int | None = None

    def append(self, table: pa.Table, *, durable: bool = True) -> None:
        """Keep `table` for the part; when `durable`, first make it so: one record written and fsynced
        (the file is created on first use).

        Raises:
            OutputError: the write or the fsync failed.
        """
        if table.num_rows == 0:
            return
        if durable:
            self._write(_encode(table))
        self.tables.append(table)
        self.rows += table.num_rows

    def _write(self, data: bytes) -> None:
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                fsync_dir(self.path.parent)  # the new name must survive a crash too
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write the journal ({exc})") from exc

    def remove(self) -> None:
        """The part is written: the segment is no longer needed."""
        self.close()
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot remove the journal segment ({exc})") from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_segment(path: Path) -> tuple[list[pa.Table], str | None]:
    """The whole records of a segment, and what was wrong after them (None when nothing was).

    Reading stops at the first record that is cut short or does not match its CRC: a crash
    mid-write leaves a torn last record, and nothing after a bad record can be trusted.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], f"{path.name}: unreadable ({exc}); its rows will be sent again"
    tables: list[pa.Table] = []
    pos = 0
    problem: str | None = None
    while pos < len(data):
        if len(data) - pos < _HEADER.size:
            problem = "a torn record header"
            break
        magic, length, crc = _HEADER.unpack_from(data, pos)
        payload = data[pos + _HEADER.size : pos + _HEADER.size + length]
        if magic != _MAGIC:
            problem = "no record marker"
            break
        if len(payload) < length:
            problem = f"a torn record ({len(payload)} of {length} bytes)"
            break
        if zlib.crc32(payload) != crc:
            problem = "a record whose checksum does not match"
            break
        try:
            tables.append(pa.ipc.open_stream(payload).read_all())
        except (pa.ArrowException, OSError):
            problem = "a record Arrow cannot read"
            break
        pos += _HEADER.size + length
    if problem is None:
        return tables, None
    rows = sum(t.num_rows for t in tables)
    return tables, (
        f"{path.name}: {problem} at byte {pos} (after {len(tables)} whole records, {rows} rows); "
        "the rest is skipped and those rows will be sent again"
    )

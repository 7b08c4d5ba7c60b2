"""The Ray engine's output: a directory of Parquet part files, one per chunk of input rows.

    out/
      part-000000000000.parquet    rows 0..999 of the input (the name is its first row's input index)
      part-000000001000.parquet
      ...
      _batchgen/plan.json          what the parts were cut from: a rerun must cut the same way
      _batchgen/tmp/               parts being written (moved into place whole)

A part exists whole or not at all, so the parts present are the checkpoint: a rerun sends only the
chunks without one. Names starting with "_" are skipped by Parquet readers (pyarrow, polars' glob
of `*.parquet`, Ray, Spark), so the directory reads as one dataset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchgen.errors import OutputError
from batchgen.io.parts import DICTIONARY_PAGE_BYTES
from batchgen.io.storage import Location
from batchgen.records import ERROR_COLUMN

__all__ = ["INPUT_INDEX", "OutputDir", "PartInfo", "holds_chunk"]

INPUT_INDEX = "input_index"  # each row's position in the input: `sort("input_index")` gives input order
_PART = re.compile(r"part-(\d{12})\.parquet")
_STATE = "_batchgen"


@dataclass(slots=True)
class PartInfo:
    rows: int
    errors: int


class OutputDir:
    """One job's output directory (local path or URI), the only place its parts are named.

    Raises:
        OutputError: the path is a file, or holds something that is not a batchgen Ray output.
    """

    def __init__(self, path: str) -> None:
        self.root = Location(path, OutputError)
        self.text = self.root.text
        self._state = self.root.child(_STATE)
        self._scratch = self._state.child("tmp")

    def part(self, start: int) -> Location:
        return self.root.child(f"part-{start:012d}.parquet")

    def clear(self) -> None:
        """Remove every earlier result (`--overwrite`)."""
        self.root.delete()

    def prepare(self, plan: dict[str, Any]) -> None:
        """Make the directory ready for a run of `plan`, or check that it already belongs to the same plan.

        A crashed run's half-written parts (in the scratch directory) are removed.

        Raises:
            OutputError: the directory holds a different plan's parts (another input, another
                `ray_block_rows`), or files that are not a batchgen output.
        """
        info = self.root.info()
        if info.type == pafs.FileType.File:
            raise OutputError(f"{self.text}: is a file; the Ray engine writes a directory of Parquet files")
        manifest = self._state.child("plan.json")
        if manifest.exists():
            with manifest.open_read() as file:
                earlier = orjson.loads(file.read())
            if earlier != plan:
                changed = sorted(k for k in plan.keys() | earlier.keys() if plan.get(k) != earlier.get(k))
                raise OutputError(
                    f"{self.text} holds results of another job (it differs in: {', '.join(changed)}); "
                    "use --overwrite to start over, or another output directory"
                )
        else:
            if info.type == pafs.FileType.Directory and self.root.files(""):
                raise OutputError(f"{self.text}: is not empty and holds no batchgen job; choose an empty or new directory")
            self._scratch.make_dir()
            with manifest.writing(self._state) as file:
                file.write(orjson.dumps(plan, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        self._scratch.delete()
        self._scratch.make_dir()

    def done(self) -> dict[int, PartInfo]:
        """Every part present, by the input index of its first row: its rows and error rows (from the footer)."""
        found: dict[int, PartInfo] = {}
        for part in self.root.files(".parquet"):
            match = _PART.fullmatch(part.path.rsplit("/", 1)[-1])
            if match is not None:
                found[int(match.group(1))] = _part_info(part)
        return found

    def written(self, start: int, rows: int) -> bool:
        """Whether the chunk of `rows` rows starting at `start` already has its part (an actor retrying a block asks)."""
        part = self.part(start)
        return part.exists() and holds_chunk(_part_info(part), rows)

    def read(self, start: int) -> pa.Table:
        """The part of the chunk starting at input row `start` (`--retry-failed` merges into it)."""
        part = self.part(start)
        with part.open_read() as file:
            try:
                return pq.read_table(file)
            except (OSError, pa.ArrowException) as exc:
                raise OutputError(f"{part.text}: not a readable part file ({exc}); remove it to redo its rows") from exc

    def write(self, start: int, table: pa.Table) -> None:
        """The part of the chunk starting at input row `start`, whole or not at all."""
        with self.part(start).writing(self._scratch) as file:
            pq.write_table(table, file, write_statistics=True, dictionary_pagesize_limit=DICTIONARY_PAGE_BYTES)


def holds_chunk(part: PartInfo | None, rows: int) -> bool:
    """A part holds its chunk when it has all of the chunk's rows: one from a run with a smaller
    `--limit` holds fewer, and the chunk is done again (its new part replaces the short one)."""
    return part is not None and part.rows >= rows


def _part_info(part: Location) -> PartInfo:
    with part.open_read() as file:
        try:
            meta = pq.read_metadata(file)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"{part.text}: not a readable part file ({exc}); remove it to redo its rows") from exc
    return PartInfo(meta.num_rows, _non_null_count(meta, ERROR_COLUMN))


def _non_null_count(meta: pq.FileMetaData, column: str) -> int:
    """Rows where `column` is not null: the error rows, read from the row-group statistics."""
    leaf = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == column)
    errors = 0
    for group in range(meta.num_row_groups):
        chunk = meta.row_group(group).column(leaf)
        stats = chunk.statistics
        nulls = stats.null_count if stats is not None and stats.has_null_count else 0
        errors += chunk.num_values - nulls if stats is not None else 0
    return errors

"""Stream rows from a JSONL file (plain or gzip) or an OpenAI batch file, as `SourceRow`s.

A line that cannot be used (invalid JSON or UTF-8, not an object, a truncated last line, a
value that does not fit its column) becomes an error row naming the line; the stream goes on.

Passthrough columns and their Arrow types are inferred from the first `INFER_ROWS` good rows:
- each key's type is `pa.array(values).type`; a null-only key is `string` (also inside lists
  and structs, so `[]` in every early row still admits `["a"]` later);
- a key whose values cannot be unified into one type (`1` and `"a"`, `[1]` and `["a"]`) is
  stored as `large_string` holding each value's JSON text;
- keys first seen after those rows are not passthrough columns: they stay in `SourceRow.values`
  for the request builder, but are not copied into the output;
- a later value that does not fit its column's type (a string in an `int64` column, `1.5` in an
  `int64` column) turns its row into an error row that keeps `values`, so its id is still known.
"""

from __future__ import annotations

import dataclasses
import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa

from batchgen.errors import InputError
from batchgen.io.readers import DEFAULT_BATCH_SIZE, InputSource, SourceRow, check_batch_args

__all__ = [
    "DECODERS",
    "INFER_ROWS",
    "BatchLineDecoder",
    "JsonlSource",
    "LineDecoder",
    "OpenAIBatchSource",
    "count_lines",
    "infer_passthrough",
    "row_bytes",
    "split_lines",
]

INFER_ROWS = 1024  # fixed, not the batch size, so the output schema never depends on a tuning knob
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 20
_ARROW_ERRORS = (pa.ArrowException, OverflowError)
_BATCH_URLS = frozenset({"/v1/chat/completions", "/chat/completions"})
_MISSING = object()


def count_lines(path: str | Path) -> int:
    """Count lines by scanning 1 MiB binary chunks for newlines, without decoding anything.

    A final line without a newline counts. Blank lines count too (telling them apart would
    cost a decode), so for a file with blank lines this is an upper bound on the row count.
    """
    count, last = 0, b""
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            count += chunk.count(b"\n")
            last = chunk
    return count + (1 if last and not last.endswith(b"\n") else 0)


def infer_passthrough(rows: list[dict[str, Any]]) -> tuple[list[str], pa.Schema, frozenset[str]]:
    """Infer `(columns, passthrough schema, JSON-text columns)` from decoded rows (see the module docstring)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    fields: list[pa.Field] = []
    json_columns: set[str] = set()
    for name in columns:
        try:
            type_ = _no_nulls(pa.array([row.get(name) for row in rows]).type)
        except _ARROW_ERRORS:
            type_ = pa.large_string()
            json_columns.add(name)
        fields.append(pa.field(name, type_))
    return columns, pa.schema(fields), frozenset(json_columns)


def _no_nulls(type_: pa.DataType) -> pa.DataType:
    """Replace the `null` type (a key with only nulls or empty lists so far) by `string`, recursively."""
    if pa.types.is_null(type_):
        return pa.string()
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        item = _no_nulls(type_.value_type)
        return pa.list_(item) if pa.types.is_list(type_) else pa.large_list(item)
    if pa.types.is_struct(type_):
        return pa.struct([field.with_type(_no_nulls(field.type)) for field in type_])
    return type_


def _fits(values: list[Any], type_: pa.DataType) -> bool:
    """Whether every value converts to `type_` without changing meaning."""
    try:
        inferred = pa.array(values)
        if inferred.type == type_ or pa.types.is_null(inferred.type):
            return True
        pa.array(values, type=type_)  # strict: refuses 1 -> string and "1" -> int64
        inferred.cast(type_)  # safe cast: refuses 1.5 -> int64, which the conversion above truncates
    except _ARROW_ERRORS:
        return False
    return True


def _kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _decode_line(raw: bytes, where: str) -> tuple[Any, str | None]:
    """`(decoded JSON, None)` or `(None, message naming where and what)`.

    A UTF-8 problem is reported at its 0-based byte offset within the line.
    """
    try:
        return orjson.loads(raw), None
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return None, f"{where}: not valid UTF-8 at byte {bad.start}"
        problem = f"invalid JSON: {exc.msg} (column {exc.colno})"
        if not raw.endswith(b"\n"):
            # Only the last line of a file can lack its newline: a writer died mid-line.
            problem = f"truncated last line (no newline at end of file), {problem}"
        return None, f"{where}: {problem}"


class LineDecoder:
    """Turns one raw JSONL line into a `SourceRow` against known passthrough columns.

    Kept apart from the file so a line read anywhere (this module's streaming source, or a byte
    range of the file read by the Ray engine's blocks) decodes the same way and says the same
    things about its problems.

    Args:
        passthrough_schema: the columns carried into the output (empty while they are being inferred).
        json_columns: the columns stored as JSON text.
    """

    def __init__(self, passthrough_schema: pa.Schema, json_columns: frozenset[str]) -> None:
        self.passthrough_schema = passthrough_schema
        self.json_columns = json_columns
        # JSON-text columns take any value, so only the others need the per-batch fit check.
        self._checked = [f for f in passthrough_schema if f.name not in json_columns]

    def decode(self, index: int, where: str, raw: bytes) -> SourceRow:
        obj, error = _decode_line(raw, where)
        if error is not None:
            return SourceRow(index, where, None, error)
        if not isinstance(obj, dict):
            return SourceRow(index, where, None, f"{where}: expected a JSON object, got {_kind(obj)}")
        values, error = self.validate(obj, where)
        return SourceRow(index, where, values, error)

    def validate(self, obj: dict[str, Any], where: str) -> tuple[dict[str, Any] | None, str | None]:
        """Format-specific checks of a decoded object: `(values, error)`."""
        return obj, None

    def check_types(self, batch: list[SourceRow]) -> list[SourceRow]:
        """Turn rows whose passthrough values do not fit the inferred types into error rows."""
        good = [(row.index, row.values) for row in batch if row.error is None and row.values is not None]
        errors: dict[int, str] = {}
        for field in self._checked:
            # One conversion per column per batch; only a failing batch is checked value by value.
            if _fits([values.get(field.name) for index, values in good if index not in errors], field.type):
                continue
            for index, values in good:
                value = values.get(field.name)
                if index not in errors and value is not None and not _fits([value], field.type):
                    errors[index] = (
                        f"column {field.name!r}: value of type {_kind(value)} does not fit "
                        f"the column type {field.type} inferred from the first rows"
                    )
        if not errors:
            return batch
        return [
            dataclasses.replace(row, error=f"{row.where}: {errors[row.index]}") if row.index in errors else row
            for row in batch
        ]

    def passthrough_values(self, row: SourceRow) -> dict[str, Any]:
        """Passthrough values as stored: JSON text for JSON-text columns, None for a value that does not fit."""
        values = row.values or {}
        out: dict[str, Any] = {}
        for field in self.passthrough_schema:
            value = values.get(field.name)
            if value is not None and field.name in self.json_columns:
                value = orjson.dumps(value).decode()
            elif value is not None and row.error is not None and not _fits([value], field.type):
                value = None  # the mismatch this error row reports; the rest of the row is still kept
            out[field.name] = value
        return out

    def infer(self, rows: Iterator[tuple[int, str, bytes]], path: str) -> tuple[list[str], pa.Schema, frozenset[str]]:
        """`(columns, passthrough schema, JSON-text columns)` from the first `INFER_ROWS` good rows of `rows`.

        Raises:
            InputError: `rows` is empty, or no line decodes to a JSON object.
        """
        good: list[dict[str, Any]] = []
        first: SourceRow | None = None
        for index, where, raw in rows:
            row = self.decode(index, where, raw)
            first = first or row
            if row.error is None and row.values is not None:
                good.append(row.values)
                if len(good) >= INFER_ROWS:
                    break
        if first is None:
            raise InputError(f"{path} is empty: no data rows")
        if not good:
            raise InputError(f"{path}: no line decodes to a JSON object; the first one fails: {first.error}")
        return infer_passthrough(good)

    def for_schema(self, passthrough_schema: pa.Schema, json_columns: frozenset[str]) -> LineDecoder:
        """A decoder of the same format for these passthrough columns."""
        return type(self)(passthrough_schema, json_columns)


class BatchLineDecoder(LineDecoder):
    """OpenAI Batch API lines: `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`.

    `values` is `{"custom_id": ..., "body": {...}}`; the only passthrough column is `custom_id`.
    A line with a usable `custom_id` but another bad field keeps its values, so its error
    record can carry the id.
    """

    def validate(self, obj: dict[str, Any], where: str) -> tuple[dict[str, Any] | None, str | None]:
        custom_id = obj.get("custom_id", _MISSING)
        if custom_id is _MISSING:
            return None, f"{where}: missing field 'custom_id'"
        if not isinstance(custom_id, str) or not custom_id:
            return None, f"{where}: field 'custom_id' must be a non-empty string, got {_kind(custom_id)}"
        body = obj.get("body", _MISSING)
        values = {"custom_id": custom_id, "body": None if body is _MISSING else body}
        for name, ok, wanted in (
            ("method", obj.get("method", _MISSING) == "POST", '"POST"'),
            ("url", isinstance(url := obj.get("url"), str) and url in _BATCH_URLS, '"/v1/chat/completions"'),
            ("body", isinstance(body, dict), "a JSON object"),
        ):
            if not ok:
                got = obj.get(name, _MISSING)
                shown = "nothing (missing)" if got is _MISSING else orjson.dumps(got).decode()[:80]
                return values, f"{where}: field {name!r} must be {wanted}, got {shown}"
        return values, None

    def infer(self, rows: Iterator[tuple[int, str, bytes]], path: str) -> tuple[list[str], pa.Schema, frozenset[str]]:
        if next(rows, None) is None:
            raise InputError(f"{path} is empty: no data rows")
        return ["custom_id", "body"], pa.schema([pa.field("custom_id", pa.string())]), frozenset()


DECODERS: dict[str, type[LineDecoder]] = {"jsonl": LineDecoder, "openai-batch": BatchLineDecoder}


def split_lines(raw_lines: Iterator[bytes], first_line: int = 1) -> Iterator[tuple[int, str, bytes]]:
    """`(row index from 0, "line N", line)` for the non-blank lines; `first_line` is the file line of the first.

    A byte-order mark is dropped from the file's first line only.
    """
    index = 0
    for line_no, line in enumerate(raw_lines, start=first_line):
        if (raw := row_bytes(line_no, line)) is None:
            continue
        yield index, f"line {line_no}", raw
        index += 1


def row_bytes(line_no: int, line: bytes) -> bytes | None:
    """What file line `line_no` holds as a row: None for a blank line (not a row); a byte-order mark
    is dropped from the file's first line. The one rule of what a row is, for every reader of JSONL."""
    if line_no == 1 and line.startswith(_BOM):
        line = line[len(_BOM) :]
    return None if line.isspace() or not line else line


class JsonlSource(InputSource):
    """JSON Lines input, one object per line; `.gz` files (detected by their magic bytes) are decompressed.

    Args:
        path: the file. Lines may be of any length; blank lines are skipped but still counted
            in the "line N" locators.

    Raises:
        InputError: missing file, a directory, or no data rows ("... is empty").
    """

    format = "jsonl"

    def __init__(self, path: str) -> None:
        self.path = path
        target = Path(path)
        if not target.exists():
            raise InputError(f"{path}: input file not found")
        if target.is_dir():
            raise InputError(f"{path}: is a directory; JSONL input must be one file")
        with open(target, "rb") as file:
            self._gzip = file.read(2) == _GZIP_MAGIC
        blank = DECODERS[self.format](pa.schema([]), frozenset())
        self.columns, self.passthrough_schema, self.json_columns = blank.infer(self._raw_rows(), path)
        self.decoder = blank.for_schema(self.passthrough_schema, self.json_columns)

    def total_rows(self) -> int | None:
        """Lines counted without decoding (see `count_lines`); None for gzip files, which would need a full decompress."""
        return None if self._gzip else count_lines(self.path)

    def iter_batches(self, batch_size: int = DEFAULT_BATCH_SIZE, start: int = 0) -> Iterator[list[SourceRow]]:
        """Yield rows from `start` on; lines before `start` are counted, not decoded."""
        check_batch_args(batch_size, start)
        decoder = self.decoder
        batch: list[SourceRow] = []
        for index, where, raw in self._raw_rows():
            if index < start:
                continue
            batch.append(decoder.decode(index, where, raw))
            if len(batch) >= batch_size:
                yield decoder.check_types(batch)
                batch = []
        if batch:
            yield decoder.check_types(batch)

    def read_ids(self, column: str) -> Iterator[tuple[int, Any]]:
        """Yield `(index, value)` for every line that decodes to an object (None where the key is absent)."""
        for index, where, raw in self._raw_rows():
            obj, error = _decode_line(raw, where)
            if error is None and isinstance(obj, dict):
                yield index, obj.get(column)

    def where(self, index: int) -> str:
        """The file line of row `index` (blank lines are not rows); reads up to it, for messages only."""
        for row_index, where, _ in self._raw_rows():
            if row_index == index:
                return where
        return f"row {index}"

    def passthrough_values(self, row: SourceRow) -> dict[str, Any]:
        return self.decoder.passthrough_values(row)

    def _raw_rows(self) -> Iterator[tuple[int, str, bytes]]:
        """Yield `(index, "line N", raw line)` for the non-blank lines, streaming."""
        try:
            with self._open() as file:
                yield from split_lines(iter(file))
        except (OSError, EOFError, zlib.error) as exc:
            # gzip.BadGzipFile is an OSError; EOFError is a gzip stream cut short.
            raise InputError(f"{self.path}: cannot read the file ({exc})") from exc

    def _open(self) -> IO[bytes]:
        if self._gzip:
            return gzip.open(self.path, "rb")  # type: ignore[return-value]  # a GzipFile reads bytes
        return open(self.path, "rb")


class OpenAIBatchSource(JsonlSource):
    """OpenAI Batch API input (see `BatchLineDecoder`); the only passthrough column is `custom_id`."""

    format = "openai-batch"

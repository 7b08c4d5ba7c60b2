"""Paths and URIs as pyarrow filesystems: a local path, `file://`, `s3://`, `gs://`, `hdfs://`...

The Ray engine reads its input and writes its output through these, so a job on a cluster can
keep both on storage every node reaches. A URI's query string carries the filesystem's options
as pyarrow understands them (`s3://bucket/in.parquet?region=eu-west-1&endpoint_override=...`);
credentials come from the environment (the usual AWS / GCP variables), never from the URI we print.
"""

from __future__ import annotations

import glob
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs

__all__ = ["Location", "is_uri", "shown"]

_READ_CHUNK = 1 << 20


def is_uri(path: str) -> bool:
    """Whether `path` names a filesystem by scheme (`s3://...`) rather than a local path."""
    return "://" in path


def shown(path: str) -> str:
    """`path` as messages show it: a URI without its query string, which may hold options or secrets."""
    return path.split("?", 1)[0] if is_uri(path) else path


class Location:
    """A file or directory on some filesystem.

    Args:
        path: a local path or a URI pyarrow knows. Local paths are made absolute, so a location
            handed to another process (a Ray actor) still names the same file.
        error: the exception type for problems (InputError for inputs, OutputError for outputs).

    Raises:
        error: the URI's scheme or options are not understood.
    """

    def __init__(self, path: str, error: Callable[[str], Exception]) -> None:
        self.text = shown(path)
        self._error = error
        if is_uri(path):
            try:
                self.fs, self.path = pafs.FileSystem.from_uri(path)
            except (pa.ArrowException, ValueError, OSError) as exc:
                raise error(f"{self.text}: not a filesystem URI pyarrow can open ({exc})") from exc
        else:
            self.fs, self.path = pafs.LocalFileSystem(), os.path.abspath(path)

    def __reduce__(self) -> tuple[Any, ...]:
        # Filesystems pickle with their options; the error type travels as it is.
        return (_rebuild, (self.fs, self.path, self.text, self._error))

    def child(self, name: str) -> Location:
        """The location `name` inside this directory."""
        return _rebuild(self.fs, posixpath.join(self.path, name), posixpath.join(self.text, name), self._error)

    def info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise self._error(f"{self.text}: cannot read ({exc})") from exc

    def exists(self) -> bool:
        return bool(self.info().type != pafs.FileType.NotFound)

    def is_dir(self) -> bool:
        return bool(self.info().type == pafs.FileType.Directory)

    def files(self, suffix: str) -> list[Location]:
        """The files directly in this directory (or matching this local glob) ending in `suffix`, sorted.

        Names starting with "." or "_" are skipped: Spark, Hive and batchgen itself keep markers,
        temporary files and state there.
        """
        if "*" in self.path and isinstance(self.fs, pafs.LocalFileSystem):
            matches = sorted(p for p in glob.glob(self.path, recursive=True) if os.path.isfile(p))
            return [_rebuild(self.fs, p, p, self._error) for p in matches if p.endswith(suffix)]
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except (pa.ArrowException, OSError) as exc:
            raise self._error(f"{self.text}: cannot list ({exc})") from exc
        names = sorted(
            info.base_name for info in infos
            if info.type == pafs.FileType.File and info.base_name.endswith(suffix) and not info.base_name.startswith((".", "_"))
        )  # fmt: skip
        return [self.child(name) for name in names]

    def open_read(self) -> pa.NativeFile:
        """A random-access reader (Parquet footers, byte ranges)."""
        try:
            return self.fs.open_input_file(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise self._error(f"{self.text}: cannot open ({exc})") from exc

    def read_range(self, start: int, end: int) -> bytes:
        """The bytes `[start, end)`."""
        with self.open_read() as file:
            try:
                return bytes(file.read_at(end - start, start))
            except (pa.ArrowException, OSError) as exc:
                raise self._error(f"{self.text}: cannot read bytes {start}-{end} ({exc})") from exc

    def iter_lines(self) -> Iterator[tuple[int, bytes]]:
        """`(byte offset, line with its newline)` for every line, streamed in 1 MiB reads."""
        try:
            stream = self.fs.open_input_stream(self.path, compression=None)
        except (pa.ArrowException, OSError) as exc:
            raise self._error(f"{self.text}: cannot open ({exc})") from exc
        with stream:
            offset, rest = 0, b""
            while True:
                try:
                    chunk = stream.read(_READ_CHUNK)
                except (pa.ArrowException, OSError) as exc:
                    raise self._error(f"{self.text}: cannot read ({exc})") from exc
                if not chunk:
                    break
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    yield offset, line + b"\n"
                    offset += len(line) + 1
            if rest:
                yield offset, rest

    def make_dir(self) -> None:
        try:
            self.fs.create_dir(self.path, recursive=True)
        except (pa.ArrowException, OSError) as exc:
            raise self._error(f"{self.text}: cannot create the directory ({exc})") from exc

    def delete(self) -> None:
        """Remove this file or directory (and what it holds); nothing when it is not there."""
        try:
            kind = self.fs.get_file_info(self.path).type
            if kind == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)
            elif kind == pafs.FileType.File:
                self.fs.delete_file(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise self._error(f"{self.text}: cannot delete ({exc})") from exc

    @contextmanager
    def writing(self, scratch: Location) -> Iterator[IO[bytes]]:
        """Write this file whole or not at all: into `scratch` first, then moved into place.

        A reader never sees half a file: on a local disk the move is a rename; on object stores
        it is a copy, and an object only appears once complete.
        """
        temporary = scratch.child(f"{uuid.uuid4().hex}.tmp")
        try:
            with self.fs.open_output_stream(temporary.path, compression=None) as file:
                yield file
            self.fs.move(temporary.path, self.path)
        except (pa.ArrowException, OSError) as exc:
            temporary.delete()
            raise self._error(f"{self.text}: cannot write ({exc})") from exc
        except BaseException:
            temporary.delete()
            raise

    def __repr__(self) -> str:
        return f"Location({self.text!r})"


def _rebuild(fs: pafs.FileSystem, path: str, text: str, error: Callable[[str], Exception]) -> Location:
    location = Location.__new__(Location)
    location.fs, location.path, location.text, location._error = fs, path, text, error
    return location


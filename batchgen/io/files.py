"""Files that a crash leaves whole or absent: `atomic_file` and `fsync_dir`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from batchgen.errors import OutputError

__all__ = ["atomic_file", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    # Makes the rename itself durable. Some platforms cannot open a directory; the rename is still atomic there.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, what: str) -> Iterator[BinaryIO]:
    """Write `path` so that readers see the old file or the complete new one, never a half-written one.

    The body writes to `<path>.tmp`; on success it is flushed, fsynced, renamed over `path` and
    the directory fsynced; on any failure the `.tmp` file is removed. I/O and Arrow errors
    become `OutputError` naming `what` and the path.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except (OSError, pa.ArrowException) as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the {what} ({exc})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)  # an error of the caller's own, or an interrupt: leave no debris
        raise
    fsync_dir(path.parent)

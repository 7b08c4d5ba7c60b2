"""Files that a crash leaves whole or absent: `atomic_file` and `fsync_dir`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from batchgen.errors import OutputError

__all__ = ["atomic_file", "fsync_dir", "output_lock"]


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


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold `<output>.lock` for the block: one run at a time per output, state directory and journal.

    Two runs on one output would resend each other's rows, and the second one's start would turn
    the first one's live journal into parts under it. The lock is `flock`, so a crashed run (even
    `kill -9`) leaves no stale lock; the file is removed at the end.

    Raises:
        OutputError: another run holds the lock (its pid is named), or the lock file cannot be made.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs are not guarded there
        yield
        return
    path = output.with_name(output.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path.parent}: cannot create the output directory ({exc})") from exc
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create the lock file ({exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"{output} is being written by another batchgen run (pid {holder}); wait for it to end, or "
                "choose another output"
            ) from None
        try:  # the file we locked may have been removed by the run that just ended: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding the lock: a waiting run re-checks the inode
        os.close(fd)

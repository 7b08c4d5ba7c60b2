"""Where does `batchgen run`'s memory go? Runs the CLI in-process and logs memory by phase and over time.

    python benchmarks/memwatch.py [--interval 5] -- run --input IN --output OUT --base-url URL --model stub ...

It splits the run into phases: start-up (imports, opening the input), the duplicate-id check,
the checkpoint scan, the run itself (requests and part writes), the final merge and the exit.
For each it prints RSS at the start and the end, the peak RSS within the phase (the kernel's
high-water mark, reset at each phase boundary through `/proc/self/clear_refs`, so short spikes
count, not just what a sampler happens to see), and the bytes Arrow's memory pool holds. Every
`--interval` seconds it also prints RSS, Arrow's bytes, Python's allocated blocks
(`sys.getallocatedblocks()`, a proxy for live Python objects) and the rows written to parts.

The phases are found by wrapping the functions that do them, in the modules that define them
(`batchgen.idcheck`, `batchgen.io.parts`, `batchgen.io.merge`), before `batchgen.pipeline` is
imported: however the pipeline is split into modules, it picks up the wrapped functions. This
process is the only one patched; batchgen's code is not changed. With `--types` it also prints
the Python object types whose counts grew most between the start and the end (slow: walks `gc`).

Like `batchgen run`, it asks for jemalloc as Arrow's C++ default pool unless
`ARROW_DEFAULT_MEMORY_POOL` is set (e.g. `ARROW_DEFAULT_MEMORY_POOL=mimalloc` for Arrow's own
default); the start line says which pool is in use.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# `batchgen run` picks Arrow's C++ default pool before pyarrow loads (batchgen.cli); this script
# loads pyarrow first, so it makes the same choice here. Set the variable to measure another pool.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")

import pyarrow as pa  # noqa: E402

STARTED = time.perf_counter()


def _status_mb(key: str) -> float:
    for text in Path("/proc/self/status").read_text().splitlines():
        if text.startswith(key):
            return int(text.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS:")


def hwm_mb() -> float:
    """Peak RSS since the start, or since the last `reset_hwm()`."""
    return _status_mb("VmHWM:")


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def line(text: str) -> None:
    print(f"[memwatch {time.perf_counter() - STARTED:7.1f}s] {text}", file=sys.stderr, flush=True)


def snapshot() -> str:
    return f"rss={rss_mb():6.1f} MB arrow={pa.total_allocated_bytes() / 2**20:6.1f} MB py_blocks={sys.getallocatedblocks():>9}"


class Phases:
    """Peak RSS per phase; a phase runs from one `enter()` to the next (or to `close()`)."""

    def __init__(self) -> None:
        self.can_reset = reset_hwm()
        self.name = "start-up"
        self.started = time.perf_counter()
        self.rss_at_start = rss_mb()
        self.table: list[tuple[str, float, float, float, float]] = []  # name, seconds, start, end, peak MB
        self.lock = threading.Lock()

    def enter(self, name: str) -> None:
        with self.lock:
            now, rss, peak = time.perf_counter(), rss_mb(), hwm_mb()
            self.table.append((self.name, now - self.started, self.rss_at_start, rss, peak))
            line(f"{self.name} done ({now - self.started:.1f} s): peak {peak:.1f} MB; now {snapshot()}")
            if self.can_reset:
                reset_hwm()
            self.name, self.started, self.rss_at_start = name, now, rss

    def close(self) -> None:
        self.enter("-")

    def report(self) -> None:
        line("phase                    seconds  RSS start  RSS end  peak RSS (MB)")
        for name, seconds, start, end, peak in self.table:
            line(f"{name:<24} {seconds:>7.1f} {start:>10.1f} {end:>8.1f} {peak:>9.1f}")
        overall = max(peak for *_, peak in self.table)
        line(f"peak RSS of the whole run: {overall:.1f} MB" + ("" if self.can_reset else " (clear_refs refused: peaks are cumulative)"))


def wrap(owner: Any, name: str, before: Any = None, after: Any = None) -> None:
    """Replace `owner.name` by a wrapper that calls `before()` / `after(result)` around it."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before()
        result = original(*args, **kwargs)
        if after is not None:
            after(result, *args, **kwargs)
        return result

    setattr(owner, name, wrapper)


def type_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--types", action="store_true", help="diff Python object counts by type (slow)")
    parser.add_argument("--writes", action="store_true", help="log RSS after each part write")
    parser.add_argument("batchgen_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = [a for a in args.batchgen_args if a != "--"]

    phases = Phases()
    written = [0]
    # Patched in the defining modules before anything imports them by name (see the docstring).
    import batchgen.idcheck as idcheck
    import batchgen.io.merge as merge
    import batchgen.io.parts as parts

    wrap(idcheck, "source_ids", before=lambda: phases.enter("duplicate-id check"))
    wrap(parts, "scan_checkpoint", before=lambda: phases.enter("checkpoint scan"), after=lambda *_, **__: phases.enter("run"))
    wrap(merge, "finalize", before=lambda: phases.enter("final merge"), after=lambda *_, **__: phases.enter("exit"))

    def part_written(_path: Any, _writer: Any, records: list[Any]) -> None:
        written[0] += len(records)
        if args.writes:
            line(f"part write of {len(records)} rows: {snapshot()}")

    wrap(parts.PartWriter, "write", after=part_written)

    first_types = type_counts() if args.types else None
    stop = threading.Event()

    def monitor() -> None:
        while not stop.wait(args.interval):
            line(f"{snapshot()} written={written[0]} phase={phases.name}")

    thread = threading.Thread(target=monitor, daemon=True)
    thread.start()
    line(f"start: {snapshot()}; Arrow's C++ default pool: {pa.default_memory_pool().backend_name}")
    from batchgen.cli import main as cli_main

    code = cli_main(argv)
    stop.set()
    phases.close()
    line(f"exit {code}: {snapshot()}")
    phases.report()
    if first_types is not None:
        last = type_counts()
        growth = sorted(((last[k] - first_types.get(k, 0), k) for k in last), reverse=True)[:20]
        line("object count growth: " + ", ".join(f"{k}+{n}" for n, k in growth))
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())

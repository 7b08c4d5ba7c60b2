"""Where does `batchgen run`'s memory go? Runs the CLI in-process and logs memory by phase and over time.

    python benchmarks/memwatch.py [--interval 5] -- run --input IN --output OUT --base-url URL --model stub ...

Every `--interval` seconds it prints RSS, the bytes Arrow's memory pool holds, Python's allocated
blocks (`sys.getallocatedblocks()`, a proxy for live Python objects) and the rows done; around
the pipeline's phases (duplicate-id check, checkpoint scan, part writes, final merge, error count)
it prints RSS before and after. It wraps those functions from the outside (monkeypatching this
process only); batchgen's code is not changed. With `--types` it also prints the Python object
types whose counts grew most between the first and the last sample (slow: walks `gc`).
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

import pyarrow as pa  # noqa: E402

STARTED = time.perf_counter()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def line(text: str) -> None:
    print(f"[memwatch {time.perf_counter() - STARTED:7.1f}s] {text}", file=sys.stderr, flush=True)


def snapshot() -> str:
    return (
        f"rss={rss_mb():7.1f} MB hwm={hwm_mb():7.1f} MB arrow={pa.total_allocated_bytes() / 2**20:7.1f} MB "
        f"py_blocks={sys.getallocatedblocks():>9}"
    )


def wrap(module: Any, name: str, label: str) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        line(f"{label} start: {snapshot()}")
        try:
            return original(*args, **kwargs)
        finally:
            line(f"{label} end:   {snapshot()}")

    setattr(module, name, wrapper)


def type_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--types", action="store_true", help="diff Python object counts by type (slow)")
    parser.add_argument("--quiet-writes", action="store_true", help="do not log each part write")
    parser.add_argument("batchgen_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = [a for a in args.batchgen_args if a != "--"]

    import batchgen.io.parts as parts
    import batchgen.pipeline as pipeline

    wrap(pipeline, "find_duplicate_id", "duplicate-id check")
    wrap(pipeline, "scan_checkpoint", "checkpoint scan")
    wrap(pipeline, "finalize", "final merge")
    wrap(pipeline, "_count_errors", "error count")
    if not args.quiet_writes:
        wrap(parts.PartWriter, "write", "part write")
    state: dict[str, Any] = {}
    original_run = pipeline._Run.__init__

    def run_init(self: Any, *a: Any, **k: Any) -> None:
        original_run(self, *a, **k)
        state["run"] = self

    pipeline._Run.__init__ = run_init  # type: ignore[method-assign]

    first_types = type_counts() if args.types else None
    stop = threading.Event()

    def monitor() -> None:
        while not stop.wait(args.interval):
            run = state.get("run")
            extra = ""
            if run is not None:
                extra = f" done={run.stats.done} pending={len(run.pending)} outbox={run.outbox.qsize()}"
            line(snapshot() + extra)

    thread = threading.Thread(target=monitor, daemon=True)
    thread.start()
    line(f"start: {snapshot()}")
    from batchgen.cli import main as cli_main

    code = cli_main(argv)
    stop.set()
    line(f"exit {code}: {snapshot()}; peak (ru_maxrss) {hwm_mb():.1f} MB")
    if first_types is not None:
        last = type_counts()
        growth = sorted(((last[k] - first_types.get(k, 0), k) for k in last), reverse=True)[:20]
        line("object count growth: " + ", ".join(f"{k}+{n}" for n, k in growth))
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())

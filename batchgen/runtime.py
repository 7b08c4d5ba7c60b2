"""Process settings for the duration of a job (`lean_gc`), and the cores this process may use."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["available_cores", "lean_gc"]

GEN0_THRESHOLD = 10_000


@contextmanager
def lean_gc() -> Iterator[None]:
    """Collect garbage less often for the duration, then restore the caller's settings.

    Each request allocates hundreds of short-lived objects (aiohttp, JSON), so with the default
    threshold of 700 the collector ran ~440 times per 20k rows of `batchgen run` and took ~7% of
    the CPU; frozen start-up objects and a 10k threshold cut that to ~1% (benchmarks/README.md).
    Memory stays flat: the objects are freed by reference counting, not by the collector.
    """
    thresholds = gc.get_threshold()
    gc.freeze()  # the imported modules are never garbage: stop traversing them
    gc.set_threshold(GEN0_THRESHOLD, thresholds[1], thresholds[2])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container's
    cpuset), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1

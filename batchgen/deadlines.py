"""`Deadlines`: the per-attempt timeout of many concurrent requests, kept by one timer.

aiohttp's `ClientTimeout(total=...)` arms a timer for every request (a heap push, a cancel and a
context manager around each one): measured at 7% of a run's wall time against a fast server
(200k rows, concurrency 64). Here an attempt only writes its deadline in a dict, and one timer,
`tick` seconds apart, cancels the tasks whose deadline has passed. The attempt turns that
cancellation into `APITimeoutError`, as `asyncio.timeout` turns its own into `TimeoutError`
(`Task.uncancel`), so a cancellation from anywhere else still propagates.

A deadline fires within one tick after it is due: the tick is a tenth of the timeout, at most 1 s.
The timer runs only while attempts are in flight.

    task = deadlines.start()
    try:
        ...                                   # the attempt's awaits
    except asyncio.CancelledError:
        if deadlines.expired(task):
            raise APITimeoutError(...) from None
        raise
    finally:
        deadlines.finish(task)
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["Deadlines"]

_MAX_TICK_S = 1.0


class Deadlines:
    """Deadlines of the attempts in flight, all tasks of one event loop.

    Args:
        timeout: seconds one attempt may take.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._tick = min(_MAX_TICK_S, timeout / 10)
        # task → (deadline, the task's cancel count at the start: what is not ours to take back)
        self._due: dict[asyncio.Task[Any], tuple[float, int]] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> asyncio.Task[Any]:
        """The current task starts an attempt: its deadline is `timeout` from now."""
        # The loop is remembered: asyncio.get_running_loop() makes a getpid() system call on
        # Python 3.11, per row. A task of the remembered loop proves it is the running one.
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None:  # the first attempt, or a new loop (asyncio.run again)
            loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
            assert task is not None  # an attempt always runs in a task
            if loop is not self._loop:  # what an old loop left (attempts that never finished) is void
                self._loop, self._timer = loop, None
                self._due.clear()
                self._expired.clear()
        assert loop is not None
        self._due[task] = (loop.time() + self.timeout, task.cancelling())
        if self._timer is None:
            self._timer = loop.call_later(self._tick, self._sweep)
        return task

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """On a `CancelledError` in `task`: True when it was this deadline's alone (then raise a timeout)."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        _, cancels_before = self._due.get(task, (0.0, 0))
        return task.uncancel() <= cancels_before  # another cancel (an abort) is also pending: it wins

    def finish(self, task: asyncio.Task[Any]) -> None:
        """The attempt is over, however it ended."""
        self._due.pop(task, None)
        if task in self._expired:
            # Cancelled by its deadline, but the CancelledError was turned into another error on
            # the way out: take back the cancel request, or a later `asyncio.timeout` miscounts.
            self._expired.discard(task)
            task.uncancel()

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        try:
            now = loop.time()
            for task, (due, _) in self._due.items():
                if due <= now and task not in self._expired and not task.done():
                    self._expired.add(task)
                    task.cancel()
        finally:  # one failure must not switch every deadline off
            self._timer = loop.call_later(self._tick, self._sweep) if self._due else None

"""`WorkerPool`: N coroutines that send requests concurrently and report one `Outcome` each.

A bounded inbox gives backpressure to whoever feeds it (the reader never runs far ahead); each
worker handles one request at a time, so at most `concurrency` requests are in flight, and a slow
or retrying row only occupies its own worker. A failure is a value (`Outcome.error`), not an
exception: only cancellation stops a worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from batchgen.errors import APIError, UnexpectedError
from batchgen.rows import RowRequest
from batchgen.types import ChatCompletionResponse

__all__ = ["Outcome", "WorkerPool"]

_DONE: Any = object()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one request: a response, or the error that ended its last attempt."""

    request: RowRequest
    response: ChatCompletionResponse | None
    error: APIError | None
    attempts: int
    latency_s: float


Send = Callable[[RowRequest], Awaitable[ChatCompletionResponse]]


class WorkerPool:
    """Runs `send` over submitted requests with at most `concurrency` in flight.

    Args:
        send: sends one request and returns the response (retrying inside), or raises APIError.
        concurrency: the number of workers, which is the in-flight bound.
        on_outcome: awaited with every outcome, in completion order (it may block: backpressure).
        queue_factor: the inbox holds `concurrency * queue_factor` waiting requests.

    Example:
        pool = WorkerPool(send, 64, on_outcome=outbox.put)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(pool.run())
            for request in requests:
                await pool.submit(request)
            await pool.close()
    """

    def __init__(
        self,
        send: Send,
        concurrency: int,
        *,
        on_outcome: Callable[[Outcome], Awaitable[None]],
        queue_factor: int = 2,
    ) -> None:
        self._send = send
        self._on_outcome = on_outcome
        self.concurrency = concurrency
        self._inbox: asyncio.Queue[RowRequest] = asyncio.Queue(maxsize=concurrency * queue_factor)
        self.in_flight = 0
        self.max_in_flight = 0
        self.stopping = False  # send nothing more; queued requests are dropped (a rerun resends them)
        self._leave = False  # stop at once, even before the inbox is drained
        self._tasks: list[asyncio.Task[None]] = []

    async def submit(self, request: RowRequest) -> None:
        """Queue one request; waits while the inbox is full."""
        await self._inbox.put(request)

    async def close(self) -> None:
        """No more requests: each worker stops once the inbox is drained."""
        for _ in range(self.concurrency):
            await self._inbox.put(_DONE)

    def stop(self) -> None:
        """Send nothing more: requests in flight finish, queued ones are dropped; `close()` still ends the run."""
        self.stopping = True

    def abort(self) -> None:
        """Stop now: cancel the requests in flight too (Ctrl-C). `close()` is not needed afterwards."""
        self.stopping = self._leave = True
        for task in self._tasks:
            task.cancel()

    async def run(self) -> None:
        """Run the workers until `close()` has been called and every request is done (or `abort()`)."""
        async with asyncio.TaskGroup() as group:
            self._tasks = [group.create_task(self._worker()) for _ in range(self.concurrency)]

    async def _worker(self) -> None:
        inbox, send, on_outcome = self._inbox, self._send, self._on_outcome
        # `_leave` is checked as well as cancellation: a request whose timeout fires in the same
        # loop step as the cancel raises its timeout instead, and the worker must still leave.
        while not self._leave:
            request = await inbox.get()
            if request is _DONE:
                return
            if self.stopping:
                continue
            self.in_flight += 1
            if self.in_flight > self.max_in_flight:
                self.max_in_flight = self.in_flight
            started = time.perf_counter()
            try:
                response = await send(request)
            except APIError as exc:
                outcome = Outcome(request, None, exc, exc.attempts, time.perf_counter() - started)
            except Exception as exc:  # a bug must cost one row (reported), never every worker
                error = UnexpectedError(f"unexpected {type(exc).__name__}: {exc}")
                outcome = Outcome(request, None, error, 1, time.perf_counter() - started)
            else:
                outcome = Outcome(request, response, None, response.attempts, time.perf_counter() - started)
            finally:
                self.in_flight -= 1
            await on_outcome(outcome)

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
from typing import Any

from batchgen.control import RunControl, StopCause
from batchgen.errors import APIError, UnexpectedError
from batchgen.records import Outcome, RowRequest
from batchgen.types import Reply

__all__ = ["Send", "WorkerPool"]

_DONE: Any = object()


Send = Callable[[RowRequest], Awaitable[Reply[Any]]]


class WorkerPool:
    """Runs `send` over submitted requests with at most `concurrency` in flight.

    Args:
        send: sends one request and returns its reply (retrying inside), or raises APIError.
        concurrency: the number of workers, which is the in-flight bound.
        on_outcome: called with every outcome, in completion order; what it returns, when not None,
            is awaited before the worker takes its next request (backpressure). A plain function
            returning None costs no coroutine per row; an async function works too.
        queue_factor: the inbox holds `concurrency * queue_factor` waiting requests.
        control: the run's stop state (a new one when not given): draining drops queued requests
            and lets in-flight ones finish; aborting cancels them too.

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
        on_outcome: Callable[[Outcome], Awaitable[object] | None],
        queue_factor: int = 2,
        control: RunControl | None = None,
    ) -> None:
        self._send = send
        self._on_outcome = on_outcome
        self.concurrency = concurrency
        self.control = control if control is not None else RunControl()
        self.control.on_abort(self._cancel_workers)
        self._inbox: asyncio.Queue[RowRequest] = asyncio.Queue(maxsize=concurrency * queue_factor)
        self.in_flight = 0  # shown by the progress display
        self._tasks: list[asyncio.Task[None]] = []

    async def submit(self, request: RowRequest) -> None:
        """Queue one request; waits while the inbox is full."""
        await self._inbox.put(request)

    def try_submit(self, request: RowRequest) -> bool:
        """Queue one request if the inbox has room now; False when it is full (then `await submit`)."""
        inbox = self._inbox
        if inbox.full():
            return False
        inbox.put_nowait(request)
        return True

    @property
    def queued(self) -> int:
        """Requests waiting for a worker."""
        return self._inbox.qsize()

    async def close(self) -> None:
        """No more requests: each worker stops once the inbox is drained (at once after an abort)."""
        for _ in range(self.concurrency):
            if self.control.aborted:  # no worker is left to make room in the inbox
                return
            await self._inbox.put(_DONE)

    def stop(self) -> None:
        """Send nothing more: requests in flight finish, queued ones are dropped; `close()` still ends the run."""
        self.control.drain(StopCause.REQUESTED)

    def abort(self) -> None:
        """Stop now: cancel the requests in flight too. `close()` is not needed afterwards."""
        self.control.abort(StopCause.REQUESTED)

    def _cancel_workers(self) -> None:
        for task in self._tasks:
            task.cancel()
        # Queued requests will never be sent (a rerun sends them): emptying the inbox lets a
        # producer blocked on a full inbox (`submit`, `close`) go on and see the abort.
        inbox = self._inbox
        while not inbox.empty():
            inbox.get_nowait()

    async def run(self) -> None:
        """Run the workers until `close()` has been called and every request is done (or `abort()`)."""
        async with asyncio.TaskGroup() as group:
            self._tasks = [group.create_task(self._worker()) for _ in range(self.concurrency)]

    async def _worker(self) -> None:
        inbox, send, on_outcome, control = self._inbox, self._send, self._on_outcome, self.control
        # The state is checked as well as cancellation: a request whose timeout fires in the same
        # loop step as the cancel raises its timeout instead, and the worker must still leave.
        while not control.aborted:
            # get_nowait when a request waits: no coroutine built per row.
            request = inbox.get_nowait() if inbox.qsize() else await inbox.get()
            if request is _DONE:
                return
            if not control.sending:
                continue  # draining: queued requests are dropped (a rerun sends them)
            self.in_flight += 1
            started = time.perf_counter()
            try:
                reply = await send(request)
            except APIError as exc:
                outcome = Outcome(request, None, exc, exc.attempts, time.perf_counter() - started)
            except Exception as exc:  # a bug must cost one row (reported), never every worker
                error = UnexpectedError(f"unexpected {type(exc).__name__}: {exc}")
                outcome = Outcome(request, None, error, 1, time.perf_counter() - started)
            else:
                outcome = Outcome(request, reply, None, reply.attempts, time.perf_counter() - started)
            finally:
                self.in_flight -= 1
            waiting = on_outcome(outcome)
            if waiting is not None:
                await waiting

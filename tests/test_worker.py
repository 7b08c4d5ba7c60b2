"""`WorkerPool`, through its public methods only: the in-flight bound holds, every request gives one
outcome, failures become values, and stop / abort / close end a run the way they promise.

The fake `send` holds each request on its own `asyncio.Event`, so a test decides when each request
finishes and observes concurrency at the moment of entry; nothing waits on the clock. Every test
runs under `asyncio.timeout`, so a pool that hangs fails the test instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import pytest

from batchgen.errors import APIError, APITimeoutError, BadRequestError, ServerError, UnexpectedError
from batchgen.records import Outcome, RowRequest
from batchgen.types import Reply
from batchgen.worker import WorkerPool

GUARD_S = 5  # only a hang guard: no test waits on time


def _request(i: int) -> RowRequest:
    return RowRequest(i, f"r{i}", {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]})


def _response(i: int, attempts: int = 1) -> Reply[dict[str, Any]]:
    return Reply({"response_id": f"c{i}"}, attempts, 0.01, None, b"{}")


def _value(reply: Reply[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if reply is None else reply.value


class GatedSend:
    """A fake `send`: each request waits for its own gate, so the test decides when it finishes."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.sent: list[int] = []
        self.cancelled: list[int] = []
        self.entered: asyncio.Queue[int] = asyncio.Queue()
        self.gates: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.swallow_cancel = False  # turn a cancel into a timeout, as a request racing its own timeout does

    async def __call__(self, request: RowRequest) -> Reply[dict[str, Any]]:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.sent.append(request.index)
        self.entered.put_nowait(request.index)
        try:
            await self.gates[request.index].wait()
        except asyncio.CancelledError:
            self.cancelled.append(request.index)
            if self.swallow_cancel:
                raise APITimeoutError("read timeout") from None
            raise
        finally:
            self.active -= 1
        return _response(request.index)

    def release(self, *indexes: int) -> None:
        for i in indexes:
            self.gates[i].set()

    async def wait_entered(self, count: int) -> list[int]:
        return [await self.entered.get() for _ in range(count)]


class Recorder:
    """`on_outcome`: keeps every outcome and lets a test await the next one."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self._queue: asyncio.Queue[Outcome] = asyncio.Queue()

    async def __call__(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self._queue.put_nowait(outcome)

    async def next(self) -> Outcome:
        return await self._queue.get()

    @property
    def indexes(self) -> list[int]:
        return [o.request.index for o in self.outcomes]


async def _submit_all(pool: WorkerPool, indexes: Iterable[int], *, close: bool = True) -> None:
    for i in indexes:
        await pool.submit(_request(i))
    if close:
        await pool.close()


# ---------------------------------------------------------------- the in-flight bound


@pytest.mark.parametrize(("concurrency", "total", "queue_factor"), [(1, 6, 1), (3, 20, 2), (5, 12, 4)])
async def test_in_flight_requests_never_exceed_the_concurrency(concurrency: int, total: int, queue_factor: int) -> None:
    send, record = GatedSend(), Recorder()
    pool = WorkerPool(send, concurrency, on_outcome=record, queue_factor=queue_factor)
    async with asyncio.timeout(GUARD_S), asyncio.TaskGroup() as group:
        run = group.create_task(pool.run())
        group.create_task(_submit_all(pool, range(total)))
        holding = await send.wait_entered(concurrency)  # the pool fills up ...
        assert send.active == concurrency
        finished = 0
        while holding:
            # ... and stays full: each release lets exactly one more request in.
            send.release(holding.pop(0))
            await record.next()
            finished += 1
            if finished + len(holding) < total:
                holding += await send.wait_entered(1)
            assert send.active <= concurrency
        await run
    assert send.peak == concurrency
    assert sorted(send.sent) == list(range(total))


async def test_outcomes_come_in_completion_order() -> None:
    send, record = GatedSend(), Recorder()
    pool = WorkerPool(send, 3, on_outcome=record)
    async with asyncio.timeout(GUARD_S), asyncio.TaskGroup() as group:
        group.create_task(pool.run())
        group.create_task(_submit_all(pool, range(3)))
        assert sorted(await send.wait_entered(3)) == [0, 1, 2]
        for i in (2, 0, 1):
            send.release(i)
            assert (await record.next()).request.index == i
    assert record.indexes == [2, 0, 1]


# ---------------------------------------------------------------- one outcome per request; failures are values


async def test_every_request_gives_exactly_one_outcome() -> None:
    gate = asyncio.Event()

    async def send(request: RowRequest) -> Reply[dict[str, Any]]:
        i = request.index
        if i in (0, 4, 8):
            await gate.wait()  # these finish last, after every other request was submitted
        if i % 3 == 0:
            raise ServerError(503, "busy")
        if i % 7 == 0:
            raise RuntimeError("a bug")
        return _response(i)

    record = Recorder()
    pool = WorkerPool(send, 8, on_outcome=record)
    total = 200
    async with asyncio.timeout(GUARD_S), asyncio.TaskGroup() as group:
        run = group.create_task(pool.run())

        async def feed() -> None:
            await _submit_all(pool, range(total), close=False)
            gate.set()
            await pool.close()

        group.create_task(feed())
        await run
    assert Counter(record.indexes) == Counter(range(total))
    for outcome in record.outcomes:
        i = outcome.request.index
        assert outcome.request == _request(i)
        if i % 3 == 0:
            assert isinstance(outcome.error, ServerError) and outcome.reply is None
        elif i % 7 == 0:
            assert isinstance(outcome.error, UnexpectedError) and outcome.reply is None
        else:
            assert outcome.error is None and _value(outcome.reply) == _value(_response(i))


async def test_a_success_carries_the_response_and_its_attempts() -> None:
    async def send(request: RowRequest) -> Reply[dict[str, Any]]:
        return _response(request.index, attempts=3)

    record = Recorder()
    pool = WorkerPool(send, 2, on_outcome=record)
    async with asyncio.timeout(GUARD_S):
        await asyncio.gather(pool.run(), _submit_all(pool, [0]))
    [outcome] = record.outcomes
    assert _value(outcome.reply) == _value(_response(0, attempts=3))
    assert (outcome.error, outcome.attempts) == (None, 3)
    assert outcome.latency_s >= 0


async def test_an_api_error_becomes_the_outcome_error() -> None:
    error = BadRequestError(400, "max_tokens is too large")
    error.attempts = 4

    async def send(request: RowRequest) -> Reply[dict[str, Any]]:
        raise error

    record = Recorder()
    pool = WorkerPool(send, 2, on_outcome=record)
    async with asyncio.timeout(GUARD_S):
        await asyncio.gather(pool.run(), _submit_all(pool, [0]))
    [outcome] = record.outcomes
    assert outcome.error is error
    assert (outcome.reply, outcome.attempts) == (None, 4)
    assert outcome.latency_s >= 0


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (ValueError("boom"), "unexpected ValueError: boom"),
        (KeyError("choices"), "unexpected KeyError: 'choices'"),
        (AssertionError(), "unexpected AssertionError: "),
    ],
)
async def test_any_other_exception_is_an_unexpected_error_and_the_pool_survives(exc: Exception, message: str) -> None:
    async def send(request: RowRequest) -> Reply[dict[str, Any]]:
        if request.index < 2:
            raise exc
        return _response(request.index)

    record = Recorder()
    pool = WorkerPool(send, 1, on_outcome=record)  # one worker: it must survive both failures
    async with asyncio.timeout(GUARD_S):
        await asyncio.gather(pool.run(), _submit_all(pool, range(4)))
    assert record.indexes == [0, 1, 2, 3]
    for outcome in record.outcomes[:2]:
        assert type(outcome.error) is UnexpectedError
        assert isinstance(outcome.error, APIError)
        assert outcome.error.message == message
        assert (outcome.reply, outcome.attempts) == (None, 1)
    assert [_value(o.reply) for o in record.outcomes[2:]] == [_value(_response(2)), _value(_response(3))]


# ---------------------------------------------------------------- close, stop, abort


async def test_close_ends_an_idle_run() -> None:
    record = Recorder()
    pool = WorkerPool(GatedSend(), 4, on_outcome=record)
    async with asyncio.timeout(GUARD_S):
        await asyncio.gather(pool.run(), pool.close())
    assert record.outcomes == []


async def test_close_lets_queued_requests_finish_before_run_ends() -> None:
    send, record = GatedSend(), Recorder()
    pool = WorkerPool(send, 2, on_outcome=record, queue_factor=3)
    async with asyncio.timeout(GUARD_S):
        run = asyncio.create_task(pool.run())
        await _submit_all(pool, range(6), close=False)
        closing = asyncio.create_task(pool.close())
        send.release(*range(6))
        await closing
        await run
    assert sorted(record.indexes) == list(range(6))
    assert all(o.error is None for o in record.outcomes)


async def test_stop_lets_in_flight_requests_finish_and_drops_queued_ones() -> None:
    send, record = GatedSend(), Recorder()
    pool = WorkerPool(send, 2, on_outcome=record, queue_factor=2)
    async with asyncio.timeout(GUARD_S):
        run = asyncio.create_task(pool.run())
        await _submit_all(pool, range(2), close=False)
        assert sorted(await send.wait_entered(2)) == [0, 1]
        await _submit_all(pool, range(2, 6), close=False)  # queued behind the two in flight
        pool.stop()
        send.release(0, 1)
        await pool.close()  # still what ends the run
        await run
    assert sorted(record.indexes) == [0, 1]  # the in-flight ones finished, with their outcomes
    assert all(o.reply is not None for o in record.outcomes)
    assert sorted(send.sent) == [0, 1]  # nothing queued was sent
    assert send.cancelled == []


async def test_nothing_is_sent_after_stop() -> None:
    send, record = GatedSend(), Recorder()
    pool = WorkerPool(send, 3, on_outcome=record)
    async with asyncio.timeout(GUARD_S):
        pool.stop()
        await asyncio.gather(pool.run(), _submit_all(pool, range(5)))
    assert send.sent == [] and record.outcomes == []


async def test_abort_cancels_in_flight_requests_and_ends_the_run_without_close() -> None:
    send, record = GatedSend(), Recorder()
    pool = WorkerPool(send, 3, on_outcome=record, queue_factor=2)
    async with asyncio.timeout(GUARD_S):
        run = asyncio.create_task(pool.run())
        await _submit_all(pool, range(3), close=False)
        assert sorted(await send.wait_entered(3)) == [0, 1, 2]
        await _submit_all(pool, range(3, 7), close=False)
        pool.abort()
        await run  # ends, and without raising
    assert sorted(send.cancelled) == [0, 1, 2]
    assert sorted(send.sent) == [0, 1, 2]
    assert send.active == 0
    assert record.outcomes == []


async def test_abort_ends_the_run_even_when_a_request_turns_the_cancel_into_an_error() -> None:
    # A request whose own timeout fires in the same step as the cancel raises its timeout instead.
    send, record = GatedSend(), Recorder()
    send.swallow_cancel = True
    pool = WorkerPool(send, 1, on_outcome=record, queue_factor=4)
    async with asyncio.timeout(GUARD_S):
        run = asyncio.create_task(pool.run())
        await _submit_all(pool, range(4), close=False)
        assert await send.wait_entered(1) == [0]
        pool.abort()
        await run
    assert send.sent == [0]  # the queued requests were not sent after the abort
    assert [type(o.error) for o in record.outcomes] == [APITimeoutError]


async def test_an_abort_while_close_waits_on_a_full_inbox_ends_close_too() -> None:
    # Every row is queued and close() waits for room in the inbox; the abort cancels the workers,
    # so nobody would make room: close() must end as well (it hung a Ctrl-C'd run forever).
    send, record = GatedSend(), Recorder()
    pool = WorkerPool(send, 2, on_outcome=record, queue_factor=2)
    async with asyncio.timeout(GUARD_S):
        run = asyncio.create_task(pool.run())
        await _submit_all(pool, range(2), close=False)
        await send.wait_entered(2)
        await _submit_all(pool, range(2, 6), close=False)  # the inbox (2 x 2) is full
        closing = asyncio.create_task(pool.close())
        await asyncio.sleep(0)
        assert not closing.done()  # waiting for room
        pool.abort()
        await closing
        await run
    assert sorted(send.sent) == [0, 1] and record.outcomes == []


async def test_abort_of_an_idle_pool_ends_the_run() -> None:
    send, record = GatedSend(), Recorder()
    pool = WorkerPool(send, 2, on_outcome=record)
    async with asyncio.timeout(GUARD_S):
        run = asyncio.create_task(pool.run())
        await pool.submit(_request(0))
        await send.wait_entered(1)
        send.release(0)
        await record.next()  # the workers are now all waiting on the empty inbox
        pool.abort()
        await run
    assert record.indexes == [0]
    assert send.cancelled == []

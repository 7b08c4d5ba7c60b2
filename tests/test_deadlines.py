"""`Deadlines` (one timer for every attempt's timeout), alone and inside `Client`.

An attempt that outlives its deadline ends as a timeout within one tick; an attempt that finishes
in time is untouched; a cancellation from elsewhere (an abort) is never mistaken for a timeout;
the task's cancel count is left as it was found. Every test runs under `asyncio.timeout`, and
waits on events, not on the clock, except where the clock is what is tested.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from batchgen import Client
from batchgen.deadlines import Deadlines
from batchgen.errors import APITimeoutError


class _TimedOut(Exception):
    pass


async def _attempt(deadlines: Deadlines, hold: asyncio.Event) -> str:
    """The shape every attempt has in the client, around a wait on `hold`."""
    task = deadlines.start()
    try:
        await hold.wait()
    except asyncio.CancelledError:
        if deadlines.expired(task):
            raise _TimedOut from None
        raise
    finally:
        deadlines.finish(task)
    return "done"


async def test_a_late_attempt_times_out_within_a_tick_and_the_others_finish() -> None:
    deadlines = Deadlines(0.2)  # tick 0.02 s
    never, soon = asyncio.Event(), asyncio.Event()
    async with asyncio.timeout(10):
        started = time.perf_counter()
        late = asyncio.create_task(_attempt(deadlines, never))
        quick = asyncio.create_task(_attempt(deadlines, soon))
        await asyncio.sleep(0)
        soon.set()
        assert await quick == "done"
        with pytest.raises(_TimedOut):
            await late
        elapsed = time.perf_counter() - started
    assert 0.2 <= elapsed < 0.2 + 0.02 + 0.2  # due, plus one tick, plus a loaded machine's slack
    assert late.cancelling() == 0  # the cancel request was taken back


async def test_a_cancel_from_elsewhere_is_not_a_timeout() -> None:
    deadlines = Deadlines(60.0)
    never = asyncio.Event()
    async with asyncio.timeout(10):
        task = asyncio.create_task(_attempt(deadlines, never))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_an_abort_in_the_same_step_as_the_deadline_wins() -> None:
    deadlines = Deadlines(60.0)
    never = asyncio.Event()
    async with asyncio.timeout(10):
        task = asyncio.create_task(_attempt(deadlines, never))
        await asyncio.sleep(0)
        deadlines._due[task] = (0.0, 0)  # due long ago: the next sweep cancels it
        deadlines._sweep()
        task.cancel()  # an abort lands in the same loop step, before the task resumes
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_an_attempt_that_swallows_the_cancel_leaves_no_cancel_request() -> None:
    deadlines = Deadlines(0.05)

    async def swallowing() -> None:
        task = deadlines.start()
        try:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise RuntimeError("turned into another error on the way out") from None
        finally:
            deadlines.finish(task)

    async with asyncio.timeout(10):
        task = asyncio.create_task(swallowing())
        with pytest.raises(RuntimeError):
            await task
    assert task.cancelling() == 0


async def test_the_timer_stops_when_nothing_is_in_flight() -> None:
    deadlines = Deadlines(0.05)
    done = asyncio.Event()
    done.set()
    assert await _attempt(deadlines, done) == "done"
    async with asyncio.timeout(10):
        while deadlines._timer is not None:  # one sweep finds nothing due and does not re-arm
            await asyncio.sleep(0.01)


async def test_a_task_that_already_carries_a_cancel_count_still_times_out() -> None:
    """A cancel caught earlier (and not taken back) is not ours to take back: the deadline is still a timeout."""
    deadlines = Deadlines(0.05)

    async def cleanup_after_a_cancel() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # swallowed without uncancel(): cancelling() stays 1
        await _attempt(deadlines, asyncio.Event())

    async with asyncio.timeout(10):
        task = asyncio.create_task(cleanup_after_a_cancel())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(_TimedOut):
            await task


def test_what_a_closed_loop_left_does_not_stop_the_next_loops_deadlines() -> None:
    deadlines = Deadlines(0.05)
    old = asyncio.new_event_loop()
    stale = old.create_task(_attempt(deadlines, asyncio.Event()))
    old.run_until_complete(asyncio.sleep(0.01))  # the attempt started, and is never finished
    assert stale in deadlines._due
    old.close()  # without cancelling it, as an embedding may do

    async def once() -> None:
        with pytest.raises(_TimedOut):
            async with asyncio.timeout(10):  # a sweep that died on the stale task would hang here
                await _attempt(deadlines, asyncio.Event())

    asyncio.run(once())
    assert stale not in deadlines._due


def test_a_client_times_out_on_two_event_loops_in_turn() -> None:
    """`asyncio.run` twice with one `Deadlines`: the second loop gets its own timer."""
    deadlines = Deadlines(0.05)
    for _ in range(2):

        async def once() -> None:
            with pytest.raises(_TimedOut):
                async with asyncio.timeout(10):
                    await _attempt(deadlines, asyncio.Event())

        asyncio.run(once())


async def test_client_requests_time_out_as_api_timeout_errors_and_fast_ones_pass() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("stream"):  # one event, then silence: the deadline covers the whole stream
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
                                 b'"choices":[{"index":0,"delta":{"content":"o"},"finish_reason":null}]}\n\n')
            await release.wait()
            return response
        if body["messages"][0]["content"] == "slow":
            await release.wait()
        return web.json_response(
            {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
        )  # fmt: skip

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with asyncio.timeout(20), Client(f"http://127.0.0.1:{port}/v1", timeout=0.3, max_retries=0) as client:
            create = client.chat.completions.create
            slow = asyncio.create_task(create(model="m", messages=[{"role": "user", "content": "slow"}]))
            fast = await create(model="m", messages=[{"role": "user", "content": "fast"}])
            assert fast.content == "ok"
            with pytest.raises(APITimeoutError, match="timed out"):
                await slow
            stream_body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            with pytest.raises(APITimeoutError, match="timed out"):
                await client.complete(stream_body)  # read to its end in this task: under one deadline
    finally:
        release.set()
        await runner.cleanup()

"""`RateLimiter`: configured quotas are kept evenly (with a little margin), the servers'
announced `x-ratelimit-*` quotas are followed, and no quota costs nothing."""

from __future__ import annotations

import asyncio

import pytest

from batchgen.ratelimit import TARGET, RateLimiter, parse_reset


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5), ("", None), ("soon", None),
     ("5x", None), ("-1", None)],
)
def test_reset_values_in_openais_duration_format(text: str, seconds: float | None) -> None:
    assert parse_reset(text) == seconds


async def test_requests_per_minute_are_paced_evenly_just_under_the_limit() -> None:
    time = FakeTime()
    limiter = RateLimiter(600, None, clock=time.clock, sleep=time.sleep)
    sent = []
    for _ in range(301):
        await limiter.acquire()
        sent.append(time.now)
    rate = 300 / (sent[-1] - sent[0]) * 60
    assert 600 * 0.95 <= rate <= 600 and rate == pytest.approx(600 * TARGET)
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert min(gaps) == pytest.approx(max(gaps))  # no burst: a provider's per-second slice never overflows


async def test_tokens_per_minute_weigh_each_request_by_its_cost() -> None:
    time = FakeTime()
    limiter = RateLimiter(None, 60_000, clock=time.clock, sleep=time.sleep)
    for _ in range(11):
        await limiter.acquire(tokens=1_000)
    # 10 requests of 1,000 tokens after the first: 10,000 tokens at 1,000 × 0.98 tokens per second.
    assert time.now == pytest.approx(10_000 / (1_000 * TARGET))


async def test_a_servers_announced_quota_holds_requests_until_its_reset() -> None:
    time = FakeTime()
    limiter = RateLimiter(clock=time.clock, sleep=time.sleep)
    assert limiter.idle
    limiter.observe({"x-ratelimit-remaining-requests": "2", "x-ratelimit-reset-requests": "3s"})
    assert not limiter.idle
    await limiter.acquire()
    await limiter.acquire()
    assert time.now == 0.0  # two were left
    await limiter.acquire()
    assert time.now == pytest.approx(3.0)  # the third waited for the reset instead of meeting a 429
    limiter.observe({"x-ratelimit-remaining-tokens": "500", "x-ratelimit-reset-tokens": "20ms"})
    assert limiter.counts_tokens
    await limiter.acquire(tokens=400)
    before = time.now
    await limiter.acquire(tokens=400)
    assert time.now - before == pytest.approx(0.02)


async def test_waiters_are_served_in_arrival_order() -> None:
    time = FakeTime()
    limiter = RateLimiter(60, None, clock=time.clock, sleep=time.sleep)
    order: list[int] = []

    async def one(number: int) -> None:
        await limiter.acquire()
        order.append(number)

    await asyncio.gather(*(one(n) for n in range(5)))
    assert order == [0, 1, 2, 3, 4]


async def test_with_the_limit_announced_the_quota_is_followed_as_it_refills() -> None:
    time = FakeTime()
    limiter = RateLimiter(clock=time.clock, sleep=time.sleep)
    limiter.in_flight = 3  # three requests on their way: the server may not have counted them yet
    limiter.observe({"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "5",
                     "x-ratelimit-reset-requests": "1s"})  # fmt: skip
    sent = []
    for _ in range(12):
        await limiter.acquire()
        sent.append(round(time.now, 6))
    # 5 left less the 3 in flight: 2 go at once, then one per 0.1 s as 600/min refills (followed at 98%).
    assert sent[:2] == [0.0, 0.0]
    assert [b - a for a, b in zip(sent[2:], sent[3:])] == pytest.approx([0.1 / TARGET] * 9, abs=1e-5)

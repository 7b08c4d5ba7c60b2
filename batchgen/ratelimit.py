"""`RateLimiter`: requests- and tokens-per-minute quotas kept on the client side, and the server's own.

Hosted OpenAI-compatible APIs enforce quotas per minute and answer 429 past them; a bulk job that
only reacts to 429s spends its retries and its time on them. Two sources of pace:

* **Configured** (`--max-requests-per-minute`, `--max-tokens-per-minute`): requests are paced
  evenly, a request every 60 / rpm seconds and tokens at tpm / 60 per second, with no burst above
  one request: providers enforce their per-minute limits over shorter slices (OpenAI: "quantized"),
  so a minute's worth sent at once is refused even when the minute's total is within the quota.
  The pace is `TARGET` of the limit, so the network's jitter between our clock and the server's
  never turns an on-time request into an early one.
* **Announced**: a server that sends `x-ratelimit-remaining-requests` / `-tokens` (OpenAI, Azure,
  many gateways) says how much is left, and with `x-ratelimit-limit-*` how fast it comes back
  (limit / 60 per second). Requests go while the quota, so followed, has room for them, less what
  is still in flight (the server may not have counted it yet), and wait for it otherwise instead of
  meeting a 429.

A request's token cost is what providers count at admission: the prompt (estimated from the body's
bytes with the ratio the answers' usage teaches, `workload.WorkEstimate`) plus `max_tokens`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping

__all__ = ["TARGET", "RateLimiter", "parse_reset"]

TARGET = 0.98  # of a configured limit: pacing exactly at it meets 429s from jitter alone
_RESET = re.compile(r"(?:(\d+(?:\.\d+)?)(ms|h|m|s))")


def parse_reset(value: str | None) -> float | None:
    """OpenAI's `x-ratelimit-reset-*` value in seconds: "1s", "6m0s", "20ms", "1h2m3.5s", or a bare number of seconds."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
        return seconds if seconds >= 0 else None
    except ValueError:
        pass
    parts = _RESET.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(number) * scale[unit] for number, unit in parts)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number >= 0 else None


class _Announced:
    """What a server said is left of one quota (requests or tokens), followed as a bucket.

    With `x-ratelimit-limit-*` (a per-minute limit) the quota refills at limit / 60 per second from
    what was left, OpenAI's model; without it, what was left lasts until the reset, and then the
    next answer says anew.
    """

    __slots__ = ("at", "left", "rate", "reset_at", "spent")

    def __init__(self) -> None:
        self.left: float | None = None
        self.rate: float | None = None
        self.at = 0.0
        self.reset_at = 0.0
        self.spent = 0.0

    def heard(self, left: float | None, limit: float | None, reset: float | None, now: float, unseen: float) -> None:
        """`unseen`: what we sent that the server may not have counted yet (requests in flight)."""
        if left is None:
            return
        self.left, self.at, self.spent = left, now, unseen
        self.rate = limit / 60.0 * TARGET if limit else None
        self.reset_at = now + (reset if reset is not None else 1.0)

    def wait(self, cost: float, now: float) -> float:
        """Seconds to wait before spending `cost` of it (0: go)."""
        left = self.left
        if left is None:
            return 0.0
        if self.rate is None:
            if now >= self.reset_at:
                self.left = None  # the window it spoke of is over: the next answer says anew
                return 0.0
            return 0.0 if self.spent + cost <= left else self.reset_at - now
        available = left + (now - self.at) * self.rate - self.spent
        return 0.0 if available >= cost else (cost - available) / self.rate


class RateLimiter:
    """Paces requests to the configured quotas and to what servers announce.

    Args:
        requests_per_minute / tokens_per_minute: configured quotas, or None.
        clock / sleep: injectable for tests.

    Example:
        limiter = RateLimiter(600, None)
        await limiter.acquire(tokens=120.0)   # before each attempt
        limiter.observe(response.headers)     # after each response
    """

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = asyncio.sleep,
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._clock = clock
        self._sleep = sleep
        self._request_gap = 60.0 / (requests_per_minute * TARGET) if requests_per_minute else 0.0
        self._token_rate = tokens_per_minute * TARGET / 60.0 if tokens_per_minute else 0.0
        self._next_request = 0.0  # the earliest time the next request may go (requests quota)
        self._next_tokens = 0.0  # the earliest time the token quota has room again
        self._requests = _Announced()
        self._tokens = _Announced()
        self._turn = asyncio.Lock()  # one request waits for the quota at a time: first come, first served
        # Requests sent and not yet answered (the pool counts them): a server's "remaining" may not
        # include them yet, so they are taken off it; tokens alike.
        self.in_flight = 0
        self.tokens_in_flight = 0.0
        self.waited_s = 0.0  # time spent waiting, for the summary

    @property
    def idle(self) -> bool:
        """No quota to keep (none configured, none announced): `acquire` would return at once."""
        return not self._request_gap and not self._token_rate and self._requests.left is None and self._tokens.left is None

    @property
    def counts_tokens(self) -> bool:
        """Whether requests need a token estimate (a token quota, configured or announced)."""
        return bool(self.tokens_per_minute) or self._tokens.left is not None

    async def acquire(self, tokens: float = 0.0) -> None:
        """Wait until one request of `tokens` fits every quota, then count it as sent."""
        async with self._turn:
            while (delay := self._delay(tokens, self._clock())) > 0:
                self.waited_s += delay
                await self._sleep(delay)  # type: ignore[misc]
            now = self._clock()
            if self._request_gap:
                self._next_request = max(self._next_request, now) + self._request_gap
            if self._token_rate:
                self._next_tokens = max(self._next_tokens, now) + tokens / self._token_rate
            self._requests.spent += 1
            self._tokens.spent += tokens

    def _delay(self, tokens: float, now: float) -> float:
        return max(
            self._next_request - now,
            self._next_tokens - now,
            self._requests.wait(1, now),
            self._tokens.wait(tokens, now),
            0.0,
        )

    def observe(self, headers: Mapping[str, str]) -> None:
        """Take in what a response's `x-ratelimit-*` headers say is left (absent headers change nothing)."""
        left = headers.get("x-ratelimit-remaining-requests")
        tokens_left = headers.get("x-ratelimit-remaining-tokens")
        if left is None and tokens_left is None:
            return
        now, get = self._clock(), headers.get
        self._requests.heard(_number(left), _number(get("x-ratelimit-limit-requests")),
                             parse_reset(get("x-ratelimit-reset-requests")), now, self.in_flight)
        self._tokens.heard(_number(tokens_left), _number(get("x-ratelimit-limit-tokens")),
                           parse_reset(get("x-ratelimit-reset-tokens")), now, self.tokens_in_flight)  # fmt: skip

"""Requests- and tokens-per-minute quotas enforced the way a hosted OpenAI-compatible API does (pure, no I/O).

vLLM has no rate limiter; hosted APIs and gateways do, and answer 429 past it. `Quota` decides, for one chat
request at a time, whether it is admitted, and gives the ``x-ratelimit-*`` headers OpenAI sends on every
answer (and ``retry-after`` on a refusal). The mock server (`mock_server`) wires it in when
`MockConfig.requests_per_minute` or `tokens_per_minute` is set.

Model: one token bucket per limit, refilled continuously at ``limit / 60`` per second, holding at most
``limit * window_s / 60`` (at least one request for the requests bucket). OpenAI enforces per-minute limits
over shorter slices ("quantized": 600 RPM may be enforced as 10 per second), so the default 1 s window
refuses a minute's quota sent at once, while a client pacing at exactly the limit never meets a 429: each
request finds the bucket refilled by what the previous one took. A request is admitted when every bucket
holds ``min(cost, capacity)``; its whole cost is then taken, so a request bigger than a bucket waits for a
full bucket and leaves it in debt (the average rate still holds). A refused request takes nothing, and a
request asking for more tokens than a whole minute's limit is refused for good ("Request too large").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["QuotaDecision", "Quota", "format_duration", "format_seconds", "request_cost"]

_EPSILON: Final = 1e-6  # a request paced at exactly the limit must not lose to float rounding
_ORGANIZATION: Final = "org-mock"
_LEARN_MORE: Final = "Visit https://platform.openai.com/account/rate-limits to learn more."


def request_cost(prompt_tokens: int, max_tokens: int | None, n: int = 1) -> int:
    """The tokens a request is charged at admission: its prompt plus ``n`` times its max tokens.

    This is the estimate OpenAI's limiter counts (the answer's real length is not known yet); without
    ``max_tokens``/``max_completion_tokens`` only the prompt is charged.
    """
    return prompt_tokens + n * (max_tokens or 0)


def _milliseconds(seconds: float) -> int:
    # Rounded up, so a client that waits what it is told is never early; the inner round() keeps
    # 0.020000000001 s at 20 ms.
    return max(0, math.ceil(round(seconds * 1000, 6)))


def _seconds_text(ms: int) -> str:
    whole, frac = divmod(ms, 1000)
    return f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)


def format_seconds(seconds: float) -> str:
    """A delay as a ``retry-after`` value: seconds, to the millisecond above (``"2"``, ``"0.25"``)."""
    return _seconds_text(_milliseconds(seconds))


def format_duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format (Go's ``time.Duration``), to the millisecond above.

    ``0`` -> ``"0s"``, ``0.02`` -> ``"20ms"``, ``1`` -> ``"1s"``, ``1.5`` -> ``"1.5s"``, ``360`` -> ``"6m0s"``,
    ``3723.5`` -> ``"1h2m3.5s"``.
    """
    ms = _milliseconds(seconds)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    text = _seconds_text(rest) + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


class _Bucket:
    """One limit: `level` units left of `capacity`, refilled at `rate` per second."""

    __slots__ = ("capacity", "level", "limit", "rate", "updated")

    def __init__(self, limit: int, capacity: float, now: float) -> None:
        self.limit = limit
        self.capacity = capacity
        self.rate = limit / 60.0
        self.level = capacity
        self.updated = now

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)  # a clock that steps back refills nothing
        self.level = min(self.capacity, self.level + elapsed * self.rate)
        self.updated = now

    def wait(self, cost: float) -> float:
        """Seconds until a request costing `cost` fits (0: now)."""
        missing = min(cost, self.capacity) - self.level
        return 0.0 if missing <= _EPSILON else missing / self.rate

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.level + _EPSILON))

    @property
    def used(self) -> int:
        return max(0, math.ceil(self.capacity - self.level - _EPSILON))

    @property
    def reset_s(self) -> float:
        """Seconds until the bucket is full again: OpenAI's "resets to its initial state"."""
        return max(0.0, self.capacity - self.level) / self.rate


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """What `Quota.admit` decided about one request.

    Attributes:
        admitted: False means answer 429 with `message` and `limit_type` (``"requests"`` or ``"tokens"``).
        headers: the ``x-ratelimit-*`` headers to send, plus ``retry-after`` on a refusal that can succeed later.
        retry_after_s: seconds until the request would fit; None when admitted or when it never can.
    """

    admitted: bool
    headers: dict[str, str]
    limit_type: str | None = None
    message: str | None = None
    retry_after_s: float | None = None


class Quota:
    """Per-minute request and token quotas (model in the module doc). The caller serialises calls.

    Args:
        requests_per_minute / tokens_per_minute: the limits; None leaves that kind unlimited (and unannounced).
        window_s: the slice the limits are enforced over, in (0, 60]; a bucket holds ``limit * window_s / 60``.
        clock: seconds, monotonic; injectable so tests can drive time.

    Example:
        quota = Quota(requests_per_minute=60, tokens_per_minute=None)
        decision = quota.admit(tokens=120, model="mock-model")   # once per chat request
    """

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        *,
        window_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < window_s <= 60:
            raise ValueError(f"quota window must be in (0, 60] seconds, got {window_s}")
        for name, limit in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {limit!r}")
        self.window_s = window_s
        self.clock = clock
        now = clock()
        share = window_s / 60.0
        # A request is indivisible: the requests bucket always holds at least one.
        self._requests = (
            _Bucket(requests_per_minute, max(1.0, requests_per_minute * share), now) if requests_per_minute else None
        )
        self._tokens = _Bucket(tokens_per_minute, tokens_per_minute * share, now) if tokens_per_minute else None

    @property
    def requests_per_minute(self) -> int | None:
        return self._requests.limit if self._requests is not None else None

    @property
    def tokens_per_minute(self) -> int | None:
        return self._tokens.limit if self._tokens is not None else None

    def _buckets(self) -> list[tuple[str, _Bucket]]:
        pairs = (("requests", self._requests), ("tokens", self._tokens))
        return [(kind, bucket) for kind, bucket in pairs if bucket is not None]

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers as things stand, for the configured kinds only (OpenAI's names)."""
        now = self.clock()
        headers: dict[str, str] = {}
        for kind, bucket in self._buckets():
            bucket.refill(now)
            headers[f"x-ratelimit-limit-{kind}"] = str(bucket.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(bucket.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = format_duration(bucket.reset_s)
        return headers

    def admit(self, tokens: int, model: str) -> QuotaDecision:
        """Admit one request costing `tokens` (see `request_cost`) and take its cost, or refuse it."""
        now = self.clock()
        for _, bucket in self._buckets():
            bucket.refill(now)
        if self._tokens is not None and tokens > self._tokens.limit:
            message = (
                f"Request too large for {model} in organization {_ORGANIZATION} on tokens per min (TPM): "
                f"Limit {self._tokens.limit}, Requested {tokens}. The input or output tokens must be reduced "
                f"in order to run successfully. {_LEARN_MORE}"
            )
            return QuotaDecision(False, self.headers(), "tokens", message)
        waits = [(bucket.wait(1 if kind == "requests" else tokens), kind, bucket) for kind, bucket in self._buckets()]
        longest = max(waits, key=lambda w: w[0], default=None)
        if longest is None or longest[0] == 0.0:
            if self._requests is not None:
                self._requests.level -= 1
            if self._tokens is not None:
                self._tokens.level -= tokens
            return QuotaDecision(True, self.headers())
        wait, kind, bucket = longest
        name = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        requested = 1 if kind == "requests" else tokens
        message = (
            f"Rate limit reached for {model} in organization {_ORGANIZATION} on {name}: Limit {bucket.limit}, "
            f"Used {bucket.used}, Requested {requested}. Please try again in {format_duration(wait)}. {_LEARN_MORE}"
        )
        headers = {**self.headers(), "retry-after": format_seconds(wait)}
        return QuotaDecision(False, headers, kind, message, wait)

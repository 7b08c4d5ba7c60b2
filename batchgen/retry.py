"""When and how long to wait before trying a failed request again (pure; no I/O).

Three small pieces, each tested on its own (the openai-python pattern): `parse_retry_after`
reads the server's wish, `backoff_delay` computes the wait, `should_retry` decides.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

from batchgen import _constants as C
from batchgen.errors import APIError, ConfigError

__all__ = ["RetryPolicy", "backoff_delay", "parse_retry_after", "should_retry"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How many times to retry and how long to wait in between.

    Args:
        max_retries: retries after the first attempt (0 = try once).
        backoff_base: the first backoff in seconds; it doubles per retry.
        backoff_max: the cap on a computed backoff.
        max_retry_after: the cap on a server-requested delay (Retry-After / retry-after-ms).

    Example:
        RetryPolicy(max_retries=3, backoff_base=0.25)
    """

    max_retries: int = C.DEFAULT_MAX_RETRIES
    backoff_base: float = C.DEFAULT_BACKOFF_BASE
    backoff_max: float = C.DEFAULT_BACKOFF_MAX
    max_retry_after: float = C.DEFAULT_MAX_RETRY_AFTER

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_base < 0 or self.backoff_max < 0 or self.max_retry_after < 0:
            raise ConfigError("backoff_base, backoff_max and max_retry_after must be >= 0")


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The delay a server asked for, in seconds, or None.

    Reads `retry-after-ms` (milliseconds), then `Retry-After` as seconds or as an HTTP date.
    Junk and negative values are ignored.
    """
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            ms = float(value)
            if ms >= 0:
                return ms / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
        return seconds if seconds >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(retry: int, policy: RetryPolicy, retry_after: float | None = None) -> float:
    """Seconds to wait before retry number `retry` (1-based).

    A server-requested delay wins, capped at `policy.max_retry_after`; otherwise exponential
    backoff with jitter, so many workers that failed together do not retry in lockstep.
    """
    if retry_after is not None:
        return min(retry_after, policy.max_retry_after)
    delay = min(policy.backoff_base * 2.0 ** (retry - 1), policy.backoff_max)
    return delay * (1.0 - 0.25 * random.random())


def should_retry(error: APIError, retries_done: int, policy: RetryPolicy) -> bool:
    """True when `error` is worth another try and the budget allows one."""
    return retries_done < policy.max_retries and error.is_retryable()

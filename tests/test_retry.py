"""The retry trio: parse the server's wish, compute the delay, decide."""

from __future__ import annotations

import email.utils

import pytest

from batchgen.errors import (
    APIConnectionError,
    APITimeoutError,
    ConfigError,
    IncompleteResponseError,
    ResponseTooLargeError,
    status_error,
)
from batchgen.retry import RetryPolicy, backoff_delay, parse_retry_after, should_retry


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "200", "retry-after": "9"}, 0.2),
        ({"retry-after-ms": "junk", "retry-after": "2"}, 2.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-4"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"retry-after": past}, now=now) == 0.0


def test_backoff_grows_and_is_capped_with_jitter() -> None:
    policy = RetryPolicy(backoff_base=0.5, backoff_max=8.0)
    for retry, nominal in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 8.0)]:
        for _ in range(50):
            delay = backoff_delay(retry, policy)
            assert 0.75 * nominal <= delay <= nominal


def test_server_delay_wins_but_is_capped() -> None:
    policy = RetryPolicy(max_retry_after=60.0)
    assert backoff_delay(1, policy, retry_after=5.0) == 5.0
    assert backoff_delay(1, policy, retry_after=600.0) == 60.0


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (status_error(408, "x"), True),
        (status_error(429, "x"), True),
        (status_error(500, "x"), True),
        (status_error(502, "x"), True),
        (status_error(503, "x"), True),
        (status_error(504, "x"), True),
        (status_error(400, "x"), False),
        (status_error(401, "x"), False),
        (status_error(403, "x"), False),
        (status_error(404, "x"), False),
        (status_error(422, "x"), False),
        (status_error(501, "x"), False),
        (APIConnectionError("reset"), True),
        (APITimeoutError("slow"), True),
        (IncompleteResponseError("cut"), True),
        (ResponseTooLargeError("big"), False),
    ],
)
def test_should_retry_table(error: Exception, retryable: bool) -> None:
    policy = RetryPolicy(max_retries=2)
    assert should_retry(error, 0, policy) is retryable  # type: ignore[arg-type]
    assert should_retry(error, 2, policy) is False  # budget spent  # type: ignore[arg-type]


def test_policy_rejects_negative_values() -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(max_retries=-1)

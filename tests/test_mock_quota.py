"""The mock's OpenAI-style quotas: the pure `Quota` under a fake clock, then the same rules over HTTP."""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchgen.ratelimit import parse_reset
from batchgen.retry import parse_retry_after
from batchgen.testing import MockConfig, MockServer, add_arguments
from batchgen.testing.mock_quota import Quota, format_duration, format_seconds, request_cost
from batchgen.testing.mock_server import _config_from_args

from .conftest import StartServer

RATE_HEADERS = tuple(
    f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset") for kind in ("requests", "tokens")
)
LEARN_MORE = "Visit https://platform.openai.com/account/rate-limits to learn more."


class FakeClock:
    """Monotonic seconds that only move when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (-1.0, "0s"),
        (0.0004, "1ms"),  # rounded up: a client that waits this long is never early
        (0.02, "20ms"),
        (0.020000000001, "20ms"),
        (0.999, "999ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (59.999, "59.999s"),
        (60.0, "1m0s"),
        (360.0, "6m0s"),
        (3723.5, "1h2m3.5s"),
        (85656.648, "23h47m36.648s"),
    ],
)
def test_reset_durations_use_openais_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_reset(text) == pytest.approx(max(seconds, 0.0), abs=0.001)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.0, "0"), (1.0, "1"), (0.25, "0.25"), (0.0101, "0.011"), (90.5, "90.5")]
)
def test_retry_after_is_seconds_rounded_up_to_the_millisecond(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text
    assert parse_retry_after({"retry-after": text}) >= seconds  # type: ignore[operator]


def test_request_cost_is_prompt_plus_n_times_max_tokens() -> None:
    assert request_cost(10, 5) == 15
    assert request_cost(10, 5, n=3) == 25
    assert request_cost(10, None, n=3) == 10  # without max tokens only the prompt is charged


# ---------------------------------------------------------------- the pure Quota


def test_a_burst_past_a_slice_gets_refused_with_the_wait() -> None:
    clock = FakeClock()
    quota = Quota(requests_per_minute=600, tokens_per_minute=None, clock=clock)  # 10 per 1 s slice
    decisions = [quota.admit(5, "m") for _ in range(12)]
    assert [d.admitted for d in decisions] == [True] * 10 + [False] * 2
    assert decisions[0].headers == {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "100ms",
    }
    refused = decisions[10]
    assert refused.limit_type == "requests" and refused.retry_after_s == pytest.approx(0.1)
    assert refused.headers["retry-after"] == "0.1"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "1s"
    assert refused.message == (
        "Rate limit reached for m in organization org-mock on requests per min (RPM): Limit 600, Used 10, "
        f"Requested 1. Please try again in 100ms. {LEARN_MORE}"
    )
    clock.advance(0.1)  # exactly the wait asked for
    assert quota.admit(5, "m").admitted
    assert not quota.admit(5, "m").admitted


def test_a_one_minute_window_lets_a_whole_minute_through_at_once() -> None:
    quota = Quota(requests_per_minute=60, tokens_per_minute=None, window_s=60, clock=FakeClock())
    assert sum(quota.admit(1, "m").admitted for _ in range(61)) == 60


def test_the_requests_bucket_holds_at_least_one_request() -> None:
    clock = FakeClock()
    quota = Quota(requests_per_minute=30, tokens_per_minute=None, clock=clock)  # half a request per slice
    assert quota.admit(1, "m").admitted
    refused = quota.admit(1, "m")
    assert not refused.admitted and refused.retry_after_s == pytest.approx(2.0)
    clock.advance(2.0)
    assert quota.admit(1, "m").admitted


def test_tokens_are_charged_and_announced() -> None:
    clock = FakeClock()
    quota = Quota(requests_per_minute=None, tokens_per_minute=6000, clock=clock)  # 100 tokens a slice, 100/s
    first = quota.admit(60, "m")
    assert first.admitted and first.headers == {
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "40",
        "x-ratelimit-reset-tokens": "600ms",
    }
    refused = quota.admit(60, "m")
    assert not refused.admitted and refused.limit_type == "tokens"
    assert refused.retry_after_s == pytest.approx(0.2)
    assert "on tokens per min (TPM): Limit 6000, Used 60, Requested 60. Please try again in 200ms." in str(
        refused.message
    )
    clock.advance(0.2)
    assert quota.admit(60, "m").admitted


def test_a_request_bigger_than_a_slice_waits_for_a_full_bucket_and_leaves_a_debt() -> None:
    clock = FakeClock()
    quota = Quota(requests_per_minute=None, tokens_per_minute=600, clock=clock)  # 10 tokens a slice, 10/s
    assert quota.admit(25, "m").admitted  # a full bucket admits it; 15 tokens of debt
    assert quota.headers()["x-ratelimit-remaining-tokens"] == "0"
    refused = quota.admit(1, "m")
    assert not refused.admitted and refused.retry_after_s == pytest.approx(1.6)
    clock.advance(1.6)
    assert quota.admit(1, "m").admitted
    clock.advance(0.5)
    assert not quota.admit(25, "m").admitted  # 5.5 tokens: not full, so the big one waits
    clock.advance(0.5)
    assert quota.admit(25, "m").admitted


def test_a_request_over_a_minutes_tokens_is_refused_for_good() -> None:
    quota = Quota(requests_per_minute=60, tokens_per_minute=1000, window_s=60, clock=FakeClock())
    refused = quota.admit(1001, "m")
    assert not refused.admitted and refused.limit_type == "tokens" and refused.retry_after_s is None
    assert "retry-after" not in refused.headers
    assert refused.message == (
        "Request too large for m in organization org-mock on tokens per min (TPM): Limit 1000, Requested 1001. "
        f"The input or output tokens must be reduced in order to run successfully. {LEARN_MORE}"
    )
    assert quota.headers()["x-ratelimit-remaining-requests"] == "60"  # it took nothing


def test_the_longer_wait_names_the_limit() -> None:
    quota = Quota(requests_per_minute=60, tokens_per_minute=600, clock=FakeClock())  # 1 request, 10 tokens
    assert quota.admit(10, "m").admitted
    refused = quota.admit(10, "m")  # requests: 1 s to wait; tokens: 1 s; the tie keeps requests
    assert refused.limit_type == "requests"
    assert set(refused.headers) == {*RATE_HEADERS, "retry-after"}


@settings(max_examples=60, deadline=None)
@given(
    rpm=st.integers(1, 100_000),
    tpm=st.integers(1_000, 10_000_000),
    window_s=st.sampled_from([0.1, 1.0, 10.0, 60.0]),
    costs=st.lists(st.integers(1, 1_000), min_size=1, max_size=200),
)
def test_pacing_at_exactly_the_limit_never_meets_a_429(rpm: int, tpm: int, window_s: float, costs: list[int]) -> None:
    """A client that sends one request every 60 / rpm s, and waits cost / (tpm / 60) s after each, as
    `batchgen.ratelimit` does at TARGET = 1, is always admitted."""
    clock = FakeClock(0.0)
    quota = Quota(rpm, tpm, window_s=window_s, clock=clock)
    next_request = next_tokens = 0.0
    for cost in costs:
        clock.now = max(next_request, next_tokens, clock.now)
        decision = quota.admit(cost, "m")
        assert decision.admitted, decision.message
        next_request = clock.now + 60.0 / rpm
        next_tokens = clock.now + cost / (tpm / 60.0)


@settings(max_examples=60, deadline=None)
@given(
    rpm=st.integers(1, 6_000),
    window_s=st.sampled_from([0.5, 1.0, 60.0]),
    gaps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=300),
    span=st.floats(0.01, 120.0),
)
def test_no_span_admits_more_than_a_bucket_plus_its_refill(
    rpm: int, window_s: float, gaps: list[float], span: float
) -> None:
    """A greedy client (it retries at random moments) gets at most capacity + rate * T requests in any T seconds."""
    clock = FakeClock(0.0)
    quota = Quota(rpm, None, window_s=window_s, clock=clock)
    admitted: list[float] = []
    for gap in gaps:
        clock.advance(gap)
        if quota.admit(1, "m").admitted:
            admitted.append(clock.now)
    capacity = max(1.0, rpm * window_s / 60)
    for i, start in enumerate(admitted):
        inside = sum(1 for t in admitted[i:] if t - start <= span)
        assert inside <= capacity + rpm / 60 * span + 1e-6


def test_invalid_quotas_are_refused() -> None:
    for bad in ({"requests_per_minute": 0}, {"tokens_per_minute": -5}, {"requests_per_minute": True},
                {"quota_window_s": 0}, {"quota_window_s": 61}):  # fmt: skip
        with pytest.raises(ValueError):
            MockConfig(**bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- over HTTP



@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def start_server(start_server: StartServer, clock: FakeClock) -> StartServer:
    """The shared fixture's servers, on this module's fake clock."""

    async def start(**config: Any) -> MockServer:
        return await start_server(clock=clock, **config)

    return start


def chat(text: str = "hello there world", **extra: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": [{"role": "user", "content": text}], **extra}


async def post(
    session: aiohttp.ClientSession, server: MockServer, body: dict[str, Any], **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(f"{server.url}/chat/completions", json=body, headers=headers) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


async def test_a_burst_gets_429s_with_openais_body_and_headers(
    start_server: StartServer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    server = await start_server(requests_per_minute=120, tokens_per_minute=60_000)  # 2 requests, 1000 tokens a slice
    body = chat(max_tokens=7)  # 3 prompt words + 7 = 10 tokens
    answers = [await post(session, server, body) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 429]
    for status, headers, _ in answers:
        assert set(RATE_HEADERS) <= set(headers), status
    assert answers[0][1]["x-ratelimit-remaining-requests"] == "1"
    assert answers[0][1]["x-ratelimit-remaining-tokens"] == "990"
    assert answers[0][1]["x-ratelimit-reset-tokens"] == "10ms"
    _, headers, raw = answers[2]
    assert headers["retry-after"] == "0.5" and headers["x-ratelimit-remaining-requests"] == "0"
    assert "retry-after" not in answers[0][1]
    assert orjson.loads(raw) == {
        "error": {
            "message": "Rate limit reached for mock-model in organization org-mock on requests per min (RPM): "
            f"Limit 120, Used 2, Requested 1. Please try again in 500ms. {LEARN_MORE}",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert server.state.rate_limited == 1
    assert server.state.admissions == [(clock.now, 10), (clock.now, 10)]
    assert len(server.state.requests) == 3  # every arrival is recorded, admitted or not
    clock.advance(0.5)  # what retry-after said
    assert (await post(session, server, body))[0] == 200


async def test_a_streamed_answer_carries_the_headers(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(requests_per_minute=60)
    status, headers, raw = await post(session, server, chat(stream=True))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["x-ratelimit-limit-requests"] == "60" and headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-tokens" not in headers  # only the configured kind is announced
    assert raw.endswith(b"data: [DONE]\n\n")
    status, headers, _ = await post(session, server, chat(stream=True))
    assert status == 429 and headers["retry-after"] == "1"


async def test_the_capacity_model_streams_with_the_headers(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(requests_per_minute=60, batch_slots=2, step_ms=0, step_ms_per_request=0)
    for body in (chat(stream=True), chat()):
        status, headers, _ = await post(session, server, body)
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert status == (200 if body.get("stream") else 429)


async def test_a_client_pacing_at_the_limit_gets_no_429(
    start_server: StartServer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    server = await start_server(requests_per_minute=600, tokens_per_minute=6_000)  # 10 requests, 100 tokens a s
    for i in range(40):
        cost = 4 + (i % 4) * 10  # 3 prompt words + max_tokens
        assert (await post(session, server, chat(max_tokens=cost - 3)))[0] == 200
        clock.advance(max(60 / 600, cost / (6_000 / 60)))
    assert server.state.rate_limited == 0
    most_requests, most_tokens = server.state.max_admitted(60.0)
    assert most_requests == 40 and most_tokens == sum(4 + (i % 4) * 10 for i in range(40))
    assert server.state.max_admitted(1.0)[1] <= 100 + 100  # a slice plus a second's refill


async def test_only_chat_requests_count(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(requests_per_minute=60)
    root = server.url.removesuffix("/v1")
    for _ in range(3):
        async with session.get(f"{server.url}/models") as resp:
            assert resp.status == 200 and "x-ratelimit-limit-requests" not in resp.headers
        async with session.post(f"{root}/tokenize", json={"prompt": "a b"}) as resp:
            assert resp.status == 200 and "x-ratelimit-limit-requests" not in resp.headers
        for path in ("/health", "/metrics", "/version"):
            async with session.get(f"{root}{path}") as resp:
                assert resp.status == 200
    status, headers, _ = await post(session, server, chat())
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"


async def test_refused_requests_take_nothing_and_invalid_ones_are_not_charged(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(requests_per_minute=60, max_model_len=16)
    status, headers, _ = await post(session, server, chat("word " * 20))  # too long: a 400, still announced
    assert status == 400 and headers["x-ratelimit-remaining-requests"] == "1"
    assert (await post(session, server, chat()))[0] == 200
    assert server.state.rate_limited == 0 and len(server.state.admissions) == 1


async def test_a_forced_429_fault_is_not_a_quota_refusal(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(requests_per_minute=600)
    status, headers, _ = await post(session, server, chat(), **{"x-mock-faults": "429"})
    assert status == 429 and headers["x-ratelimit-remaining-requests"] == "9"  # admitted, then the fault
    assert server.state.rate_limited == 0 and server.state.faults_injected["429"] == 1


async def test_without_quotas_nothing_is_announced_but_admissions_are_timed(
    start_server: StartServer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    server = await start_server()
    status, headers, _ = await post(session, server, chat(max_tokens=5, n=2))
    assert status == 200 and not any(h.startswith("x-ratelimit") for h in headers)
    assert server.state.admissions == [(clock.now, 3 + 2 * 5)]
    server.state.reset()
    assert server.state.admissions == [] and server.state.rate_limited == 0


def test_max_admitted_looks_at_every_window() -> None:
    from batchgen.testing import MockState

    state = MockState()
    state.admissions.extend([(0.0, 5), (0.5, 5), (1.0, 1), (1.2, 1), (1.4, 100), (5.0, 1)])
    assert state.max_admitted(1.0) == (4, 107)  # [0.5, 1.5): 4 requests, 107 tokens
    assert state.max_admitted(0.5) == (3, 102)  # [1.0, 1.5)
    assert state.max_admitted(10.0) == (6, 113)
    assert MockState().max_admitted(1.0) == (0, 0)


def test_command_line_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = _config_from_args(parser.parse_args([]))
    assert (config.requests_per_minute, config.tokens_per_minute, config.quota_window_s) == (None, None, 1.0)
    assert not config.quota_on
    args = parser.parse_args(["--requests-per-minute", "500", "--tokens-per-minute", "90000", "--quota-window-s", "60"])
    config = _config_from_args(args)
    assert (config.requests_per_minute, config.tokens_per_minute, config.quota_window_s) == (500, 90_000, 60.0)
    assert config.quota_on

"""A mock vLLM OpenAI-compatible server on aiohttp.web, for tests, demos and benchmarks (no GPU needed).

Run it in-process (`make_app`, `MockServer`), in a background thread for sync code
(`mock_server_thread`), or from a shell: ``python -m batchgen.testing.mock_server --port 8001``.
Answers are deterministic functions of the request (rules in `mock_replies`), so a test can check
exactly what reached the server; `MockState` records the requests and the concurrency seen.

Faults: each chat attempt gets one with probability `MockConfig.fault_rate`, drawn from the state's
seeded RNG. A request can force faults instead with the header ``x-mock-faults: 500,429,disconnect``:
the k-th kind applies to attempt k and later attempts succeed. A retry is told apart by its body, not by
a header (batchgen sends none): attempt k is the k-th arrival of the same body bytes with that header since
the last `MockState.reset`, so two rows with byte-identical bodies share one count. Only requests that
pass validation get faults, so a 4xx is never masked.

Capacity model (off by default): with `MockConfig.batch_slots` or `kv_tokens` set, chat requests that get
no fault run on simulated engines with batch slots, a KV budget and a waiting queue (rules in
`mock_engine`): a plain answer is sent when its request finishes, a stream sends each step's chunk when the
step produces it. The bodies are the same; only the timing changes. ``GET /metrics`` reports the load in
vLLM's Prometheus format (engine on or off) and ``POST /mock/capacity`` changes the capacity of a running
mock (`MockServer.set_capacity` in-process).

Quotas (off by default; rules in `mock_quota`): with `MockConfig.requests_per_minute` or `tokens_per_minute`
set, chat requests past the quota get OpenAI's 429 and every chat answer carries OpenAI's ``x-ratelimit-*``
headers. Context window: chat requests that do not fit `MockConfig.max_model_len` get vLLM's 400s, and
``POST /tokenize`` counts prompt tokens exactly as chat usage does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import EllipsisType, TracebackType
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from batchgen.testing.mock_engine import (
    METRICS_CONTENT_TYPE,
    Capacity,
    EngineGroup,
    EngineLoad,
    render_metrics,
)
from batchgen.testing.mock_quota import Quota, QuotaDecision, request_cost
from batchgen.testing.mock_replies import (
    MAX_MODEL_LEN,
    ChatPlan,
    RequestRejected,
    StreamEvent,
    completion_body,
    error_body,
    generation_steps,
    models_body,
    parse_body,
    plan_chat,
    stream_events,
    tokenize_body,
)

__all__ = [
    "FAULT_KINDS",
    "MockConfig",
    "MockServer",
    "MockState",
    "add_arguments",
    "main",
    "make_app",
    "mock_server_thread",
]

FAULT_KINDS: Final = ("429", "500", "503", "disconnect", "stall", "malformed", "truncated")
MOCK_VERSION: Final = "0.16.0-mock"
FORCED_FAULTS_HEADER: Final = "x-mock-faults"
_SHUTDOWN_GRACE_S: Final = 1.0  # in-flight handlers (a stall, a slow stream) get this long on close
_MAX_BODY_BYTES: Final = 64 * 1024 * 1024  # vLLM has no small body cap; aiohttp's 1 MiB default would be one
_MALFORMED_BODY: Final = b'{"id": "x", "choices": '
# Where a chat request keeps the x-ratelimit-* headers its answer must carry, whenever it is prepared. Newer
# aiohttp warns on plain-string request keys (fatal under -W error); older versions have no RequestKey.
_QUOTA_HEADERS: Final[Any] = (
    web.RequestKey("batchgen_mock_quota_headers", dict) if hasattr(web, "RequestKey") else "batchgen_mock_quota_headers"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class MockConfig:
    """How the mock server behaves. Every field has a default; invalid values raise ValueError.

    Args:
        models: served model names; the first is the base model (used when a request names none).
        latency_ms: non-stream only: delay before the answer.
        ttft_ms / itl_ms: stream only: delay before the first / between later generation steps.
        output_tokens: reply length when the request has no max_tokens; None = natural echo length.
        fault_rate: probability that a chat attempt gets a fault, picked uniformly from `faults`.
        seed: seeds the fault RNG, so a given arrival order gives the same faults.
        retry_after_s: Retry-After sent with 429 and 503 faults.
        stall_s: how long a "stall" fault hangs before closing the connection.
        api_key: when set, /v1/* requires ``Authorization: Bearer <key>`` (else 401, as vLLM).
        prompt_tokens_details: report cached prompt tokens in usage, as vLLM does with
            ``--enable-prompt-tokens-details`` (rule in `mock_replies`); False never sends them.

    Capacity model (rules in `mock_engine`), on when `batch_slots` or `kv_tokens` is set; then `latency_ms`,
    `ttft_ms` and `itl_ms` do not apply (faults still do, and skip the engine):
        batch_slots: requests running at once per engine (vLLM's max_num_seqs); None = unlimited.
        kv_tokens: KV cache budget per engine in tokens (num_gpu_blocks = kv_tokens // 16); None = unlimited.
        step_ms / step_ms_per_request: an engine step (one token for every running request) lasts
            ``step_ms + step_ms_per_request * running`` ms.
        engines: data-parallel engines, each with its own slots, KV and queue; a request goes to the least
            loaded. `/metrics` has one series per engine either way.

    Context window:
        max_model_len: vLLM's context length, in the mock's tokens (words). `/v1/models` cards and `/tokenize`
            report it; a chat request whose prompt has >= max_model_len tokens, or prompt + max tokens >
            max_model_len, gets vLLM's 400. None: no checks, and the cards say ``"max_model_len": null``.

    Quotas, like a hosted OpenAI-compatible API (rules in `mock_quota`), off while both limits are None:
        requests_per_minute / tokens_per_minute: the limits. A chat request costs one request and
            ``prompt_tokens + n * max_tokens`` tokens (max_completion_tokens first; 0 when neither is set).
            Past a limit: 429, OpenAI's error body and ``retry-after`` (seconds). Every chat answer (200 or
            not) carries ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the limits set.
        quota_window_s: the limits are enforced over slices this long (OpenAI "quantizes" its per-minute
            limits): each is a token bucket holding ``limit * quota_window_s / 60``, refilled at limit / 60
            per second, so pacing at exactly the limit never meets a 429 and a burst over a slice's share does.

    Example: ``MockConfig(ttft_ms=20, itl_ms=5, output_tokens=128)``; a server whose throughput saturates
    at 64 requests of max_tokens 64 and prompts up to 16 tokens: ``MockConfig(batch_slots=64, kv_tokens=64 * 80)``.
    """

    models: tuple[str, ...] = ("mock-model",)
    latency_ms: float = 0.0
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    output_tokens: int | None = None
    fault_rate: float = 0.0
    faults: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    retry_after_s: float = 0.05
    stall_s: float = 30.0
    api_key: str | None = None
    prompt_tokens_details: bool = True
    batch_slots: int | None = None
    kv_tokens: int | None = None
    step_ms: float = 10.0
    step_ms_per_request: float = 0.1
    engines: int = 1
    max_model_len: int | None = MAX_MODEL_LEN
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    quota_window_s: float = 1.0

    @property
    def quota_on(self) -> bool:
        """True when chat requests are held to a quota (`requests_per_minute` or `tokens_per_minute` set)."""
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    @property
    def capacity_model(self) -> bool:
        """True when requests run on the simulated engines (`batch_slots` or `kv_tokens` set)."""
        return self.batch_slots is not None or self.kv_tokens is not None

    def __post_init__(self) -> None:
        # Accept any iterable of names, but store tuples so the config stays hashable and immutable.
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "faults", tuple(self.faults))
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ValueError("models must be a non-empty tuple of non-empty names")
        unknown = sorted(set(self.faults) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {self.fault_rate}")
        if self.fault_rate > 0 and not self.faults:
            raise ValueError("fault_rate > 0 needs at least one fault kind")
        for name in ("latency_ms", "ttft_ms", "itl_ms", "retry_after_s", "stall_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.output_tokens is not None and self.output_tokens < 1:
            raise ValueError("output_tokens must be >= 1 or None")
        Capacity(batch_slots=self.batch_slots, kv_tokens=self.kv_tokens)  # raises ValueError
        for name in ("step_ms", "step_ms_per_request"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")
        if isinstance(self.engines, bool) or not isinstance(self.engines, int) or self.engines < 1:
            raise ValueError(f"engines must be an integer >= 1, got {self.engines!r}")
        length = self.max_model_len
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ValueError(f"max_model_len must be an integer >= 1 or None, got {length!r}")
        # Raises ValueError for a bad limit or window; the clock is not read again.
        Quota(self.requests_per_minute, self.tokens_per_minute, window_s=self.quota_window_s, clock=lambda: 0.0)


@dataclass(slots=True, eq=False)
class MockState:
    """What the server saw, for tests to assert on. Only the server's event loop mutates it.

    With the capacity model on, the engines also count `preemptions` (all engines) and the most requests
    `max_running` / `max_waiting` on one engine at once (comparable to `MockConfig.batch_slots`).

    Quotas and pacing: `admissions` holds ``(time, token cost)`` for every chat request that passed the
    checks and the quota (quota on or off; time from the server's clock, monotonic seconds), so a test can
    measure the rate a client kept (`max_admitted`); `rate_limited` counts the 429s the quota sent (forced or
    random "429" faults count in `faults_injected` only). `tokenize_requests` holds the bodies ``POST
    /tokenize`` received.
    """

    seed: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    request_headers: list[dict[str, str]] = field(default_factory=list)  # lower-cased names
    in_flight: int = 0
    max_in_flight: int = 0
    faults_injected: Counter[str] = field(default_factory=Counter)
    attempts: Counter[bytes] = field(default_factory=Counter)  # forced-fault arrivals per body digest
    preemptions: int = 0
    max_running: int = 0
    max_waiting: int = 0
    rate_limited: int = 0
    admissions: list[tuple[float, int]] = field(default_factory=list)
    tokenize_requests: list[dict[str, Any]] = field(default_factory=list)
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def reset(self) -> None:
        """Forget everything seen and reseed the fault RNG; requests still running stay counted.

        The engine maxima restart from 0 and catch up with the current load at the next step.
        """
        self.requests.clear()
        self.request_headers.clear()
        self.max_in_flight = self.in_flight
        self.preemptions = self.max_running = self.max_waiting = 0
        self.faults_injected.clear()
        self.attempts.clear()
        self.rate_limited = 0
        self.admissions.clear()
        self.tokenize_requests.clear()
        self.rng.seed(self.seed)

    def record(self, body: dict[str, Any], headers: Mapping[str, str]) -> None:
        self.requests.append(body)
        self.request_headers.append({k.lower(): v for k, v in headers.items()})

    def max_admitted(self, window_s: float) -> tuple[int, int]:
        """The most requests, and the most tokens, admitted within any `window_s` seconds (``[t, t + window_s)``).

        Example: a client keeping 60 requests per minute gives ``state.max_admitted(60.0)[0] <= 60``.
        """
        most_requests = most_tokens = tokens = start = 0
        for end, (when, cost) in enumerate(self.admissions):
            tokens += cost
            while when - self.admissions[start][0] >= window_s:
                tokens -= self.admissions[start][1]
                start += 1
            most_requests = max(most_requests, end - start + 1)
            most_tokens = max(most_tokens, tokens)
        return most_requests, most_tokens

    def count_attempt(self, raw_body: bytes) -> int:
        """Count one more arrival of these body bytes; returns which one it is (1-based)."""
        key = hashlib.blake2b(raw_body, digest_size=16).digest()
        self.attempts[key] += 1
        return self.attempts[key]

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count one handler as in flight for the duration of the block."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1


# ---------------------------------------------------------------- fault selection


def _bad_header(name: str, message: str) -> RequestRejected:
    return RequestRejected(400, f"{name}: {message}", error_type="BadRequestError", param=name)


def _forced_kinds(spec: str) -> list[str]:
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise _bad_header(FORCED_FAULTS_HEADER, f"unknown fault kinds {unknown}")
    return kinds


def choose_fault(
    headers: Mapping[str, str], raw_body: bytes, config: MockConfig, state: MockState
) -> str | None:
    """The fault for this attempt: forced by header if present, else random at `fault_rate`."""
    forced = headers.get(FORCED_FAULTS_HEADER)
    if forced is not None:
        kinds = _forced_kinds(forced)  # a refused header is not an attempt
        attempt = state.count_attempt(raw_body)  # only here: unforced requests are never hashed or kept
        return kinds[attempt - 1] if attempt <= len(kinds) else None
    # Draw only when faults are on, so a fault-free server never touches the RNG.
    if config.fault_rate > 0 and state.rng.random() < config.fault_rate:
        return state.rng.choice(config.faults)
    return None


# ---------------------------------------------------------------- responses

FaultHandler = Callable[[web.Request, ChatPlan, MockConfig], Awaitable[web.StreamResponse]]


def _json(obj: object, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    # vLLM sends compact, raw-UTF-8 JSON with a bare application/json content type; orjson matches.
    body = orjson.dumps(obj)
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


async def _sleep_ms(ms: float) -> None:
    if ms > 0:  # a zero-delay server should not pay for a trip through the event loop per chunk
        await asyncio.sleep(ms / 1000)


def _drop_connection(request: web.Request) -> None:
    # The client sees a dropped connection. aiohttp then swallows the ConnectionError raised when
    # it tries to send whatever response the handler returns (web_protocol.finish_response).
    if request.transport is not None:
        request.transport.close()


async def _open_sse(request: web.Request) -> web.StreamResponse:
    # Starlette adds the charset to text/* media types, so real vLLM sends exactly this.
    resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    return resp


async def _stream(
    request: web.Request, events: Iterable[StreamEvent], config: MockConfig, stop_after: int | None = None
) -> web.StreamResponse:
    """Send SSE frames, pacing generation steps; with `stop_after`, drop the connection after that many."""
    resp = await _open_sse(request)
    steps = 0
    try:
        for event in events:
            if event.paced:
                if steps == stop_after:
                    _drop_connection(request)
                    break
                await _sleep_ms(config.ttft_ms if steps == 0 else config.itl_ms)
                steps += 1
            await resp.write(event.data)  # one write per chunk, so each reaches the client at once
    except ConnectionError:
        pass  # the client went away mid-stream (a cancel or a timeout); nothing left to do
    return resp


async def _answer(request: web.Request, plan: ChatPlan, config: MockConfig) -> web.StreamResponse:
    if plan.stream:
        return await _stream(request, stream_events(plan), config)
    await _sleep_ms(config.latency_ms)
    return _json(completion_body(plan))


def _client_gone(request: web.Request) -> Callable[[], bool]:
    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    return gone


def _stream_steps(plan: ChatPlan) -> tuple[bytes, list[int]]:
    """The stream's frames as one blob and where each generation step's frames end in it.

    Step 0 also carries the role chunks before it, the last step the usage chunk and [DONE] after it.
    """
    parts: list[bytes] = []
    ends: list[int] = []
    size = 0
    paced = False
    for event in stream_events(plan):
        if event.paced:
            if paced:
                ends.append(size)
            paced = True
        parts.append(event.data)
        size += len(event.data)
    ends.append(size)
    return b"".join(parts), ends


async def _engine_answer(request: web.Request, plan: ChatPlan, engines: EngineGroup) -> web.StreamResponse:
    """Answer through the capacity model: a body when the request finishes, a stream step by step."""
    width = len(plan.choices)
    gone = _client_gone(request)
    if not plan.stream:
        job = engines.submit(plan.prompt_tokens, width, generation_steps(plan), stream=False, gone=gone)
        try:
            await job.progressed(job.steps - 1)
        finally:
            engines.abort(job)  # nothing once it is done; else the handler was cancelled
        if not job.done:  # its client went away while it waited
            _drop_connection(request)
            return web.Response()
        return _json(completion_body(plan))
    blob, ends = _stream_steps(plan)
    job = engines.submit(plan.prompt_tokens, width, len(ends), stream=True, gone=gone)
    resp: web.StreamResponse | None = None
    sent = 0
    try:
        while sent < len(ends):
            await job.progressed(sent)
            if job.aborted:
                break
            high = job.high
            if resp is None:  # as vLLM, headers and role chunks go with the first token
                resp = await _open_sse(request)
            await resp.write(blob[ends[sent - 1] if sent else 0 : ends[high - 1]])
            sent = high
    except ConnectionError:
        pass  # the client went away mid-stream
    finally:
        engines.abort(job)
    if resp is None:
        _drop_connection(request)
        return web.Response()
    return resp


def _status_fault(status: int, error_type: str, message: str, retry_after: bool) -> FaultHandler:
    async def respond(request: web.Request, plan: ChatPlan, config: MockConfig) -> web.StreamResponse:
        headers = {"Retry-After": f"{config.retry_after_s:g}"} if retry_after else None
        return _json(error_body(message, error_type, None, status), status, headers)

    return respond


async def _disconnect(request: web.Request, plan: ChatPlan, config: MockConfig) -> web.StreamResponse:
    _drop_connection(request)
    return web.Response()  # never sent: the transport is closed


async def _stall(request: web.Request, plan: ChatPlan, config: MockConfig) -> web.StreamResponse:
    await asyncio.sleep(config.stall_s)
    return await _disconnect(request, plan, config)


async def _malformed(request: web.Request, plan: ChatPlan, config: MockConfig) -> web.StreamResponse:
    if not plan.stream:
        return web.Response(body=_MALFORMED_BODY, content_type="application/json")
    # For a stream: a well-framed stream whose first token event is broken JSON, then [DONE].
    role_chunks = [e for e in stream_events(plan) if not e.paced][: len(plan.choices)]
    frames = [*role_chunks, StreamEvent(b"data: " + _MALFORMED_BODY + b"\n\n", paced=True)]
    return await _stream(request, [*frames, StreamEvent(b"data: [DONE]\n\n", paced=False)], config)


async def _truncated(request: web.Request, plan: ChatPlan, config: MockConfig) -> web.StreamResponse:
    if plan.stream:
        events = list(stream_events(plan))
        return await _stream(request, events, config, stop_after=max(1, sum(e.paced for e in events) // 2))
    body = orjson.dumps(completion_body(plan))
    resp = web.StreamResponse(status=200)
    resp.content_type = "application/json"
    resp.content_length = len(body)  # promise the whole body, send half: the client must notice
    await resp.prepare(request)
    await resp.write(body[: len(body) // 2])
    _drop_connection(request)
    return resp


_FAULTS: Final[Mapping[str, FaultHandler]] = {
    "429": _status_fault(429, "RateLimitError", "Rate limit exceeded (mock fault)", True),
    "500": _status_fault(500, "InternalServerError", "Internal server error", False),
    "503": _status_fault(503, "ServiceUnavailableError", "Service unavailable (mock fault)", True),
    "disconnect": _disconnect,
    "stall": _stall,
    "malformed": _malformed,
    "truncated": _truncated,
}


# ---------------------------------------------------------------- application


def _rate_limited(decision: QuotaDecision) -> RequestRejected:
    """OpenAI's 429 for a request the quota refused: type "requests" or "tokens", code "rate_limit_exceeded"."""
    message, limit_type = str(decision.message), str(decision.limit_type)
    return RequestRejected(429, message, error_type=limit_type, param=None, code="rate_limit_exceeded")


async def _read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; raises `RequestRejected` as vLLM does for anything else."""
    if request.content_type != "application/json":  # vLLM rejects other media types with a 400
        message = "Unsupported Media Type: Only 'application/json' is allowed"
        raise RequestRejected(400, message, error_type="BadRequestError", param=None)
    return parse_body(await request.read())


async def _add_quota_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: put a chat request's x-ratelimit-* headers on its answer, stream or not."""
    headers = request.get(_QUOTA_HEADERS)
    if headers:
        response.headers.update(headers)


class _Routes:
    """The endpoint handlers, bound to one config and one state."""

    def __init__(
        self,
        config: MockConfig,
        state: MockState,
        engines: EngineGroup | None = None,
        quota: Quota | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._state = state
        self._engines = engines
        self._quota = quota
        self._clock = clock
        self._created = int(time.time())
        # Tokens answered while the capacity model is off (with it on, the engines count).
        self._prompt_tokens = 0
        self._generation_tokens = 0

    def table(self) -> dict[tuple[str, str], Handler]:
        return {
            ("POST", "/v1/chat/completions"): self.chat,
            ("GET", "/v1/models"): self.models,
            ("POST", "/tokenize"): self.tokenize,
            ("GET", "/health"): self.health,
            ("GET", "/version"): self.version,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/mock/capacity"): self.capacity,
            ("POST", "/mock/capacity"): self.capacity,
        }

    async def chat(self, request: web.Request) -> web.StreamResponse:
        with self._state.track():
            try:
                plan, fault = await self._accept(request)
            except RequestRejected as exc:
                if self._quota is not None and _QUOTA_HEADERS not in request:  # refused before the quota
                    request[_QUOTA_HEADERS] = self._quota.headers()
                return _json(exc.body, exc.status)
            if fault is None:
                if self._engines is not None:
                    return await _engine_answer(request, plan, self._engines)
                self._prompt_tokens += plan.prompt_tokens
                self._generation_tokens += plan.completion_tokens
                return await _answer(request, plan, self._config)
            self._state.faults_injected[fault] += 1
            return await _FAULTS[fault](request, plan, self._config)

    async def _accept(self, request: web.Request) -> tuple[ChatPlan, str | None]:
        """Read, record, check and admit one chat request; returns its plan and the fault to inject, if any.

        Raises `RequestRejected` for a request vLLM would refuse, and with OpenAI's 429 past the quota.
        """
        body = await _read_json(request)
        raw = await request.read()  # cached by aiohttp: the same bytes _read_json parsed
        self._state.record(body, request.headers)
        plan = plan_chat(
            body,
            models=self._config.models,
            output_tokens=self._config.output_tokens,
            request_id=request.headers.get("X-Request-Id"),
            created=int(time.time()),
            prompt_tokens_details=self._config.prompt_tokens_details,
            max_model_len=self._config.max_model_len,
        )
        if self._engines is not None:
            self._engines.check(plan.prompt_tokens, generation_steps(plan) * len(plan.choices))
        self._admit(request, plan)
        return plan, choose_fault(request.headers, raw, self._config, self._state)

    def _admit(self, request: web.Request, plan: ChatPlan) -> None:
        """Hold a valid request to the quota (when on) and record its admission; past it, raise OpenAI's 429."""
        cost = request_cost(plan.prompt_tokens, plan.max_tokens, len(plan.choices))
        if self._quota is not None:
            decision = self._quota.admit(cost, plan.model)
            request[_QUOTA_HEADERS] = decision.headers
            if not decision.admitted:
                self._state.rate_limited += 1
                raise _rate_limited(decision)
        self._state.admissions.append((self._clock(), cost))

    async def models(self, request: web.Request) -> web.StreamResponse:
        return _json(models_body(self._config.models, self._created, self._config.max_model_len))

    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        """vLLM's ``POST /tokenize`` (rules in `mock_replies.tokenize_body`); outside /v1, so no key needed."""
        try:
            body = await _read_json(request)
            self._state.tokenize_requests.append(body)
            answer = tokenize_body(body, models=self._config.models, max_model_len=self._config.max_model_len)
        except RequestRejected as exc:
            return _json(exc.body, exc.status)
        return _json(answer)

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)  # vLLM: 200 with an empty body

    async def version(self, request: web.Request) -> web.StreamResponse:
        return _json({"version": MOCK_VERSION})

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        """vLLM's Prometheus page. Capacity model off: running = chat requests in flight, no queue, no KV."""
        capacity: Capacity | None = None
        if self._engines is not None:
            loads = self._engines.loads()
            capacity = self._engines.capacity
        else:
            busy = EngineLoad(self._state.in_flight, 0, 0.0, 0, self._generation_tokens, self._prompt_tokens)
            loads = [busy, *[EngineLoad(0, 0, 0.0, 0, 0, 0)] * (self._config.engines - 1)]
        text = render_metrics(self._config.models[0], loads, capacity)
        return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def capacity(self, request: web.Request) -> web.StreamResponse:
        """GET: the engines' capacity; POST ``{"batch_slots": n, "kv_tokens": n}`` (each optional, null =
        unlimited) changes it from the next step and answers the new settings."""
        if self._engines is None:
            message = "The mock's capacity model is off: start it with batch_slots or kv_tokens"
            return _json(error_body(message, "BadRequestError", None, 400), 400)
        if request.method == "GET":
            return _json(self._engines.capacity.as_dict())
        try:
            body = parse_body(await request.read())
            unknown = sorted(set(body) - {"batch_slots", "kv_tokens"})
            if unknown:
                raise RequestRejected(400, f"unknown fields {unknown}", error_type="BadRequestError", param=None)
            capacity = self._engines.set_capacity(**body)
        except RequestRejected as exc:
            return _json(exc.body, exc.status)
        except ValueError as exc:
            return _json(error_body(str(exc), "BadRequestError", None, 400), 400)
        return _json(capacity.as_dict())


@web.middleware
async def _fastapi_style_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown routes answer like FastAPI (``{"detail": "Not Found"}``), not with aiohttp's text page."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        return _json({"detail": exc.reason}, exc.status)


def _auth_middleware(api_key: str) -> Middleware:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        # As vLLM's AuthenticationMiddleware: only /v1 is protected, so /health and /version stay open.
        if request.method != "OPTIONS" and request.path.startswith("/v1"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _json({"error": "Unauthorized"}, 401)
        return await handler(request)

    return check_key


def make_app(
    config: MockConfig | None = None,
    state: MockState | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    """Build the mock server app. A new state is seeded from `config.seed`; a given one keeps its seed.

    The state is also stored as ``app["mock_state"]``, the capacity model's engines (None when it is off)
    as ``app["mock_engines"]`` and the `Quota` (None when off) as ``app["mock_quota"]``. `clock` (monotonic
    seconds) times the quota and `MockState.admissions`; a test can pass a fake one to drive them.
    """
    config = config if config is not None else MockConfig()
    state = state if state is not None else MockState(seed=config.seed)
    middlewares: list[Middleware] = [_fastapi_style_errors]
    if config.api_key is not None:
        middlewares.append(_auth_middleware(config.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=_MAX_BODY_BYTES)
    engines: EngineGroup | None = None
    if config.capacity_model:
        engines = EngineGroup(
            engines=config.engines,
            capacity=Capacity(batch_slots=config.batch_slots, kv_tokens=config.kv_tokens),
            step_ms=config.step_ms,
            step_ms_per_request=config.step_ms_per_request,
            state=state,
        )

        async def stop_engines(app: web.Application) -> None:
            await engines.close()

        app.on_cleanup.append(stop_engines)
    quota: Quota | None = None
    if config.quota_on:
        quota = Quota(config.requests_per_minute, config.tokens_per_minute, window_s=config.quota_window_s, clock=clock)
        app.on_response_prepare.append(_add_quota_headers)
    for (method, path), handler in _Routes(config, state, engines, quota, clock).table().items():
        app.router.add_route(method, path, handler)
    with warnings.catch_warnings():
        # The plain-string key is part of the public API; aiohttp's AppKey nudge would fail under -W error.
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        app["mock_state"] = state
        app["mock_engines"] = engines
        app["mock_quota"] = quota
    return app


# ---------------------------------------------------------------- running it


class MockServer:
    """Runs the mock app on a real socket. ``async with MockServer(MockConfig()) as server: server.url``.

    Args:
        config: the behaviour; defaults to `MockConfig()`.
        host: interface to bind.
        port: 0 picks a free port; `port` holds the real one after `start()`.
        clock: times the quota and `MockState.admissions` (see `make_app`).
    """

    def __init__(
        self,
        config: MockConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else MockConfig()
        self.host = host
        self.port = port
        self.clock = clock
        self.state = MockState(seed=self.config.seed)
        self._runner: web.AppRunner | None = None
        self._engines: EngineGroup | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The base URL a client uses, ``http://HOST:PORT/v1``; set by `start()`."""
        if self._url is None:
            raise RuntimeError("MockServer.url is only known after start()")
        return self._url

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("MockServer is already running")
        app = make_app(self.config, self.state, clock=self.clock)
        # With the capacity model on, a client that hangs up frees its slot at once, as in vLLM.
        runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=_SHUTDOWN_GRACE_S,
            handler_cancellation=self.config.capacity_model,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._engines = app["mock_engines"]
        self.port = int(runner.addresses[0][1])
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._url = f"http://{host}:{self.port}/v1"

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        self._engines = None
        if runner is not None:
            await runner.cleanup()

    def set_capacity(
        self, *, batch_slots: int | None | EllipsisType = ..., kv_tokens: int | None | EllipsisType = ...
    ) -> dict[str, int | None]:
        """Change the capacity model's slots and/or KV budget (``...`` keeps one, None = unlimited) on
        every engine from its next step, as ``POST /mock/capacity`` does; returns the new settings.

        Callable from any thread (`mock_server_thread`). Raises RuntimeError when the server is not
        running or its capacity model is off, ValueError for a value < 1.
        """
        engines = self._engines
        if engines is None:
            raise RuntimeError("set_capacity needs a running MockServer with the capacity model on")
        return engines.set_capacity(batch_slots=batch_slots, kv_tokens=kv_tokens).as_dict()

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class _ServerThread:
    """Runs a MockServer on its own event loop in a daemon thread."""

    def __init__(self, server: MockServer) -> None:
        self.server = server
        self._ready = threading.Event()
        self._error: Exception | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="batchgen-mock-server", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=_SHUTDOWN_GRACE_S + 5.0)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.server.start()
        except Exception as exc:  # handed to the caller of start(), e.g. "address already in use"
            self._error = exc
            return
        finally:
            self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.close()


@contextlib.contextmanager
def mock_server_thread(
    config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> Iterator[MockServer]:
    """Runs MockServer in a background thread with its own event loop (for sync code / CLI demo).

    Yields the started server (``.url`` set; read ``.state`` only after requests completed) and
    stops it cleanly on exit.
    """
    runner = _ServerThread(MockServer(config, host, port))
    runner.start()
    try:
        yield runner.server
    finally:
        runner.stop()


# ---------------------------------------------------------------- command line


def _fault_list(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fault kinds {unknown}; known: {','.join(FAULT_KINDS)}")
    return kinds


def _model_len(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the mock server's flags to `parser` (used by ``python -m`` and by batchgen's CLI)."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    add("--port", type=int, default=8000, help="port to bind, 0 = any free port (default: %(default)s)")
    add("--model", dest="models", action="append", metavar="NAME",
        help="served model name; repeatable, the first is the base model (default: mock-model)")
    add("--latency-ms", type=float, default=0.0, help="non-stream delay before answering")
    add("--ttft-ms", type=float, default=0.0, help="stream delay before the first token")
    add("--itl-ms", type=float, default=0.0, help="stream delay between tokens")
    add("--output-tokens", type=int, default=None, metavar="N",
        help="reply length when a request has no max_tokens (default: echo length)")
    add("--fault-rate", type=float, default=0.0, metavar="P", help="probability of a fault per request")
    add("--faults", type=_fault_list, default=FAULT_KINDS, metavar=",".join(FAULT_KINDS),
        help="fault kinds to draw from")
    add("--seed", type=int, default=0, metavar="N", help="fault RNG seed")
    add("--retry-after-s", type=float, default=0.05, help="Retry-After of 429/503 faults")
    add("--stall-s", type=float, default=30.0, help="how long a stall fault hangs")
    add("--api-key-env", metavar="VAR", default=None,
        help="require this environment variable's value as the Bearer key on /v1/*")
    add("--prompt-tokens-details", action=argparse.BooleanOptionalAction, default=True,
        help="report cached prompt tokens in usage, as vLLM's --enable-prompt-tokens-details (default: on)")
    add("--batch-slots", type=int, default=None, metavar="N",
        help="capacity model: requests running at once per engine (vLLM max_num_seqs); "
             "setting this or --kv-tokens turns the model on (default: off)")
    add("--kv-tokens", type=int, default=None, metavar="N",
        help="capacity model: KV cache budget per engine in tokens (default: unlimited)")
    add("--step-ms", type=float, default=10.0, metavar="MS",
        help="capacity model: fixed time of an engine step, one token per running request (default: %(default)s)")
    add("--step-ms-per-request", type=float, default=0.1, metavar="MS",
        help="capacity model: added step time per running request (default: %(default)s)")
    add("--engines", type=int, default=1, metavar="N",
        help="capacity model: data-parallel engines, each with its own slots and KV (default: %(default)s)")
    add("--max-model-len", type=_model_len, default=MAX_MODEL_LEN, metavar="N|none",
        help="context window in tokens (words); longer chat requests get vLLM's 400 (default: %(default)s)")
    add("--requests-per-minute", type=int, default=None, metavar="N",
        help="quota: chat requests per minute, past it OpenAI's 429 and x-ratelimit-* headers (default: off)")
    add("--tokens-per-minute", type=int, default=None, metavar="N",
        help="quota: tokens per minute, a request costing prompt + n * max_tokens (default: off)")
    add("--quota-window-s", type=float, default=1.0, metavar="S",
        help="quota: the limits are enforced over slices this long, in (0, 60] (default: %(default)s)")


def _config_from_args(args: argparse.Namespace) -> MockConfig:
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {args.api_key_env} is not set or empty")
    return MockConfig(
        models=tuple(args.models or ("mock-model",)),
        latency_ms=args.latency_ms,
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        output_tokens=args.output_tokens,
        fault_rate=args.fault_rate,
        faults=args.faults,
        seed=args.seed,
        retry_after_s=args.retry_after_s,
        stall_s=args.stall_s,
        api_key=api_key,
        prompt_tokens_details=args.prompt_tokens_details,
        batch_slots=args.batch_slots,
        kv_tokens=args.kv_tokens,
        step_ms=args.step_ms,
        step_ms_per_request=args.step_ms_per_request,
        engines=args.engines,
        max_model_len=args.max_model_len,
        requests_per_minute=args.requests_per_minute,
        tokens_per_minute=args.tokens_per_minute,
        quota_window_s=args.quota_window_s,
    )


async def _serve_until_signalled(config: MockConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows, or not the main thread
            loop.add_signal_handler(signum, stop.set)
    async with MockServer(config, host, port) as server:
        models = ", ".join(config.models)
        message = f"batchgen mock server listening on {server.url} (models: {models})"
        if config.capacity_model:
            slots = config.batch_slots if config.batch_slots is not None else "unlimited"
            kv = config.kv_tokens if config.kv_tokens is not None else "unlimited"
            message += (
                f"; capacity model: {config.engines} engine(s) x {slots} slots, {kv} KV tokens, "
                f"step {config.step_ms:g} ms + {config.step_ms_per_request:g} ms per running request"
            )
        if config.quota_on:
            rpm = config.requests_per_minute or "unlimited"
            tpm = config.tokens_per_minute or "unlimited"
            message += f"; quota: {rpm} requests, {tpm} tokens per minute over {config.quota_window_s:g} s slices"
        print(message, file=sys.stderr, flush=True)
        await stop.wait()


def main(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM. Returns 0, or 2 when the flags are invalid. Never prints the key."""
    try:
        config = _config_from_args(args)
    except ValueError as exc:
        print(f"batchgen mock server: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_until_signalled(config, args.host, args.port))
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="python -m batchgen.testing.mock_server", description="Run the batchgen mock vLLM server."
    )
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))

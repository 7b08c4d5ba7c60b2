"""`ClientPool`: several servers of one model as one client, for a run and on its own.

Dispatch. Each request goes to the healthy server with the least outstanding work per slot:

    score = (tokens in flight there + this request's tokens) / (its limit × its weight)

where tokens are estimated (`workload.WorkEstimate`: prompt bytes and `max_tokens`, corrected by the
usage that comes back). Work is weighed in tokens, not requests, because one long reasoning sample
costs a server as much as dozens of short answers: a count of requests in flight sends the next one
to a server that is busier than it looks (llm-d-router #2701, verl #2686). A server takes no more
than its limit (its concurrency, lowered by a 429 and after a re-admission), so a slow server,
which frees its slots slowly, gets proportionally fewer rows.

Failures. A failed attempt retries on another server with room at once (it is another machine:
no backoff), else after the backoff on any server; the retry budget stays per request. Health is
tracked per server (`endpoints.Endpoint`): N connection failures, timeouts or 5xx in a row eject
it; a probe (`GET /health`, else `/models`) after a backoff, then one trial request, re-admit it.
While no server is healthy, requests wait, spending no retries. When every server has been down for
as long as one request's retry budget would wait (and has failed a health check, or 3 trials in a row, since), the pool is
*lost*: waiting requests fail with `APIConnectionError` and `on_lost` is called (a run drains, and
a rerun resumes).

Example:
    async with ClientPool(["http://gpu-1:8000/v1", "http://gpu-2:8000/v1"]) as pool:
        r = await pool.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
        print(r.content, pool.endpoints[0].rows)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import orjson

from batchgen import _constants as C
from batchgen.apikey import resolve_api_key
from batchgen.autoscale import AutoConcurrency, ConcurrencyController
from batchgen.client import Chat, Client, as_response
from batchgen.endpoints import DEFAULT_EJECT_AFTER, Endpoint, EndpointSpec, EndpointState
from batchgen.errors import APIConnectionError, APIError, ConfigError
from batchgen.parsing import read_response
from batchgen.retry import RetryPolicy, backoff_delay, should_retry
from batchgen.stream import Stream
from batchgen.types import ChatCompletionResponse, Reply
from batchgen.validation import validate_request
from batchgen.ratelimit import RateLimiter
from batchgen.workload import WorkEstimate, usage_tokens

__all__ = ["ClientPool"]

T = TypeVar("T")

_MIN_PROBE_DELAY_S = 0.05  # a backoff_base of 0 must not make the probes spin
_TRIALS_TO_GIVE_UP = 3  # failed trial requests in a row (health passing) that count a server as down


class ClientPool:
    """Several OpenAI-compatible servers as one client (see the module docstring for the rules).

    Args:
        endpoints: base URLs or `EndpointSpec`s (each may set its own concurrency, key and weight).
        api_key: the key for every server without its own `api_key_env` (else the default variables).
        concurrency: requests in flight per server that does not set its own.
        eject_after: connection failures, timeouts or 5xx in a row that eject a server.
        on_event: called with a line of text when a server is ejected, probed or re-admitted.
        on_lost: called once with the reason when every server is down for good (see above).
        requests_per_minute / tokens_per_minute: quotas kept across the servers (`RateLimiter`, which
            also follows the servers' `x-ratelimit-*` headers when they send them).
        **client_options: passed to each server's `Client` (timeout, max_retries, retry, headers, ...).

    The pool counts, per server (`endpoints`), rows, errors, retries, tokens, ejections and
    re-admissions; `retries_total` counts every retry.
    """

    def __init__(
        self,
        endpoints: Sequence[str | EndpointSpec],
        api_key: str | None = None,
        *,
        concurrency: int | AutoConcurrency = C.DEFAULT_CONCURRENCY,
        eject_after: int = DEFAULT_EJECT_AFTER,
        on_event: Callable[[str], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        **client_options: Any,
    ) -> None:
        specs = [EndpointSpec(url=e) if isinstance(e, str) else e for e in endpoints]
        if not specs:
            raise ConfigError("a ClientPool needs at least one endpoint")
        if (isinstance(concurrency, int) and concurrency < 1) or eject_after < 1:
            raise ConfigError(f"concurrency and eject_after must be >= 1, got {concurrency} and {eject_after}")
        auto_settings = concurrency if isinstance(concurrency, AutoConcurrency) else AutoConcurrency()
        self.endpoints: list[Endpoint] = []
        for spec in specs:
            chosen = spec.concurrency or concurrency
            auto = not isinstance(chosen, int)  # "auto", or the pool's AutoConcurrency
            capacity = chosen if isinstance(chosen, int) else auto_settings.max
            key = resolve_api_key(env_var=spec.api_key_env) if spec.api_key_env else api_key
            client = Client(spec.url, key, max_connections=capacity, **client_options)
            endpoint = Endpoint(client, capacity, weight=spec.weight, eject_after=eject_after, auto=auto)
            self.endpoints.append(endpoint)
        urls = [e.url for e in self.endpoints]
        if len(set(urls)) != len(urls):
            raise ConfigError(f"an endpoint is listed twice: {', '.join(u for u in urls if urls.count(u) > 1)}")
        self.retry_policy: RetryPolicy = self.endpoints[0].client.retry_policy
        policy = self.retry_policy
        self._probe_delay = max(policy.backoff_base, _MIN_PROBE_DELAY_S)
        self._probe_max_delay = max(policy.backoff_max, self._probe_delay)
        # As long as one request's own retries would wait for a server to come back.
        self._lost_after = sum(min(policy.backoff_base * 2.0**i, policy.backoff_max) for i in range(policy.max_retries))
        self.on_event = on_event
        self.on_lost = on_lost
        self._work = WorkEstimate()
        # One limiter for the pool: quotas are per key or account, not per server behind it.
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)
        for endpoint in self.endpoints:
            endpoint.client.on_headers = self.limiter.observe
        self._auto_settings = auto_settings
        self._controllers: list[asyncio.Task[None]] = []
        # Requests waiting for a slot, in arrival order, each with its work: a freed slot is handed to
        # the first (`_grant`), so a new request never takes it from one that waited.
        self._waiters: deque[tuple[asyncio.Future[Endpoint | None], float]] = deque()
        self._probes: set[asyncio.Task[None]] = set()
        self._only: Endpoint | None = None
        self._closed = False
        self.lost: str | None = None  # why the pool gave up, while it has
        self.retries_total = 0
        self.chat = Chat(self)
        self._reshape()

    def _reshape(self) -> None:
        self._only = self.endpoints[0] if len(self.endpoints) == 1 else None
        # The token estimate is for choosing a server, and for the KV start of concurrency auto.
        self._estimating = self._only is None or self._only.auto

    def __repr__(self) -> str:  # never shows a key
        return f"ClientPool({[e.url for e in self.endpoints]!r})"

    @property
    def capacity(self) -> int:
        """Requests in flight at most: the sum of the servers' concurrency."""
        return sum(e.capacity for e in self.endpoints)

    @property
    def in_flight(self) -> int:
        return sum(e.in_flight for e in self.endpoints)

    async def drop(self, endpoint: Endpoint) -> None:
        """Remove a server before anything is sent (a bad one, skipped at the start of a run)."""
        if len(self.endpoints) == 1:
            raise ConfigError("cannot drop the last endpoint")
        self.endpoints.remove(endpoint)
        self._reshape()
        await endpoint.client.aclose()

    def start(self) -> None:
        """Start the concurrency controllers of the servers whose concurrency is auto (`async with` does it)."""
        if self._controllers:
            return
        loop = asyncio.get_running_loop()
        for endpoint in self.endpoints:
            if endpoint.auto:
                work = self._work
                controller = ConcurrencyController(endpoint, self._auto_settings, request_tokens=work.request_tokens,
                                                   answer_tokens=lambda: work.mean_answer, on_event=self._event,
                                                   on_raise=self._grant)  # fmt: skip
                endpoint.controller = controller
                self._controllers.append(loop.create_task(controller.run()))

    async def aclose(self) -> None:
        """Stop the probes and the controllers, and close every server's connections."""
        self._closed = True
        tasks = [*self._probes, *self._controllers]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._fail_waiters()
        for endpoint in self.endpoints:
            await endpoint.client.aclose()

    async def __aenter__(self) -> ClientPool:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- the request paths (the same as Client's) --------------------------------------------
    async def complete(self, body: dict[str, Any], *, validated: bool = False) -> ChatCompletionResponse:
        """Send one request body and return the whole answer (see `Client.complete`)."""
        if not validated:
            validate_request(body)
        return await self.request(body)

    async def request(self, body: dict[str, Any]) -> ChatCompletionResponse:
        """`complete()` for a body already validated."""
        return as_response(await self.exchange(body, read_response))

    def exchange(self, body: dict[str, Any], read: Callable[[Any], T]) -> Awaitable[Reply[T]]:
        """Send a validated body to the best server, retrying across servers; a run's per-row path.

        `read` makes the answer's value (see `Client.exchange`); the reply's `endpoint` names the server.
        """
        payload = orjson.dumps(body)
        return self._exchange(payload, bool(body.get("stream")), body.get("max_tokens"), read)

    async def _exchange(self, payload: bytes, stream: bool, max_tokens: Any, read: Callable[[Any], T]) -> Reply[T]:
        started = time.perf_counter()
        size = len(payload)
        # With one fixed server there is nothing to choose: no estimate to make or learn (2% of a run's CPU).
        work = self._work.estimate(size, max_tokens) if self._estimating else 0.0
        attempt, avoid, delay = 1, None, 0.0
        limiter = self.limiter
        while True:
            tokens = 0.0
            if not limiter.idle:  # every attempt counts against a quota
                tokens = self._work.admission(size, max_tokens) if limiter.counts_tokens else 0.0
                await limiter.acquire(tokens)
            endpoint = self._pick(work, avoid) if not self._waiters else None  # none waits: take a free slot
            if endpoint is not None:
                endpoint.in_flight += 1
                endpoint.outstanding += work
            else:
                endpoint = await self._take(work, avoid, delay)  # a slot reserved for it
            limiter.in_flight += 1
            limiter.tokens_in_flight += tokens
            try:
                try:
                    reply = await endpoint.client.attempt(payload, stream, read)
                finally:
                    self._release(endpoint, work)
                    limiter.in_flight -= 1
                    limiter.tokens_in_flight -= tokens
            except APIError as exc:
                delay = self._failed(endpoint, exc, attempt)  # raises when no retry is left
                attempt, avoid = attempt + 1, endpoint
                continue
            if endpoint.succeeded():
                self._readmitted(endpoint)
            if endpoint.auto and reply.ttft_s is not None:
                endpoint.ttft_sum += reply.ttft_s
                endpoint.ttft_count += 1
            prompt, completion = usage_tokens(reply.value)
            if completion is not None:
                endpoint.output_tokens += completion
            if work or limiter.counts_tokens:  # the token estimate learns when something reads it
                self._work.learn(size, max_tokens, prompt, completion)
            endpoint.rows += 1
            reply.attempts, reply.endpoint = attempt, endpoint.url
            reply.latency_s = time.perf_counter() - started
            return reply

    async def open_stream(self, body: dict[str, Any]) -> Stream:
        """Open a stream on the best server; failures before the first byte retry (on another server).

        The server's slot is held until the stream ends or is closed: read it to the end, or
        `aclose()` it. `stream.endpoint` names the server.
        """
        payload = orjson.dumps(body)
        work = self._work.estimate(len(payload), body.get("max_tokens"))
        attempt, avoid, delay = 1, None, 0.0
        limiter = self.limiter
        while True:
            if not limiter.idle:
                await limiter.acquire(self._work.admission(len(payload), body.get("max_tokens")) if limiter.counts_tokens else 0.0)
            endpoint = self._pick(work, avoid) if not self._waiters else None
            if endpoint is not None:
                endpoint.in_flight += 1
                endpoint.outstanding += work
            else:
                endpoint = await self._take(work, avoid, delay)
            try:
                stream = await endpoint.client._open_stream_attempt(payload, attempt)
            except APIError as exc:
                self._release(endpoint, work)
                delay = self._failed(endpoint, exc, attempt)
                attempt, avoid = attempt + 1, endpoint
                continue
            except BaseException:
                self._release(endpoint, work)
                raise
            stream.endpoint = endpoint.url
            stream.on_end = lambda failure, endpoint=endpoint, stream=stream: self._stream_ended(endpoint, work, stream, failure)
            return stream

    def _stream_ended(self, endpoint: Endpoint, work: float, stream: Stream, failure: APIError | None) -> None:
        self._release(endpoint, work)
        endpoint.rows += 1
        if failure is None:
            if endpoint.succeeded():
                self._readmitted(endpoint)
            if endpoint.auto and stream.ttft_s is not None:  # the TTFT rule of concurrency auto without /metrics
                endpoint.ttft_sum += stream.ttft_s
                endpoint.ttft_count += 1
            return
        endpoint.errors += 1
        failure.endpoint = endpoint.url
        if endpoint.failed(failure, time.monotonic(), last_standing=self._last_standing(endpoint)):
            self._ejected(endpoint)

    # -- choosing a server -------------------------------------------------------------------
    def _pick(self, work: float, avoid: Endpoint | None) -> Endpoint | None:
        """The server with room and the least work per slot (not `avoid`), or None."""
        only = self._only
        if only is not None:
            return only if only is not avoid and only.has_room() else None
        best, best_score = None, math.inf
        for endpoint in self.endpoints:
            if endpoint is avoid or not endpoint.has_room():
                continue
            score = (endpoint.outstanding + work) / (max(endpoint.limit, 1.0) * endpoint.weight)
            if score < best_score:
                best, best_score = endpoint, score
        return best

    async def _take(self, work: float, avoid: Endpoint | None, delay: float) -> Endpoint:
        """A slot for a request that found none free (or found others waiting), reserved for it: after
        a failure on `avoid`, wait the backoff first; then queue for the next freed slot.

        Raises:
            APIConnectionError: the pool is lost (every server is down), or closed.
        """
        if avoid is not None:
            await asyncio.sleep(delay)
        if self.lost is not None or self._closed:
            raise APIConnectionError(self.lost or "the client pool is closed")
        waiter: asyncio.Future[Endpoint | None] = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, work))
        self._grant()
        try:
            endpoint = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and (granted := waiter.result()) is not None:
                self._release(granted, work)  # a slot was handed to it: pass it on
            raise
        if endpoint is None:
            raise APIConnectionError(self.lost or "the client pool is closed")
        return endpoint

    def _release(self, endpoint: Endpoint, work: float) -> None:
        endpoint.in_flight -= 1
        endpoint.outstanding -= work
        if self._waiters:
            self._grant()

    def _grant(self) -> None:
        """Hand free slots to the waiting requests, first come first served."""
        waiters = self._waiters
        while waiters:
            waiter, work = waiters[0]
            if waiter.done():  # cancelled while waiting
                waiters.popleft()
                continue
            endpoint = self._pick(work, None)
            if endpoint is None:
                return
            waiters.popleft()
            endpoint.in_flight += 1
            endpoint.outstanding += work
            waiter.set_result(endpoint)

    def _fail_waiters(self) -> None:
        """Wake every waiting request to fail: the pool is lost or closed."""
        waiters, self._waiters = self._waiters, deque()
        for waiter, _ in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- health ------------------------------------------------------------------------------
    def _failed(self, endpoint: Endpoint, error: APIError, attempt: int) -> float:
        """Account a failed attempt; raise `error` when the policy allows no retry, else return the backoff."""
        error.endpoint, error.attempts = endpoint.url, attempt
        if endpoint.failed(error, time.monotonic(), last_standing=self._last_standing(endpoint)):
            self._ejected(endpoint)
        if not should_retry(error, attempt - 1, self.retry_policy):
            endpoint.rows += 1
            endpoint.errors += 1
            raise error
        endpoint.retried += 1
        self.retries_total += 1
        return backoff_delay(attempt, self.retry_policy, getattr(error, "retry_after", None))

    def _last_standing(self, endpoint: Endpoint) -> bool:
        return not any(e.state is EndpointState.HEALTHY for e in self.endpoints if e is not endpoint)

    def _event(self, text: str) -> None:
        if self.on_event is not None:
            self.on_event(text)

    def _ejected(self, endpoint: Endpoint) -> None:
        if endpoint.trial_failures:  # its trial request failed: still down, and maybe down for good
            endpoint.probe_delay = min(endpoint.probe_delay * 2.0, self._probe_max_delay)
            self._check_lost()
            self._event(f"endpoint {endpoint.url} ejected again: its trial request failed ({endpoint.last_failure}); "
                        f"probing it in {endpoint.probe_delay:g} s")  # fmt: skip
        else:
            endpoint.probe_delay = self._probe_delay
            self._event(f"endpoint {endpoint.url} ejected after {endpoint.failures_in_row} failures in a row "
                        f"(last: {endpoint.last_failure}); probing it in {endpoint.probe_delay:g} s")  # fmt: skip
        if not self._closed:
            task = asyncio.get_running_loop().create_task(self._probe(endpoint))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    def _readmitted(self, endpoint: Endpoint) -> None:
        self._event(f"endpoint {endpoint.url} re-admitted: its trial request succeeded; its limit ramps up from 1")
        self._grant()

    async def _probe(self, endpoint: Endpoint) -> None:
        """Check an ejected server after a backoff, doubling, until it answers; then let one request try it."""
        while endpoint.state is EndpointState.EJECTED and not self._closed:
            await asyncio.sleep(endpoint.probe_delay)
            if await endpoint.client.check_health():
                endpoint.probe_passed()
                self.lost = None
                self._event(f"endpoint {endpoint.url} answers its health check: sending it one trial request")
                self._grant()
                return
            endpoint.probe_failures += 1
            endpoint.probe_delay = min(endpoint.probe_delay * 2.0, self._probe_max_delay)
            self._check_lost()

    def _check_lost(self) -> None:
        """Give up when every server is ejected, has failed a health check (or 3 trials), and has been down long enough."""
        endpoints = self.endpoints
        # Down means: its health check fails, or it passes but trial after trial fails (a server that
        # answers /health and drops every request). One failed trial is not enough: a flaky server
        # that answers most requests fails one now and then.
        if self.lost is not None or any(
            e.state is not EndpointState.EJECTED or not (e.probe_failures or e.trial_failures >= _TRIALS_TO_GIVE_UP)
            for e in endpoints
        ):
            return
        down_for = time.monotonic() - max(e.down_since for e in endpoints)
        if down_for < self._lost_after:
            return
        servers = "the server" if len(endpoints) == 1 else f"all {len(endpoints)} servers"
        last = "; ".join(f"{e.url}: {e.last_failure}" for e in endpoints)
        self.lost = f"{servers} stopped answering (down for {down_for:.1f} s; last: {last})"
        self._fail_waiters()
        if self.on_lost is not None:
            self.on_lost(self.lost)

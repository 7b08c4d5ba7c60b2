"""`Client`: the chat-completions API over aiohttp, with validation and retries.

`client.chat.completions.create(...)` mirrors the OpenAI call; `.builder()` gives the fluent form;
`client.complete(body)` sends one body (one response out, streamed or not, retried as the policy
says); `client.request(body)` is the same for a body already validated; `client.exchange(body, read)`
is the worker pool's per-row path, which reads the answer into whatever `read` makes (the run's
result columns, without a typed response in between). `client.open_stream(body)` returns a `Stream`
to read as it arrives.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from urllib.parse import urlsplit
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import aiohttp
import orjson

from batchgen import _constants as C
from batchgen.apikey import resolve_api_key
from batchgen.deadlines import Deadlines
from batchgen.errors import APIError, APITimeoutError, ConfigError, IncompleteResponseError, RedirectError
from batchgen.headers import attempt_headers, check_headers, secret_values
from batchgen.parsing import error_from_body, read_response
from batchgen.retry import RetryPolicy, backoff_delay, parse_retry_after, should_retry
from batchgen.stream import Stream
from batchgen.transport import (
    AIOHTTP_ERRORS,
    TimedBody,
    attempt_timeout,
    make_session,
    map_aiohttp_errors,
    read_body,
    translate_error,
)
from batchgen.types import ChatCompletionResponse, Reply
from batchgen.validation import validate_request

if TYPE_CHECKING:
    from batchgen.builder import ChatCompletionBuilder

__all__ = ["Client"]

_LARGE_BODY = 1024 * 1024
_PROBE_TIMEOUT_S = 10.0  # a health check slower than this fails: a busy server still answers /health at once  # aiohttp's threshold for its "large body as bytes" warning

T = TypeVar("T")


class Sender(Protocol):
    """What `chat.completions` sends through: a `Client`, or a `ClientPool` of several servers."""

    async def complete(self, body: dict[str, Any], *, validated: bool = False) -> ChatCompletionResponse: ...

    async def open_stream(self, body: dict[str, Any]) -> Stream: ...


def as_response(reply: Reply[ChatCompletionResponse]) -> ChatCompletionResponse:
    """The typed response of a reply read with `read_response`, carrying how the request went."""
    response = reply.value
    response.attempts, response.latency_s, response.ttft_s = reply.attempts, reply.latency_s, reply.ttft_s
    response.body = reply.body  # None for a stream, whose `raw` is the assembled answer
    return response


class Completions:
    """`client.chat.completions`: `create(...)` and `builder()`."""

    def __init__(self, client: Sender) -> None:
        self._client = client

    async def create(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        temperature: float | None = None,
        max_tokens: int | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        response_format: dict[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        stream: bool = False,
        **fields: Any,
    ) -> Any:
        """Send one chat completion. Returns a `ChatCompletionResponse`, or a `Stream` when `stream=True`.

        Parameters left at None are not sent. `extra` and `**fields` are merged into the body as-is
        (vLLM fields such as `chat_template_kwargs`, `min_p`, `structured_outputs`).

        Raises:
            ValidationError: a field has a bad value (before any network call).
            APIError: the request failed after the allowed retries.
        """
        body = build_body(
            model=model,
            messages=messages,
            temperature=temperature,
            max_tokens=max_tokens,
            top_p=top_p,
            top_k=top_k,
            stop=stop,
            seed=seed,
            tools=tools,
            tool_choice=tool_choice,
            response_format=response_format,
            stream=stream or None,
            **fields,
        )
        if extra:
            body.update(extra)
        return await self.send(body)

    async def send(self, body: dict[str, Any]) -> Any:
        """Validate and send a prepared body; streams when `body["stream"]` is true."""
        if body.get("stream"):
            body.setdefault("stream_options", {"include_usage": True})
        validate_request(body)
        if body.get("stream"):
            return await self._client.open_stream(body)
        return await self._client.complete(body, validated=True)

    def builder(self) -> ChatCompletionBuilder:
        """A fluent builder: `.model(...).messages(...).temperature(...).send()`."""
        from batchgen.builder import ChatCompletionBuilder

        return ChatCompletionBuilder(self)


def check_base_url(base_url: str) -> None:
    """A ConfigError unless `base_url` is an http(s) URL with a host."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"base_url must be an http:// or https:// URL with a host, got {base_url!r}")


def build_body(**fields: Any) -> dict[str, Any]:
    """A request body from keyword fields, leaving out those that are None."""
    return {key: value for key, value in fields.items() if value is not None}


class Chat:
    def __init__(self, client: Sender) -> None:
        self.completions = Completions(client)


class Client:
    """An OpenAI-compatible chat-completions client for vLLM and friends.

    Args:
        base_url: the server's API root, e.g. `http://localhost:8000/v1`.
        api_key: sent as `Authorization: Bearer ...`; falls back to `BATCHGEN_API_KEY`, then
            `OPENAI_API_KEY`. Never printed.
        timeout: seconds allowed for one attempt (a whole stream included).
        max_retries: retries after the first attempt for retryable failures.
        headers: extra headers sent with every request (values of credential-like names such as
            `X-Api-Key` are scrubbed from error text, as the key is).
        request_id_header: when set, each attempt carries a fresh UUID4 under this name (e.g.
            `X-Request-Id` for log correlation); by default no per-request header is sent.
        read_timeout: seconds allowed between two reads (catches a stalled stream); None = no limit.
        backoff_base / backoff_max / max_retry_after: see `RetryPolicy`.
        retry: a whole `RetryPolicy`; when given it replaces `max_retries` and the three above.
        max_connections: the connection pool size (set it to the wanted concurrency).
        max_response_bytes: a larger body fails the request without retry.

    Example:
        async with Client("http://localhost:8000/v1") as client:
            r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
            print(r.content)
    """

    def __init__(
        self,
        base_url: str = C.DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout: float = C.DEFAULT_TIMEOUT,
        max_retries: int = C.DEFAULT_MAX_RETRIES,
        headers: Mapping[str, str] | None = None,
        request_id_header: str | None = None,
        read_timeout: float | None = None,
        backoff_base: float = C.DEFAULT_BACKOFF_BASE,
        backoff_max: float = C.DEFAULT_BACKOFF_MAX,
        max_retry_after: float = C.DEFAULT_MAX_RETRY_AFTER,
        max_connections: int = C.DEFAULT_MAX_CONNECTIONS,
        max_response_bytes: int = C.DEFAULT_MAX_RESPONSE_BYTES,
        retry: RetryPolicy | None = None,
    ) -> None:
        check_base_url(base_url)
        if timeout <= 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout}")
        self.base_url = base_url.rstrip("/")
        self.retry_policy = retry or RetryPolicy(
            max_retries=max_retries, backoff_base=backoff_base, backoff_max=backoff_max, max_retry_after=max_retry_after
        )
        self.timeout = timeout
        self.read_timeout = read_timeout
        # A server that accepts no connection in this long is down (a generation is never this slow to start).
        self.connect_timeout = min(timeout, C.DEFAULT_CONNECT_TIMEOUT)
        self._deadlines = Deadlines(timeout)  # the per-row paths' timeout: one timer for every request
        self._timeout = attempt_timeout(timeout, read_timeout, self.connect_timeout)  # the other paths'
        self._probe_timeout = attempt_timeout(min(timeout, _PROBE_TIMEOUT_S), None, min(self.connect_timeout, _PROBE_TIMEOUT_S))
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        self._chat_url = self.base_url + "/chat/completions"
        # Sees every answer's headers (a pool's rate limiter reads the x-ratelimit-* ones); None: no cost.
        self.on_headers: Callable[[Mapping[str, str]], None] | None = None
        self._headers = {"Content-Type": "application/json"}
        key = resolve_api_key(api_key)
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        user_headers = check_headers(headers or {})
        self._headers.update(user_headers)
        if request_id_header is not None:
            check_headers({request_id_header: ""}, where="request_id_header")
        self.request_id_header = request_id_header
        # Only to scrub them from error text a server or proxy echoes back; longest first, so a
        # key inside a header value is replaced with the whole value.
        secrets = ([key] if key else []) + secret_values(user_headers)
        self._secrets = sorted(set(secrets), key=len, reverse=True)
        self._session: aiohttp.ClientSession | None = None
        self.retries_total = 0  # read by progress displays
        # `batchgen bench`: note when each stream's request is handed to the socket (`Stream.written_at`).
        self.time_writes = False
        self.chat = Chat(self)

    def __repr__(self) -> str:  # never shows the key
        return f"Client(base_url={self.base_url!r})"

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = make_session(
                max_connections=self.max_connections,
                read_timeout=self.read_timeout,
                connect_timeout=self.connect_timeout,
                headers=self._headers,
            )
        return self._session

    async def aclose(self) -> None:
        """Close the connection pool. The client may not be used afterwards."""
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- discovery -------------------------------------------------------------------------
    async def list_models(self) -> list[dict[str, Any]]:
        """The model cards of `GET /models` (vLLM: one per served name and LoRA)."""
        data = await self._with_retries(lambda attempt: self._get_json("/models"))
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise IncompleteResponseError("GET /models did not return a model list")
        return [m for m in models if isinstance(m, dict)]

    async def _get_json(self, path: str) -> Any:
        with map_aiohttp_errors():
            async with self.session.get(
                self.base_url + path, allow_redirects=False, timeout=self._timeout
            ) as response:
                if response.status != 200:
                    await self._raise_for_status(response)
                body = await read_body(response, self.max_response_bytes)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise IncompleteResponseError(f"GET {path}: body is not JSON") from exc

    # -- the request path ------------------------------------------------------------------
    async def complete(self, body: dict[str, Any], *, validated: bool = False) -> ChatCompletionResponse:
        """Send one request body and return the whole answer, retrying as the policy allows.

        A streamed body (`"stream": true`) is read to the end and assembled; its `ttft_s` is set.
        """
        if not validated:
            validate_request(body)
        return await self.request(body)

    async def request(self, body: dict[str, Any]) -> ChatCompletionResponse:
        """`complete()` for a body already validated."""
        return as_response(await self.exchange(body, read_response))

    def exchange(self, body: dict[str, Any], read: Callable[[Any], T]) -> Awaitable[Reply[T]]:
        """Send a validated body, retrying as the policy allows.

        `read` makes the answer's value from the decoded JSON body, or from the assembled
        `ChatCompletionResponse` of a stream; it raises `IncompleteResponseError` for a body that
        is not a chat completion, which is retried like any other incomplete answer. (A run sends
        through a `ClientPool`, which retries across its servers with `attempt`.)
        """
        return self._exchange(orjson.dumps(body), bool(body.get("stream")), read)

    async def _exchange(self, payload: bytes, stream: bool, read: Callable[[Any], T]) -> Reply[T]:
        started = time.perf_counter()
        reply = await self._with_retries(lambda n: self.attempt(payload, stream, read))
        reply.latency_s = time.perf_counter() - started
        return reply

    def attempt(self, payload: bytes, stream: bool, read: Callable[[Any], T]) -> Awaitable[Reply[T]]:
        """One attempt of an encoded request body, without retry; raises `APIError` when it fails.

        Returned as a bare coroutine: every coroutine between a task and aiohttp is resumed at
        each I/O step of a request, so this one adds none of its own (measured: each layer cost
        ~1% of a run's CPU).
        """
        if stream:
            return self._stream_once(payload, read)
        return self._plain_attempt(payload, read)

    async def get_text(self, url: str) -> str | None:
        """The text of `GET url` on this server (e.g. its `/metrics`), or None when it does not answer 200."""
        try:
            async with self.session.get(url, allow_redirects=False, timeout=self._probe_timeout) as response:
                if response.status != 200:
                    await response.read()
                    return None
                return (await read_body(response, self.max_response_bytes)).decode("utf-8", "replace")
        except (*AIOHTTP_ERRORS, OSError, APIError):
            return None

    async def tokenize(self, body: dict[str, Any]) -> int:
        """The prompt tokens of a chat body as the server counts them (vLLM's `POST /tokenize` at its
        root, with the chat template applied), with this client's retries.

        Raises:
            APIError: the server has no /tokenize (404), or it failed after the retries.
        """
        url = self.base_url.removesuffix("/v1") + "/tokenize"
        payload = orjson.dumps(body)

        async def attempt(number: int) -> int:
            with map_aiohttp_errors():
                async with self.session.post(url, data=payload, allow_redirects=False, timeout=self._timeout) as response:
                    if response.status != 200:
                        await self._raise_for_status(response)
                    data = orjson.loads(await read_body(response, self.max_response_bytes))
            count = data.get("count") if isinstance(data, dict) else None
            if type(count) is not int:
                raise IncompleteResponseError("POST /tokenize did not return a token count")
            return count

        return await self._with_retries(attempt)

    async def check_health(self) -> bool:
        """Whether the server answers: `GET /health` at its root (vLLM, llama.cpp), else `GET /models`
        (servers without a health route, e.g. llama-cpp-python). Never raises for a failure."""
        session = self.session
        for url in (self.base_url.removesuffix("/v1") + "/health", self.base_url + "/models"):
            try:
                async with session.get(url, allow_redirects=False, timeout=self._probe_timeout) as response:
                    await response.read()
                    if response.status == 200:
                        return True
                    if response.status not in (404, 405):
                        return False  # it answers, but is not ready (vLLM: 503 while its engine is down)
            except (*AIOHTTP_ERRORS, OSError):
                return False
        return False

    async def open_stream(self, body: dict[str, Any]) -> Stream:
        """Open a stream; connection failures and error statuses before the first byte are retried."""
        payload = orjson.dumps(body)
        return await self._with_retries(lambda n: self._open_stream_attempt(payload, n))

    async def _with_retries(self, attempt_fn: Callable[[int], Awaitable[T]]) -> T:
        try:
            return await attempt_fn(1)
        except APIError as exc:
            return await self._retry(exc, attempt_fn)

    async def _retry(self, error: APIError, attempt_fn: Callable[[int], Awaitable[T]]) -> T:
        """Attempts 2, 3, ... after `error` ended attempt 1, as long as the policy allows."""
        attempt = 1
        while True:
            await self._before_retry(error, attempt)
            attempt += 1
            try:
                result = await attempt_fn(attempt)
            except APIError as exc:
                error = exc
                continue
            if isinstance(result, (ChatCompletionResponse, Stream, Reply)):
                result.attempts = attempt
            return result

    async def _before_retry(self, error: APIError, attempt: int) -> None:
        """Raise `error` (which ended `attempt`) when the policy allows no more; else wait the backoff."""
        error.attempts = attempt
        if not should_retry(error, attempt - 1, self.retry_policy):
            raise error
        self.retries_total += 1
        await asyncio.sleep(backoff_delay(attempt, self.retry_policy, getattr(error, "retry_after", None)))

    def _scrub(self, error: APIError) -> APIError:
        """Replace the API key and secret header values in an error's text (a proxy may echo them)."""
        for secret in self._secrets:
            if secret in str(error):
                error.args = tuple(a.replace(secret, "***") if isinstance(a, str) else a for a in error.args)
                error.message = error.message.replace(secret, "***")
        return error

    def _body(self, payload: bytes) -> bytes | io.BytesIO:
        # aiohttp warns (and blocks the loop) when a large body is passed as bytes; a fresh
        # BytesIO per attempt is streamed instead.
        return payload if len(payload) < _LARGE_BODY else io.BytesIO(payload)

    async def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        if 300 <= response.status < 400:
            # aiohttp would follow it as a GET, without the body: the base URL is wrong, say where to.
            location = response.headers.get("Location", "(no Location header)")
            raise RedirectError(f"HTTP {response.status}: the server redirects to {location}; set base_url to that address")
        body = await read_body(response, self.max_response_bytes)
        for secret in self._secrets:
            body = body.replace(secret.encode(), b"***")
        raise error_from_body(
            response.status,
            body,
            request_id=response.headers.get("x-request-id"),
            retry_after=parse_retry_after(response.headers),
        )

    async def _plain_attempt(self, payload: bytes, read: Callable[[Any], T]) -> Reply[T]:
        started = time.perf_counter()
        deadlines = self._deadlines
        task = deadlines.start()
        try:  # plain excepts, not context managers: this runs per row
            async with self.session.post(
                self._chat_url, data=self._body(payload), allow_redirects=False,
                headers=attempt_headers(self.request_id_header),
            ) as response:  # fmt: skip
                if self.on_headers is not None:
                    self.on_headers(response.headers)
                if response.status != 200:
                    await self._raise_for_status(response)
                data = await read_body(response, self.max_response_bytes)
        except AIOHTTP_ERRORS as exc:
            raise translate_error(exc) from exc
        except asyncio.CancelledError:
            if deadlines.expired(task):
                raise self._timed_out() from None
            raise
        finally:
            deadlines.finish(task)
        try:
            value = read(orjson.loads(data))
        except orjson.JSONDecodeError as exc:
            raise IncompleteResponseError(f"200 response body is not valid JSON ({exc})") from exc
        return Reply(value, 1, time.perf_counter() - started, None, data)

    def _timed_out(self) -> APITimeoutError:
        return APITimeoutError(f"request timed out (no full answer within {self.timeout:g} s)")

    async def _open_stream_attempt(self, payload: bytes, attempt: int, *, timed: bool = True) -> Stream:
        """Open one stream; `timed=False` when the caller keeps the attempt's deadline itself."""
        started = time.perf_counter()
        body = TimedBody(payload) if self.time_writes and len(payload) < _LARGE_BODY else self._body(payload)
        try:  # a plain except, not a context manager: this runs per stream
            response = await self.session.post(
                self._chat_url, data=body, allow_redirects=False,
                headers=attempt_headers(self.request_id_header),
                timeout=self._timeout if timed else aiohttp.helpers.sentinel,
            )  # fmt: skip
        except AIOHTTP_ERRORS as exc:
            raise translate_error(exc) from exc
        if self.on_headers is not None:
            self.on_headers(response.headers)
        if response.status != 200:
            try:
                await self._raise_for_status(response)
            except AIOHTTP_ERRORS as exc:
                raise translate_error(exc) from exc
            finally:
                response.release()
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            response.release()
            raise IncompleteResponseError(f"asked for a stream but got content-type {content_type or '(none)'}")
        stream = Stream(
            response, attempts=attempt, started=started, max_bytes=self.max_response_bytes, scrub=self._scrub
        )
        if isinstance(body, TimedBody):
            stream.written_at = body.written_at
        return stream

    async def _stream_once(self, payload: bytes, read: Callable[[Any], T]) -> Reply[T]:
        started = time.perf_counter()
        response = await self._stream_attempt(payload, 1)
        return Reply(read(response), 1, time.perf_counter() - started, response.ttft_s, None, response.raw)

    async def _stream_attempt(self, payload: bytes, attempt: int) -> ChatCompletionResponse:
        """One attempt of a stream read to its end in this task, under one deadline (open and read)."""
        deadlines = self._deadlines
        task = deadlines.start()
        try:
            stream = await self._open_stream_attempt(payload, attempt, timed=False)
            return await stream.read_response()
        except asyncio.CancelledError:
            if deadlines.expired(task):
                raise self._timed_out() from None
            raise
        finally:
            deadlines.finish(task)

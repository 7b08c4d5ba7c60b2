"""The aiohttp edge: one session factory, one place that translates aiohttp errors, bounded reads.

`translate_error` turns an aiohttp (or timeout) error into the `APIError` that `ERROR_MAP` names for
its class, the httpx `map_httpcore_exceptions` pattern: via `map_aiohttp_errors`, or on the per-row
and per-stream paths via a plain `except AIOHTTP_ERRORS` (a context manager costs more). A class the
table does not map is re-raised unchanged, never guessed into a retryable error: the worker pool
reports it as an `UnexpectedError` row, and `tests/test_errors.py` fails until the class is listed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_exceptions import UnixClientConnectorError  # not in aiohttp.__all__

from batchgen.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    IncompleteResponseError,
    RedirectError,
    ResponseTooLargeError,
    TLSVerificationError,
)

__all__ = [
    "AIOHTTP_ERRORS",
    "ERROR_MAP",
    "TimedBody",
    "attempt_timeout",
    "make_session",
    "map_aiohttp_errors",
    "mapped_target",
    "read_body",
    "translate_error",
]

class TimedBody(aiohttp.BytesPayload):
    """A request body that notes when aiohttp writes it (headers go out with it): `written_at`,
    `time.perf_counter()`.

    `batchgen bench` needs it because the POST is not written where it is called: before Python
    3.12 aiohttp writes the body from a task of its own, one trip through the event loop's ready
    queue later, and under load that trip is part of the latency the client adds.
    """

    def __init__(self, value: bytes) -> None:
        super().__init__(value, content_type="application/json")
        self.written_at: float | None = None

    async def write(self, writer: AbstractStreamWriter) -> None:
        self.written_at = time.perf_counter()
        await super().write(writer)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        self.written_at = time.perf_counter()
        await super().write_with_length(writer, content_length)


# Every aiohttp error class, by name, and what it means for one chat-completions request; `None`
# means "re-raise unchanged" (batchgen never triggers it, so seeing it is a bug worth a traceback).
# Most specific first, for the reader: the lookup walks the raised class's MRO, so the nearest
# listed ancestor decides whatever the order here. A class aiohttp adds later therefore follows
# its base at run time (ClientError itself is re-raised), and the meta-test asks for a decision.
ERROR_MAP: tuple[tuple[type[BaseException], type[APIError] | None], ...] = (
    # -- timeouts -------------------------------------------------------------------------------------
    # No TCP connection within the connect timeout: the host is unreachable, not slow. A connection
    # error (not a timeout), so that even the last healthy server is ejected for it (ClientPool);
    # a slow row never is.
    (aiohttp.ConnectionTimeoutError, APIConnectionError),
    # The socket read timeout: the server went quiet mid-response (a stalled stream).
    (aiohttp.SocketTimeoutError, APITimeoutError),
    # Raised bare only by websocket heartbeats; still a timeout by name.
    (aiohttp.ServerTimeoutError, APITimeoutError),
    # The total per-attempt timeout (aiohttp raises the builtin, == asyncio.TimeoutError).
    (asyncio.TimeoutError, APITimeoutError),
    # -- TLS: another try would get the same certificate ----------------------------------------------
    (aiohttp.ClientConnectorCertificateError, TLSVerificationError),
    (aiohttp.ServerFingerprintMismatch, TLSVerificationError),  # only with a pinned fingerprint
    # A failed handshake: an EOF under load passes; https:// to a plain-HTTP port does not, but the
    # retry budget bounds it and the ClientPool stops a run where every server fails so.
    (aiohttp.ClientConnectorSSLError, APIConnectionError),
    (aiohttp.ClientSSLError, APIConnectionError),  # base of the two above; never raised bare
    # -- no connection, or the connection dropped: retryable ------------------------------------------
    (aiohttp.ClientConnectorDNSError, APIConnectionError),  # a resolver hiccup; a typo fails discovery
    # batchgen sets no proxy (trust_env is off); if one is set up, failing to get through it is a
    # connection failure like any other.
    (aiohttp.ClientProxyConnectionError, APIConnectionError),
    (aiohttp.ClientHttpProxyError, APIConnectionError),
    (UnixClientConnectorError, APIConnectionError),  # unix socket refused
    (aiohttp.ClientConnectorError, APIConnectionError),  # refused / unreachable
    (aiohttp.ServerDisconnectedError, APIConnectionError),  # closed before a full answer
    (aiohttp.ClientConnectionResetError, APIConnectionError),  # reset while writing the request
    (aiohttp.ClientOSError, APIConnectionError),  # a socket error mid-request (ECONNRESET, EPIPE)
    (aiohttp.UploadAbortedError, APIConnectionError),  # the body was never fully sent: safe to resend
    (aiohttp.ServerConnectionError, APIConnectionError),  # base of server-side drops; never raised bare
    # "Connection lost" / "Connection closed" mid-response, and a closed connector at shutdown.
    (aiohttp.ClientConnectionError, APIConnectionError),
    # -- an answer batchgen cannot read: retryable (a proxy or server glitch) --------------------------
    (aiohttp.ClientPayloadError, IncompleteResponseError),  # body cut short, bad chunking, bad gzip
    (aiohttp.ContentTypeError, IncompleteResponseError),  # only from response.json(), unused: not JSON
    # -- redirects: the server answers POST /chat/completions itself, or base_url is wrong -------------
    (aiohttp.TooManyRedirects, RedirectError),
    (aiohttp.InvalidUrlRedirectClientError, RedirectError),
    (aiohttp.NonHttpUrlRedirectClientError, RedirectError),
    (aiohttp.RedirectClientError, RedirectError),  # base of the two above; never raised bare
    # -- re-raised: batchgen never causes these, so one is a bug, not a server failure ----------------
    (aiohttp.WSServerHandshakeError, None),  # websockets only
    # base_url is checked to be http(s) by Client and the config; a URL aiohttp still rejects slipped
    # past that check, and retrying it as a connection error would hide the bug behind N retries.
    (aiohttp.InvalidUrlClientError, None),
    (aiohttp.NonHttpUrlClientError, None),
    (aiohttp.InvalidURL, None),
    # -- bases, after all their subclasses ------------------------------------------------------------
    # An unparseable status line or headers (raise_for_status is off, so never a status error).
    (aiohttp.ClientResponseError, IncompleteResponseError),
    # Raised bare only by the digest-auth middleware, which batchgen does not use; also what an
    # aiohttp class with no decision here falls back to.
    (aiohttp.ClientError, None),
)

_TARGETS: dict[type[BaseException], type[APIError] | None] = dict(ERROR_MAP)


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc).strip()
    except Exception:  # a half-built aiohttp error can fail in __str__; the type still says enough
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def mapped_target(cls: type[BaseException]) -> type[APIError] | None:
    """The `APIError` class `ERROR_MAP` gives `cls` (through its nearest listed ancestor), or None."""
    for base in cls.__mro__:
        if base in _TARGETS:
            return _TARGETS[base]
    return None


def translate_error(exc: BaseException) -> APIError:
    """The `APIError` that `ERROR_MAP` names for `exc`'s class; raise it `from exc`.

    Raises:
        BaseException: `exc` itself, unchanged, when the table maps its class to nothing.
    """
    target = mapped_target(type(exc))
    if target is None:
        raise exc  # httpx style: an error nobody classified is not guessed into a retryable one
    if target is APITimeoutError:
        return APITimeoutError("request timed out (" + _describe(exc) + ")")
    return target(_describe(exc))


# What the hot path catches; `translate_error` re-raises the ones its table does not map.
AIOHTTP_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


@contextmanager
def map_aiohttp_errors() -> Iterator[None]:
    """Re-raise aiohttp and timeout errors as batchgen `APIError`s, chained with `from`.

    An aiohttp error that `ERROR_MAP` does not map leaves unchanged, as does anything else.
    """
    try:
        yield
    except APIError:
        raise
    except AIOHTTP_ERRORS as exc:
        raise translate_error(exc) from exc


def make_session(
    *, max_connections: int, read_timeout: float | None, connect_timeout: float | None, headers: dict[str, str]
) -> aiohttp.ClientSession:
    """A session whose connector limit matches the wanted concurrency, sending `headers` with every request.

    The headers are the session's defaults, not passed per request: aiohttp merges per-request
    headers into a new multidict in Python on every call.

    aiohttp's default `limit=100` would silently cap higher concurrency, so it is always set. The
    session has no total timeout: the per-row paths keep theirs with `Deadlines` (one timer for
    all), the others pass `attempt_timeout(...)` per request.
    """
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=300)
    client_timeout = aiohttp.ClientTimeout(total=None, sock_read=read_timeout, sock_connect=connect_timeout)
    # Compression is rarely worth it for JSON on a LAN, and auto_decompress costs CPU on the hot path.
    return aiohttp.ClientSession(connector=connector, timeout=client_timeout, raise_for_status=False, headers=headers)


def attempt_timeout(total: float, read_timeout: float | None, connect_timeout: float | None) -> aiohttp.ClientTimeout:
    """aiohttp's own timeout for one request, for the paths that are not per row."""
    return aiohttp.ClientTimeout(total=total, sock_read=read_timeout, sock_connect=connect_timeout)


async def read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read a whole body, refusing more than `limit` bytes (a runaway proxy must not eat memory)."""
    length = response.content_length
    if length is not None and length > limit:
        raise ResponseTooLargeError(f"response body of {length} bytes is over the {limit}-byte limit")
    if length is not None:
        return await response.read()
    parts: list[bytes] = []
    size = 0
    async for data in response.content.iter_any():
        size += len(data)
        if size > limit:
            raise ResponseTooLargeError(f"response body is over the {limit}-byte limit")
        parts.append(data)
    return b"".join(parts)

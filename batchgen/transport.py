"""The aiohttp edge: one session factory, one place that translates aiohttp errors, bounded reads.

Every aiohttp exception becomes the most specific `APIError` through `translate_error` (the httpx
`map_httpcore_exceptions` pattern), with the original chained: via `map_aiohttp_errors`, or on the
per-row and per-stream paths via a plain `except AIOHTTP_ERRORS` (a context manager costs more).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

from batchgen.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    IncompleteResponseError,
    ResponseTooLargeError,
)

__all__ = ["AIOHTTP_ERRORS", "make_session", "map_aiohttp_errors", "read_body", "translate_error"]

# Most specific first: isinstance order matters (ServerTimeoutError is also a connection error).
ERROR_MAP: tuple[tuple[type[BaseException], type[APIError]], ...] = (
    # No TCP connection within the connect timeout: the host is unreachable, not slow.
    (aiohttp.ConnectionTimeoutError, APIConnectionError),
    (aiohttp.ServerTimeoutError, APITimeoutError),
    (asyncio.TimeoutError, APITimeoutError),
    (aiohttp.ClientPayloadError, IncompleteResponseError),
    (aiohttp.ClientConnectionError, APIConnectionError),
    (aiohttp.ClientResponseError, IncompleteResponseError),  # unparseable status line / headers
    (aiohttp.ClientError, APIConnectionError),
)


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc).strip()
    except Exception:  # a half-built aiohttp error can fail in __str__; the type still says enough
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def translate_error(exc: BaseException) -> APIError:
    """The most specific `APIError` for an aiohttp or timeout error (raise it `from exc`)."""
    for source, target in ERROR_MAP:
        if isinstance(exc, source):
            if target is APITimeoutError:
                return APITimeoutError("request timed out (" + _describe(exc) + ")")
            return target(_describe(exc))
    return APIConnectionError(_describe(exc))  # pragma: no cover - ClientError is mapped above


# What the hot path catches: everything `translate_error` knows how to map.
AIOHTTP_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


@contextmanager
def map_aiohttp_errors() -> Iterator[None]:
    """Re-raise aiohttp and timeout errors as batchgen `APIError`s, chained with `from`."""
    try:
        yield
    except APIError:
        raise
    except AIOHTTP_ERRORS as exc:
        raise translate_error(exc) from exc


def make_session(
    *, max_connections: int, timeout: float, read_timeout: float | None, connect_timeout: float | None
) -> aiohttp.ClientSession:
    """A session whose connector limit matches the wanted concurrency.

    aiohttp's default `limit=100` would silently cap higher concurrency, so it is always set.
    """
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=300)
    client_timeout = aiohttp.ClientTimeout(total=timeout, sock_read=read_timeout, sock_connect=connect_timeout)
    # Compression is rarely worth it for JSON on a LAN, and auto_decompress costs CPU on the hot path.
    return aiohttp.ClientSession(connector=connector, timeout=client_timeout, raise_for_status=False)


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

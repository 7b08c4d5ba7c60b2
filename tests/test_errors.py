"""The error tree, and the one place that maps aiohttp errors into it."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

import batchgen
from batchgen.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    IncompleteResponseError,
    ServerError,
    status_error,
)
from batchgen.transport import map_aiohttp_errors


def _all_client_errors() -> list[type[BaseException]]:
    found, todo = [], [aiohttp.ClientError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__.startswith("aiohttp")]


@pytest.mark.parametrize("cls", _all_client_errors(), ids=lambda c: c.__name__)
def test_every_aiohttp_error_maps_to_an_api_error(cls: type[BaseException]) -> None:
    exc = cls.__new__(cls)  # constructors differ; mapping only looks at the type and str()
    try:
        exc.args = ("boom",)
    except AttributeError:  # pragma: no cover
        pass
    with pytest.raises(APIError) as caught:
        with map_aiohttp_errors():
            raise exc
    assert caught.value.__cause__ is exc


@pytest.mark.parametrize(
    ("exc", "target"),
    [
        (aiohttp.ServerTimeoutError("read"), APITimeoutError),
        (asyncio.TimeoutError(), APITimeoutError),
        (aiohttp.ServerDisconnectedError(), APIConnectionError),
        (aiohttp.ClientPayloadError("cut"), IncompleteResponseError),
        (aiohttp.ClientOSError(104, "reset"), APIConnectionError),
    ],
)
def test_specific_mappings(exc: BaseException, target: type[APIError]) -> None:
    with pytest.raises(target):
        with map_aiohttp_errors():
            raise exc


def test_status_classes() -> None:
    assert type(status_error(503, "x")) is ServerError
    assert type(status_error(408, "x")) is ServerError
    assert isinstance(status_error(404, "x"), batchgen.NotFoundError)
    assert isinstance(status_error(429, "x"), batchgen.RateLimitError)
    assert status_error(418, "x").is_retryable() is False
    assert all(issubclass(getattr(batchgen, n), batchgen.BatchgenError) for n in batchgen.__all__ if n.endswith("Error"))

"""Where a job's requests go: the base URLs as given, or built-in mock servers; and which model.

`serving(base_url)` is the one way `run` and `bench` turn a base URL into a server to talk to: a
real URL as it is, `mock` (`MOCK_URL`) as a mock vLLM server started on its own thread for the
duration (a thread, so that bench's client processes and fresh event loops reach it too);
`serving_all` does it for a list of endpoints (each `mock` is a server of its own).
`discover_model` asks a server for the model to use when the job names none; `check_endpoints`
asks every server of a pool, before anything is sent, whether it serves the run's model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from batchgen._constants import MOCK_URL
from batchgen.client import Client
from batchgen.endpoints import EndpointSpec
from batchgen.errors import APIError, APIStatusError, ConfigError, ServerUnusableError
from batchgen.lengthcheck import context_length_of

if TYPE_CHECKING:
    from batchgen.client_pool import ClientPool

__all__ = ["MOCK_URL", "check_endpoints", "discover_model", "serving", "serving_all"]


@contextlib.contextmanager
def serving(base_url: str) -> Iterator[str]:
    """The base URL to use; `mock` starts the built-in mock server for the block and yields its URL.

    The mock streams like a small GPU server (20 ms to the first token, 5 ms between tokens), so
    `bench --base-url mock` shows realistic figures; plain answers come at once.
    """
    if base_url != MOCK_URL:
        yield base_url
        return
    from batchgen.testing.mock_server import MockConfig, mock_server_thread  # only a mock job needs aiohttp.web

    with mock_server_thread(MockConfig(ttft_ms=20, itl_ms=5)) as server:
        yield server.url


@contextlib.contextmanager
def serving_all(specs: Sequence[EndpointSpec]) -> Iterator[list[EndpointSpec]]:
    """`serving` for each endpoint: the specs with real URLs (a mock server per `mock`)."""
    with contextlib.ExitStack() as stack:
        yield [dataclasses.replace(spec, url=stack.enter_context(serving(spec.url))) for spec in specs]


async def _listing(client: Client) -> list[dict[str, Any]] | APIError:
    try:
        return await client.list_models()
    except APIError as exc:
        return exc


def _ids(cards: list[dict[str, Any]]) -> list[str]:
    return [str(m["id"]) for m in cards if isinstance(m.get("id"), str)]


async def check_endpoints(
    pool: ClientPool, model: str | None, *, skip_bad: bool = False, warn: Callable[[str], None] = lambda _: None
) -> tuple[str, int | None]:
    """The run's model (`model`, else the first one the first server lists), checked on every server,
    and the smallest context (`max_model_len`) the servers kept state for it (None: none states it).

    A server that cannot be reached, or does not list the model, is an error naming it, or with
    `skip_bad` it is dropped from the pool with a warning. A server without a model list (404/405)
    is trusted with a warning when the model was named.

    Raises:
        ServerUnusableError: a server cannot be reached (or none is left); nothing was sent.
        ConfigError: a server does not serve the model; nothing was sent.
    """
    listings = await asyncio.gather(*(_listing(e.client) for e in pool.endpoints))
    if not model:
        first = pool.endpoints[0].url
        found = next((ids for cards in listings if isinstance(cards, list) and (ids := _ids(cards))), None)
        if found is None:
            failure = listings[0]
            if isinstance(failure, APIError):
                raise ServerUnusableError(f"cannot list models at {first}/models: {failure}; pass --model to skip discovery")
            raise ServerUnusableError(f"{first}/models lists no model; pass --model")
        model = found[0]
    problems: list[tuple[Any, str]] = []
    contexts: list[int] = []
    for endpoint, cards in zip(list(pool.endpoints), listings, strict=True):
        if isinstance(cards, APIStatusError) and cards.status_code in (404, 405):
            warn(f"cannot check that {endpoint.url} serves {model!r} (GET /models: HTTP {cards.status_code}); sending anyway")
        elif isinstance(cards, APIError):
            problems.append((ServerUnusableError, f"cannot list models at {endpoint.url}/models: {cards}"))
        elif model not in (ids := _ids(cards)):
            serves = ", ".join(repr(i) for i in ids) or "no model"
            problems.append((ConfigError, f"{endpoint.url} does not serve model {model!r} (it serves {serves})"))
        else:
            if (context := context_length_of(cards, model)) is not None:
                contexts.append(context)
            continue
        if skip_bad and problems and len(pool.endpoints) > 1:
            warn(f"skipping endpoint: {problems.pop()[1]}")
            await pool.drop(endpoint)
    if problems:
        hint = "; --skip-bad-endpoints drops such a server" if len(listings) > 1 else ""
        kind = ServerUnusableError if any(k is ServerUnusableError for k, _ in problems) else ConfigError
        raise kind("; ".join(text for _, text in problems) + hint)
    return model, min(contexts, default=None)


async def discover_model(client: Client, model: str | None) -> str:
    """`model` when given, else the first model the server lists (GET /v1/models), as vLLM's tools do.

    Raises:
        ServerUnusableError: the server cannot list its models, or lists none (nothing was sent).
    """
    if model:
        return model
    try:
        models = await client.list_models()
    except APIError as exc:
        raise ServerUnusableError(
            f"cannot list models at {client.base_url}/models: {exc}; pass --model to skip discovery"
        ) from exc
    if not models or not isinstance(models[0].get("id"), str):
        raise ServerUnusableError(f"{client.base_url}/models lists no model; pass --model")
    return str(models[0]["id"])

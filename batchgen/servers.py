"""Where a job's requests go: the base URL as given, or the built-in mock server; and which model.

`serving(base_url)` is the one way `run` and `bench` turn a base URL into a server to talk to: a
real URL as it is, `mock` (`MOCK_URL`) as a mock vLLM server started on its own thread for the
duration (a thread, so that bench's client processes and fresh event loops reach it too).
`discover_model` asks a server for the model to use when the job names none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from batchgen._constants import MOCK_URL
from batchgen.client import Client
from batchgen.errors import APIError, ServerUnusableError

__all__ = ["MOCK_URL", "discover_model", "serving"]


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

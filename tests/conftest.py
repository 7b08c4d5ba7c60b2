"""Shared fixtures: a scripted HTTP server on 127.0.0.1, a clean environment, instant backoff; and
the helpers that tell which row (and which attempt) a recorded request is for."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may pick up a key or proxy from the developer's shell."""
    for name in ("BATCHGEN_API_KEY", "OPENAI_API_KEY", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Computed backoff becomes 0 s so retry tests run fast; server-sent Retry-After still counts."""
    import batchgen.client as client_module

    real = client_module.backoff_delay

    def fast(retry: int, policy: Any, retry_after: float | None = None) -> float:
        return real(retry, policy, retry_after) if retry_after is not None else 0.0

    monkeypatch.setattr(client_module, "backoff_delay", fast)


# ---------------------------------------------------------------- which row a request is for
#
# batchgen sends no row-id or attempt header (issue 9: real servers reject or misuse them), so a test
# tells a recorded request's row by its prompt, which every test writes as a function of the row id,
# and its attempt by counting: a row's attempts are sent one after another, never two at once, so the
# k-th request seen for a row is its attempt k.


def prompt_of(body: Mapping[str, Any]) -> str:
    """The text of a chat request's (or an input row's) last message."""
    content = body["messages"][-1]["content"]
    assert isinstance(content, str), f"a request whose last message is not text: {content!r:.80}"
    return content


def row_lookup(ids_by_prompt: Mapping[str, str]) -> Callable[[str], str]:
    """Prompt -> row id for a test that lists its prompts; a prompt of no listed row fails the test."""

    def row_of(prompt: str) -> str:
        assert prompt in ids_by_prompt, f"a request for no known row: prompt {prompt[:80]!r}"
        return ids_by_prompt[prompt]

    return row_of


def rows_sent(bodies: Iterable[Mapping[str, Any]], row_of: Callable[[str], str]) -> list[str]:
    """The row id of each recorded request body, in record order (`row_of` maps a prompt to its row)."""
    return [row_of(prompt_of(body)) for body in bodies]


class AttemptCounter:
    """Numbers one server's requests per row, in arrival order: the k-th request for a row is its attempt k."""

    def __init__(self) -> None:
        self._seen: Counter[str] = Counter()

    def next(self, row_id: str) -> int:
        self._seen[row_id] += 1
        return self._seen[row_id]


# ---------------------------------------------------------------- scripted server


@dataclass
class Reply:
    """One scripted answer. `action` 'disconnect' closes the socket without answering."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    action: str | None = None
    chunks: list[bytes] | None = None  # for streaming bodies: written one by one


@dataclass
class Scripted:
    url: str
    requests: list[dict[str, Any]]
    headers: list[dict[str, str]]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def scripted_server() -> AsyncIterator[Callable[..., Awaitable[Scripted]]]:
    """Start a server that answers POST /v1/chat/completions with the given replies in order
    (the last one repeats) and records each request body and its headers."""
    servers: list[TestServer] = []

    async def start(replies: list[Reply], models: bytes | None = None) -> Scripted:
        import orjson

        bodies: list[dict[str, Any]] = []
        headers: list[dict[str, str]] = []

        async def handle(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            bodies.append(orjson.loads(raw) if raw else {})
            headers.append(dict(request.headers))
            reply = replies[min(len(bodies) - 1, len(replies) - 1)]
            if reply.action == "stall":  # longer than any client timeout a test sets
                await asyncio.sleep(5)
            if reply.action == "disconnect":
                assert request.transport is not None
                request.transport.close()
                await asyncio.sleep(0)
                return web.Response()
            if reply.chunks is not None:
                response = web.StreamResponse(status=reply.status, headers=reply.headers)
                response.content_type = reply.content_type
                await response.prepare(request)
                for chunk in reply.chunks:
                    await response.write(chunk)
                if reply.action == "cut":
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write_eof()
                return response
            return web.Response(
                status=reply.status, body=reply.body, headers={"Content-Type": reply.content_type, **reply.headers}
            )

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handle)
        if models is not None:

            async def list_models(request: web.Request) -> web.Response:
                return web.Response(body=models, content_type="application/json")

            app.router.add_get("/v1/models", list_models)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return Scripted(url=str(server.make_url("/v1")), requests=bodies, headers=headers)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def dead_url() -> Iterator[Callable[[], str]]:
    """`dead_url()`: the base URL of a port that refuses connections for the whole test.

    The socket stays bound (not listening) until the test ends, so no server started meanwhile can
    take the port and make the "dead" URL answer.
    """
    import socket

    held: list[socket.socket] = []

    def make() -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        held.append(sock)
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"

    yield make
    for sock in held:
        sock.close()


if TYPE_CHECKING:
    from batchgen.testing.mock_server import MockServer

StartServer = Callable[..., Awaitable["MockServer"]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp session, for tests that speak to a server without batchgen's client."""
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """`await start_server(**MockConfig fields, clock=None)`: a started mock server, closed after the test."""
    from batchgen.testing.mock_server import MockConfig, MockServer

    servers: list[MockServer] = []

    async def start(*, clock: Callable[[], float] | None = None, **config: Any) -> MockServer:
        server = MockServer(MockConfig(**config)) if clock is None else MockServer(MockConfig(**config), clock=clock)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()

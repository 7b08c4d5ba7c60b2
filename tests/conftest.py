"""Shared fixtures: a scripted HTTP server on 127.0.0.1, a clean environment, instant backoff."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

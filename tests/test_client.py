"""The client over real sockets: retries, statuses, streaming assembly, builder, validation, keys."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from batchgen import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    Client,
    IncompleteResponseError,
    RateLimitError,
    ResponseTooLargeError,
    ServerError,
    ToolArgumentsError,
    ValidationError,
)

from .conftest import FIXTURES, Reply

MESSAGES = [{"role": "user", "content": "hi"}]
OK = Reply(body=(FIXTURES / "chat_plain_response.json").read_bytes())


def _sse(*events: dict[str, Any], done: bool = True) -> list[bytes]:
    chunks = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events]
    return chunks + ([b"data: [DONE]\n\n"] if done else [])


FAILURES = {
    "408": Reply(status=408, body=b'{"error":{"message":"timeout","type":"RequestTimeout","code":408}}'),
    "429": Reply(status=429, body=b'{"error":{"message":"slow down","type":"RateLimitError","code":429}}'),
    "500": Reply(status=500, body=b'{"error":{"message":"Internal server error","type":"InternalServerError","code":500}}'),
    "502": Reply(status=502, body=b"<html>Bad Gateway</html>", content_type="text/html"),
    "503": Reply(status=503, body=b""),
    "504": Reply(status=504, body=b"gateway timeout", content_type="text/plain"),
    "disconnect": Reply(action="disconnect"),
    "malformed": Reply(body=b'{"id": "x", "choices": '),
    "not_a_completion": Reply(body=b'{"object": "list", "data": []}'),
    "timeout": Reply(action="stall"),
}


@pytest.mark.parametrize("kind", sorted(FAILURES))
@pytest.mark.parametrize("failures", [0, 2, 4])
async def test_retryable_failures_then_success(kind: str, failures: int, scripted_server: Any, no_backoff: None) -> None:
    server = await scripted_server([FAILURES[kind]] * failures + [OK])
    async with Client(server.url, max_retries=5, timeout=0.5) as client:
        response = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert response.content == "The capital of France is Paris."
    assert response.attempts == failures + 1
    assert len(server.requests) == failures + 1
    # No attempt header (issue 9): every retry resends the same body, so a server sees attempts 1..n of one request.
    assert server.requests == [server.requests[0]] * (failures + 1)


STREAM_FAILURES = {
    "cut": Reply(chunks=_sse({"choices": [{"index": 0, "delta": {"content": "part"}}]}, done=False),
                 content_type="text/event-stream", action="cut"),
    "error_event_500": Reply(chunks=[b'data: {"error": {"message": "engine died", "type": "InternalServerError", '
                                     b'"param": null, "code": 500}}\n\n', b"data: [DONE]\n\n"],
                             content_type="text/event-stream"),
    "stall": Reply(action="stall"),
    "503": FAILURES["503"],
}
STREAM_OK = Reply(chunks=_sse({"id": "s", "choices": [{"index": 0, "delta": {"content": "whole"}, "finish_reason": "stop"}]}),
                  content_type="text/event-stream")


@pytest.mark.parametrize("kind", sorted(STREAM_FAILURES))
@pytest.mark.parametrize("failures", [0, 2, 4])
async def test_streamed_failures_then_success(kind: str, failures: int, scripted_server: Any, no_backoff: None) -> None:
    server = await scripted_server([STREAM_FAILURES[kind]] * failures + [STREAM_OK])
    async with Client(server.url, max_retries=5, timeout=0.5) as client:
        response = await client.complete({"model": "m", "messages": MESSAGES, "stream": True})
    assert response.content == "whole" and response.attempts == failures + 1
    assert len(server.requests) == failures + 1


@pytest.mark.parametrize(
    ("kind", "error"),
    [("429", RateLimitError), ("500", ServerError), ("disconnect", APIConnectionError), ("malformed", IncompleteResponseError)],
)
async def test_retry_budget_spent_raises_last_error(kind: str, error: type[Exception], scripted_server: Any, no_backoff: None) -> None:
    server = await scripted_server([FAILURES[kind]])
    async with Client(server.url, max_retries=2) as client:
        with pytest.raises(error) as caught:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.attempts == 3  # type: ignore[attr-defined]
    assert len(server.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_non_retryable_status_is_tried_once(status: int, scripted_server: Any, no_backoff: None) -> None:
    server = await scripted_server([Reply(status=status, body=b'{"error":{"message":"nope","type":"X","code":%d}}' % status)])
    async with Client(server.url, max_retries=5) as client:
        with pytest.raises(APIStatusError) as caught:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.status_code == status
    assert caught.value.message == "nope"
    assert len(server.requests) == 1


async def test_retry_after_is_obeyed(scripted_server: Any) -> None:
    slow = Reply(status=429, body=b"{}", headers={"Retry-After": "0.3"})
    server = await scripted_server([slow, OK])
    async with Client(server.url, max_retries=2, backoff_base=0.0) as client:
        started = time.perf_counter()
        await client.chat.completions.create(model="m", messages=MESSAGES)
        waited = time.perf_counter() - started
    assert waited >= 0.3


async def test_retry_after_ms_and_cap(scripted_server: Any) -> None:
    slow = Reply(status=503, body=b"{}", headers={"retry-after-ms": "200", "Retry-After": "30"})
    server = await scripted_server([slow, OK])
    async with Client(server.url, max_retries=1, max_retry_after=0.25) as client:
        started = time.perf_counter()
        await client.chat.completions.create(model="m", messages=MESSAGES)
    assert time.perf_counter() - started >= 0.2


async def test_timeout_is_retried_then_reported(scripted_server: Any, no_backoff: None) -> None:
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestServer

    calls = 0

    async def stall(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(5)
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stall)
    async with TestServer(app, host="127.0.0.1") as server:
        async with Client(str(server.make_url("/v1")), timeout=0.2, max_retries=1) as client:
            with pytest.raises(APITimeoutError):
                await client.chat.completions.create(model="m", messages=MESSAGES)
    assert calls == 2


async def test_error_bodies_are_readable(scripted_server: Any) -> None:
    cases = [
        (Reply(status=401, body=b'{"error":"Unauthorized"}'), AuthenticationError, "Unauthorized"),
        (Reply(status=404, body=b'{"detail":"Not Found"}'), APIStatusError, "Not Found"),
        (Reply(status=400, body=b'{"object":"error","message":"bad temp","type":"BadRequestError","code":400}'), BadRequestError, "bad temp"),
        (Reply(status=400, body=b"", content_type="text/plain"), BadRequestError, "(empty response body)"),
        (Reply(status=400, body=b"<h1>nginx</h1>", content_type="text/html"), BadRequestError, "<h1>nginx</h1>"),
    ]
    for reply, error, text in cases:
        server = await scripted_server([reply])
        async with Client(server.url, max_retries=0) as client:
            with pytest.raises(error) as caught:
                await client.chat.completions.create(model="m", messages=MESSAGES)
        assert text in str(caught.value)


async def test_api_key_is_sent_but_never_shown(scripted_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-SECRET-1234567890"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    server = await scripted_server([Reply(status=401, body=b'{"error":"Unauthorized"}')])
    client = Client(server.url, max_retries=0)
    with pytest.raises(AuthenticationError) as caught:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    await client.aclose()
    assert server.headers[0]["Authorization"] == f"Bearer {secret}"
    assert secret not in str(caught.value) and secret not in repr(client)


async def test_batchgen_key_wins_over_openai_key(scripted_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")
    monkeypatch.setenv("BATCHGEN_API_KEY", "batchgen-key")
    server = await scripted_server([OK])
    async with Client(server.url) as client:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    assert server.headers[0]["Authorization"] == "Bearer batchgen-key"


async def test_parameters_reach_the_body_and_none_is_not_sent(scripted_server: Any) -> None:
    server = await scripted_server([OK])
    async with Client(server.url) as client:
        await client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            temperature=0.2,
            max_tokens=16,
            top_k=20,
            stop=["###"],
            seed=7,
            extra={"chat_template_kwargs": {"enable_thinking": False}, "min_p": 0.1},
            repetition_penalty=1.1,
        )
    assert server.requests[0] == {
        "model": "m",
        "messages": MESSAGES,
        "temperature": 0.2,
        "max_tokens": 16,
        "top_k": 20,
        "stop": ["###"],
        "seed": 7,
        "chat_template_kwargs": {"enable_thinking": False},
        "min_p": 0.1,
        "repetition_penalty": 1.1,
    }


def _chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


@pytest.mark.parametrize("repeat_header", [False, True])
async def test_stream_tool_calls_join_per_index(repeat_header: bool, scripted_server: Any) -> None:
    def piece(index: int, text: str) -> dict[str, Any]:
        call: dict[str, Any] = {"index": index, "function": {"arguments": text}}
        if repeat_header:  # some servers repeat id/type/name in every delta
            call.update(id=f"call-{index}", type="function")
            call["function"]["name"] = "lookup"
        return _chunk({"tool_calls": [call]})

    header = [_chunk({"role": "assistant", "content": ""})] + [
        _chunk({"tool_calls": [{"index": i, "id": f"call-{i}", "type": "function", "function": {"name": "lookup"}}]})
        for i in (0, 1)
    ]
    body = header + [piece(0, '{"q": '), piece(1, '{"q": "b"}'), piece(0, '"a"}'), _chunk({}, "tool_calls")]
    usage = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}
    server = await scripted_server([Reply(chunks=_sse(*body, usage), content_type="text/event-stream")])
    async with Client(server.url) as client:
        stream = await client.chat.completions.builder().model("m").user("hi").send_stream()
        chunks = [c async for c in stream]
    response = stream.response
    assert response is not None and len(chunks) == len(body) + 1
    assert [(c.id, c.function.name, c.function.arguments) for c in response.tool_calls] == [
        ("call-0", "lookup", '{"q": "a"}'),
        ("call-1", "lookup", '{"q": "b"}'),
    ]
    assert response.tool_calls[0].parse_arguments() == {"q": "a"}
    assert response.content is None and response.finish_reason == "tool_calls"
    assert response.usage is not None and response.usage.total_tokens == 12
    assert server.requests[0]["stream_options"] == {"include_usage": True}


async def test_stream_error_event_raises_status_error(scripted_server: Any) -> None:
    events = [b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
              b'data: {"error": {"message": "prompt invalid", "type": "BadRequestError", "param": null, "code": 400}}\n\n',
              b"data: [DONE]\n\n"]
    server = await scripted_server([Reply(chunks=events, content_type="text/event-stream")])
    async with Client(server.url, max_retries=3) as client:
        with pytest.raises(BadRequestError, match="prompt invalid"):
            await client.complete({"model": "m", "messages": MESSAGES, "stream": True})
    assert len(server.requests) == 1


async def test_stream_cut_before_done_is_retried(scripted_server: Any, no_backoff: None) -> None:
    cut = Reply(chunks=_sse(_chunk({"content": "partial"}), done=False), content_type="text/event-stream", action="cut")
    whole = Reply(chunks=_sse(_chunk({"content": "whole"}), _chunk({}, "stop")), content_type="text/event-stream")
    server = await scripted_server([cut, whole])
    async with Client(server.url, max_retries=2) as client:
        response = await client.complete({"model": "m", "messages": MESSAGES, "stream": True})
    assert response.content == "whole" and response.attempts == 2
    assert response.ttft_s is not None and response.latency_s is not None


async def test_stream_never_finishing_raises_incomplete(scripted_server: Any, no_backoff: None) -> None:
    cut = Reply(chunks=_sse(_chunk({"content": "partial"}), done=False), content_type="text/event-stream")
    server = await scripted_server([cut])
    async with Client(server.url, max_retries=1) as client:
        with pytest.raises(IncompleteResponseError, match="before \\[DONE\\]$"):
            await client.complete({"model": "m", "messages": MESSAGES, "stream": True})


async def test_an_empty_stream_says_no_event_came(scripted_server: Any, no_backoff: None) -> None:
    """llama.cpp's answer to a prompt over its context when streaming: 200, then nothing."""
    server = await scripted_server([Reply(chunks=[], content_type="text/event-stream")])
    async with Client(server.url, max_retries=1) as client:
        with pytest.raises(IncompleteResponseError, match="no event at all"):
            await client.complete({"model": "m", "messages": MESSAGES, "stream": True})


async def test_response_over_size_limit_is_not_retried(scripted_server: Any) -> None:
    server = await scripted_server([OK])
    async with Client(server.url, max_response_bytes=100, max_retries=3) as client:
        with pytest.raises(ResponseTooLargeError):
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert len(server.requests) == 1


async def test_wrong_types_in_a_200_are_reported(scripted_server: Any, no_backoff: None) -> None:
    bad = orjson.dumps({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": 42}}]})
    server = await scripted_server([Reply(body=bad)])
    async with Client(server.url, max_retries=0) as client:
        with pytest.raises(IncompleteResponseError, match="content is int"):
            await client.chat.completions.create(model="m", messages=MESSAGES)


def test_builder_builds_the_body() -> None:
    client = Client("http://127.0.0.1:9/v1")
    body = (
        client.chat.completions.builder()
        .model("m")
        .system("be brief")
        .user("hi")
        .temperature(0.5)
        .max_tokens(10)
        .top_p(0.9)
        .top_k(5)
        .stop("###")
        .seed(1)
        .tools([{"type": "function", "function": {"name": "f", "parameters": {}}}])
        .tool_choice("auto")
        .extra({"reasoning_effort": "low"})
        .stream()
        .build()
    )
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["reasoning_effort"] == "low" and body["top_k"] == 5 and body["tool_choice"] == "auto"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"stop": [1, 2]}, "stop"),
        ({"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
    ],
)
async def test_validation_names_the_field_before_any_request(fields: dict[str, Any], field: str, scripted_server: Any) -> None:
    server = await scripted_server([OK])
    args: dict[str, Any] = {"model": "m", "messages": MESSAGES, **fields}
    async with Client(server.url) as client:
        with pytest.raises(ValidationError) as caught:
            await client.chat.completions.create(**args)
    assert caught.value.field == field
    assert str(caught.value).startswith(field + ":")
    assert server.requests == []


def test_tool_arguments_parse_errors_are_clear() -> None:
    from batchgen.types import Function

    with pytest.raises(ToolArgumentsError, match="not valid JSON"):
        Function("f", '{"city": ').parse_arguments()
    with pytest.raises(ToolArgumentsError, match="not an object"):
        Function("f", "[1, 2]").parse_arguments()
    assert Function("f", "").parse_arguments() == {}


async def test_a_consumer_that_stops_early_hands_the_connection_back(scripted_server: Any) -> None:
    # One pooled connection: if a stream left early kept it, the next open would wait for ever.
    events = [_chunk({"role": "assistant", "content": ""})] + [_chunk({"content": f" w{i}"}) for i in range(50)]
    server = await scripted_server([Reply(chunks=_sse(*events), content_type="text/event-stream")])
    async with Client(server.url, max_retries=0, max_connections=1, timeout=5) as client:
        for _ in range(3):
            stream = await client.open_stream({"model": "m", "messages": MESSAGES, "stream": True})
            async for chunk in stream:
                if chunk.has_text:
                    break
            stream = await client.open_stream({"model": "m", "messages": MESSAGES, "stream": True})
            async for _ in stream.reads():
                break
    assert len(server.requests) == 6

"""`batchgen.Client` against llama.cpp's server: create(), the builder, a stream, and the requests it refuses."""

from __future__ import annotations

import pytest

from batchgen import BadRequestError, Client, ServerError
from tests.real.conftest import LlamaServer

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


async def test_list_models_and_create(llama_server: LlamaServer) -> None:
    async with Client(llama_server.url) as client:
        models = await client.list_models()
        assert [m["id"] for m in models] == [llama_server.model]
        r = await client.chat.completions.create(model=models[0]["id"], messages=FRANCE, temperature=0, max_tokens=24)
    assert r.content is not None and "Paris" in r.content
    assert r.finish_reason in ("stop", "length")
    assert r.id is not None and r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.model == llama_server.model and r.attempts == 1
    assert r.usage is not None and r.usage.prompt_tokens is not None and r.usage.prompt_tokens > 0
    assert r.usage.completion_tokens is not None and 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert len(r.choices) == 1 and r.choices[0].role == "assistant" and r.tool_calls == []


async def test_builder_send(llama_server: LlamaServer) -> None:
    async with Client(llama_server.url) as client:
        r = await (client.chat.completions.builder()
                   .model(llama_server.model).user("Count from one to twenty.").temperature(0).max_tokens(8).send())
    assert r.content
    assert r.usage is not None and r.usage.completion_tokens == 8
    assert r.finish_reason == "length"


async def test_stream_chunks_join_to_the_response(llama_server: LlamaServer) -> None:
    async with Client(llama_server.url) as client:
        stream = await client.chat.completions.create(
            model=llama_server.model, messages=FRANCE, temperature=0, max_tokens=24, stream=True
        )
        pieces = []
        async for chunk in stream:
            pieces.append(chunk.content or "")
        response = stream.response
    assert response is not None
    assert response.content and "Paris" in response.content
    assert "".join(pieces) == response.content
    assert response.finish_reason in ("stop", "length")
    assert response.model == llama_server.model
    assert response.usage is None  # llama.cpp sends no usage chunk, and batchgen invents none


async def test_prompt_longer_than_the_context_is_a_bad_request(llama_server: LlamaServer) -> None:
    too_long = [{"role": "user", "content": "word " * 10_000}]
    async with Client(llama_server.url, max_retries=0) as client:
        with pytest.raises(BadRequestError) as caught:
            await client.chat.completions.create(model=llama_server.model, messages=too_long, max_tokens=8)
    error = caught.value
    assert error.status_code == 400
    assert f"maximum context length is {llama_server.n_ctx} tokens" in error.message, error.message


async def test_opt_in_request_id_is_a_uuid_llama_cpp_accepts(llama_server: LlamaServer) -> None:
    async with Client(llama_server.url, request_id_header="X-Request-ID", max_retries=0) as client:
        r = await client.chat.completions.create(model=llama_server.model, messages=FRANCE, max_tokens=2)
    assert r.finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 2


async def test_any_other_request_id_gets_an_empty_400(llama_server: LlamaServer) -> None:
    """Why batchgen sends no per-row header by default: llama.cpp refuses a non-UUID X-Request-ID
    with a bare 400 (no body at all), whatever the request."""
    async with Client(llama_server.url, headers={"X-Request-ID": "row-7"}, max_retries=0) as client:
        with pytest.raises(BadRequestError) as caught:
            await client.chat.completions.create(model=llama_server.model, messages=FRANCE, max_tokens=2)
    assert caught.value.status_code == 400
    assert str(caught.value) == "HTTP 400: (empty response body)"


async def test_a_request_validation_error_is_a_500(llama_server: LlamaServer) -> None:
    """llama.cpp reports a field of the wrong type as 500 (pydantic's message inside), not 400/422:
    batchgen, which retries 500s, spends its retries on it."""
    async with Client(llama_server.url, max_retries=0) as client:
        with pytest.raises(ServerError) as caught:
            await client.chat.completions.create(
                model=llama_server.model, messages=FRANCE, extra={"mirostat_tau": "high"}  # a float field
            )
    assert caught.value.status_code == 500 and caught.value.type == "internal_server_error"
    assert "1 validation error" in caught.value.message and "'loc': ('body', 'mirostat_tau')" in caught.value.message

"""Every recorded vLLM fixture, served over HTTP, parses to what the manifest expects."""

from __future__ import annotations

import json
from typing import Any

import pytest

from batchgen import APIStatusError, ChatCompletionResponse, Client

from .conftest import FIXTURES, Reply

MANIFEST: dict[str, Any] = json.loads((FIXTURES / "manifest.json").read_text())
CASES = sorted(name for name in MANIFEST if not name.startswith("_"))
MESSAGES = [{"role": "user", "content": "hi"}]


def _split(data: bytes, size: int) -> list[bytes]:
    # Odd-sized pieces cut events, lines and multi-byte characters anywhere.
    return [data[i : i + size] for i in range(0, len(data), size)]


def _check_answer(response: ChatCompletionResponse, expect: dict[str, Any]) -> None:
    assert response.content == expect["content"]
    assert response.reasoning_content == expect["reasoning"]
    assert response.finish_reason == expect["finish_reason"]
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in response.tool_calls]
    assert calls == expect["tool_calls"]
    for call in response.tool_calls:
        assert isinstance(call.parse_arguments(), dict)
    if expect["usage"] is None:
        assert response.usage is None
    else:
        usage = response.usage
        assert usage is not None
        got = {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "cached_tokens": usage.cached_tokens,
        }
        assert got == expect["usage"]
    if "stop_reason" in expect:
        assert response.choices[0].stop_reason == expect["stop_reason"]
    if "logprob_tokens" in expect:
        logprobs = response.choices[0].logprobs
        assert logprobs is not None
        assert [t.token for t in logprobs] == expect["logprob_tokens"]
        assert all(t.logprob <= 0 and t.bytes == list(t.token.encode()) for t in logprobs)


@pytest.mark.parametrize("name", CASES)
async def test_fixture_parses_as_manifest_says(name: str, scripted_server: Any) -> None:
    expect = MANIFEST[name]["expect"]
    data = (FIXTURES / name).read_bytes()
    if name == "models_list.json":
        server = await scripted_server([Reply()], models=data)
        async with Client(server.url) as client:
            models = await client.list_models()
        assert [m["id"] for m in models] == expect["served_model_names"]
        assert models[0]["id"] == expect["base_model"]
        assert models[0]["max_model_len"] == expect["max_model_len"]
        return
    if name.endswith(".sse"):
        server = await scripted_server([Reply(chunks=_split(data, 7), content_type="text/event-stream")])
    else:
        server = await scripted_server([Reply(status=expect["http_status"], body=data)])
    async with Client(server.url, max_retries=0) as client:
        if expect.get("error"):
            with pytest.raises(APIStatusError) as caught:
                await client.chat.completions.create(model="m", messages=MESSAGES)
            err = caught.value
            assert err.status_code == expect["http_status"]
            assert expect["error"]["message_contains"] in err.message
            assert err.type == expect["error"]["type"]
            assert err.param == expect["error"]["param"]
            assert err.code == expect["error"]["code"]
            return
        if name.endswith(".sse"):
            stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            chunks = [chunk async for chunk in stream]
            assert chunks, "a stream yields chunks"
            assert stream.response is not None
            _check_answer(stream.response, expect)
        else:
            _check_answer(await client.chat.completions.create(model="m", messages=MESSAGES), expect)

"""Tool calls from llama.cpp's server (chat format chatml-function-calling), plain and streamed.

Its stream repeats the call's `id`, `type` and `function.name` in every chunk, next to each piece
of the arguments: a client that appends the name per chunk gets "get_weatherget_weather...".
"""

from __future__ import annotations

from typing import Any

import pytest

from batchgen import Client
from tests.real.conftest import LlamaServer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_named_tool_choice_gives_one_whole_call(llama_tools_server: LlamaServer, stream: bool) -> None:
    options: dict[str, Any] = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    async with Client(llama_tools_server.url) as client:
        answer = await client.chat.completions.create(
            model=llama_tools_server.model, messages=ASK, temperature=0, max_tokens=48, stream=stream, **options
        )
        if stream:
            chunks = [chunk async for chunk in answer]
            assert len(chunks) > 3  # role, several argument pieces, finish
            response = answer.response
        else:
            response = answer
    assert response is not None
    assert response.finish_reason == "tool_calls"
    [call] = response.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id is not None and call.id.startswith("call__0_get_weather_cmpl-"), call.id
    assert call.parse_arguments() == {"city": "Paris"}
    assert not response.content  # null, or nothing joined from a stream

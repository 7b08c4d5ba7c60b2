"""The mock vLLM server over real sockets, spoken to by a plain aiohttp client (not batchgen's own)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchgen.testing import (
    FAULT_KINDS,
    MockConfig,
    MockServer,
    MockState,
    add_arguments,
    main,
    make_app,
    mock_server_thread,
)
from batchgen.testing.mock_replies import ALT_TOKENS, completion_body, plan_chat, stream_events

from .conftest import StartServer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
USER_TEXT = "hello there world"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
]

Response = tuple[int, Any, bytes]  # status, headers, raw body


def chat(text: str = USER_TEXT, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    return {"model": "mock-model", "messages": messages, **extra}




@pytest.fixture
async def server(start_server: StartServer) -> MockServer:
    return await start_server()


async def post(
    session: aiohttp.ClientSession, server: MockServer, body: Any, headers: dict[str, str] | None = None
) -> Response:
    async with session.post(f"{server.url}/chat/completions", json=body, headers=headers) as resp:
        return resp.status, resp.headers, await resp.read()


async def post_json(session: aiohttp.ClientSession, server: MockServer, body: Any, **kw: Any) -> dict[str, Any]:
    status, _, raw = await post(session, server, body, **kw)
    assert status == 200, raw
    result: dict[str, Any] = orjson.loads(raw)
    return result


def sse_payloads(raw: bytes) -> list[dict[str, Any]]:
    """Check the framing (only `data: ...\\n\\n` events, [DONE] last) and decode the JSON events."""
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]"
    assert all(f.startswith(b"data: ") for f in frames[:-1])
    return [orjson.loads(f[len(b"data: ") :]) for f in frames[:-2]]


def fixture_sse(name: str) -> list[dict[str, Any]]:
    return sse_payloads((FIXTURES / name).read_bytes())


async def stream(session: aiohttp.ClientSession, server: MockServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    status, headers, raw = await post(session, server, {**body, "stream": True})
    assert status == 200, raw
    assert headers["Content-Type"].startswith("text/event-stream")
    return sse_payloads(raw)


def joined(chunks: list[dict[str, Any]], key: str, index: int = 0) -> str:
    return "".join(
        c["choices"][0]["delta"].get(key) or ""
        for c in chunks
        if c["choices"] and c["choices"][0]["index"] == index
    )


def reassemble(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Rebuild every choice of a stream by its index, as a client must: one choice per chunk, any order."""
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        assert len(chunk["choices"]) <= 1
        for c in chunk["choices"]:
            new: dict[str, Any] = {"reasoning": "", "content": "", "arguments": "", "logprobs": []}
            acc = choices.setdefault(c["index"], {**new, "finish_reason": None, "stop_reason": None})
            assert acc["finish_reason"] is None, "a chunk after the finish chunk"
            delta = c["delta"]
            acc["reasoning"] += delta.get("reasoning", "")
            acc["content"] += delta.get("content", "")
            acc["arguments"] += "".join(t["function"].get("arguments", "") for t in delta.get("tool_calls", []))
            if c["logprobs"] is not None:
                acc["logprobs"] += c["logprobs"]["content"]
            if c["finish_reason"] is not None:
                acc["finish_reason"], acc["stop_reason"] = c["finish_reason"], c["stop_reason"]
    return choices


def plain_view(choice: dict[str, Any]) -> dict[str, Any]:
    """A plain body's choice in `reassemble`'s shape (a stream cannot tell null content from "")."""
    message = choice["message"]
    return {
        "reasoning": message["reasoning"] or "",
        "content": message["content"] or "",
        "arguments": "".join(t["function"]["arguments"] for t in message["tool_calls"]),
        "logprobs": (choice["logprobs"] or {"content": []})["content"],
        "finish_reason": choice["finish_reason"],
        "stop_reason": choice["stop_reason"],
    }


def expected_logprob(position: int, token: str, k: int) -> dict[str, Any]:
    """The logprobs rule of mock_replies' docstring, written out again."""
    h = int.from_bytes(hashlib.blake2b(f"{position}:{token}".encode(), digest_size=8).digest(), "big")
    start = h % len(ALT_TOKENS)
    others = [t for t in ALT_TOKENS[start:] + ALT_TOKENS[:start] if t != token]
    top = [(token, 0), *((t, i) for i, t in enumerate(others, start=1))][:k]
    entries = [{"token": t, "logprob": -(h % 5000 + 1000 * i) / 1000, "bytes": list(t.encode())} for t, i in top]
    return {"token": token, "logprob": -(h % 5000) / 1000, "bytes": list(token.encode()), "top_logprobs": entries}


def expected_logprobs(tokens: list[str], k: int) -> list[dict[str, Any]]:
    return [expected_logprob(p, t, k) for p, t in enumerate(tokens)]


ECHO_TOKENS = ["echo:", " hello", " there", " world"]
CACHED_SYSTEM = {"cached_tokens": 2}  # chat()'s system message, "be brief", is the cached prefix
EXACT_6_MIN_2 = {"ignore_eos": True, "max_tokens": 6, "min_tokens": 2}
THINKING_TOKENS = ["Thinking", " about:", " hello", " there", " world"]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


# ---------------------------------------------------------------- discovery endpoints


async def test_models_list(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(models=("base", "alias"))
    async with session.get(f"{server.url}/models") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == ["base", "alias"]
    card = body["data"][0]
    assert card.keys() == orjson.loads((FIXTURES / "models_list.json").read_bytes())["data"][0].keys()
    assert card["max_model_len"] == 8192 and card["owned_by"] == "vllm" and card["parent"] is None


async def test_health_version_and_unknown_routes(server: MockServer, session: aiohttp.ClientSession) -> None:
    root = server.url.removesuffix("/v1")
    async with session.get(f"{root}/health") as resp:
        assert resp.status == 200 and await resp.read() == b""
    async with session.get(f"{root}/version") as resp:
        assert await resp.json() == {"version": "0.16.0-mock"}
    async with session.get(f"{server.url}/nope") as resp:
        assert resp.status == 404 and await resp.json() == {"detail": "Not Found"}
    async with session.get(f"{server.url}/chat/completions") as resp:
        assert resp.status == 405 and await resp.json() == {"detail": "Method Not Allowed"}


# ---------------------------------------------------------------- non-stream answers


async def test_plain_answer_has_every_vllm_key(server: MockServer, session: aiohttp.ClientSession) -> None:
    status, headers, raw = await post(session, server, chat())
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert raw == orjson.dumps(orjson.loads(raw))  # compact, like vLLM
    body = orjson.loads(raw)
    expected = orjson.loads((FIXTURES / "chat_plain_response.json").read_bytes())
    assert body.keys() == expected.keys()
    assert body["choices"][0].keys() == expected["choices"][0].keys()
    assert body["choices"][0]["message"].keys() == expected["choices"][0]["message"].keys()
    # 2026 main adds completion_tokens_details (null without reasoning) to the v0.16-v0.23 fixture's keys.
    assert list(body["usage"]) == [*expected["usage"], "completion_tokens_details"]
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"])
    assert isinstance(body["created"], int) and body["model"] == "mock-model"
    message = body["choices"][0]["message"]
    assert message["content"] == "echo: hello there world"
    assert message["tool_calls"] == [] and message["reasoning"] is None
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["stop_reason"] is None
    assert body["choices"][0]["logprobs"] is None
    # The system message is the cached prefix: 2 of the 5 prompt tokens.
    usage = {
        "prompt_tokens": 5,
        "total_tokens": 9,
        "completion_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 2},
        "completion_tokens_details": None,
    }
    assert body["usage"] == usage


async def test_max_tokens_cuts_with_length(server: MockServer, session: aiohttp.ClientSession) -> None:
    body = await post_json(session, server, chat(max_tokens=2))
    assert body["choices"][0]["message"]["content"] == "echo: hello"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2
    # max_completion_tokens wins over max_tokens, as in vLLM.
    body = await post_json(session, server, chat(max_tokens=2, max_completion_tokens=3))
    assert body["choices"][0]["message"]["content"] == "echo: hello there"


@pytest.mark.parametrize(
    ("extra", "config", "tokens", "finish"),
    [
        ({"ignore_eos": True, "max_tokens": 7}, {}, 7, "length"),
        ({"min_tokens": 2, "max_tokens": 5}, {}, 5, "length"),
        ({}, {"output_tokens": 6}, 6, "stop"),
        ({"max_tokens": 3}, {"output_tokens": 6}, 3, "length"),
    ],
)
async def test_exact_reply_length(
    start_server: StartServer,
    session: aiohttp.ClientSession,
    extra: dict[str, Any],
    config: dict[str, Any],
    tokens: int,
    finish: str,
) -> None:
    server = await start_server(**config)
    body = await post_json(session, server, chat(**extra))
    content = body["choices"][0]["message"]["content"]
    expected = ["echo:", *(["hello", "there", "world"] * 3)][:tokens]
    assert content.split() == expected
    assert body["usage"]["completion_tokens"] == tokens
    assert body["choices"][0]["finish_reason"] == finish


async def test_exact_length_uses_filler_without_user_text(server: MockServer, session: aiohttp.ClientSession) -> None:
    body = await post_json(session, server, chat("", ignore_eos=True, max_tokens=4))
    assert body["choices"][0]["message"]["content"] == "echo: lorem ipsum dolor"


async def test_n_choices_sum_completion_usage(server: MockServer, session: aiohttp.ClientSession) -> None:
    body = await post_json(session, server, chat(n=2))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert {c["message"]["content"] for c in body["choices"]} == {"echo: hello there world"}
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 8


async def test_response_id_comes_from_header_then_body(server: MockServer, session: aiohttp.ClientSession) -> None:
    by_header = await post_json(session, server, chat(request_id="body-id"), headers={"X-Request-Id": "row-7"})
    by_body = await post_json(session, server, chat(request_id="body-id"))
    first, second = [await post_json(session, server, chat()) for _ in range(2)]
    assert by_header["id"] == "chatcmpl-row-7" and by_body["id"] == "chatcmpl-body-id"
    assert first["id"] == second["id"]  # derived from the request, so reproducible


async def test_latency_is_honoured(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(latency_ms=100)
    started = time.perf_counter()
    await post_json(session, server, chat())
    assert time.perf_counter() - started >= 0.09


# ---------------------------------------------------------------- reasoning and tools


async def test_reasoning_goes_in_reasoning_only(server: MockServer, session: aiohttp.ClientSession) -> None:
    body = await post_json(session, server, chat(chat_template_kwargs={"enable_thinking": True}))
    message = body["choices"][0]["message"]
    assert message["reasoning"] == "Thinking about: hello there world"
    assert "reasoning_content" not in message
    assert message["content"] == "\n\necho: hello there world"
    assert body["usage"]["completion_tokens"] == 5 + 4
    effort = await post_json(session, server, chat(reasoning_effort="high"))
    assert effort["choices"][0]["message"]["reasoning"] == message["reasoning"]
    off = await post_json(session, server, chat(reasoning_effort="none"))
    assert off["choices"][0]["message"]["reasoning"] is None


async def test_budget_spent_inside_reasoning_gives_null_content(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    body = await post_json(session, server, chat(reasoning_effort="low", max_tokens=3))
    choice = body["choices"][0]
    assert choice["message"]["reasoning"] == "Thinking about: hello"
    assert choice["message"]["content"] is None and choice["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("tool_choice", "text", "called", "finish"),
    [
        ("required", "hi", "get_weather", "tool_calls"),
        ({"type": "function", "function": {"name": "lookup"}}, "hi", "lookup", "stop"),
        (None, "weather in Zürich?", "get_weather", "tool_calls"),
        ("auto", "please lookup Zürich", "lookup", "tool_calls"),
        ("auto", "hello", None, "stop"),
        ("none", "weather in Zürich?", None, "stop"),
    ],
)
async def test_tool_choice_rules(
    server: MockServer,
    session: aiohttp.ClientSession,
    tool_choice: Any,
    text: str,
    called: str | None,
    finish: str,
) -> None:
    extra = {"tools": TOOLS} if tool_choice is None else {"tools": TOOLS, "tool_choice": tool_choice}
    body = await post_json(session, server, chat(text, **extra))
    choice = body["choices"][0]
    assert choice["finish_reason"] == finish
    if called is None:
        assert choice["message"]["tool_calls"] == [] and choice["message"]["content"].startswith("echo:")
        return
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", call["id"]) and call["type"] == "function"
    assert call["function"] == {"name": called, "arguments": json.dumps({"query": text}, ensure_ascii=False)}


async def test_streamed_tool_call(server: MockServer, session: aiohttp.ClientSession) -> None:
    text = "weather in Zürich?"
    options = {"include_usage": True}
    chunks = await stream(session, server, chat(text, tools=TOOLS, tool_choice="required", stream_options=options))
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-2]]
    header = deltas[0]["tool_calls"][0]
    assert header.keys() == {"id", "type", "index", "function"} and header["function"] == {"name": "get_weather"}
    assert all(d["tool_calls"][0].keys() == {"index", "function"} for d in deltas[1:])
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:])
    assert arguments == json.dumps({"query": text}, ensure_ascii=False)
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(deltas) - 1


# ---------------------------------------------------------------- streaming


async def test_stream_chunk_sequence_matches_vllm(server: MockServer, session: aiohttp.ClientSession) -> None:
    chunks = await stream(session, server, chat())
    reference = fixture_sse("chat_stream_content.sse")
    role, tokens, finish = chunks[0], chunks[1:-1], chunks[-1]
    assert role.keys() == reference[0].keys() and role["prompt_token_ids"] is None
    assert role["choices"][0] == {**reference[0]["choices"][0], "delta": {"role": "assistant", "content": ""}}
    assert all(c["choices"][0].keys() == reference[1]["choices"][0].keys() for c in tokens)
    assert [c["choices"][0]["delta"]["content"] for c in tokens] == ["echo:", " hello", " there", " world"]
    assert finish["choices"][0] == reference[-1]["choices"][0] | {"index": 0}
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert all("usage" not in c for c in chunks)
    plain = await post_json(session, server, chat())
    assert joined(chunks, "content") == plain["choices"][0]["message"]["content"]


async def test_stream_usage_chunk_and_continuous_stats(server: MockServer, session: aiohttp.ClientSession) -> None:
    chunks = await stream(session, server, chat(stream_options={"include_usage": True}))
    assert chunks[-1].keys() == {"id", "object", "created", "model", "choices", "usage"}
    assert chunks[-1]["choices"] == []
    usage = {"prompt_tokens": 5, "total_tokens": 9, "completion_tokens": 4, "prompt_tokens_details": CACHED_SYSTEM}
    assert chunks[-1]["usage"] == usage
    assert all("usage" not in c for c in chunks[:-1])

    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = await stream(session, server, chat(stream_options=options))
    running = [c["usage"]["completion_tokens"] for c in chunks]
    assert running == [0, 1, 2, 3, 4, 4, 4]  # role, 4 tokens, EOS finish chunk, final usage chunk
    assert all(c["usage"]["total_tokens"] == 5 + c["usage"]["completion_tokens"] for c in chunks)
    assert [sorted(c["usage"]) for c in chunks[:-1]] == [["completion_tokens", "prompt_tokens", "total_tokens"]] * 6
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}  # only the final chunk has details


async def test_stream_length_cut_puts_last_token_in_finish_chunk(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    chunks = await stream(session, server, chat(max_tokens=2))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"][0]["delta"] == {"content": " hello"}
    assert joined(chunks, "content") == "echo: hello"


async def test_stream_reasoning_then_content(server: MockServer, session: aiohttp.ClientSession) -> None:
    chunks = await stream(session, server, chat(reasoning_effort="medium"))
    reference = fixture_sse("chat_stream_reasoning_then_content.sse")
    assert chunks[1]["choices"][0].keys() == reference[1]["choices"][0].keys()
    assert chunks[1]["choices"][0]["delta"] == {"reasoning": "Thinking"}
    assert joined(chunks, "reasoning") == "Thinking about: hello there world"
    assert joined(chunks, "content") == "\n\necho: hello there world"


async def test_stream_n_choices(server: MockServer, session: aiohttp.ClientSession) -> None:
    chunks = await stream(session, server, chat(n=2, stream_options={"include_usage": True}))
    per_choice = [c for c in chunks if c["choices"]]
    assert all(len(c["choices"]) == 1 for c in per_choice)
    for index in (0, 1):
        mine = [c["choices"][0] for c in per_choice if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "stop"
        assert joined(chunks, "content", index) == "echo: hello there world"
    assert chunks[-1]["usage"]["completion_tokens"] == 8


async def test_stream_delays_are_honoured(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(ttft_ms=150, itl_ms=40)
    started = time.perf_counter()
    first_token_at = None
    async with session.post(f"{server.url}/chat/completions", json=chat(stream=True)) as resp:
        async for line in resp.content:
            if first_token_at is None and b'"content":"echo:"' in line:
                first_token_at = time.perf_counter() - started
    total = time.perf_counter() - started
    assert first_token_at is not None and first_token_at >= 0.9 * 0.150
    # 4 tokens + the EOS finish chunk = 5 steps: ttft, then 4 inter-token gaps (lower bounds only).
    assert total >= 0.9 * (0.150 + 4 * 0.040)


async def test_max_in_flight_counts_concurrent_requests(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(ttft_ms=600)
    count = 5
    role_chunks_seen = 0
    all_started = asyncio.Event()

    async def one_stream() -> bytes:
        nonlocal role_chunks_seen
        async with session.post(f"{server.url}/chat/completions", json=chat(stream=True)) as resp:
            await resp.content.readline()  # the role chunk comes before the ttft wait
            role_chunks_seen += 1
            if role_chunks_seen == count:
                all_started.set()
            return await resp.read()

    tasks = [asyncio.create_task(one_stream()) for _ in range(count)]
    await asyncio.wait_for(all_started.wait(), timeout=5)
    assert server.state.in_flight == count and server.state.max_in_flight == count
    await asyncio.gather(*tasks)
    await wait_until(lambda: server.state.in_flight == 0)
    assert server.state.max_in_flight == count


# ---------------------------------------------------------------- n and logprobs


def test_logprob_rule_pinned() -> None:
    # One literal value, so a change to the rule (here and in the mock alike) cannot pass unnoticed.
    assert expected_logprob(0, "echo:", 3) == {
        "token": "echo:",
        "logprob": -2.771,
        "bytes": [101, 99, 104, 111, 58],
        "top_logprobs": [
            {"token": "echo:", "logprob": -2.771, "bytes": [101, 99, 104, 111, 58]},
            {"token": " of", "logprob": -3.771, "bytes": [32, 111, 102]},
            {"token": " to", "logprob": -4.771, "bytes": [32, 116, 111]},
        ],
    }


async def test_plain_logprobs_exact(server: MockServer, session: aiohttp.ClientSession) -> None:
    body = await post_json(session, server, chat(logprobs=True, top_logprobs=3))
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs == {"content": expected_logprobs(ECHO_TOKENS, 3)}
    assert logprobs["content"][0] == expected_logprob(0, "echo:", 3)  # the pinned value above
    for entry in logprobs["content"]:
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert entry["top_logprobs"][0]["token"] == entry["token"] and tops == sorted(tops, reverse=True)
        assert len(set(tops)) == 3 and all(lp <= 0 for lp in tops)
    without_tops = await post_json(session, server, chat(logprobs=True))
    assert without_tops["choices"][0]["logprobs"] == {"content": expected_logprobs(ECHO_TOKENS, 0)}
    assert all(e["top_logprobs"] == [] for e in without_tops["choices"][0]["logprobs"]["content"])
    off = await post_json(session, server, chat(logprobs=False, top_logprobs=0))  # 0 needs no logprobs
    assert off["choices"][0]["logprobs"] is None
    # A piece that is also a runner-up token (" the") is not listed twice.
    body = await post_json(session, server, chat("the end", logprobs=True, top_logprobs=20))
    [_, the, _] = body["choices"][0]["logprobs"]["content"]
    assert the == expected_logprob(1, " the", 20)
    assert [t["token"] for t in the["top_logprobs"]].count(" the") == 1 and len(the["top_logprobs"]) == 20


async def test_logprobs_cover_reasoning_content_and_tool_arguments(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    thinking = {"enable_thinking": True}
    body = await post_json(session, server, chat(logprobs=True, top_logprobs=1, chat_template_kwargs=thinking))
    tokens = THINKING_TOKENS + ["\n\necho:", " hello", " there", " world"]
    assert body["choices"][0]["logprobs"]["content"] == expected_logprobs(tokens, 1)
    message = body["choices"][0]["message"]
    assert "".join(tokens) == message["reasoning"] + message["content"]

    text = "weather in Zürich?"
    body = await post_json(session, server, chat(text, tools=TOOLS, logprobs=True, chat_template_kwargs=thinking))
    arguments = body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    entries = body["choices"][0]["logprobs"]["content"]
    reasoning = ["Thinking", " about:", " weather", " in", " Zürich?"]
    assert [e["token"] for e in entries] == [*reasoning, '{"query":', ' "weather', " in", ' Zürich?"}']
    assert "".join(e["token"] for e in entries) == body["choices"][0]["message"]["reasoning"] + arguments
    assert entries[4]["bytes"] == list(" Zürich?".encode())  # bytes are UTF-8, not characters
    assert len(entries) == body["usage"]["completion_tokens"]


async def test_n_choices_with_logprobs_plain(server: MockServer, session: aiohttp.ClientSession) -> None:
    body = await post_json(session, server, chat(n=3, logprobs=True, top_logprobs=2))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for choice in body["choices"]:
        assert choice["message"]["content"] == "echo: hello there world"
        assert choice["logprobs"] == {"content": expected_logprobs(ECHO_TOKENS, 2)}
    assert body["usage"]["completion_tokens"] == 12 and body["usage"]["total_tokens"] == 17


async def test_stream_n3_with_logprobs_interleaves_choices(server: MockServer, session: aiohttp.ClientSession) -> None:
    options = {"include_usage": True}
    chunks = await stream(session, server, chat(n=3, logprobs=True, top_logprobs=2, stream_options=options))
    per_choice = [c["choices"][0] for c in chunks[:-1]]
    # Role chunks first, then one chunk per choice per step, round-robin: 4 tokens, then the finish chunks.
    assert [c["index"] for c in per_choice] == [0, 1, 2] * 6
    roles, tokens, finishes = per_choice[:3], per_choice[3:15], per_choice[15:]
    assert all(c["delta"] == {"role": "assistant", "content": ""} and c["logprobs"] is None for c in roles)
    for c in tokens:
        [entry] = c["logprobs"]["content"]
        assert entry["token"] == c["delta"]["content"] and len(entry["top_logprobs"]) == 2
    assert all(c["delta"] == {"content": ""} and c["logprobs"] is None for c in finishes)
    assert all(c["finish_reason"] == "stop" and c["stop_reason"] is None for c in finishes)
    choices = reassemble(chunks)
    assert sorted(choices) == [0, 1, 2]
    for choice in choices.values():
        assert choice["content"] == "echo: hello there world"
        assert choice["logprobs"] == expected_logprobs(ECHO_TOKENS, 2)
    usage = {"prompt_tokens": 5, "total_tokens": 17, "completion_tokens": 12, "prompt_tokens_details": CACHED_SYSTEM}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage


async def test_stream_length_cut_carries_last_logprob_in_finish_chunk(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    chunks = await stream(session, server, chat(max_tokens=2, logprobs=True))
    finish = chunks[-1]["choices"][0]
    assert finish["finish_reason"] == "length" and finish["delta"] == {"content": " hello"}
    assert finish["logprobs"] == {"content": [expected_logprob(1, " hello", 0)]}
    assert reassemble(chunks)[0]["logprobs"] == expected_logprobs(["echo:", " hello"], 0)


# ---------------------------------------------------------------- stop strings


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    ("stop", "extra", "content", "finish", "stop_reason", "tokens"),
    [
        ("there", {}, "echo: hello ", "stop", "there", 3),  # cut inside " there": its " " stays
        (["world", "ell"], {}, "echo: h", "stop", "ell", 2),  # "ell" completes first
        (["lo", "hel"], {}, "echo: hel", "stop", "lo", 2),  # one token completes both: list order wins
        ("hello there", {}, "echo: ", "stop", "hello there", 3),  # over two tokens, both counted
        ("echo", {}, "", "stop", "echo", 1),
        ("nope", {}, "echo: hello there world", "stop", None, 4),
        ([], {}, "echo: hello there world", "stop", None, 4),
        ("hello", {"max_tokens": 3}, "echo: ", "stop", "hello", 2),  # a stop beats a length cut
        ("world", {"max_tokens": 2}, "echo: hello", "length", None, 2),  # never generated
        # No stop counts until more than min_tokens tokens exist: the first "hello" (token 2) is skipped.
        ("hello", EXACT_6_MIN_2, "echo: hello there world ", "stop", "hello", 5),
    ],
)
async def test_stop_strings(
    server: MockServer,
    session: aiohttp.ClientSession,
    streamed: bool,
    stop: str | list[str],
    extra: dict[str, Any],
    content: str,
    finish: str,
    stop_reason: str | None,
    tokens: int,
) -> None:
    request = chat(stop=stop, logprobs=True, **extra)
    if streamed:
        options = {"include_usage": True, "continuous_usage_stats": True}
        chunks = await stream(session, server, {**request, "stream_options": options})
        choice = reassemble(chunks)[0]
        finish_chunk = chunks[-2]
        assert finish_chunk["choices"][0]["finish_reason"] == finish
        assert finish_chunk["usage"]["completion_tokens"] == tokens  # running count ends on the total
        usage = chunks[-1]["usage"]
    else:
        body = await post_json(session, server, request)
        assert body["choices"][0]["message"]["content"] == content  # "", not null, without reasoning
        choice = plain_view(body["choices"][0])
        usage = body["usage"]
    assert choice["content"] == content
    assert (choice["finish_reason"], choice["stop_reason"]) == (finish, stop_reason)
    assert usage["completion_tokens"] == tokens
    assert "".join(e["token"] for e in choice["logprobs"]) == content  # the stop string has no entries


async def test_stop_inside_reasoning(server: MockServer, session: aiohttp.ClientSession) -> None:
    request = chat(stop="about", chat_template_kwargs={"enable_thinking": True})
    body = await post_json(session, server, request)
    choice = body["choices"][0]
    assert choice["message"]["reasoning"] == "Thinking " and choice["message"]["content"] is None
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "about")
    assert body["usage"]["completion_tokens"] == 2
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
    chunks = await stream(session, server, request)
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["stop_reason"] == "about"
    assert reassemble(chunks)[0] == plain_view(choice)
    # A cut before the tool call drops it.
    tool = await post_json(session, server, {**request, "tools": TOOLS, "tool_choice": "required"})
    choice = tool["choices"][0]
    assert choice["message"]["tool_calls"] == [] and choice["message"]["content"] is None
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "about")


@pytest.mark.parametrize(
    "extra",
    [
        {"n": 3, "logprobs": True, "top_logprobs": 2},
        {"stop": ["there", "x"], "logprobs": True, "n": 2},
        {"stop": "hello", "reasoning_effort": "low", "logprobs": True, "top_logprobs": 20},
        {"tools": TOOLS, "tool_choice": "required", "logprobs": True, "reasoning_effort": "high"},
        {"max_tokens": 6, "reasoning_effort": "low", "logprobs": True},
    ],
)
async def test_stream_reassembles_to_the_plain_body(
    server: MockServer, session: aiohttp.ClientSession, extra: dict[str, Any]
) -> None:
    body = await post_json(session, server, chat(**extra))
    chunks = await stream(session, server, chat(**extra, stream_options={"include_usage": True}))
    assert reassemble(chunks) == {c["index"]: plain_view(c) for c in body["choices"]}
    assert chunks[-1]["usage"] == {k: v for k, v in body["usage"].items() if v is not None}


# ---------------------------------------------------------------- usage details

CONVERSATION = [
    {"role": "user", "content": "what is up"},
    {"role": "assistant", "content": "not much"},
    {"role": "user", "content": "hello there world"},
]


async def test_cached_prompt_tokens_of_a_conversation(server: MockServer, session: aiohttp.ClientSession) -> None:
    request = {"model": "mock-model", "messages": CONVERSATION}
    body = await post_json(session, server, request)
    assert body["usage"] == {
        "prompt_tokens": 8,
        "total_tokens": 12,
        "completion_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 5},  # the first two messages
        "completion_tokens_details": None,
    }
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = await stream(session, server, {**request, "stream_options": options})
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 8,
        "total_tokens": 12,
        "completion_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 5},
    }
    assert all(c["usage"].keys() == {"prompt_tokens", "total_tokens", "completion_tokens"} for c in chunks[:-1])

    single = {"model": "mock-model", "messages": [{"role": "user", "content": "hello there world"}]}
    body = await post_json(session, server, single)
    assert body["usage"]["prompt_tokens_details"] is None  # nothing before the last message
    chunks = await stream(session, server, {**single, "stream_options": {"include_usage": True}})
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4}


async def test_prompt_tokens_details_can_be_off(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(prompt_tokens_details=False)
    request = {"model": "mock-model", "messages": CONVERSATION}
    body = await post_json(session, server, request)
    assert body["usage"]["prompt_tokens_details"] is None and body["usage"]["prompt_tokens"] == 8
    chunks = await stream(session, server, {**request, "stream_options": {"include_usage": True}})
    assert chunks[-1]["usage"] == {"prompt_tokens": 8, "total_tokens": 12, "completion_tokens": 4}


async def test_reasoning_tokens_in_usage(server: MockServer, session: aiohttp.ClientSession) -> None:
    thinking = {"enable_thinking": True}
    body = await post_json(session, server, chat(chat_template_kwargs=thinking))
    assert body["usage"]["completion_tokens"] == 9
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 5}
    body = await post_json(session, server, chat(n=2, chat_template_kwargs=thinking))
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 10}  # summed over choices
    chunks = await stream(session, server, chat(chat_template_kwargs=thinking, stream_options={"include_usage": True}))
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 5,
        "total_tokens": 14,
        "completion_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 5},
    }
    off = chat(chat_template_kwargs={"enable_thinking": False}, stream_options={"include_usage": True})
    chunks = await stream(session, server, off)
    assert "completion_tokens_details" not in chunks[-1]["usage"]


# ---------------------------------------------------------------- fast paths and their careful twins

_WORDS = st.lists(st.sampled_from(["a", "b", "ab", "ba", "a:b", "é", "the"]), max_size=6)


def _plan(body: dict[str, Any]) -> Any:
    return plan_chat(body, models=("m",), output_tokens=None, request_id=None, created=1)


def _frames(body: dict[str, Any]) -> list[dict[str, Any]]:
    return sse_payloads(b"".join(e.data for e in stream_events(_plan(body))))


def _body(words: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": " ".join(words)}], **extra}


def _without_logprobs(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: None if k == "logprobs" else _without_logprobs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_logprobs(v) for v in value]
    return value


_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "n": st.integers(1, 3),
        "max_tokens": st.integers(1, 12),
        "reasoning_effort": st.sampled_from(["none", "low"]),
        "ignore_eos": st.booleans(),
        "tools": st.just(TOOLS),
        "stop": st.lists(st.text("ab: é", min_size=1, max_size=3), max_size=3),
    },
)


@settings(max_examples=150, deadline=None)
@given(words=_WORDS, extra=_OPTIONS, top=st.integers(0, 20))
def test_logprobs_add_nothing_but_logprobs(words: list[str], extra: dict[str, Any], top: int) -> None:
    """The no-logprobs fast path (no per-token work) gives the same answer, minus the logprobs."""
    if "max_tokens" not in extra and extra.get("ignore_eos"):
        extra["max_tokens"] = 7
    plain, with_logprobs = _body(words, extra), _body(words, {**extra, "logprobs": True, "top_logprobs": top})
    fast, careful = completion_body(_plan(plain)), completion_body(_plan(with_logprobs))
    del careful["id"], fast["id"]  # the id hashes the body
    assert _without_logprobs(careful) == fast
    for choice in careful["choices"]:
        message, entries = choice["message"], choice["logprobs"]["content"]
        arguments = "".join(t["function"]["arguments"] for t in message["tool_calls"])
        text = (message["reasoning"] or "") + (message["content"] or "") + arguments
        assert "".join(e["token"] for e in entries) == text
        assert all(len({t["token"] for t in e["top_logprobs"]}) == top for e in entries)  # distinct tokens
    fast_frames = _frames({**plain, "stream": True})
    careful_frames = _frames({**with_logprobs, "stream": True})
    assert [{**f, "id": None} for f in _without_logprobs(careful_frames)] == [{**f, "id": None} for f in fast_frames]


def _reference_stop(pieces: list[str], stops: list[str], min_tokens: int) -> tuple[str, int, str] | None:
    """vLLM's incremental check, one token at a time: (text kept, tokens generated, stop) or None."""
    text = ""
    for generated, piece in enumerate(pieces, start=1):
        text += piece
        if generated <= min_tokens:
            continue
        for stop in stops:
            index = text.find(stop, max(0, len(text) + 1 - len(piece) - len(stop)))
            if index >= 0:
                return text[:index], generated, stop
    return None


@settings(max_examples=300, deadline=None)
@given(
    words=_WORDS,
    stops=st.lists(st.text("ab: é", min_size=1, max_size=4), min_size=1, max_size=3),
    thinking=st.booleans(),
    min_tokens=st.integers(0, 3),
)
def test_stop_matches_vllms_incremental_check(
    words: list[str], stops: list[str], thinking: bool, min_tokens: int
) -> None:
    """The mock finds stops on the whole text at once; vLLM checks after every token. Same result."""
    extra = {"reasoning_effort": "low" if thinking else "none", "min_tokens": min_tokens, "max_tokens": 9}
    [uncut] = _plan(_body(words, extra)).choices
    pieces = [*uncut.reasoning, *(uncut.content or ())]
    body = completion_body(_plan(_body(words, {**extra, "stop": stops, "logprobs": True})))
    choice, message = body["choices"][0], body["choices"][0]["message"]
    reference = _reference_stop(pieces, stops, min_tokens)
    if reference is None:
        assert (choice["finish_reason"], choice["stop_reason"]) == (uncut.finish_reason, None)
        assert body["usage"]["completion_tokens"] == len(pieces)
        return
    kept, generated, stop = reference
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    assert (message["reasoning"] or "") + (message["content"] or "") == kept
    assert body["usage"]["completion_tokens"] == generated
    assert "".join(e["token"] for e in choice["logprobs"]["content"]) == kept
    reasoning_text = "".join(uncut.reasoning)
    assert (message["reasoning"] or "") == kept[: len(reasoning_text)]
    if thinking and len(kept) <= len(reasoning_text):
        assert message["content"] is None


# ---------------------------------------------------------------- request errors


def _error(raw: bytes) -> dict[str, Any]:
    error: dict[str, Any] = orjson.loads(raw)["error"]
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "mock-model"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
        ({"messages": ["hi"]}, "messages"),
        (chat(temperature="hot"), "temperature"),
        (chat(temperature=True), "temperature"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens="5"), "max_tokens"),
        (chat(max_completion_tokens=-1), "max_completion_tokens"),
        (chat(stream="yes"), "stream"),
        (chat(n=0), "n"),
        (chat(n=1.5), "n"),
        (chat(reasoning_effort="extreme"), "reasoning_effort"),
        (chat(stream_options={"include_usage": True}), "stream_options"),
        (chat(tool_choice="auto"), "tool_choice"),
        (chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (chat(tools=[]), "tools"),
        (chat(max_tokens=8190), "max_tokens"),
        (chat(min_tokens=9, max_tokens=5), "min_tokens"),
        (chat(logprobs="yes"), "logprobs"),
        (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        (chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
        (chat(logprobs=True, top_logprobs=2.0), "top_logprobs"),
        (chat(top_logprobs=2), "top_logprobs"),
        (chat(logprobs=False, top_logprobs=1), "top_logprobs"),
        (chat(stop=5), "stop"),
        (chat(stop=["a", 5]), "stop"),
        (chat(stop=["a", ""]), "stop"),
        (chat(stop=""), "stop"),
    ],
)
async def test_bad_request_names_the_param(
    server: MockServer, session: aiohttp.ClientSession, body: dict[str, Any], param: str
) -> None:
    status, _, raw = await post(session, server, body)
    assert status == 400
    error = _error(raw)
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["param"] == param


@pytest.mark.parametrize(
    ("data", "content_type"),
    [(b"{nope", "application/json"), (b"[1, 2]", "application/json"), (b"{}", "text/plain")],
)
async def test_undecodable_body_is_400(
    server: MockServer, session: aiohttp.ClientSession, data: bytes, content_type: str
) -> None:
    url = f"{server.url}/chat/completions"
    async with session.post(url, data=data, headers={"Content-Type": content_type}) as resp:
        assert resp.status == 400
        error = _error(await resp.read())
    assert error["type"] == "BadRequestError" and error["param"] is None
    assert server.state.requests == []


async def test_prompt_too_long_uses_vllm_message(server: MockServer, session: aiohttp.ClientSession) -> None:
    status, _, raw = await post(session, server, chat("word " * 8190))  # + 2 system words = 8192
    assert status == 400
    assert _error(raw) == {
        "message": "This model's maximum context length is 8192 tokens. However, your request has 8192 input "
        "tokens. Please reduce the length of the input messages. (parameter=input_tokens, value=8192)",
        "type": "BadRequestError",
        "param": "input_tokens",
        "code": 400,
    }


async def test_model_selection(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(models=("base", "alias"))
    status, _, raw = await post(session, server, chat(model="gpt-4o"))
    assert status == 404
    assert orjson.loads(raw) == {
        "error": {
            "message": "The model `gpt-4o` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    body = chat()
    del body["model"]
    assert (await post_json(session, server, body))["model"] == "base"
    assert (await post_json(session, server, chat(model="alias")))["model"] == "alias"


async def test_api_key_guards_v1_only(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(api_key="sekrit")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with session.get(f"{server.url}/models", headers=headers) as resp:
            assert resp.status == 401 and await resp.json() == {"error": "Unauthorized"}
    status, _, _ = await post(session, server, chat())
    assert status == 401
    good = {"Authorization": "Bearer sekrit"}
    async with session.get(f"{server.url}/models", headers=good) as resp:
        assert resp.status == 200
    await post_json(session, server, chat(), headers=good)
    async with session.get(server.url.removesuffix("/v1") + "/health") as resp:
        assert resp.status == 200


# ---------------------------------------------------------------- faults


INTERNAL_ERROR = {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}


async def test_forced_faults_follow_the_count_of_identical_bodies(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    faults = {"x-mock-faults": "500,429,503"}
    row, other_row = chat(), chat("another row")
    status, _, raw = await post(session, server, row, faults)
    assert status == 500 and _error(raw) == INTERNAL_ERROR
    status, headers, raw = await post(session, server, row, faults)  # the same bytes again: attempt 2
    assert status == 429 and headers["Retry-After"] == "0.05" and _error(raw)["type"] == "RateLimitError"
    status, _, raw = await post(session, server, other_row, faults)  # another body has its own count
    assert status == 500
    status, headers, _ = await post(session, server, row, faults)
    assert status == 503 and headers["Retry-After"] == "0.05"
    await post_json(session, server, row, headers=faults)  # attempt 4: past the list, so it succeeds
    await post_json(session, server, row)  # without the header a request is neither faulted nor counted
    assert server.state.faults_injected == Counter({"500": 2, "429": 1, "503": 1})
    assert sorted(server.state.attempts.values()) == [1, 4]
    assert len(server.state.requests) == 6  # faulted attempts are recorded too
    server.state.reset()
    assert not server.state.attempts
    status, _, _ = await post(session, server, row, faults)  # counting starts over after a reset
    assert status == 500


async def test_forced_fault_attempts_are_per_body_bytes(server: MockServer, session: aiohttp.ClientSession) -> None:
    url = f"{server.url}/chat/completions"
    headers = {"x-mock-faults": "500", "Content-Type": "application/json"}
    statuses = []
    # Equal JSON, different bytes: two bodies, so both get the first fault.
    for data in (orjson.dumps(chat()), json.dumps(chat(), indent=1).encode(), orjson.dumps(chat())):
        async with session.post(url, data=data, headers=headers) as resp:
            statuses.append(resp.status)
    assert statuses == [500, 500, 200]


async def test_attempt_header_is_ignored(server: MockServer, session: aiohttp.ClientSession) -> None:
    # batchgen no longer sends x-batchgen-attempt: the mock must not read it.
    status, _, _ = await post(session, server, chat(), {"x-mock-faults": "500,429", "x-batchgen-attempt": "2"})
    assert status == 500
    status, _, _ = await post(session, server, chat(), {"x-mock-faults": "500,429", "x-batchgen-attempt": "0"})
    assert status == 429


async def test_unknown_forced_fault_is_rejected(server: MockServer, session: aiohttp.ClientSession) -> None:
    status, _, raw = await post(session, server, chat(), {"x-mock-faults": "500,boom"})
    assert status == 400 and _error(raw)["param"] == "x-mock-faults"
    assert not server.state.attempts  # a refused request is not an attempt
    status, _, _ = await post(session, server, chat(), {"x-mock-faults": "500"})
    assert status == 500


@pytest.mark.parametrize("streamed", [False, True])
async def test_disconnect_fault(server: MockServer, session: aiohttp.ClientSession, streamed: bool) -> None:
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, server, chat(stream=streamed), {"x-mock-faults": "disconnect"})
    assert server.state.faults_injected["disconnect"] == 1


async def test_stall_fault_hangs(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(stall_s=0.3)
    timeout = aiohttp.ClientTimeout(sock_read=0.1)
    url = f"{server.url}/chat/completions"
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(url, json=chat(), headers={"x-mock-faults": "stall"}, timeout=timeout) as resp:
            await resp.read()
    assert server.state.faults_injected["stall"] == 1


async def test_malformed_fault(server: MockServer, session: aiohttp.ClientSession) -> None:
    status, headers, raw = await post(session, server, chat(), {"x-mock-faults": "malformed"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    status, _, raw = await post(session, server, chat(stream=True), {"x-mock-faults": "malformed"})
    frames = raw.split(b"\n\n")
    assert status == 200 and frames[-2] == b"data: [DONE]"
    assert orjson.loads(frames[0][len(b"data: ") :])["choices"][0]["delta"]["role"] == "assistant"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(frames[1][len(b"data: ") :])


async def test_truncated_stream_has_no_done(server: MockServer, session: aiohttp.ClientSession) -> None:
    received = b""
    url = f"{server.url}/chat/completions"
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(url, json=chat(stream=True), headers={"x-mock-faults": "truncated"}) as resp:
            assert resp.status == 200
            async for line in resp.content:
                received += line
    assert b'"role":"assistant"' in received and b'"content":"echo:"' in received
    assert b"[DONE]" not in received and b"finish_reason\":\"stop" not in received


async def test_truncated_body_is_incomplete(server: MockServer, session: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(session, server, chat(), {"x-mock-faults": "truncated"})
    assert server.state.faults_injected["truncated"] == 1


async def test_fault_rate_one_always_faults(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(fault_rate=1.0, faults=("500",))
    statuses = [(await post(session, server, chat()))[0] for _ in range(5)]
    assert statuses == [500] * 5 and server.state.faults_injected == Counter({"500": 5})


async def test_random_faults_are_reproducible(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    config = {"fault_rate": 0.5, "faults": ("500", "429", "503"), "seed": 11}
    first, second = await start_server(**config), await start_server(**config)
    runs = [[(await post(session, s, chat()))[0] for _ in range(12)] for s in (first, second)]
    assert runs[0] == runs[1] and 200 in runs[0] and set(runs[0]) - {200}
    first.state.reset()
    assert first.state.requests == [] and not first.state.faults_injected
    assert [(await post(session, first, chat()))[0] for _ in range(12)] == runs[0]


async def test_state_records_bodies_and_lowercased_headers(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    await post_json(session, server, chat(max_tokens=3), headers={"X-Request-Id": "r1"})
    assert server.state.requests == [chat(max_tokens=3)]
    assert server.state.request_headers[0]["x-request-id"] == "r1"


# ---------------------------------------------------------------- app, thread and CLI


def test_make_app_exposes_state() -> None:
    state = MockState(seed=3)
    assert make_app(MockConfig(), state)["mock_state"] is state
    assert isinstance(make_app()["mock_state"], MockState)


@pytest.mark.parametrize(
    "bad",
    [{"models": ()}, {"faults": ("boom",)}, {"fault_rate": 1.5}, {"ttft_ms": -1}, {"output_tokens": 0}],
)
def test_invalid_config_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        MockConfig(**bad)


def test_mock_server_thread_serves_sync_code() -> None:
    with mock_server_thread(MockConfig(models=("m1",))) as server:
        with urllib.request.urlopen(f"{server.url}/models", timeout=5) as resp:
            assert orjson.loads(resp.read())["data"][0]["id"] == "m1"
        request = urllib.request.Request(
            f"{server.url}/chat/completions",
            data=orjson.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert orjson.loads(resp.read())["choices"][0]["message"]["content"] == "echo: hi"
        assert server.state.requests[0]["messages"][0]["content"] == "hi"
        url = server.url
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/models", timeout=5)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_arguments_defaults_and_validation() -> None:
    args = _parse([])
    assert (args.host, args.port, args.models, args.faults) == ("127.0.0.1", 8000, None, FAULT_KINDS)
    args = _parse(["--model", "a", "--model", "b", "--faults", "500,stall", "--fault-rate", "0.2"])
    assert args.models == ["a", "b"] and args.faults == ("500", "stall") and args.fault_rate == 0.2
    with pytest.raises(SystemExit):
        _parse(["--faults", "500,boom"])


def test_prompt_tokens_details_flag_reaches_the_config() -> None:
    from batchgen.testing.mock_server import _config_from_args

    assert _parse([]).prompt_tokens_details is True
    assert _config_from_args(_parse([])).prompt_tokens_details is True
    assert _config_from_args(_parse(["--no-prompt-tokens-details"])).prompt_tokens_details is False


def test_main_refuses_a_missing_key_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_parse(["--api-key-env", "BATCHGEN_MOCK_UNSET_KEY"])) == 2
    assert "BATCHGEN_MOCK_UNSET_KEY" in capsys.readouterr().err


def test_command_line_serves_until_sigterm() -> None:
    secret = "k-0123456789"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MOCK_TEST_KEY": secret}
    argv = [sys.executable, "-m", "batchgen.testing.mock_server", "--port", "0", "--model", "a", "--model", "b"]
    argv += ["--api-key-env", "MOCK_TEST_KEY"]
    with subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True) as proc:
        try:
            assert proc.stderr is not None
            banner = proc.stderr.readline()
            pattern = r"batchgen mock server listening on (http://127\.0\.0\.1:\d+/v1) \(models: a, b\)\n"
            match = re.fullmatch(pattern, banner)
            assert match, banner
            url = match.group(1)
            with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5) as resp:
                assert resp.status == 200
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{url}/models", timeout=5)
            assert refused.value.code == 401
            refused.value.close()
            authed = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {secret}"})
            with urllib.request.urlopen(authed, timeout=5) as resp:
                assert [m["id"] for m in orjson.loads(resp.read())["data"]] == ["a", "b"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            rest = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert secret not in banner + rest and "found in sys.modules" not in rest  # no runpy double import

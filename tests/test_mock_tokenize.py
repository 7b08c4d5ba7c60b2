"""The mock's context window (`max_model_len`: model cards and vLLM's 400s) and its ``POST /tokenize``."""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchgen.testing import MockConfig, MockServer, add_arguments
from batchgen.testing.mock_replies import plan_chat, tokenize_body
from batchgen.testing.mock_server import _config_from_args

from .conftest import StartServer





async def chat(session: aiohttp.ClientSession, server: MockServer, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(f"{server.url}/chat/completions", json=body) as resp:
        return resp.status, orjson.loads(await resp.read())


async def tokenize(
    session: aiohttp.ClientSession, server: MockServer, body: dict[str, Any], **headers: str
) -> tuple[int, Any]:
    async with session.post(f"{server.url.removesuffix('/v1')}/tokenize", json=body, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


# ---------------------------------------------------------------- max_model_len


@pytest.mark.parametrize(
    ("configured", "card"), [({}, 8192), ({"max_model_len": 32}, 32), ({"max_model_len": None}, None)]
)
async def test_model_cards_carry_max_model_len(
    start_server: StartServer, session: aiohttp.ClientSession, configured: dict[str, Any], card: int | None
) -> None:
    server = await start_server(models=("base", "alias"), **configured)
    async with session.get(f"{server.url}/models") as resp:
        cards = (await resp.json())["data"]
    assert [c["max_model_len"] for c in cards] == [card, card]


async def test_prompt_must_leave_room_for_one_token(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(max_model_len=16)
    status, body = await chat(session, server, user("w " * 15))  # 15 < 16: fits, no max_tokens, no second check
    assert status == 200 and body["usage"]["prompt_tokens"] == 15
    assert body["usage"]["completion_tokens"] == 1 and body["choices"][0]["finish_reason"] == "length"
    status, body = await chat(session, server, user("w " * 16, max_tokens=1))
    assert (status, body) == (
        400,
        {
            "error": {
                "message": "This model's maximum context length is 16 tokens. However, your request has 16 input "
                "tokens. Please reduce the length of the input messages. (parameter=input_tokens, value=16)",
                "type": "BadRequestError",
                "param": "input_tokens",
                "code": 400,
            }
        },
    )


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_prompt_plus_max_tokens_must_fit(
    start_server: StartServer, session: aiohttp.ClientSession, field: str
) -> None:
    server = await start_server(max_model_len=16)
    status, _ = await chat(session, server, user("w " * 10, **{field: 6}))  # 10 + 6 == 16: fits
    assert status == 200
    status, body = await chat(session, server, user("w " * 10, **{field: 7}))
    assert (status, body) == (
        400,
        {
            "error": {
                "message": "'max_tokens' or 'max_completion_tokens' is too large: 7. This model's maximum context "
                "length is 16 tokens and your request has 10 input tokens (7 > 16 - 10). "
                "(parameter=max_tokens, value=7)",
                "type": "BadRequestError",
                "param": "max_tokens",
                "code": 400,
            }
        },
    )


async def test_without_max_tokens_the_reply_runs_to_the_window(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(max_model_len=16)
    status, body = await chat(session, server, user("w " * 10, ignore_eos=True))
    assert status == 200 and body["usage"]["completion_tokens"] == 6  # vLLM's max_model_len - prompt
    assert body["choices"][0]["finish_reason"] == "length"


async def test_no_window_checks_nothing(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(max_model_len=None)
    status, body = await chat(session, server, user("w " * 9000, max_tokens=9000))
    assert status == 200 and body["usage"]["prompt_tokens"] == 9000
    status, body = await chat(session, server, user("w", ignore_eos=True))  # unbounded replies still stop
    assert status == 200 and body["usage"]["completion_tokens"] == 8192


def test_bad_windows_are_refused() -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            MockConfig(max_model_len=bad)  # type: ignore[arg-type]


def test_max_model_len_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert _config_from_args(parser.parse_args([])).max_model_len == 8192
    assert _config_from_args(parser.parse_args(["--max-model-len", "4096"])).max_model_len == 4096
    assert _config_from_args(parser.parse_args(["--max-model-len", "none"])).max_model_len is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-model-len", "lots"])


# ---------------------------------------------------------------- /tokenize

SHAPES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hello there world"}],
    [{"role": "system", "content": "be  brief\n\tplease"}, {"role": "user", "content": "  padded   words  "}],
    [{"role": "user", "content": [{"type": "text", "text": "two parts"}, {"type": "text", "text": "joined here"}]}],
    [
        {"role": "user", "content": "what is the weather"},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "sunny"},
        {"role": "user", "content": ""},
    ],
    [{"role": "developer", "content": "héllo wörld 你好 🙂"}, {"role": "user", "content": "x"}],
]


@pytest.mark.parametrize("messages", SHAPES)
async def test_tokenize_counts_what_chat_usage_reports(
    start_server: StartServer, session: aiohttp.ClientSession, messages: list[dict[str, Any]]
) -> None:
    server = await start_server(max_model_len=4096)
    status, answer = await tokenize(session, server, {"model": "mock-model", "messages": messages})
    assert status == 200
    status, body = await chat(session, server, {"model": "mock-model", "messages": messages})
    assert status == 200
    assert answer["count"] == body["usage"]["prompt_tokens"] == len(answer["tokens"])
    assert list(answer) == ["count", "max_model_len", "tokens", "token_strs"]  # vLLM's TokenizeResponse
    assert answer["max_model_len"] == 4096 and answer["token_strs"] is None
    assert all(isinstance(t, int) and 0 <= t < 32_000 for t in answer["tokens"])


@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(st.text(st.characters(codec="utf-8"), max_size=40), min_size=1, max_size=5),
    flag=st.booleans(),
)
def test_tokenize_and_usage_agree_on_any_text(texts: list[str], flag: bool) -> None:
    messages = [{"role": "user", "content": t} for t in texts]
    answer = tokenize_body({"messages": messages, "add_generation_prompt": flag}, models=("m",), max_model_len=None)
    plan = plan_chat({"messages": messages}, models=("m",), output_tokens=None, request_id=None, created=0,
                     max_model_len=None)  # fmt: skip
    assert answer["count"] == plan.prompt_tokens == len(answer["tokens"])


async def test_tokenize_a_prompt_with_token_strings(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server()
    status, answer = await tokenize(session, server, {"prompt": " one two  three ", "return_token_strs": True})
    assert status == 200
    assert answer["count"] == 3 and answer["token_strs"] == ["one", "two", "three"]
    assert answer["max_model_len"] == 8192
    _, again = await tokenize(session, server, {"model": "mock-model", "prompt": "three"})
    assert again["tokens"] == answer["tokens"][2:]  # ids are a function of the word


async def test_tokenize_is_counted_and_never_length_checked(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(max_model_len=4, requests_per_minute=1)
    bodies = [{"prompt": "a b c d e f"}, {"prompt": "a b c d e f"}, user("x y")]
    for body in bodies:
        status, answer = await tokenize(session, server, body)
        assert status == 200 and answer["max_model_len"] == 4  # 6 tokens over a 4-token window: still counted
    assert server.state.tokenize_requests == bodies
    assert server.state.requests == [] and server.state.admissions == []  # not chat requests
    server.state.reset()
    assert server.state.tokenize_requests == []


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "gpt-4o", "prompt": "hi"}, 404, "model"),
        ({"model": "mock-model"}, 400, None),
        ({"prompt": 5}, 400, "prompt"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
        ({"prompt": "hi", "return_token_strs": "yes"}, 400, "return_token_strs"),
        ({"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True}, 400, None),
    ],
)
async def test_tokenize_refuses_like_vllm(
    start_server: StartServer, session: aiohttp.ClientSession, body: dict[str, Any], status: int, param: str | None
) -> None:
    server = await start_server()
    got, answer = await tokenize(session, server, body)
    assert got == status and answer["error"]["code"] == status and answer["error"]["param"] == param


async def test_tokenize_may_continue_a_final_message(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server()
    status, continued = await tokenize(session, server, user("hi there", continue_final_message=True,
                                                             add_generation_prompt=False))  # fmt: skip
    _, plain = await tokenize(session, server, user("hi there"))
    assert status == 200 and continued == plain and plain["count"] == 2  # the mock has no template to change


async def test_tokenize_is_outside_the_key_guard(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(api_key="sekret")
    status, answer = await tokenize(session, server, {"prompt": "a b"})  # as vLLM: only /v1 is guarded
    assert status == 200 and answer["count"] == 2
    async with session.post(f"{server.url}/chat/completions", json=user("a")) as resp:
        assert resp.status == 401

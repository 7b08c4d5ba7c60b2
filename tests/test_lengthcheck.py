"""`LengthCheck`: a row that cannot fit the server's context is refused before sending, by the
server's exact count (asked once per distinct prompt) or by a bound that never refuses a row that fits."""

from __future__ import annotations

from typing import Any

import pytest

from batchgen.errors import ServerError, status_error
from batchgen.lengthcheck import MAX_BYTES_PER_TOKEN, LengthCheck, context_length_of, prompt_text_bytes
from batchgen.records import RowRequest


def _request(index: int, text: str, max_tokens: int | None = None, **extra: Any) -> RowRequest:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": text}], **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return RowRequest(index, str(index), body)


def test_the_context_comes_from_vllms_model_card() -> None:
    cards = [{"id": "other", "max_model_len": 4096}, {"id": "m", "max_model_len": 8192}, {"id": "x"}]
    assert context_length_of(cards, "m") == 8192
    assert context_length_of(cards, "x") is None and context_length_of(cards, "missing") is None
    assert context_length_of([{"id": "m", "max_model_len": None}], "m") is None


def test_text_bytes_count_every_text_part_and_nothing_else() -> None:
    body = {"messages": [{"role": "system", "content": "héllo"},
                         {"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "image_url", "image_url": {"url": "x" * 99}}]},
                         {"role": "assistant", "content": None}]}  # fmt: skip
    assert prompt_text_bytes(body) == 6 + 2


def test_the_estimate_refuses_only_rows_that_cannot_fit() -> None:
    check = LengthCheck(1000)
    fits = _request(0, "x" * (MAX_BYTES_PER_TOKEN * 999), max_tokens=None)  # at least 999 tokens: may fit
    assert check.problem(fits) is None
    too_long = _request(1, "x" * (MAX_BYTES_PER_TOKEN * 1000))  # at least 1000: the prompt alone cannot fit
    problem = check.problem(too_long)
    assert problem is not None and problem.error_type == "context_length" and problem.row_id == "1"
    assert "at least 1000 prompt tokens (estimated)" in problem.message
    answer_too_long = _request(2, "hi", max_tokens=1000)  # 1 prompt token at least + 1000 > 1000
    assert check.problem(answer_too_long) is not None
    assert check.problem(_request(3, "hi", max_tokens=999)) is None
    assert check.refused == 2


async def test_exact_counts_are_asked_once_per_distinct_prompt_and_decide() -> None:
    asked: list[dict[str, Any]] = []

    async def tokenize(body: dict[str, Any]) -> int:
        asked.append(body)
        return len(body["messages"][0]["content"].split()) + 5  # the chat template's own tokens

    check = LengthCheck(20, tokenize=tokenize, model="m")
    requests = [_request(i, "one two three", max_tokens=12) for i in range(50)]  # 8 + 12 = 20: fits
    requests.append(_request(50, "one two three four", max_tokens=12))  # 9 + 12 = 21: does not
    await check.prepare(requests)
    assert len(asked) == 2 and check.asked == 2  # 51 rows, 2 distinct prompts
    assert asked[0] == {"model": "m", "add_generation_prompt": True, "messages": requests[0].body["messages"]}
    assert all(check.problem(r) is None for r in requests[:50])
    problem = check.problem(requests[50])
    assert problem is not None and "9 prompt tokens + max_tokens 12 = 21" in problem.message
    await check.prepare(requests)
    assert len(asked) == 2  # cached


async def test_tools_change_the_prompt_so_they_are_part_of_its_key() -> None:
    calls = 0

    async def tokenize(body: dict[str, Any]) -> int:
        nonlocal calls
        calls += 1
        return 3 + 10 * len(body.get("tools", []))

    check = LengthCheck(100, tokenize=tokenize)
    plain, with_tools = _request(0, "hi"), _request(1, "hi", tools=[{"type": "function", "function": {"name": "f"}}])
    await check.prepare([plain, with_tools])
    assert calls == 2


async def test_a_server_that_cannot_count_leaves_the_row_to_the_estimate() -> None:
    async def tokenize(body: dict[str, Any]) -> int:
        raise status_error(500, "HTTP 500")

    check = LengthCheck(10, tokenize=tokenize)
    request = _request(0, "short", max_tokens=5)
    await check.prepare([request])
    assert check.problem(request) is None
    with pytest.raises(ServerError):
        await tokenize({})  # the failure was real, and prepare() swallowed it

"""`LengthCheck`: rows that cannot fit the server's context become error rows before they are sent.

One prompt longer than the server can hold can stall a whole vLLM server (vllm #39734), and a
row that cannot fit fails anyway (vLLM's 400 "maximum context length"), so a bulk job refuses it
up front, as an error row of type `context_length`. vLLM's rule (wire-format.md, section 3): the
prompt may use at most `max_model_len - 1` tokens, and prompt + `max_tokens` at most `max_model_len`.
The context comes from the server (`max_model_len` in vLLM's `GET /v1/models`); a server that does
not state it (llama.cpp, most hosted APIs) is not checked.

Two ways to know a prompt's size:

* **exact** (`--check-length exact`): the server's own count, `POST /tokenize` with the chat
  template applied; the rows of an input batch are asked concurrently, and counts are cached per
  distinct prompt (messages, tools and template settings), so n samples of one prompt ask once.
* **estimate** (the default): a bound that never refuses a row that fits: a prompt of T bytes of
  text has at least T / `MAX_BYTES_PER_TOKEN` tokens. Real text averages 3-5 bytes per token, so
  only rows far beyond the context are refused this way; `max_tokens` alone over the context is
  always caught. A row near the limit is sent and the server decides.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from batchgen.errors import APIError
from batchgen.records import RowProblem, RowRequest

if TYPE_CHECKING:
    from batchgen.client_pool import ClientPool

__all__ = ["CACHE_SIZE", "MAX_BYTES_PER_TOKEN", "LengthCheck", "context_length_of", "length_check_for", "prompt_text_bytes"]

# No tokenizer in use packs more than this many bytes of text per token on average over a prompt.
MAX_BYTES_PER_TOKEN = 32
CACHE_SIZE = 65_536  # distinct prompts whose exact count is kept
_CONCURRENT = 16  # /tokenize requests at once
# The fields that change what the chat template makes of a request (and so its prompt tokens).
_PROMPT_FIELDS = ("messages", "tools", "chat_template_kwargs", "chat_template", "documents")


def prompt_text_bytes(body: dict[str, Any]) -> int:
    """The UTF-8 bytes of the text a chat body's messages carry (parts of other kinds count nothing)."""
    total = 0
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.encode())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"].encode())
    return total


def context_length_of(cards: Iterable[dict[str, Any]], model: str) -> int | None:
    """`max_model_len` of `model`'s card in a `GET /v1/models` list (vLLM), or None when not stated."""
    for card in cards:
        if card.get("id") == model:
            value = card.get("max_model_len")
            return value if type(value) is int and value > 0 else None
    return None


class LengthCheck:
    """Refuses the rows that cannot fit `max_model_len`.

    Args:
        max_model_len: the server's context in tokens (the smallest, over several servers).
        tokenize: the server's exact count for a tokenize body (`Client.tokenize`), or None for the estimate.
        model: sent in the tokenize bodies.

    Example:
        check = LengthCheck(8192, tokenize=client.tokenize, model="qwen3-8b")
        await check.prepare(requests)        # per input batch: exact counts, concurrently
        problem = check.problem(request)     # None, or the row's error
    """

    def __init__(self, max_model_len: int, *, tokenize: Callable[[dict[str, Any]], Awaitable[int]] | None = None,
                 model: str = "") -> None:  # fmt: skip
        self.max_model_len = max_model_len
        self._tokenize = tokenize
        self._model = model
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self.asked = 0  # /tokenize requests sent
        self.refused = 0

    @property
    def exact(self) -> bool:
        return self._tokenize is not None

    async def prepare(self, requests: Iterable[RowRequest]) -> None:
        """Ask the server for the exact counts of the prompts not yet known (exact mode; else nothing)."""
        if self._tokenize is None:
            return
        wanted: dict[bytes, dict[str, Any]] = {}
        for request in requests:
            key = self._key(request.body)
            if key not in self._counts and key not in wanted:
                wanted[key] = request.body
        if not wanted:
            return
        gate, tokenize = asyncio.Semaphore(_CONCURRENT), self._tokenize

        async def count(key: bytes, body: dict[str, Any]) -> None:
            async with gate:
                tokenize_body = {"model": self._model, "add_generation_prompt": True}
                tokenize_body.update((k, body[k]) for k in _PROMPT_FIELDS if k in body)
                self.asked += 1
                try:
                    self._remember(key, await tokenize(tokenize_body))
                except APIError:
                    pass  # not known: the row is sent, and the server judges it

        await asyncio.gather(*(count(key, body) for key, body in wanted.items()))

    def problem(self, request: RowRequest) -> RowProblem | None:
        """The row's error when it cannot fit, else None."""
        body = request.body
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        answer = limit if type(limit) is int and limit > 0 else 0
        exact = self._counts.get(self._key(body)) if self._tokenize is not None else None
        prompt = exact if exact is not None else max(1, math.ceil(prompt_text_bytes(body) / MAX_BYTES_PER_TOKEN))
        size = f"{prompt} prompt tokens" if exact is not None else f"at least {prompt} prompt tokens (estimated)"
        if prompt > self.max_model_len - 1:
            reason = f"{size}, more than the server's context of {self.max_model_len} tokens allows"
        elif prompt + answer > self.max_model_len:
            reason = (f"{size} + max_tokens {answer} = {prompt + answer}, more than the server's context of "
                      f"{self.max_model_len} tokens")  # fmt: skip
        else:
            return None
        self.refused += 1
        return RowProblem(request.index, request.row_id, f"not sent: {reason}", "context_length")

    def _key(self, body: dict[str, Any]) -> bytes:
        text = orjson.dumps({k: body[k] for k in _PROMPT_FIELDS if k in body}, option=orjson.OPT_SORT_KEYS)
        return hashlib.blake2b(text, digest_size=16).digest()

    def _remember(self, key: bytes, count: int) -> None:
        self._counts[key] = count
        if len(self._counts) > CACHE_SIZE:
            self._counts.popitem(last=False)


async def length_check_for(mode: str, servers: ClientPool, model: str, context: int | None,
                           warn: Callable[[str], None]) -> LengthCheck | None:  # fmt: skip
    """The run's check for the servers' `context` (`check_endpoints` read it from their model cards):
    None when `mode` is "off" or no server states one. "exact" needs the first server's `/tokenize`;
    without it the estimate is used, with a warning."""
    if mode == "off" or context is None:
        return None
    if mode == "exact":
        client = servers.endpoints[0].client
        try:
            await client.tokenize({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        except APIError as exc:
            warn(f"--check-length exact: {client.base_url} cannot count tokens (POST /tokenize: {exc}); "
                 "using the estimate")  # fmt: skip
        else:
            return LengthCheck(context, tokenize=client.tokenize, model=model)
    return LengthCheck(context)

"""Pure, deterministic construction of the mock vLLM server's answers: checks, replies, bodies, SSE chunks.

Nothing here does I/O, so the wire shapes can be read (and tested) apart from the aiohttp plumbing in
`mock_server.py`. Shapes follow the current vLLM format (≥0.16, see `wire-format.md` §1-3): every key of
a non-stream body present, reasoning only under `reasoning`, `exclude_unset`-style key sets in chunks.

Reply rules (a token is a whitespace-separated word):

* Text: ``"echo: " + <last user message's words>``. It is cut at ``max_completion_tokens``/``max_tokens``
  with ``finish_reason="length"``, else it ends with ``"stop"``. With ``ignore_eos``, ``min_tokens`` or
  ``MockConfig.output_tokens`` the reply has exactly N tokens (N = max tokens, else ``output_tokens``,
  else ``min_tokens``) made by repeating the user's words (or lorem-ipsum filler when there are none).
* Reasoning: ``chat_template_kwargs.enable_thinking: true`` or a ``reasoning_effort`` other than
  ``"none"`` adds ``reasoning = "Thinking about: <words>"``; content then starts with ``"\\n\\n"``.
  Reasoning tokens count toward ``completion_tokens`` and the max-tokens budget.
* Tools: with ``tools``, ``tool_choice="required"`` or a named function always calls (named → finish
  ``"stop"``, as vLLM does); ``"auto"`` (the default) calls when the last user text contains the word
  "weather" or an offered function's name (that function is called, else the first). ``"none"`` never
  calls. A call has ``content: null``, finish ``"tool_calls"`` and arguments
  ``json.dumps({"query": <last user text>}, ensure_ascii=False)``; the budget does not apply to it.
* n: ``n`` identical choices, ``index`` 0..n-1. A stream sends each choice's role chunk, then their
  chunks round-robin, one choice per chunk; usage sums ``completion_tokens`` over the choices.
* Stop: ``stop`` (a string or a list) is searched in the generated text, reasoning then content (tool-call
  arguments are not searched). The first token that completes a stop string ends the reply; if it
  completes several, the first in the list wins; as in vLLM, none counts until more than ``min_tokens``
  tokens were generated, and a stop beats a length cut. The text is cut right before the stop string, the
  token holding the cut keeps the text before it as its piece, ``finish_reason="stop"`` and ``stop_reason``
  is the string (else null). ``completion_tokens`` counts every token up to the one that completed the
  stop string, so the stop string's own tokens count but have no text and no logprobs. A cut inside the
  reasoning leaves ``content: null`` and drops any tool call; a cut before any content of a reply without
  reasoning leaves ``content: ""``.
* Logprobs: with ``logprobs: true`` each piece (reasoning, content, tool-call argument pieces, in that
  order; ``p`` counts them from 0 per choice) gets ``{"token": piece, "logprob": -(h % 5000) / 1000,
  "bytes": utf-8 of piece, "top_logprobs": [...]}``, with ``h`` = the big-endian int of
  ``blake2b(f"{p}:{piece}".encode(), digest_size=8)``. Its ``top_logprobs`` has k entries (k = the request's
  ``top_logprobs``, 0 when absent): the piece with the same logprob, then the tokens of `ALT_TOKENS`
  rotated to start at ``h % len(ALT_TOKENS)``, minus the piece, entry i with logprob
  ``-(h % 5000 + 1000 * i) / 1000``. So the tokens joined rebuild reasoning + content + arguments. A stream
  carries ``{"content": [entry]}`` on the chunk that streams the piece (a length cut's last piece rides in
  the finish chunk), and null on chunks without one. Without ``logprobs: true``, ``logprobs`` is null.
* Usage: ``prompt_tokens`` counts the words of every message (`prompt_token_counts`; ``POST /tokenize``
  counts the same words, so its ``count`` equals the chat's ``prompt_tokens`` for the same messages).
  ``prompt_tokens_details`` is ``{"cached_tokens": <words of every message but the last>}`` (the cached
  prefix of a conversation) when that is > 0 and the server runs with ``prompt_tokens_details``.
  ``completion_tokens_details`` is ``{"reasoning_tokens": <reasoning tokens over all choices>}`` when that is
  > 0 (2026 main). A plain body always has both keys (null when unset); the stream's usage chunk has them only
  when set (vLLM dumps it with exclude_none), and continuous-usage chunks never.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import orjson

__all__ = [
    "ALT_TOKENS",
    "MAX_MODEL_LEN",
    "MAX_TOP_LOGPROBS",
    "ChatPlan",
    "Choice",
    "RequestRejected",
    "StreamEvent",
    "ToolCall",
    "completion_body",
    "count_tokens",
    "error_body",
    "generation_steps",
    "models_body",
    "parse_body",
    "plan_chat",
    "prompt_token_counts",
    "stream_events",
    "tokenize",
    "tokenize_body",
]

MAX_MODEL_LEN: Final = 8192  # the mock's default context window (`MockConfig.max_model_len`)
TOKEN_VOCAB: Final = 32_000  # /tokenize ids are word hashes below this
VALID_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})
REASONING_EFFORTS: Final = frozenset({"none", "minimal", "low", "medium", "high", "xhigh", "max"})
FILLER_WORDS: Final = tuple("lorem ipsum dolor sit amet consectetur adipiscing elit sed do".split())
DONE_EVENT: Final = b"data: [DONE]\n\n"
MAX_TOP_LOGPROBS: Final = 20  # vLLM's default --max-logprobs
# The runners-up of every top_logprobs list (rules in the module doc); more than MAX_TOP_LOGPROBS of them, so
# k - 1 remain after the chosen piece is skipped.
ALT_TOKENS: Final = (
    " the", " a", " and", " of", " to", " in", " is", " it", " that", " for", " on", " with",
    " as", " was", " at", " by", ",", ".", "!", "?", "\n", " I", " you", " we",
)  # fmt: skip
_TOKEN_RE: Final = re.compile(r"\s*\S+")


class RequestRejected(Exception):
    """A request the mock refuses, with the status and nested error body to send back.

    The body's `code` is the status, as vLLM sends it, unless `code` is given (OpenAI's quota 429 says
    ``"rate_limit_exceeded"``).
    """

    def __init__(
        self, status: int, message: str, *, error_type: str, param: str | None, code: int | str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, error_type, param, status if code is None else code)


def error_body(message: str, error_type: str, param: str | None, code: int | str) -> dict[str, Any]:
    """The nested error envelope of vLLM ≥0.10.1 (and OpenAI): ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _bad_request(message: str, param: str | None) -> RequestRejected:
    return RequestRejected(400, message, error_type="BadRequestError", param=param)


def tokenize(text: str) -> list[str]:
    """Split text into word tokens that keep their leading whitespace, so ``"".join`` restores it."""
    return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    return len(text.split())


def message_text(content: object) -> str:
    """The text of a message's content: a string, or the text parts of a list joined by spaces."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (p.get("text") for p in content if isinstance(p, dict))
        return " ".join(t for t in texts if isinstance(t, str))
    return ""


# ---------------------------------------------------------------- request checks


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body; anything but a JSON object is a 400."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad_request(f"Invalid JSON body: {exc}", None) from None
    if not isinstance(body, dict):
        raise _bad_request("Input should be a valid dictionary (the request body must be an object)", None)
    return body


# The mock is stricter than vLLM's lax pydantic models (which coerce "5" or true into numbers): a client
# sending such values has a bug worth surfacing in tests. bool is an int subclass, hence the extra check.
def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_non_negative_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_effort(v: object) -> bool:
    return isinstance(v, str) and v in REASONING_EFFORTS


def _is_instance(kind: type) -> Callable[[object], bool]:
    return lambda v: isinstance(v, kind)


def _is_top_logprobs(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOP_LOGPROBS


def _is_stop(v: object) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))


# field -> (predicate, what the field should be). A null value means "unset" and is always accepted.
_FIELD_CHECKS: Final[Mapping[str, tuple[Callable[[object], bool], str]]] = {
    "model": (_is_instance(str), "a valid string"),
    "temperature": (_is_number, "a valid number"),
    "top_p": (_is_number, "a valid number"),
    "max_tokens": (_is_positive_int, "a positive integer"),
    "max_completion_tokens": (_is_positive_int, "a positive integer"),
    "min_tokens": (_is_non_negative_int, "a non-negative integer"),
    "n": (_is_positive_int, "an integer >= 1"),
    "seed": (_is_int, "a valid integer"),
    "stream": (_is_instance(bool), "a valid boolean"),
    "ignore_eos": (_is_instance(bool), "a valid boolean"),
    "logprobs": (_is_instance(bool), "a valid boolean"),
    "top_logprobs": (_is_top_logprobs, f"an integer between 0 and {MAX_TOP_LOGPROBS}"),
    "stop": (_is_stop, "a valid string or a list of strings"),
    "stream_options": (_is_instance(dict), "a valid dictionary"),
    "chat_template_kwargs": (_is_instance(dict), "a valid dictionary"),
    "tools": (_is_instance(list), "a valid list"),
    "request_id": (_is_instance(str), "a valid string"),
    "reasoning_effort": (_is_effort, "one of " + ", ".join(sorted(REASONING_EFFORTS))),
}


def _check_fields(body: Mapping[str, Any]) -> None:
    # Walk the body, not the table: a typical body has a few keys, the table keeps growing (0.45 us vs
    # 0.9 us a request). The first bad field in body order is reported.
    for field, value in body.items():
        check = _FIELD_CHECKS.get(field)
        if check is not None and value is not None and not check[0](value):
            shown, expected = repr(value)[:80], check[1]
            raise _bad_request(f"Input should be {expected} (parameter={field}, value={shown})", field)


def _check_sampling(body: Mapping[str, Any]) -> None:
    """vLLM's model validators on logprobs and SamplingParams' check on stop strings."""
    if (body.get("top_logprobs") or 0) > 0 and not body.get("logprobs"):  # top_logprobs: 0 alone is fine
        raise _bad_request(
            "when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)", "top_logprobs"
        )
    stop = body.get("stop")
    if stop == "" or (isinstance(stop, list) and "" in stop):  # it would match before every reply
        raise _bad_request("stop cannot contain an empty string. (parameter=stop)", "stop")


def _check_messages(body: Mapping[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad_request("Field required: `messages` must be a non-empty list", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in VALID_ROLES:
            roles = ", ".join(sorted(VALID_ROLES))
            raise _bad_request(f"messages[{i}]: role must be one of {roles}", "messages")
        if not isinstance(message.get("content"), (str, list, type(None))):
            raise _bad_request(f"messages[{i}]: content must be a string or a list of parts", "messages")


def _check_model(body: Mapping[str, Any], models: Sequence[str]) -> str:
    model = body.get("model")
    if model is None:
        return models[0]
    if model not in models:
        message = f"The model `{model}` does not exist."
        raise RequestRejected(404, message, error_type="NotFoundError", param="model")
    return str(model)


def _function_name(item: object) -> str | None:
    """`item["function"]["name"]` of a tool or named tool_choice, or None if it has no such string."""
    function = item.get("function") if isinstance(item, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) and name else None


def _tool_names(body: Mapping[str, Any]) -> list[str]:
    tools = body.get("tools")
    if tools is None:
        return []
    names = [_function_name(t) for t in tools]
    if not tools or None in names:
        raise _bad_request("`tools` must be a non-empty list of function tools with a name", "tools")
    return [n for n in names if n is not None]


def _check_tool_choice(body: Mapping[str, Any], names: Sequence[str]) -> None:
    choice = body.get("tool_choice")
    if choice is None or choice == "none":
        return
    if not names:
        raise _bad_request("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if choice in ("auto", "required"):
        return
    name = _function_name(choice)
    if name is None:
        raise _bad_request("`tool_choice` must be none, auto, required or a named function", "tool_choice")
    if name not in names:
        raise _bad_request(f"Tool '{name}' has not been passed in `tools`.", "tool_choice")


def _check_stream_options(body: Mapping[str, Any]) -> None:
    if body.get("stream_options") and not body.get("stream"):
        raise _bad_request("Stream options can only be defined when `stream=True`.", "stream_options")


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    # max_completion_tokens wins over the deprecated max_tokens, as in vLLM.
    value = body.get("max_completion_tokens")
    return value if value is not None else body.get("max_tokens")


def _check_lengths(body: Mapping[str, Any], prompt_tokens: int, max_model_len: int | None) -> None:
    """vLLM's context checks (wire-format.md §3); `max_model_len` None skips the first two."""
    requested = _max_tokens(body)
    if max_model_len is not None and prompt_tokens >= max_model_len:
        raise _bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages. "
            f"(parameter=input_tokens, value={prompt_tokens})",
            "input_tokens",
        )
    if max_model_len is not None and requested is not None and prompt_tokens + requested > max_model_len:
        raise _bad_request(
            f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This model's maximum "
            f"context length is {max_model_len} tokens and your request has {prompt_tokens} input tokens "
            f"({requested} > {max_model_len} - {prompt_tokens}). (parameter=max_tokens, value={requested})",
            "max_tokens",
        )
    min_tokens = body.get("min_tokens")
    if requested is not None and min_tokens is not None and min_tokens > requested:
        raise _bad_request(
            f"min_tokens must be less than or equal to max_tokens={requested}, got {min_tokens}.",
            "min_tokens",
        )


# ---------------------------------------------------------------- reply planning


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str

    @property
    def pieces(self) -> list[str]:
        """The argument text as streamed: one word per delta."""
        return tokenize(self.arguments)


@dataclass(frozen=True, slots=True)
class Choice:
    """One generated answer. Token tuples hold the text exactly as it is streamed."""

    index: int
    reasoning: tuple[str, ...]
    content: tuple[str, ...] | None  # None: tool-call-only answer, or cut inside the reasoning
    tool_call: ToolCall | None
    finish_reason: str
    stop_reason: str | None = None  # the matched stop string
    stop_tokens: int = 0  # tokens generated for the stop string: counted, but with no text
    logprobs: tuple[dict[str, Any], ...] | None = None  # one entry per piece, when requested

    @property
    def pieces(self) -> list[str]:
        """Every generated text piece in order: reasoning, content, tool-call arguments."""
        arguments = self.tool_call.pieces if self.tool_call else []
        return [*self.reasoning, *(self.content or ()), *arguments]

    @property
    def completion_tokens(self) -> int:
        tool_tokens = len(self.tool_call.pieces) if self.tool_call else 0
        return len(self.reasoning) + len(self.content or ()) + tool_tokens + self.stop_tokens


@dataclass(frozen=True, slots=True)
class ChatPlan:
    """Everything needed to answer one valid chat request, as a body or as a stream."""

    id: str
    created: int
    model: str
    prompt_tokens: int
    choices: tuple[Choice, ...]
    stream: bool
    include_usage: bool
    continuous_usage: bool
    cached_tokens: int = 0  # 0: no prompt_tokens_details
    max_tokens: int | None = None  # the request's max_completion_tokens, else max_tokens

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    @property
    def reasoning_tokens(self) -> int:
        return sum(len(c.reasoning) for c in self.choices)


@dataclass(frozen=True, slots=True)
class _Budget:
    limit: int
    exact: bool  # fill the reply up to `limit` instead of stopping at the natural end
    exact_finish: str


def _budget(
    body: Mapping[str, Any], output_tokens: int | None, prompt_tokens: int, max_model_len: int | None
) -> _Budget:
    # Without a context window (max_model_len None) an unbounded reply still stops, at MAX_MODEL_LEN tokens.
    room = max_model_len - prompt_tokens if max_model_len is not None else MAX_MODEL_LEN
    min_tokens = body.get("min_tokens") or 0
    exact = body.get("ignore_eos") is True or min_tokens > 0 or output_tokens is not None
    requested = _max_tokens(body)
    if requested is not None:
        return _Budget(requested, exact, "length")
    wanted = output_tokens if output_tokens is not None else (min_tokens or None)
    if wanted is None or wanted > room:
        # Without max_tokens vLLM lets generation run to the end of the context window.
        return _Budget(room, exact, "length")
    return _Budget(wanted, exact, "stop")


def _spaced(words: Sequence[str], after_reasoning: bool) -> tuple[str, ...]:
    tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
    if tokens and after_reasoning:
        tokens[0] = "\n\n" + tokens[0]  # vLLM content usually starts with the blank line after </think>
    return tuple(tokens)


def _text_parts(
    words: Sequence[str], thinking: bool, budget: _Budget
) -> tuple[tuple[str, ...], tuple[str, ...] | None, str]:
    reasoning = tokenize("Thinking about: " + " ".join(words)) if thinking else []
    if budget.exact:
        wanted = max(0, budget.limit - len(reasoning))
        fill = itertools.islice(itertools.cycle(words or FILLER_WORDS), max(0, wanted - 1))
        content_words = ["echo:", *fill][:wanted]
        finish = budget.exact_finish
    else:
        content_words, finish = ["echo:", *words], "stop"
    if len(reasoning) + len(content_words) > budget.limit:
        finish = "length"
        reasoning = reasoning[: budget.limit]
        content_words = content_words[: budget.limit - len(reasoning)]
    content = _spaced(content_words, bool(reasoning)) if content_words else None
    return tuple(reasoning), content, finish


def _pick_tool(body: Mapping[str, Any], names: Sequence[str], user_text: str) -> tuple[str, str] | None:
    """The (function name, finish_reason) to call, or None for a text answer (rules in the module doc)."""
    choice = (body.get("tool_choice") or "auto") if names else "none"  # vLLM defaults to auto with tools
    if choice == "required":
        return names[0], "tool_calls"
    if isinstance(choice, dict):
        return str(_function_name(choice)), "stop"
    if choice != "auto":
        return None
    lowered = user_text.lower()
    mentioned = [n for n in names if n.lower() in lowered]
    if mentioned:
        return mentioned[0], "tool_calls"
    return (names[0], "tool_calls") if re.search(r"\bweather\b", lowered) else None


def _thinking(body: Mapping[str, Any]) -> bool:
    kwargs = body.get("chat_template_kwargs") or {}
    if kwargs.get("enable_thinking") is False:
        return False
    effort = body.get("reasoning_effort")
    return kwargs.get("enable_thinking") is True or (effort is not None and effort != "none")


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def _hex(seed: bytes, salt: str = "") -> str:
    return hashlib.sha256(seed + salt.encode()).hexdigest()[:32]


def prompt_token_counts(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """The prompt tokens of each message, as usage and /tokenize count them: the words of its text."""
    return [count_tokens(message_text(m.get("content"))) for m in messages]


def _validate(
    body: Mapping[str, Any], models: Sequence[str], max_model_len: int | None
) -> tuple[str, list[str], int, int]:
    """Check a request in vLLM's order (schema, model, tools, stream options, lengths).

    Returns the served model, the offered tool names, the prompt token count and the token count of every
    message but the last (the cached prefix); raises `RequestRejected`.
    """
    _check_fields(body)
    _check_sampling(body)
    _check_messages(body)
    model = _check_model(body, models)
    names = _tool_names(body)
    _check_tool_choice(body, names)
    _check_stream_options(body)
    counts = prompt_token_counts(body["messages"])
    prompt_tokens = sum(counts)
    _check_lengths(body, prompt_tokens, max_model_len)
    return model, names, prompt_tokens, prompt_tokens - counts[-1]


@dataclass(frozen=True, slots=True)
class _StopCut:
    pieces: list[str]  # the text kept before the stop string, as streamed
    generated: int  # tokens generated up to and including the one that completed the stop string
    stop: str


def _find_stop(pieces: Sequence[str], stops: Sequence[str], min_tokens: int) -> _StopCut | None:
    """Where the stop strings end `pieces`, by vLLM's incremental check (rules in the module doc)."""
    if min_tokens >= len(pieces):
        return None
    text = "".join(pieces)
    ends = list(itertools.accumulate(map(len, pieces)))  # ends[j]: where piece j ends in `text`
    floor = ends[min_tokens - 1] if min_tokens else 0  # a match must end after this to count
    best: tuple[int, int, str] | None = None  # (completing token, start, stop string)
    for stop in stops:
        start = text.find(stop, max(0, floor - len(stop) + 1))
        if start < 0:
            continue
        token = bisect.bisect_left(ends, start + len(stop))
        if best is None or token < best[0]:  # a tie keeps the earlier entry of the list
            best = (token, start, stop)
    if best is None:
        return None
    token, start, stop = best
    kept: list[str] = []
    for piece, end in zip(pieces, ends):
        if end > start:
            head = piece[: len(piece) - (end - start)]
            kept += [head] if head else []
            break
        kept.append(piece)
    return _StopCut(kept, token + 1, stop)


def _apply_stop(choice: Choice, stops: Sequence[str], min_tokens: int) -> Choice:
    cut = _find_stop([*choice.reasoning, *(choice.content or ())], stops, min_tokens)
    if cut is None:
        return choice
    reasoning = tuple(cut.pieces[: len(choice.reasoning)])
    content: tuple[str, ...] | None = tuple(cut.pieces[len(choice.reasoning) :])
    if not content and choice.reasoning:
        content = None  # vLLM's reasoning parsers give null, not "", for empty content after reasoning
    stop_tokens = cut.generated - len(cut.pieces)
    return Choice(choice.index, reasoning, content, None, "stop", stop_reason=cut.stop, stop_tokens=stop_tokens)


def _logprob_entry(position: int, piece: str, top: int) -> dict[str, Any]:
    """The deterministic logprobs of one generated piece (rule in the module doc)."""
    h = int.from_bytes(hashlib.blake2b(f"{position}:{piece}".encode(), digest_size=8).digest(), "big")
    millis = h % 5000
    chosen: dict[str, Any] = {"token": piece, "logprob": -millis / 1000, "bytes": list(piece.encode())}
    start = h % len(ALT_TOKENS)
    others = [t for t in (*ALT_TOKENS[start:], *ALT_TOKENS[:start]) if t != piece][: max(0, top - 1)]
    runners_up = [
        {"token": t, "logprob": -(millis + 1000 * i) / 1000, "bytes": list(t.encode())}
        for i, t in enumerate(others, start=1)
    ]
    return {**chosen, "top_logprobs": [dict(chosen), *runners_up] if top else []}


def _with_logprobs(choice: Choice, top: int) -> Choice:
    entries = tuple(_logprob_entry(p, piece, top) for p, piece in enumerate(choice.pieces))
    return dataclasses.replace(choice, logprobs=entries)


def _choice(
    index: int, body: Mapping[str, Any], names: Sequence[str], budget: _Budget, digest: bytes
) -> Choice:
    user_text = _last_user_text(body["messages"])
    words = user_text.split()
    thinking = _thinking(body)
    tool = _pick_tool(body, names, user_text)
    if tool is None:
        reasoning, content, finish = _text_parts(words, thinking, budget)
        return Choice(index, reasoning, content, None, finish)
    name, finish = tool
    arguments = json.dumps({"query": user_text}, ensure_ascii=False)  # vLLM's spacing: {"query": "..."}
    call = ToolCall(id=f"chatcmpl-tool-{_hex(digest, f'tool:{index}')}", name=name, arguments=arguments)
    reasoning = tuple(tokenize("Thinking about: " + " ".join(words))) if thinking else ()
    return Choice(index, reasoning, None, call, finish)


def _finish_choice(choice: Choice, body: Mapping[str, Any]) -> Choice:
    """Apply `stop` and `logprobs`; a request with neither pays two lookups."""
    stop = body.get("stop")
    if stop:
        choice = _apply_stop(choice, [stop] if isinstance(stop, str) else stop, body.get("min_tokens") or 0)
    if body.get("logprobs") is True:
        choice = _with_logprobs(choice, body.get("top_logprobs") or 0)
    return choice


def plan_chat(
    body: Mapping[str, Any],
    *,
    models: Sequence[str],
    output_tokens: int | None,
    request_id: str | None,
    created: int,
    prompt_tokens_details: bool = True,
    max_model_len: int | None = MAX_MODEL_LEN,
) -> ChatPlan:
    """Check a parsed request the way vLLM does and decide its whole answer; raises `RequestRejected`.

    `request_id` is the X-Request-Id header (it wins over the body's `request_id`, as in vLLM); without
    either, the id is a hash of the body, so equal requests get equal ids. `prompt_tokens_details` is
    vLLM's ``--enable-prompt-tokens-details``: without it usage never reports cached tokens.
    `max_model_len` is the context window the length checks use; None checks nothing.
    """
    model, names, prompt_tokens, cached_tokens = _validate(body, models, max_model_len)
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()
    budget = _budget(body, output_tokens, prompt_tokens, max_model_len)
    choices = tuple(
        _finish_choice(_choice(i, body, names, budget, digest), body) for i in range(body.get("n") or 1)
    )
    options = body.get("stream_options") or {}
    include_usage = options.get("include_usage") is True
    return ChatPlan(
        id="chatcmpl-" + (request_id or body.get("request_id") or _hex(digest)),
        created=created,
        model=model,
        prompt_tokens=prompt_tokens,
        choices=choices,
        stream=body.get("stream") is True,
        include_usage=include_usage,
        # 2026-main semantics: continuous stats need include_usage too (wire-format.md §2).
        continuous_usage=include_usage and options.get("continuous_usage_stats") is True,
        cached_tokens=cached_tokens if prompt_tokens_details else 0,
        max_tokens=_max_tokens(body),
    )


# ---------------------------------------------------------------- non-stream bodies


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def _usage_details(plan: ChatPlan) -> dict[str, Any]:
    """The usage details that have a value (rules in the module doc)."""
    details: dict[str, Any] = {}
    if plan.cached_tokens:
        details["prompt_tokens_details"] = {"cached_tokens": plan.cached_tokens}
    reasoning_tokens = plan.reasoning_tokens
    if reasoning_tokens:
        details["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return details


def _message(choice: Choice) -> dict[str, Any]:
    tool_calls = []
    if choice.tool_call is not None:
        call = choice.tool_call
        function = {"name": call.name, "arguments": call.arguments}
        tool_calls.append({"id": call.id, "type": "function", "function": function})
    return {
        "role": "assistant",
        "content": None if choice.content is None else "".join(choice.content),
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": tool_calls,  # [] on plain answers, as v0.5-v0.23 send
        "reasoning": "".join(choice.reasoning) or None,
    }


def completion_body(plan: ChatPlan) -> dict[str, Any]:
    """The non-stream body: every key of vLLM's pydantic model present, null where unset."""
    choices = [
        {
            "index": c.index,
            "message": _message(c),
            "logprobs": None if c.logprobs is None else {"content": list(c.logprobs)},
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
            "token_ids": None,
        }
        for c in plan.choices
    ]
    usage: dict[str, Any] = _usage(plan.prompt_tokens, plan.completion_tokens)
    usage["prompt_tokens_details"] = None
    usage["completion_tokens_details"] = None
    usage.update(_usage_details(plan))
    return {
        "id": plan.id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage,
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "kv_transfer_params": None,
    }


def models_body(models: Sequence[str], created: int, max_model_len: int | None = MAX_MODEL_LEN) -> dict[str, Any]:
    """`GET /v1/models`: one card per served name; extra names are aliases of the base, so parent is null."""
    cards: list[dict[str, Any]] = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": models[0],
            "parent": None,
            "max_model_len": max_model_len,
            "permission": [],
        }
        for name in models
    ]
    return {"object": "list", "data": cards}


# ---------------------------------------------------------------- /tokenize

_TOKENIZE_FLAGS: Final = ("add_generation_prompt", "continue_final_message", "add_special_tokens", "return_token_strs")


def _token_id(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big") % TOKEN_VOCAB


def tokenize_body(body: Mapping[str, Any], *, models: Sequence[str], max_model_len: int | None) -> dict[str, Any]:
    """`POST /tokenize`: vLLM's TokenizeChatRequest (``messages``) or TokenizeCompletionRequest (``prompt``)
    in, its TokenizeResponse ``{"count", "max_model_len", "tokens", "token_strs"}`` out; raises `RequestRejected`.

    Messages are counted by `prompt_token_counts`, so ``count`` equals the ``usage.prompt_tokens`` of a chat
    request with the same messages (the mock has no chat template: ``add_generation_prompt`` and ``tools``
    add nothing); a prompt counts its words. Token ids are hashes of the words below `TOKEN_VOCAB`;
    ``token_strs`` holds the words only with ``return_token_strs: true``. As in vLLM there is no length check,
    and ``max_model_len`` is the server's (null when the mock has none).
    """
    _check_fields(body)
    for name in _TOKENIZE_FLAGS:
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise _bad_request(f"Input should be a valid boolean (parameter={name}, value={repr(value)[:80]})", name)
    if "messages" in body:
        if body.get("continue_final_message") and body.get("add_generation_prompt", True):
            message = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            raise _bad_request(message, None)
        _check_messages(body)
        count = sum(prompt_token_counts(body["messages"]))
        words = [w for m in body["messages"] for w in message_text(m.get("content")).split()]
    elif "prompt" in body:
        if not isinstance(body["prompt"], str):
            shown = repr(body["prompt"])[:80]
            raise _bad_request(f"Input should be a valid string (parameter=prompt, value={shown})", "prompt")
        words = body["prompt"].split()
        count = count_tokens(body["prompt"])
    else:
        raise _bad_request("Field required: `prompt` (a completion request) or `messages` (a chat request)", None)
    _check_model(body, models)
    return {
        "count": count,
        "max_model_len": max_model_len,
        "tokens": [_token_id(w) for w in words],
        "token_strs": words if body.get("return_token_strs") else None,
    }


# ---------------------------------------------------------------- stream chunks


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One complete SSE frame; `paced` marks the first frame of a generation step (wait ttft/itl first)."""

    data: bytes
    paced: bool


class _Step(NamedTuple):
    # Not a frozen dataclass: its __init__ sets each field through object.__setattr__. The steps of a
    # 32-token stream took 15.6 us as a 3-field frozen dataclass and take 9.6 us as this 5-field tuple.
    delta: dict[str, Any]
    tokens: int
    finish: str | None = None
    stop_reason: str | None = None
    logprobs: dict[str, Any] | None = None


def _choice_steps(choice: Choice) -> list[_Step]:
    steps = [_Step({"reasoning": t}, 1) for t in choice.reasoning]
    steps += [_Step({"content": t}, 1) for t in choice.content or ()]
    if choice.tool_call is not None:
        call = choice.tool_call
        # The header delta names the function and has no "arguments" key (DeltaFunctionCall exclude_none).
        header = {"id": call.id, "type": "function", "index": 0, "function": {"name": call.name}}
        steps.append(_Step({"tool_calls": [header]}, 0))
        steps += [_Step({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}, 1) for p in call.pieces]
    if choice.logprobs is not None:
        # Added in a second pass, only when asked, so the loops above stay as cheap as without logprobs.
        # Up to here every step of one token streams one piece, in generation order.
        entries = iter(choice.logprobs)
        steps = [_Step(s.delta, 1, logprobs={"content": [next(entries)]}) if s.tokens else s for s in steps]
    if choice.finish_reason == "length" and steps:
        # A length cut ends on a real token, which rides in the finish chunk: clients must keep its text.
        last = steps.pop()
        steps.append(_Step(last.delta, last.tokens, "length", logprobs=last.logprobs))
    else:
        # Otherwise the final step is the EOS token (or the stop string's tokens, which have no text):
        # empty content, or {} when there was no content.
        delta = {"content": ""} if choice.content is not None else {}
        steps.append(_Step(delta, choice.stop_tokens, choice.finish_reason, choice.stop_reason))
    return steps


def _choice_step_count(choice: Choice) -> int:
    """``len(_choice_steps(choice))`` without building the deltas."""
    tool_steps = 1 + len(choice.tool_call.pieces) if choice.tool_call is not None else 0
    steps = len(choice.reasoning) + len(choice.content or ()) + tool_steps
    return steps if choice.finish_reason == "length" and steps else steps + 1  # + the EOS/stop step


def generation_steps(plan: ChatPlan) -> int:
    """How many generation steps `plan` takes: the paced frames of its stream (its choices advance together).

    The mock's capacity model (`mock_engine`) runs a request for exactly this many engine steps.
    """
    return max(_choice_step_count(c) for c in plan.choices)


def _frame(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream_events(plan: ChatPlan) -> Iterator[StreamEvent]:
    """The SSE frames of `plan` in vLLM order: role chunks, steps (choices round-robin), usage, [DONE]."""
    head = {"id": plan.id, "object": "chat.completion.chunk", "created": plan.created, "model": plan.model}
    running = [0] * len(plan.choices)

    def chunk(choice: dict[str, Any], index: int) -> dict[str, Any]:
        obj: dict[str, Any] = {**head, "choices": [choice]}
        if plan.continuous_usage:
            obj["usage"] = _usage(plan.prompt_tokens, running[index])
        return obj

    for c in plan.choices:
        delta = {"role": "assistant", "content": ""}
        role = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}
        yield StreamEvent(_frame({**chunk(role, c.index), "prompt_token_ids": None}), paced=False)

    per_choice = [_choice_steps(c) for c in plan.choices]
    for position in range(max(len(s) for s in per_choice)):
        first_in_step = True
        for c, steps in zip(plan.choices, per_choice):
            if position >= len(steps):
                continue
            step = steps[position]
            running[c.index] += step.tokens
            body: dict[str, Any] = {
                "index": c.index,
                "delta": step.delta,
                "logprobs": step.logprobs,
                "finish_reason": step.finish,
            }
            if step.finish is not None:
                body["stop_reason"] = step.stop_reason
            body["token_ids"] = None
            yield StreamEvent(_frame(chunk(body, c.index)), paced=first_in_step)
            first_in_step = False

    if plan.include_usage:
        # Dumped with exclude_none by vLLM: details only when they have a value, and choices is empty.
        usage: dict[str, Any] = _usage(plan.prompt_tokens, plan.completion_tokens)
        usage.update(_usage_details(plan))
        yield StreamEvent(_frame({**head, "choices": [], "usage": usage}), paced=False)
    yield StreamEvent(DONE_EVENT, paced=False)

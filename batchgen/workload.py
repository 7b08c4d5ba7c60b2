"""`WorkEstimate`: how many tokens a request will cost a server, before it is sent (pure).

A request's cost to a vLLM server is its prompt (prefill, and KV cache held until the end) plus
what it generates; counting requests instead treats a one-line prompt and a long reasoning sample as
equal load. Before sending, the prompt is known in bytes and the answer only as a bound
(`max_tokens`), so the estimate is

    work = bytes_per_token⁻¹ · prompt bytes + answer share · max_tokens

and the two factors are learned from the usage the server reports back (exponential averages),
so a run whose answers stop at a tenth of `max_tokens`, or whose tokenizer packs 3 bytes per token,
is weighed as it really is after a few dozen answers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WorkEstimate", "usage_tokens"]

_SMOOTHING = 0.05  # each answer moves the factors 5% of the way: about the last 20-60 answers count
_BODY_OVERHEAD = 64  # bytes of JSON around the messages ({"model": ..., "messages": [...]})


class WorkEstimate:
    """Estimates tokens per request and learns from the answers.

    Attributes:
        tokens_per_byte: prompt tokens per byte of request body (starts at 1/4, the usual figure
            for English text with BPE tokenizers).
        answer_share: generated tokens / `max_tokens` (starts at 1: the bound, until answers show
            how long they are).
        answer_tokens: generated tokens of a request without `max_tokens` (starts at 256).
    """

    __slots__ = (
        "_bound_sum", "_count", "_learned", "_prompt_sum", "answer_share", "answer_tokens", "mean_answer", "tokens_per_byte",
    )  # fmt: skip

    def __init__(self) -> None:
        self.tokens_per_byte = 0.25
        self.answer_share = 1.0
        self.answer_tokens = 256.0
        self._count = 0
        self._learned = 0
        self._prompt_sum = 0.0
        self._bound_sum = 0.0
        self.mean_answer: float | None = None  # generated tokens per answer, as the answers say

    def estimate(self, body_bytes: int, max_tokens: Any) -> float:
        """The estimated tokens of a request whose JSON body is `body_bytes` long."""
        prompt = max(body_bytes - _BODY_OVERHEAD, 1) * self.tokens_per_byte
        bounded = type(max_tokens) is int and max_tokens > 0
        self._count += 1
        self._prompt_sum += prompt
        self._bound_sum += max_tokens if bounded else self.answer_tokens
        if bounded:
            return prompt + self.answer_share * float(max_tokens)
        return prompt + self.answer_tokens

    def prompt_tokens(self, body_bytes: int) -> float:
        """The estimated prompt tokens of a request whose JSON body is `body_bytes` long."""
        return max(body_bytes - _BODY_OVERHEAD, 1) * self.tokens_per_byte

    def admission(self, body_bytes: int, max_tokens: Any) -> float:
        """The tokens a provider's quota counts for a request when it is admitted: the prompt (as
        estimated) plus `max_tokens`, the most it may generate (without one, the answers' mean)."""
        bounded = type(max_tokens) is int and max_tokens > 0
        return self.prompt_tokens(body_bytes) + (float(max_tokens) if bounded else self.answer_tokens)

    def request_tokens(self) -> float | None:
        """The mean KV tokens one request may hold (prompt + max_tokens) over the requests estimated so
        far, or None before the first one: how many fit in a server's KV cache at their longest."""
        if not self._count:
            return None
        return (self._prompt_sum + self._bound_sum) / self._count

    def learn(self, body_bytes: int, max_tokens: Any, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """Correct the factors with the usage one answer reported."""
        if prompt_tokens is not None and prompt_tokens > 0:
            observed = prompt_tokens / max(body_bytes - _BODY_OVERHEAD, 1)
            # The first answers are averaged (the starting guess can be 2x off), then the smoothing takes over.
            self._learned += 1
            weight = max(_SMOOTHING, 1.0 / self._learned)
            self.tokens_per_byte += weight * (observed - self.tokens_per_byte)
        if completion_tokens is not None and completion_tokens >= 0:
            mean = self.mean_answer
            self.mean_answer = completion_tokens if mean is None else mean + _SMOOTHING * (completion_tokens - mean)
            if type(max_tokens) is int and max_tokens > 0:
                self.answer_share += _SMOOTHING * (min(completion_tokens / max_tokens, 1.0) - self.answer_share)
            else:
                self.answer_tokens += _SMOOTHING * (completion_tokens - self.answer_tokens)


def usage_tokens(value: Any) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens of an answer as a reader made it: the run's columns (a dict with
    a `usage` dict) or a `ChatCompletionResponse` (a `usage` attribute); (None, None) when unknown."""
    usage = value.get("usage") if type(value) is dict else getattr(value, "usage", None)
    if usage is None:
        return None, None
    if type(usage) is dict:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    else:
        prompt, completion = getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None)
    return (prompt if type(prompt) is int else None), (completion if type(completion) is int else None)

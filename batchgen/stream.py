"""`Stream`: an async iterator over the chunks of one streamed chat completion.

After the last chunk, `stream.response` holds the assembled `ChatCompletionResponse`.
A stream that ends without `[DONE]` raises `IncompleteResponseError`; an error event inside
the 200 stream raises the matching `APIStatusError`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from types import TracebackType

import aiohttp
import orjson

from batchgen.errors import IncompleteResponseError
from batchgen.parsing import error_from_event, parse_chunk
from batchgen.sse import DONE, SSEDecoder, StreamAssembler
from batchgen.transport import map_aiohttp_errors
from batchgen.types import ChatCompletionChunk, ChatCompletionResponse

__all__ = ["Stream"]


class Stream:
    """Iterate with `async for chunk in stream`; then read `stream.response`.

    Example:
        stream = await client.chat.completions.create(model="m", messages=msgs, stream=True)
        async for chunk in stream:
            print(chunk.content or "", end="")
        print(stream.response.usage)
    """

    def __init__(self, http_response: aiohttp.ClientResponse, *, attempts: int = 1, started: float) -> None:
        self._http = http_response
        self._started = started
        self.attempts = attempts
        self.ttft_s: float | None = None
        self.response: ChatCompletionResponse | None = None
        self.request_id: str | None = http_response.headers.get("x-request-id")

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ChatCompletionChunk]:
        decoder = SSEDecoder()
        assembler = StreamAssembler()
        try:
            with map_aiohttp_errors():
                async for data in self._http.content.iter_any():
                    for payload in decoder.feed(data):
                        if payload == DONE:
                            self._finish(assembler)
                            return
                        chunk = self._decode(payload)
                        if self.ttft_s is None and chunk.has_text:
                            self.ttft_s = time.perf_counter() - self._started
                        assembler.add(chunk)
                        yield chunk
                for payload in decoder.flush():
                    if payload == DONE:
                        self._finish(assembler)
                        return
            raise IncompleteResponseError("stream ended before [DONE]")
        finally:
            self._http.release()

    @staticmethod
    def _decode(payload: bytes) -> ChatCompletionChunk:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise IncompleteResponseError(f"stream event is not valid JSON ({exc}): {payload[:200]!r}") from exc
        if isinstance(data, dict) and "error" in data:
            raise error_from_event(data)
        return parse_chunk(data)

    def _finish(self, assembler: StreamAssembler) -> None:
        response = assembler.response()
        if not response.choices:
            raise IncompleteResponseError("stream ended with [DONE] but carried no choices")
        response.attempts = self.attempts
        response.ttft_s = self.ttft_s
        response.latency_s = time.perf_counter() - self._started
        self.response = response

    async def aclose(self) -> None:
        """Stop reading and release the connection (safe to call twice)."""
        self._http.close()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

"""`Stream`: an async iterator over the chunks of one streamed chat completion.

After the last chunk, `stream.response` is the assembled `ChatCompletionResponse` (built on first
access, so a caller that only times chunks never pays for it). A stream that ends without
`[DONE]` raises `IncompleteResponseError`; an error event inside the 200 stream raises the
matching `APIStatusError`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import TracebackType
from typing import Any

import aiohttp
import orjson

from batchgen.chunks import ChatCompletionChunk, has_text
from batchgen.errors import APIError, IncompleteResponseError, ResponseTooLargeError
from batchgen.parsing import bad_type, error_from_event
from batchgen.sse import DONE, SSEDecoder, StreamAssembler
from batchgen.transport import AIOHTTP_ERRORS, translate_error
from batchgen.types import ChatCompletionResponse

__all__ = ["Stream"]

_EVENTS_PER_STEP = 32


def _decode_one(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise IncompleteResponseError(f"stream event is not valid JSON ({exc}): {payload[:200]!r}") from exc


def decode_events(payloads: list[bytes]) -> list[dict[str, Any]]:
    """Decode the events of one read; raise on an error event or anything that is not an object.

    Several events are decoded with one orjson call (as one JSON array), which halves the
    per-call overhead; a count mismatch or a bad event falls back to one call per event so the
    error names the bad payload.
    """
    objects: Any = None
    if len(payloads) > 1:
        try:
            objects = orjson.loads(b"[" + b",".join(payloads) + b"]")
        except orjson.JSONDecodeError:
            objects = None
        if objects is not None and len(objects) != len(payloads):
            objects = None
    if objects is None:
        objects = [_decode_one(p) for p in payloads]
    for obj in objects:
        if type(obj) is not dict:
            raise bad_type("a stream event", obj, "a JSON object")
        if "error" in obj:
            raise error_from_event(obj)
    return objects  # type: ignore[no-any-return]


class Stream:
    """Iterate with `async for chunk in stream`; then read `stream.response`.

    Example:
        stream = await client.chat.completions.create(model="m", messages=msgs, stream=True)
        async for chunk in stream:
            print(chunk.content or "", end="")
        print(stream.response.usage)
    """

    def __init__(
        self,
        http_response: aiohttp.ClientResponse,
        *,
        attempts: int = 1,
        started: float,
        max_bytes: int | None = None,
        scrub: Callable[[APIError], APIError] | None = None,
    ) -> None:
        self._http = http_response
        self._max_bytes = max_bytes
        self._scrub = scrub
        self._started = started
        # The events' raw JSON, decoded again only if `response` is read: bytes are not tracked by
        # the garbage collector, decoded dicts are (kept, they made every collection slower).
        self._payloads: list[bytes] = []
        self._done = False
        self._response: ChatCompletionResponse | None = None
        self.attempts = attempts
        self.ttft_s: float | None = None
        self.written_at: float | None = None  # perf_counter() of the request's write (`Client.time_writes`)
        self.latency_s: float | None = None
        self.request_id: str | None = http_response.headers.get("x-request-id")
        self.endpoint: str | None = None  # the server's base URL, when a `ClientPool` opened it
        # Called once when the stream ends (its error, or None): how a `ClientPool` frees the slot.
        self.on_end: Callable[[APIError | None], None] | None = None

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ChatCompletionChunk]:
        reads = self.reads()
        try:
            async for _, events in reads:
                for raw in events:
                    yield ChatCompletionChunk(raw)
        finally:
            await reads.aclose()  # a consumer that stops early releases the connection now

    async def reads(self) -> AsyncGenerator[tuple[float, list[dict[str, Any]]], None]:
        """The decoded events of each network read, with the time it arrived: one step per read
        (a read of many events comes in steps of 32).

        The fast way to consume a stream when chunk objects are not needed (`batchgen bench`,
        `run --stream`): events of one read arrived together, and `chunks.has_text(event)` /
        `chunks.event_usage(event)` answer what a timing loop asks. Iterating the stream itself
        (`async for chunk in stream`) gives the same events as `ChatCompletionChunk`s.
        """
        decoder = SSEDecoder()
        keep = self._payloads.extend
        limit, size = self._max_bytes, 0
        failure: APIError | None = None
        try:
            async for data in self._http.content.iter_any():
                now = time.perf_counter()
                if limit is not None:
                    size += len(data)
                    if size > limit:
                        raise ResponseTooLargeError(f"streamed response is over the {limit}-byte limit")
                payloads = decoder.feed(data)
                if not payloads:
                    continue
                done = DONE in payloads
                if done:
                    payloads = payloads[: payloads.index(DONE)]
                keep(payloads)
                # Small steps: decoded events that are still alive when the collector runs are
                # promoted and traversed again; a whole 500-event read cost 1.5x the CPU.
                for start in range(0, len(payloads), _EVENTS_PER_STEP):
                    events = decode_events(payloads[start : start + _EVENTS_PER_STEP])
                    if self.ttft_s is None and any(map(has_text, events)):
                        self.ttft_s = now - self._started
                    yield now, events
                if done:
                    self._finish()
                    return
            tail = decoder.flush()  # a last event the server did not end with a blank line
            if tail == [DONE]:
                self._finish()
                return
            if not self._payloads and not tail:
                # llama.cpp answers a prompt over its context this way: 200, then nothing at all.
                raise IncompleteResponseError(
                    "stream ended before [DONE] with no event at all (a server may do this when it rejects the "
                    "request after accepting the stream, e.g. llama.cpp for a prompt over its context)"
                )
            raise IncompleteResponseError("stream ended before [DONE]")
        except APIError as exc:
            if self._scrub is not None:
                self._scrub(exc)  # rewrites the message in place
            failure = exc
            raise
        except AIOHTTP_ERRORS as exc:  # a plain except, not a context manager: cheaper per stream
            failure = translate_error(exc)
            if self._scrub is not None:
                self._scrub(failure)
            raise failure from exc
        finally:
            self._http.release()
            self._end(failure)

    def _end(self, failure: APIError | None) -> None:
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(failure)

    def _finish(self) -> None:
        self._done = True
        self.latency_s = time.perf_counter() - self._started

    @property
    def response(self) -> ChatCompletionResponse | None:
        """The whole answer once the stream has ended with [DONE]; None before that."""
        if not self._done:
            return None
        if self._response is None:
            assembler = StreamAssembler()
            for raw in decode_events(self._payloads):
                assembler.add(ChatCompletionChunk(raw))
            self._response = self._assembled(assembler)
        return self._response

    async def read_response(self) -> ChatCompletionResponse:
        """Read the stream to the end and return the answer, assembled as the events come (each
        decoded once): what `Client.complete` does with a streamed body."""
        assembler = StreamAssembler()
        async for _, events in self.reads():
            for raw in events:
                assembler.add(ChatCompletionChunk(raw))
        self._response = self._assembled(assembler)
        return self._response

    def _assembled(self, assembler: StreamAssembler) -> ChatCompletionResponse:
        response = assembler.response()
        if not response.choices:
            raise IncompleteResponseError("stream ended with [DONE] but carried no choices")
        response.attempts = self.attempts
        response.ttft_s = self.ttft_s
        response.latency_s = self.latency_s
        return response

    async def aclose(self) -> None:
        """Stop reading and release the connection (safe to call twice)."""
        self._http.close()
        self._end(None)

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

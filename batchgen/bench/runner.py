"""Load generation on one event loop: send requests on schedule and time every chunk of every stream.

Two load shapes, as in vLLM's `bench serve`: a closed loop (`concurrency` workers, each sending
its next request when the last one ends) and an open loop (arrivals at `request_rate` with gamma
gaps of shape `burstiness`, optionally capped by `max_concurrency`). While the measured phase
runs, a ticker task records event-loop lag and the process's CPU time is read at both ends, so the
report can tell when the client, not the server, set the pace. A request never raises: its
failure becomes a `RequestRecord` with `error` set (retries are off, vLLM-style). With several
base URLs a `ClientPool` chooses the server of each request, and each record names it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchgen._constants import MOCK_URL
from batchgen.bench.metrics import ClientLoad, RequestRecord
from batchgen.chunks import event_usage, has_text
from batchgen.client import Client, Sender
from batchgen.client_pool import ClientPool
from batchgen.servers import discover_model
from batchgen.errors import APIError, ConfigError

__all__ = ["LoadSpec", "ServerSpec", "ShardResult", "arrival_offsets", "run_shard", "server_model"]

TICK_S = 0.005  # event-loop lag probe period: fine enough to see a 10 ms stall, cheap at 200 wakeups/s
_UNCAPPED = 1 << 30  # a pool's "no limit" (it needs a number where aiohttp takes 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSpec:
    """Where to send: base URLs (several = one load spread over them), key (never printed), the
    user's own headers and the per-request timeout in seconds. `ServerSpec.of(url)` for one server."""

    base_urls: tuple[str, ...]
    api_key: str | None = None
    timeout: float = 600.0
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.base_urls:
            raise ConfigError("give at least one base URL")
        twice = sorted({u for u in self.base_urls if u != MOCK_URL and self.base_urls.count(u) > 1})
        if twice:
            raise ConfigError(f"a base URL is given twice: {', '.join(twice)}")

    @classmethod
    def of(cls, base_url: str, **options: Any) -> ServerSpec:
        """One server, e.g. `ServerSpec.of("http://localhost:8000/v1", api_key=key)`."""
        return cls(base_urls=(base_url,), **options)

    @property
    def base_url(self) -> str:
        """The first server: the one asked for the model."""
        return self.base_urls[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSpec:
    """One load level for one client process.

    Args:
        concurrency: closed loop with this many requests in flight; None = open loop.
        request_rate: open loop arrivals per second; inf sends every request at once.
        burstiness: gamma shape of the gaps (1 = Poisson; lower = burstier; inf = even gaps).
        max_concurrency: open loop cap on requests in flight; None = no cap.
        num_prompts: requests to measure; None with `duration_s` = as many as fit.
        duration_s: stop starting requests after this long (those in flight finish).
        warmup: requests sent (and not counted) before the measured phase.
        seed: seeds the arrival times.
    """

    concurrency: int | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_prompts: int | None = 1000
    duration_s: float | None = None
    warmup: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.request_rate > 0:
            raise ConfigError(f"request rate must be > 0 (or inf), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ConfigError(f"burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"max concurrency must be >= 1, got {self.max_concurrency}")
        if self.num_prompts is None and self.duration_s is None:
            raise ConfigError("give a number of prompts or a duration")
        if self.num_prompts is not None and self.num_prompts < 0:
            raise ConfigError(f"number of prompts must be >= 0, got {self.num_prompts}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ConfigError(f"duration must be > 0 seconds, got {self.duration_s}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        unbounded = self.concurrency is None and self.max_concurrency is None and math.isinf(self.request_rate)
        if self.num_prompts is None and unbounded:
            raise ConfigError(
                "a duration without a number of prompts needs --concurrency, --max-concurrency or a finite "
                "--request-rate: an unlimited rate would start requests without bound"
            )

    @property
    def in_flight_limit(self) -> int:
        """Connections the pool needs; 0 = unlimited (aiohttp's meaning)."""
        return self.concurrency or self.max_concurrency or 0


@dataclass(frozen=True, slots=True)
class ShardResult:
    """One client process's measured phase; record times are relative to `start_wall` (time.time())."""

    process: int
    start_wall: float
    records: tuple[RequestRecord, ...]
    load: ClientLoad


def arrival_offsets(load: LoadSpec, count: int | None) -> Iterator[float]:
    """Scheduled send times (seconds from the phase start) of an open loop, as vLLM draws them.

    With a fixed count the gaps are rescaled so the last arrival falls at count / rate, as vLLM
    does, which keeps throughput stable across seeds. Without a count (a duration run) the
    stream is endless; the caller stops at the deadline.
    """
    if math.isinf(load.request_rate):
        yield from itertools.repeat(0.0, *(() if count is None else (count,)))
        return
    rng = random.Random(load.seed)

    def gap() -> float:
        if math.isinf(load.burstiness):
            return 1.0 / load.request_rate
        return rng.gammavariate(load.burstiness, 1.0 / (load.request_rate * load.burstiness))

    if count is None:
        t = 0.0
        while True:
            t += gap()
            yield t
    times = []
    t = 0.0
    for _ in range(count):
        t += gap()
        times.append(t)
    scale = (count / load.request_rate) / times[-1] if times and times[-1] > 0 else 1.0
    yield from (x * scale for x in times)


async def server_model(server: ServerSpec) -> str:
    """The first model the first server lists (GET /v1/models), as vLLM's bench does without --model.

    The other servers are not asked: a request to one without the model is an error record of its own.
    """
    async with Client(server.base_url, server.api_key, timeout=min(server.timeout, 60.0), max_retries=2,
                      headers=server.headers) as client:  # fmt: skip
        return await discover_model(client, None)


class _Shard:
    """One process's share of a level: its client (or pool), its request numbers and its records.

    `url` names the server of every record when there is one; a pool names it per stream instead.
    """

    def __init__(
        self, client: Sender, url: str | None, bodies: Sequence[dict[str, Any]], process: int, processes: int
    ) -> None:
        self.client, self.url, self.bodies, self.process, self.processes = client, url, bodies, process, processes
        self.records: list[RequestRecord] = []
        self.origin = time.perf_counter()
        self.start_wall = time.time()
        self.deadline = math.inf
        self.remaining: int | float = 0
        self.taken = 0

    def take(self) -> int | None:
        """The next request's global number, or None when the phase has sent enough."""
        if self.remaining <= 0 or time.perf_counter() >= self.deadline:
            return None
        self.remaining -= 1
        self.taken += 1
        # Interleaved numbering keeps numbers unique across processes and spreads the bodies.
        return (self.taken - 1) * self.processes + self.process

    async def send(self, index: int, scheduled: float, queued: float = 0.0) -> RequestRecord:
        """Send one request and time it; every failure is caught and recorded."""
        body = self.bodies[index % len(self.bodies)]
        times: list[float] = []
        tokens: list[int] | None = []
        usage = None
        error = error_type = None
        counted = 0
        endpoint = self.url
        sent = time.perf_counter()
        try:
            stream = await self.client.open_stream(body)
            endpoint = stream.endpoint or endpoint
            # Per network read, not per chunk: the chunks of one read arrived at the same time.
            async for now, events in stream.reads():
                for event in events:
                    # Most events carry no usage: test that inline, not by a call per event.
                    chunk_usage = None if event.get("usage") is None else event_usage(event)
                    if chunk_usage is not None:
                        usage = chunk_usage
                    if has_text(event):
                        times.append(now - sent)
                        running = chunk_usage.completion_tokens if chunk_usage is not None else None
                        if tokens is not None and running is not None:
                            # Continuous usage is cumulative: this chunk brought the tokens counted since the last.
                            tokens.append(running - counted)
                            counted = running
                        else:
                            tokens = None  # a chunk without usage: per-chunk counts are unknown for this request
            if not times:
                error, error_type = "the stream carried no generated text", "empty_stream"
        except APIError as exc:
            error, error_type = str(exc), exc.error_type
            endpoint = exc.endpoint or endpoint  # a pool names the server that failed before the stream opened
        except Exception as exc:  # a client-side bug must cost one request, not the whole benchmark
            error, error_type = f"{type(exc).__name__}: {exc}", "client_error"
        end = time.perf_counter()
        record = RequestRecord(
            index=index,
            process=self.process,
            scheduled_s=scheduled,
            queue_s=queued,
            sent_s=sent - self.origin,
            end_s=end - self.origin,
            ttft_s=times[0] if times else None,
            e2el_s=times[-1] if times else None,
            chunk_times_s=tuple(times),
            chunk_tokens=tuple(tokens) if tokens is not None and times else None,
            prompt_tokens=usage.prompt_tokens if usage is not None else None,
            output_tokens=usage.completion_tokens if usage is not None else None,
            error=error,
            error_type=error_type,
            endpoint=endpoint,
        )
        self.records.append(record)
        return record

    async def closed_loop(self, concurrency: int) -> None:
        async def worker() -> None:
            free_at = time.perf_counter() - self.origin
            while (index := self.take()) is not None:
                free_at = (await self.send(index, free_at)).end_s

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def open_loop(self, offsets: Iterator[float], cap: int | None) -> None:
        gate = asyncio.Semaphore(cap) if cap else None
        tasks: set[asyncio.Task[RequestRecord]] = set()

        async def arrive(index: int, scheduled: float) -> RequestRecord:
            if gate is None:
                return await self.send(index, scheduled)
            waiting = time.perf_counter()
            async with gate:
                return await self.send(index, scheduled, time.perf_counter() - waiting)

        for offset in offsets:
            delay = self.origin + offset - time.perf_counter()
            if self.origin + offset >= self.deadline:
                break
            if delay > 0:
                await asyncio.sleep(delay)
            index = self.take()
            if index is None:
                break
            task = asyncio.create_task(arrive(index, offset))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)

    async def phase(self, load: LoadSpec, count: int | None, duration_s: float | None) -> None:
        """Run one phase (warmup or measured) from a fresh origin."""
        self.records = []
        self.origin, self.start_wall = time.perf_counter(), time.time()
        self.deadline = self.origin + duration_s if duration_s is not None else math.inf
        self.remaining = count if count is not None else math.inf
        self.taken = 0
        if load.concurrency is not None:
            await self.closed_loop(load.concurrency)
        elif count is None and math.isinf(load.request_rate) and load.max_concurrency:
            # Endless arrivals at t=0 behind a cap are a closed loop at the cap (and must not queue unboundedly).
            await self.closed_loop(load.max_concurrency)
        else:
            await self.open_loop(arrival_offsets(load, count), load.max_concurrency)


async def _tick(lags: list[float]) -> None:
    while True:
        before = time.perf_counter()
        await asyncio.sleep(TICK_S)
        lags.append(max(0.0, time.perf_counter() - before - TICK_S))


def _sender(server: ServerSpec, load: LoadSpec) -> Client | ClientPool:
    """One server: a plain `Client`, as fast as before. Several: a `ClientPool` that picks the server
    of each request (the one with room and the least token work outstanding)."""
    if len(server.base_urls) == 1:
        return Client(server.base_url, server.api_key, timeout=server.timeout, max_retries=0,
                      max_connections=load.in_flight_limit, headers=server.headers)  # fmt: skip
    # The bench's own loop sets the load (its concurrency, arrivals and cap); the pool only chooses
    # where each request goes. So every server may hold the level's whole in-flight limit: a smaller
    # share would make requests wait inside the pool for a slot, and that wait would be timed as the
    # server's TTFT. The pool still waits when no server can take one: all ejected after failures in
    # a row, or limits lowered by 429s, which is the servers' doing and shows in their figures.
    return ClientPool(server.base_urls, server.api_key, concurrency=load.in_flight_limit or _UNCAPPED,
                      timeout=server.timeout, max_retries=0, headers=server.headers)  # fmt: skip


async def run_shard(
    server: ServerSpec,
    bodies: Sequence[dict[str, Any]],
    load: LoadSpec,
    *,
    process: int = 0,
    processes: int = 1,
    ready: Callable[[], Awaitable[None]] | None = None,
) -> ShardResult:
    """Run the warmup, then the measured phase, of one client process's share of a load level.

    Args:
        ready: awaited between warmup and the measured phase (client processes start together).
    """
    if not bodies:
        raise ConfigError("no request bodies to send")
    client = _sender(server, load)
    async with client:
        url = server.base_url if len(server.base_urls) == 1 else None
        shard = _Shard(client, url, bodies, process, processes)
        if load.warmup:
            # Warmup is a closed loop at the level's concurrency (all at once when nothing caps it).
            width = load.concurrency or load.max_concurrency or load.warmup
            await shard.phase(LoadSpec(concurrency=width, num_prompts=load.warmup), load.warmup, None)
        if ready is not None:
            await ready()
        lags: list[float] = []
        ticker = asyncio.create_task(_tick(lags))
        cpu0 = time.process_time()
        try:
            await shard.phase(load, load.num_prompts, load.duration_s)
        finally:
            ticker.cancel()
        wall = time.perf_counter() - shard.origin
        cpu = time.process_time() - cpu0
    return ShardResult(process, shard.start_wall, tuple(shard.records), ClientLoad(process, tuple(lags), cpu, wall))

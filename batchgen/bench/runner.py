"""Load generation on one event loop: send requests on schedule and time every chunk of every stream.

Two load shapes, as in vLLM's `bench serve`: a closed loop (`concurrency` workers, each sending
its next request when the last one ends) and an open loop (arrivals at `request_rate` with gamma
gaps of shape `burstiness`, optionally capped by `max_concurrency`); and concurrency auto, a
closed loop whose width a `ConcurrencyController` steers from the server's load (`_Shard.auto_loop`).
While the measured phase runs, a `ReadCanary` samples how late the loop reads what has arrived, and
the process's CPU time is read at both ends, so the report can tell when the client, not the
server, set the pace (and by how much it moved the latencies). A request never raises: its
failure becomes a `RequestRecord` with `error` set (retries are off, vLLM-style). With several
base URLs a `ClientPool` chooses the server of each request, and each record names it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchgen._constants import MOCK_URL
from batchgen.autoscale import AutoConcurrency
from batchgen.bench.canary import ReadCanary
from batchgen.bench.metrics import ClientLoad, RequestRecord
from batchgen.bench.saturation import ControllerTrace
from batchgen.chunks import event_usage, has_text
from batchgen.client import Client, Sender
from batchgen.client_pool import ClientPool
from batchgen.endpoints import Endpoint, EndpointState
from batchgen.servers import discover_model
from batchgen.errors import APIError, ConfigError

__all__ = ["LoadSpec", "ServerSpec", "ShardResult", "arrival_offsets", "run_shard", "server_model"]

_UNCAPPED = 1 << 30  # a pool's "no limit" (it needs a number where aiohttp takes 0)
_POLL_S = 0.05  # concurrency auto: how often parked workers are let go when a limit rose (at most)
_POOL_WAIT_S = 0.0005  # a wait inside the pool longer than this is moved out of the latencies


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
        concurrency: closed loop with this many requests in flight; None = open loop (or `auto`).
        auto: concurrency auto: a closed loop of `auto.max` workers, of which as many send as the
            limit a `ConcurrencyController` sets from the server's load (`auto.interval` apart);
            None = a fixed load.
        request_rate: open loop arrivals per second; inf sends every request at once.
        burstiness: gamma shape of the gaps (1 = Poisson; lower = burstier; inf = even gaps).
        max_concurrency: open loop cap on requests in flight; None = no cap.
        num_prompts: requests to measure; None with `duration_s` = as many as fit.
        duration_s: stop starting requests after this long (those in flight finish).
        warmup: requests sent (and not counted) before the measured phase.
        seed: seeds the arrival times.
    """

    concurrency: int | None = None
    auto: AutoConcurrency | None = None
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
        if self.auto is not None and (
            self.concurrency is not None or self.max_concurrency is not None or not math.isinf(self.request_rate)
        ):
            raise ConfigError("concurrency auto is a closed loop of its own: no fixed concurrency, request rate or "
                              "max concurrency with it")  # fmt: skip
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
        unbounded = (self.concurrency is None and self.auto is None and self.max_concurrency is None
                     and math.isinf(self.request_rate))  # fmt: skip
        if self.num_prompts is None and unbounded:
            raise ConfigError(
                "a duration without a number of prompts needs --concurrency, --max-concurrency or a finite "
                "--request-rate: an unlimited rate would start requests without bound"
            )

    @property
    def in_flight_limit(self) -> int:
        """Connections the pool needs; 0 = unlimited (aiohttp's meaning)."""
        return self.concurrency or (self.auto.max if self.auto is not None else 0) or self.max_concurrency or 0


@dataclass(frozen=True, slots=True)
class ShardResult:
    """One client process's measured phase; record times are relative to `start_wall` (time.time())."""

    process: int
    start_wall: float
    records: tuple[RequestRecord, ...]
    load: ClientLoad
    traces: tuple[ControllerTrace, ...] = ()  # concurrency auto: one per server


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
        self.origin_mono = time.monotonic()  # the controllers' clock
        self.start_wall = time.time()
        self.deadline = math.inf
        self.stopped_mono = math.inf  # when the phase stopped starting requests
        self.remaining: int | float = 0
        self.taken = 0
        # Concurrency auto: the pool's servers by URL, whose controllers are fed the TTFTs (below).
        self.auto: dict[str, Endpoint] = {}
        if isinstance(client, ClientPool):
            self.auto = {e.url: e for e in client.endpoints if e.auto}

    def exhausted(self) -> bool:
        """True once the phase has sent enough (a count or the deadline; it stays true)."""
        now = time.perf_counter()
        if self.remaining <= 0 or now >= self.deadline:
            if self.stopped_mono == math.inf:
                self.stopped_mono = time.monotonic() - max(0.0, now - self.deadline)  # the deadline, if that
            return True
        return False

    def take(self) -> int | None:
        """The next request's global number, or None when the phase has sent enough."""
        if self.exhausted():
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
        written = None
        sent = time.perf_counter()
        try:
            stream = await self.client.open_stream(body)
            endpoint = stream.endpoint or endpoint
            written = stream.written_at
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
            elif self.auto and stream.ttft_s is not None:
                # The stream's TTFT runs from its own POST, after the pool gave it a slot; ours from
                # before `open_stream`. `auto_loop` only sends when a slot is free, so the two differ
                # by microseconds; should the pool still have made it wait, that wait is queueing,
                # not the server's TTFT: move it from the latencies to `queued`.
                waited = times[0] - stream.ttft_s
                if waited > _POOL_WAIT_S:
                    sent, queued = sent + waited, queued + waited
                    times = [t - waited for t in times]
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
            write_s=None if written is None else max(0.0, written - sent),
        )
        self.records.append(record)
        return record

    async def closed_loop(self, concurrency: int) -> None:
        async def worker() -> None:
            free_at = time.perf_counter() - self.origin
            while (index := self.take()) is not None:
                free_at = (await self.send(index, free_at)).end_s

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def auto_loop(self, settings: AutoConcurrency) -> None:
        """A closed loop whose width the pool's controllers steer: `settings.max` workers (the most
        any limit can reach), each sending only while a server has room under its limit.

        The others park here, not inside the pool, for two reasons. Their wait must not be timed
        as the server's TTFT: `send` starts its clock only when a worker goes, and the pool's
        choice of a server (`_pick`) then runs in the same step, with no await before it, so it
        finds the slot free. And a worker parked in the pool would hold a request already taken,
        sent after the deadline: with a limit of 64 and 512 workers, seven rounds of them would
        drain after `--duration`. The level's width is the limit, not the workers: a parked worker
        is one the limit does not use yet, so its next request is due (`scheduled_s`) when it is
        let go, and its wait is neither queueing nor lag. A parked worker costs a future; it is let
        go when a slot frees (a finished request frees it for its own worker, at once) or, every
        `_POLL_S`, when a limit rose (one per new slot, not all at once).
        """
        pool = self.client
        if not isinstance(pool, ClientPool):
            raise ConfigError("concurrency auto needs a ClientPool")
        endpoints = pool.endpoints
        parked: deque[asyncio.Future[None]] = deque()
        loop = asyncio.get_running_loop()

        def room() -> bool:
            # The pool's own test (`_pick`); once it is lost, requests go and fail at once.
            return pool.lost is not None or any(e.has_room() for e in endpoints)

        def free_slots() -> int:
            free = 0
            for e in endpoints:
                if e.state is EndpointState.HEALTHY:
                    free += max(0, math.ceil(e.limit) - e.in_flight)
                elif e.state is EndpointState.PROBING and e.in_flight == 0:
                    free += 1
            return free if pool.lost is None else len(parked)

        def release(count: int) -> None:
            while count > 0 and parked:
                future = parked.popleft()
                if not future.done():
                    future.set_result(None)
                    count -= 1

        async def pump() -> None:
            while not self.exhausted():
                await asyncio.sleep(min(_POLL_S, settings.interval / 10))
                release(free_slots())
            release(len(parked))  # the phase is over: the parked workers go home

        async def worker() -> None:
            free_at = time.perf_counter() - self.origin
            while not self.exhausted():
                if not room():
                    future = loop.create_future()
                    parked.append(future)
                    await future
                    free_at = time.perf_counter() - self.origin
                    continue
                index = self.take()
                if index is None:
                    break
                free_at = (await self.send(index, free_at)).end_s

        pumping = asyncio.create_task(pump())
        try:
            await asyncio.gather(*(worker() for _ in range(settings.max)))
        finally:
            pumping.cancel()

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
        self.origin, self.origin_mono, self.start_wall = time.perf_counter(), time.monotonic(), time.time()
        self.deadline = self.origin + duration_s if duration_s is not None else math.inf
        self.stopped_mono = math.inf
        self.remaining = count if count is not None else math.inf
        self.taken = 0
        if load.auto is not None:
            await self.auto_loop(load.auto)
        elif load.concurrency is not None:
            await self.closed_loop(load.concurrency)
        elif count is None and math.isinf(load.request_rate) and load.max_concurrency:
            # Endless arrivals at t=0 behind a cap are a closed loop at the cap (and must not queue unboundedly).
            await self.closed_loop(load.max_concurrency)
        else:
            await self.open_loop(arrival_offsets(load, count), load.max_concurrency)


def _sender(server: ServerSpec, load: LoadSpec) -> Client | ClientPool:
    """One server: a plain `Client`, as fast as before. Several: a `ClientPool` that picks the server
    of each request (the one with room and the least token work outstanding). Concurrency auto: a
    `ClientPool` even for one server, whose controllers set each server's limit."""
    if load.auto is not None:
        return ClientPool(server.base_urls, server.api_key, concurrency=load.auto, timeout=server.timeout,
                          max_retries=0, headers=server.headers)  # fmt: skip
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
    for each in [e.client for e in client.endpoints] if isinstance(client, ClientPool) else [client]:
        each.time_writes = True  # the write's trip through the loop is client-added delay: measure it
    async with client:
        # Concurrency auto: the pool's controllers started just now (their clock, Tick.t, is from here).
        controllers_started = time.monotonic()
        url = server.base_url if len(server.base_urls) == 1 else None
        shard = _Shard(client, url, bodies, process, processes)
        if load.warmup:
            if load.auto is not None:
                # Through the same controllers: a warmup lets them converge before the measurement.
                warm = dataclasses.replace(load, num_prompts=load.warmup, duration_s=None, warmup=0)
            else:
                # Warmup is a closed loop at the level's concurrency (all at once when nothing caps it).
                warm = LoadSpec(concurrency=load.concurrency or load.max_concurrency or load.warmup,
                                num_prompts=load.warmup)  # fmt: skip
            await shard.phase(warm, load.warmup, None)
        if ready is not None:
            await ready()
        async with ReadCanary(seed=process) as canary:
            cpu0 = time.process_time()
            await shard.phase(load, load.num_prompts, load.duration_s)
            wall = time.perf_counter() - shard.origin
            cpu = time.process_time() - cpu0
    traces = _traces(client, load, shard, process, controllers_started)
    load_seen = ClientLoad(process, tuple(canary.delays_s), cpu, wall, tuple(t - shard.origin for t in canary.read_at))
    return ShardResult(process, shard.start_wall, tuple(shard.records), load_seen,
                       traces)  # fmt: skip


def _traces(
    client: Client | ClientPool, load: LoadSpec, shard: _Shard, process: int, started: float
) -> tuple[ControllerTrace, ...]:
    """Concurrency auto: each server's controller timeline, with the measured phase marked on its clock."""
    if load.auto is None or not isinstance(client, ClientPool):
        return ()
    measured_from = shard.origin_mono - started
    stopped = shard.stopped_mono if shard.stopped_mono != math.inf else time.monotonic()
    return tuple(
        ControllerTrace(process=process, endpoint=e.url, interval_s=load.auto.interval, measured_from_s=measured_from,
                        sending_until_s=stopped - started, shift_s=0.0, metrics=e.controller.metrics,
                        ticks=tuple(e.controller.timeline))  # fmt: skip
        for e in client.endpoints
        if e.controller is not None
    )

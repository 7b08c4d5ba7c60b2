"""`--concurrency auto`: one `ConcurrencyController` per server steers how many requests it holds.

Too few requests in flight leave the GPU idle; too many fill vLLM's queue, and past its KV cache it
preempts running requests (recomputing them) while time to first token soars. vLLM queues instead
of answering 429, so a client that only backs off on errors never backs off from it. The controller
reads the server's own load every `interval` seconds (`server_metrics`: running, waiting for
capacity, KV usage, preemptions, tokens generated) and moves the server's limit (`Endpoint.limit`,
the one number dispatch reads), in this order of precedence:

1. The server pushes back: 429 or 503 → ×0.5; timeouts → ×0.7 (Retry-After is honoured by the
   retries themselves).
2. Preemptions rose → ×0.75 of what ran (the limit, or fewer running when the KV cache is what
   filled), and that becomes a ceiling not to grow back to for `CEILING_S` (growing back would
   preempt again). While more requests are in flight than the limit, a cut is still draining:
   preemptions then hold instead of cutting again.
3. The waiting queue is longer than it needs to be (more than 2·q + 2, q = max(2, 5% of running)
   plus the turnover: running / mean answer tokens, the requests that replace finished ones and
   wait up to one engine step to be admitted)
   while the batch is full (running ≥ 90% of the most it ran lately), or for a second tick
   → × (running + q) / (running + waiting), at least ×0.5. Multiplicative, so two clients on one
   server shrink by the same factor and keep a fair share. (A server admits once per step: when a
   whole batch ends together, a scrape sees a queue beside a half-empty batch for a moment.)
4. A small positive queue beyond the turnover (1 … 2·q + 2) → hold: freed slots refill at once,
   and TTFT does not grow.
5. The queue is empty and our slots are full → grow: ×2 in the slow start (while tokens/s rises),
   else by √limit.
6. Never grow while batchgen itself is the limit: fewer requests in flight than 90% of the limit
   (the input or the writer is slower), or its event loop is CPU-bound: the thread that runs it
   (and takes the ticks) used ≥ 0.9 CPU seconds per second. That thread's CPU, not the process's:
   the process also runs helper threads beside the loop (the writer's and the reader's, Arrow's
   pool, Ray's in an actor, the mock server's with `--base-url mock`), and their CPU on other cores
   does not make dispatch the bottleneck; the process's would hold the limit at the start for a
   whole `--base-url mock` run. A helper that holds the GIL shows as less CPU on the loop's thread
   instead, and when it slows dispatch, fewer requests are in flight: the first half of the rule.

The start: when the server states its KV size (`vllm:cache_config_info`), the first tick jumps to
`kv tokens / (mean prompt tokens + max_tokens)` (as many requests as fit in the cache at their
longest); else a slow start from `start`.

Without `/metrics` (a hosted API, a proxy, llama.cpp): rules 1, 5 and 6, plus a TTFT gradient for
streamed requests: when the mean TTFT of the last tick is above 1.5 × its floor + 50 ms, the limit
shrinks by that ratio (queueing shows in TTFT; end-to-end latency would mostly measure answer length
and is never used).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchgen.errors import ConfigError
from batchgen.server_metrics import ServerLoad, metrics_url, parse_metrics

if TYPE_CHECKING:
    from batchgen.endpoints import Endpoint

__all__ = ["AutoConcurrency", "ConcurrencyController", "Tick", "spread"]

CEILING_S = 60.0  # how long a limit that preempted stays a ceiling (the server's capacity may change)
_FULL = 0.9  # in flight / limit at or above which our slots count as full
_CPU_BOUND = 0.9  # the event loop's thread's CPU seconds per second at or above which batchgen is its own limit
_PEAK_DECAY = 0.97  # per tick: a server whose capacity halved is believed within ~23 ticks


@dataclass(frozen=True, slots=True, kw_only=True)
class AutoConcurrency:
    """`concurrency: auto` for a server: the bounds of its limit and how often it is steered.

    Example:
        AutoConcurrency(min=4, max=256)
    """

    min: int = 1
    max: int = 512
    start: int = 8
    interval: float = 1.5

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.max:
            raise ConfigError(f"concurrency auto needs 1 <= min <= max, got min {self.min}, max {self.max}")
        if not (math.isfinite(self.interval) and 0 < self.interval):
            raise ConfigError(f"the controller's interval must be > 0 seconds, got {self.interval}")

    def clamp(self, limit: float) -> float:
        return float(min(self.max, max(self.min, limit)))


@dataclass(frozen=True, slots=True)
class Tick:
    """One step of a controller: what it saw and what it did (the timeline in the summary and bench's JSON)."""

    t: float  # seconds since the controller started
    limit: int  # after the decision
    in_flight: int
    running: float | None  # the server's (None without /metrics)
    waiting: float | None
    kv_usage: float | None
    preemptions: float | None  # since the last tick
    tokens_per_s: float | None
    decision: str

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def spread(ticks: Sequence[Tick], most: int) -> list[Tick]:
    """At most about `most` evenly spread ticks of a timeline, the last one always included (for tables)."""
    if not ticks:
        return []
    chosen = list(ticks[:: max(1, math.ceil(len(ticks) / most))])
    if chosen[-1] is not ticks[-1]:
        chosen.append(ticks[-1])
    return chosen


@dataclass(slots=True)
class _Counts:
    """An endpoint's client-side counters at one tick (the controller works on their differences)."""

    at: float
    cpu: float  # CPU seconds of the thread taking the tick, the event loop's (rule 6: not the process's)
    thread: int  # that thread: a difference of `cpu` only means something within one thread
    overloads: int
    timeouts: int
    ttft_sum: float
    ttft_count: int
    readmissions: int

    @classmethod
    def of(cls, endpoint: Endpoint, at: float) -> _Counts:
        return cls(at, time.thread_time(), threading.get_ident(), endpoint.overloads, endpoint.timeouts,
                   endpoint.ttft_sum, endpoint.ttft_count, endpoint.readmissions)  # fmt: skip


class ConcurrencyController:
    """Steers `endpoint.limit` within `settings`' bounds (the rules: the module docstring).

    Args:
        endpoint: the server; its `limit` is set here and only here (its own 429 rule is off).
        settings: min, max, start and the interval.
        request_tokens: the mean tokens one request may hold in the KV cache (prompt + max_tokens),
            or None while unknown; for the start from the KV size.
        answer_tokens: the mean tokens of an answer, or None while unknown; for the queue's turnover.
        on_raise: called when the limit grew (requests waiting for a slot may go now).
        on_event: called with a line of text when the controller falls back (no /metrics).
    """

    def __init__(
        self, endpoint: Endpoint, settings: AutoConcurrency, *, request_tokens: Callable[[], float | None] = lambda: None,
        answer_tokens: Callable[[], float | None] = lambda: None, on_event: Callable[[str], None] | None = None,
        on_raise: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.endpoint = endpoint
        self.settings = settings
        self.timeline: list[Tick] = []
        self.last_decision = "start"
        self.load: ServerLoad | None = None
        self.metrics: bool | None = None  # unknown until the first scrape
        self._request_tokens = request_tokens
        self._answer_tokens = answer_tokens
        self._on_raise = on_raise
        self._on_event = on_event
        self._slow_start = True
        self._ceiling: tuple[float, float] | None = None  # (limit, when)
        self._ttft_floor: float | None = None
        self._peak_running = 0.0  # the most the server has run lately (decays: its capacity may shrink)
        self._queued = False  # the last tick saw a long queue
        self._draining = False  # a preemption cut was made; requests above it are still in flight
        self._previous_tokens_per_s: float | None = None
        self._started = time.monotonic()
        self._counts = _Counts.of(endpoint, self._started)
        endpoint.limit = settings.clamp(settings.start)

    def status(self) -> str:
        """A short line for the progress display: limit, in flight, the server's load, the last decision."""
        endpoint, load = self.endpoint, self.load
        text = f"limit {endpoint.limit:.0f}, {endpoint.in_flight} in flight"
        if load is not None:
            kv = f", kv {load.kv_usage:.0%}" if load.kv_usage is not None else ""
            text += f", server {load.running:.0f} running/{load.waiting:.0f} waiting{kv}"
        return f"{text}; {self.last_decision}"

    async def run(self) -> None:
        """Scrape at once (is there a /metrics? how big is the KV cache?), then decide every interval; until cancelled."""
        self.load = await self._scrape()
        while True:
            await asyncio.sleep(self.settings.interval)
            load = await self._scrape() if self.metrics is not False else None
            self.step(load, time.monotonic())

    async def _scrape(self) -> ServerLoad | None:
        client = self.endpoint.client
        text = await client.get_text(metrics_url(client.base_url))
        load = parse_metrics(text) if text is not None else None
        if self.metrics is None:
            self.metrics = load is not None
            if load is None and self._on_event is not None:
                self._on_event(f"endpoint {self.endpoint.url}: no vLLM /metrics; concurrency auto steers by 429s, "
                               "timeouts and TTFT only")  # fmt: skip
        return load

    def step(self, load: ServerLoad | None, now: float) -> Tick:
        """One decision from the server's `load` (None: unknown) and the client's counters since the last step."""
        endpoint, settings = self.endpoint, self.settings
        counts = _Counts.of(endpoint, now)
        previous, self._counts = self._counts, counts
        if counts.readmissions != previous.readmissions:
            self._slow_start = True  # back from an ejection: its limit starts again from 1
        before, self.load = self.load, load
        wall = max(now - previous.at, 1e-9)
        preempted = None
        tokens_per_s = None
        if load is not None and before is not None:
            if load.preemptions is not None and before.preemptions is not None:
                preempted = max(0.0, load.preemptions - before.preemptions)
            if load.generation_tokens is not None and before.generation_tokens is not None:
                tokens_per_s = max(0.0, load.generation_tokens - before.generation_tokens) / max(load.at - before.at, 1e-9)
        limit = endpoint.limit
        new, decision = self._decide(limit, load, preempted, tokens_per_s, counts, previous, wall, now)
        endpoint.limit = settings.clamp(new)
        if endpoint.limit > limit and self._on_raise is not None:
            self._on_raise()
        self.last_decision = decision
        self._previous_tokens_per_s = tokens_per_s if tokens_per_s is not None else self._previous_tokens_per_s
        tick = Tick(round(now - self._started, 3), round(endpoint.limit), endpoint.in_flight,
                    None if load is None else load.running, None if load is None else load.waiting,
                    None if load is None else load.kv_usage, preempted, tokens_per_s, decision)  # fmt: skip
        self.timeline.append(tick)
        return tick

    def _decide(
        self, limit: float, load: ServerLoad | None, preempted: float | None, tokens_per_s: float | None,
        counts: _Counts, previous: _Counts, wall: float, now: float,
    ) -> tuple[float, str]:  # fmt: skip
        endpoint = self.endpoint
        # 1. The server pushes back.
        overloads, timeouts = counts.overloads - previous.overloads, counts.timeouts - previous.timeouts
        if overloads:
            self._slow_start = False
            return limit * 0.5, f"{overloads} x 429/503: x0.5"
        if timeouts:
            self._slow_start = False
            return limit * 0.7, f"{timeouts} timeouts: x0.7"
        # 2. The KV cache overflowed.
        if preempted:
            self._slow_start = False
            draining, self._draining = self._draining, endpoint.in_flight > math.ceil(limit)
            if draining:
                # The interval after a cut, or while more are in flight than the limit: the requests
                # admitted before the cut preempt, not the limit.
                return limit, f"{preempted:.0f} preemptions: the last cut is still draining"
            # What overflowed the KV cache is the batch that ran, which may be below the limit: it is
            # the ceiling, and the cut is from it.
            running = min(limit, load.running) if load is not None and load.running > 0 else limit
            self._ceiling = (running, now)
            self._draining = True
            return 0.75 * running, f"{preempted:.0f} preemptions at {running:.0f} running: x0.75"
        self._draining = False
        if self._ceiling is not None and now - self._ceiling[1] > CEILING_S:
            self._ceiling = None
        # The start from the KV size, once.
        if load is not None and load.kv_tokens and len(self.timeline) == 0:
            per_request = self._request_tokens()
            if per_request:  # the slow start goes on from there: answers are mostly shorter than max_tokens
                fit = load.kv_tokens / per_request
                return fit, f"start: {load.kv_tokens} KV tokens / {per_request:.0f} per request"
        full = endpoint.in_flight >= _FULL * limit
        # The event loop's own CPU (ticks run on its thread); a tick taken on another thread than the
        # last one (a controller built off the loop) cannot tell, and does not hold.
        cpu_bound = counts.thread == previous.thread and (counts.cpu - previous.cpu) / wall >= _CPU_BOUND
        if load is not None:
            # 3./4. The queue. A server admits waiting requests once per step, so a batch that ends
            # at once shows a queue for a moment while the batch is half empty: that is no
            # congestion unless the batch is (nearly) as full as it gets, or the queue stays.
            peak = self._peak_running = max(load.running, self._peak_running * _PEAK_DECAY)
            # Requests sent to replace finished ones wait up to one step to be admitted: about
            # running / mean answer tokens of them at any time, which is turnover, not congestion.
            answer = self._answer_tokens()
            turnover = load.running / answer if answer else 0.0
            excess = load.waiting - turnover  # the requests that wait because the server is full
            target = max(2.0, 0.05 * load.running)
            long_queue = excess > 2 * target + 2
            queued_before, self._queued = self._queued, long_queue
            if long_queue and (load.running >= _FULL * peak or queued_before):
                self._slow_start = False
                factor = max(0.5, (load.running + target + turnover) / (load.running + load.waiting))
                return limit * factor, f"queue {load.waiting:.0f} > {2 * target + 2 + turnover:.0f}: x{factor:.2f}"
            if long_queue:
                return limit, f"hold: {load.waiting:.0f} waiting while {load.running:.0f} of up to {peak:.0f} run"
            if excess >= 1:
                self._slow_start = False
                return limit, f"queue {load.waiting:.0f}: hold"
        else:
            ttft_count = counts.ttft_count - previous.ttft_count
            if ttft_count:
                ttft = (counts.ttft_sum - previous.ttft_sum) / ttft_count
                floor = self._ttft_floor = ttft if self._ttft_floor is None else min(self._ttft_floor * 1.01, ttft)
                allowed = 1.5 * floor + 0.05
                if ttft > allowed:
                    self._slow_start = False
                    factor = max(0.5, allowed / ttft)
                    return limit * factor, f"TTFT {ttft * 1000:.0f} ms > {allowed * 1000:.0f} ms: x{factor:.2f}"
        # 5./6. Growth, only when our slots are the limit.
        if not full:
            return limit, "hold: batchgen sends fewer than the limit"
        if cpu_bound:
            return limit, "hold: the client is CPU-bound"
        if self._ceiling is not None and limit >= 0.9 * self._ceiling[0]:
            return limit, f"hold: preemptions at {self._ceiling[0]:.0f}"
        cap = 0.9 * self._ceiling[0] if self._ceiling is not None else math.inf
        if self._slow_start:
            previous_rate = self._previous_tokens_per_s
            if tokens_per_s is None or previous_rate is None or tokens_per_s > 1.05 * previous_rate:
                return min(limit * 2, cap), "slow start: x2"
            self._slow_start = False
        return min(limit + math.sqrt(limit), cap), "queue empty, slots full: +sqrt(limit)"

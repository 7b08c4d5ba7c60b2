"""Pure benchmark arithmetic: per-request records in, one `BenchSummary` out (no I/O, no clock).

Definitions (the README states them the same way):

- TTFT: send → first chunk carrying generated text in any channel (content, reasoning, tool-call
  arguments); the role-only first chunk does not count.
- E2EL: send → last text-bearing chunk.
- TPOT: (E2EL - TTFT) / (output tokens - 1), per request with more than one output token.
- ITL: gaps between consecutive text-bearing chunks (vLLM's definition); ITL per token divides each
  gap by the tokens that chunk carried, known only when the server sent per-chunk usage.

Statistics match vLLM's `bench serve` (numpy's linear-interpolation percentiles, population std),
so result files line up; an empty sample gives None, never a made-up 0.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from batchgen.bench.clientdelay import FLAG_ERROR, TARGET_ERROR, ClientDelay, estimate_client_delay
from batchgen.errors import ConfigError
from batchgen.runtime import available_cores

__all__ = [
    "PERCENTILES",
    "BenchSummary",
    "ClientLoad",
    "Distribution",
    "EndpointSummary",
    "RequestRecord",
    "by_endpoint",
    "describe",
    "percentile",
    "summarize",
]

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0, 99.9)
GOODPUT_METRICS = ("ttft", "tpot", "e2el")

# When the client itself is this slow, its latency figures describe the client, not the server.
SEND_LAG_LIMIT_MS = 10.0  # p99 of (actual - scheduled send time)
CPU_LIMIT = 0.9  # fraction of one core used by the busiest client process


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What one request did. Times are seconds; `*_s` offsets are from the phase start of its process.

    Args:
        index: the request's number in the run (unique across client processes).
        process: the client process that sent it.
        scheduled_s: when it should have been sent (open loop: its arrival time; closed loop:
            when its worker became free).
        queue_s: time spent waiting for a `max_concurrency` slot (intended queueing, not lag).
        sent_s: when it was actually sent (just before the POST); the client's own lag is
            `sent_s - scheduled_s - queue_s`.
        end_s: when the stream (or the error) ended.
        ttft_s / e2el_s: from `sent_s`; None when no text-bearing chunk arrived.
        chunk_times_s: arrival of every text-bearing chunk, from `sent_s`.
        chunk_tokens: tokens each of those chunks carried (from continuous usage), or None.
        prompt_tokens / output_tokens: from the server's final usage, or None when it sent none.
        error / error_type: why it failed; None for a success.
        endpoint: the base URL of the server that answered (or failed it); None when it reached none.
        write_s: from `sent_s` to the request's write to the socket (client-added, in the TTFT);
            None when the request was never written or the client did not note it.
    """

    index: int
    process: int
    scheduled_s: float
    queue_s: float
    sent_s: float
    end_s: float
    ttft_s: float | None
    e2el_s: float | None
    chunk_times_s: tuple[float, ...]
    chunk_tokens: tuple[int, ...] | None
    prompt_tokens: int | None
    output_tokens: int | None
    error: str | None = None
    error_type: str | None = None
    endpoint: str | None = None
    write_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def send_lag_s(self) -> float:
        return self.sent_s - self.scheduled_s - self.queue_s

    @property
    def counted_output_tokens(self) -> int:
        """Output tokens from usage; without usage, the number of text-bearing chunks (labelled so)."""
        return self.output_tokens if self.output_tokens is not None else len(self.chunk_times_s)


@dataclass(frozen=True, slots=True)
class ClientLoad:
    """How hard one client process worked: its read-canary samples (`canary.ReadCanary`: each
    one's delay, and when it was read, from the phase start), CPU seconds, wall seconds."""

    process: int
    read_delays_s: tuple[float, ...]
    cpu_s: float
    wall_s: float
    read_times_s: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary statistics of one metric, in milliseconds; `percentiles` pairs (p, value)."""

    count: int
    mean: float
    median: float
    std: float
    max: float
    percentiles: tuple[tuple[float, float], ...]

    def at(self, p: float) -> float:
        return dict(self.percentiles)[p]


@dataclass(frozen=True, slots=True)
class BenchSummary:
    """Everything the report shows for one load level; latencies in ms, throughputs per second."""

    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: float | None
    good_requests: int | None
    ttft: Distribution | None
    tpot: Distribution | None
    itl: Distribution | None
    itl_per_token: Distribution | None
    e2el: Distribution | None
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    token_source: str  # "usage", "chunks" or "mixed"
    requests_without_usage: int
    errors: tuple[tuple[str, int], ...]
    error_examples: tuple[str, ...]
    send_lag: Distribution | None
    queue_time: Distribution | None
    client_delay: ClientDelay | None
    cpu_s: float
    cpu_util_max: float  # busiest process, as a fraction of one core
    processes: int
    client_warnings: tuple[str, ...]
    endpoints: tuple[EndpointSummary, ...] = ()  # one per server, in the order given

    @property
    def client_limited(self) -> bool:
        return bool(self.client_warnings)


@dataclass(frozen=True, slots=True)
class EndpointSummary:
    """One server's part of a level: its requests summarized over the level's duration.

    `url` is None for the requests that reached no server (every server was down). `summary` has
    no event-loop lag or CPU figures: those belong to the client processes, not to a server.
    """

    url: str | None
    summary: BenchSummary


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """numpy's default (linear) percentile of an already sorted, non-empty sequence."""
    rank = p / 100.0 * (len(sorted_values) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def describe(values_s: Sequence[float], percentiles: Sequence[float] = PERCENTILES) -> Distribution | None:
    """Mean, median, population std, max and percentiles of `values_s` (seconds) in ms; None if empty."""
    if not values_s:
        return None
    ms = sorted(v * 1000.0 for v in values_s)
    mean = math.fsum(ms) / len(ms)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in ms) / len(ms))
    return Distribution(
        count=len(ms),
        mean=mean,
        median=percentile(ms, 50.0),
        std=std,
        max=ms[-1],
        percentiles=tuple((p, percentile(ms, p)) for p in percentiles),
    )


def _tpot_s(record: RequestRecord) -> float | None:
    tokens = record.counted_output_tokens
    if record.ttft_s is None or record.e2el_s is None or tokens <= 1:
        return None
    return (record.e2el_s - record.ttft_s) / (tokens - 1)


def _gaps(record: RequestRecord) -> list[float]:
    return [b - a for a, b in itertools.pairwise(record.chunk_times_s)]


def _gaps_per_token(record: RequestRecord) -> list[float]:
    if record.chunk_tokens is None:
        return []
    # Gap k ends at chunk k+1, so it is spread over the tokens that chunk brought.
    return [gap / n for gap, n in zip(_gaps(record), record.chunk_tokens[1:], strict=True) if n > 0]


def _is_good(record: RequestRecord, slo_ms: Mapping[str, float]) -> bool:
    if not record.ok or record.ttft_s is None or record.e2el_s is None:
        return False
    # As vLLM: a request with a single output token has TPOT 0 for goodput.
    measured = {"ttft": record.ttft_s, "tpot": _tpot_s(record) or 0.0, "e2el": record.e2el_s}
    return all(measured[name] * 1000.0 <= limit for name, limit in slo_ms.items())


def _peak_tokens_per_s(records: Sequence[RequestRecord]) -> float:
    buckets: Counter[int] = Counter()
    for r in records:
        tokens = r.chunk_tokens or (1,) * len(r.chunk_times_s)
        for t, n in zip(r.chunk_times_s, tokens, strict=True):
            buckets[int(r.sent_s + t)] += n
    return float(max(buckets.values(), default=0))


def _peak_concurrency(records: Sequence[RequestRecord]) -> int:
    # Half-open [sent, end) intervals: a departure at t is processed before an arrival at t.
    events = sorted([(r.sent_s, 1) for r in records] + [(r.end_s, -1) for r in records])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def client_warnings(
    send_lag: Distribution | None,
    delay: ClientDelay | None,
    cpu_util_max: float,
    processes: int,
    *,
    burst: bool = False,
) -> tuple[str, ...]:
    """Why the client, not the server, may be what set the figures (empty when it is not).

    `burst` (every request scheduled at 0, i.e. request rate inf without a cap) skips the send-lag
    test: a burst is sent one request after another by definition, and the lag shows how long that took.
    """
    found = []
    if not burst and send_lag is not None and send_lag.at(99.0) > SEND_LAG_LIMIT_MS:
        found.append(
            f"requests left {send_lag.at(99.0):.1f} ms after their scheduled time at p99 "
            f"(max {send_lag.max:.1f} ms; limit {SEND_LAG_LIMIT_MS:g} ms)"
        )
    if delay is not None and delay.ttft_error is not None and delay.ttft_error >= FLAG_ERROR:
        found.append(f"an estimated {delay.ttft_added:.1f} ms of each TTFT ({delay.ttft_share:.0%} of the mean) is "
                     f"the client's: {_parts(delay)}")  # fmt: skip
    if delay is not None and delay.itl_error is not None and delay.itl_error >= FLAG_ERROR:
        found.append(f"the client's read delay moved the mean or median of gaps as long as the mean ITL by "
                     f"{delay.itl_error:.0%} (the read canary's own gaps; a chunk is read an estimated "
                     f"{_fmt_ms(delay.read_per_chunk_mean)} ms late on average, "
                     f"{_fmt_ms(delay.read_per_chunk_p99)} ms at p99)")  # fmt: skip
    if cpu_util_max >= CPU_LIMIT:
        found.append(f"a client process used {cpu_util_max:.0%} of one CPU core (limit {CPU_LIMIT:.0%}): its "
                     "delays grow without bound from here")  # fmt: skip
    if found and delay is not None:
        found.append(_capacity(delay, processes, cpu_bound=cpu_util_max >= CPU_LIMIT))
    return tuple(found)


def _fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _parts(delay: ClientDelay) -> str:
    parts = []
    if delay.write is not None:
        parts.append(f"{delay.write.mean:.1f} ms writing the request (measured)")
    if delay.read_per_chunk_mean is not None:
        parts.append(f"{delay.read_per_chunk_mean:.1f} ms reading the chunk (estimated)")
    return " + ".join(parts)


def _capacity(delay: ClientDelay, processes: int, *, cpu_bound: bool) -> str:
    """How many client processes the level needs, from what one process carried in it."""
    cores = available_cores()
    worst = delay.worst_error
    per_process = delay.chunks_per_s * min(1.0, TARGET_ERROR / worst) if worst > 0 else delay.chunks_per_s
    needed = delay.processes_needed or processes
    if cpu_bound:  # a saturated process's delays are no guide: at least twice the processes
        needed = max(needed, processes * 2)
    about = "at least" if worst >= 1.0 else "about"
    text = (f"the busiest client process read {delay.chunks_per_s:,.0f} chunks/s here; within {TARGET_ERROR:.0%} "
            f"one can read about {per_process:,.0f}/s, so this level needs {about} {needed} client process(es) "
            f"(--client-processes {needed}, or auto)")  # fmt: skip
    if needed > cores:
        text += f"; this machine has {cores} cores: use more machines, or a faster one"
    return text


def summarize(
    records: Sequence[RequestRecord],
    *,
    duration_s: float,
    clients: Sequence[ClientLoad] = (),
    goodput: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = PERCENTILES,
    endpoints: Sequence[str] = (),
) -> BenchSummary:
    """Summarize one load level.

    Args:
        records: the measured requests (warmup excluded), successes and failures.
        duration_s: the measured wall time (first scheduled send to the last request's end).
        clients: one `ClientLoad` per client process.
        goodput: SLOs in ms by metric name (`ttft`, `tpot`, `e2el`); None = no goodput.
        endpoints: the servers' base URLs; with several, `endpoints` of the result summarizes
            each one's requests (see `by_endpoint`); one server's part is the whole level.
    """
    if goodput is not None and set(goodput) - set(GOODPUT_METRICS):
        raise ConfigError(f"goodput metrics must be among {', '.join(GOODPUT_METRICS)}, got {sorted(goodput)}")
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    without_usage = sum(r.output_tokens is None for r in ok)
    source = "usage" if without_usage == 0 else ("chunks" if without_usage == len(ok) else "mixed")
    total_in = sum(r.prompt_tokens or 0 for r in ok)
    total_out = sum(r.counted_output_tokens for r in ok)
    duration = duration_s if duration_s > 0 else math.nan
    good = None if not goodput else sum(_is_good(r, goodput) for r in records)
    send_lag = describe([r.send_lag_s for r in records], percentiles)
    queued = [r.queue_s for r in records]
    cpu_util = max((c.cpu_s / c.wall_s for c in clients if c.wall_s > 0), default=0.0)
    tpots = [t for t in map(_tpot_s, ok) if t is not None]
    ttft = describe([r.ttft_s for r in ok if r.ttft_s is not None], percentiles)
    itl = describe([g for r in ok for g in _gaps(r)], percentiles)
    delay = None
    if clients:
        delay = estimate_client_delay(records, clients, ttft_mean_ms=ttft.mean if ttft else None,
                                      itl_mean_ms=itl.mean if itl else None)  # fmt: skip
    whole = BenchSummary(
        completed=len(ok),
        failed=len(failed),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration,
        output_throughput=total_out / duration,
        total_token_throughput=(total_in + total_out) / duration,
        request_goodput=None if good is None else good / duration,
        good_requests=good,
        ttft=ttft,
        tpot=describe(tpots, percentiles),
        itl=itl,
        itl_per_token=describe([g for r in ok for g in _gaps_per_token(r)], percentiles),
        e2el=describe([r.e2el_s for r in ok if r.e2el_s is not None], percentiles),
        max_output_tokens_per_s=_peak_tokens_per_s(ok),
        max_concurrent_requests=_peak_concurrency(ok),
        token_source=source if ok else "usage",
        requests_without_usage=without_usage,
        errors=tuple(Counter(r.error_type or "error" for r in failed).most_common()),
        error_examples=tuple(dict.fromkeys(f"{r.error_type}: {r.error}" for r in failed))[:5],
        send_lag=send_lag,
        queue_time=describe(queued, percentiles) if any(q > 0 for q in queued) else None,
        client_delay=delay,
        cpu_s=sum(c.cpu_s for c in clients),
        cpu_util_max=cpu_util,
        processes=max(len(clients), 1),
        client_warnings=client_warnings(
            send_lag, delay, cpu_util, max(len(clients), 1), burst=all(r.scheduled_s == 0.0 for r in records)
        ),
    )
    if len(endpoints) == 1:  # all of it: not summarized a second time
        return dataclasses.replace(whole, endpoints=(EndpointSummary(endpoints[0], whole),))
    if endpoints:
        return dataclasses.replace(
            whole, endpoints=by_endpoint(records, endpoints, duration_s=duration_s, percentiles=percentiles)
        )
    return whole


def by_endpoint(
    records: Sequence[RequestRecord],
    endpoints: Sequence[str],
    *,
    duration_s: float,
    percentiles: Sequence[float] = PERCENTILES,
) -> tuple[EndpointSummary, ...]:
    """Each server's requests summarized on their own, in `endpoints` order (a server that got
    none included), then the requests that reached no server, if any."""
    groups: dict[str | None, list[RequestRecord]] = {url: [] for url in endpoints}
    for r in records:
        groups.setdefault(r.endpoint, []).append(r)
    return tuple(
        EndpointSummary(url, summarize(group, duration_s=duration_s, percentiles=percentiles))
        for url, group in groups.items()
    )

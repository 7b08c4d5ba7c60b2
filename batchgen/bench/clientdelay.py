"""How far the client moved the latencies it measured: the measured parts, the estimated whole, and
how many client processes would keep it small (pure arithmetic: records and probe samples in).

Between an event on the wire and the time `batchgen bench` notes for it, the client adds two delays:

- **write**: from the request's `sent` time (where its TTFT starts) to the request's write to the
  socket. Measured for every request (`RequestRecord.write_s`): before Python 3.12 aiohttp writes
  the body from a task of its own, which waits its turn behind every callback ready at that moment.
- **read**: from a chunk's arrival at the socket to the moment it is timed. Not observable per
  chunk, so the read canary (`canary.ReadCanary`) samples it at random times. But chunks do not
  arrive at random times: a closed loop's streams start together and stay in step, so their chunks
  come in bursts, each waiting behind the rest of its burst, while the canary mostly lands in the
  quiet between them. So every canary sample is weighted by the chunks read within `WINDOW_S` of
  it: the canary's delays as the chunks met them.

A TTFT carries one write and one read: its estimated error is their sum. An ITL gap is the
difference of two reads' delays, which cancel when equal and do not when the loop is busy in
stretches (a CPU hog of 12 ms in every 20 moved the median ITL by 20%), or when a delay outgrows the
gap and two chunks are read together (a 0 gap, then a long one). The canary is itself a stream
whose true gaps are known (the stamps): its samples paired a mean ITL apart show what this loop
did to gaps of that length, mean and median, with the stretches and the reads-together included.

Measured on an exact-timing server (benchmarks/README.md, "Client-added delay"), the TTFT estimate
reads low by 0.1-1.7 ms short of saturation (what no client-side probe sees: the loopback, and the
burst a first chunk lands in being busier than the average chunk's) and high once the client is
saturated; hence flagging at `FLAG_ERROR`, below the 10% the report promises never to pass silently.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchgen.bench.metrics import ClientLoad, Distribution, RequestRecord

__all__ = ["FLAG_ERROR", "TARGET_ERROR", "ClientDelay", "canary_gap_error", "estimate_client_delay",
           "per_chunk_weights"]  # fmt: skip

WINDOW_S = 0.0005  # chunks read this close to a canary sample met the same queue
FLAG_ERROR = 0.07  # an estimated TTFT or ITL error from here on is flagged (the estimate reads a little low)
TARGET_ERROR = 0.05  # what a recommended number of client processes aims for
MAX_ERROR = 10.0  # an error estimate is capped here: past it the figures are the client's, whatever the number


@dataclass(frozen=True, slots=True)
class ClientDelay:
    """The delay the client added to what it measured; times in ms, errors as fractions.

    Attributes:
        write: measured per request, from the send to the request's write.
        read: the canary's samples as taken (every moment alike).
        read_per_chunk_mean / read_per_chunk_p99: the canary's samples weighted by the chunks read
            around them: the read delay as chunks met it (None without samples near chunks).
        ttft_added: estimated delay in each TTFT (write mean + per-chunk read mean; at most the
            measured mean TTFT: once the client is saturated, the per-chunk estimate runs high).
        ttft_share: `ttft_added` as a fraction of the measured mean TTFT.
        ttft_error: `ttft_added` as a fraction of the TTFT without it (the error; at most `MAX_ERROR`).
        itl_error: how far the loop moved the mean or the median (the larger, as a fraction) of
            the canary's gaps a mean ITL long (`canary_gap_error`).
        chunks_per_s: chunks the busiest client process read per second of the level.
        chunks_per_cpu_s: chunks it read per CPU second (its ceiling, at a whole core).
        processes_needed: client processes for an estimated error within `TARGET_ERROR` (None
            when it cannot be told: no error estimate).
    """

    write: Distribution | None
    read: Distribution | None
    read_per_chunk_mean: float | None
    read_per_chunk_p99: float | None
    ttft_added: float | None
    ttft_share: float | None
    ttft_error: float | None
    itl_error: float | None
    chunks_per_s: float
    chunks_per_cpu_s: float | None
    processes_needed: int | None

    @property
    def worst_error(self) -> float:
        return min(max(self.ttft_error or 0.0, self.itl_error or 0.0), MAX_ERROR)


def _weighted_percentile(values: Sequence[float], weights: Sequence[int], p: float) -> float:
    pairs = sorted(zip(values, weights, strict=True))
    total = sum(weights)
    running = 0
    for value, weight in pairs:
        running += weight
        if running >= total * p / 100.0:
            return value
    return pairs[-1][0]


def per_chunk_weights(read_times_s: Sequence[float], chunk_times_s: Sequence[float]) -> list[int]:
    """For each canary sample (by its read time), the chunks read within `WINDOW_S` of it.

    `chunk_times_s` must be sorted; both on the same clock (seconds from the phase start)."""
    return [bisect.bisect_right(chunk_times_s, t + WINDOW_S) - bisect.bisect_left(chunk_times_s, t - WINDOW_S)
            for t in read_times_s]  # fmt: skip


_MIN_PAIRS = 20  # fewer canary pairs than this tell nothing about a median


def canary_gap_error(read_times_s: Sequence[float], delays_s: Sequence[float], gap_s: float) -> float | None:
    """How the loop moved gaps of about `gap_s` between the canary's own stamps: each stamp paired
    with the first stamp at least `gap_s` after it; the larger of the mean's and the median's
    relative shift of the read gaps from the stamp gaps (None with too few pairs)."""
    if gap_s <= 0 or len(read_times_s) != len(delays_s):
        return None
    samples = sorted((read - delay, read) for read, delay in zip(read_times_s, delays_s, strict=True))
    stamps = [stamp for stamp, _ in samples]
    true_gaps, read_gaps = [], []
    for j, (stamp, read) in enumerate(samples):
        k = bisect.bisect_left(stamps, stamp + gap_s, lo=j + 1)
        if k == len(samples):
            break
        true_gaps.append(samples[k][0] - stamp)
        read_gaps.append(samples[k][1] - read)
    if len(true_gaps) < _MIN_PAIRS:
        return None
    mean_shift = abs(sum(read_gaps) / sum(true_gaps) - 1.0)
    median_shift = abs(statistics.median(read_gaps) / statistics.median(true_gaps) - 1.0)
    return min(max(mean_shift, median_shift), MAX_ERROR)


def estimate_client_delay(
    records: Sequence[RequestRecord], clients: Sequence[ClientLoad], *, ttft_mean_ms: float | None,
    itl_mean_ms: float | None,
) -> ClientDelay:  # fmt: skip
    """Measured and estimated client-added delay of one level (see the module docstring).

    Args:
        records: the level's requests (their processes' clocks: `sent_s` from each phase start).
        clients: each process's canary samples, CPU and wall time.
        ttft_mean_ms / itl_mean_ms: the level's measured means (None without them).
    """
    from batchgen.bench.metrics import describe

    ok = [r for r in records if r.ok]
    write = describe([r.write_s for r in records if r.write_s is not None])
    read = describe([d for c in clients for d in c.read_delays_s])
    delays: list[float] = []
    weights: list[int] = []
    busiest_rate, busiest_per_cpu = 0.0, None
    for client in clients:
        chunks = sorted(r.sent_s + t for r in ok if r.process == client.process for t in r.chunk_times_s)
        if len(client.read_times_s) == len(client.read_delays_s):  # (a load given without read times has no weights)
            delays += client.read_delays_s
            weights += per_chunk_weights(client.read_times_s, chunks)
        rate = len(chunks) / client.wall_s if client.wall_s > 0 else 0.0
        if rate >= busiest_rate:
            busiest_rate = rate
            busiest_per_cpu = len(chunks) / client.cpu_s if client.cpu_s > 0 else None
    weighted = sum(weights) > 0
    read_mean = (sum(d * w for d, w in zip(delays, weights)) / sum(weights) * 1000.0) if weighted else None
    read_p99 = _weighted_percentile(delays, weights, 99.0) * 1000.0 if weighted else None
    added = None
    if write is not None or read_mean is not None:
        added = (write.mean if write is not None else 0.0) + (read_mean or 0.0)
    share = ttft_error = None
    if added is not None and ttft_mean_ms is not None and ttft_mean_ms > 0:
        added = min(added, ttft_mean_ms)
        share = added / ttft_mean_ms
        ttft_error = min(share / (1.0 - share), MAX_ERROR) if share < 1.0 else MAX_ERROR
    itl_error = None
    if itl_mean_ms:
        # Each process's canary on its own: the pairs must come from one loop.
        errors = [canary_gap_error(c.read_times_s, c.read_delays_s, itl_mean_ms / 1000.0) for c in clients]
        itl_error = max((e for e in errors if e is not None), default=None)
    processes = max(len(clients), 1)
    worst = min(max(ttft_error or 0.0, itl_error or 0.0), MAX_ERROR)
    needed = None
    if ttft_error is not None or itl_error is not None:
        # The delay grows with the load one process carries (a burst is as long as the streams in
        # it), so spreading the load over k times the processes divides it by about k.
        # Past an error of 100% the client is saturated and the rule says nothing more: "at least" that.
        needed = math.ceil(processes * min(worst, 1.0) / TARGET_ERROR - 1e-9) if worst > TARGET_ERROR else processes
    return ClientDelay(write=write, read=read, read_per_chunk_mean=read_mean, read_per_chunk_p99=read_p99,
                       ttft_added=added, ttft_share=share, ttft_error=ttft_error, itl_error=itl_error, chunks_per_s=busiest_rate,
                       chunks_per_cpu_s=busiest_per_cpu, processes_needed=needed)  # fmt: skip

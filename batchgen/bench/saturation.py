"""`batchgen bench --concurrency auto`: the controllers' timelines and the saturation point they found.

A level with `LoadSpec.auto` sends through a `ClientPool` whose `ConcurrencyController` steers each
server's limit from the server's own load (rules: `batchgen.autoscale`). Each client process keeps
one timeline per server (`ControllerTrace`). The saturation point is where the limit settled: the
median limit of the last third of the decisions made while the measured phase was starting requests
(warmup and the drain after the deadline left out), summed over the client processes (each steers its
own share), with the server's running/waiting/KV usage at those decisions and the throughput the bench
measured over the same window (pure arithmetic: no I/O, no clock).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from batchgen.autoscale import AutoConcurrency, Tick
from batchgen.bench.metrics import RequestRecord

__all__ = ["ControllerTrace", "EndpointSaturation", "Saturation", "find_saturation"]

SETTLED_SHARE = 3  # the settled part of a timeline: its last 1/3 (at least one decision)


@dataclass(frozen=True, slots=True)
class ControllerTrace:
    """One server's controller in one client process during a level.

    Args:
        process: the client process.
        endpoint: the server's base URL (as the records name it).
        interval_s: seconds between decisions (a decision describes the interval before it).
        measured_from_s / sending_until_s: on the controller's clock (`Tick.t`), when the measured
            phase started and when it stopped starting requests.
        shift_s: where this process's measured phase starts on the level's time axis (the records'
            `sent_s` axis; `merge_shards` sets it for several processes).
        metrics: whether the server served vLLM /metrics (None: never scraped).
        ticks: every decision, warmup and drain included.
    """

    process: int
    endpoint: str
    interval_s: float
    measured_from_s: float
    sending_until_s: float
    shift_s: float
    metrics: bool | None
    ticks: tuple[Tick, ...]

    def level_time(self, tick: Tick) -> float:
        """The tick's time on the level's axis (seconds from the measured phase's start)."""
        return tick.t - self.measured_from_s + self.shift_s

    def settled(self) -> tuple[Tick, ...]:
        """The last third of the decisions taken while the measured phase was starting requests."""
        measured = [t for t in self.ticks if self.measured_from_s < t.t <= self.sending_until_s]
        return tuple(measured[-max(1, len(measured) // SETTLED_SHARE) :]) if measured else ()

    def to_dict(self) -> dict[str, object]:
        settled = self.settled()
        return {
            "process": self.process,
            "measured_from_s": round(self.measured_from_s, 3),
            "sending_until_s": round(self.sending_until_s, 3),
            "settled_limit": _median([t.limit for t in settled]),
            "settled_decisions": len(settled),
            "ticks": [t.to_dict() for t in self.ticks],
        }


@dataclass(frozen=True, slots=True)
class EndpointSaturation:
    """Where one server's limit settled. Figures are None when unknown (no decision in the measured
    phase, or no /metrics for the server's own figures).

    Args:
        limit: the sum over client processes of each one's median settled limit.
        in_flight: the same for the requests the bench held at those decisions (a limit of 33.4,
            shown as 33, lets 34 go).
        running / waiting / kv_usage / server_tokens_per_s: the server's (/metrics), median over the
            settled decisions (every process sees the same server).
        preemptions: preemptions the server counted during the settled decisions (the most any one
            process saw: they all read the same counter).
        output_throughput / request_throughput: measured by the bench from this server's requests
            over `window_s`: text-chunk tokens that arrived in it (chunks when there is no per-chunk
            usage), and requests that ended in it.
        window_s: (start, end) on the level's time axis: from one interval before the first settled
            decision to the last.
        at_max / at_min: the settled limit of some process sat at its bound.
        client_bound: some settled decision held because the client process was CPU-bound.
    """

    url: str
    limit: float | None
    in_flight: float | None
    running: float | None
    waiting: float | None
    kv_usage: float | None
    preemptions: float | None
    server_tokens_per_s: float | None
    output_throughput: float | None
    request_throughput: float | None
    window_s: tuple[float, float] | None
    decisions: int
    settled_decisions: int
    metrics: bool | None
    at_max: bool
    at_min: bool
    client_bound: bool
    traces: tuple[ControllerTrace, ...]


@dataclass(frozen=True, slots=True)
class Saturation:
    """The saturation point of a `--concurrency auto` level: totals over its servers, and each one."""

    settings: AutoConcurrency
    processes: int
    endpoints: tuple[EndpointSaturation, ...]
    limit: float | None
    in_flight: float | None
    running: float | None
    waiting: float | None
    server_tokens_per_s: float | None
    output_throughput: float | None
    request_throughput: float | None
    window_s: tuple[float, float] | None

    @property
    def notes(self) -> tuple[str, ...]:
        """What the reader must know to trust the figure (empty when nothing is off)."""
        found = []
        for e in self.endpoints:
            name = e.url if len(self.endpoints) > 1 else "the server"
            if e.limit is None:
                interval = self.settings.interval
                found.append(f"{name}: no decision while the measured phase ran; use a longer --duration (or "
                             f"more --num-prompts) than a few controller intervals ({interval:g} s)")  # fmt: skip
                continue
            if e.metrics is False:
                found.append(f"{name} serves no vLLM /metrics: the limit was steered by 429s, timeouts and TTFT only, "
                             "and its running/waiting are unknown")  # fmt: skip
            if e.at_max:
                found.append(f"{name}: the limit sat at --concurrency-max ({self.settings.max}); the server may take "
                             "more: raise it")  # fmt: skip
            if e.at_min:
                found.append(f"{name}: the limit sat at --concurrency-min ({self.settings.min})")
            if e.client_bound:
                found.append(f"{name}: the controller held because the client process was CPU-bound: this is the "
                             "client's saturation, not the server's; use --client-processes")  # fmt: skip
        return tuple(found)


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(statistics.median(known)) if known else None


def _sum(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(sum(known)) if known else None


def _throughput(records: Sequence[RequestRecord], window: tuple[float, float]) -> tuple[float, float]:
    """(output tokens/s, requests/s) of `records` within `window` (the level's time axis)."""
    start, end = window
    span = max(end - start, 1e-9)
    tokens = ended = 0
    for r in records:
        if not r.ok:
            continue
        if start <= r.end_s <= end:
            ended += 1
        counts = r.chunk_tokens or (1,) * len(r.chunk_times_s)
        tokens += sum(n for t, n in zip(r.chunk_times_s, counts, strict=True) if start <= r.sent_s + t <= end)
    return tokens / span, ended / span


def _endpoint(url: str, traces: Sequence[ControllerTrace], records: Sequence[RequestRecord],
              settings: Sequence[AutoConcurrency]) -> EndpointSaturation:  # fmt: skip
    settled = [(trace, trace.settled()) for trace in traces]
    ticks = [tick for _, chosen in settled for tick in chosen]
    limits = [_median([t.limit for t in chosen]) for _, chosen in settled]
    window = None
    if ticks:
        window = (min(trace.level_time(chosen[0]) - trace.interval_s for trace, chosen in settled if chosen),
                  max(trace.level_time(chosen[-1]) for trace, chosen in settled if chosen))  # fmt: skip
        window = (max(window[0], 0.0), window[1])
    output = requests = None
    if window is not None:
        output, requests = _throughput(records, window)
    preempted = [_sum([t.preemptions for t in chosen]) for _, chosen in settled]
    return EndpointSaturation(
        url=url,
        limit=_sum(limits),
        in_flight=_sum([_median([t.in_flight for t in chosen]) for _, chosen in settled]),
        running=_median([t.running for t in ticks]),
        waiting=_median([t.waiting for t in ticks]),
        kv_usage=_median([t.kv_usage for t in ticks]),
        preemptions=max((p for p in preempted if p is not None), default=None),
        server_tokens_per_s=_median([t.tokens_per_s for t in ticks]),
        output_throughput=output,
        request_throughput=requests,
        window_s=window,
        decisions=sum(len(trace.ticks) for trace in traces),
        settled_decisions=len(ticks),
        metrics=next((trace.metrics for trace in traces if trace.metrics is not None), None),
        at_max=any(limit is not None and limit >= s.max for limit, s in zip(limits, settings, strict=True)),
        at_min=any(limit is not None and limit <= s.min < s.max for limit, s in zip(limits, settings, strict=True)),
        client_bound=any("CPU-bound" in t.decision for t in ticks),
        traces=tuple(traces),
    )


def find_saturation(
    settings: AutoConcurrency,
    traces: Sequence[ControllerTrace],
    records: Sequence[RequestRecord],
    *,
    shares: Sequence[AutoConcurrency] | None = None,
    processes: int = 1,
) -> Saturation:
    """The saturation point of one level from its controllers' traces and its records.

    Args:
        settings: the level's bounds (as given, before a split over client processes).
        shares: each process's bounds, by process number (default: `settings` for every process).
        processes: client processes of the level.
    """
    urls = list(dict.fromkeys(trace.endpoint for trace in traces))
    per_process = list(shares) if shares is not None else [settings] * processes
    endpoints = []
    for url in urls:
        mine = sorted((t for t in traces if t.endpoint == url), key=lambda t: t.process)
        bounds = [per_process[t.process] if t.process < len(per_process) else settings for t in mine]
        endpoints.append(_endpoint(url, mine, [r for r in records if r.endpoint == url], bounds))
    windows = [e.window_s for e in endpoints if e.window_s is not None]
    window = (min(w[0] for w in windows), max(w[1] for w in windows)) if windows else None
    output = requests = None
    if window is not None:
        output, requests = _throughput(records, window)
    return Saturation(
        settings=settings,
        processes=processes,
        endpoints=tuple(endpoints),
        limit=_sum([e.limit for e in endpoints]),
        in_flight=_sum([e.in_flight for e in endpoints]),
        running=_sum([e.running for e in endpoints]),
        waiting=_sum([e.waiting for e in endpoints]),
        server_tokens_per_s=_sum([e.server_tokens_per_s for e in endpoints]),
        output_throughput=output,
        request_throughput=requests,
        window_s=window,
    )

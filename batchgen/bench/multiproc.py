"""Runs one load level in 1..N client processes (one event loop each) and merges their raw results.

One Python event loop tops out at a few thousand streamed chunks per second; past that, the
client's own delays would show up as server latency. Spreading the load over processes lifts
that ceiling. The level's load is split evenly (concurrency, request rate, prompts and warmup;
with concurrency auto each process has a controller of its own within its share of the bounds, and
they share the server as two `batchgen run` clients do: multiplicative decreases keep fair shares);
the processes finish their warmup, meet at a barrier, start the measured phase together, and
their records are put on one time axis through each process's wall-clock start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import multiprocessing
import queue
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from typing import Any, Literal

from batchgen.autoscale import AutoConcurrency
from batchgen.bench.metrics import ClientLoad, RequestRecord
from batchgen.bench.runner import LoadSpec, ServerSpec, ShardResult, run_shard
from batchgen.bench.saturation import ControllerTrace
from batchgen.errors import ClientProcessError, ConfigError
from batchgen.runtime import available_cores, lean_gc

__all__ = ["ClientProcessError", "LevelResult", "ProcessChoice", "choose_processes", "merge_shards", "run_level",
           "split_load"]  # fmt: skip

_BARRIER_TIMEOUT_S = 300.0  # a child that never reaches the start line must not hang the others forever
_POLL_S = 0.5
PROBE_S = 3.0  # --client-processes auto: how long one process runs a level to measure what it can carry
_PROBE_BURST = 256  # a burst (every request at once) is probed with at most this many of its requests


@dataclass(frozen=True, slots=True)
class LevelResult:
    """The merged raw results of one load level: records on one time axis, one load per process."""

    load: LoadSpec
    records: tuple[RequestRecord, ...]
    clients: tuple[ClientLoad, ...]
    duration_s: float
    traces: tuple[ControllerTrace, ...] = ()  # concurrency auto: per process and server
    shares: tuple[LoadSpec, ...] = ()  # each process's share of `load`, by process number
    choice: ProcessChoice | None = None  # --client-processes auto: how the count was chosen


@dataclass(frozen=True, slots=True)
class ProcessChoice:
    """How `--client-processes auto` chose a level's process count from a probe in one process.

    `needed` is what the probe's estimated client-added error asks for (`ClientDelay.processes_needed`),
    `processes` what was used: at most the cores this process may use, and the load's own bound.
    """

    processes: int
    needed: int
    cores: int
    chunks_per_s: float
    error: float

    def describe(self) -> str:
        text = (f"auto: a {PROBE_S:g} s probe in one process read {self.chunks_per_s:,.0f} chunks/s with an estimated "
                f"client error of {self.error:.0%}, so {self.needed} process(es) needed")  # fmt: skip
        if self.processes < self.needed:
            text += f"; {self.processes} used ({self.cores} cores here)"
        return text


def _share(total: int, part: int, parts: int) -> int:
    return total // parts + (1 if part < total % parts else 0)


def split_load(load: LoadSpec, processes: int) -> list[LoadSpec]:
    """Each process's share of `load`: integer counts split as evenly as possible, rates divided.

    Independent Poisson streams at rate R/N add up to a Poisson stream at rate R; each process
    gets its own seed so their arrivals do not coincide.
    """
    if processes < 1:
        raise ConfigError(f"client processes must be >= 1, got {processes}")
    for name in ("concurrency", "max_concurrency"):
        value = getattr(load, name)
        if value is not None and value < processes:
            raise ConfigError(f"{name.replace('_', ' ')} {value} is below --client-processes {processes}")
    if load.auto is not None and load.auto.max < processes:
        raise ConfigError(f"--concurrency-max {load.auto.max} is below --client-processes {processes}")
    shares = []
    for p in range(processes):
        shares.append(
            dataclasses.replace(
                load,
                concurrency=None if load.concurrency is None else _share(load.concurrency, p, processes),
                auto=None if load.auto is None else _auto_share(load.auto, p, processes),
                max_concurrency=None if load.max_concurrency is None else _share(load.max_concurrency, p, processes),
                request_rate=load.request_rate / processes,
                num_prompts=None if load.num_prompts is None else _share(load.num_prompts, p, processes),
                warmup=_share(load.warmup, p, processes),
                seed=load.seed + p,
            )
        )
    return shares


def _auto_share(auto: AutoConcurrency, part: int, parts: int) -> AutoConcurrency:
    """One process's bounds of concurrency auto: its share of min, max and start (at least 1 each)."""
    high = _share(auto.max, part, parts)
    low = min(max(1, _share(auto.min, part, parts)), high)
    return dataclasses.replace(auto, min=low, max=high, start=max(1, _share(auto.start, part, parts)))


def merge_shards(load: LoadSpec, shards: Sequence[ShardResult], shares: Sequence[LoadSpec] = ()) -> LevelResult:
    """Shift every shard's record times onto the earliest shard's clock and compute the duration."""
    start = min(s.start_wall for s in shards)
    records: list[RequestRecord] = []
    traces: list[ControllerTrace] = []
    for shard in shards:
        shift = shard.start_wall - start
        traces += (dataclasses.replace(trace, shift_s=trace.shift_s + shift) for trace in shard.traces)
        for r in shard.records:
            if shift:
                r = dataclasses.replace(
                    r, scheduled_s=r.scheduled_s + shift, sent_s=r.sent_s + shift, end_s=r.end_s + shift
                )
            records.append(r)
    duration = max(s.start_wall - start + s.load.wall_s for s in shards)
    records.sort(key=lambda r: r.index)
    traces.sort(key=lambda t: t.process)
    # The canary's read times go on the records' time axis: they are matched with the chunks' reads.
    clients = tuple(dataclasses.replace(s.load, read_times_s=tuple(t + s.start_wall - start for t in s.load.read_times_s))
                    for s in sorted(shards, key=lambda s: s.process))  # fmt: skip
    return LevelResult(load, tuple(records), clients, duration, tuple(traces), tuple(shares) or (load,))


def _child(
    server: ServerSpec,
    bodies: Sequence[dict[str, Any]],
    load: LoadSpec,
    process: int,
    processes: int,
    barrier: Barrier,
    results: multiprocessing.Queue[tuple[int, str, Any]],
) -> None:
    async def ready() -> None:
        await asyncio.to_thread(barrier.wait, _BARRIER_TIMEOUT_S)

    try:
        with lean_gc():
            shard = asyncio.run(run_shard(server, bodies, load, process=process, processes=processes, ready=ready))
    except BaseException as exc:  # reported to the parent, which owns the error message
        barrier.abort()  # release the siblings waiting at the start line
        results.put((process, "error", f"{type(exc).__name__}: {exc}"))
        return
    results.put((process, "ok", shard))


def _run_processes(server: ServerSpec, bodies: Sequence[dict[str, Any]], shares: list[LoadSpec]) -> list[ShardResult]:
    # spawn, not fork: the parent may hold threads or a running loop, which fork would copy half-alive.
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(shares))
    results: multiprocessing.Queue[tuple[int, str, Any]] = ctx.Queue()
    children = [
        ctx.Process(target=_child, args=(server, bodies, share, p, len(shares), barrier, results), daemon=True)
        for p, share in enumerate(shares)
    ]
    for child in children:
        child.start()
    shards: list[ShardResult] = []
    errors: list[str] = []
    try:
        # Read before joining: a child blocks on exit until its (large) result is taken off the queue.
        while len(shards) + len(errors) < len(children):
            try:
                process, status, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [c for c in children if c.exitcode not in (None, 0)]
                if dead:
                    errors.append(f"client process exited with code {dead[0].exitcode}")
                    break
                continue
            if status == "ok":
                shards.append(payload)
            else:
                errors.append(f"client process {process}: {payload}")
    finally:
        for child in children:
            child.join(timeout=5.0)
            if child.is_alive():
                child.terminate()
    if errors:
        raise ClientProcessError("; ".join(dict.fromkeys(errors)))
    return shards


def _probe_load(load: LoadSpec) -> LoadSpec:
    """The level's load shape, for `PROBE_S` (requests started by then finish)."""
    if load.num_prompts is not None and math.isinf(load.request_rate) and load.max_concurrency is None \
            and load.concurrency is None:  # fmt: skip
        return dataclasses.replace(load, num_prompts=min(load.num_prompts, _PROBE_BURST))  # a burst has no duration
    return dataclasses.replace(load, num_prompts=None, duration_s=PROBE_S)


def choose_processes(server: ServerSpec, bodies: Sequence[dict[str, Any]], load: LoadSpec) -> ProcessChoice:
    """`--client-processes auto`: probe the level in one process, then use as many processes as its
    estimated client-added error needs (`ClientDelay.processes_needed`), within the cores available
    and the load's in-flight bound (each process needs at least one request in flight)."""
    from batchgen.bench.metrics import CPU_LIMIT, summarize

    if load.auto is not None:
        raise ConfigError("--client-processes auto needs a fixed load: with --concurrency auto give a number of "
                          "client processes")  # fmt: skip
    probe = run_level(server, bodies, _probe_load(load), 1)
    summary = summarize(probe.records, duration_s=probe.duration_s, clients=probe.clients)
    delay = summary.client_delay
    needed = delay.processes_needed if delay is not None and delay.processes_needed else 1
    if summary.cpu_util_max >= CPU_LIMIT:  # a saturated process's delays are no guide: at least two
        needed = max(needed, 2)
    cores = available_cores()
    bound = min(v for v in (load.concurrency, load.max_concurrency, cores, needed) if v is not None)
    return ProcessChoice(processes=max(1, bound), needed=needed, cores=cores,
                         chunks_per_s=delay.chunks_per_s if delay else 0.0,
                         error=delay.worst_error if delay else 0.0)  # fmt: skip


def run_level(
    server: ServerSpec, bodies: Sequence[dict[str, Any]], load: LoadSpec, processes: int | Literal["auto"] = 1
) -> LevelResult:
    """Run one load level to completion and return its merged raw results.

    `processes="auto"` first probes the level in one process (`choose_processes`).

    Raises:
        ConfigError: the load cannot be split over `processes`.
        ClientProcessError: a client process failed.
    """
    if processes == "auto":
        choice = choose_processes(server, bodies, load)
        return dataclasses.replace(run_level(server, bodies, load, choice.processes), choice=choice)
    if processes == 1:
        with lean_gc():  # the collector's pauses would count as client lag
            shard = asyncio.run(run_shard(server, bodies, load))
        return merge_shards(load, [shard])
    shares = split_load(load, processes)
    return merge_shards(load, _run_processes(server, bodies, shares), shares)

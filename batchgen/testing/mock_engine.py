"""The mock server's capacity model: engines with batch slots, a KV budget in tokens and a waiting queue.

Off by default (`MockConfig.batch_slots` and `kv_tokens` both None). When on, every chat request that gets
no fault runs on one of `MockConfig.engines` data-parallel engines (the least loaded, ties in turn), each
with its own slots, KV budget and queue, modelled on vLLM's scheduler:

* An engine step generates one token for every running request and lasts
  ``step_ms + step_ms_per_request * running`` ms, so the per-token time grows with the batch.
* A step first makes room: when the KV use after the step (prompt + generated tokens of every running
  request, one more each) would pass the budget, the most recently admitted request is preempted, as vLLM
  does, until it fits; a preempted request goes back to the front of the queue and loses its generated
  tokens (it restarts from zero, so it takes longer). The oldest running request is never preempted, so
  the engine always progresses. Then, if it preempted nothing, the step admits waiting requests in order
  while fewer than `batch_slots` run and the KV budget holds the request's prompt and its first token.
  An admitted request gets its first token at the end of that step.
* A request runs for `mock_replies.generation_steps` steps (its stream's paced frames: max tokens, or the
  natural reply length, plus the EOS step when it stops on its own); its KV need is its prompt tokens plus
  one token per choice each step. A request whose whole need can never fit the budget is refused with a 400
  (`check`), as vLLM refuses a prompt longer than its context. The budget is counted in tokens, not blocks.
* Requests whose client went away before admission are dropped from the queue; the handler aborts the
  others (a cancelled handler, or a stream write that fails). `MockServer` cancels the handler of a
  client that hangs up, so its slot frees at once; an app served otherwise (`make_app`) notices a plain
  request's client is gone only at admission.
* Counters: ``generation_tokens_total`` counts every token a step computes (recomputed ones after a
  preemption too), ``prompt_tokens_total`` a prompt at each admission (again after a preemption).

A knee: ``batch_slots=64, kv_tokens=64 * (P + 64)`` with ``max_tokens=64`` and prompts of at most P
tokens gives a server whose throughput grows with the concurrency up to 64 requests and stays flat
beyond (more only queue); ``batch_slots=256`` with the same KV budget makes a cliff instead: past 64
requests they preempt each other and the throughput falls.

One asyncio task per engine runs the steps while there is work and waits on an event when idle. A step
costs O(1) plus one look per running *stream* (which sends a chunk per step anyway) plus the requests
that finish in it: plain requests are only woken when they finish.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import Final, NamedTuple, Protocol

from batchgen.testing.mock_replies import RequestRejected

__all__ = [
    "BLOCK_SIZE",
    "METRICS_CONTENT_TYPE",
    "Capacity",
    "EngineGroup",
    "EngineLoad",
    "Job",
    "render_metrics",
]

BLOCK_SIZE: Final = 16  # vLLM's default KV block size; num_gpu_blocks = kv_tokens // BLOCK_SIZE
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"  # prometheus_client's

# Job states, in order: a job only moves forward, except RUNNING -> WAITING on a preemption.
_NEW: Final = 0
_WAITING: Final = 1
_RUNNING: Final = 2
_DONE: Final = 3
_ABORTED: Final = 4


def _check_limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Capacity:
    """The settings a running mock can change (`POST /mock/capacity`); None = unlimited."""

    batch_slots: int | None
    kv_tokens: int | None

    def __post_init__(self) -> None:
        _check_limit("batch_slots", self.batch_slots)
        _check_limit("kv_tokens", self.kv_tokens)

    @property
    def num_gpu_blocks(self) -> int | None:
        return None if self.kv_tokens is None else self.kv_tokens // BLOCK_SIZE

    def as_dict(self) -> dict[str, int | None]:
        return {"batch_slots": self.batch_slots, "kv_tokens": self.kv_tokens}


class StateSink(Protocol):
    """Where the engines report what tests assert on (`MockState` has these fields)."""

    preemptions: int
    max_running: int
    max_waiting: int


class Job:
    """One request on an engine. Its handler waits with `progressed` and reads `high` / `aborted`."""

    __slots__ = ("engine", "gone", "high", "prompt", "start", "state", "steps", "stream", "waiter", "width")

    def __init__(
        self, prompt: int, width: int, steps: int, stream: bool, gone: Callable[[], bool] | None
    ) -> None:
        self.prompt = prompt  # prompt tokens
        self.width = width  # tokens per step (the choices)
        self.steps = steps  # steps to run
        self.stream = stream  # woken at every step, else only when it ends
        self.gone = gone  # True when the client went away
        self.engine: _Engine | None = None
        self.state = _NEW
        self.start = -1  # the engine step it was admitted at
        self.high = 0  # most steps ever generated (a preempted stream does not resend what it sent)
        self.waiter: asyncio.Future[None] | None = None

    @property
    def done(self) -> bool:
        return self.state == _DONE

    @property
    def aborted(self) -> bool:
        return self.state == _ABORTED

    async def progressed(self, sent: int) -> None:
        """Return once more than `sent` steps were generated, or the job ended."""
        if self.high > sent or self.state >= _DONE:
            return
        waiter = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        try:
            await waiter
        finally:
            if self.waiter is waiter:
                self.waiter = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _end(self, state: int) -> None:
        self.state = state
        self.engine = None
        if state == _DONE:
            self.high = self.steps
        self._wake()


class EngineLoad(NamedTuple):
    """One engine's figures, as `/metrics` reports them."""

    running: int
    waiting: int
    kv_usage: float  # 0..1
    preemptions: int
    generation_tokens: int
    prompt_tokens: int


class _Engine:
    """One engine: a running batch (in admission order), a FIFO queue and O(1) KV bookkeeping.

    KV use after step t is ``P + W * t - S`` (P: sum of prompts, W: sum of widths, S: sum of width *
    start over the running jobs), so neither a step nor a KV check walks the batch.
    """

    def __init__(self, index: int, group: EngineGroup) -> None:
        self.index = index
        self.group = group
        self.running: dict[Job, None] = {}  # insertion order = admission order
        self.streams: dict[Job, None] = {}  # the running jobs that are streams
        self.waiting: deque[Job] = deque()
        self.finishing: dict[int, list[Job]] = {}  # step -> jobs that end with it (stale entries skipped)
        self.t = 0  # steps done
        self.prompts = 0  # P
        self.width = 0  # W
        self.started = 0  # S
        self.preemptions = 0
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.idle = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def kv_used(self) -> int:
        return self.prompts + self.width * self.t - self.started

    def load(self) -> EngineLoad:
        kv = self.group.capacity.kv_tokens
        usage = 0.0 if kv is None else min(1.0, self.kv_used / kv)
        return EngineLoad(
            len(self.running), len(self.waiting), usage, self.preemptions, self.generation_tokens, self.prompt_tokens
        )

    def submit(self, job: Job) -> None:
        job.engine = self
        job.state = _WAITING
        self.waiting.append(job)
        state = self.group.state
        state.max_waiting = max(state.max_waiting, len(self.waiting))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(), name=f"mock-engine-{self.index}")
        self.idle.set()

    def abort(self, job: Job) -> None:
        if job.state == _WAITING:
            self.waiting.remove(job)
        elif job.state == _RUNNING:
            self._remove(job)
        job._end(_ABORTED)

    def _admit(self, job: Job) -> None:
        t = self.t
        job.state = _RUNNING
        job.start = t
        self.running[job] = None
        if job.stream:
            self.streams[job] = None
        self.prompts += job.prompt
        self.width += job.width
        self.started += job.width * t
        self.prompt_tokens += job.prompt
        self.finishing.setdefault(t + job.steps, []).append(job)

    def _remove(self, job: Job) -> None:
        del self.running[job]
        if job.stream:
            self.streams.pop(job, None)
        self.prompts -= job.prompt
        self.width -= job.width
        self.started -= job.width * job.start

    def _schedule(self) -> None:
        """The start of a step: preempt until the step fits the KV budget, else admit from the queue."""
        capacity = self.group.capacity
        budget = capacity.kv_tokens
        running, waiting, state = self.running, self.waiting, self.group.state
        after = self.t + 1
        if budget is not None:
            preempted = 0
            while len(running) > 1 and self.prompts + self.width * after - self.started > budget:
                job = next(reversed(running))  # the most recently admitted
                self._remove(job)
                job.state = _WAITING
                job.start = -1
                waiting.appendleft(job)
                preempted += 1
            if preempted:
                self.preemptions += preempted
                state.preemptions += preempted
                state.max_waiting = max(state.max_waiting, len(waiting))
                return  # as vLLM: no admissions in a step that preempted
        state.max_waiting = max(state.max_waiting, len(waiting))
        slots = capacity.batch_slots
        while waiting and (slots is None or len(running) < slots):
            job = waiting[0]
            if job.gone is not None and job.gone():
                waiting.popleft()
                job._end(_ABORTED)
                continue
            if budget is not None and running:
                need = self.prompts + self.width * after - self.started + job.prompt + job.width
                if need > budget:
                    break
            waiting.popleft()
            self._admit(job)
        state.max_running = max(state.max_running, len(running))

    def _advance(self) -> None:
        """The end of a step: one more token for every running job; stream jobs see it, finished jobs end."""
        self.t += 1
        t = self.t
        self.generation_tokens += self.width
        for job in self.streams:
            generated = t - job.start
            if generated > job.high:
                job.high = generated
                job._wake()
        ending = self.finishing.pop(t, None)
        if ending:
            for job in ending:
                if job.state == _RUNNING and job.engine is self and job.start + job.steps == t:
                    self._remove(job)
                    job._end(_DONE)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        group = self.group
        try:
            while True:
                if not self.waiting and not self.running:
                    self.idle.clear()
                    await self.idle.wait()
                    continue
                began = loop.time()
                self._schedule()
                if not self.running:
                    continue  # every waiting request's client had gone
                step_s = group.step_s + group.step_s_per_request * len(self.running)
                await asyncio.sleep(max(0.0, began + step_s - loop.time()))
                self._advance()
        finally:  # cancelled at shutdown (or a bug): no handler may wait forever
            for job in [*self.running, *self.waiting]:
                job._end(_ABORTED)
            self.running.clear()
            self.streams.clear()
            self.waiting.clear()
            self.finishing.clear()
            self.prompts = self.width = self.started = 0


class EngineGroup:
    """The data-parallel engines of one mock server, sharing one `Capacity` (swapped whole, so a change
    made from another thread is seen entirely or not at all, from the next step)."""

    def __init__(
        self,
        *,
        engines: int,
        capacity: Capacity,
        step_ms: float,
        step_ms_per_request: float,
        state: StateSink,
    ) -> None:
        self.capacity = capacity
        self.step_s = step_ms / 1000
        self.step_s_per_request = step_ms_per_request / 1000
        self.state = state
        self.engines = [_Engine(i, self) for i in range(engines)]
        self._turn = 0

    def check(self, prompt_tokens: int, generated_tokens: int) -> None:
        """Refuse (400) a request whose prompt and answer can never fit one engine's KV budget."""
        budget = self.capacity.kv_tokens
        need = prompt_tokens + generated_tokens
        if budget is not None and need > budget:
            raise RequestRejected(
                400,
                f"This request needs {need} tokens of KV cache ({prompt_tokens} prompt tokens + "
                f"{generated_tokens} generated tokens) but the mock engine's KV cache holds {budget} tokens. "
                f"Please reduce the length of the messages or max_tokens. (parameter=max_tokens, value={need})",
                error_type="BadRequestError",
                param="max_tokens",
            )

    def submit(
        self, prompt: int, width: int, steps: int, *, stream: bool, gone: Callable[[], bool] | None = None
    ) -> Job:
        """Queue a request on the least loaded engine (ties go round in turn); call from the server's loop."""
        engines = self.engines
        count = len(engines)
        best = engines[self._turn % count]
        best_load = len(best.running) + len(best.waiting)
        for k in range(1, count):
            engine = engines[(self._turn + k) % count]
            load = len(engine.running) + len(engine.waiting)
            if load < best_load:
                best, best_load = engine, load
        self._turn = best.index + 1
        job = Job(prompt, width, max(1, steps), stream, gone)
        best.submit(job)
        return job

    def abort(self, job: Job) -> None:
        """Take a job off its engine (the client went away); nothing when it already ended."""
        engine = job.engine
        if engine is not None and job.state in (_WAITING, _RUNNING):
            engine.abort(job)

    def set_capacity(
        self, *, batch_slots: int | None | EllipsisType = ..., kv_tokens: int | None | EllipsisType = ...
    ) -> Capacity:
        """Change the slots and/or KV budget of every engine from its next step (``...`` keeps a value).

        Safe from any thread: the new settings replace the old in one assignment. Running requests over a
        smaller KV budget get preempted by the usual rule; over fewer slots they finish, and no request is
        admitted until fewer than the new slots run.
        """
        old = self.capacity
        new = Capacity(
            batch_slots=old.batch_slots if isinstance(batch_slots, EllipsisType) else batch_slots,
            kv_tokens=old.kv_tokens if isinstance(kv_tokens, EllipsisType) else kv_tokens,
        )
        self.capacity = new
        return new

    def loads(self) -> list[EngineLoad]:
        return [engine.load() for engine in self.engines]

    async def close(self) -> None:
        """Stop the engine tasks (aborting what they still hold); call from the server's loop."""
        tasks = [e.task for e in self.engines if e.task is not None]
        for engine in self.engines:
            engine.task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass


# ---------------------------------------------------------------- /metrics


def _go_float(value: float) -> str:
    """A sample value as prometheus_client writes it (Go's formatting: ``2.0``, ``1.234567e+06``)."""
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return text


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{name}="{_label_value(value)}"' for name, value in labels.items()) + "}"


_GAUGES: Final = (
    ("vllm:num_requests_running", "Number of requests in model execution batches.", "running"),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "waiting"),
)
_COUNTERS: Final = (
    ("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", "preemptions"),
    ("vllm:prompt_tokens_total", "Number of prefill tokens processed.", "prompt_tokens"),
    ("vllm:generation_tokens_total", "Number of generation tokens processed.", "generation_tokens"),
)


def render_metrics(model_name: str, loads: Sequence[EngineLoad], capacity: Capacity | None) -> str:
    """`GET /metrics` in vLLM's Prometheus text format, one series per engine (label ``engine="i"``).

    `capacity` None (the capacity model is off) reports ``num_gpu_blocks="None"``, as vLLM before its
    cache is sized.
    """
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {_go_float(value)}" for labels, value in samples)

    engines = [(str(i), load) for i, load in enumerate(loads)]

    def each(attr: str) -> list[tuple[str, float]]:
        return [(_labels(engine=e, model_name=model_name), getattr(load, attr)) for e, load in engines]

    for name, help_text, attr in _GAUGES:
        family(name, "gauge", help_text, each(attr))
    by_reason: list[tuple[str, float]] = []
    for e, load in engines:
        by_reason.append((_labels(engine=e, model_name=model_name, reason="capacity"), load.waiting))
        by_reason.append((_labels(engine=e, model_name=model_name, reason="deferred"), 0))
    family(
        "vllm:num_requests_waiting_by_reason",
        "gauge",
        "Number of requests waiting to be processed, by reason.",
        by_reason,
    )
    family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", each("kv_usage"))
    for name, help_text, attr in _COUNTERS:
        family(name, "counter", help_text, each(attr))
    blocks = None if capacity is None else capacity.num_gpu_blocks
    info: dict[str, str] = {
        "block_size": str(BLOCK_SIZE),
        "cache_dtype": "auto",
        "gpu_memory_utilization": "0.9",
        "num_gpu_blocks": str(blocks),
    }
    family(
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
        [(_labels(**info, engine=e, model_name=model_name), 1.0) for e, _ in engines],
    )
    return "\n".join(lines) + "\n"

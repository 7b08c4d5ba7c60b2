"""`--dry-run`: the rows a run would send, and an estimate of their tokens, cost and time; nothing is sent.

The input is read as a run reads it (the same reader, `RowMapper` and `feed.row_item`), and the rows
the checkpoint holds are skipped as a run skips them (resume, `--retry-failed`, `--limit`). For each
row to send:

- input tokens: the request body's bytes as `workload.WorkEstimate` counts them before any answer
  has shown it the tokenizer (a token per 4 bytes, less the JSON around the messages);
- output tokens: `max_tokens` (or `max_completion_tokens`) × `n`: an upper bound, answers often stop
  earlier; a row with neither is assumed to write `WorkEstimate`'s starting guess (256 tokens);
- cost: those tokens at the run model's prices (`costs.run_prices`), so an upper bound too;
- time: the rows in waves of the concurrency, each request writing `DECODE_TOKENS_PER_S` tokens a
  second (an assumption, said in the report), and no faster than the per-minute quotas allow.
  Prefill, queueing and retries are left out.

No chat request is sent. A server is asked one thing, and only when it must be: the model's name
(`GET /v1/models`) when `prices:` are per model and no `--model` is given. An existing checkpoint
is read under the output's lock, as a run reads it (a crashed run's journal becomes its parts).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from batchgen.apikey import resolve_api_key
from batchgen.client import Client
from batchgen.config import RunConfig
from batchgen.costs import Prices, format_cost, run_prices
from batchgen.feed import row_item
from batchgen.io.files import output_lock
from batchgen.io.parts import FAILED, SUCCEEDED, scan_checkpoint
from batchgen.io.readers import InputSource, open_input
from batchgen.records import RowProblem
from batchgen.rows import RowMapper
from batchgen.servers import discover_model, serving
from batchgen.workload import WorkEstimate

__all__ = ["DECODE_TOKENS_PER_S", "DryRun", "RowFigures", "count_rows", "dry_run"]

# Generated tokens per second of one request on a loaded server: an assumption (a mid-size model on
# one GPU with dozens of requests batched writes 20-60 tokens/s each). The report states it.
DECODE_TOKENS_PER_S = 30.0

_START = WorkEstimate()  # the token estimate before any answer: its factors are the dry run's


@dataclass(slots=True)
class RowFigures:
    """The input's rows as a run would meet them, and the tokens of those it would send."""

    rows: int = 0  # input rows looked at (up to --limit)
    done: int = 0  # already done: skipped, as a run skips them
    to_send: int = 0  # would be sent
    invalid: int = 0  # would become error rows without being sent
    input_tokens: float = 0.0
    output_tokens: float = 0.0  # bounds, plus the assumed length of the unbounded rows
    unbounded: int = 0  # rows to send without max_tokens: each assumed to write `_START.answer_tokens`
    longest: float = 0.0  # the most output tokens of one row: no concurrency makes the run shorter than it


def _answer_bound(body: dict[str, Any]) -> int | None:
    """The most tokens a request may generate: max_tokens (or max_completion_tokens) times n."""
    bound = body.get("max_tokens")
    if type(bound) is not int or bound <= 0:
        bound = body.get("max_completion_tokens")
        if type(bound) is not int or bound <= 0:
            return None
    n = body.get("n")
    return bound * n if type(n) is int and n > 1 else bound


def count_rows(source: InputSource, mapper: RowMapper, status: bytearray, *, limit: int | None = None,
               retry_failed: bool = False) -> RowFigures:  # fmt: skip
    """Read the input as `feed.Feeder` does and count what a run would do with each row (blocking)."""
    figures = RowFigures()
    source.decode_only(mapper.columns_used)
    for batch in source.iter_batches():
        for row in batch:
            index = row.index
            if limit is not None and index >= limit:
                return figures
            figures.rows += 1
            state = status[index] if index < len(status) else 0
            if state == SUCCEEDED or (state == FAILED and not retry_failed):
                figures.done += 1
                continue
            item = row_item(mapper, row)
            if isinstance(item, RowProblem):
                figures.invalid += 1
                continue
            figures.to_send += 1
            figures.input_tokens += _START.prompt_tokens(len(orjson.dumps(item.body)))
            bound = _answer_bound(item.body)
            if bound is None:
                figures.unbounded += 1
            answer = _START.answer_tokens if bound is None else bound
            figures.output_tokens += answer
            if answer > figures.longest:
                figures.longest = answer
    return figures


def _slots(cfg: RunConfig) -> tuple[int, bool]:
    """Requests in flight at most over every server, and whether `concurrency: auto` (then its upper bound) is in it."""
    slots, auto = 0, False
    for spec in cfg.endpoint_specs():
        value = spec.concurrency if spec.concurrency is not None else cfg.concurrency
        if value == "auto":
            slots, auto = slots + cfg.concurrency_max, True
        else:
            slots += int(value)
    return slots, auto


def _duration(seconds: float) -> str:
    """An estimate's time, no more precise than it is: "90 s", "25 min", "3 h 05 min"."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 100:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


@dataclass(slots=True)
class DryRun:
    """What `--dry-run` found; `report()` is what it prints."""

    figures: RowFigures
    model: str | None  # None: not named and not asked for (the server's first model would be used)
    prices: Prices | None
    slots: int  # requests in flight at most, over every server
    auto: bool  # concurrency auto somewhere: `slots` counts its upper bound
    generation_s: float  # the rows' output at DECODE_TOKENS_PER_S per request, `slots` at a time
    quota: tuple[float, str] | None = None  # the time a per-minute quota needs, and its flag, when longer
    notes: list[str] = field(default_factory=list)

    @property
    def cost(self) -> float | None:
        return None if self.prices is None else self.prices.cost(self.figures.input_tokens, self.figures.output_tokens)

    @property
    def time_s(self) -> float:
        return self.quota[0] if self.quota is not None else self.generation_s

    def report(self) -> str:
        f = self.figures
        model = self.model if self.model is not None else "not named (the server's first model would be used)"
        lines = [f"dry run (nothing sent), model {model}"]
        rows = f"  rows: {f.rows:,} in the input, {f.done:,} already done, {f.to_send:,} to send"
        if f.invalid:
            rows += f", {f.invalid:,} invalid (they would become error rows, unsent)"
        lines.append(rows)
        if f.to_send:
            lines.extend(self._estimates())
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def _estimates(self) -> list[str]:
        f = self.figures
        per_byte = f"a token per {1 / _START.tokens_per_byte:g} bytes of request"
        about = "up to " if not f.unbounded else "~"  # max_tokens bounds the output; an assumption does not
        assumed = f"{_START.answer_tokens:.0f} assumed for each"
        if not f.unbounded:
            how = "max_tokens of every row"
        elif f.unbounded == f.to_send:
            how = f"no max_tokens: {assumed} row"
        else:
            how = f"max_tokens where set; {assumed} of the {f.unbounded:,} rows without"
        lines = [
            f"  input tokens: ~{f.input_tokens:,.0f} (estimated: {per_byte})",
            f"  output tokens: {about}{f.output_tokens:,.0f} ({how})",
        ]
        if (cost := self.cost) is not None and self.prices is not None:
            lines.append(f"  cost: {about}{format_cost(cost)} ({self.prices.describe()})")
        at = f"concurrency {self.slots}" + (", auto's upper bound" if self.auto else "")
        generation = (f"~{_duration(self.generation_s)} at {at}, assuming each request writes "
                      f"{DECODE_TOKENS_PER_S:g} tokens/s")  # fmt: skip
        if self.quota is None:
            lines.append(f"  time: {generation} (prefill, queueing and retries left out)")
        else:
            quota_s, flag = self.quota
            lines.append(f"  time: ~{_duration(quota_s)}, paced by {flag} (generation alone: {generation})")
        return lines


def _quota_time(cfg: RunConfig, figures: RowFigures, generation_s: float) -> tuple[float, str] | None:
    """The time the per-minute quotas need for these rows, when longer than generating them."""
    times = []
    if (rpm := cfg.max_requests_per_minute) is not None:
        times.append((figures.to_send / rpm * 60, f"--max-requests-per-minute {rpm:g}"))
    if (tpm := cfg.max_tokens_per_minute) is not None:  # the quota counts prompt + max_tokens at admission
        times.append(((figures.input_tokens + figures.output_tokens) / tpm * 60, f"--max-tokens-per-minute {tpm:g}"))
    slowest = max(times, default=None)
    return slowest if slowest is not None and slowest[0] > generation_s else None


async def _model(cfg: RunConfig) -> str | None:
    """The run's model when the report needs it: --model, else asked of the first server only for
    per-model prices (GET /v1/models, no chat request); None when nothing needs it."""
    if cfg.model or not cfg.prices:
        return cfg.model
    spec = cfg.endpoint_specs()[0]
    api_key = resolve_api_key(env_var=spec.api_key_env) if spec.api_key_env else cfg.resolve_api_key()
    with serving(spec.url) as url:
        async with Client(url, api_key, timeout=cfg.timeout, headers=cfg.headers, retry=cfg.retry_policy()) as client:
            return await discover_model(client, None)


async def dry_run(cfg: RunConfig, state_dir: Path) -> DryRun:
    """Estimate the run `cfg` describes; `state_dir` is its checkpoint (`pipeline.state_dir_for`).

    Raises:
        ConfigError / InputError: as the run would, before sending.
        ServerUnusableError: the model had to be asked for (per-model prices, no --model) and could not be.
    """
    source = open_input(cfg.input, cfg.input_format)
    mapper = cfg.row_mapper(source.columns, source.format)
    model = await _model(cfg)
    mapper.model = model or ""
    prices = run_prices(cfg, model)
    total = source.total_rows()
    if cfg.limit is not None and total is not None:
        total = min(total, cfg.limit)
    output = Path(cfg.output)
    status = bytearray()
    notes = []
    if cfg.overwrite:
        notes.append("--overwrite: every earlier result would be discarded first")
    elif state_dir.exists() or output.exists():
        with output_lock(output):  # never read a live run's journal
            checkpoint = await asyncio.to_thread(scan_checkpoint, state_dir, total, output if output.exists() else None)
        status = checkpoint.status
    figures = await asyncio.to_thread(count_rows, source, mapper, status, limit=cfg.limit,
                                      retry_failed=cfg.retry_failed)  # fmt: skip
    slots, auto = _slots(cfg)
    # Waves of `slots` requests; but the longest row takes its own time, whatever the concurrency.
    waves = figures.output_tokens / max(1, min(slots, figures.to_send))
    generation_s = max(waves, figures.longest) / DECODE_TOKENS_PER_S
    estimate = DryRun(figures, model, prices, slots, auto, generation_s, _quota_time(cfg, figures, generation_s), notes)
    cost = estimate.cost
    if cfg.max_cost is not None and cost is not None and cost >= cfg.max_cost:
        notes.append(f"the cost could reach --max-cost {cfg.max_cost:g}: the run would stop there (exit 4)")
    if cfg.max_duration is not None and estimate.time_s >= cfg.max_duration:
        notes.append(f"the time is over --max-duration {cfg.max_duration:g} s: the run would stop then (exit 4)")
    if cfg.max_cost is not None and prices is None:
        notes.append(f"--max-cost: no price for model {model!r}: the run would refuse to start")
    return estimate

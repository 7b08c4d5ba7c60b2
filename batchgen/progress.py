"""Run counters, the live display (a tqdm bar on a terminal, log lines elsewhere) and the summary."""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from batchgen.costs import Prices, format_cost
from batchgen.endpoints import EndpointFigures

if TYPE_CHECKING:
    from tqdm import tqdm

    from batchgen.control import RunLimits
    from batchgen.endpoints import Endpoint
    from batchgen.records import ResultRecord

__all__ = ["Progress", "RunStats"]

LOG_EVERY_S = 5.0
NEVER = sys.maxsize  # a mark no count reaches: nothing to judge


@dataclass(slots=True)
class RunStats:
    """What a run did; derived from the records it wrote, never from scattered counters."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    started: float = field(default_factory=time.perf_counter)
    endpoints: list[EndpointFigures] = field(default_factory=list)  # per server, filled at the end
    prices: Prices | None = None  # the run model's prices: the spent cost is shown (and --max-cost judged)
    # The limits `watch` judges, and for each count its mark: the nearest value at which a limit
    # could be reached. Reaching a mark costs the real check (`_judge`), which moves the marks.
    _limits: RunLimits | None = field(default=None, init=False, repr=False)
    _on_limit: Callable[[str], None] | None = field(default=None, init=False, repr=False)
    _ok_mark: int = field(default=NEVER, init=False, repr=False)
    _failed_mark: int = field(default=NEVER, init=False, repr=False)
    _input_mark: int = field(default=NEVER, init=False, repr=False)
    _output_mark: int = field(default=NEVER, init=False, repr=False)

    def add(self, record: ResultRecord) -> None:
        # Per row: one int comparison per count that moved (the marks are NEVER when nothing is
        # watched): +30 ns a row, against ~30 µs of loop CPU per row (benchmarks/README.md). The
        # counts are kept in locals as they are stored: one attribute read fewer each.
        if record["error"] is None:
            ok = self.ok = self.ok + 1
            if ok >= self._ok_mark:
                self._judge()
        else:
            self.failed += 1
            self.errors[record["error_type"] or "error"] += 1
            if self.failed >= self._failed_mark:
                self._judge()
        usage = record["usage"]
        if usage:
            tokens_in = self.input_tokens = self.input_tokens + (usage["prompt_tokens"] or 0)
            tokens_out = self.output_tokens = self.output_tokens + (usage["completion_tokens"] or 0)
            if tokens_in >= self._input_mark or tokens_out >= self._output_mark:
                self._judge()

    def watch(self, limits: RunLimits | None, on_limit: Callable[[str], None] | None = None) -> None:
        """From now on, `add` calls `on_limit(message)` once when the rows counted reach a limit
        (`max_error_rate`; `max_cost` when `prices` is set). `None` stops watching: a run whose
        every row is sent is complete, whatever its last records add up to."""
        self._limits = limits if limits is not None and limits.counted else None
        self._on_limit = on_limit
        self._judge()

    def _judge(self) -> None:
        """Stop if a limit is reached, else set each count's mark to where one could next be."""
        limits = self._limits
        ok_mark = failed_mark = input_mark = output_mark = NEVER
        message = None
        rate = limits.max_error_rate if limits is not None else None
        if limits is not None and rate is not None:
            done = self.ok + self.failed
            if done < limits.min_rows_for_error_rate:
                # First judged when `done` reaches the minimum: by successes alone, or at a failure (which moves it).
                ok_mark, failed_mark = limits.min_rows_for_error_rate - self.failed, self.failed + 1
            elif self.failed > rate * done:
                message = limits.error_rate_message(self.failed, done)
            else:
                # failed > rate·done ⟺ failed > ok·rate/(1 - rate): ok only grows, so no lower failure count can.
                failed_mark = max(self.failed + 1, int(self.ok * rate / (1 - rate)))
        prices = self.prices
        if message is None and limits is not None and limits.max_cost is not None and prices is not None:
            spent = prices.cost(self.input_tokens, self.output_tokens)
            if spent >= limits.max_cost:
                message = limits.cost_message(spent)
            else:
                # Spending the rest takes one side spending half of it at least: mark where each side alone would.
                half = (limits.max_cost - spent) / 2
                input_mark = _mark(self.input_tokens, prices.tokens_for(half, output=False))
                output_mark = _mark(self.output_tokens, prices.tokens_for(half, output=True))
        if message is not None:
            self._limits = None  # reached once: the marks stay NEVER
            ok_mark = failed_mark = input_mark = output_mark = NEVER
        self._ok_mark, self._failed_mark = ok_mark, failed_mark
        self._input_mark, self._output_mark = input_mark, output_mark
        if message is not None and self._on_limit is not None:
            self._on_limit(message)

    @property
    def cost(self) -> float | None:
        """What this run's tokens cost at `prices`; None without prices."""
        return None if self.prices is None else self.prices.cost(self.input_tokens, self.output_tokens)

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def summary(self, output: str | None) -> str:
        wall = max(self.elapsed, 1e-9)
        lines = [
            f"rows: {self.ok} ok, {self.failed} failed"
            + (f" ({', '.join(f'{k}: {v}' for k, v in self.errors.most_common())})" if self.errors else "")
            + (f", {self.skipped} already done" if self.skipped else ""),
            f"tokens: {self.input_tokens} input, {self.output_tokens} output; retries: {self.retries}",
            f"time: {wall:.1f} s, {self.done / wall:.1f} rows/s, {self.output_tokens / wall:.1f} output tokens/s",
        ]
        if self.prices is not None:  # this run's tokens only: a resumed run counts what it sent
            lines.insert(2, f"cost: {format_cost(self.prices.cost(self.input_tokens, self.output_tokens))} "
                            f"({self.prices.describe()})")  # fmt: skip
        if len(self.endpoints) > 1 or any(e.ejections for e in self.endpoints):
            lines.extend(f"  {e.line(wall)}" for e in self.endpoints)
        for endpoint in self.endpoints:
            lines.extend(endpoint.timeline_lines())
        if output:
            lines.append(f"output: {output}")
        return "\n".join(lines)


def _mark(count: int, tokens: float) -> int:
    """The count after `tokens` more (at least one more), or NEVER when that many cannot come."""
    return NEVER if math.isinf(tokens) or tokens >= NEVER - count else count + max(1, int(tokens))


class Progress:
    """Shows progress: a tqdm bar when `stream` is a terminal and `enabled`, else a line every few seconds."""

    def __init__(
        self, stats: RunStats, total: int | None, *, enabled: bool = True, stream: TextIO | None = None,
        endpoints: Sequence[Endpoint] = (),
    ) -> None:  # fmt: skip
        self.stats = stats
        self.endpoints = endpoints if len(endpoints) > 1 else ()  # one server: the totals say it all
        # concurrency auto on one server: its controller's state joins the totals
        self._controlled = endpoints[0] if len(endpoints) == 1 and endpoints[0].controller is not None else None
        self.stream = stream or sys.stderr
        self.retries = 0
        self.in_flight = 0
        self._bar: tqdm[Any] | None = None
        self._server_bars: list[tqdm[Any]] = []
        self._last_log = time.perf_counter()
        self._total = total
        if enabled and self.stream.isatty():
            from tqdm import tqdm  # only a terminal shows a bar (start-up time)

            self._bar = tqdm(total=total, file=self.stream, unit="row", dynamic_ncols=True, smoothing=0.1)
            # A line per server under the bar: its rows, state, in flight, errors, retries, tok/s.
            self._server_bars = [
                tqdm(file=self.stream, position=number, desc=e.url, bar_format="{desc}: {n_fmt} rows{postfix}",
                     dynamic_ncols=True)
                for number, e in enumerate(self.endpoints, 1)
            ]  # fmt: skip

    def _postfix(self) -> str:
        wall = max(self.stats.elapsed, 1e-9)
        text = (
            f"in-flight={self.in_flight} tok/s={self.stats.output_tokens / wall:.0f} "
            f"err={self.stats.failed} retries={self.retries}"
        )
        if (cost := self.stats.cost) is not None:
            text += f" cost={format_cost(cost)}"
        if self._controlled is not None and self._controlled.controller is not None:
            text += f" | auto: {self._controlled.controller.status()}"
        return text

    def note(self, text: str) -> None:
        """A line of its own (a server ejected or back), above the bar when there is one."""
        if self._bar is not None:
            self._bar.write(f"batchgen: {text}", file=self.stream)
        else:
            print(f"batchgen: {text}", file=self.stream)

    def refresh(self, retries: int, in_flight: int = 0) -> None:
        """Show the counters as they are now; called on a timer, not per row (tqdm costs µs per call).

        `in_flight` is the real number of requests on the wire (hidden pool caps are the commonest
        complaint about bulk clients, so it is shown rather than the configured concurrency).
        """
        self.retries, self.in_flight = retries, in_flight
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(self.stats.done - self._bar.n)
            wall = max(self.stats.elapsed, 1e-9)
            for bar, endpoint in zip(self._server_bars, self.endpoints, strict=True):
                bar.n = endpoint.rows
                auto = f" | auto: {endpoint.controller.status()}" if endpoint.controller is not None else ""
                bar.set_postfix_str(f"{endpoint.state.value}, {endpoint.in_flight}/{endpoint.limit:.0f} in flight, "
                                    f"{endpoint.errors} errors, {endpoint.retried} retries, "
                                    f"{endpoint.output_tokens / wall:.0f} tok/s{auto}")  # fmt: skip
            return
        now = time.perf_counter()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            total = f"/{self._total}" if self._total is not None else ""
            rate = self.stats.done / max(self.stats.elapsed, 1e-9)
            print(f"batchgen: {self.stats.done}{total} rows, {rate:.1f} rows/s, {self._postfix()}", file=self.stream)
            wall = self.stats.elapsed
            for endpoint in self.endpoints:
                auto = f" | auto: {endpoint.controller.status()}" if endpoint.controller is not None else ""
                print(f"batchgen:   {EndpointFigures.of(endpoint).line(wall)}{auto}", file=self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self.refresh(self.retries, self.in_flight)
            for bar in self._server_bars:
                bar.close()
            self._bar.close()

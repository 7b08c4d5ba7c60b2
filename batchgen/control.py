"""`RunControl`: the one owner of a run's stop state; everything that sends or feeds asks it.

    RUNNING ──drain(cause)──▶ DRAINING ──abort(cause)──▶ ABORTED
       └───────────────────abort(cause)─────────────────────▲

- RUNNING: rows are read, mapped and sent.
- DRAINING: nothing more is read or sent; requests in flight finish and their records are kept.
  The ClientPool drains a run when every server stopped answering (a rerun resends the rest); a
  run control (`RunLimits`: too many error rows, the deadline, the cost) drains it the same way.
- ABORTED: requests in flight are cancelled too: Ctrl-C or SIGTERM, or the result writer failed.

The first cause wins and a state never goes back. Components register what a state change must
do (`on_drain`, `on_abort`: cancel the feeder, cancel the workers) instead of keeping flags of
their own.

`RunLimits` are the run controls a user sets; reaching one drains the run with `StopCause.LIMIT`
(exit 4, a rerun resumes). `RunStats.watch` checks the row-count ones where records are counted;
the deadline is a timer (pipeline.py).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from batchgen._constants import DEFAULT_MIN_ROWS_FOR_ERROR_RATE
from batchgen.costs import format_cost

__all__ = ["RunControl", "RunLimits", "RunState", "StopCause"]


class RunState(enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"
    ABORTED = "aborted"


class StopCause(enum.Enum):
    REQUESTED = "requested"  # a caller asked (the pool used on its own, tests)
    LOST_SERVER = "lost_server"  # connection failures in a row: the server is gone
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM
    OUTPUT_FAILED = "output_failed"  # the part writer failed (disk full, permissions)
    LIMIT = "limit"  # a run control was reached: --max-error-rate, --max-duration, --max-cost


@dataclass(frozen=True, slots=True, kw_only=True)
class RunLimits:
    """The run controls: when one is reached the run drains (`StopCause.LIMIT`) and exits 4.

    Each applies to one invocation: the rows, seconds and cost of this run, not of the runs it
    resumes (a rerun starts each count again and says what it spent).

    Args:
        max_error_rate: stop when error rows / rows done exceeds this, once `min_rows_for_error_rate`
            rows are done. Every error row counts, an invalid input row too: the rate is the one the
            summary shows, and a run whose rows are mostly invalid is misconfigured.
        min_rows_for_error_rate: rows done before the rate is judged (a few early failures are noise).
        max_cost: stop when the spent cost reaches this (needs prices; `batchgen.costs`).
        max_duration: seconds from the first row read; a timer drains the run then.

    Example:
        RunLimits(max_error_rate=0.2, max_cost=5.0)
    """

    max_error_rate: float | None = None
    min_rows_for_error_rate: int = DEFAULT_MIN_ROWS_FOR_ERROR_RATE
    max_cost: float | None = None
    max_duration: float | None = None

    @property
    def counted(self) -> bool:
        """Whether a limit is judged on the counted rows (then `RunStats.watch` is needed)."""
        return self.max_error_rate is not None or self.max_cost is not None

    def error_rate_message(self, failed: int, done: int) -> str:
        return f"{failed} of {done} rows failed ({failed / done:.0%}), over --max-error-rate {self.max_error_rate:g}"

    def cost_message(self, spent: float) -> str:
        return f"spent {format_cost(spent)}, reaching --max-cost {self.max_cost:g}"

    def duration_message(self) -> str:
        return f"--max-duration {self.max_duration:g} s reached"


class RunControl:
    """The stop state of one run.

    Example:
        control = RunControl()
        control.on_abort(pool_tasks_cancel)
        control.drain(StopCause.LOST_SERVER, "the server at ... stopped answering")
        if not control.sending: ...
    """

    __slots__ = ("_on_abort", "_on_drain", "cause", "message", "state")

    def __init__(self) -> None:
        self.state = RunState.RUNNING
        self.cause: StopCause | None = None
        self.message: str | None = None
        self._on_drain: list[Callable[[], None]] = []
        self._on_abort: list[Callable[[], None]] = []

    @property
    def sending(self) -> bool:
        """Whether new requests may start (checked per request, so a plain attribute test)."""
        return self.state is RunState.RUNNING

    @property
    def aborted(self) -> bool:
        return self.state is RunState.ABORTED

    def on_drain(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the run stops sending (on drain, and on an abort from RUNNING)."""
        self._on_drain.append(callback)

    def on_abort(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the run aborts (requests in flight must be cancelled)."""
        self._on_abort.append(callback)

    def drain(self, cause: StopCause, message: str | None = None) -> None:
        """Send nothing more; in-flight requests finish. No effect once stopping."""
        if self.state is not RunState.RUNNING:
            return
        self.state, self.cause, self.message = RunState.DRAINING, cause, message
        for callback in self._on_drain:
            callback()

    def abort(self, cause: StopCause, message: str | None = None) -> None:
        """Stop now, cancelling in-flight requests. An abort after a drain keeps the drain's cause."""
        if self.state is RunState.ABORTED:
            return
        if self.state is RunState.RUNNING:
            self.cause, self.message = cause, message
            for callback in self._on_drain:
                callback()
        self.state = RunState.ABORTED
        for callback in self._on_abort:
            callback()

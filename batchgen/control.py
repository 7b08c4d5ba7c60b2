"""`RunControl`: the one owner of a run's stop state; everything that sends or feeds asks it.

    RUNNING ──drain(cause)──▶ DRAINING ──abort(cause)──▶ ABORTED
       └───────────────────abort(cause)─────────────────────▲

- RUNNING: rows are read, mapped and sent.
- DRAINING: nothing more is read or sent; requests in flight finish and their records are kept.
  The ClientPool drains a run when every server stopped answering (a rerun resends the rest).
- ABORTED: requests in flight are cancelled too: Ctrl-C or SIGTERM, or the result writer failed.

The first cause wins and a state never goes back. Components register what a state change must
do (`on_drain`, `on_abort`: cancel the feeder, cancel the workers) instead of keeping flags of
their own.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

__all__ = ["RunControl", "RunState", "StopCause"]


class RunState(enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"
    ABORTED = "aborted"


class StopCause(enum.Enum):
    REQUESTED = "requested"  # a caller asked (the pool used on its own, tests)
    LOST_SERVER = "lost_server"  # connection failures in a row: the server is gone
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM
    OUTPUT_FAILED = "output_failed"  # the part writer failed (disk full, permissions)


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

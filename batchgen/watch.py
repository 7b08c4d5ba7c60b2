"""`LostServerWatch`: tells a server that is gone from rows that failed, and drains the run.

A refused or reset connection after every retry says the server may be gone; a timeout only says
that a row is slow. When `threshold` such failures come in a row, the run is drained (nothing more
is sent) and their records are held back, never written: a rerun sends those rows again instead of
keeping them as error rows. A success or any other failure in between shows the server is there:
the held records were real failures and are released to be written.
"""

from __future__ import annotations

from batchgen.control import RunControl, StopCause
from batchgen.errors import APIConnectionError, APITimeoutError
from batchgen.records import Outcome, ResultRecord

__all__ = ["LostServerWatch"]


class LostServerWatch:
    """Holds the records of a streak of connection failures; drains `control` when it gets long.

    Args:
        control: the run's stop state.
        threshold: failures in a row that mean the server is gone (twice the concurrency is a
            good choice: every worker failed at least twice).
        server: how to name the server in the message (its base URL).
    """

    __slots__ = ("_control", "_held", "_server", "_threshold")

    def __init__(self, control: RunControl, threshold: int, server: str) -> None:
        self._control = control
        self._threshold = threshold
        self._server = server
        self._held: list[ResultRecord] = []

    def hold(self, outcome: Outcome, record: ResultRecord) -> bool:
        """Keep `record` back when its outcome was a lost connection; True when it was kept."""
        error = outcome.error
        if not isinstance(error, APIConnectionError) or isinstance(error, APITimeoutError):
            return False
        self._held.append(record)
        if len(self._held) >= self._threshold and self._control.sending:
            self._control.drain(
                StopCause.LOST_SERVER,
                f"the server at {self._server} stopped answering: {len(self._held)} requests in a row "
                f"failed after every retry (last: {error})",
            )
        return True

    def release(self) -> list[ResultRecord]:
        """The held records, to be written: the streak ended while the run goes on. Empty once the
        watch has drained the run (they stay unwritten, so a rerun resends them)."""
        if not self._held or self._control.cause is StopCause.LOST_SERVER:
            return []
        held, self._held = self._held, []
        return held

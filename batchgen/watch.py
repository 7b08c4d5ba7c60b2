"""`LostServerWatch`: keeps rows that failed for want of a server unwritten until their fate is known.

A refused or reset connection after every retry says the server may be gone; a timeout only says
that a row is slow. Such records are held back: when the run goes on (a later row succeeds or fails
for another reason), they were real failures and are released to be written; when the run is
drained because every server is gone (`ClientPool`'s `on_lost`), they are never written, so a
rerun sends those rows again instead of keeping them as error rows.
"""

from __future__ import annotations

from batchgen.control import RunControl, StopCause
from batchgen.errors import APIConnectionError, APITimeoutError
from batchgen.records import Outcome, ResultRecord

__all__ = ["LostServerWatch"]


class LostServerWatch:
    """Holds the records of a streak of connection failures.

    Args:
        control: the run's stop state (a run drained for a lost server keeps the held rows unwritten).
    """

    __slots__ = ("_control", "_held")

    def __init__(self, control: RunControl) -> None:
        self._control = control
        self._held: list[ResultRecord] = []

    def hold(self, outcome: Outcome, record: ResultRecord) -> bool:
        """Keep `record` back when its outcome was a lost connection; True when it was kept."""
        error = outcome.error
        if not isinstance(error, APIConnectionError) or isinstance(error, APITimeoutError):
            return False
        self._held.append(record)
        return True

    def release(self) -> list[ResultRecord]:
        """The held records, to be written: the streak ended while the run goes on. Empty once the
        run is drained for a lost server (they stay unwritten, so a rerun resends them)."""
        if not self._held or self._control.cause is StopCause.LOST_SERVER:
            return []
        held, self._held = self._held, []
        return held

"""`ProgressBoard`: where the actors' counters meet, so the driver can show one progress line.

Run as a Ray actor (`num_cpus=0`); actors `join` once, then send their absolute counters every
half second (`add`, fire-and-forget), and the driver reads the sums (`snapshot`). Absolute values
make a lost or repeated message harmless. Plain Python: the driver wraps it with `ray.remote`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

__all__ = ["ProgressBoard"]

_SUMMED = ("ok", "failed", "input_tokens", "output_tokens", "retries", "in_flight")


class ProgressBoard:
    def __init__(self) -> None:
        self._actors: list[int] = []  # process ids, by rank
        self._latest: dict[int, dict[str, Any]] = {}
        self._notes: list[str] = []

    def join(self, pid: int) -> int:
        """A new actor's rank (0, 1, ...): its share of the concurrency follows from it."""
        self._actors.append(pid)
        return len(self._actors) - 1

    def add(self, rank: int, counters: dict[str, Any]) -> None:
        self._latest[rank] = counters

    def note(self, text: str) -> None:
        """A line for the driver to print (a server ejected or back, seen by one actor)."""
        self._notes.append(text)

    def snapshot(self) -> dict[str, Any]:
        """The sums over every actor, and the notes since the last snapshot."""
        totals: dict[str, Any] = {name: sum(c.get(name, 0) for c in self._latest.values()) for name in _SUMMED}
        errors: Counter[str] = Counter()
        for counters in self._latest.values():
            errors.update(counters.get("errors", {}))
        totals["errors"] = dict(errors)
        totals["actors"] = len(self._actors)
        totals["notes"], self._notes = self._notes, []
        return totals

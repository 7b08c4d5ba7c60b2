"""`lean_gc`: a job collects garbage less often, and the caller's settings come back afterwards."""

from __future__ import annotations

import gc

import pytest

from batchgen.runtime import GEN0_THRESHOLD, lean_gc


def test_lean_gc_raises_the_threshold_and_restores_everything() -> None:
    before = gc.get_threshold()
    with lean_gc():
        assert gc.get_threshold()[0] == GEN0_THRESHOLD
        assert gc.get_freeze_count() > 0  # start-up objects are out of the collector's way
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_lean_gc_restores_after_an_error() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), lean_gc():
        raise RuntimeError("job failed")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0

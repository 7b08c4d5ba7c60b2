"""A local Ray for tests/ray: `ray.init(num_cpus=2)` once for this folder, stopped after it.

Without the `ray` extra every test here is skipped with the install command; with
`BATCHGEN_REQUIRE_RAY=1` (as `.ci/run` sets it) they fail instead, so CI cannot go green without
having run them. The in-process tests use this cluster directly (the engine sees Ray is already
initialised and leaves it running); the kill-and-resume test runs drivers as subprocesses that
join it by address, so killing a driver leaves nothing behind but its job's actors, which Ray ends.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator

import pytest

INSTALL_HINT = "install the Ray extra: .venv/bin/pip install -e '.[dev,ray]'"


@pytest.fixture(scope="package")
def ray_address() -> Iterator[str]:
    """The address of a local Ray cluster (2 CPUs) for tests/ray, stopped after them: its connection's
    threads and fds must not linger into tests that count them (tests/reliability)."""
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("BATCHGEN_REQUIRE_RAY") == "1":
            pytest.fail(f"BATCHGEN_REQUIRE_RAY=1 but Ray is not installed; {INSTALL_HINT}")
        pytest.skip(f"Ray is not installed; {INSTALL_HINT}")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()

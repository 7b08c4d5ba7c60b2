"""Test doubles for batchgen: a mock vLLM server to run in-process, in a thread, or from the shell.

Names are imported lazily (PEP 562) so that ``python -m batchgen.testing.mock_server`` does not import
the module twice (runpy's "found in sys.modules" RuntimeWarning) and importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchgen.testing.mock_server import (
        FAULT_KINDS,
        MockConfig,
        MockServer,
        MockState,
        add_arguments,
        main,
        make_app,
        mock_server_thread,
    )

__all__ = [
    "FAULT_KINDS",
    "MockConfig",
    "MockServer",
    "MockState",
    "add_arguments",
    "main",
    "make_app",
    "mock_server_thread",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("batchgen.testing.mock_server"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

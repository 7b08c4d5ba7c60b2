"""Which batchgen code and which machine a benchmark's figures belong to (shared by the benchmark scripts)."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def source_hash() -> str:
    """sha256 over batchgen's .py files: which code the numbers belong to (others edit it meanwhile)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "batchgen").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def machine(**extra: Any) -> dict[str, Any]:
    """The machine a results file was measured on (load average at the end), plus `extra` fields."""
    return {"cores": os.cpu_count(), "platform": platform.platform(), "loadavg_at_end": os.getloadavg(), **extra}

"""`generate(data, **options)`: a whole batch job from a DataFrame, for notebooks and scripts."""

from __future__ import annotations

import asyncio
import concurrent.futures
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.config import load_config
from batchgen.errors import ConfigError, RunIncompleteError
from batchgen.pipeline import EXIT_INTERRUPTED, RESUME_HINT, RunResult, run

if TYPE_CHECKING:
    import polars as pl

__all__ = ["generate"]


def _as_table(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if type(data).__module__.startswith("polars"):
        return data.to_arrow()
    if isinstance(data, list):
        return pa.Table.from_pylist(data)
    raise ConfigError(f"data must be a polars DataFrame, a pyarrow Table or a list of dicts, got {type(data).__name__}")


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def generate(data: Any, **options: Any) -> pl.DataFrame:  # polars is imported here, on first use
    """Send every row of `data` and return the input columns with the answer columns, in order.

    Args:
        data: a polars DataFrame, a pyarrow Table or a list of dicts, with a `messages` or a
            `prompt` column (and optional per-row override columns, as for `batchgen run`).
        **options: any `batchgen run` setting: `base_url`, `model`, `max_tokens`, `temperature`,
            `concurrency`, `stream`, `engine="ray"`, ... (`input` and `output` are managed here).

    Returns:
        A polars DataFrame with one row per input row: `id`, the input columns, `content`,
        `reasoning_content`, `tool_calls`, `finish_reason`, `usage`, `error`, ...

    Raises:
        ConfigError: bad options or data; nothing was sent.
        InputError: the data cannot be read as prompts.
        RunIncompleteError: the run was interrupted, or ended without an output (e.g. the
            server could not be used or stopped answering); `.exit_code` says which.

    Example:
        df = generate(pl.DataFrame({"prompt": ["Hi", "Bye"]}), base_url="http://localhost:8000/v1", max_tokens=32)
    """
    for key in ("input", "output"):
        if key in options:
            raise ConfigError(f"generate() manages {key!r} itself; pass the data instead")
    table = _as_table(data)
    with tempfile.TemporaryDirectory(prefix="batchgen-") as tmp:
        source = Path(tmp) / "input.parquet"
        pq.write_table(table, source)
        cfg = load_config({"progress": False, **options, "input": str(source), "output": str(Path(tmp) / "output.parquet")})
        if _in_running_loop():  # inside Jupyter: run the job on a thread with its own loop
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                result: RunResult = pool.submit(run, cfg).result()
        else:
            result = run(cfg)
        if result.exit_code == EXIT_INTERRUPTED or not Path(cfg.output).exists():
            # generate() works in a temporary directory that is gone afterwards: nothing to resume.
            message = result.message.removesuffix(RESUME_HINT)
            raise RunIncompleteError(f"batchgen: {message} (generate() cannot resume: call it again, or "
                                     "use batchgen.run with an output path to keep finished rows)",
                                     exit_code=result.exit_code)  # fmt: skip
        import polars as pl

        if cfg.engine == "ray":  # a directory of parts: the same frame as a local run's file
            return pl.read_parquet(Path(cfg.output) / "*.parquet").sort("input_index").drop("input_index")
        return pl.read_parquet(cfg.output)

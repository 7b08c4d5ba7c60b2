"""`run_on_ray(cfg)`: a `batchgen run` job on Ray Data, with the output and resume rules of `output.py`.

    driver: plan blocks (io/blocks.py) ─▶ skip chunks already written ─▶ ask every server for the model
        ─▶ ray.data.from_items(blocks).map_batches(ChunkRunner, ActorPoolStrategy) ─▶ one summary per chunk
                                                    │
               actors: read their block, send through their own ClientPool, write a part per chunk
                                                    │
        ProgressBoard (a Ray actor) ◀── counters every 0.5 s ── the driver's progress line reads it

Why our own part files and not Ray Data's checkpointing: a part per chunk of input positions
resumes without re-reading the input or holding every finished id in memory, needs no id column
(most prompt files have none), and errors still name the JSONL line; Ray Data only schedules.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import signal
import _thread
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pyarrow.compute as pc

from batchgen._constants import ExitCode
from batchgen.config import RunConfig
from batchgen.control import RunLimits
from batchgen.costs import checked_prices
from batchgen.endpoints import EndpointSpec, public_url
from batchgen import errors
from batchgen.errors import BatchgenError, ConfigError, InputError, ServerUnusableError
from batchgen.idcheck import find_duplicate_id
from batchgen.io.blocks import Block, InputShape, chunk_sizes, open_shape
from batchgen.io.files import output_lock
from batchgen.io.schema import OutputLayout
from batchgen.io.storage import is_uri
from batchgen.lengthcheck import LengthCheck, length_check_for
from batchgen.pipeline import RESUME_HINT, RunResult  # the one result of every engine
from batchgen.progress import Progress, RunStats
from batchgen.ray_engine.actor import CALLS_PER_ACTOR, ChunkRunner, Job, Secret
from batchgen.ray_engine.board import ProgressBoard
from batchgen.ray_engine.output import INPUT_INDEX, OutputDir, PartInfo, holds_chunk
from batchgen.servers import check_endpoints, serving_all

__all__ = ["RAY_INSTALL_HINT", "run_on_ray"]

RAY_INSTALL_HINT = "the Ray engine needs Ray Data: pip install 'batchgen[ray]'"
POLL_EVERY_S = 0.5
# `ray start` in Ray 2.60 turns token authentication on; a client only sends the token when asked to.
_AUTH_HINT = (
    "; if the cluster uses token authentication (as `ray start` of Ray 2.60 does by default), run with "
    "RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
)
_RAISED = re.compile(r"batchgen\.errors\.(\w+): (.*)")


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ConfigError(RAY_INSTALL_HINT) from exc
    return ray


@dataclasses.dataclass(slots=True)
class _Work:
    """What this run must do: the blocks with chunks to write, and the rows of the job."""

    tasks: list[dict[str, Any]]
    wanted: int  # rows in the job (up to --limit)
    skipped: int  # of them, rows already in the output


def _plan_work(blocks: list[Block], done: dict[int, PartInfo], chunk_rows: int, limit: int | None,
               retry_failed: bool = False) -> _Work:  # fmt: skip
    """The blocks with chunks to write (`skip`: chunks whose part is whole; `retry`, with `retry_failed`:
    whole parts holding error rows, whose error rows are sent again)."""
    tasks: list[dict[str, Any]] = []
    wanted = skipped = 0
    for block in blocks:
        if limit is not None and block.start >= limit:
            break
        skip, retry, todo = [], [], 0
        for start, rows in chunk_sizes(block, chunk_rows, limit):
            wanted += rows
            part = done.get(start)
            if not holds_chunk(part, rows):
                todo += 1
            elif retry_failed and part is not None and part.errors:
                retry.append(start)
                skipped += rows - part.errors
            else:
                skip.append(start)
                skipped += rows
        if todo or retry:
            tasks.append({**dataclasses.asdict(block), "row_groups": list(block.row_groups), "skip": skip, "retry": retry})
    return _Work(tasks, wanted, skipped)


def _manifest(shape: InputShape, chunk_rows: int, id_column: str | None) -> dict[str, Any]:
    """What the parts depend on: the same input, cut the same way, with the same ids."""
    return {
        "input": shape.input,
        "format": shape.format,
        "files": [[f.text, size] for f, size in zip(shape.files, shape.sizes, strict=True)],
        "ray_block_rows": chunk_rows,
        "id_column": id_column,
    }


def run_on_ray(cfg: RunConfig, *, log: TextIO) -> RunResult:
    """Run `cfg` on Ray (a local one, or the cluster at `cfg.ray_address`).

    Raises:
        ConfigError: Ray is not installed (nothing sent), or a bad setting.
        InputError / OutputError: before anything is sent, or when the input changed mid-run.
    """
    ray = _import_ray()
    shape = open_shape(cfg.input, cfg.input_format)
    mapper = cfg.row_mapper(shape.columns, shape.format)
    layout = OutputLayout.of(shape.passthrough_schema, mapper.id_column, reserved=(INPUT_INDEX,))
    output = OutputDir(cfg.output)
    lock = output_lock(Path(cfg.output)) if not is_uri(cfg.output) else contextlib.nullcontext()
    with lock:
        if cfg.overwrite:
            output.clear()
        blocks, ids = shape.plan(cfg.ray_block_rows, id_column=mapper.id_column)
        if not blocks:
            raise InputError(f"{shape.input} is empty: no data rows")
        if ids is not None and (duplicate := find_duplicate_id(ids)) is not None:
            value, first, second = duplicate
            raise InputError(f"duplicate id {value!r} in column {mapper.id_column!r}: input rows {first} and {second}")
        output.prepare(_manifest(shape, cfg.ray_block_rows, mapper.id_column))
        work = _plan_work(blocks, output.done(), cfg.ray_block_rows, cfg.limit, cfg.retry_failed)
        stats = RunStats(skipped=work.skipped)
        if not work.tasks:
            return _finished(output, stats, nothing_to_do=True)
        api_key = cfg.resolve_api_key()
        with serving_all(cfg.endpoint_specs()) as specs:
            try:
                model, kept, check = asyncio.run(_ask_servers(cfg, specs, api_key, log))
            except ServerUnusableError as exc:
                return RunResult(ExitCode.FATAL, stats, output.text, str(exc))
            job = Job(cfg, shape, layout, output, tuple(kept), model, Secret(api_key) if api_key else None, actors=1,
                      limit=cfg.limit, context=check.max_model_len if check else None,
                      exact_length=check is not None and check.exact)  # fmt: skip
            return _execute(ray, job, work, stats, log)


async def _ask_servers(cfg: RunConfig, specs: list[EndpointSpec], api_key: str | None,
                       log: TextIO) -> tuple[str, list[EndpointSpec], LengthCheck | None]:  # fmt: skip
    """The model, checked on every server as a local run does; the servers left (`--skip-bad-endpoints`);
    the length check the actors apply."""
    def warn(text: str) -> None:
        print(f"batchgen: warning: {text}", file=log)

    async with cfg.client_pool(specs, api_key, concurrency=1) as servers:
        model, context = await check_endpoints(servers, cfg.model, skip_bad=cfg.skip_bad_endpoints, warn=warn)
        check = await length_check_for(cfg.check_length, servers, model, context, warn=warn)
        kept = {e.url for e in servers.endpoints}
    return model, [spec for spec in specs if public_url(spec.url) in kept], check


def _execute(ray: Any, job: Job, work: _Work, stats: RunStats, log: TextIO) -> RunResult:
    cfg = job.cfg
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=cfg.ray_address, include_dashboard=False, logging_level=logging.ERROR,
                     log_to_driver=False)  # fmt: skip
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {cfg.ray_address}" if cfg.ray_address else "a Ray cluster"
            return RunResult(ExitCode.FATAL, stats, job.output.text, f"cannot start or reach {where}: {exc}{_AUTH_HINT}")
    ready_after = time.perf_counter() - stats.started
    _quiet_ray_data(ray)
    try:
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = min(cfg.ray_actors or max(1, cluster_cpus), len(work.tasks))
        board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        job = dataclasses.replace(job, actors=actors, board=board)
        dataset = ray.data.from_items(work.tasks, override_num_blocks=len(work.tasks)).map_batches(
            ChunkRunner,
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=CALLS_PER_ACTOR,
                                               max_concurrent_calls_per_actor=CALLS_PER_ACTOR),
            num_cpus=cfg.ray_actor_cpus,
            fn_constructor_kwargs={"job": job},
        )  # fmt: skip
        print(f"batchgen: Ray engine: {work.wanted - work.skipped} rows to send in {len(work.tasks)} blocks "
              f"over {actors} actors{f', {work.skipped} rows already done' if work.skipped else ''} "
              f"(Ray ready after {ready_after:.1f} s)", file=log)  # fmt: skip
        stats.started = time.perf_counter()  # rows/s from here: the sending, not Ray's start-up
        stats.prices = checked_prices(cfg, job.model)
        limits = RunLimits(max_error_rate=cfg.max_error_rate, min_rows_for_error_rate=cfg.min_rows_for_error_rate,
                           max_cost=cfg.max_cost, max_duration=cfg.max_duration)  # fmt: skip
        progress = Progress(stats, work.wanted - work.skipped, enabled=cfg.progress, stream=log)
        written = dict.fromkeys(("rows", "errors", "input_tokens", "output_tokens"), 0)  # exact, from the chunks
        limited: list[str] = []  # why a run limit stopped the job, once one did
        lost: str | None = None
        try:
            summaries = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
            with _polling(ray, board, stats, progress, limits, limited), _sigterm_interrupts(), _closing(summaries):
                for summary in summaries:
                    for name, total in written.items():
                        written[name] = total + (pc.sum(summary.column(name)).as_py() or 0)
                    gone = pc.drop_null(summary.column("stopped"))
                    if len(gone):  # leaving the loop ends the dataset: the other actors stop too
                        lost = str(gone[0])
                        break
                    if limited:  # seen by the poller, which cannot interrupt a driver off the main thread
                        break
        except KeyboardInterrupt:
            if not limited:
                saved = written["rows"]
                return RunResult(ExitCode.INTERRUPTED, stats, job.output.text, f"interrupted: {saved} rows saved{RESUME_HINT}")
        except Exception as exc:
            ours = _our_error(exc)
            if ours is not None:
                raise ours from exc
            raise
        finally:
            progress.close()
        stats.ok, stats.failed = written["rows"] - written["errors"], written["errors"]
        stats.input_tokens, stats.output_tokens = written["input_tokens"], written["output_tokens"]
        if lost is not None:
            return RunResult(ExitCode.FATAL, stats, job.output.text, f"{lost}; {stats.done} rows saved{RESUME_HINT}")
        if limited:  # the chunks in flight went with the dataset: only whole parts stay, the ones on disk now
            saved = sum(part.rows for part in job.output.done().values()) - work.skipped
            return RunResult(ExitCode.STOPPED, stats, job.output.text, f"stopped: {limited[0]}; {saved} rows saved{RESUME_HINT}")
        return _finished(job.output, stats)
    finally:
        if started_here:
            ray.shutdown()


def _finished(output: OutputDir, stats: RunStats, *, nothing_to_do: bool = False) -> RunResult:
    parts = output.done()
    rows = sum(p.rows for p in parts.values())
    errors = sum(p.errors for p in parts.values())
    code = ExitCode.ROW_ERRORS if errors else ExitCode.OK
    if nothing_to_do:
        message = f"nothing to do: every row is already in {output.text} ({errors} error rows)"
    else:
        message = f"{output.text} holds {rows} rows ({errors} error rows) in {len(parts)} part files"
    return RunResult(code, stats, output.text, message)


@contextlib.contextmanager
def _polling(ray: Any, board: Any, stats: RunStats, progress: Progress, limits: RunLimits,
             limited: list[str]) -> Iterator[None]:  # fmt: skip
    """Feed the progress display from the board on a thread, while the main thread drives Ray Data; when
    a run limit is reached, say why in `limited` and interrupt the main thread (the loop sees it otherwise)."""
    stop = threading.Event()

    def poll() -> None:
        while True:
            finished = stop.wait(POLL_EVERY_S)
            with contextlib.suppress(Exception):  # the display must never fail the job
                snapshot = ray.get(board.snapshot.remote(), timeout=10)
                stats.ok, stats.failed = snapshot["ok"], snapshot["failed"]
                stats.input_tokens, stats.output_tokens = snapshot["input_tokens"], snapshot["output_tokens"]
                stats.errors.clear()
                stats.errors.update(snapshot["errors"])
                stats.retries = snapshot["retries"]
                for note in snapshot["notes"]:
                    progress.note(note)
                progress.refresh(snapshot["retries"], snapshot["in_flight"])
                if not finished and not limited:
                    stats.watch(limits, reached)  # the error rate and the cost, judged as a local run judges them
                    if not limited and limits.max_duration is not None and stats.elapsed >= limits.max_duration:
                        reached(limits.duration_message())
            if finished:
                return

    is_main_thread = threading.current_thread() is threading.main_thread()

    def reached(message: str) -> None:
        limited.append(message)
        if is_main_thread:
            _thread.interrupt_main()

    thread = threading.Thread(target=poll, name="batchgen-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _closing(batches: Any) -> Iterator[None]:
    """End the dataset when we stop reading it early: Ray Data shuts its actors down, so nothing more is written."""
    try:
        yield
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops the driver as Ctrl-C does (written parts stay; a rerun resumes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_ray_data(ray: Any) -> None:
    """Our progress line instead of Ray Data's bars and per-dataset log lines."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    for name in ("print_on_execution_start", "enable_operator_progress_bars"):
        if hasattr(context, name):
            setattr(context, name, False)
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _our_error(exc: BaseException) -> BatchgenError | None:
    """The batchgen error an actor raised (an unreadable input, an unwritable part), rebuilt from the
    traceback text Ray wraps it in: the exception object itself does not cross the process boundary."""
    found = _RAISED.findall(str(exc))
    if not found:
        return None
    name, message = found[-1]
    kind = getattr(errors, name, None)
    return kind(message) if isinstance(kind, type) and issubclass(kind, BatchgenError) else None

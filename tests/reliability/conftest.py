"""Shared pieces of the reliability suite (issue 5): servers on 127.0.0.1, CLI runners, input
writers, output checks, deadline polling and the figures that `scripts/reliability_report.py`
puts in `docs/reliability.md`.

Nothing here sleeps and hopes: every wait polls a condition until a deadline and fails with
what it was waiting for. Subprocesses (the batchgen CLI, the mock server) are always killed
on the way out, so a hung run can never hang the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ..conftest import AttemptCounter, prompt_of

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


# ---------------------------------------------------------------- report figures


@pytest.fixture(autouse=True)
def _describe_test(request: pytest.FixtureRequest) -> None:
    """Record the scenario (module docstring) and what the test checks (its docstring) for the report."""
    module_doc = (request.module.__doc__ or "").strip().splitlines()
    test_doc = (getattr(request.function, "__doc__", None) or "").strip()
    request.node.user_properties.append(("scenario", module_doc[0] if module_doc else request.module.__name__))
    request.node.user_properties.append(("checks", " ".join(test_doc.split())))


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[..., None]:
    """`figures(rows=2000, retries=12)`: numbers the report shows for this test.

    They go to the test's `user_properties` (exported by `--junitxml` as `fig:<name>`), which is
    what `record_property` does minus its warning under the xunit2 family.
    """

    def record(**values: Any) -> None:
        for name, value in values.items():
            request.node.user_properties.append((f"fig:{name}", value))

    return record


# ---------------------------------------------------------------- polling with deadlines


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


async def await_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """The async twin of `wait_until` (lets the event loop run servers and runs meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


async def run_bounded(settings: Mapping[str, Any], deadline: float = 60) -> Any:
    """`run_async` of a job, in this event loop, failing (instead of hanging the suite) past `deadline` s.

    On a hang, batchgen's own tasks are cancelled (a second cancel reaches a task that swallowed
    the first) and the assertion names the coroutines that were stuck.
    """
    from batchgen.config import load_config
    from batchgen.pipeline import run_async

    before = asyncio.all_tasks()
    task = asyncio.create_task(run_async(load_config(dict(settings)), log=io.StringIO()))
    done, _ = await asyncio.wait({task}, timeout=deadline)
    if task in done:
        try:
            return task.result()
        except Exception as exc:  # name the real error(s), not "unhandled errors in a TaskGroup"
            raise AssertionError(f"the run crashed: {_leaves(exc)}") from exc
    stuck = [t for t in asyncio.all_tasks() - before
             if "/batchgen/" in getattr(getattr(t.get_coro(), "cr_code", None), "co_filename", "")]
    names = sorted({getattr(t.get_coro(), "__qualname__", repr(t)) for t in stuck})
    for t in stuck:
        t.cancel()
    await asyncio.wait(stuck, timeout=5)
    raise AssertionError(f"the run hung: not finished {deadline:.0f} s after it started; stuck in {names}")


def _leaves(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_leaves(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------- processes


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: batchgen importable from the work tree, no stray keys."""
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHGEN_API_KEY", "OPENAI_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def batchgen_command(*args: str) -> list[str]:
    return [PYTHON, "-m", "batchgen", *args]


def run_args(input_path: Path, output: Path, url: str, *extra: str, config: Path | None = None) -> list[str]:
    """Arguments of `batchgen run` with the settings every reliability run shares."""
    head = ["run", str(config)] if config is not None else ["run"]
    return [*head, "--input", str(input_path), "--output", str(output), "--base-url", url, "--model", "mock-model",
            "--no-progress", *extra]


@dataclass
class CliResult:
    returncode: int | None  # None: killed at the deadline
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_cli(args: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None) -> CliResult:
    """Run `python -m batchgen ARGS` to the end, or kill it at `timeout` (then returncode is None)."""
    started = time.monotonic()
    proc = subprocess.Popen(batchgen_command(*args), env=dict(env or subprocess_env()), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        code = None
    return CliResult(code, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - started)


async def run_cli_async(args: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None) -> CliResult:
    """`run_cli` for async tests: the event loop keeps serving the in-process servers meanwhile."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*batchgen_command(*args), env=dict(env or subprocess_env()),
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                stdin=subprocess.DEVNULL)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        code: int | None = proc.returncode
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        code = None
    return CliResult(code, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - started)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class MockProcess:
    """`python -m batchgen.testing.mock_server` as a child process on a fixed port (so it can be
    killed with SIGKILL and started again on the same address)."""

    def __init__(self, log_dir: Path, *flags: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.flags = flags
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _spawn(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "mock server already running"
        self.starts += 1
        log = open(self.log_dir / f"mock-{self.port}-{self.starts}.log", "wb")  # noqa: SIM115 - closed below
        try:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "batchgen.testing.mock_server", "--port", str(self.port), *self.flags],
                env=subprocess_env(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"mock server exited with {self.proc.returncode}; see {self.log_dir}")
        return _accepts(self.port)

    def start(self, timeout: float = 30) -> None:
        self._spawn()
        wait_until(self._ready, timeout, f"the mock server on port {self.port}", interval=0.05)

    async def astart(self, timeout: float = 30) -> None:
        self._spawn()
        await await_until(self._ready, timeout, f"the mock server on port {self.port}", interval=0.05)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the open connections, as when a server host dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def mock_process(tmp_path: Path) -> Iterator[Callable[..., MockProcess]]:
    """Factory of `MockProcess`es, each killed at teardown."""
    made: list[MockProcess] = []

    def make(*flags: str, port: int | None = None) -> MockProcess:
        mock = MockProcess(tmp_path, *flags, port=port)
        made.append(mock)
        return mock

    yield make
    for mock in made:
        mock.kill()


# ---------------------------------------------------------------- inputs and outputs


def row_ids(n: int) -> list[str]:
    return [f"r{i}" for i in range(n)]


def prompts(n: int) -> list[str]:
    return [f"question {i}" for i in range(n)]


def row_of_prompt(prompt: str) -> str:
    """The row a prompt of `prompts` belongs to: "question 7" -> "r7"; any other prompt fails the test."""
    number = prompt.removeprefix("question ")
    assert number != prompt and number.isdigit(), f"a request for no row of `prompts`: {prompt[:80]!r}"
    return f"r{number}"


def echo(prompt: str) -> str:
    """The mock server's deterministic answer to a one-message conversation."""
    return f"echo: {prompt}"


def write_prompts(path: Path, n: int, *, row_group_size: int = 256) -> Path:
    """A Parquet input of `n` rows: `id` = r0..r{n-1}, `prompt` = "question i"."""
    pq.write_table(pa.table({"id": row_ids(n), "prompt": prompts(n)}), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, lines: Sequence[bytes | dict[str, Any]], *, final_newline: bool = True) -> Path:
    raw = [line if isinstance(line, bytes) else orjson.dumps(line) for line in lines]
    path.write_bytes(b"\n".join(raw) + (b"\n" if final_newline else b""))
    return path


def read_output(path: Path) -> pl.DataFrame:
    if path.suffix == ".jsonl":
        return pl.DataFrame([orjson.loads(line) for line in path.read_bytes().splitlines()], infer_schema_length=None)
    return pl.read_parquet(path)


def assert_every_row_once_in_order(out: pl.DataFrame, n: int) -> None:
    """One successful row per input row, in input order, with the echo answer for its own prompt."""
    assert out.height == n, f"{out.height} output rows for {n} input rows"
    ids = out["id"].to_list()
    assert ids == row_ids(n), "ids are not the input ids in input order"
    assert out["id"].n_unique() == n, "an id appears twice"
    bad = out.filter(pl.col("error").is_not_null())
    assert bad.height == 0, f"{bad.height} error rows, e.g. {bad.head(3).select('id', 'error_type', 'error').to_dicts()}"
    wrong = [i for i, (got, want) in enumerate(zip(out["content"].to_list(), prompts(n), strict=True)) if got != echo(want)]
    assert not wrong, f"rows {wrong[:5]} hold another row's answer or none"


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def state_dir(output: Path) -> Path:
    return Path(str(output) + ".batchgen")


def rows_on_disk(output: Path) -> int:
    """Rows in finished part files (and the final output), read without touching anything.

    (Not `scan_checkpoint`: it deletes `.tmp` files, which would break a run that is writing one.)
    """
    total = 0
    directory = state_dir(output)
    if directory.is_dir():
        for part in directory.glob("part-*.parquet"):
            with contextlib.suppress(OSError, pa.ArrowException):
                total += pq.read_metadata(part).num_rows
    return total


# ---------------------------------------------------------------- mock fault replay


@dataclass(frozen=True)
class Attempt:
    row_id: str
    attempt: int
    fault: str | None


def replay_faults(requests: Sequence[Mapping[str, Any]], fault_rate: float, faults: Sequence[str],
                  seed: int) -> list[Attempt]:
    """Which fault the mock gave each recorded attempt (`requests`: the bodies in `MockState.requests`).

    The mock records a request and draws its fault from `random.Random(seed)` in one synchronous
    step (`_Routes._accept`), so replaying the draws in record order gives each attempt's fault.
    The row comes from the prompt (`row_of_prompt`), the attempt from counting that row's requests.
    """
    rng = random.Random(seed)
    counter = AttemptCounter()
    attempts = []
    for body in requests:
        fault = rng.choice(list(faults)) if rng.random() < fault_rate else None
        row_id = row_of_prompt(prompt_of(body))
        attempts.append(Attempt(row_id, counter.next(row_id), fault))
    return attempts


# ---------------------------------------------------------------- hand-written servers


def completion_body(content: Any, *, message: Mapping[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """A well-formed non-stream chat completion; `message` / `top` override its fields."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "mock-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, **(message or {})},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }
    body.update(top)
    return body


def stream_events(content: str) -> list[dict[str, Any]]:
    """The SSE events of a well-formed stream (role, content, finish, usage); `[DONE]` is separate."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "mock-model"}
    return [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {**base, "choices": [{"index": 0, "delta": {"content": content}}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}},
    ]


def sse(event: Mapping[str, Any] | bytes) -> bytes:
    return b"data: " + (event if isinstance(event, bytes) else orjson.dumps(event)) + b"\n\n"


DONE = b"data: [DONE]\n\n"


@dataclass
class Call:
    """One request to a `bad_server`: the row (from the prompt), the attempt (that row's k-th request
    to this server), what the normal answer would be."""

    request: web.Request
    body: dict[str, Any]
    row_id: str
    attempt: int
    reply: str
    stream: bool


Misbehave = Callable[[Call], Awaitable[web.StreamResponse | None]]


@dataclass
class BadServer:
    url: str
    calls: list[tuple[str, int]] = field(default_factory=list)  # (row id, attempt) in arrival order


async def send_sse(request: web.Request, frames: Sequence[bytes], *, pause_before: int | None = None,
                   pause_s: float = 0.0) -> web.StreamResponse:
    """Write SSE frames one by one; optionally pause `pause_s` before frame `pause_before`."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):
        for i, frame in enumerate(frames):
            if i == pause_before:
                await asyncio.sleep(pause_s)
            await resp.write(frame)
    return resp


async def _normal_answer(call: Call) -> web.StreamResponse:
    if call.stream:
        return await send_sse(call.request, [*(sse(e) for e in stream_events(call.reply)), DONE])
    return web.Response(body=orjson.dumps(completion_body(call.reply)), content_type="application/json")


@pytest.fixture
async def bad_server() -> AsyncIterator[Callable[[Misbehave], Awaitable[BadServer]]]:
    """Start an OpenAI-compatible server that answers `echo: <prompt>` (plain or SSE, as asked)
    unless `misbehave(call)` returns a response of its own for that call. Prompts must be those of
    `prompts` (`write_prompts`): they tell each call's row."""
    servers: list[TestServer] = []

    async def start(misbehave: Misbehave) -> BadServer:
        state = BadServer(url="")
        attempts = AttemptCounter()

        async def chat(request: web.Request) -> web.StreamResponse:
            body = orjson.loads(await request.read())
            prompt = prompt_of(body)
            row_id = row_of_prompt(prompt)
            call = Call(request, body, row_id, attempts.next(row_id), echo(prompt), bool(body.get("stream")))
            state.calls.append((call.row_id, call.attempt))
            response = await misbehave(call)
            return response if response is not None else await _normal_answer(call)

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", chat)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        state.url = str(server.make_url("/v1"))
        return state

    yield start
    for server in servers:
        await server.close()


@dataclass
class Recorder:
    url: str
    seen: list[str] = field(default_factory=list)  # "METHOD /path" of every request, any route


@pytest.fixture
async def recording_server() -> AsyncIterator[Recorder]:
    """A server that answers 503 to everything and records every request: proof that nothing was sent."""
    recorder = Recorder(url="")

    async def anything(request: web.Request) -> web.Response:
        recorder.seen.append(f"{request.method} {request.path}")
        return web.Response(status=503, text="recording server")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    recorder.url = str(server.make_url("/v1"))
    yield recorder
    await server.close()


def yaml_config(path: Path, **settings: Any) -> Path:
    """Write a flat YAML job file (JSON is valid YAML) for the config-only keys like flush_seconds."""
    path.write_bytes(orjson.dumps(settings))
    return path


def ok_ids_on_disk(output: Path) -> set[str]:
    """Ids of the successful rows in the final output and the finished part files (no process may be running)."""
    ids: set[str] = set()
    if output.exists():
        ids |= set(read_output(output).filter(pl.col("error").is_null())["id"].to_list())
    directory = state_dir(output)
    if directory.is_dir():
        for part in directory.glob("part-*.parquet"):
            table = pq.read_table(part, columns=["id", "error"])
            ids |= {i for i, e in zip(table["id"].to_pylist(), table["error"].to_pylist(), strict=True) if e is None}
    return ids


def mentions_lost_server(text: str) -> bool:
    """Whether a message says the server could not be reached (in any of the usual words)."""
    lowered = text.lower()
    return any(word in lowered for word in ("connect", "unreachable", "stopped answering", "not answering"))

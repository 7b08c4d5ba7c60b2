"""Secrets: with a recognisable API key from the environment, a key file or the config, nothing the run leaves behind holds it: output file and its metadata, part files, stdout/stderr, error messages, --help."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batchgen.testing.mock_server import FAULT_KINDS, MockConfig, MockServer

from .conftest import (
    BadServer,
    Call,
    await_until,
    batchgen_command,
    files_under,
    read_output,
    row_ids,
    rows_on_disk,
    run_args,
    run_cli,
    run_cli_async,
    state_dir,
    subprocess_env,
    write_prompts,
    yaml_config,
)

KEY = "sk-batchgen-SECRET-4242"
ENV_VAR = "RELIABILITY_TEST_KEY"
ROWS = 300


def _places(path: Path) -> Iterable[tuple[str, bytes]]:
    """Every form in which a file could hold the key: its bytes, and for Parquet also the decoded
    values (pages may be compressed) and the footer's key-value metadata."""
    yield "bytes", path.read_bytes()
    if path.suffix == ".parquet":
        yield "values", orjson.dumps(pq.read_table(path).to_pylist(), default=str)
        meta = pq.read_metadata(path)
        yield "file metadata", repr(meta.metadata).encode()
        yield "schema metadata", repr(meta.schema.to_arrow_schema().metadata).encode()


def find_key(*, texts: dict[str, str] | None = None, roots: Iterable[Path] = (), skip: Iterable[Path] = ()) -> list[str]:
    """Where the key shows up: named texts (stdout, stderr, ...) and every file under `roots`."""
    found = [name for name, text in (texts or {}).items() if KEY in text]
    skipped = {p.resolve() for p in skip}
    for root in roots:
        for path in files_under(root):
            if path.resolve() in skipped:
                continue
            found += [f"{path.name} ({where})" for where, data in _places(path) if KEY.encode() in data]
    return found


def _env(**extra: str) -> dict[str, str]:
    return subprocess_env(**extra)


async def _interrupt_then_finish(args: list[str], env: dict[str, str], output: Path, tmp_path: Path,
                                 ) -> tuple[list[str], dict[str, str]]:
    """Run until part files exist, SIGTERM, scan everything (parts included), then run to the end."""
    proc = await asyncio.create_subprocess_exec(*batchgen_command(*args), env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        await await_until(lambda: rows_on_disk(output) > 0 or proc.returncode is not None, 60, "the first part file")
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, err.decode()
    assert any(state_dir(output).glob("part-*.parquet")), "no part file to inspect"
    leaks = find_key(texts={"interrupted stdout": out.decode(), "interrupted stderr": err.decode()}, roots=[tmp_path],
                     skip=[tmp_path / "key.txt"])
    final = await run_cli_async(args, timeout=60, env=env)
    texts = {"stdout": final.stdout, "stderr": final.stderr, "exit": str(final.returncode)}
    return leaks, texts


@pytest.mark.slow
@pytest.mark.parametrize("source", ["env", "file"])
async def test_key_from_env_or_file_authenticates_and_leaves_no_trace(source: str, tmp_path: Path, figures: Any) -> None:
    """The mock requires the key (so it is really sent); the mock also injects every fault kind at rate 0.2 and rows get no retry, so error rows exist. A run is interrupted (SIGTERM) while part files exist, then finished. The key is in no part file, output bytes, decoded output values or Parquet metadata, and in no stdout/stderr of either run."""
    mock = MockConfig(api_key=KEY, latency_ms=10, fault_rate=0.2, faults=tuple(k for k in FAULT_KINDS if k != "stall"),
                      seed=3, retry_after_s=0.01)
    input_path, output = write_prompts(tmp_path / "in.parquet", ROWS), tmp_path / "out.parquet"
    if source == "env":
        env, config = _env(**{ENV_VAR: KEY}), yaml_config(tmp_path / "job.yaml", flush_seconds=0.1, api_key_env=ENV_VAR)
    else:
        (tmp_path / "key.txt").write_text(KEY + "\n")
        env = _env()
        config = yaml_config(tmp_path / "job.yaml", flush_seconds=0.1, api_key_file=str(tmp_path / "key.txt"))
    async with MockServer(mock) as server:
        args = run_args(input_path, output, server.url, "--concurrency", "4", "--max-retries", "0", config=config)
        leaks, texts = await _interrupt_then_finish(args, env, output, tmp_path)
    assert texts["exit"] == "1", texts["stderr"]  # completed, with the injected faults as error rows
    out = read_output(output)
    assert out["id"].to_list() == row_ids(ROWS)
    ok = out.filter(out["error"].is_null()).height
    assert ok > ROWS // 2, "the key did not authenticate"
    assert out.filter(out["status_code"] == 401).height == 0
    leaks += find_key(texts=texts, roots=[tmp_path], skip=[tmp_path / "key.txt"])
    figures(rows=ROWS, ok_rows=ok, error_rows=ROWS - ok, places_checked=len(files_under(tmp_path)) + 4, leaks=len(leaks))
    assert not leaks, f"the key leaked into: {leaks}"


def _echo_auth(status: int) -> Callable[[Call], Awaitable[web.StreamResponse | None]]:
    """A failing server that reflects the request's Authorization header in its error message."""

    async def respond(call: Call) -> web.StreamResponse:
        auth = call.request.headers.get("Authorization", "")
        body = {"error": {"message": f"rejected request with Authorization: {auth}", "type": "Error", "code": status}}
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")

    return respond


FAILING = ["mock_every_fault", "echoes_key_in_401", "echoes_key_in_500"]


@pytest.mark.parametrize("kind", FAILING)
async def test_failing_server_error_rows_and_messages_hold_no_key(
    kind: str, tmp_path: Path, bad_server: Callable[..., Awaitable[BadServer]], figures: Any
) -> None:
    """Against a failing server (the mock faulting every request, or a server that echoes the Authorization header back in its 401/500 error message) every row is an error row; the key (from the environment) is in no error message, output file or stdout/stderr."""
    input_path, output = write_prompts(tmp_path / "in.parquet", 40), tmp_path / "out.parquet"
    env = _env(**{ENV_VAR: KEY})
    extra = ["--api-key-env", ENV_VAR, "--max-retries", "1", "--concurrency", "4"]
    config = yaml_config(tmp_path / "job.yaml", backoff_base=0.001, timeout=2)
    if kind == "mock_every_fault":
        faults = tuple(k for k in FAULT_KINDS if k not in ("stall", "disconnect"))  # no connection errors: no abort
        async with MockServer(MockConfig(api_key=KEY, fault_rate=1.0, faults=faults, retry_after_s=0.01)) as mock:
            result = await run_cli_async(run_args(input_path, output, mock.url, *extra, config=config), timeout=60, env=env)
    else:
        server = await bad_server(_echo_auth(401 if kind.endswith("401") else 500))
        result = await run_cli_async(run_args(input_path, output, server.url, *extra, config=config), timeout=60, env=env)
    assert result.returncode == 1, result.stderr
    out = read_output(output)
    assert out["error"].null_count() == 0, "every row should be an error row"
    leaks = find_key(texts={"stdout": result.stdout, "stderr": result.stderr}, roots=[tmp_path])
    figures(rows=40, error_rows=out.height, error=out["error"][0], leaks=len(leaks))
    assert not leaks, f"the key leaked into: {leaks}; e.g. error row: {out['error'][0]!r}"


async def test_key_written_in_the_config_works_but_warns(tmp_path: Path, figures: Any) -> None:
    """`api_key:` written in the YAML job file authenticates against the mock (which requires it), and the run prints a warning that names neither the key nor its value; the key appears in no output."""
    input_path, output = write_prompts(tmp_path / "in.parquet", 50), tmp_path / "out.parquet"
    config = yaml_config(tmp_path / "job.yaml", api_key=KEY)
    async with MockServer(MockConfig(api_key=KEY)) as server:
        result = await run_cli_async(run_args(input_path, output, server.url, config=config), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr.lower() and "api_key" in result.stderr, result.stderr
    assert read_output(output)["error"].null_count() == 50
    leaks = find_key(texts={"stdout": result.stdout, "stderr": result.stderr}, roots=[tmp_path],
                     skip=[tmp_path / "job.yaml"])
    figures(rows=50, warning=next(line for line in result.stderr.splitlines() if "warning" in line.lower()))
    assert not leaks, leaks


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["mock-server", "--help"], ["bench", "--help"]],
                         ids=["top", "run", "mock-server", "bench"])
def test_help_never_shows_the_key(argv: list[str]) -> None:
    """`--help` of every command, with the key in BATCHGEN_API_KEY, OPENAI_API_KEY and a custom variable: the key is not printed."""
    env = _env(BATCHGEN_API_KEY=KEY, OPENAI_API_KEY=KEY, **{ENV_VAR: KEY})
    result = run_cli(argv, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()
    assert KEY not in result.stdout + result.stderr


def test_key_given_where_a_variable_name_belongs_is_not_echoed(tmp_path: Path) -> None:
    """A common slip: `--api-key-env sk-...` (the key instead of the variable's name). The run must stop with exit code 2 and a clear message, without printing the key into the logs."""
    input_path, output = write_prompts(tmp_path / "in.parquet", 5), tmp_path / "out.parquet"
    result = run_cli(run_args(input_path, output, "http://127.0.0.1:9/v1", "--api-key-env", KEY), timeout=60)
    assert result.returncode == 2, result.stderr
    assert "api_key_env" in result.stderr or "api-key-env" in result.stderr, result.stderr
    assert KEY not in result.stdout + result.stderr, f"the key was printed: {result.stderr!r}"

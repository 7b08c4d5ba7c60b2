"""A stub OpenAI/vLLM chat-completions server made of nginx `return` directives.

nginx answers a canned reply from C without reading the request body into any script, so it is
far faster than any Python client: a benchmark against it measures the *client*, not the server.

Usage (from another benchmark script):

    from nginx_stub import NginxStub            # or: from benchmarks.nginx_stub import NginxStub
    with NginxStub(workers=1) as stub:
        print(stub.base_url)                   # http://127.0.0.1:PORT/v1

Standalone (serves until Ctrl-C):

    python benchmarks/nginx_stub.py [--port 8089] [--workers 1]

nginx comes from Debian (`apt-get install -y nginx`); the binary is looked up at /usr/sbin/nginx
(override with $NGINX or `nginx=`). Everything nginx writes (config, pid, error log, *_temp_path)
lives in a private temp dir that is removed on exit. Only the nginx master this module started is
ever signalled.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

__all__ = [
    "CHAT_COMPLETION",
    "MODELS",
    "NginxNotInstalledError",
    "NginxStub",
    "find_nginx",
]

DEFAULT_NGINX = "/usr/sbin/nginx"

# A compact vLLM (0.1x) non-streamed chat completion for a max_tokens=16 request, with usage.
# No ', $ or backslash may appear in it: it is pasted into nginx's `return 200 '...'`.
CHAT_COMPLETION = (
    '{"id":"chatcmpl-5d1f0c2e8b7a4f3e9c6d2a1b0e9f8c7d","object":"chat.completion","created":1771432015,'
    '"model":"stub","choices":[{"index":0,"message":{"role":"assistant",'
    '"content":"The capital of France is Paris, which is also its largest city and the","refusal":null,'
    '"annotations":null,"audio":null,"function_call":null,"tool_calls":[],"reasoning":null},'
    '"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}],'
    '"service_tier":null,"system_fingerprint":null,'
    '"usage":{"prompt_tokens":87,"total_tokens":103,"completion_tokens":16,"prompt_tokens_details":null},'
    '"prompt_logprobs":null,"prompt_token_ids":null,"kv_transfer_params":null}'
)
MODELS = '{"object":"list","data":[{"id":"stub"}]}'

_CONFIG = """\
worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 16m;
    # A real OpenAI-compatible server (uvicorn) never closes a keep-alive connection after N
    # requests; nginx's default of 1000 would add reconnects that the real thing does not have.
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server_tokens off;

    server {{
        listen {host}:{port} reuseport backlog=4096;
        location /v1/chat/completions {{
            default_type application/json;
            return 200 '{completion}';
        }}
        location /v1/models {{
            default_type application/json;
            return 200 '{models}';
        }}
{extra_locations}
    }}
}}
"""


class NginxNotInstalledError(RuntimeError):
    """nginx is not installed where we look for it."""


def find_nginx(path: str | None = None) -> str:
    """The nginx binary: `path`, else $NGINX, else /usr/sbin/nginx, else `nginx` on PATH.

    Raises:
        NginxNotInstalledError: none exists, with the command that installs it.
    """
    for candidate in (path, os.environ.get("NGINX"), DEFAULT_NGINX, shutil.which("nginx")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise NginxNotInstalledError(
        f"nginx not found at {path or os.environ.get('NGINX') or DEFAULT_NGINX} nor on PATH; "
        "install Debian's package first: `apt-get update && apt-get install -y nginx` "
        "(or point $NGINX at a binary)"
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_literal(name: str, text: str) -> None:
    if "'" in text or "$" in text or "\\" in text:
        raise ValueError(f"{name} must contain no ', $ or \\ (it goes inside nginx's return '...')")
    if len(text.encode()) > 4000:
        raise ValueError(f"{name} is over 4000 bytes; nginx refuses config tokens over 4096 bytes")


class NginxStub:
    """Start nginx serving the canned replies on `host:port`; stop it on exit.

    Args:
        port: the port; None picks a free one (retried if another process grabs it first).
        workers: nginx worker_processes (1 leaves a core of a 2-core box to the client).
        host: the address to listen on (loopback only).
        nginx: the nginx binary; see `find_nginx`.
        completion_body / models_body: the canned JSON texts (compact; no `'` and no `$`).
        extra_locations: raw nginx `location` blocks added to the server (other benchmarks).
        start_timeout: seconds to wait for GET /v1/models to answer.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        workers: int = 1,
        host: str = "127.0.0.1",
        nginx: str | None = None,
        completion_body: str = CHAT_COMPLETION,
        models_body: str = MODELS,
        extra_locations: str = "",
        start_timeout: float = 10.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        _check_literal("completion_body", completion_body)
        _check_literal("models_body", models_body)
        self.binary = find_nginx(nginx)
        self.host = host
        self.port = port
        self.workers = workers
        self.completion_body = completion_body
        self.models_body = models_body
        self.extra_locations = extra_locations
        self.start_timeout = start_timeout
        self.tmp: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def worker_pids(self) -> list[int]:
        """The nginx worker processes (children of our master), for CPU accounting."""
        if self.process is None:
            return []
        try:
            text = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def cpu_seconds(self) -> float:
        """user+sys CPU seconds used so far by the master and its workers (Linux /proc)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in [p for p in [self.pid, *self.worker_pids()] if p is not None]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        return total

    def _write_config(self) -> Path:
        assert self.tmp is not None
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.tmp / sub).mkdir(exist_ok=True)
        config = self.tmp / "nginx.conf"
        config.write_text(
            _CONFIG.format(
                workers=self.workers,
                tmp=self.tmp,
                host=self.host,
                port=self.port,
                completion=self.completion_body,
                models=self.models_body,
                extra_locations=self.extra_locations,
            )
        )
        return config

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/models", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> NginxStub:
        if self.process is not None:
            raise RuntimeError("already started")
        self.tmp = Path(tempfile.mkdtemp(prefix="nginx-stub-"))
        os.chmod(self.tmp, 0o755)  # workers drop to `nobody` when the master runs as root
        fixed_port = self.port is not None
        for _ in range(1 if fixed_port else 5):
            if not fixed_port:
                self.port = _free_port(self.host)
            config = self._write_config()
            test = subprocess.run(
                [self.binary, "-t", "-q", "-p", str(self.tmp), "-e", str(self.tmp / "error.log"), "-c", str(config)],
                capture_output=True,
                text=True,
            )
            if test.returncode != 0:
                self._cleanup()
                raise RuntimeError(f"nginx rejected the generated config:\n{test.stderr}")
            with open(self.tmp / "stderr.log", "wb") as stderr:  # the child keeps its own copy of the fd
                self.process = subprocess.Popen(
                    [self.binary, "-p", str(self.tmp), "-e", str(self.tmp / "error.log"), "-c", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if self._ready():
                    return self
                time.sleep(0.05)
            error = self._stop_process()
            if "Address already in use" not in error:
                self._cleanup()
                raise RuntimeError(f"nginx did not start on {self.host}:{self.port}:\n{error}")
        self._cleanup()
        raise RuntimeError("nginx could not bind a free port after 5 tries")

    def _stop_process(self) -> str:
        """Stop our master (graceful QUIT, then TERM, then KILL); returns what it printed."""
        process, self.process = self.process, None
        if process is None:
            return ""
        if process.poll() is None:
            for sig, wait in ((signal.SIGQUIT, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
                try:
                    process.send_signal(sig)
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        text = ""
        for name in ("stderr.log", "error.log"):
            if self.tmp is not None and (self.tmp / name).exists():
                text += (self.tmp / name).read_text(errors="replace")
        return text.strip()

    def _cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def stop(self) -> None:
        self._stop_process()
        self._cleanup()

    def __enter__(self) -> NginxStub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description="Serve the nginx chat-completions stub until Ctrl-C.")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    try:
        stub = NginxStub(port=args.port, workers=args.workers)
    except NginxNotInstalledError as exc:
        print(f"error: {exc}")
        return 2
    def stop_on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM (and SIGINT even when started in the background, where shells ignore it) stop nginx cleanly.
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)
    with stub:
        print(f"nginx stub serving {stub.base_url} (nginx pid {stub.pid}); Ctrl-C or SIGTERM to stop", flush=True)
        try:
            while stub.process is not None and stub.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Client-side cost of reading SSE streams: batchgen's streaming path vs a plain aiohttp loop vs the openai SDK.

A local nginx serves one canned vLLM-style SSE body (a role chunk, N content chunks, the finish chunk,
the usage chunk, [DONE]) as fast as it can, so the client is the only thing being measured. Each
client reads the same number of streams at the same concurrency, interleaved over several repeats
in one process; CPU is this process's `time.process_time()` (nginx runs in its own process).

    python benchmarks/bench_streaming.py          # 2000 streams (SDK: 200), 128 tokens, concurrency 32, 3 repeats
    python benchmarks/bench_streaming.py --profile            # also profile batchgen's path

Needs nginx on PATH (Debian: apt-get install -y nginx) and, for the SDK column, `pip install openai`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere, like the other scripts
from batchgen.chunks import event_usage, has_text
from batchgen.client import Client
from batchgen.stream import Stream

TARGET = 0.9  # batchgen must read streams at >= 90% of the plain loop's rate per CPU second
_PIECE = 3000  # nginx refuses config tokens over 4096 bytes, so the body is split into variables
BODY = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True,
        "stream_options": {"include_usage": True}}  # fmt: skip
Runner = Callable[[str, int, int], Awaitable[int]]


def canned_sse(tokens: int) -> bytes:
    """A vLLM-shaped stream: role chunk, `tokens` content chunks, finish chunk, usage chunk, [DONE]."""
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def event(choice: dict[str, Any] | None, **extra: Any) -> bytes:
        obj = {**head, "choices": [choice] if choice else [], **extra}
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    parts = [event(role, prompt_token_ids=None)]
    for i in range(tokens):
        delta = {"content": f" word{i % 97}"}
        parts.append(event({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None, "token_ids": None}))
    finish = {"index": 0, "delta": {"content": ""}, "logprobs": None, "finish_reason": "stop", "stop_reason": None}
    parts.append(event(finish))
    parts.append(event(None, usage={"prompt_tokens": 9, "total_tokens": 9 + tokens, "completion_tokens": tokens}))
    return b"".join(parts) + b"data: [DONE]\n\n"


def _nginx_config(root: Path, port: int, body: bytes) -> str:
    text = body.decode()
    assert "'" not in text and "$" not in text and "\\" not in text  # nothing nginx would reinterpret
    pieces = [text[i : i + _PIECE] for i in range(0, len(text), _PIECE)]
    sets = "\n".join(f"            set $p{i} '{p}';" for i, p in enumerate(pieces))
    joined = "".join(f"$p{i}" for i in range(len(pieces)))
    return f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body; proxy_temp_path {root}/proxy; fastcgi_temp_path {root}/fcgi;
    uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type text/event-stream;
{sets}
            return 200 "{joined}";
        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_nginx(root: Path, body: bytes) -> tuple[subprocess.Popen[bytes], str]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        sys.exit("nginx not found: apt-get install -y nginx")
    port = _free_port()
    (root / "nginx.conf").write_text(_nginx_config(root, port, body))
    proc = subprocess.Popen([nginx, "-p", str(root), "-c", str(root / "nginx.conf")], stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"nginx failed: {proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.05)
    proc.kill()
    sys.exit("nginx did not start listening")


async def _fan_out(streams: int, concurrency: int, one: Callable[[], Awaitable[int]]) -> int:
    left = streams
    total = 0

    async def worker() -> None:
        nonlocal left, total
        while left > 0:
            left -= 1
            total += await one()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total


async def _batchgen(url: str, streams: int, concurrency: int, read: Callable[[Stream], Awaitable[int]]) -> int:
    async with Client(url, "x", max_retries=0, max_connections=concurrency) as client:

        async def one() -> int:
            return await read(await client.open_stream(dict(BODY)))

        return await _fan_out(streams, concurrency, one)


async def _read_per_read(stream: Stream) -> int:
    n = 0
    async for _, events in stream.reads():
        for event in events:
            n += 1
            _ = has_text(event), None if event.get("usage") is None else event_usage(event)  # as bench/runner.py
    return n


async def _read_per_chunk(stream: Stream) -> int:
    n = 0
    async for chunk in stream:
        n += 1
        _ = chunk.has_text, chunk.usage
    return n


async def batchgen_path(url: str, streams: int, concurrency: int) -> int:
    """What `batchgen bench` does per request (bench/runner.py): open_stream, then per network read
    its events, asking each `has_text` and `event_usage` (`run --stream` reads the same way)."""
    return await _batchgen(url, streams, concurrency, _read_per_read)


async def batchgen_chunks(url: str, streams: int, concurrency: int) -> int:
    """The public per-chunk API: `async for chunk in stream`, reading `has_text` and `usage` of each."""
    return await _batchgen(url, streams, concurrency, _read_per_chunk)


async def plain_aiohttp(url: str, streams: int, concurrency: int) -> int:
    """The loop people write by hand (vLLM's bench does the same): iter_any, split events, orjson per event."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": "Bearer x", "Content-Type": "application/json"}
    payload = orjson.dumps(BODY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            n = 0
            buffer = b""
            async with session.post(url + "/chat/completions", data=payload, headers=headers) as response:
                async for data in response.content.iter_any():
                    buffer += data
                    *events, buffer = buffer.split(b"\n\n")
                    for event in events:
                        if not event.startswith(b"data: ") or event == b"data: [DONE]":
                            continue
                        obj = orjson.loads(event[6:])
                        choices = obj.get("choices")
                        _ = choices[0]["delta"].get("content") if choices else obj.get("usage")
                        n += 1
            return n

        return await _fan_out(streams, concurrency, one)


async def aiohttp_lines(url: str, streams: int, concurrency: int) -> int:
    """The other common idiom: `async for line in response.content` (one readline per line)."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": "Bearer x", "Content-Type": "application/json"}
    payload = orjson.dumps(BODY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            n = 0
            async with session.post(url + "/chat/completions", data=payload, headers=headers) as response:
                async for line in response.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    obj = orjson.loads(line[6:])
                    choices = obj.get("choices")
                    _ = choices[0]["delta"].get("content") if choices else obj.get("usage")
                    n += 1
            return n

        return await _fan_out(streams, concurrency, one)


async def openai_sdk(url: str, streams: int, concurrency: int) -> int:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
    async with client:

        async def one() -> int:
            n = 0
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hi"}], stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            async for chunk in stream:
                _ = chunk.choices[0].delta.content if chunk.choices else chunk.usage
                n += 1
            return n

        return await _fan_out(streams, concurrency, one)


def clients() -> dict[str, Runner]:
    found: dict[str, Runner] = {"plain aiohttp": plain_aiohttp, "batchgen": batchgen_path,
                                "batchgen chunks": batchgen_chunks, "aiohttp lines": aiohttp_lines}  # fmt: skip
    try:
        import openai  # noqa: F401
    except ImportError:
        print("openai SDK not installed: its column is skipped (pip install openai)", file=sys.stderr)
    else:
        found["openai SDK"] = openai_sdk
    return found


async def measure(url: str, args: argparse.Namespace) -> dict[str, list[tuple[float, float, int]]]:
    runners = clients()
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in runners}
    for run in runners.values():  # warm up connections, imports and caches
        await run(url, args.concurrency * 2, args.concurrency)
    for _ in range(args.repeats):
        for name, run in runners.items():  # interleaved, so drift hits every client alike
            # The SDK is ~50x slower per chunk; fewer streams keep the run short (figures are per second).
            streams = args.sdk_streams if name == "openai SDK" else args.streams
            wall0, cpu0 = time.perf_counter(), time.process_time()
            chunks = await run(url, streams, args.concurrency)
            results[name].append((time.perf_counter() - wall0, time.process_time() - cpu0, chunks))
    return results


def report(results: dict[str, list[tuple[float, float, int]]], args: argparse.Namespace) -> float:
    print(f"{'client':<16}{'streams':>8}{'streams/s':>11}{'streams/CPU-s':>15}{'chunks/CPU-s':>14}{'vs plain':>10}")
    medians = {}
    for name, runs in results.items():
        streams = args.sdk_streams if name == "openai SDK" else args.streams
        wall = statistics.median(w for w, _, _ in runs)
        cpu = statistics.median(c for _, c, _ in runs)
        chunks = runs[0][2] / streams
        medians[name] = (streams, streams / wall, streams / cpu, streams * chunks / cpu)
    base = float(medians["plain aiohttp"][2])
    for name, (streams, per_wall, per_cpu, chunks_cpu) in medians.items():
        print(f"{name:<16}{streams:>8}{per_wall:>11.0f}{per_cpu:>15.0f}{chunks_cpu:>14.0f}{per_cpu / base:>9.2f}x")
    # Per-repeat ratios (the clients of one repeat ran back to back): the spread shows the noise.
    pairs = [pc / bc for (_, pc, _), (_, bc, _) in zip(results["plain aiohttp"], results["batchgen"], strict=True)]
    print(f"batchgen / plain per repeat: {', '.join(f'{r:.2f}' for r in sorted(pairs))}")
    return float(medians["batchgen"][2]) / base


def stage_costs(body: bytes, rounds: int = 300) -> None:
    """CPU per stream of each batchgen stage on the canned body, without network or profiler overhead."""
    from batchgen.chunks import parse_chunk
    from batchgen.sse import SSEDecoder, StreamAssembler

    payloads = [p for p in SSEDecoder().feed(body) if p != b"[DONE]"]
    decoded = [orjson.loads(p) for p in payloads]
    chunks = [parse_chunk(d) for d in decoded]

    def assemble() -> None:
        assembler = StreamAssembler()
        for c in chunks:
            assembler.add(c)
        assembler.response()

    stages: dict[str, Callable[[], object]] = {
        "sse.SSEDecoder.feed (whole body)": lambda: SSEDecoder().feed(body),
        "orjson.loads (every event)": lambda: [orjson.loads(p) for p in payloads],
        "chunks.parse_chunk (every event)": lambda: [parse_chunk(d) for d in decoded],
        "sse.StreamAssembler.add + response()": assemble,
        "chunks.ChatCompletionChunk.has_text": lambda: [c.has_text for c in chunks],
    }
    print(f"\nbatchgen stages, CPU µs per stream ({len(payloads)} events), no network:")
    for name, fn in stages.items():
        cpu0 = time.process_time()
        for _ in range(rounds):
            fn()
        print(f"  {(time.process_time() - cpu0) / rounds * 1e6:8.1f} µs  {name}")


def profile_batchgen(url: str, args: argparse.Namespace, top: int = 15) -> None:
    """cProfile batchgen's path and print the functions in batchgen (and aiohttp) with the most own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(batchgen_path(url, args.streams, args.concurrency))
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = sum(tt for _, _, tt, _, _ in stats.stats.values())  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    print(f"\nbatchgen path, own time per function (total {total:.2f} s profiled):")
    for (file, line, func), (_, calls, tt, ct, _) in rows[:top]:
        where = file.split("site-packages/")[-1] if "site-packages" in file else file.split("/work/main/")[-1]
        print(f"  {100 * tt / total:5.1f}%  own {tt:6.3f}s  cum {ct:6.3f}s  {calls:>8} calls  {where}:{line}:{func}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=2000, help="streams per client per repeat")
    parser.add_argument("--tokens", type=int, default=128, help="content chunks per stream")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="medians are taken over these (>= 3)")
    parser.add_argument("--sdk-streams", type=int, default=200, help="streams per repeat for the (slow) openai SDK")
    parser.add_argument("--profile", action="store_true", help="profile batchgen's path even when on target")
    args = parser.parse_args()
    body = canned_sse(args.tokens)
    with tempfile.TemporaryDirectory(prefix="batchgen-nginx-") as tmp:
        proc, url = start_nginx(Path(tmp), body)
        try:
            print(f"nginx {url}: {len(body)} bytes per stream, {args.tokens + 3} events; {args.streams} streams "
                  f"x {args.repeats} repeats at concurrency {args.concurrency}; Python {sys.version.split()[0]}")
            ratio = report(asyncio.run(measure(url, args)), args)
            verdict = "meets" if ratio >= TARGET else "BELOW"
            print(f"batchgen / plain loop = {ratio:.2f}x per CPU second: {verdict} the {TARGET:.1f}x target")
            if ratio < TARGET or args.profile:
                stage_costs(body)
                profile_batchgen(url, args)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

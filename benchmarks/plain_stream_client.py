"""A plain asyncio + aiohttp streaming client: the reference next to `batchgen bench` in bench_client_delay.py.

It measures TTFT and ITL the way a hand-written benchmark loop does (vLLM's own bench serve reads
the same way), with no estimate of the delay it adds itself:

* a closed loop: `--concurrency` worker tasks over one `aiohttp.ClientSession` (connector limit =
  the concurrency), first `--warmup` requests (not counted), then `--num-prompts` measured ones;
* each request POSTs a streaming chat completion; its clock starts just before `session.post` and
  every read of `resp.content.iter_any()` is timed with `time.perf_counter()`;
* the SSE `data: ` lines are parsed with `json.loads`; a chunk counts when its
  `choices[0].delta.content` is non-empty. TTFT = the first such chunk, ITL = the gaps between
  consecutive ones (chunks that came in one read share the read's time, so their gap is 0).

Prints one JSON line: completed, failed, wall_s, cpu_s, and mean / median / p99 of TTFT and ITL (ms).

    python benchmarks/plain_stream_client.py --base-url http://127.0.0.1:PORT/v1 --concurrency 64 \\
        --num-prompts 256 --warmup 64 --tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Timings:
    """What the measured phase collected (seconds)."""

    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    completed: int = 0
    failed: int = 0


def content_chunks(lines: list[bytes]) -> int:
    """How many of these SSE lines are `data: ` events carrying non-empty content."""
    count = 0
    for line in lines:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        choices = json.loads(line[6:]).get("choices")
        if choices and choices[0].get("delta", {}).get("content"):
            count += 1
    return count


async def one_request(session: aiohttp.ClientSession, url: str, payload: bytes) -> list[float]:
    """The times (from just before the POST) of the request's content chunks."""
    headers = {"Content-Type": "application/json", "Authorization": "Bearer x"}
    buffer = b""
    times: list[float] = []
    start = time.perf_counter()
    async with session.post(url, data=payload, headers=headers) as resp:
        resp.raise_for_status()
        async for data in resp.content.iter_any():
            now = time.perf_counter() - start
            *lines, buffer = (buffer + data).split(b"\n")  # a line cut by the read waits for the next one
            times += [now] * content_chunks(lines)
    return times


async def phase(session: aiohttp.ClientSession, url: str, payload: bytes, requests: int, concurrency: int,
                timings: Timings | None) -> None:
    """`requests` requests through `concurrency` workers; recorded into `timings` unless None (warmup)."""
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                times = await one_request(session, url, payload)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                if timings is not None:
                    timings.failed += 1
                continue
            if timings is None:
                continue
            if not times:
                timings.failed += 1
                continue
            timings.completed += 1
            timings.ttfts.append(times[0])
            timings.itls += [b - a for a, b in zip(times, times[1:])]

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(args: argparse.Namespace) -> Timings:
    url = args.base_url.rstrip("/") + "/chat/completions"
    body = {"model": args.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": args.tokens,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    payload = json.dumps(body).encode()
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    timings = Timings()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if args.warmup:
            await phase(session, url, payload, args.warmup, args.concurrency, None)
        await phase(session, url, payload, args.num_prompts, args.concurrency, timings)
    return timings


def summary_ms(name: str, values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"p99_{name}_ms": None}
    ms = [v * 1000 for v in values]
    p99 = statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) > 1 else ms[0]  # as numpy's default
    return {f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms), f"p99_{name}_ms": p99}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="exact")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, stream included")
    args = parser.parse_args(argv)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    timings = asyncio.run(measure(args))
    result = {"completed": timings.completed, "failed": timings.failed,
              "wall_s": round(time.perf_counter() - wall0, 3), "cpu_s": round(time.process_time() - cpu0, 3),
              **summary_ms("ttft", timings.ttfts), **summary_ms("itl", timings.itls)}  # fmt: skip
    print(json.dumps(result))
    return 0 if timings.completed else 1


if __name__ == "__main__":
    sys.exit(main())

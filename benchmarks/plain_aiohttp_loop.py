"""The peer of `batchgen run` in the benchmark: a good, plain aiohttp loop, no framework.

It does what a competent engineer would write by hand for the same job, and nothing more:

* streams the Parquet input with `pyarrow.ParquetFile.iter_batches` (the decode runs in a
  thread, as batchgen's does), turning each row into the same request body batchgen builds:
  `model`, `messages` (null struct fields dropped), `max_tokens`, and the row's non-null
  override columns (temperature, top_p, seed, stop, ...);
* keeps exactly `--concurrency` requests in flight with that many worker tasks fed from a
  bounded queue (so memory stays flat however large the input), over one `aiohttp`
  session whose connector limit equals the concurrency;
* encodes and decodes JSON with orjson; retries connection errors, 429 and 5xx up to 3 times;
* writes typed Parquet (`index, id, content, finish_reason, usage{prompt,completion,total},
  error`), in completion order, flushing every `--flush-rows` rows from a thread.

It opens the input with pyarrow's defaults (`pre_buffer=True`), as batchgen does today; note that
pyarrow then keeps every column chunk it pre-read until the file is closed, so both tools' RSS
grows by about the input file's size over a run (`--no-pre-buffer` shows the difference).

What it does not do (and batchgen does): resumable crash-safe part files with fsync, output in
input order, carrying the input columns into the output (unless `--passthrough`), request
validation, duplicate-id checks, per-row error records for malformed rows, latency columns.

    python benchmarks/plain_aiohttp_loop.py --input IN.parquet --output OUT.parquet \\
        --base-url http://127.0.0.1:PORT/v1 --model stub --concurrency 64 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

OVERRIDE_FIELDS = (
    "temperature", "max_tokens", "max_completion_tokens", "top_p", "top_k", "min_p", "stop", "seed", "n",
    "presence_penalty", "frequency_penalty", "repetition_penalty",
)  # fmt: skip
USAGE = pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("total_tokens", pa.int64())])
RESULT_FIELDS = [
    pa.field("index", pa.int64()),
    pa.field("id", pa.string()),
    pa.field("content", pa.large_string()),
    pa.field("finish_reason", pa.string()),
    pa.field("usage", USAGE),
    pa.field("error", pa.string()),
]
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_DONE: Any = object()


def _drop_nulls(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if v is not None}


class Loop:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.url = args.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self.file = pq.ParquetFile(args.input, pre_buffer=args.pre_buffer)
        schema = self.file.schema_arrow
        self.overrides = [name for name in OVERRIDE_FIELDS if name in schema.names]
        self.passthrough = [f for f in schema if f.name not in ("id", "index")] if args.passthrough else []
        self.schema = pa.schema(RESULT_FIELDS[:2] + self.passthrough + RESULT_FIELDS[2:])
        self.buffer: list[dict[str, Any]] = []
        self.rows = self.errors = 0
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=args.concurrency * 2)

    def batches(self) -> Iterator[list[dict[str, Any]]]:
        for batch in self.file.iter_batches(batch_size=self.args.batch_size):
            yield batch.to_pylist()

    def body(self, row: dict[str, Any]) -> bytes:
        body: dict[str, Any] = {
            "model": self.args.model,
            "messages": [_drop_nulls(m) for m in row["messages"]],
            "max_tokens": self.args.max_tokens,
        }
        for name in self.overrides:
            value = row[name]
            if value is not None:
                body[name] = value
        return orjson.dumps(body)

    async def produce(self) -> None:
        batches = self.batches()
        index = 0
        while (batch := await asyncio.to_thread(next, batches, None)) is not None:
            for row in batch:
                await self.queue.put((index, row, self.body(row)))
                index += 1
        for _ in range(self.args.concurrency):
            await self.queue.put(_DONE)

    async def send(self, session: aiohttp.ClientSession, payload: bytes) -> dict[str, Any]:
        for attempt in range(4):
            try:
                async with session.post(self.url, data=payload, headers=self.headers) as response:
                    data = await response.read()
                    if response.status == 200:
                        return orjson.loads(data)
                    error = f"HTTP {response.status}: {data[:200].decode(errors='replace')}"
                    if response.status not in RETRY_STATUSES:
                        raise RuntimeError(error)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            if attempt < 3:
                await asyncio.sleep(0.5 * 2**attempt)
        raise RuntimeError(error)

    async def worker(self, session: aiohttp.ClientSession, writer: pq.ParquetWriter) -> None:
        while (item := await self.queue.get()) is not _DONE:
            index, row, payload = item
            record: dict[str, Any] = {"index": index, "id": row.get("id")}
            for field in self.passthrough:
                record[field.name] = row[field.name]
            try:
                answer = await self.send(session, payload)
                choice = answer["choices"][0]
                record["content"] = choice["message"].get("content")
                record["finish_reason"] = choice.get("finish_reason")
                usage = answer.get("usage")
                record["usage"] = None if usage is None else {k: usage.get(k) for k in USAGE.names}
                record["error"] = None
            except Exception as exc:  # one bad row must not stop the job
                record.update(content=None, finish_reason=None, usage=None, error=str(exc))
                self.errors += 1
            self.buffer.append(record)
            self.rows += 1
            if len(self.buffer) >= self.args.flush_rows:
                await self.flush(writer)

    async def flush(self, writer: pq.ParquetWriter) -> None:
        records, self.buffer = self.buffer, []
        if records:
            table = pa.Table.from_pylist(records, schema=self.schema)
            await asyncio.to_thread(writer.write_table, table)

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.args.concurrency)
        timeout = aiohttp.ClientTimeout(total=self.args.timeout)
        with pq.ParquetWriter(self.args.output, self.schema) as writer:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self.produce())
                    for _ in range(self.args.concurrency):
                        group.create_task(self.worker(session, writer))
            await self.flush(writer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="stub")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per Parquet read")
    parser.add_argument("--flush-rows", type=int, default=10_000, help="rows per output write")
    parser.add_argument("--passthrough", action="store_true", help="also copy the input columns to the output")
    parser.add_argument(
        "--no-pre-buffer", dest="pre_buffer", action="store_false", help="open the input with pre_buffer=False"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    loop = Loop(args)
    asyncio.run(loop.run())
    wall = time.perf_counter() - started
    print(
        f"plain: {loop.rows} rows ({loop.errors} errors) in {wall:.2f} s, {loop.rows / wall:.0f} rows/s",
        file=sys.stderr,
    )
    return 1 if loop.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

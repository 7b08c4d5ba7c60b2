"""Deterministic Parquet inputs for the `batchgen run` benchmarks, generated once and cached.

Schema (one row = one request), shaped like a real offline-generation job:

    id           string                          "req-0000042", unique
    messages     list<struct<role, content>>     system (75% of rows, 6 variants) + user turn;
                                                 10% are 3-turn (user, assistant, user)
    temperature  double, 40% null                {0.0, 0.2, 0.7, 1.0}
    top_p        double, 70% null                {0.9, 0.95, 1.0}
    seed         int64,  50% null
    stop         list<string>, 85% null          e.g. ["\\n\\n", "###"]
    source       string (not a request field)    which "dataset" the row came from

`--shape issue` writes the input of issue 10 instead, `id, messages, temperature, max_tokens`
(`max_tokens` int64, 30% null, {64, 128, 256, 512}), with the same ids, messages and temperatures:
the override columns the default shape adds, and `source`, are left out.

User turns are 1-8 sentences (about 60-900 characters, mean ~420) drawn from a fixed sentence
pool plus the row number, so no two prompts are equal but the text compresses like real text.

The file is written in row groups of `ROW_GROUP_ROWS` rows, one generated chunk at a time
(never one giant table), to `<cache>/prompts-<rows>-v<VERSION>.parquet` (`prompts-issue-...` for
the issue shape) through a `.tmp` file.
The same `rows` always gives byte-identical content; a cached file is reused.

    python benchmarks/make_inputs.py --rows 20000,1000000 [--shape issue] [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["ISSUE_SCHEMA", "SCHEMA", "SHAPES", "VERSION", "default_cache_dir", "ensure_input", "input_path"]

VERSION = 1  # bump when the generated content changes, so stale caches are not reused
ROW_GROUP_ROWS = 10_000
SEED = 20_240_611

MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("messages", pa.list_(MESSAGE)),
        pa.field("temperature", pa.float64()),
        pa.field("top_p", pa.float64()),
        pa.field("seed", pa.int64()),
        pa.field("stop", pa.list_(pa.string())),
        pa.field("source", pa.string()),
    ]
)
# Issue 10's input: the columns a typical job has, and nothing else.
ISSUE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("messages", pa.list_(MESSAGE)),
        pa.field("temperature", pa.float64()),
        pa.field("max_tokens", pa.int64()),
    ]
)
SHAPES = {"default": SCHEMA, "issue": ISSUE_SCHEMA}

_SYSTEM = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in at most two sentences.",
    "You are an expert data labeler. Reply with a single category name from the list given by the user.",
    "You are a careful translator. Translate the user's text into French and keep the formatting.",
    "You summarise documents for busy engineers. Use plain language and keep every number exact.",
    "You are a customer-support agent for an online bookshop. Be polite, brief and specific.",
)
_SOURCES = ("support-tickets", "wiki-qa", "code-review", "product-reviews", "translation", "classification")
_STOPS = (["\n\n"], ["###"], ["\n\n", "###"], ["</answer>"])
_SUBJECTS = (
    "the quarterly report", "this customer email", "the attached log file", "the following paragraph",
    "our onboarding guide", "the release notes", "a short story about a lighthouse", "the meeting transcript",
    "the product description", "this code diff", "the error message", "a recipe for bread",
    "the support ticket", "the survey answers", "the news article", "the API documentation",
)  # fmt: skip
_VERBS = (
    "Summarise", "Explain", "Translate", "Classify", "Rewrite", "Proofread", "Critique", "Extract the dates from",
    "List the action items in", "Find the bugs in", "Give three titles for", "Answer the question about",
)  # fmt: skip
_WORDS = (
    "latency throughput cluster invoice refund shipment battery screen keyboard account password "
    "delivery warranty schedule budget forecast revenue margin churn retention pipeline deployment "
    "rollback outage incident review kernel memory cache index query table column schema migration "
    "tokenizer embedding gradient checkpoint dataset benchmark baseline variance median percentile "
    "customer manager engineer author reviewer translator library museum harbour mountain river city"
).split()


def _sentence_pool(rng: random.Random, size: int = 4096) -> list[str]:
    pool = []
    for _ in range(size):
        words = rng.choices(_WORDS, k=rng.randint(8, 20))
        text = " ".join(words)
        pool.append(text[0].upper() + text[1:] + rng.choice((".", ".", ".", "?", "!")))
    return pool


def default_cache_dir() -> Path:
    """$BATCHGEN_BENCH_CACHE, else <tmp>/batchgen-bench."""
    return Path(os.environ.get("BATCHGEN_BENCH_CACHE") or Path(tempfile.gettempdir()) / "batchgen-bench")


def input_path(rows: int, cache_dir: Path | None = None, shape: str = "default") -> Path:
    prefix = "prompts" if shape == "default" else f"prompts-{shape}"
    return (cache_dir or default_cache_dir()) / f"{prefix}-{rows}-v{VERSION}.parquet"


def _chunk(start: int, stop: int, pool: list[str], shape: str = "default") -> pa.Table:
    """Rows [start, stop); seeded by the chunk start, so content never depends on chunking elsewhere."""
    rng = random.Random(SEED * 1_000_003 + start)
    ids, messages, temperature, top_p, seed, stop_col, source = [], [], [], [], [], [], []
    for index in range(start, stop):
        ids.append(f"req-{index:07d}")
        verb, subject = rng.choice(_VERBS), rng.choice(_SUBJECTS)
        body = " ".join(rng.choices(pool, k=rng.randint(1, 8)))
        user = f"{verb} {subject} (item {index}): {body}"
        conversation = []
        if rng.random() < 0.75:
            conversation.append({"role": "system", "content": rng.choice(_SYSTEM)})
        if rng.random() < 0.10:
            conversation.append({"role": "user", "content": f"{verb} {subject}."})
            conversation.append({"role": "assistant", "content": "Sure. " + rng.choice(pool)})
        conversation.append({"role": "user", "content": user})
        messages.append(conversation)
        temperature.append(None if rng.random() < 0.40 else rng.choice((0.0, 0.2, 0.7, 1.0)))
        top_p.append(None if rng.random() < 0.70 else rng.choice((0.9, 0.95, 1.0)))
        seed.append(None if rng.random() < 0.50 else rng.randrange(1 << 31))
        stop_col.append(None if rng.random() < 0.85 else rng.choice(_STOPS))
        source.append(rng.choice(_SOURCES))
    if shape == "issue":
        # Its own generator, so the shared columns are the same as in the default shape.
        limits = random.Random(SEED * 7 + start)
        max_tokens = [None if limits.random() < 0.30 else limits.choice((64, 128, 256, 512)) for _ in ids]
        columns = {"id": ids, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        return pa.table(columns, schema=ISSUE_SCHEMA)
    return pa.table(
        {
            "id": ids,
            "messages": messages,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "stop": stop_col,
            "source": source,
        },
        schema=SCHEMA,
    )


def ensure_input(
    rows: int, cache_dir: Path | None = None, *, shape: str = "default", force: bool = False, verbose: bool = True
) -> Path:
    """The cached input of `rows` rows of `shape` ("default" or "issue"), generating it first if needed."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    path = input_path(rows, cache_dir, shape)
    if path.exists() and not force:
        try:
            if pq.read_metadata(path).num_rows == rows:
                return path
        except (OSError, pa.ArrowException):
            pass  # a damaged cache file: regenerate
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    started = time.perf_counter()
    pool = _sentence_pool(random.Random(SEED))
    try:
        with pq.ParquetWriter(tmp, SHAPES[shape], compression="snappy") as writer:
            for start in range(0, rows, ROW_GROUP_ROWS):
                chunk = _chunk(start, min(start + ROW_GROUP_ROWS, rows), pool, shape)
                writer.write_table(chunk, row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if verbose:
        size = path.stat().st_size / 1e6
        print(f"generated {path} ({rows} rows, {size:.1f} MB) in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def _rows_list(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description="Generate (or find cached) benchmark Parquet inputs.")
    parser.add_argument("--rows", type=_rows_list, default=[20_000, 1_000_000], help="comma-separated row counts")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default", help="issue: id, messages, temperature, max_tokens")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default {default_cache_dir()}")
    parser.add_argument("--force", action="store_true", help="regenerate even if cached")
    args = parser.parse_args()
    for rows in args.rows:
        print(ensure_input(rows, args.cache_dir, shape=args.shape, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

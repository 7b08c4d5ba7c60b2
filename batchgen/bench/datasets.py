"""Benchmark prompts: synthetic (`random`), ShareGPT conversations, or the rows of a `batchgen run` input.

Every dataset becomes a tuple of ready-to-send streaming request bodies; the runner cycles through
them, so a short file can still feed a long run. Bodies always ask for usage in the stream
(`include_usage`, plus `continuous_usage_stats` for per-chunk token counts) because token counts
come from the server, never from what was requested.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchgen.errors import InputError
from batchgen.io.readers import open_input
from batchgen.records import RowRequest
from batchgen.rows import RowMapper

__all__ = ["Dataset", "DatasetSpec", "load_dataset", "pin_output_len", "stream_options"]

# Short, common English words: most are one token in BPE vocabularies, so N words ≈ N tokens
# (the report's input token counts still come from the server's usage, not from this guess).
_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city name team "
    "minute idea kid body back parent face others level office door health person art war history party "
    "result change morning reason research girl guy moment air teacher force education foot boy age policy"
).split()
_CHARS_PER_TOKEN = 4  # rough size of an English token, only used to cap ShareGPT replies


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetSpec:
    """Which prompts to send.

    Args:
        name: "random", "sharegpt", or a path to a Parquet/JSONL input (read as `batchgen run` does).
        model: the model every body names (a file row's own `model` wins, as in `batchgen run`).
        num_prompts: how many distinct bodies to prepare (the runner cycles past the end).
        input_len / output_len: random: words per prompt / tokens per answer. output_len also
            pins the answer length of the other datasets (max_tokens = min_tokens, ignore_eos).
        path: the ShareGPT JSON file.
        seed: for random prompts and the ShareGPT shuffle.
        defaults: extra request fields for every body (a file row's own columns win).
        continuous_usage: ask for usage on every chunk (needed for ITL per token).
    """

    name: str
    model: str
    num_prompts: int
    input_len: int = 1024
    output_len: int | None = None
    path: str | None = None
    seed: int = 0
    defaults: Mapping[str, Any] | None = None
    continuous_usage: bool = True


@dataclass(frozen=True, slots=True)
class Dataset:
    """The prepared bodies, plus what the report should say about them."""

    name: str
    bodies: tuple[dict[str, Any], ...]
    skipped: int = 0  # input rows that could not become requests
    notes: tuple[str, ...] = ()


def stream_options(continuous_usage: bool) -> dict[str, bool]:
    # Both flags explicitly: newer vLLM no longer implies include_usage (wire-format.md §2).
    return {"include_usage": True, "continuous_usage_stats": True} if continuous_usage else {"include_usage": True}


def pin_output_len(body: dict[str, Any], tokens: int) -> None:
    """Make the server generate exactly `tokens` tokens: max_tokens, vLLM's min_tokens and ignore_eos."""
    body.pop("max_completion_tokens", None)  # it would win over max_tokens on vLLM
    body["max_tokens"] = tokens
    body["min_tokens"] = tokens
    body["ignore_eos"] = True


def _finish(body: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    body["stream"] = True
    body["stream_options"] = stream_options(spec.continuous_usage)
    return body


def _random(spec: DatasetSpec) -> Dataset:
    rng = random.Random(spec.seed)
    output_len = spec.output_len if spec.output_len is not None else 128
    bodies = []
    for _ in range(spec.num_prompts):
        prompt = " ".join(rng.choices(_WORDS, k=spec.input_len))
        body = {"model": spec.model, "messages": [{"role": "user", "content": prompt}], **(spec.defaults or {})}
        pin_output_len(body, output_len)
        bodies.append(_finish(body, spec))
    note = f"random: {spec.input_len} words per prompt (≈ tokens), {output_len} output tokens pinned"
    return Dataset("random", tuple(bodies), notes=(note,))


def _sharegpt_pairs(path: str) -> Iterator[tuple[str, str]]:
    try:
        data = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read ShareGPT JSON ({exc})") from exc
    if not isinstance(data, list):
        raise InputError(f"{path}: ShareGPT data must be a JSON list of conversations")
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue  # vLLM keeps only conversations with a first answer
        first, second = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(second, dict)):
            continue
        prompt, reply = first.get("value"), second.get("value")
        if first.get("from") == "human" and isinstance(prompt, str) and prompt and isinstance(reply, str) and reply:
            yield prompt, reply


def _sharegpt(spec: DatasetSpec) -> Dataset:
    if not spec.path:
        raise InputError("--dataset sharegpt needs --dataset-path FILE (a ShareGPT JSON file)")
    pairs = list(_sharegpt_pairs(spec.path))
    if not pairs:
        raise InputError(f"{spec.path}: no usable conversations (need a human turn followed by a reply)")
    random.Random(spec.seed).shuffle(pairs)  # as vLLM: a seeded shuffle, then the first N
    bodies = []
    for prompt, reply in pairs[: spec.num_prompts]:
        body = {"model": spec.model, "messages": [{"role": "user", "content": prompt}], **(spec.defaults or {})}
        if spec.output_len is not None:
            pin_output_len(body, spec.output_len)
        else:
            # No tokenizer here: the recorded reply's length, in estimated tokens, caps the answer.
            body["max_tokens"] = max(1, math.ceil(len(reply) / _CHARS_PER_TOKEN))
        bodies.append(_finish(body, spec))
    notes = [f"sharegpt: {len(bodies)} of {len(pairs)} conversations (seeded shuffle)"]
    if spec.output_len is None:
        notes.append("sharegpt: max_tokens ≈ reply chars / 4 (an estimate used only as a cap)")
    return Dataset("sharegpt", tuple(bodies), notes=tuple(notes))


def _file(spec: DatasetSpec) -> Dataset:
    source = open_input(spec.name)
    defaults = dict(spec.defaults or {})
    if spec.output_len is not None:
        pin_output_len(defaults, spec.output_len)
    mapper = RowMapper(source.columns, fmt=source.format, model=spec.model, defaults=defaults, stream=True)
    skipped = 0

    def requests() -> Iterator[dict[str, Any]]:
        nonlocal skipped
        for batch in source.iter_batches():
            for row in batch:
                mapped = None if row.values is None or row.error else mapper.map(row.index, row.where, row.values)
                if not isinstance(mapped, RowRequest):
                    skipped += 1  # a bad row is not a request; `batchgen run` would write an error row
                    continue
                if spec.output_len is not None:
                    # A row's own length column wins, as in `batchgen run`: pin the answer to it instead.
                    mapped.body["min_tokens"] = mapped.body.get("max_completion_tokens", mapped.body["max_tokens"])
                yield _finish(mapped.body, spec)

    bodies = list(itertools.islice(requests(), spec.num_prompts))
    if not bodies:
        raise InputError(f"{spec.name}: no row could be turned into a request ({skipped} bad rows)")
    notes = [f"{source.format} file: {len(bodies)} rows used, per-row overrides applied"]
    if len(bodies) < spec.num_prompts:
        notes.append(f"fewer rows than requests: the {len(bodies)} rows are sent in turn")
    return Dataset(Path(spec.name).name, tuple(bodies), skipped=skipped, notes=tuple(notes))


def load_dataset(spec: DatasetSpec) -> Dataset:
    """Prepare the request bodies `spec` describes.

    Raises:
        InputError: unreadable file, no usable row, or sharegpt without a path.
    """
    if spec.num_prompts < 1:
        raise InputError(f"need at least one prompt, got {spec.num_prompts}")
    if spec.name == "random":
        return _random(spec)
    if spec.name == "sharegpt":
        return _sharegpt(spec)
    return _file(spec)

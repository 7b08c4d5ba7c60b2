"""What a vLLM server says about its own load: `GET /metrics` (Prometheus text) read into `ServerLoad`.

Names are matched exactly and summed over every series of that name, so a data-parallel server
(one series per `engine` label) reads as one server. Names this module reads:

    vllm:num_requests_running                        requests in the running batch
    vllm:num_requests_waiting                        requests queued
    vllm:num_requests_waiting_by_reason{reason=...}  only "capacity" is congestion ("deferred" is not)
    vllm:kv_cache_usage_perc                         0..1 (older servers: vllm:gpu_cache_usage_perc)
    vllm:num_preemptions_total                       counter: running requests evicted for KV space
    vllm:generation_tokens_total                     counter: tokens generated
    vllm:cache_config_info                           labels num_gpu_blocks and block_size: the KV size

A name the server does not send is None (unknown), never 0. A server that sends none of the load
names (a hosted API, a proxy, llama.cpp) gives no `ServerLoad`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

__all__ = ["ServerLoad", "metrics_url", "parse_metrics"]

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
WAITING_BY_REASON = "vllm:num_requests_waiting_by_reason"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
PREEMPTIONS = "vllm:num_preemptions_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
CACHE_CONFIG = "vllm:cache_config_info"
_WANTED = frozenset({RUNNING, WAITING, WAITING_BY_REASON, KV_USAGE, KV_USAGE_OLD, PREEMPTIONS, GENERATION_TOKENS, CACHE_CONFIG})

# name{labels} value [timestamp]; label values are quoted and may hold commas, spaces and \" escapes.
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?\s*$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class ServerLoad:
    """One scrape of a server's load, summed over its engines.

    `waiting` counts only the requests waiting for capacity when the server says why they wait.
    `kv_tokens` is the KV cache size in tokens (num_gpu_blocks × block_size) when the server states it.
    """

    at: float  # time.monotonic() of the scrape
    running: float
    waiting: float
    kv_usage: float | None
    preemptions: float | None
    generation_tokens: float | None
    kv_tokens: int | None


def metrics_url(base_url: str) -> str:
    """The server's metrics, at its root: `http://h:8000/v1` → `http://h:8000/metrics`."""
    return base_url.rstrip("/").removesuffix("/v1") + "/metrics"


def _labels(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    return {name: value.replace('\\"', '"').replace("\\\\", "\\") for name, value in _LABEL.findall(text)}


def parse_metrics(text: str, at: float | None = None) -> ServerLoad | None:
    """The load in a Prometheus text page, or None when it has no `vllm:num_requests_running`."""
    sums: dict[str, float] = {}
    series: dict[str, int] = {}
    capacity_waiting: float | None = None
    kv_tokens: int | None = None
    for line in text.splitlines():
        if not line.startswith("vllm:"):  # comments, and other exporters' metrics
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, label_text, raw = match.groups()
        if name not in _WANTED:
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        if value != value:  # NaN: unknown
            continue
        if name == WAITING_BY_REASON:
            if _labels(label_text).get("reason") == "capacity":
                capacity_waiting = (capacity_waiting or 0.0) + value
        elif name == CACHE_CONFIG:
            labels = _labels(label_text)
            try:
                kv_tokens = (kv_tokens or 0) + int(labels["num_gpu_blocks"]) * int(labels["block_size"])
            except (KeyError, ValueError):
                pass  # "None" before the engine has sized its cache
        else:
            sums[name] = sums.get(name, 0.0) + value
            series[name] = series.get(name, 0) + 1
    if RUNNING not in sums:
        return None
    kv_name = KV_USAGE if KV_USAGE in sums else KV_USAGE_OLD
    # A fraction per engine: the server's is their mean.
    kv_usage = sums[kv_name] / series[kv_name] if kv_name in sums else None
    waiting = capacity_waiting if capacity_waiting is not None else sums.get(WAITING, 0.0)
    return ServerLoad(
        at=time.monotonic() if at is None else at,
        running=sums[RUNNING],
        waiting=waiting,
        kv_usage=kv_usage,
        preemptions=sums.get(PREEMPTIONS),
        generation_tokens=sums.get(GENERATION_TOKENS),
        kv_tokens=kv_tokens,
    )

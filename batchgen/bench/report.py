"""Benchmark output: the console table, the vLLM-compatible result JSON, raw Parquet and the sweep plot.

The result file uses the field names of vLLM's `bench serve` for every metric both tools have, so
existing dashboards read it unchanged; batchgen's own figures (client lag, CPU, ITL per token, how
tokens were counted) sit next to them under their own names, `endpoints` among them (each server's
share of the level). A sweep writes one JSON object per line, as `vllm bench serve --append-result` does.
A `--concurrency auto` level adds the saturation point it found (`concurrency_auto`, with every
controller's timeline).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchgen._version import __version__
from batchgen.autoscale import spread
from batchgen.bench.metrics import BenchSummary, Distribution, EndpointSummary
from batchgen.bench.multiproc import PROBE_S, LevelResult
from batchgen.bench.runner import LoadSpec
from batchgen.bench.saturation import ControllerTrace, EndpointSaturation, Saturation
from batchgen.errors import ConfigError

__all__ = ["Level", "RunInfo", "check_plot", "console_report", "level_label", "result_json", "write_plot",
           "write_raw", "write_results"]  # fmt: skip

_WIDTH = 50
_NO_SERVER = "(no server)"  # requests that failed before any server was chosen
_LATENCIES = (("ttft", "TTFT", "Time to First Token"), ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
              ("itl", "ITL", "Inter-token Latency"), ("itl_per_token", "ITL/token", "Inter-token Latency per Token"),
              ("e2el", "E2EL", "End-to-end Latency"))  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class RunInfo:
    """What was benchmarked, for the report headers and the result file."""

    model: str
    dataset: str
    dataset_notes: tuple[str, ...] = ()
    skipped_rows: int = 0
    goodput_ms: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Level:
    """One measured load level: its raw results, their summary, and with concurrency auto the
    saturation point its controllers found."""

    result: LevelResult
    summary: BenchSummary
    saturation: Saturation | None = None


def level_label(load: LoadSpec) -> str:
    if load.auto is not None:
        return f"concurrency auto ({load.auto.min}..{load.auto.max})"
    if load.concurrency is not None:
        return f"concurrency {load.concurrency}"
    rate = "inf" if math.isinf(load.request_rate) else f"{load.request_rate:g}/s"
    text = f"request rate {rate}"
    if not math.isinf(load.request_rate):
        text += f", burstiness {load.burstiness:g}"
    return text + (f", max concurrency {load.max_concurrency}" if load.max_concurrency else "")


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _fmt_share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _token_label(s: BenchSummary) -> str | None:
    if s.token_source == "usage":
        return None
    if s.token_source == "chunks":
        return "the server sent no usage: output tokens are COUNTED AS TEXT CHUNKS; input tokens unknown (0)"
    return (f"{s.requests_without_usage} of {s.completed} requests had no usage: their output tokens are "
            "counted as text chunks and their input tokens are unknown")  # fmt: skip


def console_report(level: Level, info: RunInfo) -> str:
    """The human-readable table for one level (vLLM's layout, plus a client section)."""
    s, load = level.summary, level.result.load
    out = [" Serving Benchmark Result ".center(_WIDTH, "=")]

    def row(name: str, value: object) -> None:
        out.append(f"{name:<40} {value}")

    row("Model:", info.model)
    row("Load:", level_label(load))
    row("Successful requests:", s.completed)
    row("Failed requests:", s.failed)
    row("Benchmark duration (s):", _fmt(s.duration_s))
    row("Total input tokens:", s.total_input_tokens)
    row("Total generated tokens:", s.total_output_tokens)
    row("Request throughput (req/s):", _fmt(s.request_throughput))
    if s.request_goodput is not None:
        row("Request goodput (req/s):", f"{_fmt(s.request_goodput)} ({s.good_requests} good)")
    row("Output token throughput (tok/s):", _fmt(s.output_throughput))
    row("Peak output token throughput (tok/s):", _fmt(s.max_output_tokens_per_s))
    row("Peak concurrent requests:", s.max_concurrent_requests)
    row("Total token throughput (tok/s):", _fmt(s.total_token_throughput))
    delay = s.client_delay
    for key, short, header in _LATENCIES:
        dist: Distribution | None = getattr(s, key)
        if dist is None:
            continue
        out.append(f" {header} ".center(_WIDTH, "-"))
        row(f"Mean {short} (ms):", _fmt(dist.mean))
        row(f"Median {short} (ms):", _fmt(dist.median))
        row(f"Std {short} (ms):", _fmt(dist.std))
        for p, value in dist.percentiles:
            row(f"P{p:g} {short} (ms):", _fmt(value))
        # The figures above are as measured; what the client put into them is shown, not subtracted.
        if key == "ttft" and delay is not None and delay.ttft_added is not None:
            row("Est. client-added, in the above (ms):", f"{delay.ttft_added:.2f} ({_fmt_share(delay.ttft_share)} "
                                                          "of the mean)")  # fmt: skip
        if key == "itl" and delay is not None and delay.itl_error is not None:
            row("Est. client shift of mean/median ITL:", _fmt_share(delay.itl_error))
    if len(s.endpoints) > 1:
        out.append(" Per endpoint (latencies in ms) ".center(_WIDTH, "-"))
        out += _endpoint_table(s.endpoints)
    if level.saturation is not None:
        out += _saturation_section(level.saturation)
    out.append(" Client ".center(_WIDTH, "-"))
    for name, dist in (("Send lag", s.send_lag), ("Client queue time", s.queue_time),
                       ("Request write delay", delay.write if delay else None),
                       ("Read delay, canary", delay.read if delay else None)):  # fmt: skip
        if dist is not None:
            row(f"{name} p50/p99/max (ms):", f"{_fmt(dist.median)} / {_fmt(dist.at(99.0))} / {_fmt(dist.max)}")
    if delay is not None and delay.read_per_chunk_mean is not None:
        row("Read delay per chunk mean/p99 (ms):", f"{_fmt(delay.read_per_chunk_mean)} / "
                                                    f"{_fmt(delay.read_per_chunk_p99)} (estimated)")  # fmt: skip
    row("Client CPU, busiest process (% core):", _fmt(s.cpu_util_max * 100, ".0f"))
    choice = level.result.choice
    row("Client processes:", s.processes if choice is None else f"{s.processes} ({choice.describe()})")
    out.append("=" * _WIDTH)
    label = _token_label(s)
    if label:
        out.append(f"NOTE: {label}.")
    if s.errors:
        out.append("Errors: " + ", ".join(f"{kind} x{n}" for kind, n in s.errors))
        out += [f"  e.g. {example[:200]}" for example in s.error_examples]
    if s.client_limited:
        out.append("!" * _WIDTH)
        out.append("!! CLIENT-LIMITED: these figures measure batchgen, not only the server:")
        out += [f"!!   - {w}" for w in s.client_warnings]
        out.append("!" * _WIDTH)
    return "\n".join(out)


def _saturation_section(sat: Saturation) -> list[str]:
    """Concurrency auto: the saturation point, then each controller's timeline in a few rows."""
    out = [" Concurrency auto ".center(_WIDTH, "-")]

    def row(name: str, value: object) -> None:
        out.append(f"{name:<40} {value}")

    share = f" (sum of {sat.processes} client processes)" if sat.processes > 1 else ""
    row("Saturation point (settled limit):", f"{_fmt(sat.limit, '.0f')}{share}")
    row("Requests in flight there:", _fmt(sat.in_flight, ".0f"))
    row("Server running / waiting there:", f"{_fmt(sat.running, '.0f')} / {_fmt(sat.waiting, '.0f')}")
    if len(sat.endpoints) == 1 and sat.endpoints[0].kv_usage is not None:
        row("Server KV cache usage there:", f"{sat.endpoints[0].kv_usage:.0%}")
    row("Output token throughput there (tok/s):", _fmt(sat.output_throughput))
    row("Request throughput there (req/s):", _fmt(sat.request_throughput))
    row("Server generation there (tok/s):", _fmt(sat.server_tokens_per_s, ".1f"))
    settled = sum(e.settled_decisions for e in sat.endpoints)
    decisions = sum(e.decisions for e in sat.endpoints)
    window = "n/a" if sat.window_s is None else f"{sat.window_s[0]:.1f}-{sat.window_s[1]:.1f}"
    row("Settled over (s):", f"{window} (the last {settled} of {decisions} decisions)")
    if len(sat.endpoints) > 1:
        width = max(len(e.url) for e in sat.endpoints) + 2
        out.append(f"{'endpoint':<{width}}{'limit':>7}{'running':>9}{'waiting':>9}{'tok/s':>10}")
        for e in sat.endpoints:
            out.append(f"{e.url:<{width}}{_fmt(e.limit, '.0f'):>7}{_fmt(e.running, '.0f'):>9}"
                       f"{_fmt(e.waiting, '.0f'):>9}{_fmt(e.output_throughput, '.1f'):>10}")  # fmt: skip
    for endpoint in sat.endpoints:
        for trace in endpoint.traces:
            out += _timeline_rows(trace, endpoint, sat.processes)
    out += [f"NOTE: {note}." for note in sat.notes]
    return out


def _timeline_rows(trace: ControllerTrace, endpoint: EndpointSaturation, processes: int, most: int = 10) -> list[str]:
    """A few evenly spread decisions of one controller (the last included); * marks the settled ones."""
    ticks = trace.ticks
    chosen = spread(ticks, most)
    if not chosen:
        return []
    settled = {id(t) for t in trace.settled()}
    who = f"{endpoint.url}, process {trace.process}" if processes > 1 else endpoint.url
    lines = [f"Timeline at {who} ({len(ticks)} decisions, * settled):",
             "     t s  limit  flight  run  wait    kv  decision"]  # fmt: skip

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    for tick in chosen:
        kv = "-" if tick.kv_usage is None else f"{tick.kv_usage:.0%}"
        mark = "*" if id(tick) in settled else " "
        lines.append(f"{mark}{trace.level_time(tick):7.1f}  {tick.limit:5d}  {tick.in_flight:6d}  "
                     f"{number(tick.running):>3}  {number(tick.waiting):>4}  {kv:>4}  {tick.decision}")  # fmt: skip
    return lines


def _saturation_fields(sat: Saturation) -> dict[str, Any]:
    """The result JSON's `concurrency_auto`: the saturation point, and each server's timelines."""
    settings = sat.settings
    return {
        "min": settings.min,
        "max": settings.max,
        "start": settings.start,
        "interval_s": settings.interval,
        "client_processes": sat.processes,
        "saturation_limit": sat.limit,
        "in_flight": sat.in_flight,
        "running": sat.running,
        "waiting": sat.waiting,
        "server_tokens_per_s": sat.server_tokens_per_s,
        "output_throughput": sat.output_throughput,
        "request_throughput": sat.request_throughput,
        "window_s": None if sat.window_s is None else list(sat.window_s),
        "notes": list(sat.notes),
        "endpoints": [
            {
                "base_url": e.url,
                "metrics": e.metrics,
                "saturation_limit": e.limit,
                "in_flight": e.in_flight,
                "running": e.running,
                "waiting": e.waiting,
                "kv_usage": e.kv_usage,
                "preemptions": e.preemptions,
                "server_tokens_per_s": e.server_tokens_per_s,
                "output_throughput": e.output_throughput,
                "request_throughput": e.request_throughput,
                "window_s": None if e.window_s is None else list(e.window_s),
                "decisions": e.decisions,
                "settled_decisions": e.settled_decisions,
                "timelines": [trace.to_dict() for trace in e.traces],
            }
            for e in sat.endpoints
        ],
    }


def _latencies(s: BenchSummary) -> dict[str, float | None]:
    """The latencies shown per server, under vLLM's names."""
    return {
        "mean_ttft_ms": s.ttft.mean if s.ttft else None,
        "median_ttft_ms": s.ttft.median if s.ttft else None,
        "mean_tpot_ms": s.tpot.mean if s.tpot else None,
        "median_e2el_ms": s.e2el.median if s.e2el else None,
    }


def _endpoint_table(endpoints: Sequence[EndpointSummary]) -> list[str]:
    """One line per server: requests, failures, output tok/s, mean/median TTFT, mean TPOT, median E2EL."""
    width = max(len(e.url or _NO_SERVER) for e in endpoints) + 2
    lines = [f"{'endpoint':<{width}}{'requests':>9}{'failed':>8}{'tok/s':>10}{'TTFT mean':>11}{'TTFT p50':>10}"
             f"{'TPOT mean':>11}{'E2EL p50':>10}"]  # fmt: skip
    for e in endpoints:
        s = e.summary
        ttft, ttft_p50, tpot, e2el_p50 = (_fmt(v) for v in _latencies(s).values())
        lines.append(
            f"{e.url or _NO_SERVER:<{width}}{s.completed + s.failed:>9}{s.failed:>8}"
            f"{_fmt(s.output_throughput, '.1f'):>10}{ttft:>11}{ttft_p50:>10}{tpot:>11}{e2el_p50:>10}"
        )
    return lines


def _endpoint_fields(endpoint: EndpointSummary) -> dict[str, Any]:
    s = endpoint.summary
    return {
        "base_url": endpoint.url,
        "requests": s.completed + s.failed,
        "completed": s.completed,
        "failed": s.failed,
        "error_counts": dict(s.errors),
        "total_output_tokens": s.total_output_tokens,
        "output_throughput": s.output_throughput,
        **_latencies(s),
    }


def sweep_table(levels: Sequence[Level]) -> str:
    """One line per level, for reading a sweep at a glance."""
    head = (f"{'load':<28}{'req/s':>8}{'tok/s':>10}{'TTFT p50':>10}{'p99':>9}{'TPOT p50':>10}{'p99':>8}"
            f"{'fail':>6}  client")  # fmt: skip
    lines = [head, "-" * len(head)]
    for lv in levels:
        s = lv.summary
        ttft = (s.ttft.median, s.ttft.at(99.0)) if s.ttft else (None, None)
        tpot = (s.tpot.median, s.tpot.at(99.0)) if s.tpot else (None, None)
        lines.append(
            f"{level_label(lv.result.load):<28}{_fmt(s.request_throughput):>8}{_fmt(s.output_throughput, '.1f'):>10}"
            f"{_fmt(ttft[0], '.1f'):>10}{_fmt(ttft[1], '.1f'):>9}{_fmt(tpot[0]):>10}{_fmt(tpot[1]):>8}{s.failed:>6}"
            f"  {'LIMITED' if s.client_limited else 'ok'}"
        )
    return "\n".join(lines)


def _dist_fields(name: str, dist: Distribution | None) -> dict[str, float | None]:
    if dist is None:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"std_{name}_ms": None}
    fields: dict[str, float | None] = {f"mean_{name}_ms": dist.mean, f"median_{name}_ms": dist.median,
                                       f"std_{name}_ms": dist.std}  # fmt: skip
    for p, value in dist.percentiles:
        fields[f"p{int(p) if int(p) == p else p}_{name}_ms"] = value  # vLLM's key spelling: p99, p99.9
    return fields


def result_json(level: Level, info: RunInfo) -> dict[str, Any]:
    """One level's result object: vLLM `bench serve` names first, then batchgen's extras."""
    s, load = level.summary, level.result.load
    closed = load.concurrency is not None or load.auto is not None
    sat = level.saturation
    # Concurrency auto: the limit it settled on is the level's concurrency for a dashboard of a sweep.
    concurrency = load.concurrency if load.auto is None else (None if sat is None or sat.limit is None
                                                               else round(sat.limit))  # fmt: skip
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat",
        "backend": "openai-chat",
        "label": "batchgen",
        "model_id": info.model,
        "tokenizer_id": None,
        "num_prompts": len(level.result.records),
        # A closed loop at concurrency N is vLLM's request rate inf with max concurrency N.
        "request_rate": "inf" if closed or math.isinf(load.request_rate) else load.request_rate,
        "burstiness": load.burstiness,
        "max_concurrency": concurrency if closed else load.max_concurrency,
        "duration": s.duration_s,
        "completed": s.completed,
        "failed": s.failed,
        "total_input_tokens": s.total_input_tokens,
        "total_output_tokens": s.total_output_tokens,
        "request_throughput": s.request_throughput,
        "request_goodput": s.request_goodput,
        "output_throughput": s.output_throughput,
        "total_token_throughput": s.total_token_throughput,
        "max_output_tokens_per_s": s.max_output_tokens_per_s,
        "max_concurrent_requests": s.max_concurrent_requests,
    }
    for name in ("ttft", "tpot", "itl", "e2el"):
        result.update(_dist_fields(name, getattr(s, name)))
    if s.queue_time is not None:
        result.update(_dist_fields("client_queue_time", s.queue_time))
    result.update(_dist_fields("itl_per_token", s.itl_per_token))
    result.update(_dist_fields("send_lag", s.send_lag))
    result.update(_client_delay_fields(s))
    result.update({
        "batchgen_version": __version__,
        "load_mode": "closed_loop" if closed else "open_loop",
        "concurrency": "auto" if load.auto is not None else load.concurrency,
        "duration_limit_s": load.duration_s,
        "warmup_requests": load.warmup,
        "dataset": info.dataset,
        "dataset_notes": list(info.dataset_notes),
        "dataset_skipped_rows": info.skipped_rows,
        "token_source": s.token_source,
        "token_note": _token_label(s),
        "requests_without_usage": s.requests_without_usage,
        "goodput_slo_ms": info.goodput_ms,
        "good_requests": s.good_requests,
        "error_counts": dict(s.errors),
        "max_send_lag_ms": s.send_lag.max if s.send_lag else None,
        "client_processes": s.processes,
        "client_processes_auto": None if level.result.choice is None else {
            "needed": level.result.choice.needed, "cores": level.result.choice.cores,
            "probe_s": PROBE_S, "probe_chunks_per_s": level.result.choice.chunks_per_s,
            "probe_error": level.result.choice.error},
        "client_cpu_s": s.cpu_s,
        "client_cpu_util_max": s.cpu_util_max,
        "client_limited": s.client_limited,
        "client_warnings": list(s.client_warnings),
        "endpoints": [_endpoint_fields(e) for e in s.endpoints],
    })  # fmt: skip
    if sat is not None:
        result["concurrency_auto"] = _saturation_fields(sat)
    return result


def _client_delay_fields(s: BenchSummary) -> dict[str, Any]:
    """The client-added delay: measured (write, canary) and estimated (per chunk, in TTFT and ITL)."""
    d = s.client_delay
    fields = {**_dist_fields("client_write_delay", d.write if d else None),
              **_dist_fields("client_read_delay", d.read if d else None)}  # fmt: skip
    fields.update({
        "client_read_delay_per_chunk_mean_ms": d.read_per_chunk_mean if d else None,
        "client_read_delay_per_chunk_p99_ms": d.read_per_chunk_p99 if d else None,
        "est_client_added_ttft_ms": d.ttft_added if d else None,
        "est_client_ttft_error": d.ttft_error if d else None,
        "est_client_itl_error": d.itl_error if d else None,
        "client_chunks_per_s": d.chunks_per_s if d else None,
        "client_chunks_per_cpu_s": d.chunks_per_cpu_s if d else None,
        "client_processes_needed": d.processes_needed if d else None,
    })  # fmt: skip
    return fields


def write_results(path: str, levels: Sequence[Level], info: RunInfo) -> None:
    """One JSON object per line, one line per level (a single level is a plain JSON file)."""
    lines = [orjson.dumps(result_json(lv, info)) for lv in levels]
    Path(path).write_bytes(b"\n".join(lines) + b"\n")


_RAW_SCHEMA = pa.schema([
    ("level", pa.int32()), ("load", pa.string()), ("index", pa.int64()), ("process", pa.int32()),
    ("scheduled_s", pa.float64()), ("queue_s", pa.float64()), ("sent_s", pa.float64()), ("send_lag_s", pa.float64()),
    ("end_s", pa.float64()), ("ttft_s", pa.float64()), ("e2el_s", pa.float64()),
    ("chunk_times_s", pa.list_(pa.float64())), ("chunk_tokens", pa.list_(pa.int32())),
    ("prompt_tokens", pa.int64()), ("output_tokens", pa.int64()), ("chunks", pa.int32()),
    ("error", pa.string()), ("error_type", pa.string()), ("endpoint", pa.string()),
])  # fmt: skip


def write_raw(path: str, levels: Sequence[Level]) -> None:
    """One row per measured request; times in seconds (`*_s` from the level start, chunk times from the send)."""
    rows = []
    for number, lv in enumerate(levels):
        label = level_label(lv.result.load)
        for r in lv.result.records:
            rows.append({
                "level": number, "load": label, "index": r.index, "process": r.process,
                "scheduled_s": r.scheduled_s, "queue_s": r.queue_s, "sent_s": r.sent_s,
                "send_lag_s": r.send_lag_s, "end_s": r.end_s,
                "ttft_s": r.ttft_s, "e2el_s": r.e2el_s, "chunk_times_s": list(r.chunk_times_s),
                "chunk_tokens": None if r.chunk_tokens is None else list(r.chunk_tokens),
                "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens, "chunks": len(r.chunk_times_s),
                "error": r.error, "error_type": r.error_type, "endpoint": r.endpoint,
            })  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=_RAW_SCHEMA), path)


def check_plot() -> None:
    """Fail before the benchmark runs, not after, when --plot cannot work."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib, which is not installed: pip install 'batchgen[plot]'")


def write_plot(path: str, levels: Sequence[Level]) -> None:
    """Latency percentiles (TTFT, TPOT, E2EL; p50 and p99) against output throughput, one point per level."""
    check_plot()
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and no GUI toolkit import
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    x = [lv.summary.output_throughput for lv in levels]
    for ax, (key, title) in zip(axes, (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2EL")), strict=True):
        for p, style in ((50.0, "o-"), (99.0, "s--")):
            y = [d.at(p) if (d := getattr(lv.summary, key)) is not None else math.nan for lv in levels]
            ax.plot(x, y, style, label=f"p{p:g}")
        for lv, xi in zip(levels, x, strict=True):
            d = getattr(lv.summary, key)
            if d is not None:
                ax.annotate(level_label(lv.result.load).split(",")[0], (xi, d.median), fontsize=7)
        ax.set(title=f"{title} vs throughput", xlabel="output tokens/s", ylabel=f"{title} (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

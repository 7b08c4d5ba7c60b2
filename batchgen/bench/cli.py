"""The `batchgen bench` subcommand: its flags, and their translation into `BenchOptions`.

Parsing only: the work happens in `batchgen.bench.run_bench`. Heavy modules are imported inside
the handler, so `batchgen --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any


from batchgen import _constants as C
from batchgen._cli_types import json_object
from batchgen.headers import parse_header_lines

__all__ = ["add_bench_parser"]

EXIT_OK = 0
EXIT_FAILED_REQUESTS = 1  # the benchmark ran, but some requests failed (they are in the report)
EXIT_CONFIG = 2  # bad flags or dataset; nothing was sent
EXIT_SERVER = 3  # the server could not be used: model discovery failed, or every request failed

EPILOG = """\
Metrics (as vLLM's bench serve): TTFT = send -> first chunk with generated text (content, reasoning or
tool-call arguments); E2EL = send -> last such chunk; TPOT = (E2EL - TTFT) / (output tokens - 1);
ITL = gaps between text chunks, and per token when the server sends per-chunk usage.
Token counts come from the server's usage; without usage the report says how they were counted.

Load: --concurrency N (closed loop; a list 1,4,16 is a sweep) or --request-rate R (Poisson arrivals,
--burstiness for gamma gaps, inf = all at once; a list is a sweep), optionally --max-concurrency.
The default is vLLM's: every request at once (--request-rate inf).
--concurrency auto finds the saturation point: a controller steers the concurrency from the server's
load (vLLM /metrics: running, waiting, KV cache, preemptions; else 429s, timeouts and TTFT) within
--concurrency-min/--concurrency-max; the report gives the limit it settled on (the median of the last
third of its decisions), the server's running/waiting there and the throughput, and the result JSON
the whole timeline. Give it a --duration of many --concurrency-interval's (default 1.5 s).

Exit codes: 0 all requests succeeded; 1 some requests failed; 2 bad flags or dataset;
3 the server could not be used (no model list, or every request failed).
"""


def _concurrencies(text: str) -> list[int | str]:
    """N, a list like 1,4,16, or auto (also in a list: 16,auto)."""
    values: list[int | str] = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        if item == "auto":
            values.append(item)
            continue
        try:
            number = int(item)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected N, auto or a list like 1,4,16, got {text!r}") from exc
        if number < 1:
            raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
        values.append(number)
    if not values:
        raise argparse.ArgumentTypeError(f"expected N, auto or a list like 1,4,16, got {text!r}")
    return values


def _processes(text: str) -> int | str:
    return "auto" if text.strip() == "auto" else _positive_int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _rates(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a rate, 'inf' or a list like 1,2,inf, got {text!r}") from exc
    if not values or not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"rates must be > 0 (or inf), got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _slo(text: str) -> tuple[str, float]:
    name, _, value = text.partition(":")
    if name not in ("ttft", "tpot", "e2el"):
        raise argparse.ArgumentTypeError(f"goodput SLO must be ttft:MS, tpot:MS or e2el:MS, got {text!r}")
    try:
        ms = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"goodput SLO {text!r}: {value!r} is not a number of ms") from exc
    if ms < 0:
        raise argparse.ArgumentTypeError(f"goodput SLO {text!r} must be >= 0 ms")
    return name, ms


def add_bench_parser(commands: Any) -> None:
    """Add `bench` to the `batchgen` subcommands."""
    parser = commands.add_parser(
        "bench", help="benchmark a server (TTFT, TPOT, ITL, throughput)",
        description="Measure a chat-completions server with vLLM-comparable metrics.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", dest="base_urls", action="append", metavar="URL",
                        help=f"API root (default {C.DEFAULT_BASE_URL}); 'mock' = a built-in mock server (TTFT 20 ms, "
                             "ITL 5 ms); repeat it to spread one load over several servers, with a breakdown per "
                             "server")  # fmt: skip
    server.add_argument("--model", metavar="NAME", help="default: the first model GET /v1/models lists")
    server.add_argument("--api-key-env", metavar="VAR", help="env var holding the API key (default BATCHGEN_API_KEY, "
                        "then OPENAI_API_KEY)")
    server.add_argument("--header", dest="headers", action="append", metavar="'NAME: VALUE'",
                        help="an HTTP header sent with every request; repeatable")
    server.add_argument("--timeout", type=_positive_float, default=C.DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="per request, whole stream included (default %(default)g)")
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", default="random", metavar="random|sharegpt|PATH",
                      help="synthetic prompts, ShareGPT JSON (with --dataset-path), or a .parquet/.jsonl input "
                      "read as `batchgen run` reads it (default random)")
    data.add_argument("--dataset-path", metavar="FILE", help="the ShareGPT JSON file")
    data.add_argument("--input-len", type=int, default=1024, metavar="N", help="random: prompt words (default 1024)")
    data.add_argument("--output-len", type=int, metavar="N",
                      help="pin every answer to N tokens (max_tokens = min_tokens = N, ignore_eos); random default 128")
    data.add_argument("--num-prompts", type=int, metavar="N", help="requests per level (default 1000, or unlimited "
                      "with --duration)")
    data.add_argument("--seed", type=int, default=0, help="prompts and arrival times (default 0)")
    data.add_argument("--temperature", type=float, help="sent with every request (default: the server's)")
    data.add_argument("--extra", type=json_object, metavar="JSON", help="extra request fields for every request")
    data.add_argument("--no-continuous-usage", dest="continuous_usage", action="store_false",
                      help="do not ask for per-chunk usage (for servers that reject continuous_usage_stats)")
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=_concurrencies, metavar="N[,N...]|auto",
                      help="closed loop: N requests in flight; auto = find the saturation point (see below)")
    load.add_argument("--concurrency-min", type=_positive_int, metavar="N",
                      help="concurrency auto: the lowest limit (default 1)")
    load.add_argument("--concurrency-max", type=_positive_int, metavar="N",
                      help="concurrency auto: the highest limit, and the number of workers (default 512)")
    load.add_argument("--concurrency-interval", type=_positive_float, metavar="SECONDS",
                      help="concurrency auto: seconds between the controller's decisions (default 1.5)")
    load.add_argument("--request-rate", type=_rates, metavar="R[,R...]", help="open loop: arrivals per second, or inf")
    load.add_argument("--burstiness", type=_positive_float, default=1.0, help="gamma shape of arrival gaps "
                      "(1 = Poisson, default)")
    load.add_argument("--max-concurrency", type=int, metavar="N", help="cap on in-flight requests with --request-rate")
    load.add_argument("--warmup", type=int, default=0, metavar="N", help="requests sent first and not counted")
    load.add_argument("--duration", type=_positive_float, metavar="SECONDS", help="stop starting requests after this")
    load.add_argument("--client-processes", type=_processes, default=1, metavar="N|auto",
                      help="spread the load over N client processes (default 1); auto = probe each level in one "
                      "process for a few seconds and use as many as its client-added delay needs, within the cores")
    output = parser.add_argument_group("output")
    output.add_argument("--goodput", type=_slo, nargs="+", metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50")
    output.add_argument("--result-json", metavar="FILE", help="vLLM-compatible result; one JSON object per level")
    output.add_argument("--raw-output", metavar="FILE.parquet", help="one row per request, chunk timings included")
    output.add_argument("--plot", metavar="FILE.png", help="latency percentiles vs throughput (needs matplotlib)")
    parser.set_defaults(handler=_bench_command)


def _loads(args: argparse.Namespace) -> tuple[Any, ...]:
    from batchgen.bench.runner import LoadSpec
    from batchgen.errors import ConfigError

    if args.concurrency and args.request_rate:
        raise ConfigError("--concurrency is a closed loop; with --request-rate, cap in-flight requests with "
                          "--max-concurrency")  # fmt: skip
    if args.concurrency and args.max_concurrency:
        raise ConfigError("--max-concurrency only applies to --request-rate; --concurrency already fixes it")
    num = args.num_prompts if args.num_prompts is not None else (None if args.duration else 1000)
    common = dict(burstiness=args.burstiness, max_concurrency=args.max_concurrency, num_prompts=num,
                  duration_s=args.duration, warmup=args.warmup, seed=args.seed)  # fmt: skip
    auto = _auto(args)
    if args.concurrency:
        return tuple(LoadSpec(auto=auto, **common) if c == "auto" else LoadSpec(concurrency=int(c), **common)
                     for c in args.concurrency)  # fmt: skip
    return tuple(LoadSpec(request_rate=r, **common) for r in (args.request_rate or [math.inf]))


def _auto(args: argparse.Namespace) -> Any:
    """The `AutoConcurrency` of `--concurrency auto` (None without it; its flags alone are an error)."""
    from batchgen.autoscale import AutoConcurrency
    from batchgen.errors import ConfigError

    given = {name: value for name, value in (("min", args.concurrency_min), ("max", args.concurrency_max),
                                            ("interval", args.concurrency_interval)) if value is not None}  # fmt: skip
    if "auto" not in (args.concurrency or ()):
        if given:
            raise ConfigError("--concurrency-min, --concurrency-max and --concurrency-interval apply to "
                              "--concurrency auto")  # fmt: skip
        return None
    return AutoConcurrency(**given)


def _api_key(args: argparse.Namespace) -> str | None:
    from batchgen.apikey import resolve_api_key

    return resolve_api_key(env_var=args.api_key_env)


def _options(args: argparse.Namespace) -> Any:
    from batchgen.bench import BenchOptions
    from batchgen.bench.datasets import DatasetSpec
    from batchgen.bench.runner import ServerSpec

    defaults = dict(args.extra or {})
    if args.temperature is not None:
        defaults["temperature"] = args.temperature
    loads = _loads(args)
    dataset = DatasetSpec(
        name=args.dataset, model="", num_prompts=max(1, min(loads[0].num_prompts or 1000, 100_000)),
        input_len=args.input_len, output_len=args.output_len, path=args.dataset_path, seed=args.seed,
        defaults=defaults, continuous_usage=args.continuous_usage,
    )  # fmt: skip
    return BenchOptions(
        server=ServerSpec(base_urls=tuple(args.base_urls or [C.DEFAULT_BASE_URL]), api_key=_api_key(args),
                          timeout=args.timeout, headers=parse_header_lines(args.headers or [])),
        dataset=dataset, loads=loads, model=args.model, processes=args.client_processes,
        goodput_ms=dict(args.goodput) if args.goodput else None,
        result_json=args.result_json, raw_output=args.raw_output, plot=args.plot,
    )  # fmt: skip


def _bench_command(args: argparse.Namespace) -> int:
    from batchgen.bench import run_bench
    from batchgen.errors import APIError, BatchgenError

    try:
        options = _options(args)
        levels = run_bench(options)
    except APIError as exc:
        print(f"batchgen bench: the server could not be used: {exc}", file=sys.stderr)
        return EXIT_SERVER
    except BatchgenError as exc:
        print(f"batchgen bench: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if any(lv.summary.completed == 0 for lv in levels):
        return EXIT_SERVER
    return EXIT_FAILED_REQUESTS if any(lv.summary.failed for lv in levels) else EXIT_OK

"""The `batchgen` command line: `run`, `bench` and `mock-server`; parsing and reporting only."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from batchgen import _constants as C
from batchgen._cli_types import concurrency_value, json_object
from batchgen._constants import EXIT_CODE_MEANINGS
from batchgen._version import __version__
from batchgen.endpoints import DEFAULT_EJECT_AFTER
from batchgen.errors import BatchgenError

__all__ = ["main"]

def _wrap(text: str) -> str:
    return textwrap.fill(text, width=100, break_on_hyphens=False)


def run_epilog(parser: argparse.ArgumentParser) -> str:
    """`batchgen run --help`'s closing text, built from the constants the code uses (never restated)."""
    from batchgen.config import FIELDS
    from batchgen.io.schema import RESULT_COLUMNS
    from batchgen.rows import OVERRIDE_FIELDS

    flags = {action.dest for action in parser._actions}
    config_only = [name for name in FIELDS if name not in flags and name not in ("input", "output")]
    exit_codes = "; ".join(f"{int(code)} {meaning}" for code, meaning in EXIT_CODE_MEANINGS.items())
    return "\n\n".join([
        _wrap("Every flag is also a key of the YAML config (--max-tokens is max_tokens:); flags win. Config-only "
              f"keys: {', '.join(config_only)}. YAML headers: is a mapping; --header lines add to it. No per-row "
              "header is sent (--request-id-header opts in to a fresh UUID4 per attempt)."),
        _wrap("Input columns: a messages column (list of {role, content, ...}, or its JSON text) or a prompt column "
              "(text; a `system` column or --system-prompt adds a system message). Columns named like a request "
              f"field ({', '.join(OVERRIDE_FIELDS)}) override the config for their row when not null; an `extra` "
              "column (object or JSON text) is merged last."),
        _wrap("Output: id, the input columns (one clashing with an output column is renamed input_<name>), then "
              f"{', '.join(RESULT_COLUMNS)}; one row per input row, in input order. Progress is saved to "
              "OUTPUT.batchgen/ as it goes: rerun the same command to resume."),
        _wrap(f"Exit codes: {exit_codes}."),
    ])  # fmt: skip


def _add_run_parser(commands: Any, *, full: bool) -> None:
    parser = commands.add_parser(
        "run",
        help="run a bulk generation job",
        description="Send every row of an input file to a chat-completions server and write the answers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only flags given on the command line override the YAML
    )
    parser.add_argument("config", nargs="?", help="YAML job config (optional)")
    io = parser.add_argument_group("input and output")
    io.add_argument("-i", "--input", metavar="PATH", help=".parquet, .jsonl, .jsonl.gz, a directory or a glob of Parquet files")
    io.add_argument("--input-format", choices=C.INPUT_FORMATS, help="default: from the suffix")
    io.add_argument("-o", "--output", metavar="PATH", help=".parquet or .jsonl")
    io.add_argument("--output-format", choices=C.OUTPUT_FORMATS,
                    help="default: from the suffix; a .jsonl output of an openai-batch input is openai-batch "
                         "(OpenAI's and vllm run-batch's output lines)")  # fmt: skip
    io.add_argument("--limit", type=int, metavar="N", help="only the first N rows")
    io.add_argument("--overwrite", action="store_true", help="discard earlier results and start over")
    io.add_argument("--retry-failed", action="store_true", help="re-send only the rows that ended as errors")
    io.add_argument("--no-progress", dest="progress", action="store_false", help="log lines instead of a bar")
    io.add_argument("--journal-seconds", type=float, metavar="SECONDS",
                    help=f"fsync finished answers this soon, so a crash re-sends no more (default "
                         f"{C.DEFAULT_JOURNAL_SECONDS:g}; 0 = only at each part, every flush_seconds)")  # fmt: skip
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", metavar="URL", action="append",
                        help=f"default {C.DEFAULT_BASE_URL}; '{C.MOCK_URL}' = built-in mock server; repeat it to spread "
                             "the run over several servers of one model")  # fmt: skip
    server.add_argument("--api-key-env", metavar="VAR", help=f"env var holding the API key (default {', then '.join(C.API_KEY_ENV_VARS)})")
    server.add_argument("--model", metavar="NAME", help="default: the first model GET /v1/models lists")
    server.add_argument("--concurrency", type=concurrency_value, metavar="N|auto",
                        help=f"requests in flight per server (default {C.DEFAULT_CONCURRENCY}); auto: steered by each "
                             "server's own load (vLLM /metrics), within --concurrency-min/--concurrency-max")
    server.add_argument("--concurrency-min", type=int, metavar="N", help="concurrency auto's lower bound (default 1)")
    server.add_argument("--concurrency-max", type=int, metavar="N", help="concurrency auto's upper bound (default 512)")
    server.add_argument("--eject-after", type=int, metavar="N",
                        help="connection failures, timeouts or 5xx in a row that take a server out of the run until "
                             f"it answers again (default {DEFAULT_EJECT_AFTER})")
    server.add_argument("--skip-bad-endpoints", action="store_true",
                        help="drop a server that cannot be reached or does not serve the model (a warning), "
                             "instead of stopping before anything is sent")  # fmt: skip
    server.add_argument("--max-retries", type=int, metavar="N", help=f"retries per row (default {C.DEFAULT_MAX_RETRIES})")
    server.add_argument("--timeout", type=float, metavar="SECONDS", help=f"per attempt (default {C.DEFAULT_TIMEOUT:g})")
    server.add_argument("--stream", action="store_true", help="use SSE and record time to first token (ttft_s)")
    server.add_argument("--header", dest="headers", action="append", metavar="'NAME: VALUE'",
                        help="an HTTP header sent with every request; repeatable (YAML headers: adds to these)")
    server.add_argument("--request-id-header", metavar="NAME",
                        help="send a fresh UUID4 per attempt under this header (e.g. X-Request-Id); off by default")
    io.add_argument("--keep-raw", action="store_true", help="add the response JSON as received to the raw column")
    sampling = parser.add_argument_group("defaults for every row (a column of the same name wins)")
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--max-tokens", type=int)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--stop", action="append", metavar="TEXT", help="repeatable")
    sampling.add_argument("--seed", type=int)
    sampling.add_argument("--extra", type=json_object, metavar="JSON", help='extra body fields, e.g. \'{"min_p": 0.05}\'')
    controls = parser.add_argument_group("run controls (see README, Run controls)")
    controls.add_argument("--max-requests-per-minute", type=float, metavar="N", help="a client-side quota (hosted APIs)")
    controls.add_argument("--max-tokens-per-minute", type=float, metavar="N",
                          help="a client-side quota: prompt + max_tokens, corrected by the usage that comes back")
    controls.add_argument("--check-length", choices=C.LENGTH_CHECKS,
                          help="rows that cannot fit the server's max_model_len become error rows unsent (default "
                               "estimate; exact asks the server's /tokenize)")  # fmt: skip
    controls.add_argument("--max-error-rate", type=float, metavar="R", help="stop when this fraction of rows failed")
    controls.add_argument("--min-rows-for-error-rate", type=int, metavar="N",
                          help=f"rows done before --max-error-rate applies (default {C.DEFAULT_MIN_ROWS_FOR_ERROR_RATE})")
    controls.add_argument("--max-duration", type=float, metavar="SECONDS", help="stop cleanly then; a rerun resumes")
    controls.add_argument("--max-cost", type=float, metavar="AMOUNT", help="stop when the spent cost reaches it")
    controls.add_argument("--price-input", type=float, metavar="PRICE", help="per million input tokens")
    controls.add_argument("--price-output", type=float, metavar="PRICE", help="per million output tokens")
    controls.add_argument("--dry-run", action="store_true",
                          help="print rows, estimated tokens, cost and time; send nothing")
    engine = parser.add_argument_group("engine (see README, Running on a Ray cluster)")
    engine.add_argument("--engine", choices=C.ENGINES, help="local (default): this process; ray: actors on a Ray cluster")
    engine.add_argument("--ray-address", metavar="ADDRESS", help="a running cluster (ray start --head); default: $RAY_ADDRESS, or a cluster "
                        "`ray start` began on this machine, else a local Ray for the job")
    engine.add_argument("--ray-actors", type=int, metavar="N", help="actors sending requests (default: one per CPU of the cluster)")
    engine.add_argument("--ray-block-rows", type=int, metavar="N",
                        help=f"rows per output part file, the unit of resume (default {C.DEFAULT_RAY_BLOCK_ROWS})")
    engine.add_argument("--ray-actor-cpus", type=float, metavar="CPUS",
                        help=f"CPUs each actor reserves (default {C.DEFAULT_RAY_ACTOR_CPUS:g})")
    mapping = parser.add_argument_group("mapping columns to requests")
    mapping.add_argument("--messages-column", metavar="NAME", help="default messages")
    mapping.add_argument("--prompt-column", metavar="NAME", help="default prompt")
    mapping.add_argument("--system-prompt", metavar="TEXT")
    mapping.add_argument("--id-column", metavar="NAME", help="default id, else custom_id, else the row number")
    if full:  # the closing text imports the schema (pyarrow): only for `batchgen run`'s own help
        parser.epilog = run_epilog(parser)
    parser.set_defaults(handler=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    from batchgen.config import load_config, read_yaml
    from batchgen.pipeline import run

    flags = {k: v for k, v in vars(args).items() if k not in ("config", "handler", "command")}
    settings = read_yaml(args.config) if getattr(args, "config", None) else {}
    if "headers" in flags and isinstance(settings.get("headers"), dict):
        # Headers add up: the file's, then the flags' (a flag wins for the same name).
        from batchgen.headers import parse_header_lines

        flags["headers"] = {**settings["headers"], **parse_header_lines(flags["headers"])}
    settings.update(flags)
    cfg = load_config(settings, source=getattr(args, "config", None) or "flags")
    try:
        result = run(cfg)
    except BatchgenError as exc:
        print(f"batchgen: error: {exc}", file=sys.stderr)
        return C.ExitCode.CONFIG
    if result.stats.done or result.stats.skipped:
        print(result.stats.summary(result.output), file=sys.stderr)
    print(f"batchgen: {result.message}", file=sys.stderr)
    return result.exit_code


def _add_mock_parser(commands: Any, *, full: bool) -> None:
    parser = commands.add_parser(
        "mock-server",
        help="serve a fake vLLM OpenAI-compatible API (no GPU)",
        description="A deterministic vLLM-like server for demos, tests and benchmarks.",
    )
    if not full:  # aiohttp.web is only imported when this command runs
        return
    from batchgen.testing import mock_server

    mock_server.add_arguments(parser)
    parser.set_defaults(handler=mock_server.main)


def _add_bench_parser(commands: Any, *, full: bool) -> None:
    if not full:
        commands.add_parser("bench", help="measure a server: throughput, TTFT, TPOT, ITL, latency percentiles")
        return
    from batchgen.bench.cli import add_bench_parser

    add_bench_parser(commands)


def build_parser(command: str | None = None, *, help_asked: bool = True) -> argparse.ArgumentParser:
    """The parser; only the named command's own modules are imported (start-up time and memory),
    and `run`'s closing help text is built only when help may be shown."""
    parser = argparse.ArgumentParser(prog="batchgen", description="Bulk chat-completion jobs against vLLM and OpenAI-compatible servers.")
    parser.add_argument("--version", action="version", version=f"batchgen {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run_parser(commands, full=help_asked and command in (None, "run"))
    _add_bench_parser(commands, full=command in (None, "bench"))
    _add_mock_parser(commands, full=command in (None, "mock-server"))
    return parser


def _arrow_allocator() -> None:
    """Ask for jemalloc as Arrow's C++ default pool, before pyarrow is loaded (it is chosen once).

    `pa.set_memory_pool` only reaches allocations made from Python; Parquet's page, decompression
    and encoder buffers come from the C++ default pool (mimalloc), which kept 30-50 MB of RSS it no
    longer used through a 1M-row merge (benchmarks/README.md). A value the user set wins.
    """
    if "pyarrow" not in sys.modules:
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")


def main(argv: Sequence[str] | None = None) -> int:
    _arrow_allocator()
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in arguments if not a.startswith("-")), None)
    parser = build_parser(command, help_asked=command is None or bool({"-h", "--help"} & set(arguments)))
    args = parser.parse_args(arguments)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args))
    except BatchgenError as exc:
        print(f"batchgen: error: {exc}", file=sys.stderr)
        return C.ExitCode.CONFIG
    except KeyboardInterrupt:
        return C.ExitCode.INTERRUPTED

"""Does `batchgen bench` say so when its client moved the latencies it reports? (issue 16)

`batchgen bench` estimates the delay its own client adds to the TTFT and ITL it measures (the
request's write, and a read canary for the chunk reads) and flags a level CLIENT-LIMITED when it
estimates a TTFT or ITL error of 7% or more. This benchmark checks that against the truth: the
exact-timing streaming server (`exact_server.py`) sends each request's first token exactly
`--ttft-ms` after the request reached its socket (the kernel's receive timestamp) and then one
token every `--itl-ms`, and reports how late its tokens actually left, the first ones apart. So:

* TTFT true = ttft_ms + the server's first-token lateness (mean for the mean, p50 for the median):
  its own error, a late wake-up on a busy host included, not the client's;
  ITL true = itl_ms (consecutive tokens are late alike: their difference is ~0).
* TTFT error = the larger of |mean / true - 1| and |median / true - 1|; ITL error likewise.
  The p99 errors (against ttft_ms + the server's p99 first-token lateness, and itl_ms) are kept
  for information: the report does not promise them (a p99 carries the client's p99 delay).
* Verdict of a run, with the 10% the report promises never to pass silently:
    ok          both errors <= 10% and not flagged
    flagged     flagged and an error > 10% (correct)
    false flag  flagged, both errors <= 10%
    MISSED      an error > 10% and not flagged: the defect issue 16 forbids

One ExactServer serves the whole benchmark. For every run, each concurrency in turn (the order is
reversed every other run, so drift on a shared machine hits every level alike): the server's stats
are reset, `batchgen bench` runs as a subprocess (`--num-prompts max(256, 4 x c) --warmup c`,
`--input-len 32 --output-len TOKENS`), then, unless `--no-plain`, `plain_stream_client.py` (a plain
asyncio + aiohttp loop with no detector: the error a plain Python client makes, for comparison)
against the same server, reset again. Prints one line per run and a Markdown table for
benchmarks/README.md; writes every run's numbers to benchmarks/results/client-delay-<time>.json.
Exit code 1 when any run was MISSED.

    python benchmarks/bench_client_delay.py                                 # 5 runs at 4, 64, 256, 512
    python benchmarks/bench_client_delay.py --runs 1 --concurrency 4,64     # a smoke run, ~1 min
    python benchmarks/bench_client_delay.py --client-processes auto --no-plain
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _provenance import machine, source_hash  # noqa: E402
from exact_server import ExactServer  # noqa: E402

LIMIT = 0.10  # an error above this must be flagged (the detector itself flags from 7%)
SUBPROCESS_TIMEOUT_S = 900
# What this benchmark reads from `batchgen bench --result-json` (the names of issue 16's fields).
FIELDS = (
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
    "client_limited", "client_warnings", "est_client_ttft_error", "est_client_itl_error",
    "est_client_added_ttft_ms", "client_processes_needed", "median_client_read_delay_ms",
    "p99_client_read_delay_ms", "mean_client_write_delay_ms", "client_read_delay_per_chunk_mean_ms",
    "client_cpu_util_max", "client_processes", "completed", "failed",
)  # fmt: skip


# -- measuring -------------------------------------------------------------------------------------


def num_prompts(concurrency: int) -> int:
    return max(256, 4 * concurrency)


def _run(command: list[str], what: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                          check=False)  # fmt: skip
    # batchgen bench exits 1 when some requests failed: its figures for the others still stand.
    if done.returncode not in (0, 1):
        raise SystemExit(f"{what} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def run_batchgen(server: ExactServer, concurrency: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One `batchgen bench` level against the freshly reset server: FIELDS of its result, and the server's stats."""
    result_path = tmp / f"bench-c{concurrency}.json"
    result_path.unlink(missing_ok=True)
    server.reset()
    started = time.perf_counter()
    _run([sys.executable, "-m", "batchgen", "bench", "--base-url", server.base_url,
          "--concurrency", str(concurrency), "--num-prompts", str(num_prompts(concurrency)),
          "--warmup", str(concurrency), "--input-len", "32", "--output-len", str(args.tokens),
          "--result-json", str(result_path), "--client-processes", args.client_processes],
         f"batchgen bench at concurrency {concurrency}")  # fmt: skip
    wall = time.perf_counter() - started
    stats = server.stats()
    if not result_path.exists():
        raise SystemExit(f"batchgen bench at concurrency {concurrency} wrote no {result_path}")
    result = json.loads(result_path.read_text())  # one level: one JSON object
    missing = [name for name in FIELDS if name not in result]
    if missing:
        raise SystemExit(f"batchgen bench's result JSON lacks {missing}; its keys are:\n{sorted(result)}")
    return {"measured": {name: result[name] for name in FIELDS}, "server": stats, "wall_s": round(wall, 2)}


def run_plain(server: ExactServer, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same level through plain_stream_client.py, against the freshly reset server."""
    server.reset()
    done = _run([sys.executable, str(HERE / "plain_stream_client.py"), "--base-url", server.base_url,
                 "--concurrency", str(concurrency), "--num-prompts", str(num_prompts(concurrency)),
                 "--warmup", str(concurrency), "--tokens", str(args.tokens)],
                f"plain_stream_client.py at concurrency {concurrency}")  # fmt: skip
    stats = server.stats()
    return {"measured": json.loads(done.stdout.strip().splitlines()[-1]), "server": stats}


# -- judging ---------------------------------------------------------------------------------------


def _error(value: float | None, true: float) -> float | None:
    return None if value is None else abs(float(value) / true - 1)


def _worst(measured: dict[str, Any], metric: str, true: float, true_median: float | None = None) -> float:
    """The larger of the mean's and the median's error (both must be there: a level without them is broken)."""
    mean = _error(measured[f"mean_{metric}_ms"], true)
    median = _error(measured[f"median_{metric}_ms"], true if true_median is None else true_median)
    if mean is None or median is None:
        raise SystemExit(f"no {metric.upper()} measured (completed {measured.get('completed')}): {measured}")
    return max(mean, median)


def errors(measured: dict[str, Any], server: dict[str, Any], args: argparse.Namespace) -> dict[str, float | None]:
    """A client's TTFT and ITL errors against the exact server's truth, as fractions."""
    first = server["first_token_lateness_ms"]
    ttft_true = args.ttft_ms + first["mean"]
    return {
        "ttft_true_ms": ttft_true,
        "ttft_error": _worst(measured, "ttft", ttft_true, args.ttft_ms + first["p50"]),
        "itl_error": _worst(measured, "itl", args.itl_ms),
        "p99_ttft_error": _error(measured["p99_ttft_ms"], args.ttft_ms + first["p99"]),
        "p99_itl_error": _error(measured["p99_itl_ms"], args.itl_ms),
    }


def verdict(flagged: bool, ttft_error: float, itl_error: float) -> str:
    wrong = ttft_error > LIMIT or itl_error > LIMIT
    if flagged:
        return "flagged" if wrong else "false flag"
    return "MISSED" if wrong else "ok"


def measure_level(server: ExactServer, run: int, concurrency: int, args: argparse.Namespace,
                  tmp: Path) -> dict[str, Any]:
    """Both clients at one level of one run, judged."""
    batchgen = run_batchgen(server, concurrency, args, tmp)
    batchgen.update(errors(batchgen["measured"], batchgen["server"], args))
    flagged = bool(batchgen["measured"]["client_limited"])
    batchgen["verdict"] = verdict(flagged, batchgen["ttft_error"], batchgen["itl_error"])
    record: dict[str, Any] = {"run": run, "concurrency": concurrency, "batchgen": batchgen, "plain": None}
    if not args.no_plain:
        plain = run_plain(server, concurrency, args)
        plain.update(errors(plain["measured"], plain["server"], args))
        record["plain"] = plain
    return record


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def print_record(record: dict[str, Any], runs: int) -> None:
    b = record["batchgen"]
    m = b["measured"]
    line = (f"run {record['run']}/{runs} c={record['concurrency']:<4} batchgen: TTFT {_ms(m['mean_ttft_ms'])}/"
            f"{_ms(m['median_ttft_ms'])} ms (true {b['ttft_true_ms']:.1f}, err {_pct(b['ttft_error'])}), ITL "
            f"{_ms(m['mean_itl_ms'])}/{_ms(m['median_itl_ms'])} ms (err {_pct(b['itl_error'])}); est. err TTFT "
            f"{_pct(m['est_client_ttft_error'])} ITL {_pct(m['est_client_itl_error'])}; "
            f"{'CLIENT-LIMITED' if m['client_limited'] else 'not flagged'} -> {b['verdict']}")  # fmt: skip
    if record["plain"] is not None:
        p = record["plain"]
        line += (f" | plain: TTFT {_ms(p['measured']['mean_ttft_ms'])} ms (err {_pct(p['ttft_error'])}), "
                 f"ITL err {_pct(p['itl_error'])}")  # fmt: skip
    line += f" | server lateness p99 {b['server']['lateness_ms']['p99']:.2f} ms"
    failed = {name: r["measured"]["failed"] for name, r in (("batchgen", b), ("plain", record["plain"])) if r}
    if any(failed.values()):
        line += f"  (FAILED requests: {failed})"
    print(line, flush=True)


# -- summarising -----------------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _spread(values: Sequence[float | None], fmt: Callable[[float | None], str]) -> str:
    """`median (min–max)`, or just the value when there is one run."""
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return fmt(_median(values))
    return f"{fmt(statistics.median(present))} ({fmt(min(present))}–{fmt(max(present))})"


def summarise_level(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One concurrency's runs, as the table's row shows them (plus the raw lists behind it)."""
    b = [r["batchgen"] for r in records]
    m = [x["measured"] for x in b]
    verdicts = [x["verdict"] for x in b]
    plain = [r["plain"] for r in records if r["plain"] is not None]
    return {
        "concurrency": records[0]["concurrency"],
        "runs": len(records),
        "ttft_mean_ms": [x["mean_ttft_ms"] for x in m],
        "ttft_error": [x["ttft_error"] for x in b],
        "itl_mean_ms": [x["mean_itl_ms"] for x in m],
        "itl_median_ms": [x["median_itl_ms"] for x in m],
        "itl_error": [x["itl_error"] for x in b],
        "flagged": sum(bool(x["client_limited"]) for x in m),
        "missed": verdicts.count("MISSED"),
        "false_flags": verdicts.count("false flag"),
        "est_ttft_error": [x["est_client_ttft_error"] for x in m],
        "est_itl_error": [x["est_client_itl_error"] for x in m],
        "read_delay_p50_ms": [x["median_client_read_delay_ms"] for x in m],
        "read_delay_p99_ms": [x["p99_client_read_delay_ms"] for x in m],
        "write_delay_mean_ms": [x["mean_client_write_delay_ms"] for x in m],
        "processes_needed": [x["client_processes_needed"] for x in m],
        "plain_ttft_mean_ms": [p["measured"]["mean_ttft_ms"] for p in plain],
        "plain_ttft_error": [p["ttft_error"] for p in plain],
        "plain_itl_error": [p["itl_error"] for p in plain],
        "server_lateness_p99_ms": max(x["server"]["lateness_ms"]["p99"] for x in b),
    }


HEADER = ("concurrency", "batchgen TTFT mean, ms (min–max)", "TTFT error (range)", "ITL mean / median, ms",
          "ITL error (range)", "flagged", "missed", "false flags", "est. TTFT / ITL error",
          "canary read delay p50 / p99, ms", "write delay mean, ms", "processes needed",
          "plain aiohttp TTFT mean, ms (range); error TTFT / ITL", "server lateness p99, ms (max)")  # fmt: skip


def _range_only(values: Sequence[float | None], fmt: Callable[[float | None], str]) -> str:
    """`mean of runs (min–max)` for a latency: the figure a reader would quote."""
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    mean = fmt(statistics.fmean(present))
    return mean if len(present) < 2 else f"{mean} ({fmt(min(present))}–{fmt(max(present))})"


def table_row(s: dict[str, Any]) -> list[str]:
    n = s["runs"]
    needed = _median(s["processes_needed"])
    plain = "–"
    if s["plain_ttft_mean_ms"]:
        plain = (f"{_range_only(s['plain_ttft_mean_ms'], _ms)}; {_pct(_median(s['plain_ttft_error']))} / "
                 f"{_pct(_median(s['plain_itl_error']))}")  # fmt: skip
    return [
        str(s["concurrency"]),
        _range_only(s["ttft_mean_ms"], _ms),
        _spread(s["ttft_error"], _pct),
        f"{_ms(_median(s['itl_mean_ms']))} / {_ms(_median(s['itl_median_ms']))}",
        _spread(s["itl_error"], _pct),
        f"{s['flagged']} of {n}",
        f"{s['missed']} of {n}",
        f"{s['false_flags']} of {n}",
        f"{_pct(_median(s['est_ttft_error']))} / {_pct(_median(s['est_itl_error']))}",
        f"{_ms(_median(s['read_delay_p50_ms']))} / {_ms(_median(s['read_delay_p99_ms']))}",
        _ms(_median(s["write_delay_mean_ms"])),
        "n/a" if needed is None else f"{needed:g}",
        plain,
        f"{s['server_lateness_p99_ms']:.2f}",
    ]


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---:" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(table_row(s)) + " |" for s in summaries]
    return "\n".join(lines)


def summary_line(summaries: list[dict[str, Any]]) -> str:
    missed = sum(s["missed"] for s in summaries)
    parts = [f"MISSED: {missed} of {sum(s['runs'] for s in summaries)} runs (must be 0)"]
    for s in summaries:
        if s["concurrency"] in (4, 64):
            parts.append(f"false flags at concurrency {s['concurrency']}: {s['false_flags']} of {s['runs']}")
    return "; ".join(parts)


# -- main ------------------------------------------------------------------------------------------


def _client_processes(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or auto, got {value!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", default="4,64,256,512", help="comma-separated levels (default 4,64,256,512)")
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer (default 64)")
    parser.add_argument("--client-processes", type=_client_processes, default="1", metavar="N|auto",
                        help="passed to batchgen bench (default 1)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain aiohttp reference")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = dt.datetime.now()
    source_at_start = source_hash()
    loadavg_at_start = os.getloadavg()
    records: list[dict[str, Any]] = []
    with ExactServer(ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, tokens=args.tokens) as server, \
            tempfile.TemporaryDirectory(prefix="bench-client-delay-") as tmp:  # fmt: skip
        print(f"batchgen source {source_at_start}; {os.cpu_count()} cores; load {loadavg_at_start[0]:.2f}; "
              f"exact server {server.base_url} (TTFT {args.ttft_ms:g} ms, ITL {args.itl_ms:g} ms, "
              f"{args.tokens} tokens); --client-processes {args.client_processes}", flush=True)  # fmt: skip
        for run in range(1, args.runs + 1):
            for concurrency in args.levels if run % 2 else args.levels[::-1]:
                record = measure_level(server, run, concurrency, args, Path(tmp))
                records.append(record)
                print_record(record, args.runs)
    summaries = [summarise_level([r for r in records if r["concurrency"] == c]) for c in args.levels]
    table, verdict_line = markdown_table(summaries), summary_line(summaries)
    print(f"\n{table}\n\n{verdict_line}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"client-delay-{started_at:%Y-%m-%d-%H%M%S}.json"
    document = {
        "benchmark": "bench_client_delay",
        "command": [sys.executable, *sys.argv],
        "started": started_at.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(python=sys.version.split()[0], loadavg_at_start=loadavg_at_start),
        "batchgen_source_sha256_16": {"start": source_at_start, "end": source_hash()},
        "settings": {"runs": args.runs, "concurrency": args.levels, "ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms,
                     "tokens": args.tokens, "client_processes": args.client_processes, "plain": not args.no_plain,
                     "error_limit": LIMIT, "num_prompts": {c: num_prompts(c) for c in args.levels}},
        "summary": summaries,
        "verdict": verdict_line,
        "table_markdown": table,
        "runs": records,
    }  # fmt: skip
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"\nwrote {path.relative_to(REPO)}")
    return 1 if any(s["missed"] for s in summaries) else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark `batchgen run` against a plain aiohttp loop, both hitting the same nginx stub.

For each input size (default 20k and 1M rows) and each repeat, it runs, as subprocesses, in
alternating order (so slow drift on a shared box hits both tools alike):

    python -m batchgen run --input IN --output OUT --base-url http://127.0.0.1:PORT/v1 --model stub
        --concurrency 64 --no-progress --overwrite --max-tokens 16
    python benchmarks/plain_aiohttp_loop.py --input IN --output OUT --base-url ... --concurrency 64 --max-tokens 16

and measures per run, from the outside:

* wall seconds (process start to exit, so interpreter start-up, imports, the final merge and
  the output write all count) and rows/s = rows / wall;
* CPU seconds = user + sys of that child (`os.wait4` rusage: just that process, its threads
  included), and rows per CPU-second, the figure least disturbed by other load on the box;
* peak RSS = the child's `ru_maxrss`, plus an RSS timeline sampled from /proc (to see growth);
* CPU used meanwhile by nginx, and by everything else on the machine ("bg CPU s": a loud
  neighbour makes that run's wall time unreliable).

Then it checks the output (row count, error rows), prints a per-run table, medians per tool and
size, the batchgen/plain ratios against the targets, and writes everything as JSON to
`benchmarks/results/run-<date>.json`.

Targets (from the issues): batchgen rows/s >= 0.9x the plain loop's; batchgen peak RSS <= 200 MB at
1M rows, final merge included, and <= 1.2x its 20k-row figure (issue 10).

    python benchmarks/bench_run.py --rows 20000 --repeats 3
    python benchmarks/bench_run.py --rows 1000000              # 1 repeat by default at >= 500k rows
    python benchmarks/bench_run.py --rows 20000,1000000 --concurrency 64
    python benchmarks/bench_run.py --rows 20000,1000000 --shape issue   # id, messages, temperature, max_tokens
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from _provenance import machine, source_hash  # benchmarks/, next to this script

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from make_inputs import default_cache_dir, ensure_input  # noqa: E402
from nginx_stub import NginxNotInstalledError, NginxStub  # noqa: E402

TOOLS = ("batchgen", "plain")
TARGET_RATE_RATIO = 0.9
TARGET_RSS_MB_1M = 200.0
TARGET_RSS_GROWTH = 1.2
LARGE_ROWS = 500_000  # at or above this, the default is 1 repeat


@dataclass
class RunResult:
    tool: str
    rows: int
    repeat: int
    exit_code: int
    wall_s: float
    rows_per_s: float
    cpu_user_s: float
    cpu_sys_s: float
    cpu_s: float
    rows_per_cpu_s: float
    peak_rss_mb: float
    nginx_cpu_s: float
    background_cpu_s: float
    output_rows: int | None
    output_error_rows: int | None
    output_mb: float | None
    ok: bool
    problem: str | None
    rss_timeline: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB), downsampled
    stderr_tail: str = ""


# -- measurement helpers ---------------------------------------------------------------------------


def _busy_cpu_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat), for the background-load estimate."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class _Sampler(threading.Thread):
    """Samples the child's RSS every `interval` s; kills the child (our own pid only) after `timeout` s."""

    def __init__(self, pid: int, timeout: float, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.timeout, self.interval = pid, timeout, interval
        self.samples: list[tuple[float, float]] = []
        self.timed_out = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        started = time.perf_counter()
        while not self._stop_event.wait(self.interval):
            elapsed = time.perf_counter() - started
            rss = _rss_mb(self.pid)
            if rss is not None:
                self.samples.append((round(elapsed, 2), round(rss, 1)))
            if elapsed > self.timeout and not self.timed_out:
                self.timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _downsample(samples: list[tuple[float, float]], points: int = 120) -> list[tuple[float, float]]:
    if len(samples) <= points:
        return samples
    step = len(samples) / points
    picked = [samples[int(i * step)] for i in range(points)]
    peak = max(samples, key=lambda s: s[1])
    return sorted({*picked, peak, samples[-1]})


def _check_output(path: Path, rows: int) -> tuple[int | None, int | None, float | None, str | None]:
    import pyarrow.parquet as pq

    if not path.exists():
        return None, None, None, f"no output file {path}"
    try:
        meta = pq.read_metadata(path)
        errors = 0
        with pq.ParquetFile(path) as reader:
            for batch in reader.iter_batches(batch_size=65_536, columns=["error"]):
                errors += len(batch) - batch.column(0).null_count
    except Exception as exc:  # noqa: BLE001 - report, do not crash the benchmark
        return None, None, None, f"unreadable output: {exc}"
    problem = None
    if meta.num_rows != rows:
        problem = f"output has {meta.num_rows} rows, expected {rows}"
    elif errors:
        problem = f"{errors} error rows in the output"
    return meta.num_rows, errors, path.stat().st_size / 1e6, problem


def _command(tool: str, python: str, inp: Path, out: Path, base_url: str, args: argparse.Namespace) -> list[str]:
    if tool == "batchgen":
        return [
            python, "-m", "batchgen", "run",
            "--input", str(inp), "--output", str(out), "--base-url", base_url, "--model", "stub",
            "--concurrency", str(args.concurrency), "--no-progress", "--overwrite",
            "--max-tokens", str(args.max_tokens), *args.batchgen_arg,
        ]  # fmt: skip
    command = [
        python, str(HERE / "plain_aiohttp_loop.py"),
        "--input", str(inp), "--output", str(out), "--base-url", base_url, "--model", "stub",
        "--concurrency", str(args.concurrency), "--max-tokens", str(args.max_tokens),
    ]  # fmt: skip
    if args.plain_passthrough:
        command.append("--passthrough")
    return command + args.plain_arg


def run_one(
    tool: str, rows: int, repeat: int, inp: Path, work: Path, stub: NginxStub, args: argparse.Namespace
) -> RunResult:
    out = work / f"{tool}-{rows}.parquet"
    out.unlink(missing_ok=True)
    shutil.rmtree(str(out) + ".batchgen", ignore_errors=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for name in ("BATCHGEN_API_KEY", "OPENAI_API_KEY", "HTTP_PROXY", "http_proxy"):
        env.pop(name, None)
    log = work / f"{tool}-{rows}-{repeat}.log"
    command = _command(tool, args.python, inp, out, stub.base_url, args)
    nginx_before, busy_before = stub.cpu_seconds(), _busy_cpu_seconds()
    started = time.perf_counter()
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=str(work), env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    sampler = _Sampler(process.pid, args.timeout)
    sampler.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:
        process.kill()  # our own child only
        os.wait4(process.pid, 0)
        raise
    finally:
        sampler.stop()
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    nginx_cpu = stub.cpu_seconds() - nginx_before
    cpu = usage.ru_utime + usage.ru_stime
    background = max(0.0, _busy_cpu_seconds() - busy_before - cpu - nginx_cpu)
    out_rows, out_errors, out_mb, problem = _check_output(out, rows)
    if sampler.timed_out:
        problem = f"killed after the {args.timeout:.0f} s timeout"
    elif process.returncode != 0:
        problem = f"exit code {process.returncode}" + (f"; {problem}" if problem else "")
    tail = log.read_text(errors="replace")[-(600 if problem is None else 3000):]
    if not args.keep_outputs:
        out.unlink(missing_ok=True)
        shutil.rmtree(str(out) + ".batchgen", ignore_errors=True)
    return RunResult(
        tool=tool,
        rows=rows,
        repeat=repeat,
        exit_code=process.returncode,
        wall_s=round(wall, 3),
        rows_per_s=round(rows / wall, 1),
        cpu_user_s=round(usage.ru_utime, 2),
        cpu_sys_s=round(usage.ru_stime, 2),
        cpu_s=round(cpu, 2),
        rows_per_cpu_s=round(rows / cpu, 1) if cpu else 0.0,
        peak_rss_mb=round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        nginx_cpu_s=round(nginx_cpu, 2),
        background_cpu_s=round(background, 2),
        output_rows=out_rows,
        output_error_rows=out_errors,
        output_mb=None if out_mb is None else round(out_mb, 1),
        ok=problem is None,
        problem=problem,
        rss_timeline=_downsample(sampler.samples),
        stderr_tail=tail,
    )


# -- reporting -------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _rss_growth_note(timeline: list[tuple[float, float]]) -> str:
    """RSS at 25/50/75/100% of the run: a steady climb means memory grows with rows done."""
    if len(timeline) < 4:
        return ""
    end = timeline[-1][0]
    marks = []
    for fraction in (0.25, 0.5, 0.75, 1.0):
        sample = min(timeline, key=lambda s: abs(s[0] - fraction * end))
        marks.append(f"{sample[1]:.0f}")
    return "/".join(marks)


def print_runs(results: list[RunResult]) -> None:
    header = (
        f"{'rows':>9} {'tool':<9} {'rep':>3} {'wall s':>8} {'rows/s':>8} {'CPU s':>7} {'rows/CPUs':>9} "
        f"{'peakRSS MB':>10} {'RSS@25/50/75/100%':>19} {'nginx s':>7} {'bg CPU s':>8}  status"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        status = "ok" if r.ok else f"PROBLEM: {r.problem}"
        print(
            f"{r.rows:>9} {r.tool:<9} {r.repeat:>3} {r.wall_s:>8.2f} {r.rows_per_s:>8.0f} {r.cpu_s:>7.2f} "
            f"{r.rows_per_cpu_s:>9.0f} {r.peak_rss_mb:>10.1f} {_rss_growth_note(r.rss_timeline):>19} "
            f"{r.nginx_cpu_s:>7.2f} {r.background_cpu_s:>8.2f}  {status}"
        )


def summarise(results: list[RunResult]) -> dict[str, Any]:
    """Medians per (rows, tool), batchgen/plain ratios and the target checks."""
    summary: dict[str, Any] = {"by_size": {}, "targets": {}}
    sizes = sorted({r.rows for r in results})
    for rows in sizes:
        entry: dict[str, Any] = {}
        for tool in TOOLS:
            runs = [r for r in results if r.rows == rows and r.tool == tool and r.ok]
            if not runs:
                continue
            entry[tool] = {
                "n": len(runs),
                "wall_s": round(_median([r.wall_s for r in runs]), 2),
                "rows_per_s": round(_median([r.rows_per_s for r in runs]), 1),
                "cpu_s": round(_median([r.cpu_s for r in runs]), 2),
                "rows_per_cpu_s": round(_median([r.rows_per_cpu_s for r in runs]), 1),
                "peak_rss_mb": round(_median([r.peak_rss_mb for r in runs]), 1),
                "peak_rss_mb_max": round(max(r.peak_rss_mb for r in runs), 1),
                "rows_per_s_all": [r.rows_per_s for r in runs],
            }
        if "batchgen" in entry and "plain" in entry:
            b, p = entry["batchgen"], entry["plain"]
            entry["ratio_batchgen_over_plain"] = {
                "rows_per_s": round(b["rows_per_s"] / p["rows_per_s"], 3),
                "cpu_s": round(b["cpu_s"] / p["cpu_s"], 3),
                "rows_per_cpu_s": round(b["rows_per_cpu_s"] / p["rows_per_cpu_s"], 3),
                "peak_rss_mb": round(b["peak_rss_mb"] / p["peak_rss_mb"], 3),
            }
        summary["by_size"][str(rows)] = entry
    targets = summary["targets"]
    for rows in sizes:
        ratio = summary["by_size"][str(rows)].get("ratio_batchgen_over_plain")
        if ratio:
            targets[f"rows_per_s_ratio@{rows}"] = {
                "value": ratio["rows_per_s"], "target": f">= {TARGET_RATE_RATIO}", "met": ratio["rows_per_s"] >= TARGET_RATE_RATIO,
            }  # fmt: skip
    big = [rows for rows in sizes if rows >= LARGE_ROWS and "batchgen" in summary["by_size"][str(rows)]]
    small = [rows for rows in sizes if rows < LARGE_ROWS and "batchgen" in summary["by_size"][str(rows)]]
    for rows in big:
        rss = summary["by_size"][str(rows)]["batchgen"]["peak_rss_mb_max"]
        targets[f"batchgen_peak_rss_mb@{rows}"] = {"value": rss, "target": f"<= {TARGET_RSS_MB_1M}", "met": rss <= TARGET_RSS_MB_1M}
        if small:
            base = summary["by_size"][str(small[0])]["batchgen"]["peak_rss_mb"]
            growth = round(rss / base, 3)
            targets[f"batchgen_rss_growth_{small[0]}->{rows}"] = {
                "value": growth, "target": f"<= {TARGET_RSS_GROWTH}", "met": growth <= TARGET_RSS_GROWTH,
            }  # fmt: skip
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print("\nMedians (ok runs only):")
    header = f"{'rows':>9} {'tool':<9} {'n':>2} {'wall s':>8} {'rows/s':>8} {'CPU s':>7} {'rows/CPUs':>9} {'peakRSS MB':>10}"
    print(header)
    print("-" * len(header))
    for rows, entry in summary["by_size"].items():
        for tool in TOOLS:
            m = entry.get(tool)
            if m:
                print(
                    f"{rows:>9} {tool:<9} {m['n']:>2} {m['wall_s']:>8.2f} {m['rows_per_s']:>8.0f} {m['cpu_s']:>7.2f} "
                    f"{m['rows_per_cpu_s']:>9.0f} {m['peak_rss_mb']:>10.1f}"
                )
        ratio = entry.get("ratio_batchgen_over_plain")
        if ratio:
            print(
                f"{rows:>9} {'b/p ratio':<9} {'':>2} {'':>8} {ratio['rows_per_s']:>8.3f} {ratio['cpu_s']:>7.3f} "
                f"{ratio['rows_per_cpu_s']:>9.3f} {ratio['peak_rss_mb']:>10.3f}"
            )
    if summary["targets"]:
        print("\nTargets:")
        for name, t in summary["targets"].items():
            print(f"  {name:<40} {t['value']:>9} (target {t['target']}): {'MET' if t['met'] else 'MISSED'}")


# -- provenance ------------------------------------------------------------------------------------


def _versions(python: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, sys, json;"
        "print(json.dumps({'python': sys.version.split()[0], **{p: m.version(p) for p in "
        "('aiohttp','pyarrow','polars','orjson','yarl','multidict')}}))"
    )
    try:
        versions = json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)
    except (subprocess.CalledProcessError, json.JSONDecodeError, OSError):
        versions = {}
    try:
        nginx = subprocess.run(["/usr/sbin/nginx", "-v"], capture_output=True, text=True).stderr.strip()
        versions["nginx"] = nginx.split("/")[-1]
    except OSError:
        pass
    return versions


# -- main ------------------------------------------------------------------------------------------


def _rows_list(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=_rows_list, default=[20_000, 1_000_000], help="comma-separated input sizes")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help=f"runs per tool and size (default 3, or 1 at >= {LARGE_ROWS} rows)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--shape", choices=("default", "issue"), default="default",
        help="input columns: default (id, messages, temperature, top_p, seed, stop, source) or "
        "issue (id, messages, temperature, max_tokens: issue 10's input)",
    )  # fmt: skip
    parser.add_argument("--tools", default="batchgen,plain", help="comma-separated subset of batchgen,plain")
    parser.add_argument("--nginx-workers", type=int, default=1, help="nginx worker_processes (1 or 2)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for both tools")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"inputs cache (default {default_cache_dir()})")
    parser.add_argument("--work-dir", type=Path, default=None, help="where outputs and logs go (default: a temp dir)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the output Parquet files")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--no-json", action="store_true", help="do not write the results JSON")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is killed")
    parser.add_argument("--plain-passthrough", action="store_true", help="the plain loop also copies the input columns")
    parser.add_argument("--batchgen-arg", action="append", default=[], metavar="ARG", help="extra argument for batchgen run (repeatable)")
    parser.add_argument("--plain-arg", action="append", default=[], metavar="ARG", help="extra argument for the plain loop (repeatable)")
    parser.add_argument("--check", action="store_true", help="exit 2 when a target is missed")
    args = parser.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(args.tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools {sorted(unknown)}; choose from {', '.join(TOOLS)}")
    return args


def _compile_bytecode(python: str) -> None:
    """Compile batchgen's modules once, as `pip install` does: an editable install run with
    PYTHONDONTWRITEBYTECODE=1 (as on the CI machines) would otherwise compile ~50 modules from
    source at every start (0.06 s, 3% of a 20k-row run), which no installed batchgen pays."""
    subprocess.run([python, "-m", "compileall", "-q", str(REPO / "batchgen")], check=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = dt.datetime.now()
    inputs = {rows: ensure_input(rows, args.cache_dir, shape=args.shape) for rows in args.rows}
    for path in inputs.values():  # warm the page cache so the first run does not pay the disk read
        with open(path, "rb") as file:
            while file.read(1 << 24):
                pass
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-run-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    try:
        stub = NginxStub(workers=args.nginx_workers)
    except NginxNotInstalledError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    source_at_start = source_hash()
    _compile_bytecode(args.python)
    print(f"batchgen source {source_at_start}; work dir {work}; {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}")
    with stub:
        print(f"nginx stub at {stub.base_url} (workers={args.nginx_workers})", flush=True)
        for rows in args.rows:
            repeats = args.repeats or (1 if rows >= LARGE_ROWS else 3)
            for repeat in range(repeats):
                order = args.tools if repeat % 2 == 0 else list(reversed(args.tools))
                for tool in order:
                    print(f"  {rows} rows, {tool}, repeat {repeat + 1}/{repeats} ...", end=" ", flush=True)
                    result = run_one(tool, rows, repeat, inputs[rows], work, stub, args)
                    results.append(result)
                    print(
                        f"{result.wall_s:.1f} s, {result.rows_per_s:.0f} rows/s, CPU {result.cpu_s:.1f} s, "
                        f"RSS {result.peak_rss_mb:.0f} MB, bg CPU {result.background_cpu_s:.1f} s"
                        + ("" if result.ok else f"  PROBLEM: {result.problem}"),
                        flush=True,
                    )
                    if not result.ok:
                        print(result.stderr_tail[-1500:], file=sys.stderr)
    print()
    print_runs(results)
    summary = summarise(results)
    print_summary(summary)
    if not args.no_json:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        path = args.results_dir / f"run-{started_at:%Y-%m-%d-%H%M%S}.json"
        document = {
            "benchmark": "bench_run",
            "started": started_at.isoformat(timespec="seconds"),
            "finished": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(),
            "versions": _versions(args.python),
            "batchgen_source_sha256_16": {"start": source_at_start, "end": source_hash()},
            "settings": {
                "rows": args.rows, "shape": args.shape, "concurrency": args.concurrency, "repeats": args.repeats,
                "max_tokens": args.max_tokens, "nginx_workers": args.nginx_workers, "tools": args.tools,
                "plain_passthrough": args.plain_passthrough, "arrow_default_memory_pool": os.environ.get("ARROW_DEFAULT_MEMORY_POOL"),
                "batchgen_args": args.batchgen_arg, "plain_args": args.plain_arg,
            },  # fmt: skip
            "summary": summary,
            "runs": [asdict(r) for r in results],
        }
        path.write_text(json.dumps(document, indent=1) + "\n")
        print(f"\nwrote {path}")
    if not args.work_dir and not args.keep_outputs:
        shutil.rmtree(work, ignore_errors=True)
    failed = any(not r.ok for r in results)
    missed = any(not t["met"] for t in summary["targets"].values())
    return 1 if failed else (2 if args.check and missed else 0)


if __name__ == "__main__":
    raise SystemExit(main())

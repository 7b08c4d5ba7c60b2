"""One run spread over several servers: does it get what the servers can give? (issue 11)

Four mock servers run as their own processes (`python -m batchgen.testing.mock_server`): three
answer after 100 ms, one after 500 ms. `batchgen run` (a subprocess) sends short answers
(`--max-tokens 16`) with `--concurrency 32` per server and `--base-url` once per server:

* A, three servers at 100 ms. The most they can give is 3 x 32 / 0.1 s = 960 rows/s;
  target: >= 0.95 x that.
* B, two at 100 ms and the one at 500 ms (5x slower). Each server alone first (ideally 320, 320
  and 64 rows/s), then the three together; target: together >= 0.9 x the sum of alone. Also each
  server's share of the rows (the output's `endpoint` column) next to its share of that sum.

Rows/s is measured over the steady part of a run. With `--no-progress` batchgen logs
"N/T rows, R rows/s" every 5 s, and N / R is the time since its run began, so the slope between
its first and last log line leaves out interpreter start-up, model discovery, the ramp-up, the
tail and the final merge. Each run's input is sized to last `--seconds` at the ideal rate, so it
logs at least twice. The JSON also holds rows / wall time of the process and batchgen's own
summary rate (run start to the end of the merge). The order of runs is reversed every other repeat
so drift on a shared box hits all alike. Figures are medians over the repeats.

    python benchmarks/bench_endpoints.py                  # 3 repeats of 16 s runs, ~5 min
    python benchmarks/bench_endpoints.py --quick          # 1 repeat of 11 s runs, ~1 min
    python benchmarks/bench_endpoints.py --repeats 5 --seconds 30 --check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from _provenance import machine, source_hash  # benchmarks/, next to this script

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from batchgen.progress import LOG_EVERY_S  # noqa: E402

FAST_MS, SLOW_MS = 100.0, 500.0
MAX_TOKENS = 16  # short answers: the servers' latency, not the bytes, sets the pace
TARGET_A = 0.95  # A: rows/s >= 0.95 x 3 x concurrency / 0.1 s
TARGET_B = 0.90  # B: rows/s together >= 0.9 x the sum of each server alone
_PROGRESS = re.compile(r"^batchgen: (\d+)(?:/\d+)? rows, ([\d.]+) rows/s", re.MULTILINE)
_SUMMARY = re.compile(r"^time: ([\d.]+) s, ([\d.]+) rows/s", re.MULTILINE)


@dataclass(frozen=True)
class Server:
    name: str
    latency_ms: float
    url: str


@dataclass
class Run:
    setting: str  # "A together", "B alone fast1", ...
    repeat: int
    servers: list[str]  # names
    rows: int
    exit_code: int
    wall_s: float
    cpu_s: float  # batchgen's user + sys
    wall_rows_per_s: float
    run_rows_per_s: float | None  # batchgen's summary: run start to the end of the merge
    steady_rows_per_s: float | None  # slope between the first and last progress lines
    progress: list[tuple[float, int]]  # (seconds since the run began, rows done)
    endpoint_rows: dict[str, int]  # server name -> rows it answered
    problem: str | None
    log_tail: str = field(default="", repr=False)


# -- the servers -----------------------------------------------------------------------------------


def _listening_url(log: Path, process: subprocess.Popen[bytes], timeout: float) -> str:
    """The URL the mock prints once it listens (it was asked for port 0: any free port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := re.search(r"listening on (http://\S+)", log.read_text(errors="replace")):
            return match.group(1)
        if process.poll() is not None:
            raise RuntimeError(f"mock server exited with {process.returncode}: {log.read_text(errors='replace')[-500:]}")
        time.sleep(0.05)
    raise RuntimeError(f"mock server did not start within {timeout:.0f} s")


def _wait_ready(url: str, timeout: float) -> None:
    """Until GET /v1/models answers 200 (no proxy: the servers are local)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with opener.open(f"{url}/models", timeout=1.0) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


@contextlib.contextmanager
def mock_servers(latencies: dict[str, float], work: Path) -> Iterator[dict[str, Server]]:
    """Start one mock process per name, on free ports; they are always stopped on the way out."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        servers = {}
        for name, latency_ms in latencies.items():
            log = work / f"mock-{name}.log"
            command = [sys.executable, "-m", "batchgen.testing.mock_server", "--port", "0", "--latency-ms", f"{latency_ms:g}"]
            with open(log, "wb") as log_file:
                processes.append(subprocess.Popen(command, env=_child_env(), stdin=subprocess.DEVNULL,
                                                  stdout=log_file, stderr=subprocess.STDOUT))  # fmt: skip
            servers[name] = Server(name, latency_ms, _listening_url(log, processes[-1], timeout=30.0))
        for server in servers.values():
            _wait_ready(server.url, timeout=30.0)
        yield servers
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# -- one run ---------------------------------------------------------------------------------------


def ideal_rows_per_s(servers: list[Server], concurrency: int) -> float:
    return sum(concurrency / (s.latency_ms / 1000) for s in servers)


def prompts_file(rows: int, work: Path) -> Path:
    """A Parquet input of `rows` prompts (`prompt` column), written once per size."""
    path = work / f"prompts-{rows}.parquet"
    if not path.exists():
        pq.write_table(pa.table({"prompt": [f"question {i}" for i in range(rows)]}), path)
    return path


def parse_log(text: str) -> tuple[list[tuple[float, int]], float | None]:
    """The progress points (seconds since the run began, rows done) and the summary's rows/s."""
    points = [(int(done) / float(rate), int(done)) for done, rate in _PROGRESS.findall(text) if float(rate) > 0]
    summary = _SUMMARY.search(text)
    return points, float(summary.group(2)) if summary else None


def steady_rate(points: list[tuple[float, int]]) -> float | None:
    """Rows/s between the first and the last progress point; None with fewer than two."""
    if len(points) < 2:
        return None
    (t0, n0), (t1, n1) = points[0], points[-1]
    return (n1 - n0) / (t1 - t0)


def check_output(path: Path, rows: int, servers: list[Server]) -> tuple[dict[str, int], str | None]:
    """Rows per server (by the `endpoint` column), and what is wrong with the output, if anything."""
    if not path.exists():
        return {}, f"no output file {path}"
    table = pq.read_table(path, columns=["endpoint", "error"])
    by_url = Counter(table["endpoint"].to_pylist())
    names = {s.url: s.name for s in servers}
    counts = {names.get(url, str(url)): n for url, n in by_url.items()}
    errors = len(table) - table["error"].null_count
    if len(table) != rows:
        return counts, f"output has {len(table)} rows, expected {rows}"
    if errors:
        return counts, f"{errors} error rows in the output"
    return counts, None


def run_batchgen(setting: str, repeat: int, servers: list[Server], work: Path, args: argparse.Namespace) -> Run:
    rows = math.ceil(ideal_rows_per_s(servers, args.concurrency) * args.seconds)
    out, log = work / "out.parquet", work / "run.log"
    command = [sys.executable, "-m", "batchgen", "run", "--input", str(prompts_file(rows, work)), "--output", str(out),
               *(a for s in servers for a in ("--base-url", s.url)), "--concurrency", str(args.concurrency),
               "--model", "mock-model", "--max-tokens", str(MAX_TOKENS), "--no-progress", "--overwrite"]  # fmt: skip
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=work, env=_child_env(), stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        process.wait(timeout=args.seconds * 20 + 60)
    finally:
        if process.poll() is None:  # timed out or Ctrl-C: our own child only
            process.kill()
            process.wait()
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # only this child was reaped meanwhile
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    text = log.read_text(errors="replace")
    points, run_rate = parse_log(text)
    steady = steady_rate(points)
    counts, problem = check_output(out, rows, servers)
    if process.returncode != 0:
        problem = f"exit code {process.returncode}" + (f"; {problem}" if problem else "")
    elif steady is None:
        problem = "fewer than two progress lines: no steady rate (a longer --seconds?)"
    out.unlink(missing_ok=True)
    shutil.rmtree(f"{out}.batchgen", ignore_errors=True)
    return Run(
        setting=setting, repeat=repeat, servers=[s.name for s in servers], rows=rows, exit_code=process.returncode,
        wall_s=round(wall, 3), cpu_s=round(cpu, 2),
        wall_rows_per_s=round(rows / wall, 1), run_rows_per_s=run_rate,
        steady_rows_per_s=None if steady is None else round(steady, 1),
        progress=[(round(t, 3), n) for t, n in points], endpoint_rows=counts, problem=problem,
        log_tail=text[-(3000 if problem else 600):],
    )  # fmt: skip


# -- the plan and the summary ----------------------------------------------------------------------


def plan(servers: dict[str, Server]) -> list[tuple[str, list[Server]]]:
    """The runs of one repeat: A together, then B's servers alone, then B together."""
    a = [servers["fast1"], servers["fast2"], servers["fast3"]]
    b = [servers["fast1"], servers["fast2"], servers["slow"]]
    return [("A together", a), *((f"B alone {s.name}", [s]) for s in b), ("B together", b)]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _steady(runs: list[Run], setting: str) -> float:
    ok = [r.steady_rows_per_s for r in runs if r.setting == setting and r.problem is None and r.steady_rows_per_s is not None]
    return _median(ok)


def summarise(runs: list[Run], servers: dict[str, Server], concurrency: int) -> dict[str, Any]:
    steps = plan(servers)
    a_servers, b_servers = steps[0][1], steps[-1][1]
    a_ideal = ideal_rows_per_s(a_servers, concurrency)
    a_rate = _steady(runs, "A together")
    alone = {s.name: _steady(runs, f"B alone {s.name}") for s in b_servers}
    alone_sum = sum(alone.values())
    b_rate = _steady(runs, "B together")
    b_runs = [r for r in runs if r.setting == "B together" and r.problem is None]
    shares = {
        s.name: {
            "alone_ideal_rows_per_s": ideal_rows_per_s([s], concurrency),
            "alone_rows_per_s": alone[s.name],
            "expected_share": alone[s.name] / alone_sum,
            "share": _median([r.endpoint_rows.get(s.name, 0) / r.rows for r in b_runs]),
        }
        for s in b_servers
    }  # fmt: skip
    a_ratio, b_ratio = a_rate / a_ideal, b_rate / alone_sum
    return {
        "A": {"ideal_rows_per_s": a_ideal, "rows_per_s": a_rate, "ratio_to_ideal": a_ratio,
              "ratio_to_3x_fast_alone": a_rate / (3 * _median([alone["fast1"], alone["fast2"]])),
              "wall_rows_per_s": _median([r.wall_rows_per_s for r in runs if r.setting == "A together"])},
        "B": {"alone_sum_rows_per_s": alone_sum, "rows_per_s": b_rate, "ratio_to_alone_sum": b_ratio,
              "wall_rows_per_s": _median([r.wall_rows_per_s for r in runs if r.setting == "B together"]),
              "servers": shares},
        "targets": {
            "A: rows/s >= 0.95 x ideal (3 x c / 0.1 s)": {"value": round(a_ratio, 3), "target": TARGET_A, "met": a_ratio >= TARGET_A},
            "B: together >= 0.9 x sum of alone": {"value": round(b_ratio, 3), "target": TARGET_B, "met": b_ratio >= TARGET_B},
        },
    }  # fmt: skip


def print_runs(runs: list[Run]) -> None:
    header = f"{'setting':<16} {'rep':>3} {'rows':>6} {'wall s':>7} {'CPU s':>6} {'wall r/s':>8} {'run r/s':>8} {'steady r/s':>10}  rows per server"
    print(header)
    print("-" * len(header))
    for r in runs:
        per_server = " ".join(f"{name}:{n}" for name, n in sorted(r.endpoint_rows.items()))
        print(f"{r.setting:<16} {r.repeat + 1:>3} {r.rows:>6} {r.wall_s:>7.2f} {r.cpu_s:>6.2f} {r.wall_rows_per_s:>8.0f} "
              f"{r.run_rows_per_s or float('nan'):>8.0f} {r.steady_rows_per_s or float('nan'):>10.0f}  {per_server}"
              + (f"  PROBLEM: {r.problem}" if r.problem else ""))  # fmt: skip


def print_summary(summary: dict[str, Any], repeats: int) -> None:
    a, b = summary["A"], summary["B"]
    print(f"\nMedians over {repeats} repeat(s), steady rows/s:")
    print(f"  A, 3 x {FAST_MS:g} ms: {a['rows_per_s']:.0f} rows/s of an ideal {a['ideal_rows_per_s']:.0f} "
          f"({a['ratio_to_ideal']:.3f}x; {a['ratio_to_3x_fast_alone']:.3f}x of 3 x a fast server alone in B)")  # fmt: skip
    print(f"  B, 2 x {FAST_MS:g} ms + 1 x {SLOW_MS:g} ms: {b['rows_per_s']:.0f} rows/s together, "
          f"{b['alone_sum_rows_per_s']:.0f} the sum of alone ({b['ratio_to_alone_sum']:.3f}x)")
    print(f"\n  {'server':<7} {'ideal alone':>11} {'alone':>7} {'expected share':>14} {'share in B':>10}")
    for name, s in b["servers"].items():
        print(f"  {name:<7} {s['alone_ideal_rows_per_s']:>11.0f} {s['alone_rows_per_s']:>7.0f} "
              f"{s['expected_share']:>14.3f} {s['share']:>10.3f}")  # fmt: skip
    print("\nTargets:")
    for name, t in summary["targets"].items():
        print(f"  {name:<44} {t['value']:>6.3f} (target {t['target']}): {'PASS' if t['met'] else 'FAIL'}")


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=16.0, help="each run's length at the ideal rate (default 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="per server")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat of 11 s runs")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--no-json", action="store_true", help="do not write the results JSON")
    parser.add_argument("--check", action="store_true", help="exit 2 when a target is missed")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats = 2 * LOG_EVERY_S + 1, 1
    if args.seconds <= 2 * LOG_EVERY_S:
        parser.error(f"--seconds must be > {2 * LOG_EVERY_S:g}: a run must log progress twice")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill stops the mock servers too, as Ctrl-C does
    started_at = dt.datetime.now()
    source_at_start = source_hash()
    work = Path(tempfile.mkdtemp(prefix="bench-endpoints-"))
    runs: list[Run] = []
    latencies = {"fast1": FAST_MS, "fast2": FAST_MS, "fast3": FAST_MS, "slow": SLOW_MS}
    try:
        with mock_servers(latencies, work) as servers:
            print(f"batchgen source {source_at_start}; {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}; "
                  f"concurrency {args.concurrency} per server; runs of ~{args.seconds:g} s")  # fmt: skip
            print("  " + ", ".join(f"{s.name} {s.latency_ms:g} ms at {s.url}" for s in servers.values()), flush=True)
            for repeat in range(args.repeats):
                steps = plan(servers) if repeat % 2 == 0 else plan(servers)[::-1]
                for setting, chosen in steps:
                    print(f"  {setting}, repeat {repeat + 1}/{args.repeats} ...", end=" ", flush=True)
                    run = run_batchgen(setting, repeat, chosen, work, args)
                    runs.append(run)
                    print(f"{run.steady_rows_per_s or float('nan'):.0f} rows/s steady, {run.wall_s:.1f} s wall"
                          + (f"  PROBLEM: {run.problem}" if run.problem else ""), flush=True)  # fmt: skip
                    if run.problem:
                        print(run.log_tail[-1500:], file=sys.stderr)
            summary = summarise(runs, servers, args.concurrency)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print_runs(runs)
    print_summary(summary, args.repeats)
    if not args.no_json:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        path = args.results_dir / f"endpoints-{started_at:%Y-%m-%d-%H%M%S}.json"
        document = {
            "benchmark": "bench_endpoints",
            "started": started_at.isoformat(timespec="seconds"),
            "finished": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(),
            "batchgen_source_sha256_16": {"start": source_at_start, "end": source_hash()},
            "settings": {"seconds": args.seconds, "repeats": args.repeats, "concurrency": args.concurrency,
                         "latency_ms": latencies, "max_tokens": MAX_TOKENS},  # fmt: skip
            "summary": summary,
            "runs": [asdict(r) for r in runs],
        }
        path.write_text(json.dumps(document, indent=1) + "\n")
        print(f"\nwrote {path}")
    if any(r.problem for r in runs):
        return 1
    return 2 if args.check and not all(t["met"] for t in summary["targets"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`--concurrency auto` against a server with a known knee, and after its capacity halves (issue 12).

The project's mock server runs as its own process with its capacity model on
(`python -m batchgen.testing.mock_server --batch-slots 64 --kv-tokens K --step-ms 10
--step-ms-per-request 0.1`): at most 64 requests run at once (more wait, FIFO), every engine step
gives each running request one token and lasts 10 ms + 0.1 ms x running, and past the KV budget
(each running request holds its prompt and the tokens generated so far) the newest requests are
preempted and restart. The input's prompts have 40-120 words (seeded); the mock echoes them, so
answers are 41-121 tokens (`--max-tokens 128` never cuts). The KV budget K defaults to 64 x (mean
prompt + mean answer) = 10,304 tokens: 64 running requests use ~75-85% of it. So throughput grows
with the concurrency up to 64 and is flat beyond (more only queue): ~3,900 tokens/s, ~47 rows/s,
well below what the client can take (it uses ~10% of a core here). Halving the KV budget makes
~40 requests fit; more preempt each other.

`batchgen run --stream --keep-raw` (a subprocess) sends the rows; TTFT is the output's `ttft_s`
(from the request's send: rows waiting inside batchgen for a slot are not in it, for fixed and auto
alike). The steady figures are over the requests the server received in the steady window, known to
the second from each answer's `created` (in `raw`): with `--concurrency auto` batchgen does not send
rows in input order (a row sent during the ramp-up may have any index), so a window of row indexes
would mix the ramp-up in.

1. **Sweep**: `--concurrency C` for C in 16, 32, 48, 64, 96, 128, 192, 256; each input is sized to
   last ~`--seconds` at C's expected rate. Per run: rows/s in the steady part (the slope between
   the first progress line and the last one logged while batchgen still had rows to send; with
   `--no-progress` it logs every 5 s), output tokens/s (that x the mean `completion_tokens` of the
   window's requests), the server's generated tokens/s over the same window (`/metrics`, scraped
   every 0.5 s; it counts recomputed tokens too), TTFT p50/p99 over the window's requests (and p99
   over every row, ramp-up included), and preemptions (in the run and in the window). The best
   fixed concurrency is the one with the highest rows/s.
2. **Auto vs the best fixed**: `--concurrency auto` and the best C, `--repeats` times each,
   alternating which goes first, on the same input (the first N rows of one file: the same rows).
   The best C's sweep run is its first repeat. Figures are medians over the repeats of each run's
   steady figures. Targets: auto's rows/s >= 0.95 x the best fixed's; auto's TTFT p99 <= the best
   fixed's. Also shown: the limit auto settled on (the median of its decisions in the steady
   window), and the knee (the lowest fixed C within 2% of the best rows/s), not a target: past 64
   the fixed settings differ in rows/s by noise but in TTFT by seconds.
3. **Capacity halves mid-run**: one auto run over more rows than it can finish; at `--change-at`
   seconds after its start the script POSTs `/mock/capacity` with half the KV budget (`--halve`:
   kv, slots or both), and stops batchgen with SIGTERM at `--halving-seconds` (so there is no
   tail; batchgen still prints its summary and its decision table). `/metrics` every 0.5 s gives the
   timeline of generated tokens/s, preemptions, running and waiting; the decision table (all of it:
   the script raises the summary's row cap, see `--no-full-timeline`) and the progress lines give the
   limit. Targets: the last preemption comes at most 10 s after the change (t_stop), and throughput
   recovers within 10 s (t_recover: the first time after the change from which every 2-s mean of
   generated tokens/s is >= 0.9 x the median of the run's last 10 s). For reference, a small fixed
   sweep at the halved capacity (C in 24..64; 32, 40, 48 with `--quick`) says what the halved
   server can give, in delivered rows/s (auto's: between its progress lines).
4. An ASCII chart of limit, running and waiting, and of tokens/s and preemptions, over the halving
   run (paste it into the README); a PNG next to the JSON if matplotlib is importable.

A JSON result goes to `benchmarks/results/autoscale-<date>-<time>.json`. A missed target prints
FAIL and the figures; `--check` makes it exit 2; a failed run (exit code, row count, error rows)
exits 1.

    python benchmarks/bench_autoscale.py                  # ~10 min: sweep of 8, 3 repeats, 45 s halving run
    python benchmarks/bench_autoscale.py --quick          # ~2.5 min: sweep of 3, 1 repeat, 30 s halving run
    python benchmarks/bench_autoscale.py --sweep 32,64,96 --repeats 5 --check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from _provenance import machine, source_hash  # benchmarks/, next to this script

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# -- the server and the workload -------------------------------------------------------------------

SLOTS = 64
STEP_MS = 10.0
STEP_MS_PER_REQUEST = 0.1
WORDS = (40, 120)  # prompt length in words, uniform; the answer is "echo:" + the words
MEAN_PROMPT = (WORDS[0] + WORDS[1]) / 2  # tokens (the mock counts words)
MEAN_ANSWER = MEAN_PROMPT + 1
KV_TOKENS = 16 * round(SLOTS * (MEAN_PROMPT + MEAN_ANSWER) / 16)  # KV for 64 requests at their longest: 10,304
MAX_TOKENS = 128  # above the longest answer (121): never cuts
SWEEP = (16, 32, 48, 64, 96, 128, 192, 256)
QUICK_SWEEP = (32, 64, 128)
HALF_SWEEP = (24, 32, 40, 48, 64)
QUICK_HALF_SWEEP = (32, 40, 48)
VOCABULARY = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
              "under pale moonlight near old stone bridges and silver rivers").split()  # fmt: skip

# -- the targets ------------------------------------------------------------------------------------

TARGET_THROUGHPUT = 0.95  # auto rows/s >= 0.95 x the best fixed
RECOVER_WITHIN_S = 10.0  # preemptions stop and throughput recovers within 10 s of the change
RECOVER_FRACTION = 0.9  # ... to >= 0.9 x the median of the run's last 10 s
REFERENCE_S = 10.0  # the last 10 s of the halving run: the new capacity's steady rate
ROLLING_S = 2.0  # the mean over which recovery is judged
SCRAPE_S = 0.5
# Rows batchgen's pool can hold besides those done: --concurrency-max (512) workers + an inbox of twice
# that. The halving run is stopped with SIGTERM while its feeder still has rows, so its input holds
# at least this many rows more (an abort after the feeder fed every row used to hang; fixed since).
POOL_ROWS = 3 * 512
TERM_GRACE_S = 15.0  # after SIGTERM, batchgen must exit within this (else SIGKILL and a problem)

_PROGRESS = re.compile(r"^batchgen: (\d+)(?:/(\d+))? rows, ([\d.]+) rows/s, in-flight=(\d+)(.*)$")
_AUTO = re.compile(r"\| auto: limit (\d+), (\d+) in flight")
_TABLE_HEAD = re.compile(r"^concurrency auto at \S+ \((\d+) decisions\):")
_CREATED = re.compile(r'"created":\s*(\d+)')
_TICK = re.compile(r"^\s+(-?[\d.]+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(.+?)\s*$")

# `python -c` wrapper around batchgen's CLI: the summary's decision table shows every decision
# instead of ~12 (a display cap); nothing else changes. If the code moved, the run is plain.
_FULL_TIMELINE = """\
import sys
try:
    from batchgen.endpoints import EndpointFigures
    if len(EndpointFigures.timeline_lines.__defaults__ or ()) == 1:
        EndpointFigures.timeline_lines.__defaults__ = (1000000,)
except Exception:
    pass
from batchgen.cli import main
sys.exit(main())
"""


def expected_rows_per_s(concurrency: float, kv_tokens: int = KV_TOKENS, slots: int = SLOTS) -> float:
    """The mock's steady rows/s at a fixed concurrency (the capacity model's arithmetic; for sizing inputs)."""
    fit = kv_tokens / (MEAN_PROMPT + MEAN_ANSWER / 2)  # requests whose average KV fits
    running = min(concurrency, slots, fit)
    step_s = (STEP_MS + STEP_MS_PER_REQUEST * running) / 1000
    return running / ((MEAN_ANSWER + 2) * step_s)  # + the EOS step and the wait for admission


def expected_tokens_per_s(concurrency: float, kv_tokens: int = KV_TOKENS, slots: int = SLOTS) -> float:
    fit = kv_tokens / (MEAN_PROMPT + MEAN_ANSWER / 2)
    running = min(concurrency, slots, fit)
    return running / ((STEP_MS + STEP_MS_PER_REQUEST * running) / 1000)


# -- small helpers ----------------------------------------------------------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local servers: no proxy


def _http(url: str, body: dict[str, Any] | None = None, timeout: float = 2.0) -> str:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with _OPENER.open(request, timeout=timeout) as response:
        text: str = response.read().decode()
        return text


_METRIC = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE)
_NAMES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:generation_tokens_total": "tokens",
}


@dataclass(frozen=True)
class Sample:
    """One scrape of the mock's /metrics (summed over engines), at t seconds on the run's clock."""

    t: float
    running: float
    waiting: float
    kv: float
    preemptions: float
    tokens: float

    def row(self) -> list[float]:
        return [round(self.t, 3), self.running, self.waiting, round(self.kv, 3), self.preemptions, self.tokens]


def scrape(root: str, t: float = 0.0) -> Sample:
    sums = dict.fromkeys(_NAMES.values(), 0.0)
    for name, value in _METRIC.findall(_http(f"{root}/metrics")):
        if name in _NAMES:
            sums[_NAMES[name]] += float(value)
    return Sample(t=t, **sums)


class Scraper:
    """Scrapes /metrics every `SCRAPE_S` seconds in a thread, on the clock `time.monotonic() - t0`."""

    def __init__(self, root: str, t0: float) -> None:
        self.root, self.t0 = root, t0
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def _take(self) -> None:
        with contextlib.suppress(OSError):
            sample = scrape(self.root)
            self.samples.append(replace(sample, t=time.monotonic() - self.t0))

    def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += SCRAPE_S
            if self._stop.wait(max(0.0, next_at - time.monotonic())):
                return
            self._take()


def interpolate(samples: Sequence[Sample], t: float, attr: str) -> float:
    """A counter's value at t, linear between the scrapes around it (clamped at the ends)."""
    if not samples:
        return math.nan
    if t <= samples[0].t:
        return float(getattr(samples[0], attr))
    for a, b in zip(samples, samples[1:]):
        if a.t <= t <= b.t:
            va, vb = float(getattr(a, attr)), float(getattr(b, attr))
            return va if b.t == a.t else va + (vb - va) * (t - a.t) / (b.t - a.t)
    return float(getattr(samples[-1], attr))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float | None]) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# -- the mock server --------------------------------------------------------------------------------


@dataclass
class Mock:
    url: str  # .../v1
    root: str  # without /v1
    pid: int
    kv_tokens: int
    slots: int

    def set_capacity(self, batch_slots: int, kv_tokens: int) -> dict[str, Any]:
        settings: dict[str, Any] = json.loads(_http(f"{self.root}/mock/capacity", {"batch_slots": batch_slots, "kv_tokens": kv_tokens}))
        return settings

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until nothing runs or waits (an interrupted run's requests are aborted by the mock)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sample = scrape(self.root)
            if sample.running == 0 and sample.waiting == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the mock still has work after {timeout:.0f} s")


@contextlib.contextmanager
def mock_server(work: Path, kv_tokens: int) -> Iterator[Mock]:
    """The mock on a free port, as its own process; always stopped on the way out."""
    log = work / "mock.log"
    command = [sys.executable, "-m", "batchgen.testing.mock_server", "--port", "0", "--batch-slots", str(SLOTS),
               "--kv-tokens", str(kv_tokens), "--step-ms", f"{STEP_MS:g}",
               "--step-ms-per-request", f"{STEP_MS_PER_REQUEST:g}"]  # fmt: skip
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, env=_child_env(), stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 30.0
        while not (match := re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))):
            if process.poll() is not None:
                raise RuntimeError(f"mock server exited with {process.returncode}: {log.read_text(errors='replace')[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("mock server did not start within 30 s")
            time.sleep(0.05)
        url = match.group(1).rstrip("/")
        root = url.removesuffix("/v1")
        while True:
            try:
                scrape(root)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield Mock(url, root, process.pid, kv_tokens, SLOTS)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def prompts_file(rows: int, work: Path, seed: int) -> Path:
    """`rows` prompts of 40-120 words (seeded); every run reads a prefix of it (`--limit`)."""
    rng = random.Random(seed)
    prompts = [" ".join(rng.choices(VOCABULARY, k=rng.randint(*WORDS))) for _ in range(rows)]
    path = work / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": prompts}), path)
    return path


# -- one run ----------------------------------------------------------------------------------------


@dataclass
class Point:
    """A progress line: when it arrived (run clock), rows done, the run's own rate, in flight, auto's limit."""

    t: float
    done: int
    total: int | None
    rate: float
    in_flight: int
    limit: int | None

    @property
    def run_t(self) -> float:  # seconds since batchgen's run began, by its own clock
        return self.done / self.rate if self.rate > 0 else math.nan


@dataclass
class Run:
    label: str  # "sweep", "h2h", "halving", "half-sweep"
    concurrency: str  # "64" or "auto"
    repeat: int
    rows: int
    exit_code: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0  # batchgen's user + sys
    mock_cpu_s: float = 0.0
    steady: tuple[float, float] | None = None  # window on the run clock
    steady_done: tuple[int, int] | None = None  # rows done at its ends
    rows_per_s: float | None = None
    output_tokens_per_s: float | None = None
    server_tokens_per_s: float | None = None
    ttft_p50_ms: float | None = None  # over the requests the server received in the steady window
    ttft_p99_ms: float | None = None
    ttft_p99_all_ms: float | None = None  # over every row of the run (the ramp included)
    steady_requests: int | None = None  # the rows the TTFT figures above are over
    preemptions: float | None = None  # in the whole run
    preemptions_steady: float | None = None
    settled_limit: float | None = None  # auto: median limit of the decisions in the steady window
    clock_offset: float | None = None  # run clock - batchgen's run clock (for the decision table's t)
    progress: list[Point] = field(default_factory=list)
    ticks: list[dict[str, Any]] = field(default_factory=list)
    decisions: int | None = None  # as the summary says (ticks may be fewer without the full table)
    samples: list[Sample] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (run clock, what the script did)
    problem: str | None = None
    log_tail: str = ""
    ttfts: list[float] = field(default_factory=list, repr=False)  # per row, input order (not in the JSON)
    completion: list[int] = field(default_factory=list, repr=False)
    created: list[int | None] = field(default_factory=list, repr=False)  # the answer's `created`: arrival second
    wall0: float = field(default=0.0, repr=False)  # time.time() at the run clock's 0

    def to_json(self, with_samples: bool) -> dict[str, Any]:
        document = asdict(self)
        for key in ("ttfts", "completion", "created", "wall0", "samples"):
            document.pop(key)
        document["progress"] = [[round(p.t, 3), p.done, p.rate, p.in_flight, p.limit] for p in self.progress]
        if with_samples:
            document["samples"] = {"columns": ["t", "running", "waiting", "kv", "preemptions", "tokens"],
                                   "rows": [s.row() for s in self.samples]}  # fmt: skip
        return document


def parse_output(text: str) -> tuple[list[Point], list[dict[str, Any]], int | None]:
    """Progress points (without their arrival time), the decision table's rows and its decision count."""
    points: list[Point] = []
    ticks: list[dict[str, Any]] = []
    decisions = None
    in_table = False
    for line in text.splitlines():
        if match := _TABLE_HEAD.match(line):
            in_table, decisions = True, int(match.group(1))
            continue
        if in_table:
            if line.strip().startswith("t s"):
                continue
            if match := _TICK.match(line):
                t, limit, in_flight, running, waiting, kv, preempted, decision = match.groups()

                def number(text: str) -> float | None:
                    return None if text == "-" else float(text.rstrip("%"))

                ticks.append({"t": float(t), "limit": int(limit), "in_flight": int(in_flight), "running": number(running),
                              "waiting": number(waiting), "kv": number(kv), "preempted": number(preempted),
                              "decision": decision})  # fmt: skip
                continue
            in_table = False
    return points, ticks, decisions


def parse_progress(line: str, arrived: float) -> Point | None:
    match = _PROGRESS.match(line)
    if match is None:
        return None
    done, total, rate, in_flight, rest = match.groups()
    auto = _AUTO.search(rest)
    return Point(arrived, int(done), int(total) if total else None, float(rate), int(in_flight),
                 int(auto.group(1)) if auto else None)  # fmt: skip


def run_batchgen(
    label: str, concurrency: str, repeat: int, rows: int, inp: Path, mock: Mock, work: Path, args: argparse.Namespace,
    *, stop_at: float | None = None, actions: Sequence[tuple[float, str, Callable[[], object]]] = (),
) -> Run:  # fmt: skip
    """One `batchgen run --stream` over the first `rows` rows; `actions` run at their time (run clock)."""
    run = Run(label, concurrency, repeat, rows)
    out, log = work / "out.parquet", work / "run.log"
    head = [sys.executable, "-c", _FULL_TIMELINE] if args.full_timeline else [sys.executable, "-m", "batchgen"]
    command = [*head, "run", "--input", str(inp), "--output", str(out), "--limit", str(rows), "--base-url", mock.url,
               "--model", "mock-model", "--concurrency", concurrency, "--stream", "--max-tokens", str(MAX_TOKENS),
               "--no-progress", "--overwrite", "--keep-raw"]  # fmt: skip
    mock.wait_idle()
    lines: list[tuple[float, str]] = []
    pending = sorted(actions, key=lambda a: a[0])
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    mock_cpu_before = _proc_cpu(mock.pid)
    t0, run.wall0 = time.monotonic(), time.time()
    with Scraper(mock.root, t0) as scraper, open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=work, env=_child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append((time.monotonic() - t0, line.rstrip("\n")))
                log_file.write(line)

        reader = threading.Thread(target=read, name="reader", daemon=True)
        reader.start()
        limit_s = (stop_at or 0) + args.seconds * 20 + 120
        stopped: float | None = None
        try:
            while process.poll() is None:
                now = time.monotonic() - t0
                while pending and pending[0][0] <= now:
                    at, what, action = pending.pop(0)
                    try:
                        action()
                        run.events.append((round(time.monotonic() - t0, 3), what))
                    except OSError as error:
                        run.events.append((round(time.monotonic() - t0, 3), f"{what} FAILED: {error}"))
                if stop_at is not None and now >= stop_at and stopped is None:
                    process.send_signal(signal.SIGTERM)  # batchgen saves its rows and prints its summary
                    run.events.append((round(now, 3), "SIGTERM"))
                    stopped = now
                if stopped is not None and now > stopped + TERM_GRACE_S:
                    process.kill()
                    run.events.append((round(now, 3), f"SIGKILL: no exit within {TERM_GRACE_S:g} s of SIGTERM"))
                    break
                if now > limit_s:
                    raise TimeoutError(f"batchgen still running after {limit_s:.0f} s")
                time.sleep(0.02)
        finally:
            if process.poll() is None:  # timed out or Ctrl-C: our own child only
                process.kill()
                process.wait()
            reader.join(timeout=10)
        run.wall_s = round(time.monotonic() - t0, 3)
    run.samples = scraper.samples
    run.exit_code = process.returncode
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run.cpu_s = round(cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime, 2)
    run.mock_cpu_s = round(_proc_cpu(mock.pid) - mock_cpu_before, 2)
    text = "\n".join(line for _, line in lines)
    run.progress = [p for t, line in lines if (p := parse_progress(line, t)) is not None]
    _, run.ticks, run.decisions = parse_output(text)
    expected_exit = 130 if stop_at is not None else 0
    problems = []
    if any(what.startswith("SIGKILL") for _, what in run.events):
        problems.append(f"batchgen did not exit within {TERM_GRACE_S:g} s of SIGTERM (killed; no summary table)")
    elif run.exit_code != expected_exit:
        problems.append(f"exit code {run.exit_code} (expected {expected_exit})")
    if stop_at is None:
        problems.extend(read_output(run, out))
    analyse(run)
    if run.steady is None and run.label != "halving":  # the halving run's is only before the change: optional
        problems.append("fewer than two progress lines while rows were left to send: no steady window (longer --seconds?)")
    run.problem = "; ".join(problems) or None
    run.log_tail = text[-(4000 if run.problem else 1500):]
    out.unlink(missing_ok=True)
    shutil.rmtree(f"{out}.batchgen", ignore_errors=True)
    return run


def read_output(run: Run, out: Path) -> list[str]:
    if not out.exists():
        return [f"no output file {out}"]
    table = pq.read_table(out, columns=["ttft_s", "usage", "error", "raw"])
    problems = []
    if len(table) != run.rows:
        problems.append(f"output has {len(table)} rows, expected {run.rows}")
    if errors := len(table) - table["error"].null_count:
        problems.append(f"{errors} error rows in the output")
    run.ttfts = [math.nan if v is None else v for v in table["ttft_s"].to_pylist()]
    run.completion = [v or 0 for v in pc.struct_field(table["usage"], "completion_tokens").to_pylist()]
    run.created = [int(m.group(1)) if raw and (m := _CREATED.search(raw)) else None for raw in table["raw"].to_pylist()]
    return problems


def analyse(run: Run) -> None:
    """The steady window and the figures over it."""
    samples = run.samples
    if len(samples) >= 2:
        run.preemptions = samples[-1].preemptions - samples[0].preemptions
    offsets = [p.t - p.run_t for p in run.progress if p.rate > 0]
    run.clock_offset = round(median(offsets), 3) if offsets else None
    steady = [p for p in run.progress if p.rate > 0 and (p.total is None or p.done + p.in_flight < p.total)]
    if run.label == "halving":
        steady = [p for p in steady if p.t < (run.events[0][0] if run.events else math.inf)]  # before the change
    if len(steady) < 2:
        return
    first, last = steady[0], steady[-1]
    run.steady = (round(first.t, 3), round(last.t, 3))
    run.steady_done = (first.done, last.done)
    run.rows_per_s = round((last.done - first.done) / (last.run_t - first.run_t), 2)
    tokens = interpolate(samples, last.t, "tokens") - interpolate(samples, first.t, "tokens")
    run.server_tokens_per_s = round(tokens / (last.t - first.t), 1)
    run.preemptions_steady = interpolate(samples, last.t, "preemptions") - interpolate(samples, first.t, "preemptions")
    if run.ttfts:
        rows = steady_rows(run, first.t, last.t)
        run.steady_requests = len(rows)
        window = [run.completion[i] for i in rows]
        run.output_tokens_per_s = round(run.rows_per_s * statistics.fmean(window), 1) if window else None
        ttfts = [run.ttfts[i] for i in rows if not math.isnan(run.ttfts[i])]
        run.ttft_p50_ms = round(percentile(ttfts, 0.5) * 1000, 1)
        run.ttft_p99_ms = round(percentile(ttfts, 0.99) * 1000, 1)
        run.ttft_p99_all_ms = round(percentile([v for v in run.ttfts if not math.isnan(v)], 0.99) * 1000, 1)
    if run.concurrency == "auto":
        limits = [tick["limit"] for tick in run.ticks if first.t <= tick["t"] + (run.clock_offset or 0) <= last.t]
        limits += [p.limit for p in steady if p.limit is not None]
        run.settled_limit = median(limits) if limits else None


def steady_rows(run: Run, start: float, end: float) -> list[int]:
    """The rows whose request reached the server in [start, end] (run clock): by the answer's `created`,
    a whole second, so only seconds wholly inside the window count. Not by row index: with
    `--concurrency auto` batchgen does not send rows in input order (a row sent in the ramp-up may
    have any index)."""
    low, high = run.wall0 + start, run.wall0 + end
    return [i for i, second in enumerate(run.created) if second is not None and low <= second and second + 1 <= high]


# -- the halving run's timeline ---------------------------------------------------------------------


def timeline(run: Run, change_at: float) -> dict[str, Any]:
    """Per scrape interval: tokens/s, preemptions, running, waiting; the limit; t_stop and t_recover."""
    samples = run.samples
    stop_t = next((t for t, what in run.events if what == "SIGTERM"), samples[-1].t if samples else 0.0)
    points: list[dict[str, Any]] = []
    for a, b in zip(samples, samples[1:]):
        if b.t > stop_t + 1e-6 or b.t <= a.t:
            continue
        points.append({"t": round(b.t, 3), "tokens_per_s": (b.tokens - a.tokens) / (b.t - a.t),
                       "preempted": b.preemptions - a.preemptions, "running": b.running, "waiting": b.waiting, "kv": b.kv})  # fmt: skip
    limits = limit_series(run)
    for point in points:
        point["limit"] = step_value(limits, point["t"])
    change = next((t for t, what in run.events if what.startswith("capacity")), change_at)
    end = points[-1]["t"] if points else stop_t
    before = [p["tokens_per_s"] for p in points if change - REFERENCE_S <= p["t"] <= change and p["t"] >= 5.0]
    reference = [p["tokens_per_s"] for p in points if p["t"] >= end - REFERENCE_S and p["t"] > change]
    ref = median(reference)
    after = [p for p in points if p["t"] > change]
    preempting = [p["t"] for p in after if p["preempted"] > 0]
    t_stop = round(preempting[-1] - change, 2) if preempting else 0.0
    rolling = []
    for point in after:
        window = [p["tokens_per_s"] for p in after if point["t"] - ROLLING_S < p["t"] <= point["t"]]
        rolling.append((point["t"], statistics.fmean(window)))
    t_recover = None
    for i, (t, _) in enumerate(rolling):
        if t - change < ROLLING_S:
            continue  # the first window must lie after the change
        if all(value >= RECOVER_FRACTION * ref for _, value in rolling[i:]):
            t_recover = round(t - change, 2)
            break
    lowest = min(rolling[int(ROLLING_S / SCRAPE_S):], key=lambda r: r[1], default=(math.nan, math.nan))
    # Rows/s (what was delivered, recomputed tokens not counted) between batchgen's progress lines.
    progress = [p for p in run.progress if p.rate > 0]
    rates = [{"from": round(a.t, 2), "to": round(b.t, 2), "rows_per_s": round((b.done - a.done) / (b.run_t - a.run_t), 2),
              "limit": b.limit} for a, b in zip(progress, progress[1:]) if b.run_t > a.run_t]  # fmt: skip
    rows_last = None
    if progress and progress[-1].t - change > REFERENCE_S:
        last = progress[-1]
        first = next(p for p in progress if p.t >= last.t - REFERENCE_S - 1.0)
        if last.run_t > first.run_t and first.t > change:
            rows_last = round((last.done - first.done) / (last.run_t - first.run_t), 2)
    return {
        "change_t": round(change, 3), "end_t": round(end, 3),
        "tokens_per_s_before": round(median(before), 1),
        "tokens_per_s_reference": round(ref, 1),
        "tokens_per_s_lowest_2s_after": round(lowest[1], 1), "lowest_at_s_after_change": round(lowest[0] - change, 2),
        "preemptions_after_change": sum(p["preempted"] for p in after),
        "preemptions_before_change": sum(p["preempted"] for p in points if p["t"] <= change),
        "t_stop_s": t_stop, "t_recover_s": t_recover,
        "limit_before": step_value(limits, change), "limit_at_end": step_value(limits, end),
        "limit_min_after": min((p["limit"] for p in after if p["limit"] is not None), default=None),
        "rows_per_s_last": rows_last, "progress_rates": rates,
        "points": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in p.items()} for p in points],
    }  # fmt: skip


def limit_series(run: Run) -> list[tuple[float, int]]:
    """(run clock, limit) from the decision table and the progress lines, in time order."""
    offset = run.clock_offset or 0.0
    series = [(tick["t"] + offset, tick["limit"]) for tick in run.ticks]
    series += [(p.t, p.limit) for p in run.progress if p.limit is not None]
    return sorted(series)


def step_value(series: Sequence[tuple[float, float]], t: float) -> float | None:
    value = None
    for at, v in series:
        if at > t:
            break
        value = v
    return value


def ascii_chart(rows: int, width: int, t_end: float, y_max: float, series: Sequence[tuple[str, list[tuple[float, float]]]],
                marks: dict[int, str] | None = None, y_label: str = "") -> list[str]:  # fmt: skip
    """A character plot: each series a character, drawn in order (later wins); x is time 0..t_end."""
    grid = [[" "] * width for _ in range(rows)]
    for column, char in (marks or {}).items():
        for line in grid:
            if 0 <= column < width:
                line[column] = char
    for char, points in series:
        for column in range(width):
            t = (column + 0.5) * t_end / width
            value = step_value(points, t)
            if value is None or math.isnan(value):
                continue
            height = round(min(value, y_max) / y_max * (rows - 1))
            grid[rows - 1 - height][column] = char
    lines = []
    for i, row in enumerate(grid):
        level = y_max * (rows - 1 - i) / (rows - 1)
        label = f"{level:6.0f}" if i % 3 == 0 or i == rows - 1 else " " * 6
        lines.append(f"{label} |{''.join(row)}")
    lines.append(" " * 6 + " +" + "-" * width)
    ticks = [" "] * (width + 10)
    for second in range(0, int(t_end) + 1, 5):
        column = int(second / t_end * width)
        for k, ch in enumerate(str(second)):
            if column + k < len(ticks):
                ticks[column + k] = ch
    lines.append(" " * 8 + "".join(ticks).rstrip() + f"  {y_label}")
    return lines


def halving_chart(run: Run, summary: dict[str, Any], width: int) -> list[str]:
    points = summary["points"]
    if not points:
        return ["(no samples)"]
    t_end = summary["end_t"]
    change_column = int(summary["change_t"] / t_end * width)
    limits = [(float(t), float(v)) for t, v in limit_series(run)]
    running = [(p["t"] - SCRAPE_S, float(p["running"])) for p in points]
    waiting = [(p["t"] - SCRAPE_S, float(p["waiting"])) for p in points]
    tokens = [(p["t"] - SCRAPE_S, p["tokens_per_s"]) for p in points]
    top = max([v for _, v in limits] + [v for _, v in running] + [v for _, v in waiting] + [1.0])
    y_max = 20 * math.ceil(top * 1.05 / 20)
    lines = [f"limit (L), running (r), waiting (w) over the halving run; '|' = capacity halved at "
             f"t={summary['change_t']:.1f} s"]  # fmt: skip
    lines += ascii_chart(16, width, t_end, y_max, [("w", waiting), ("r", running), ("L", limits)], {change_column: "|"},
                         "t s")  # fmt: skip
    token_max = 500 * math.ceil(max(v for _, v in tokens) * 1.05 / 500)
    lines.append("")
    lines.append("generated tokens/s (*) from /metrics every 0.5 s; P = preemptions in that interval")
    lines += ascii_chart(10, width, t_end, token_max, [("*", tokens)], {change_column: "|"}, "t s")
    preempt = [" "] * width
    for p in points:
        if p["preempted"] > 0:
            column = min(width - 1, int((p["t"] - SCRAPE_S / 2) / t_end * width))
            preempt[column] = "P"
    lines.insert(len(lines) - 2, f"{'preempt':>6}  {''.join(preempt)}")
    return lines


def maybe_png(run: Run, summary: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    points = summary["points"]
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    limits = limit_series(run)
    top.step([t for t, _ in limits], [v for _, v in limits], where="post", label="limit")
    top.plot([p["t"] for p in points], [p["running"] for p in points], label="running")
    top.plot([p["t"] for p in points], [p["waiting"] for p in points], label="waiting")
    bottom.plot([p["t"] for p in points], [p["tokens_per_s"] for p in points], label="generated tokens/s")
    for axis in (top, bottom):
        axis.axvline(summary["change_t"], color="grey", linestyle="--")
        axis.legend()
    bottom.set_xlabel("t (s)")
    figure.savefig(path, dpi=100)
    return path


# -- the plan ---------------------------------------------------------------------------------------


def rows_for(concurrency: int, seconds: float) -> int:
    return math.ceil(expected_rows_per_s(concurrency) * (seconds + 2)) + concurrency


def print_runs(title: str, runs: Sequence[Run]) -> None:
    print(f"\n{title}")
    header = (f"{'conc':>5} {'rep':>3} {'rows':>5} {'wall s':>6} {'rows/s':>7} {'out tok/s':>9} {'srv tok/s':>9} "
              f"{'TTFT p50 ms':>11} {'p99 ms':>7} {'p99 all':>7} {'preempt':>7} {'(steady)':>8} {'limit':>5} "
              f"{'cli CPU':>7} {'mock CPU':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in runs:
        def f(value: float | None, form: str) -> str:
            return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, form)

        print(f"{r.concurrency:>5} {r.repeat + 1:>3} {r.rows:>5} {r.wall_s:>6.1f} {f(r.rows_per_s, '.1f'):>7} "
              f"{f(r.output_tokens_per_s, '.0f'):>9} {f(r.server_tokens_per_s, '.0f'):>9} {f(r.ttft_p50_ms, '.0f'):>11} "
              f"{f(r.ttft_p99_ms, '.0f'):>7} {f(r.ttft_p99_all_ms, '.0f'):>7} {f(r.preemptions, '.0f'):>7} {f(r.preemptions_steady, '.0f'):>8} "
              f"{f(r.settled_limit, '.0f'):>5} {r.cpu_s / max(r.wall_s, 1e-9):>7.0%} {r.mock_cpu_s / max(r.wall_s, 1e-9):>8.0%}"
              + (f"  PROBLEM: {r.problem}" if r.problem else ""))  # fmt: skip


def one(label: str, concurrency: str, repeat: int, rows: int, inp: Path, mock: Mock, work: Path,
        args: argparse.Namespace, **kwargs: Any) -> Run:  # fmt: skip
    print(f"  {label} --concurrency {concurrency}, repeat {repeat + 1}, {rows} rows ...", end=" ", flush=True)
    run = run_batchgen(label, concurrency, repeat, rows, inp, mock, work, args, **kwargs)
    before = " before the change" if label == "halving" else ""
    figures = [] if run.rows_per_s is None else [f"{run.rows_per_s:.1f} rows/s{before}"]
    figures += [] if run.ttft_p99_ms is None else [f"TTFT p99 {run.ttft_p99_ms:.0f} ms"]
    print(", ".join([*figures, f"{run.preemptions or 0:.0f} preemptions", f"{run.wall_s:.1f} s"])
          + (f", limit ~{run.settled_limit:.0f}{before}" if run.settled_limit else "")
          + (f"  PROBLEM: {run.problem}" if run.problem else ""), flush=True)  # fmt: skip
    if run.problem:
        print(run.log_tail[-2000:], file=sys.stderr)
    return run


def compare(best: int, fixed: list[Run], auto: list[Run]) -> dict[str, Any]:
    """Auto vs the best fixed: medians over the repeats of each run's steady figures."""
    result: dict[str, Any] = {"best_fixed": best}
    for name, runs in (("fixed", fixed), ("auto", auto)):
        result[name] = {
            "runs": len(runs),
            "rows_per_s": round(median([r.rows_per_s for r in runs]), 2),
            "output_tokens_per_s": round(median([r.output_tokens_per_s for r in runs]), 1),
            "server_tokens_per_s": round(median([r.server_tokens_per_s for r in runs]), 1),
            "ttft_p50_ms": round(median([r.ttft_p50_ms for r in runs]), 1),
            "ttft_p99_ms": round(median([r.ttft_p99_ms for r in runs]), 1),
            "ttft_p99_all_rows_ms": round(median([r.ttft_p99_all_ms for r in runs]), 1),
            "preemptions_steady": median([r.preemptions_steady for r in runs]),
            "settled_limit": median([r.settled_limit for r in runs]) if name == "auto" else best,
        }
    ratio = result["auto"]["rows_per_s"] / result["fixed"]["rows_per_s"]
    result["targets"] = {
        "throughput: auto rows/s >= 0.95 x best fixed": {"value": round(ratio, 3), "target": TARGET_THROUGHPUT,
                                                         "met": ratio >= TARGET_THROUGHPUT},
        "TTFT p99: auto <= best fixed (ms, steady)": {"value": result["auto"]["ttft_p99_ms"],
                                                         "target": result["fixed"]["ttft_p99_ms"],
                                                         "met": result["auto"]["ttft_p99_ms"] <= result["fixed"]["ttft_p99_ms"]},
    }  # fmt: skip
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default=",".join(map(str, SWEEP)), help="fixed concurrencies (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="each sweep run's length at its expected rate (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of auto and of the best fixed (default 3)")
    parser.add_argument("--change-at", type=float, default=15.0, help="halving run: seconds until the capacity halves")
    parser.add_argument("--halving-seconds", type=float, default=45.0, help="halving run: its length (SIGTERM then)")
    parser.add_argument("--halve", choices=("kv", "slots", "both"), default="kv", help="what halves (default kv)")
    parser.add_argument("--half-sweep", default=",".join(map(str, HALF_SWEEP)),
                        help="fixed concurrencies at the halved capacity, for reference ('' = none; default %(default)s)")
    parser.add_argument("--kv-tokens", type=int, default=KV_TOKENS, help="the mock's KV budget (default %(default)s)")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--chart-width", type=int, default=90)
    parser.add_argument("--no-full-timeline", dest="full_timeline", action="store_false",
                        help="run `python -m batchgen` as is (its summary shows ~12 decisions)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: sweep 32,64,128 of 11 s runs, 1 repeat, a 30 s halving run, half sweep 32,40,48")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--no-json", action="store_true")
    parser.add_argument("--check", action="store_true", help="exit 2 when a target is missed")
    args = parser.parse_args(argv)
    if args.quick:
        args.sweep, args.seconds, args.repeats = ",".join(map(str, QUICK_SWEEP)), 11.0, 1
        args.change_at, args.halving_seconds, args.half_sweep = 10.0, 30.0, ",".join(map(str, QUICK_HALF_SWEEP))
    args.sweep = [int(c) for c in args.sweep.split(",") if c]
    args.half_sweep = [int(c) for c in args.half_sweep.split(",") if c]
    if args.seconds <= 10:
        parser.error("--seconds must be > 10: a run must log progress twice (every 5 s)")
    if args.halving_seconds < args.change_at + RECOVER_WITHIN_S + 5:
        parser.error("--halving-seconds must leave >= 15 s after --change-at")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill stops the mock too, as Ctrl-C does
    started_at = dt.datetime.now()
    source_at_start = source_hash()
    work = Path(tempfile.mkdtemp(prefix="bench-autoscale-"))
    kv = args.kv_tokens
    half_slots = SLOTS // 2 if args.halve in ("slots", "both") else SLOTS
    half_kv = kv // 2 if args.halve in ("kv", "both") else kv
    halving_rows = math.ceil(expected_rows_per_s(SLOTS) * args.halving_seconds * 1.2) + POOL_ROWS
    most_rows = max([rows_for(c, args.seconds) for c in args.sweep + args.half_sweep] + [halving_rows])
    sweep: list[Run] = []
    h2h_fixed: list[Run] = []
    h2h_auto: list[Run] = []
    half: list[Run] = []
    halving: Run | None = None
    try:
        with mock_server(work, kv) as mock:
            inp = prompts_file(most_rows, work, args.seed)
            print(f"batchgen source {source_at_start}; {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}")
            print(f"mock at {mock.url}: {SLOTS} slots, {kv} KV tokens, step {STEP_MS:g} ms + {STEP_MS_PER_REQUEST:g} ms "
                  f"per running request; prompts {WORDS[0]}-{WORDS[1]} words, --max-tokens {MAX_TOKENS}, --stream")
            print(f"expected at >= {SLOTS} running: {expected_tokens_per_s(SLOTS):.0f} tokens/s, "
                  f"{expected_rows_per_s(SLOTS):.1f} rows/s; after halving ({args.halve}): "
                  f"{expected_tokens_per_s(SLOTS, half_kv, half_slots):.0f} tokens/s", flush=True)  # fmt: skip
            print("\nsweep:")
            for c in args.sweep:
                sweep.append(one("sweep", str(c), 0, rows_for(c, args.seconds), inp, mock, work, args))
            ok = [r for r in sweep if r.problem is None and r.rows_per_s is not None]
            if not ok:
                raise RuntimeError("no sweep run succeeded")
            best_run = max(ok, key=lambda r: r.rows_per_s or 0)
            best = int(best_run.concurrency)
            rows = best_run.rows
            print(f"\nbest fixed: {best} ({best_run.rows_per_s:.1f} rows/s); auto vs {best} on the same {rows} rows:")
            h2h_fixed.append(best_run)
            for repeat in range(args.repeats):
                order = ["auto", "fixed"] if repeat % 2 == 0 else ["fixed", "auto"]
                for kind in order:
                    if kind == "auto":
                        h2h_auto.append(one("h2h", "auto", repeat, rows, inp, mock, work, args))
                    elif repeat > 0:  # the sweep's run is repeat 1
                        h2h_fixed.append(one("h2h", str(best), repeat, rows, inp, mock, work, args))
            comparison = compare(best, h2h_fixed, h2h_auto)

            print(f"\nhalving run: auto, capacity -> {half_slots} slots / {half_kv} KV tokens at t={args.change_at:g} s, "
                  f"SIGTERM at {args.halving_seconds:g} s")  # fmt: skip
            halving = one("halving", "auto", 0, halving_rows, inp, mock, work, args, stop_at=args.halving_seconds,
                          actions=[(args.change_at, f"capacity -> {half_slots} slots, {half_kv} KV",
                                    lambda: mock.set_capacity(half_slots, half_kv))])  # fmt: skip
            if args.half_sweep:
                print(f"\nreference: fixed concurrency at the halved capacity ({half_slots} slots, {half_kv} KV):")
                for c in args.half_sweep:
                    half.append(one("half-sweep", str(c), 0, math.ceil(expected_tokens_per_s(c, half_kv, half_slots)
                                    / (MEAN_ANSWER + 2) * (args.seconds + 2)) + c, inp, mock, work, args))  # fmt: skip
            mock.set_capacity(SLOTS, kv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # -- the report -------------------------------------------------------------------------------
    print_runs("sweep (steady window: rows/s from the progress slope; TTFT over the requests the server got in it):", sweep)
    print_runs(f"auto vs the best fixed ({best}):", h2h_fixed + h2h_auto)
    if half:
        print_runs("fixed at the halved capacity (reference):", half)
    # Not an issue target: past the knee fixed settings differ by noise in rows/s but by far in TTFT.
    knee = min((r for r in ok if (r.rows_per_s or 0) >= 0.98 * (best_run.rows_per_s or 0)), key=lambda r: int(r.concurrency))
    comparison["knee"] = {"concurrency": int(knee.concurrency), "rows_per_s": knee.rows_per_s,
                          "output_tokens_per_s": knee.output_tokens_per_s, "ttft_p50_ms": knee.ttft_p50_ms,
                          "ttft_p99_ms": knee.ttft_p99_ms, "ttft_p99_all_rows_ms": knee.ttft_p99_all_ms,
                          "preemptions_steady": knee.preemptions_steady,
                          "auto_rows_per_s_ratio": round(comparison["auto"]["rows_per_s"] / (knee.rows_per_s or math.nan), 3)}  # fmt: skip
    print(f"\nMedians over {args.repeats} repeat(s) (TTFT: the requests the server got in each run's steady window; "
          f"'all rows': every row, ramp-up included):")  # fmt: skip
    print(f"  {'':<18} {'rows/s':>7} {'out tok/s':>9} {'TTFT p50 ms':>11} {'p99 ms':>7} {'p99 all rows':>12} "
          f"{'preempt (steady)':>16} {'limit':>6}")  # fmt: skip
    lines = [("fixed", f"best fixed ({best})"), ("auto", "auto"), ("knee", f"knee ({knee.concurrency})")]
    for name, title in lines:
        c = comparison[name]
        limit = c.get("settled_limit", c.get("concurrency"))
        print(f"  {title:<18} {c['rows_per_s']:>7.1f} {c['output_tokens_per_s']:>9.0f} {c['ttft_p50_ms']:>11.0f} "
              f"{c['ttft_p99_ms']:>7.0f} {c['ttft_p99_all_rows_ms']:>12.0f} {c['preemptions_steady']:>16.0f} {limit:>6.0f}")  # fmt: skip
    print(f"  (the knee: the lowest fixed concurrency within 2% of the best rows/s, its sweep run only; auto/knee rows/s "
          f"{comparison['knee']['auto_rows_per_s_ratio']:.3f}; not an issue target)")  # fmt: skip

    halving_summary: dict[str, Any] = {}
    chart: list[str] = []
    if halving is not None and halving.samples:
        halving_summary = timeline(halving, args.change_at)
        s = halving_summary
        half_ok = [r for r in half if r.problem is None and r.rows_per_s is not None]
        half_best = max(half_ok, key=lambda r: r.rows_per_s or 0, default=None)
        # The best that does not preempt in its steady window: what a controller that avoids preemptions can reach.
        half_clean = max((r for r in half_ok if not r.preemptions_steady), key=lambda r: r.rows_per_s or 0, default=None)
        for key, chosen in (("half_sweep_best", half_best), ("half_sweep_best_without_preemptions", half_clean)):
            s[key] = None if chosen is None else {
                "concurrency": int(chosen.concurrency), "rows_per_s": chosen.rows_per_s,
                "output_tokens_per_s": chosen.output_tokens_per_s, "server_tokens_per_s": chosen.server_tokens_per_s,
                "preemptions_steady": chosen.preemptions_steady}  # fmt: skip
        print(f"\nhalving run ({halving.decisions} decisions; the table shows {len(halving.ticks)}):")
        print(f"  {'t s':>5} {'limit':>5} {'running':>7} {'waiting':>7} {'kv':>5} {'tok/s':>6} {'preempted':>9}  decision")
        ticks = [(t["t"] + (halving.clock_offset or 0), t) for t in halving.ticks]
        for t, tick in ticks:
            print(f"  {t:5.1f} {tick['limit']:>5} {tick['running'] or 0:>7.0f} {tick['waiting'] or 0:>7.0f} "
                  f"{(tick['kv'] or 0):>4.0f}% {step_value([(p['t'], p['tokens_per_s']) for p in s['points']], t) or 0:>6.0f} "
                  f"{tick['preempted'] or 0:>9.0f}  {tick['decision']}")  # fmt: skip
        chart = halving_chart(halving, s, args.chart_width)
        print()
        print("\n".join(chart))
        print(f"\n  before the change: {s['tokens_per_s_before']:.0f} tokens/s at limit {s['limit_before']}; "
              f"the last {REFERENCE_S:g} s: {s['tokens_per_s_reference']:.0f} tokens/s at limit {s['limit_at_end']} "
              f"(lowest limit after the change {s['limit_min_after']})")  # fmt: skip
        print(f"  lowest {ROLLING_S:g}-s mean after the change: {s['tokens_per_s_lowest_2s_after']:.0f} tokens/s, "
              f"{s['lowest_at_s_after_change']:.1f} s after it; preemptions {s['preemptions_before_change']:.0f} before, "
              f"{s['preemptions_after_change']:.0f} after")  # fmt: skip
        print("  rows/s between batchgen's progress lines (delivered rows; recomputed tokens do not count): "
              + ", ".join(f"{r['from']:.0f}-{r['to']:.0f} s {r['rows_per_s']:.1f} (limit {r['limit']})" for r in s["progress_rates"]))
        info: dict[str, dict[str, Any]] = {}
        for key, chosen, what in (("auto_last_vs_half_best", half_best, "the best fixed"),
                                  ("auto_last_vs_half_best_without_preemptions", half_clean,
                                   "the best fixed without preemptions")):  # fmt: skip
            if chosen is not None and s["rows_per_s_last"]:
                ratio = s["rows_per_s_last"] / (chosen.rows_per_s or math.nan)
                s[key] = round(ratio, 3)
                print(f"  {what} at the halved capacity: {chosen.concurrency} ({chosen.rows_per_s:.1f} rows/s, "
                      f"{chosen.preemptions_steady or 0:.0f} preemptions in its steady window); auto over its last "
                      f"{REFERENCE_S:g} s: {s['rows_per_s_last']:.1f} rows/s = {ratio:.3f}x that")  # fmt: skip
                info[f"after the change: auto rows/s >= 0.9 x {what} at half capacity ({chosen.concurrency})"] = {
                    "value": round(ratio, 3), "target": RECOVER_FRACTION, "met": ratio >= RECOVER_FRACTION}
        s["info"] = info
        s["targets"] = {
            "preemptions stop: t_stop <= 10 s after the change": {"value": s["t_stop_s"], "target": RECOVER_WITHIN_S,
                                                                   "met": s["t_stop_s"] <= RECOVER_WITHIN_S},
            "throughput recovers: t_recover <= 10 s": {"value": s["t_recover_s"], "target": RECOVER_WITHIN_S,
                                                       "met": s["t_recover_s"] is not None and s["t_recover_s"] <= RECOVER_WITHIN_S},
        }  # fmt: skip
    targets = {**comparison["targets"], **halving_summary.get("targets", {})}
    print("\nTargets:")
    for name, t in targets.items():
        value = "never" if t["value"] is None else f"{t['value']:g}"
        print(f"  {name:<52} {value:>8} (target {t['target']:g}): {'PASS' if t['met'] else 'FAIL'}")
    if halving_summary.get("info"):
        print("Also (a stricter reading of 'recovers': against what fixed settings get from the halved server; not counted by --check):")
        for name, t in halving_summary["info"].items():
            print(f"  {name:<80} {t['value']:>6.3f} (>= {t['target']:g}): {'yes' if t['met'] else 'no'}")

    all_runs = sweep + h2h_fixed[1:] + h2h_auto + ([halving] if halving else []) + half
    if not args.no_json:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        path = args.results_dir / f"autoscale-{started_at:%Y-%m-%d-%H%M%S}.json"
        png = maybe_png(halving, halving_summary, path.with_suffix(".png")) if halving and halving_summary.get("points") else None
        document = {
            "benchmark": "bench_autoscale",
            "started": started_at.isoformat(timespec="seconds"),
            "finished": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(),
            "batchgen_source_sha256_16": {"start": source_at_start, "end": source_hash()},
            "settings": {"slots": SLOTS, "kv_tokens": kv, "step_ms": STEP_MS, "step_ms_per_request": STEP_MS_PER_REQUEST,
                         "prompt_words": WORDS, "max_tokens": MAX_TOKENS, "sweep": args.sweep, "seconds": args.seconds,
                         "repeats": args.repeats, "change_at": args.change_at, "halving_seconds": args.halving_seconds,
                         "halve": args.halve, "halved": {"batch_slots": half_slots, "kv_tokens": half_kv},
                         "half_sweep": args.half_sweep, "quick": args.quick, "full_timeline": args.full_timeline,
                         "stream": True, "keep_raw": True},
            "sweep_best": best, "comparison": comparison, "halving": halving_summary, "chart": chart,
            "png": None if png is None else str(png), "targets": targets,
            "runs": [r.to_json(with_samples=r.label == "halving") for r in all_runs],
        }  # fmt: skip
        path.write_text(json.dumps(document, indent=1) + "\n")
        print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    if any(r.problem for r in all_runs):
        return 1
    return 2 if args.check and not all(t["met"] for t in targets.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())

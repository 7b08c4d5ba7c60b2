"""What a `kill -9` costs: rows sent twice per kill, with and without the journal; and what the journal costs.

For each `--journal-seconds` value (default `0,0.1`: without the journal, then batchgen's default),
on a fresh output:

1. `batchgen run` (a subprocess) against the project's mock server (in this process, answering
   after `--latency-ms 30`: ~500 answers/s at `--concurrency 16`, the rate issue 15 measured at),
   12,000 prompt rows;
2. it is killed with SIGKILL at a random moment (2-6 s in, seeded), `--kills` times, each time
   rerun with the same command; the last run goes to the end;
3. per kill: the rows the next run sent that an earlier run had already sent (the mock records
   every request), next to the bound issue 15 sets: concurrency + 0.1 s x the answer rate (the
   rate measured from the killed run's requests);
4. the output is checked: every row once, in input order, each answer right.

Then, for each setting, one uninterrupted run under `strace -f -y` counts fsync calls per second of
run and the bytes written per row to the journal, the part files and the output.

    python benchmarks/bench_crash.py                       # ~3 min
    python benchmarks/bench_crash.py --rows 12000 --concurrency 16 --kills 3 --journal-seconds 0,0.1,0.05
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from batchgen.testing.mock_server import MockConfig, mock_server_thread  # noqa: E402


def _prompt_row(body: dict[str, object]) -> int:
    messages = body["messages"]
    assert isinstance(messages, list)
    return int(str(messages[-1]["content"]).split()[-1])


def _command(url: str, inp: Path, out: Path, concurrency: int, journal: float) -> list[str]:
    return [sys.executable, "-m", "batchgen", "run", "--input", str(inp), "--output", str(out), "--base-url", url,
            "--concurrency", str(concurrency), "--no-progress", "--journal-seconds", str(journal)]  # fmt: skip


def crash_series(url_state: tuple[str, object], inp: Path, work: Path, args: argparse.Namespace, journal: float) -> dict[str, object]:
    url, state = url_state
    out = work / f"out-{journal:g}.parquet"
    rng = random.Random(args.seed)
    sent_before: set[int] = set()
    resent: list[int] = []
    rates: list[float] = []
    for attempt in range(args.kills + 1):
        state.reset()  # type: ignore[attr-defined]
        started = time.monotonic()
        proc = subprocess.Popen(_command(url, inp, out, args.concurrency, journal), env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        killed = False
        if attempt < args.kills:
            deadline = started + rng.uniform(2.0, 6.0)
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed = True
        _, err = proc.communicate(timeout=600)
        requests = list(state.requests)  # type: ignore[attr-defined]
        sent = [_prompt_row(b) for b in requests]
        if killed and len(sent) > 100:
            rates.append(len(sent) / (time.monotonic() - started))
        if attempt > 0:
            resent.append(len(set(sent) & sent_before))
        sent_before |= set(sent)
        if not killed:
            if proc.returncode != 0:
                raise SystemExit(f"the last run failed: {err.decode()[-2000:]}")
            break
    table = pq.read_table(out, columns=["id", "content"])
    ids, contents = table["id"].to_pylist(), table["content"].to_pylist()
    exact = ids == [str(i) for i in range(args.rows)] and contents == [f"echo: question {i}" for i in range(args.rows)]
    out.unlink()
    rate = statistics.median(rates) if rates else float("nan")
    return {"journal_seconds": journal, "resent_per_kill": resent, "answer_rate": rate,
            "bound": args.concurrency + 0.1 * rate, "exact_output": exact}  # fmt: skip


_SYSCALL = re.compile(r'^\d+\s+(\w+)\((\d+)<([^>]*)>.*=\s*(-?\d+)')


def io_costs(url: str, inp: Path, work: Path, args: argparse.Namespace, journal: float) -> dict[str, float]:
    """One uninterrupted run under strace: fsyncs per second, bytes written per row by kind of file."""
    out = work / f"traced-{journal:g}.parquet"
    trace = work / f"strace-{journal:g}.txt"
    command = ["strace", "-f", "-y", "-qq", "-e", "trace=fsync,fdatasync,write,pwrite64,pwritev", "-o", str(trace),
               *_command(url, inp, out, args.concurrency, journal)]  # fmt: skip
    started = time.monotonic()
    subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, capture_output=True, timeout=900)
    wall = time.monotonic() - started
    fsyncs = 0
    written: collections.Counter[str] = collections.Counter()
    for line in trace.read_text(errors="replace").splitlines():
        m = _SYSCALL.match(line)
        if not m:
            continue
        call, _fd, path, result = m.groups()
        if call in ("fsync", "fdatasync"):
            fsyncs += 1
        elif int(result) > 0 and (".batchgen" in path or path.startswith(str(out))):
            kind = "journal" if path.endswith(".arrows") else "parts" if "part-" in path else "output"
            written[kind] += int(result)
    out.unlink(missing_ok=True)
    return {"wall_s_under_strace": wall, "fsyncs": fsyncs, "fsyncs_per_s": fsyncs / wall,
            **{f"bytes_per_row_{k}": v / args.rows for k, v in written.items()}}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=12_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=30.0, help="the mock's time to answer")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--journal-seconds", default="0,0.1", help="comma-separated settings to compare")
    parser.add_argument("--no-strace", action="store_true", help="skip the fsync and bytes count")
    args = parser.parse_args()
    settings = [float(x) for x in args.journal_seconds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-crash-"))
    try:
        inp = work / "in.parquet"
        pq.write_table(pa.table({"prompt": [f"question {i}" for i in range(args.rows)]}), inp)
        with mock_server_thread(MockConfig(latency_ms=args.latency_ms)) as server:
            print(f"{args.rows} rows, concurrency {args.concurrency}, {args.kills} kills per setting, mock at {server.url}")
            print(f"{'journal s':>9} {'answers/s':>9} {'bound':>6}  rows sent again per kill   exact")
            for journal in settings:
                r = crash_series((server.url, server.state), inp, work, args, journal)
                print(f"{journal:>9g} {r['answer_rate']:>9.0f} {r['bound']:>6.0f}  {str(r['resent_per_kill']):<24} {r['exact_output']}")
            if not args.no_strace and shutil.which("strace"):
                print(f"\n{'journal s':>9} {'fsyncs':>7} {'fsyncs/s':>8}  bytes written per row (strace run)")
                for journal in settings:
                    c = io_costs(server.url, inp, work, args, journal)
                    per_row = ", ".join(f"{k.removeprefix('bytes_per_row_')} {v:.0f}" for k, v in c.items() if k.startswith("bytes"))
                    print(f"{journal:>9g} {c['fsyncs']:>7} {c['fsyncs_per_s']:>8.1f}  {per_row}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does `batchgen run` keep a quota? (issue 14) Achieved rate against the limit, and the 429s met.

The project's mock server runs in this process (`mock_server_thread`) enforcing an OpenAI-style
quota (`MockConfig.requests_per_minute` / `tokens_per_minute`: buckets refilled continuously, each
holding one second's share, so a burst is refused even within the minute's total; x-ratelimit-*
headers on every answer). `batchgen run` runs as a subprocess against it:

* rpm:      the mock holds 600 requests/minute, batchgen is given `--max-requests-per-minute 600`.
* tpm:      the mock holds 30,000 tokens/minute (prompt words + max_tokens 45), batchgen is given
            `--max-tokens-per-minute 30000` (it estimates prompt tokens from bytes, corrected by usage).
* headers:  the mock holds 600 requests/minute, batchgen is given no limit: it can only follow the
            mock's x-ratelimit-* headers.

The achieved rate is read from the mock's own admission times (`MockState.admissions`): the
requests (or tokens) admitted in the 30 s window starting 2 s after the first one, per minute;
`rate_limited` counts the quota's 429s. Each run is sized to last about 34 s at the limit.

    python benchmarks/bench_ratelimit.py               # the three settings, ~2 min
    python benchmarks/bench_ratelimit.py --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _provenance import source_hash  # noqa: E402

from batchgen.testing.mock_server import MockConfig, mock_server_thread  # noqa: E402

WINDOW_S = 30.0
SKIP_S = 2.0  # the window starts this long after the first admission (start-up, the first answers)
SETTINGS: dict[str, dict[str, Any]] = {
    "rpm": {"mock": {"requests_per_minute": 600}, "flags": ["--max-requests-per-minute", "600"], "limit": 600, "unit": "requests"},
    "tpm": {"mock": {"tokens_per_minute": 30_000}, "flags": ["--max-tokens-per-minute", "30000"], "limit": 30_000,
            "unit": "tokens"},
    "headers": {"mock": {"requests_per_minute": 600}, "flags": [], "limit": 600, "unit": "requests"},
}  # fmt: skip


def _input(folder: Path, rows: int) -> Path:
    path = folder / f"in-{rows}.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"prompt": f"question number {i} about rates"}) + b"\n" for i in range(rows)))
    return path


def run_one(name: str, folder: Path) -> dict[str, Any]:
    setting = SETTINGS[name]
    per_request = 5 + 45 if setting["unit"] == "tokens" else 1  # the mock counts words: 5 prompt + 45 max_tokens
    rows = int(setting["limit"] / per_request * (WINDOW_S + SKIP_S + 2) / 60) + 1
    source = _input(folder, rows)
    with mock_server_thread(MockConfig(**setting["mock"])) as server:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "batchgen", "run", "-i", str(source), "-o", str(folder / f"{name}.parquet"),
             "--base-url", server.url, "--max-tokens", "45", "--concurrency", "32", "--no-progress", "--overwrite",
             *setting["flags"]],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - started
        admissions = list(server.state.admissions)
        limited = server.state.rate_limited
    if done.returncode != 0:
        raise SystemExit(f"{name}: batchgen exited {done.returncode}:\n{done.stderr[-2000:]}")
    first = admissions[0][0]
    window = [(t, cost) for t, cost in admissions if first + SKIP_S <= t < first + SKIP_S + WINDOW_S]
    amount = len(window) if setting["unit"] == "requests" else sum(cost for _, cost in window)
    rate = amount / WINDOW_S * 60
    return {"setting": name, "rows": rows, "wall_s": round(wall, 2), "limit_per_min": setting["limit"],
            "unit": setting["unit"], "achieved_per_min": round(rate, 1), "ratio": round(rate / setting["limit"], 4),
            "rate_limited_429": limited, "admitted": len(admissions)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    hash_start = source_hash()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-ratelimit-") as tmp:
        for repeat in range(args.repeats):
            for name in args.settings if repeat % 2 == 0 else reversed(args.settings):
                run = {**run_one(name, Path(tmp)), "repeat": repeat}
                runs.append(run)
                print(f"{name:<8} repeat {repeat + 1}: {run['achieved_per_min']:>9.1f} {run['unit']}/min of "
                      f"{run['limit_per_min']} ({run['ratio']:.3f}), 429s: {run['rate_limited_429']}, wall {run['wall_s']} s")
    summary = {}
    print(f"\n{'setting':<8} {'limit/min':>9} {'achieved/min (median)':>22} {'ratio':>6} {'429s (max)':>10}")
    for name in args.settings:
        mine = [r for r in runs if r["setting"] == name]
        rate = statistics.median(r["achieved_per_min"] for r in mine)
        limit = mine[0]["limit_per_min"]
        summary[name] = {"limit_per_min": limit, "achieved_per_min": rate, "ratio": round(rate / limit, 4),
                         "max_429": max(r["rate_limited_429"] for r in mine)}  # fmt: skip
        print(f"{name:<8} {limit:>9} {rate:>22.1f} {rate / limit:>6.3f} {summary[name]['max_429']:>10}")
    out = REPO / "benchmarks" / "results" / f"ratelimit-{dt.datetime.now():%Y-%m-%d-%H%M%S}.json"
    out.write_text(json.dumps({"benchmark": "bench_ratelimit", "window_s": WINDOW_S, "skip_s": SKIP_S,
                               "source_sha256_16": {"start": hash_start, "end": source_hash()}, "runs": runs,
                               "summary": summary}, indent=1))  # fmt: skip
    print(f"\nresults: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()

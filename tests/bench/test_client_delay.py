"""The client-delay detector: what the client adds to the latencies it measures, estimated and flagged.

Pure parts on synthetic timings (no clock); then the detector on real load: a CPU hog on the
client's own event loop must be flagged with about the delay it really added, and a slow server
in another process must not be blamed on the client. How well the estimate tracks the truth at
every load is measured, not asserted, in benchmarks/bench_client_delay.py.
"""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchgen.bench import clientdelay
from batchgen.bench.canary import ReadCanary
from batchgen.bench.clientdelay import FLAG_ERROR, TARGET_ERROR, canary_gap_error, per_chunk_weights
from batchgen.bench.datasets import DatasetSpec, load_dataset
from batchgen.bench.metrics import ClientLoad, RequestRecord, summarize
from batchgen.bench.multiproc import _probe_load, choose_processes
from batchgen.bench.runner import LoadSpec, ServerSpec, run_shard
from batchgen.cli import main
from batchgen.errors import ConfigError
from batchgen.testing.mock_server import MockConfig, mock_server_thread

REPO = Path(__file__).resolve().parents[2]
TTFT_MS = 50.0


def _record(index: int, sent: float, chunks: tuple[float, ...], *, write: float | None = None) -> RequestRecord:
    return RequestRecord(index=index, process=0, scheduled_s=sent, queue_s=0.0, sent_s=sent,
                         end_s=sent + chunks[-1] + 0.001, ttft_s=chunks[0], e2el_s=chunks[-1], chunk_times_s=chunks,
                         chunk_tokens=None, prompt_tokens=10, output_tokens=len(chunks), write_s=write)  # fmt: skip


def _stream(index: int, sent: float, *, ttft: float = 0.05, gap: float = 0.01, n: int = 10,
            write: float | None = None) -> RequestRecord:  # fmt: skip
    return _record(index, sent, tuple(ttft + k * gap for k in range(n)), write=write)


# ---------------------------------------------------------------- pure arithmetic


def test_each_canary_sample_weighs_the_chunks_read_around_it() -> None:
    chunks = [1.0, 1.0001, 1.0003, 1.002, 2.0]
    assert per_chunk_weights([1.0002, 1.5, 2.0004, 2.0006], chunks) == [3, 0, 1, 0]


def test_chunks_in_bursts_meet_the_delay_of_the_bursts_not_of_the_quiet() -> None:
    """Streams in step read their chunks in bursts; most canary samples land in the quiet between."""
    records = [_stream(i, sent=0.0) for i in range(20)]  # 20 streams, chunks at the same instants
    burst_times = sorted({0.05 + k * 0.01 for k in range(10)})
    quiet = [(t + 0.005, 0.00005) for t in burst_times]  # between the bursts: 50 µs
    busy = [(t, 0.004) for t in burst_times]  # in a burst: 4 ms
    samples = sorted(quiet * 9 + busy)  # the quiet is sampled 9 times as often
    load = ClientLoad(0, tuple(d for _, d in samples), cpu_s=0.1, wall_s=0.2, read_times_s=tuple(t for t, _ in samples))
    s = summarize(records, duration_s=0.2, clients=[load])
    delay = s.client_delay
    assert delay is not None and delay.read is not None
    assert delay.read.mean < 0.5  # what a time-sampled probe reports: about 0.4 ms
    assert delay.read_per_chunk_mean == pytest.approx(4.0)  # what the chunks met
    assert delay.ttft_added == pytest.approx(4.0)


def test_the_canarys_own_gaps_show_what_the_loop_did_to_gaps_of_the_itls_length() -> None:
    stamps = [k * 0.001 for k in range(1000)]  # one stamp a millisecond
    prompt = [t + 0.0002 for t in stamps]  # every stamp read 0.2 ms after it was written
    in_stretches = [math.ceil(t / 0.012) * 0.012 + 0.0001 for t in stamps]  # read only every 12 ms, all at once

    def error(reads: list[float], gap: float) -> float | None:
        return canary_gap_error(reads, [r - t for r, t in zip(reads, stamps[: len(reads)], strict=True)], gap)

    assert error(prompt, 0.010) == pytest.approx(0.0, abs=1e-9)
    assert error(in_stretches, 0.010) > 0.1  # 10 ms gaps read as 0 or 12 ms: the median moves
    assert error(in_stretches, 0.120) < 0.05  # gaps of ten stretches barely notice them
    assert error(prompt[:10], 0.010) is None  # too few pairs to tell a median


def test_a_loop_busy_in_stretches_is_flagged_for_its_itl() -> None:
    records = [_stream(i, sent=i * 0.2) for i in range(10)]  # 10 ms gaps
    stamps = [k * 0.001 for k in range(2000)]
    reads = [math.ceil(t / 0.012) * 0.012 + 0.0001 for t in stamps]
    load = ClientLoad(0, tuple(r - t for r, t in zip(reads, stamps, strict=True)), cpu_s=0.1, wall_s=2.0,
                      read_times_s=tuple(reads))  # fmt: skip
    s = summarize(records, duration_s=2.0, clients=[load])
    assert s.client_delay is not None and s.client_delay.itl_error is not None and s.client_delay.itl_error > 0.1
    assert any("moved the mean or median of gaps as long as the mean ITL" in w for w in s.client_warnings)


def test_the_estimate_adds_the_measured_write_to_the_read_and_flags_from_seven_percent() -> None:
    def level(write_ms: float) -> Any:
        records = [_stream(i, sent=i * 0.2, ttft=0.05 + write_ms / 1000, write=write_ms / 1000) for i in range(10)]
        times = tuple(r.sent_s + r.chunk_times_s[0] for r in records)  # read with the first chunks, at once
        load = ClientLoad(0, (0.0,) * 10, cpu_s=0.1, wall_s=2.0, read_times_s=times)
        return summarize(records, duration_s=2.0, clients=[load])

    low, high = level(2.0), level(5.0)  # errors of 4% and 10% on a 50 ms TTFT
    assert low.client_delay.ttft_error == pytest.approx(0.04, abs=0.002)
    assert not low.client_limited
    assert high.client_delay.ttft_error == pytest.approx(0.10, abs=0.002) and high.client_delay.ttft_error > FLAG_ERROR
    assert high.client_limited
    warning = high.client_warnings[0]
    assert "5.0 ms writing the request (measured)" in warning and "reading the chunk (estimated)" in warning
    assert "Est. client-added, in the above (ms):" in _console(high)


def test_the_note_says_how_many_processes_the_level_needs_and_whether_the_machine_has_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = [_stream(i, sent=i * 0.2, ttft=0.06, write=0.01) for i in range(10)]  # 10 of 60 ms: an error of 20%
    load = ClientLoad(0, (0.00005,) * 10, cpu_s=0.1, wall_s=2.0, read_times_s=tuple(i * 0.2 for i in range(10)))
    monkeypatch.setattr("batchgen.bench.metrics.available_cores", lambda: 2)
    s = summarize(records, duration_s=2.0, clients=[load])
    assert s.client_delay is not None and s.client_delay.processes_needed == 4  # 20% / 5%, one process now
    note = s.client_warnings[-1]
    assert "needs about 4 client process(es) (--client-processes 4, or auto)" in note
    assert "this machine has 2 cores" in note
    assert f"within {TARGET_ERROR:.0%}" in note


def test_a_server_that_sends_chunks_together_is_not_the_clients_doing() -> None:
    """Chunks read together (0 gaps) with a prompt client: the server batched them, nothing to flag."""
    records = [_record(i, i * 0.3, (0.05, 0.05, 0.05, 0.09, 0.09, 0.09, 0.13)) for i in range(8)]
    times = tuple(i * 0.3 + t for i in range(8) for t in (0.05, 0.09, 0.13))
    load = ClientLoad(0, (0.00005,) * len(times), cpu_s=0.05, wall_s=2.4, read_times_s=times)
    s = summarize(records, duration_s=2.4, clients=[load])
    assert s.itl is not None and s.itl.median == 0.0
    assert s.client_delay is not None and s.client_delay.itl_error is not None and s.client_delay.itl_error < 0.01
    assert not s.client_limited


def _console(summary: Any) -> str:
    from batchgen.bench.multiproc import LevelResult
    from batchgen.bench.report import Level, RunInfo, console_report

    result = LevelResult(LoadSpec(concurrency=1, num_prompts=1), (), (), summary.duration_s)
    return console_report(Level(result, summary), RunInfo(model="m", dataset="random"))


# ---------------------------------------------------------------- the canary


async def test_the_canary_reads_late_exactly_when_the_loop_is_held() -> None:
    async with ReadCanary(period_s=0.002) as canary:
        await asyncio.sleep(0.2)  # an idle loop reads at once
        idle = len(canary.delays_s)
        time.sleep(0.05)  # the loop's thread held: stamps written meanwhile wait for it
        await asyncio.sleep(0.05)
    assert idle > 20 and max(canary.delays_s[:idle]) < 0.02
    late = canary.delays_s[idle:]
    assert max(late) >= 0.03  # the first stamps of the hold waited most of it
    assert len(canary.read_at) == len(canary.delays_s)


# ---------------------------------------------------------------- on real load


@pytest.fixture(scope="module")
def server_process() -> Iterator[Any]:
    """Mock servers in processes of their own: a client-side hog must not slow the server too."""
    started: list[subprocess.Popen[str]] = []

    def start(*flags: str) -> str:
        argv = [sys.executable, "-m", "batchgen.testing.mock_server", "--port", "0", *flags]
        proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        started.append(proc)
        assert proc.stderr is not None
        match = re.search(r"listening on (http://\S+/v1)", proc.stderr.readline())
        assert match, "the mock server did not start"
        return match.group(1)

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


def _bodies(output_len: int, num: int = 32) -> tuple[dict[str, Any], ...]:
    spec = DatasetSpec(name="random", model="mock-model", num_prompts=num, input_len=8, output_len=output_len)
    return load_dataset(spec).bodies


async def _hog(busy_s: float, every_s: float) -> None:
    """Holds the event loop's thread `busy_s` out of every `every_s`: a client doing other work."""
    while True:
        until = time.perf_counter() + busy_s
        while time.perf_counter() < until:
            pass
        await asyncio.sleep(every_s - busy_s)


async def test_a_cpu_hog_in_the_client_is_flagged_with_about_the_delay_it_added(server_process: Any) -> None:
    url = server_process("--ttft-ms", "50", "--itl-ms", "10")
    server, bodies = ServerSpec.of(url), _bodies(output_len=20)
    load = LoadSpec(concurrency=8, num_prompts=64, warmup=8)
    clean = await run_shard(server, bodies, load)
    hog = asyncio.create_task(_hog(0.025, 0.035))  # the loop's thread held 25 ms of every 35
    try:
        hogged = await run_shard(server, bodies, load)
    finally:
        hog.cancel()
    before = summarize(clean.records, duration_s=clean.load.wall_s, clients=[clean.load])
    after = summarize(hogged.records, duration_s=hogged.load.wall_s, clients=[hogged.load])
    assert before.ttft is not None and after.ttft is not None and after.client_delay is not None
    added = after.ttft.mean - before.ttft.mean  # the server is the same: the difference is the hog's
    assert added > 5.0, "the hog did not slow the client: this test would prove nothing"
    assert after.client_limited
    assert any("of each TTFT" in w for w in after.client_warnings)
    estimate = after.client_delay.ttft_added
    assert estimate is not None
    assert estimate >= 0.5 * added  # it sees at least half of what the hog did
    assert estimate <= 3 * (after.ttft.mean - TTFT_MS)  # and does not blame the client for the server's 50 ms


async def test_a_slow_server_is_not_blamed_on_the_client(server_process: Any) -> None:
    url = server_process("--ttft-ms", "600", "--itl-ms", "60")
    shard = await run_shard(ServerSpec.of(url), _bodies(output_len=6), LoadSpec(concurrency=8, num_prompts=16))
    s = summarize(shard.records, duration_s=shard.load.wall_s, clients=[shard.load])
    assert s.ttft is not None and s.ttft.median >= 600 and s.itl is not None and s.itl.median >= 57
    assert s.client_delay is not None and s.client_delay.ttft_error is not None
    assert s.client_delay.ttft_error < 0.02 and (s.client_delay.itl_error or 0.0) < 0.02
    assert not s.client_limited, s.client_warnings


# ---------------------------------------------------------------- --client-processes auto


def test_auto_probes_the_level_in_one_process_and_stays_within_the_cores_and_the_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with mock_server_thread(MockConfig(ttft_ms=20, itl_ms=5)) as mock:
        url = mock.url
        monkeypatch.setattr(clientdelay, "TARGET_ERROR", 1e-6)  # any delay at all asks for more processes
        monkeypatch.setattr("batchgen.bench.multiproc.PROBE_S", 0.5)
        monkeypatch.setattr("batchgen.bench.multiproc.available_cores", lambda: 3)
        choice = choose_processes(ServerSpec.of(url), _bodies(output_len=4), LoadSpec(concurrency=8, num_prompts=100))
        assert choice.needed > 3 and choice.processes == 3 and choice.cores == 3
        assert "3 used (3 cores here)" in choice.describe()
        narrow = choose_processes(ServerSpec.of(url), _bodies(output_len=4), LoadSpec(concurrency=2, num_prompts=100))
        assert narrow.processes == 2  # each process needs a request in flight
    with pytest.raises(ConfigError, match="--client-processes auto needs a fixed load"):
        choose_processes(ServerSpec.of(url), _bodies(output_len=4), LoadSpec(auto=clientdelay_auto()))


def clientdelay_auto() -> Any:
    from batchgen.autoscale import AutoConcurrency

    return AutoConcurrency()


def test_the_probe_keeps_the_levels_shape_for_a_few_seconds() -> None:
    closed = _probe_load(LoadSpec(concurrency=64, num_prompts=10_000, warmup=64))
    assert closed.concurrency == 64 and closed.duration_s is not None and closed.num_prompts is None
    assert closed.warmup == 64
    assert _probe_load(LoadSpec(request_rate=50.0, num_prompts=10_000)).request_rate == 50.0
    burst = _probe_load(LoadSpec(num_prompts=10_000))  # all at once: a smaller burst, no duration
    assert burst.num_prompts == 256 and burst.duration_s is None


def test_the_command_line_takes_auto_and_reports_the_choice(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--base-url", "mock", "--concurrency", "4", "--num-prompts", "8", "--input-len", "4",
            "--output-len", "4", "--client-processes", "auto"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert re.search(r"Client processes:\s+\d \(auto: a 3 s probe in one process read", captured.out)
    assert "batchgen bench: client processes" in captured.err
    with pytest.raises(SystemExit) as refused:
        main(["bench", "--client-processes", "0"])
    assert refused.value.code == 2
    assert "--client-processes: must be >= 1" in capsys.readouterr().err

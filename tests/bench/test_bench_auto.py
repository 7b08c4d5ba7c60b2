"""`batchgen bench --concurrency auto` against the mock server's capacity model (a known knee: 32 batch
slots, KV for 32 requests of 64 tokens), and the saturation arithmetic on made-up timelines.

No timing asserts beyond the brief's: the settled limit lies between the server's 32 slots and about
twice that (32 running plus a queue). The controller decides every 0.2 s (`--concurrency-interval`)
so a level of a few seconds has a settled stretch. Ordering facts (a request sent after another
one's slot freed) are exact, not timing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchgen.autoscale import AutoConcurrency, Tick
from batchgen.bench.cli import _loads
from batchgen.bench.datasets import DatasetSpec, load_dataset
from batchgen.bench.metrics import RequestRecord
from batchgen.bench.multiproc import split_load
from batchgen.bench.runner import LoadSpec, ServerSpec, _Shard, run_shard
from batchgen.bench.saturation import ControllerTrace, find_saturation
from batchgen.cli import build_parser, main
from batchgen.client_pool import ClientPool
from batchgen.errors import ConfigError
from batchgen.testing.mock_server import MockConfig, MockServer, mock_server_thread

SLOTS = 32
KNEE = MockConfig(batch_slots=SLOTS, kv_tokens=SLOTS * 64)  # 16-word prompts + 32 tokens fit 42: slots bind
FAST = AutoConcurrency(min=1, max=256, interval=0.2)
TICK_FIELDS = {"t", "limit", "in_flight", "running", "waiting", "kv_usage", "preemptions", "tokens_per_s", "decision"}


def _bodies(num: int = 32, input_len: int = 16, output_len: int = 32) -> tuple[dict[str, Any], ...]:
    spec = DatasetSpec(name="random", model="mock-model", num_prompts=num, input_len=input_len, output_len=output_len)
    return load_dataset(spec).bodies


def _cli(url: str, result: Path, *extra: str) -> int:
    return main(["bench", "--base-url", url, "--model", "mock-model", "--input-len", "16", "--output-len", "32",
                 "--concurrency", "auto", "--concurrency-interval", "0.2", "--result-json", str(result),
                 *extra])  # fmt: skip


def test_auto_finds_the_servers_batch_and_reports_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = tmp_path / "r.json"
    with mock_server_thread(KNEE) as server:
        rc = _cli(server.url, result, "--duration", "4")
        preempted = server.state.preemptions
    assert rc == 0 and preempted == 0
    data = orjson.loads(result.read_bytes())
    auto = data["concurrency_auto"]
    limit = auto["saturation_limit"]
    assert SLOTS <= limit <= 2 * SLOTS + 8, auto  # the 32 running, plus a queue
    assert data["concurrency"] == "auto" and data["max_concurrency"] == round(limit)
    assert auto["running"] is not None and auto["running"] <= SLOTS and auto["waiting"] is not None
    assert SLOTS <= auto["in_flight"] <= 2 * SLOTS + 8  # what the bench held there
    assert auto["output_throughput"] > 0 and auto["server_tokens_per_s"] > 0 and auto["notes"] == []
    assert (auto["min"], auto["max"], auto["interval_s"]) == (1, 512, 0.2)
    (endpoint,) = auto["endpoints"]
    assert endpoint["base_url"] == server.url and endpoint["metrics"] is True
    (timeline,) = endpoint["timelines"]
    ticks = timeline["ticks"]
    assert len(ticks) == endpoint["decisions"] >= 5 and all(set(tick) == TICK_FIELDS for tick in ticks)
    assert timeline["settled_limit"] == limit and timeline["settled_decisions"] >= 1
    assert ticks[0]["t"] > timeline["measured_from_s"] and timeline["sending_until_s"] > timeline["measured_from_s"]
    out = capsys.readouterr().out
    assert "Load:" in out and "concurrency auto (1..512)" in out
    (line,) = (line for line in out.splitlines() if line.startswith("Saturation point"))
    assert line.split()[-1] == f"{limit:.0f}"
    assert any(line.startswith("Server running / waiting there:") for line in out.splitlines())
    assert f"Timeline at {server.url}" in out


def test_each_client_process_steers_its_share(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = tmp_path / "r.json"
    with mock_server_thread(KNEE) as server:
        rc = _cli(server.url, result, "--duration", "3", "--client-processes", "2", "--concurrency-max", "128")
    assert rc == 0
    auto = orjson.loads(result.read_bytes())["concurrency_auto"]
    (endpoint,) = auto["endpoints"]
    timelines = endpoint["timelines"]
    assert [t["process"] for t in timelines] == [0, 1] and all(t["ticks"] for t in timelines)
    assert auto["saturation_limit"] == sum(t["settled_limit"] for t in timelines)
    assert auto["client_processes"] == 2
    assert "(sum of 2 client processes)" in capsys.readouterr().out


async def test_no_request_starts_after_the_deadline_and_idle_workers_are_no_lag() -> None:
    """256 workers for a limit near 32: the idle ones wait in the bench holding no request, so none
    is sent after the deadline, and a request is due when its worker gets a slot (no lag, no queue)."""
    load = LoadSpec(auto=FAST, num_prompts=None, duration_s=2.0)
    async with MockServer(KNEE) as server:
        shard = await run_shard(ServerSpec.of(server.url), _bodies(), load)
        peak = server.state.max_running
    records = shard.records
    assert records and all(r.ok for r in records) and peak <= SLOTS
    assert max(r.sent_s for r in records) < 2.0 + 0.1
    assert all(r.queue_s == 0 for r in records)
    assert sum(r.send_lag_s > 0.02 for r in records) <= len(records) // 100  # not the seconds idle workers wait
    (trace,) = shard.traces
    assert trace.endpoint == server.url and trace.metrics is True and trace.ticks
    assert trace.sending_until_s - trace.measured_from_s == pytest.approx(2.0, abs=0.1)


async def test_a_wait_inside_the_pool_is_queueing_not_ttft() -> None:
    """If the pool makes a stream wait for a slot (here: its limit forced to 1), the record's clock
    starts when the request really went, after the other one's slot freed."""
    async with MockServer(MockConfig(ttft_ms=100, itl_ms=1)) as server:
        pool = ClientPool([server.url], concurrency=FAST, max_retries=0)  # not started: no controller moves the limit
        try:
            pool.endpoints[0].limit = 1
            shard = _Shard(pool, server.url, _bodies(2, output_len=3), 0, 1)
            first, second = await asyncio.gather(shard.send(0, 0.0), shard.send(1, 0.0))
        finally:
            await pool.aclose()
    assert first.ok and second.ok and second.endpoint == server.url
    assert second.sent_s >= first.end_s  # its POST left once the first stream had freed the slot
    assert second.queue_s >= first.end_s - first.sent_s - 0.01  # that wait is queueing ...
    assert abs(second.send_lag_s) < 0.01  # ... not lag, and not TTFT
    assert second.ttft_s is not None and second.ttft_s * 1000 >= 100
    assert pool.endpoints[0].ttft_count == 2  # the TTFTs reach the controller (its rule without /metrics)


# -- the arithmetic, on made-up timelines ------------------------------------------------------
def _tick(t: float, limit: int, running: float | None = 32.0, waiting: float | None = 2.0,
          decision: str = "queue 2: hold") -> Tick:  # fmt: skip
    return Tick(t, limit, limit, running, waiting, 0.5 if running is not None else None,
                0.0 if running is not None else None, 1000.0 if running is not None else None, decision)  # fmt: skip


def _trace(limits: list[int], *, process: int = 0, measured_from: float = 1.0, until: float = 100.0,
           **tick: Any) -> ControllerTrace:  # fmt: skip
    ticks = tuple(_tick(1.0 + i, limit, **tick) for i, limit in enumerate(limits))
    return ControllerTrace(process=process, endpoint="http://h/v1", interval_s=1.0, measured_from_s=measured_from,
                           sending_until_s=until, shift_s=0.0, metrics=tick.get("running", 32.0) is not None,
                           ticks=ticks)  # fmt: skip


def _record(sent: float, end: float, tokens: int = 10) -> RequestRecord:
    chunk_times = tuple((end - sent) * (i + 1) / tokens for i in range(tokens))
    return RequestRecord(index=0, process=0, scheduled_s=sent, queue_s=0.0, sent_s=sent, end_s=end,
                         ttft_s=chunk_times[0], e2el_s=chunk_times[-1], chunk_times_s=chunk_times,
                         chunk_tokens=(1,) * tokens, prompt_tokens=5, output_tokens=tokens,
                         endpoint="http://h/v1")  # fmt: skip


def test_the_settled_limit_is_the_median_of_the_last_third_of_the_measured_decisions() -> None:
    # ticks at 1..12 on the controller's clock; the measured phase is 2 < t <= 11: ten decisions,
    # the last three (t = 9, 10, 11) settled; the ramp and the drain tick (t = 12) left out.
    limits = [8, 16, 32, 40, 36, 36, 34, 34, 35, 33, 36, 5]
    trace = _trace(limits, measured_from=2.0, until=11.0)
    assert [t.t for t in trace.settled()] == [9.0, 10.0, 11.0]
    records = [_record(6.0, 8.5), _record(7.5, 8.9)]  # level time = tick time - 2
    sat = find_saturation(FAST, [trace], records)
    (endpoint,) = sat.endpoints
    assert sat.limit == endpoint.limit == sat.in_flight == 35
    assert endpoint.settled_decisions == 3 and endpoint.decisions == 12
    assert (sat.running, sat.waiting, endpoint.kv_usage, sat.server_tokens_per_s) == (32, 2, 0.5, 1000)
    assert sat.window_s == (6.0, 9.0)  # one interval before the first settled decision (t = 9 -> 7) to the last
    assert sat.request_throughput == pytest.approx(2 / 3)
    # the first record's chunks at 6.25 ... 8.5 are all in; the second's at 7.64 ... 8.9 too
    assert sat.output_throughput == pytest.approx(20 / 3)
    assert sat.notes == ()


def test_processes_add_up_and_the_notes_say_what_is_off() -> None:
    shares = [AutoConcurrency(min=1, max=16, interval=1.0), AutoConcurrency(min=1, max=16, interval=1.0)]
    traces = [_trace([16, 16, 16], process=0, running=None, waiting=None, decision="hold: the client is CPU-bound"),
              _trace([10, 12, 12], process=1, running=None, waiting=None)]  # fmt: skip
    sat = find_saturation(AutoConcurrency(max=32, interval=1.0), traces, [], shares=shares, processes=2)
    assert sat.limit == 16 + 12 and sat.running is None and sat.processes == 2
    notes = " ".join(sat.notes)
    assert "no vLLM /metrics" in notes and "--concurrency-max (32)" in notes and "CPU-bound" in notes
    empty = find_saturation(FAST, [_trace([8, 8], until=1.5)], [])  # nothing decided in the measured phase
    assert empty.limit is None and empty.window_s is None and "longer --duration" in empty.notes[0]


# -- flags and load splitting --------------------------------------------------------------------
def _parsed(*args: str) -> tuple[LoadSpec, ...]:
    return _loads(build_parser("bench").parse_args(["bench", *args]))


def test_the_flags_make_auto_levels() -> None:
    (only,) = _parsed("--concurrency", "auto", "--concurrency-max", "64", "--concurrency-interval", "0.5",
                      "--duration", "10")  # fmt: skip
    assert only.auto == AutoConcurrency(min=1, max=64, interval=0.5) and only.concurrency is None
    assert only.in_flight_limit == 64 and only.num_prompts is None
    fixed, auto = _parsed("--concurrency", "16,auto")
    assert fixed.concurrency == 16 and fixed.auto is None and auto.auto == AutoConcurrency()
    with pytest.raises(ConfigError, match="apply to --concurrency auto"):
        _parsed("--concurrency", "16", "--concurrency-max", "64")
    with pytest.raises(ConfigError, match="min <= max"):
        _parsed("--concurrency", "auto", "--concurrency-min", "600")
    with pytest.raises(ConfigError, match="closed loop of its own"):
        LoadSpec(auto=FAST, request_rate=5.0)


def test_auto_bounds_split_over_client_processes() -> None:
    load = LoadSpec(auto=AutoConcurrency(min=3, max=100, start=8, interval=0.3), num_prompts=10)
    shares = [share.auto for share in split_load(load, 3)]
    assert [(a.min, a.max, a.start) for a in shares if a] == [(1, 34, 3), (1, 33, 3), (1, 33, 2)]
    assert all(a is not None and a.interval == 0.3 for a in shares)
    with pytest.raises(ConfigError, match="--concurrency-max 2 is below --client-processes 3"):
        split_load(LoadSpec(auto=AutoConcurrency(max=2), num_prompts=10), 3)

"""`batchgen.bench.metrics.summarize` on synthetic timings: no server, no clock."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchgen.bench.metrics import (
    CPU_LIMIT,
    ClientLoad,
    RequestRecord,
    describe,
    percentile,
    summarize,
)
from batchgen.bench.multiproc import LevelResult
from batchgen.errors import ConfigError
from batchgen.bench.report import Level, RunInfo, console_report, result_json
from batchgen.bench.runner import LoadSpec


def record(
    index: int = 0,
    *,
    chunks: tuple[float, ...] = (0.1, 0.2, 0.3),
    tokens: tuple[int, ...] | None = None,
    prompt: int | None = 10,
    output: int | None = 3,
    sent: float = 0.0,
    scheduled: float | None = None,
    queue: float = 0.0,
    error: str | None = None,
    endpoint: str | None = None,
) -> RequestRecord:
    return RequestRecord(
        index=index, process=0, scheduled_s=sent if scheduled is None else scheduled, queue_s=queue, sent_s=sent,
        end_s=sent + (chunks[-1] if chunks else 0.5) + 0.001, ttft_s=chunks[0] if chunks else None,
        e2el_s=chunks[-1] if chunks else None, chunk_times_s=chunks, chunk_tokens=tokens, prompt_tokens=prompt,
        output_tokens=output, error=error, error_type="server_error" if error else None, endpoint=endpoint,
    )  # fmt: skip


def test_percentiles_interpolate_linearly_like_numpy() -> None:
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 90) == pytest.approx(9.1)
    assert percentile(values, 99.9) == pytest.approx(9.991)
    assert percentile([7.0], 99) == 7.0
    dist = describe([v / 1000 for v in values])  # seconds in, ms out
    assert dist is not None
    assert dist.mean == pytest.approx(5.5)
    assert dist.std == pytest.approx(math.sqrt(8.25))  # population std, as np.std
    assert dist.at(99.9) == pytest.approx(9.991)
    assert [p for p, _ in dist.percentiles] == [50.0, 90.0, 95.0, 99.0, 99.9]


def test_empty_samples_give_none_not_zero() -> None:
    assert describe([]) is None
    s = summarize([record(error="boom", chunks=())], duration_s=1.0)
    assert s.completed == 0 and s.failed == 1
    assert s.ttft is None and s.tpot is None and s.itl is None and s.e2el is None


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=50), st.floats(0, 100), st.floats(0, 100))
def test_percentile_is_monotonic_and_bounded(values: list[float], p: float, q: float) -> None:
    values.sort()
    low, high = sorted((p, q))
    assert values[0] <= percentile(values, low) <= percentile(values, high) <= values[-1]


def test_tpot_is_decode_time_over_tokens_after_the_first() -> None:
    long = record(chunks=(0.1, 0.5, 1.0), output=10)  # (1.0 - 0.1) / 9 = 100 ms
    single = record(1, chunks=(0.2,), output=1)  # one token: no TPOT
    s = summarize([long, single], duration_s=2.0)
    assert s.tpot is not None and s.tpot.count == 1
    assert s.tpot.mean == pytest.approx(100.0)
    assert s.ttft is not None and s.ttft.count == 2 and s.ttft.mean == pytest.approx(150.0)
    assert s.e2el is not None and s.e2el.median == pytest.approx(600.0)


def test_itl_is_chunk_gaps_and_per_token_divides_by_the_chunks_tokens() -> None:
    r = record(chunks=(0.1, 0.2, 0.5), tokens=(1, 1, 3), output=5)
    s = summarize([r], duration_s=1.0)
    assert s.itl is not None and s.itl.count == 2
    assert s.itl.mean == pytest.approx(200.0)  # gaps 100 ms and 300 ms
    assert s.itl_per_token is not None
    assert s.itl_per_token.mean == pytest.approx(100.0)  # 100/1 and 300/3
    no_usage = summarize([record(chunks=(0.1, 0.2, 0.5), tokens=None)], duration_s=1.0)
    assert no_usage.itl_per_token is None


def test_throughputs_use_the_server_usage_and_the_measured_duration() -> None:
    records = [record(i, prompt=100, output=50, chunks=(0.1, 0.2)) for i in range(4)] + [record(9, error="500")]
    s = summarize(records, duration_s=2.0)
    assert (s.completed, s.failed) == (4, 1)
    assert s.total_input_tokens == 400 and s.total_output_tokens == 200
    assert s.request_throughput == pytest.approx(2.0)
    assert s.output_throughput == pytest.approx(100.0)
    assert s.total_token_throughput == pytest.approx(300.0)
    assert s.token_source == "usage"
    assert dict(s.errors) == {"server_error": 1}


def test_without_usage_tokens_are_counted_as_chunks_and_labelled() -> None:
    records = [record(i, prompt=None, output=None, chunks=(0.1, 0.2, 0.3, 0.4)) for i in range(2)]
    s = summarize(records, duration_s=1.0)
    assert s.token_source == "chunks" and s.requests_without_usage == 2
    assert s.total_output_tokens == 8  # 4 text chunks each, never the requested length
    assert s.total_input_tokens == 0
    level = Level(LevelResult(LoadSpec(concurrency=1), tuple(records), (), 1.0), s)
    text = console_report(level, RunInfo(model="m", dataset="random"))
    assert "COUNTED AS TEXT CHUNKS" in text
    assert result_json(level, RunInfo(model="m", dataset="random"))["token_source"] == "chunks"
    mixed = summarize([records[0], record(5, output=3)], duration_s=1.0)
    assert mixed.token_source == "mixed" and mixed.requests_without_usage == 1


def test_goodput_counts_only_successes_within_every_slo() -> None:
    fast = record(0, chunks=(0.05, 0.10, 0.15), output=3)  # ttft 50, tpot 50, e2el 150
    slow_first = record(1, chunks=(0.5, 0.55, 0.6), output=3)  # ttft 500
    failed = record(2, chunks=(0.01, 0.02), error="HTTP 500")
    s = summarize([fast, slow_first, failed], duration_s=2.0, goodput={"ttft": 100, "tpot": 60})
    assert s.good_requests == 1
    assert s.request_goodput == pytest.approx(0.5)
    assert summarize([fast], duration_s=1.0).request_goodput is None
    with pytest.raises(ConfigError, match="goodput metrics must be among"):
        summarize([fast], duration_s=1.0, goodput={"latency": 1})


def test_client_warnings_name_the_figures() -> None:
    late = [record(i, sent=i * 0.1 + 0.05, scheduled=i * 0.1) for i in range(10)]  # 50 ms late each
    s = summarize(late, duration_s=2.0, clients=[ClientLoad(0, (0.001,) * 10, cpu_s=0.2, wall_s=2.0)])
    assert s.client_limited and "50.0 ms" in s.client_warnings[0]
    busy = summarize([record()], duration_s=1.0, clients=[ClientLoad(0, (0.0,), cpu_s=CPU_LIMIT, wall_s=1.0)])
    assert busy.client_limited and "of one CPU core" in busy.client_warnings[0]
    # Canary samples read with the chunks, 30 ms late each: 30 of the 100 ms TTFT are the client's.
    lagging = summarize([record()], duration_s=1.0, clients=[ClientLoad(0, (0.03,) * 3, cpu_s=0.1, wall_s=1.0,
                                                                        read_times_s=(0.1, 0.2, 0.3))])  # fmt: skip
    assert lagging.client_limited and "30.0 ms of each TTFT (30% of the mean)" in lagging.client_warnings[0]
    # Queueing for a max-concurrency slot is intended, not client lag.
    queued = [record(i, sent=1.0, scheduled=0.0, queue=1.0) for i in range(5)]
    assert not summarize(queued, duration_s=2.0).client_limited
    # A burst (rate inf, no cap) is sent one by one by definition: its spread is not flagged.
    burst = [record(i, sent=i * 0.05, scheduled=0.0) for i in range(5)]
    assert not summarize(burst, duration_s=1.0).client_limited


def test_peak_concurrency_and_peak_tokens_per_second() -> None:
    records = [record(0, sent=0.0, chunks=(0.1, 0.5)), record(1, sent=0.2, chunks=(0.1, 0.2)),
               record(2, sent=2.0, chunks=(0.1,))]  # fmt: skip
    s = summarize(records, duration_s=3.0)
    assert s.max_concurrent_requests == 2
    assert s.max_output_tokens_per_s == 4.0  # chunks at 0.1, 0.5, 0.3, 0.4 all fall in second 0


def test_result_json_uses_vllm_field_names() -> None:
    s = summarize([record(i) for i in range(3)], duration_s=1.0)
    data: dict[str, Any] = result_json(Level(LevelResult(LoadSpec(concurrency=4), (), (), 1.0), s),
                                       RunInfo(model="m", dataset="random"))  # fmt: skip
    for key in ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
                "request_throughput", "output_throughput", "total_token_throughput", "max_concurrency",
                "request_rate", "burstiness", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms",
                "p99.9_ttft_ms", "p90_tpot_ms", "p95_itl_ms", "p50_e2el_ms"):  # fmt: skip
        assert key in data, key
    assert data["max_concurrency"] == 4 and data["request_rate"] == "inf"


def test_each_endpoint_is_summarized_on_its_own_and_the_parts_add_up() -> None:
    records = [record(0, endpoint="a", output=3), record(1, endpoint="b", output=5, chunks=(0.2, 0.4)),
               record(2, endpoint="a", error="HTTP 500"), record(3, endpoint=None, error="all down")]  # fmt: skip
    s = summarize(records, duration_s=2.0, endpoints=("a", "b", "c"))
    # In the order given, a server that got nothing included, then what reached no server.
    assert [e.url for e in s.endpoints] == ["a", "b", "c", None]
    a, b, c, none = (e.summary for e in s.endpoints)
    assert (a.completed, a.failed, b.completed, c.completed, none.failed) == (1, 1, 1, 0, 1)
    assert sum(e.summary.completed + e.summary.failed for e in s.endpoints) == len(records)
    assert a.output_throughput == pytest.approx(1.5) and b.output_throughput == pytest.approx(2.5)  # level duration
    assert b.ttft is not None and b.ttft.mean == pytest.approx(200.0) and c.ttft is None
    level = Level(LevelResult(LoadSpec(concurrency=2), tuple(records), (), 2.0), s)
    data = result_json(level, RunInfo(model="m", dataset="random"))
    assert [(e["base_url"], e["requests"], e["failed"]) for e in data["endpoints"]] == [
        ("a", 2, 1), ("b", 1, 0), ("c", 0, 0), (None, 1, 1)]  # fmt: skip
    assert data["endpoints"][1]["median_e2el_ms"] == pytest.approx(400.0)
    assert data["endpoints"][2]["mean_ttft_ms"] is None
    lines = console_report(level, RunInfo(model="m", dataset="random")).splitlines()
    start = next(i for i, line in enumerate(lines) if "Per endpoint" in line) + 2  # past the column names
    table = lines[start : start + 4]
    assert [line.split()[:3] for line in table] == [["a", "2", "1"], ["b", "1", "0"], ["c", "0", "0"],
                                                    ["(no", "server)", "1"]]  # fmt: skip


def test_one_endpoint_is_the_whole_level_without_a_breakdown() -> None:
    records = [record(i, endpoint="a") for i in range(3)]
    s = summarize(records, duration_s=1.0, endpoints=("a",))
    ((url, part),) = ((e.url, e.summary) for e in s.endpoints)
    assert url == "a" and part.completed == 3 and part.output_throughput == s.output_throughput
    level = Level(LevelResult(LoadSpec(concurrency=2), tuple(records), (), 1.0), s)
    assert "Per endpoint" not in console_report(level, RunInfo(model="m", dataset="random"))
    assert summarize(records, duration_s=1.0).endpoints == ()


def test_a_duration_with_an_unlimited_rate_needs_a_cap() -> None:
    from batchgen.errors import ConfigError

    with pytest.raises(ConfigError, match="without bound"):
        LoadSpec(num_prompts=None, duration_s=5.0)
    assert LoadSpec(num_prompts=None, duration_s=5.0, max_concurrency=4).max_concurrency == 4

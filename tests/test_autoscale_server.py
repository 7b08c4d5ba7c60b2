"""Concurrency auto against the mock server's capacity model (a known knee), in-process: it converges,
preemptions stop, it backs off on 429, it works without /metrics, and two clients share fairly."""

from __future__ import annotations

import asyncio
import gc
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen import ClientPool
from batchgen.autoscale import AutoConcurrency
from batchgen.config import load_config
from batchgen.pipeline import EXIT_OK, run_async
from batchgen.testing.mock_server import MockConfig, MockServer

FAST = AutoConcurrency(min=1, max=512, start=8, interval=0.2)  # decisions 5x a second: tests stay short
BODY = {"model": "mock-model", "max_tokens": 200}


@pytest.fixture(autouse=True)
def _no_full_collections_of_the_suites_heap() -> Iterator[None]:
    """Keep what earlier tests left on the heap out of the garbage collector's full collections.

    After the rest of the suite (Ray, the real server's tests, ...) the process holds some 300k
    objects, and a full collection stops the one event loop that runs the client(s) and the mock for
    about 0.2 s: a whole tick at FAST's 0.2 s. In the first second that tick reads as "the client is
    CPU-bound" (a hold) or as tokens/s not rising, and either ends the slow start early: the limit
    then creeps to the KV edge by sqrt steps and preempts late instead of at once, or two clients
    leave the slow start at different limits, a split their queue holds keep. With the heap frozen,
    a collection only walks this test's own objects.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _drive(pool: ClientPool, seconds: float, workers: int = 200, shortest: int = 8) -> int:
    """Keep `workers` requests wanting to go for `seconds` (more than any limit the tests reach, fewer
    than the pool's 512, so the tail after the deadline stays short). The mock echoes the prompt, so
    prompts of `shortest` to `shortest` + 16 words give answers as long: the server's batch does not
    finish in lockstep. Returns the answers."""
    deadline = time.monotonic() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            words = shortest + (done * 7) % 17
            await pool.request({**BODY, "messages": [{"role": "user", "content": " ".join(["w"] * words)}]})
            done += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return done


async def test_it_converges_to_the_servers_batch_with_a_small_queue() -> None:
    async with MockServer(MockConfig(batch_slots=64, kv_tokens=64 * 64)) as server:
        async with ClientPool([server.url], concurrency=FAST) as pool:
            await _drive(pool, 6.0)
            controller = pool.endpoints[0].controller
    assert controller is not None
    late = [tick for tick in controller.timeline if tick.t >= 3.0]
    limits = sorted(tick.limit for tick in late)
    assert 60 <= limits[len(limits) // 2] <= 110, controller.timeline  # the knee is 64 running, plus a queue
    full = [tick for tick in late if tick.running is not None and tick.running >= 56]
    assert len(full) >= 0.7 * len(late), controller.timeline  # the batch stays (nearly) full
    assert server.state.preemptions == 0


async def test_past_the_kv_cache_preemptions_stop_after_it_backs_off() -> None:
    """256 slots but KV for about 64 requests of 64-word prompts and answers: more in flight
    preempts. Without the KV start (the request size unknown), the slow start overshoots into
    preemptions; the controller must back off below them and stay there."""
    async with MockServer(MockConfig(batch_slots=256, kv_tokens=64 * 130)) as server:
        async with ClientPool([server.url], concurrency=FAST) as pool:
            controller = pool.endpoints[0].controller
            assert controller is not None
            controller._request_tokens = lambda: None  # no jump to the KV estimate: find the edge
            await _drive(pool, 5.0, shortest=56)
            at_half = server.state.preemptions
            await _drive(pool, 4.0, shortest=56)
    decisions = [tick.decision for tick in controller.timeline]
    assert at_half > 0 and any("running: x0.75" in d for d in decisions), decisions
    late = server.state.preemptions - at_half
    assert late <= max(3, at_half // 10), (at_half, late, controller.timeline)


async def test_429s_with_retry_after_cut_the_limit() -> None:
    config = MockConfig(batch_slots=64, fault_rate=0.2, faults=("429",), retry_after_s=0.05)
    async with MockServer(config) as server:
        async with ClientPool([server.url], concurrency=FAST, max_retries=20) as pool:
            await _drive(pool, 2.0)
            controller = pool.endpoints[0].controller
    assert controller is not None
    cuts = [tick for tick in controller.timeline if "429/503: x0.5" in tick.decision]
    assert cuts and max(tick.limit for tick in controller.timeline) <= 64
    assert server.state.max_running <= 64


async def test_without_metrics_it_grows_on_full_slots_and_backs_off_on_429s() -> None:
    async with MockServer(MockConfig(batch_slots=32, fault_rate=0.05, faults=("429",), retry_after_s=0.01)) as server:
        events: list[str] = []
        async with ClientPool([server.url], concurrency=FAST, max_retries=20, on_event=events.append) as pool:
            endpoint = pool.endpoints[0]

            async def no_metrics(url: str) -> None:
                return None  # a hosted API or a proxy: no /metrics

            endpoint.client.get_text = no_metrics  # type: ignore[method-assign]
            await _drive(pool, 3.0)
            controller = endpoint.controller
    assert controller is not None and controller.metrics is False
    assert any("no vLLM /metrics" in e for e in events)
    decisions = [tick.decision for tick in controller.timeline]
    assert any("slow start" in d for d in decisions) and any("429/503" in d for d in decisions)
    assert all(tick.running is None for tick in controller.timeline)


async def test_two_clients_on_one_server_converge_to_a_fair_share() -> None:
    async with MockServer(MockConfig(batch_slots=64, kv_tokens=64 * 64)) as server:
        async with ClientPool([server.url], concurrency=FAST) as first, ClientPool([server.url], concurrency=FAST) as second:
            done = await asyncio.gather(_drive(first, 8.0), _drive(second, 8.0))
            a, b = first.endpoints[0].controller, second.endpoints[0].controller
    assert a is not None and b is not None
    late_a = [t.limit for t in a.timeline if t.t >= 5.0]
    late_b = [t.limit for t in b.timeline if t.t >= 5.0]
    mean_a, mean_b = sum(late_a) / len(late_a), sum(late_b) / len(late_b)
    assert 0.5 <= mean_a / mean_b <= 2.0, (late_a, late_b)
    assert 0.5 <= done[0] / done[1] <= 2.0, done
    assert 48 <= mean_a + mean_b <= 140, (mean_a, mean_b)  # together they fill the server's 64, with a queue


async def test_a_run_with_concurrency_auto_shows_its_timeline(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"p {i}" for i in range(600)]}), path)
    async with MockServer(MockConfig(batch_slots=32, kv_tokens=32 * 48)) as server:
        cfg = load_config({"input": str(path), "output": str(tmp_path / "out.parquet"), "base_url": server.url,
                           "concurrency": {"min": 2, "max": 100}, "max_tokens": 16, "progress": False})  # fmt: skip
        assert cfg.concurrency == "auto" and (cfg.concurrency_min, cfg.concurrency_max) == (2, 100)
        result = await run_async(cfg, log=io.StringIO())
    assert result.exit_code == EXIT_OK, result.message
    summary = result.stats.summary(str(tmp_path / "out.parquet"))
    assert f"concurrency auto at {server.url}" in summary and "decision" in summary

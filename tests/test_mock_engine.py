"""The mock server's capacity model (batch slots, KV budget, queue, preemption) and its /metrics page.

Timing is only compared, never measured against a figure: waits are bounded polls on a condition.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from batchgen import Client
from batchgen.testing import MockConfig, MockServer, add_arguments, mock_server_thread
from batchgen.testing.mock_engine import BLOCK_SIZE, Capacity
from batchgen.testing.mock_replies import generation_steps, plan_chat, stream_events
from batchgen.testing.mock_server import _config_from_args, _stream_steps

from .conftest import StartServer

Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]

NAMES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_requests_waiting_by_reason",
    "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total",
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:cache_config_info",
)
COUNTERS = ("vllm:num_preemptions_total", "vllm:generation_tokens_total", "vllm:prompt_tokens_total")
FAST = {"step_ms": 2.0, "step_ms_per_request": 0.05}  # quick steps for tests that only count
POLL_LIMIT_S = 20.0


def body(i: int, tokens: int = 20, *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    """A request whose answer is exactly `tokens` tokens (ignore_eos), with a 3-token prompt."""
    messages = [{"role": "user", "content": f"hello number {i}"}]
    options = {"max_tokens": tokens, "ignore_eos": True, "stream": stream}
    return {"model": "mock-model", "messages": messages, **options, **extra}


def same_answer(raw: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', raw)




def root(server: MockServer) -> str:
    return server.url.removesuffix("/v1")


async def post(session: aiohttp.ClientSession, server: MockServer, payload: dict[str, Any]) -> tuple[int, bytes]:
    async with session.post(f"{server.url}/chat/completions", json=payload) as resp:
        return resp.status, await resp.read()


def parse_metrics(text: str) -> tuple[Scrape, dict[str, str]]:
    """Samples keyed by (name, labels) and the TYPE of each family."""
    samples: Scrape = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+)", line)
        assert match, line
        name, label_text, value = match.groups()
        labels = frozenset(re.findall(r'([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"', label_text))
        samples[(name, labels)] = float(value)
    return samples, types


async def scrape(session: aiohttp.ClientSession, server: MockServer) -> Scrape:
    async with session.get(f"{root(server)}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_metrics(await resp.text())[0]


def total(samples: Scrape, name: str, **where: str) -> float:
    wanted = set(where.items())
    return sum(v for (n, labels), v in samples.items() if n == name and wanted <= labels)


def per_engine(samples: Scrape, name: str, engine: str) -> float:
    return total(samples, name, engine=engine)


async def poll(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until `condition()` holds, checking every few ms; fail after POLL_LIMIT_S."""
    deadline = time.monotonic() + POLL_LIMIT_S
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def reference(
    session: aiohttp.ClientSession, start_server: StartServer, payloads: list[dict[str, Any]]
) -> list[bytes]:
    """The answers of a mock without the capacity model, to compare bodies with."""
    plain = await start_server()
    answers = [await post(session, plain, p) for p in payloads]
    assert all(status == 200 for status, _ in answers)
    return [same_answer(raw) for _, raw in answers]


# ---------------------------------------------------------------- queue and slots


async def test_requests_beyond_the_slots_wait(session: aiohttp.ClientSession, start_server: StartServer) -> None:
    server = await start_server(batch_slots=4, **FAST)
    payloads = [body(i, 30, stream=i % 3 == 0) for i in range(20)]
    tasks = [asyncio.create_task(post(session, server, p)) for p in payloads]
    seen_running: list[float] = []

    async def queue_seen() -> bool:
        samples = await scrape(session, server)
        seen_running.append(total(samples, "vllm:num_requests_running"))
        waiting = total(samples, "vllm:num_requests_waiting")
        assert total(samples, "vllm:num_requests_waiting_by_reason", reason="capacity") == waiting
        assert total(samples, "vllm:num_requests_waiting_by_reason", reason="deferred") == 0
        return waiting > 0

    await poll(queue_seen, "a waiting request")
    answers = await asyncio.gather(*tasks)
    assert [same_answer(raw) for _, raw in answers] == await reference(session, start_server, payloads)
    assert max(seen_running) <= 4
    assert server.state.max_running == 4 and server.state.max_waiting > 0
    assert server.state.preemptions == 0 and server.state.in_flight == 0
    samples = await scrape(session, server)
    assert total(samples, "vllm:num_requests_running") == total(samples, "vllm:num_requests_waiting") == 0


async def test_a_queued_stream_gets_its_first_token_after_the_queue(
    session: aiohttp.ClientSession, start_server: StartServer
) -> None:
    server = await start_server(batch_slots=1, **FAST)

    async def chunk_times(i: int) -> list[float]:
        times = []
        async with session.post(f"{server.url}/chat/completions", json=body(i, 10, stream=True)) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {") and b'"content":"' in line and b'"role"' not in line:
                    times.append(time.monotonic())
        return times

    first, second = await asyncio.gather(chunk_times(0), chunk_times(1))
    assert len(first) == len(second) == 10
    early, late = sorted([first, second])  # whichever was admitted first
    assert late[0] >= early[-1]  # one slot: the second one's TTFT includes the whole first request


async def test_a_client_that_hangs_up_frees_its_slot(session: aiohttp.ClientSession, start_server: StartServer) -> None:
    server = await start_server(batch_slots=1, **FAST)
    long = asyncio.create_task(post(session, server, body(0, 8000)))  # ~16 s of steps if it ran to the end

    async def running(n: int) -> bool:
        return total(await scrape(session, server), "vllm:num_requests_running") == n

    await poll(lambda: running(1), "the long request to run")
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long
    status, raw = await post(session, server, body(1, 5))
    assert status == 200 and orjson.loads(raw)["usage"]["completion_tokens"] == 5
    await poll(lambda: running(0), "the slot to be free")


# ---------------------------------------------------------------- KV budget and preemption


async def _burst(session: aiohttp.ClientSession, server: MockServer, payloads: list[dict[str, Any]]) -> list[bytes]:
    answers = await asyncio.gather(*(post(session, server, p) for p in payloads))
    assert [status for status, _ in answers] == [200] * len(payloads)
    return [same_answer(raw) for _, raw in answers]


async def test_a_small_kv_budget_preempts_and_every_answer_stays_whole(
    session: aiohttp.ClientSession, start_server: StartServer
) -> None:
    # 16 requests of 3 prompt + 60 answer tokens need 1008 KV tokens at the end; 300 hold about 4 of them.
    server = await start_server(batch_slots=16, kv_tokens=300, **FAST)
    payloads = [body(i, 60, stream=i % 2 == 0) for i in range(16)]
    answers = await _burst(session, server, payloads)
    assert answers == await reference(session, start_server, payloads)
    assert server.state.preemptions > 0
    samples = await scrape(session, server)
    assert total(samples, "vllm:num_preemptions_total") == server.state.preemptions
    # Preempted requests restart from zero: more tokens were computed than answered.
    assert total(samples, "vllm:generation_tokens_total") > 16 * 60


async def test_a_big_kv_budget_never_preempts(session: aiohttp.ClientSession, start_server: StartServer) -> None:
    server = await start_server(batch_slots=16, kv_tokens=100_000, **FAST)
    payloads = [body(i, 60, stream=i % 2 == 0) for i in range(16)]
    assert await _burst(session, server, payloads) == await reference(session, start_server, payloads)
    samples = await scrape(session, server)
    assert server.state.preemptions == 0 and total(samples, "vllm:num_preemptions_total") == 0
    assert total(samples, "vllm:generation_tokens_total") == 16 * 60
    assert total(samples, "vllm:prompt_tokens_total") == 16 * 3


async def test_a_request_that_can_never_fit_is_refused(
    session: aiohttp.ClientSession, start_server: StartServer
) -> None:
    server = await start_server(kv_tokens=64, **FAST)
    async with session.post(
        f"{server.url}/chat/completions", json=body(0, 62), headers={"x-mock-faults": "500"}
    ) as resp:
        assert resp.status == 400  # checked before faults, like every validation error
        error = (await resp.json())["error"]
    assert error["param"] == "max_tokens" and error["type"] == "BadRequestError"
    assert "65 tokens of KV cache" in error["message"] and "holds 64 tokens" in error["message"]
    assert server.state.faults_injected == {}
    status, _ = await post(session, server, body(1, 61))  # 3 + 61 = 64 fits exactly
    assert status == 200


# ---------------------------------------------------------------- /metrics


async def test_metrics_name_every_engine_and_counters_only_grow(
    session: aiohttp.ClientSession, start_server: StartServer
) -> None:
    server = await start_server(models=["m-a", "m-b"], engines=2, batch_slots=2, kv_tokens=1000, **FAST)
    payloads = [{**body(i, 25, stream=i % 2 == 1), "model": "m-b"} for i in range(12)]
    burst = asyncio.create_task(_burst(session, server, payloads))
    scrapes: list[Scrape] = []
    while not burst.done():
        async with session.get(f"{root(server)}/metrics") as resp:
            text = await resp.text()
        samples, types = parse_metrics(text)
        scrapes.append(samples)
        for name in NAMES:
            kind = "counter" if name in COUNTERS else "gauge"
            assert types[name] == kind and f"# HELP {name} " in text
            for engine in ("0", "1"):
                # model_name is the first (base) model, as vLLM's served name.
                wanted = {("engine", engine), ("model_name", "m-a")}
                found = [k for k in samples if k[0] == name and wanted <= k[1]]
                assert found, (name, engine)
        for (name, labels), value in samples.items():
            if name == "vllm:kv_cache_usage_perc":
                assert 0.0 <= value <= 1.0
            if name == "vllm:num_requests_running":
                assert value <= 2
        await asyncio.sleep(0.01)
    await burst
    scrapes.append(await scrape(session, server))
    for before, after in zip(scrapes, scrapes[1:]):
        for key, value in before.items():
            if key[0] in COUNTERS:
                assert after[key] >= value, key
    last = scrapes[-1]
    infos = [dict(labels) for (name, labels), value in last.items() if name == "vllm:cache_config_info"]
    assert sorted(info["engine"] for info in infos) == ["0", "1"]
    for info in infos:
        assert info["num_gpu_blocks"] == str(1000 // BLOCK_SIZE) and info["block_size"] == "16"
        assert info["cache_dtype"] == "auto" and info["gpu_memory_utilization"] == "0.9"
    assert all(value == 1.0 for (name, _), value in last.items() if name == "vllm:cache_config_info")
    assert total(last, "vllm:generation_tokens_total") == 12 * 25
    assert total(last, "vllm:prompt_tokens_total") == 12 * 3
    # Both engines took work (the least loaded gets each request).
    assert per_engine(last, "vllm:prompt_tokens_total", "0") > 0
    assert per_engine(last, "vllm:prompt_tokens_total", "1") > 0
    assert len(scrapes) > 2  # the loop saw the burst in flight


async def test_metrics_with_the_capacity_model_off(session: aiohttp.ClientSession, start_server: StartServer) -> None:
    server = await start_server(latency_ms=400)
    samples = await scrape(session, server)
    assert {name for name, _ in samples} == set(NAMES)
    info = next(dict(labels) for (name, labels) in samples if name == "vllm:cache_config_info")
    assert info["num_gpu_blocks"] == "None" and info["engine"] == "0"
    slow = asyncio.create_task(post(session, server, body(0, 7)))

    async def one_running() -> bool:
        return total(await scrape(session, server), "vllm:num_requests_running") == 1

    await poll(one_running, "the slow request to be counted as running")
    status, raw = await slow
    assert status == 200
    samples = await scrape(session, server)
    assert total(samples, "vllm:num_requests_running") == 0 and total(samples, "vllm:num_requests_waiting") == 0
    assert total(samples, "vllm:kv_cache_usage_perc") == 0
    assert total(samples, "vllm:generation_tokens_total") == 7 and total(samples, "vllm:prompt_tokens_total") == 3
    async with session.post(f"{root(server)}/mock/capacity", json={"batch_slots": 2}) as resp:
        assert resp.status == 400 and "capacity model is off" in (await resp.json())["error"]["message"]
    with pytest.raises(RuntimeError):
        server.set_capacity(batch_slots=2)


# ---------------------------------------------------------------- timing


async def _mean_gap(session: aiohttp.ClientSession, server: MockServer, tokens: int) -> float:
    times = []
    async with session.post(f"{server.url}/chat/completions", json=body(99, tokens, stream=True)) as resp:
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"delta":{"content"' in line:
                times.append(time.monotonic())
    assert len(times) == tokens
    return (times[-1] - times[0]) / (tokens - 1)


async def test_per_token_time_grows_with_the_batch(session: aiohttp.ClientSession, start_server: StartServer) -> None:
    server = await start_server(batch_slots=64, step_ms=1.0, step_ms_per_request=0.5)
    alone = await _mean_gap(session, server, 20)  # steps of 1.5 ms
    background = [asyncio.create_task(post(session, server, body(i, 60))) for i in range(31)]

    async def busy() -> bool:
        return total(await scrape(session, server), "vllm:num_requests_running") == 31

    await poll(busy, "31 running requests")
    crowded = await _mean_gap(session, server, 20)  # steps of 17 ms while the 31 still run
    assert server.state.max_running == 32
    assert crowded > alone
    await asyncio.gather(*background)


# ---------------------------------------------------------------- changing capacity


async def test_post_capacity_halves_the_slots(session: aiohttp.ClientSession, start_server: StartServer) -> None:
    server = await start_server(batch_slots=8, **FAST)
    burst = asyncio.create_task(_burst(session, server, [body(i, 40) for i in range(40)]))

    async def running_is(check: Callable[[float], bool]) -> bool:
        return check(total(await scrape(session, server), "vllm:num_requests_running"))

    await poll(lambda: running_is(lambda n: n == 8), "8 running requests")
    async with session.post(f"{root(server)}/mock/capacity", json={"batch_slots": 4}) as resp:
        assert resp.status == 200 and await resp.json() == {"batch_slots": 4, "kv_tokens": None}
    async with session.get(f"{root(server)}/mock/capacity") as resp:
        assert await resp.json() == {"batch_slots": 4, "kv_tokens": None}
    await poll(lambda: running_is(lambda n: n <= 4), "the running count to fall to 4")
    while not burst.done():  # from then on it never goes above the new slots
        assert await running_is(lambda n: n <= 4)
        await asyncio.sleep(0.01)
    await burst
    assert server.state.max_running == 8 and server.state.preemptions == 0


async def test_a_smaller_kv_budget_preempts_running_requests(
    session: aiohttp.ClientSession, start_server: StartServer
) -> None:
    server = await start_server(batch_slots=16, kv_tokens=10_000, **FAST)
    payloads = [body(i, 80, stream=i % 2 == 0) for i in range(16)]
    burst = asyncio.create_task(_burst(session, server, payloads))

    async def all_running() -> bool:
        return total(await scrape(session, server), "vllm:num_requests_running") == 16

    await poll(all_running, "16 running requests")
    assert server.set_capacity(kv_tokens=400) == {"batch_slots": 16, "kv_tokens": 400}
    answers = await burst
    assert server.state.preemptions > 0
    assert answers == await reference(session, start_server, payloads)
    info = next(dict(k[1]) for k in await scrape(session, server) if k[0] == "vllm:cache_config_info")
    assert info["num_gpu_blocks"] == str(400 // 16)


async def test_capacity_changes_are_checked(session: aiohttp.ClientSession, start_server: StartServer) -> None:
    server = await start_server(batch_slots=4, kv_tokens=1000)
    for payload in ({"batch_slots": 0}, {"kv_tokens": "many"}, {"slots": 3}, [1]):
        async with session.post(f"{root(server)}/mock/capacity", json=payload) as resp:
            assert resp.status == 400, payload
            assert (await resp.json())["error"]["type"] == "BadRequestError"
    with pytest.raises(ValueError):
        server.set_capacity(batch_slots=0)
    assert server.set_capacity(kv_tokens=None) == {"batch_slots": 4, "kv_tokens": None}  # None: unlimited
    async with session.post(f"{root(server)}/mock/capacity", json={}) as resp:
        assert await resp.json() == {"batch_slots": 4, "kv_tokens": None}


def test_set_capacity_from_another_thread() -> None:
    with mock_server_thread(MockConfig(batch_slots=2, kv_tokens=320)) as server:
        assert server.set_capacity(batch_slots=1) == {"batch_slots": 1, "kv_tokens": 320}
        with urllib.request.urlopen(f"{root(server)}/mock/capacity", timeout=5) as resp:
            assert orjson.loads(resp.read()) == {"batch_slots": 1, "kv_tokens": 320}
        with urllib.request.urlopen(f"{root(server)}/metrics", timeout=5) as resp:
            samples, _ = parse_metrics(resp.read().decode())
        info = next(dict(labels) for (name, labels) in samples if name == "vllm:cache_config_info")
        assert info["num_gpu_blocks"] == "20"


# ---------------------------------------------------------------- config, CLI, plans


def test_config_fields_and_validation() -> None:
    config = MockConfig()
    assert (config.batch_slots, config.kv_tokens, config.engines) == (None, None, 1)
    assert not config.capacity_model
    assert MockConfig(kv_tokens=64).capacity_model and MockConfig(batch_slots=1).capacity_model
    bad: list[dict[str, Any]] = [
        {"batch_slots": 0}, {"kv_tokens": -1}, {"engines": 0}, {"step_ms": -1.0}, {"step_ms_per_request": -0.1},
        {"batch_slots": True},
    ]
    for fields in bad:
        with pytest.raises(ValueError):
            MockConfig(**fields)
    assert Capacity(batch_slots=None, kv_tokens=100).num_gpu_blocks == 6


def test_command_line_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--batch-slots", "64", "--kv-tokens", "6144", "--step-ms", "5", "--step-ms-per-request", "0.2"]
    config = _config_from_args(parser.parse_args([*argv, "--engines", "2"]))
    assert (config.batch_slots, config.kv_tokens, config.step_ms, config.step_ms_per_request, config.engines) == (
        64, 6144, 5.0, 0.2, 2,
    )
    off = _config_from_args(parser.parse_args([]))
    assert not off.capacity_model and (off.step_ms, off.step_ms_per_request, off.engines) == (10.0, 0.1, 1)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"max_tokens": 3},
        {"max_tokens": 5, "ignore_eos": True, "n": 3},
        {"chat_template_kwargs": {"enable_thinking": True}},
        {"chat_template_kwargs": {"enable_thinking": True}, "max_tokens": 4},
        {"tools": TOOLS},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        {"stop": "there"},
        {"stop": ["nothing", "weather"], "logprobs": True, "top_logprobs": 2},
        {"stream_options": {"include_usage": True, "continuous_usage_stats": True}, "stream": True},
    ],
)
def test_generation_steps_are_the_stream_steps(extra: dict[str, Any]) -> None:
    request = {"messages": [{"role": "user", "content": "hello there, what weather today"}], **extra}
    plan = plan_chat(request, models=["m"], output_tokens=None, request_id=None, created=0)
    paced = sum(event.paced for event in stream_events(plan))
    blob, ends = _stream_steps(plan)
    assert generation_steps(plan) == paced == len(ends)
    assert blob == b"".join(event.data for event in stream_events(plan)) and ends[-1] == len(blob)


async def test_batchgen_client_against_the_capacity_model(start_server: StartServer) -> None:
    server = await start_server(batch_slots=8, kv_tokens=8 * 40, **FAST)
    messages = [{"role": "user", "content": "a b c"}]
    async with Client(server.url, max_connections=64) as client:
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(model="mock-model", messages=messages, max_tokens=30, ignore_eos=True)
                for _ in range(40)
            )
        )
    assert all(r.content.split() == ["echo:", *("a b c " * 10).split()][:30] for r in replies)
    assert server.state.max_running == 8 and server.state.max_waiting > 0

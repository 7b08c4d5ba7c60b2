"""Concurrency auto's parts that need no server: reading vLLM's /metrics, and the controller's rules."""

from __future__ import annotations

import threading
import time

import pytest

from batchgen.autoscale import AutoConcurrency, ConcurrencyController
from batchgen.client import Client
from batchgen.endpoints import Endpoint
from batchgen.errors import APITimeoutError, ConfigError, RateLimitError, ServerError
from batchgen.server_metrics import ServerLoad, metrics_url, parse_metrics

SCRAPE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen3"} 2.0
vllm:num_requests_running{engine="1",model_name="qwen3"} 3.0
vllm:num_requests_waiting{engine="0",model_name="qwen3"} 9.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="qwen3",reason="capacity"} 3.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="qwen3",reason="deferred"} 6.0
vllm:kv_cache_usage_perc{engine="0",model_name="qwen3"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="qwen3"} 0.3
vllm:num_preemptions_total{engine="0",model_name="qwen3"} 4.0
vllm:num_preemptions_total{engine="1",model_name="qwen3"} 1.0
vllm:generation_tokens_total{engine="0",model_name="qwen3"} 1.5e+03
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",gpu_memory_utilization="0.9",num_gpu_blocks="2048"} 1.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="1",gpu_memory_utilization="0.9",num_gpu_blocks="1024"} 1.0
vllm:num_requests_running_extra{engine="0"} 100.0
python_gc_objects_collected_total{generation="0"} 7.0
"""


def test_metrics_are_read_by_exact_name_and_summed_over_engines() -> None:
    load = parse_metrics(SCRAPE, at=1.0)
    assert load == ServerLoad(at=1.0, running=5.0, waiting=3.0, kv_usage=pytest.approx(0.4), preemptions=5.0,
                              generation_tokens=1500.0, kv_tokens=(2048 + 1024) * 16)  # fmt: skip


def test_missing_names_are_unknown_not_zero_and_older_names_are_read() -> None:
    load = parse_metrics('vllm:num_requests_running{model_name="m"} 1\nvllm:num_requests_waiting 4\n'
                         'vllm:gpu_cache_usage_perc{model_name="m"} 0.25\n'
                         'vllm:cache_config_info{block_size="16",num_gpu_blocks="None"} 1.0\n')  # fmt: skip
    assert load is not None
    assert (load.waiting, load.kv_usage, load.preemptions, load.generation_tokens, load.kv_tokens) == (4.0, 0.25, None, None, None)


@pytest.mark.parametrize("text", ["", "# only comments\n", 'llamacpp:requests_processing 3\n', "not prometheus at all {{{"])
def test_a_page_without_vllm_load_is_no_load(text: str) -> None:
    assert parse_metrics(text) is None


def test_label_values_may_hold_commas_quotes_and_spaces() -> None:
    text = ('vllm:num_requests_running{engine="0"} 1\n'
            'vllm:num_requests_waiting_by_reason{engine="0",note="a, \\"b\\" c",reason="capacity"} 2\n')  # fmt: skip
    load = parse_metrics(text)
    assert load is not None and load.waiting == 2.0


def test_the_metrics_url_is_at_the_server_root() -> None:
    assert metrics_url("http://h:8000/v1") == "http://h:8000/metrics"
    assert metrics_url("http://h:8000/v1/") == "http://h:8000/metrics"
    assert metrics_url("https://h/openai") == "https://h/openai/metrics"


# ---------------------------------------------------------------- the controller's rules


T0 = time.monotonic() + 1000.0  # the ticks' clock: after the controllers' start, one second apart


def _controller(**settings: int) -> tuple[ConcurrencyController, Endpoint]:
    endpoint = Endpoint(Client("http://h:1/v1"), 512, auto=True)
    controller = ConcurrencyController(endpoint, AutoConcurrency(**settings), request_tokens=lambda: 512.0)
    return controller, endpoint


def _load(at: float, running: float, waiting: float = 0.0, preemptions: float = 0.0, tokens: float = 0.0,
          kv_tokens: int | None = None) -> ServerLoad:  # fmt: skip
    return ServerLoad(at=at, running=running, waiting=waiting, kv_usage=0.5, preemptions=preemptions,
                      generation_tokens=tokens, kv_tokens=kv_tokens)  # fmt: skip


def _full(endpoint: Endpoint) -> None:
    endpoint.in_flight = int(endpoint.limit)


def test_slow_start_doubles_while_tokens_per_second_rise_then_grows_by_sqrt() -> None:
    controller, endpoint = _controller(start=8)
    limits = []
    tokens = 0.0
    for second in range(1, 5):
        _full(endpoint)
        tokens += 100.0 * 2**second  # tokens/s doubles with the limit
        controller.step(_load(second, endpoint.limit, tokens=tokens), T0 + second)
        limits.append(endpoint.limit)
    assert limits == [16, 32, 64, 128]
    _full(endpoint)
    controller.step(_load(5, 128, tokens=tokens + 1600), T0 + 5)  # tokens/s stopped rising: the slow start ends
    assert endpoint.limit == pytest.approx(128 + 128**0.5) and "sqrt" in controller.last_decision
    _full(endpoint)
    controller.step(_load(6, 128, tokens=tokens + 3200), T0 + 6)
    assert endpoint.limit == pytest.approx(128 + 128**0.5 + (128 + 128**0.5) ** 0.5)


def test_no_growth_while_batchgen_itself_is_the_limit() -> None:
    controller, endpoint = _controller(start=64)
    endpoint.in_flight = 20  # the input or the writer cannot keep 64 busy
    controller.step(_load(1, 20), T0 + 1)
    assert endpoint.limit == 64 and "batchgen sends fewer" in controller.last_decision


def _burn(cpu_seconds: float) -> None:
    """Spin until this thread has used `cpu_seconds` of CPU (however loaded the machine is)."""
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


def test_no_growth_while_the_event_loops_thread_is_cpu_bound() -> None:
    controller, endpoint = _controller(start=64)
    _full(endpoint)
    controller.step(_load(1, 64), T0 + 1)
    assert endpoint.limit == 128
    _burn(0.1)  # the thread that takes the ticks (the event loop's) was busy for the whole tick
    _full(endpoint)
    controller.step(_load(1.1, 128), T0 + 1.1)
    assert endpoint.limit == 128 and "CPU-bound" in controller.last_decision


def test_cpu_of_other_threads_does_not_make_the_client_cpu_bound() -> None:
    """A writer thread, Arrow's pool or an in-process mock server's thread run beside the event loop:
    their CPU is not the loop's, and must not stop the growth (the process's CPU would)."""
    controller, endpoint = _controller(start=64)
    _full(endpoint)
    controller.step(_load(1, 64), T0 + 1)
    helper = threading.Thread(target=_burn, args=(0.1,))
    helper.start()
    helper.join()
    _full(endpoint)
    controller.step(_load(1.1, 128), T0 + 1.1)
    assert endpoint.limit > 128 and "CPU-bound" not in controller.last_decision


def test_a_long_queue_shrinks_the_limit_and_a_short_one_holds_it() -> None:
    controller, endpoint = _controller(start=128)
    _full(endpoint)
    controller.step(_load(1, running=96, waiting=32), T0 + 1)
    assert endpoint.limit == pytest.approx(128 * (96 + 4.8) / (96 + 32))
    _full(endpoint)
    before = endpoint.limit
    controller.step(_load(2, running=96, waiting=5), T0 + 2)
    assert endpoint.limit == before and controller.last_decision == "queue 5: hold"


def test_preemptions_shrink_the_limit_and_it_does_not_grow_back_to_where_they_began() -> None:
    controller, endpoint = _controller(start=100)
    controller.step(_load(1, running=100, preemptions=10), T0 + 1)  # nothing in flight yet: hold
    _full(endpoint)
    controller.step(_load(2, running=100, preemptions=13), T0 + 2)
    assert endpoint.limit == 75 and "3 preemptions at 100 running" in controller.last_decision
    endpoint.in_flight = 100  # the cut (to 75) has not drained yet: more preemptions do not cut again
    controller.step(_load(3, running=100, preemptions=15), T0 + 3)
    assert endpoint.limit == 75 and "still draining" in controller.last_decision
    for second in range(4, 30):
        _full(endpoint)
        controller.step(_load(second, running=endpoint.limit, preemptions=13), T0 + second)
    assert endpoint.limit <= 90  # 0.9 x the limit that preempted


@pytest.mark.parametrize(("error", "factor"), [(RateLimitError(429, "slow down"), 0.5), (ServerError(503, "busy"), 0.5),
                                               (APITimeoutError("slow"), 0.7)])  # fmt: skip
def test_the_server_pushing_back_cuts_the_limit(error: Exception, factor: float) -> None:
    controller, endpoint = _controller(start=100)
    endpoint.failed(error, 0.0)  # type: ignore[arg-type]
    endpoint.failed(error, 0.0)  # type: ignore[arg-type]
    assert endpoint.limit == 100  # with auto, the controller decides, once per tick
    _full(endpoint)
    controller.step(None, T0 + 1)
    assert endpoint.limit == pytest.approx(100 * factor)


def test_the_start_jumps_to_what_fits_in_the_kv_cache() -> None:
    controller, endpoint = _controller(start=8)
    controller.step(_load(1, running=8, kv_tokens=65536), T0 + 1)
    assert endpoint.limit == 128 and "65536 KV tokens / 512 per request" in controller.last_decision


def test_without_metrics_a_ttft_rise_shrinks_the_limit() -> None:
    controller, endpoint = _controller(start=64)
    endpoint.ttft_sum, endpoint.ttft_count = 0.1 * 50, 50  # 100 ms: the floor
    _full(endpoint)
    controller.step(None, T0 + 1)
    assert endpoint.limit == 128  # slow start
    endpoint.ttft_sum, endpoint.ttft_count = endpoint.ttft_sum + 1.0 * 50, 100  # 1 s: queueing
    _full(endpoint)
    controller.step(None, T0 + 2)
    assert endpoint.limit == 64 and "TTFT 1000 ms > 202 ms: x0.50" in controller.last_decision  # at most halved


def test_the_limit_stays_within_min_and_max() -> None:
    controller, endpoint = _controller(min=10, max=40, start=30)
    _full(endpoint)
    controller.step(_load(1, running=30), T0 + 1)
    assert endpoint.limit == 40
    for second in range(2, 10):
        endpoint.failed(RateLimitError(429, "x"), 0.0)
        controller.step(None, T0 + second)
    assert endpoint.limit == 10
    assert [tick.limit for tick in controller.timeline][:2] == [40, 20]


def test_when_the_kv_cache_shrinks_the_cut_is_from_what_ran_not_from_the_limit() -> None:
    controller, endpoint = _controller(start=67)
    controller.step(_load(1, running=64, preemptions=0), T0 + 1)
    endpoint.in_flight = 60  # the server's KV cache halved: only 41 run, and they preempt
    controller.step(_load(2, running=41, waiting=19, preemptions=39), T0 + 2)
    assert endpoint.limit == pytest.approx(0.75 * 41) and "39 preemptions at 41 running" in controller.last_decision


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ConfigError, match="min <= max"):
        AutoConcurrency(min=10, max=5)

"""`ClientPool`: several servers as one client, against in-process mock servers (dispatch, failover,
ejection, re-admission, giving up), and the run's side of it (config, model check, `endpoint` column)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen import ClientPool
from batchgen.config import load_config
from batchgen.endpoints import EndpointSpec, EndpointState
from batchgen.errors import APIConnectionError, ConfigError, NotFoundError
from batchgen.pipeline import EXIT_OK, run_async
from batchgen.testing.mock_server import MockConfig, MockServer

HI = [{"role": "user", "content": "Hi"}]



def _body(text: str = "Hi", **fields: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": [{"role": "user", "content": text}], **fields}


async def test_the_pool_spreads_requests_and_never_exceeds_a_servers_concurrency() -> None:
    async with MockServer(MockConfig(latency_ms=20)) as a, MockServer(MockConfig(latency_ms=20)) as b:
        specs = [EndpointSpec(url=a.url, concurrency=3), EndpointSpec(url=b.url)]
        async with ClientPool(specs, concurrency=5) as pool:
            assert pool.capacity == 8
            replies = await asyncio.gather(*(pool.request(_body(f"q{i}")) for i in range(80)))
    assert [r.content for r in replies] == [f"echo: q{i}" for i in range(80)]
    assert a.state.max_in_flight <= 3 and b.state.max_in_flight <= 5
    rows = {e.url: e.rows for e in pool.endpoints}
    assert rows[a.url] + rows[b.url] == 80 and rows[a.url] > 0 and rows[b.url] > 0
    assert len(a.state.requests) + len(b.state.requests) == 80  # each request sent once


async def test_a_slower_server_gets_proportionally_fewer_requests() -> None:
    """Both servers full (the pool holds 2 × 4); one answers 5x slower, so it frees its slots 5x slower."""
    async with MockServer(MockConfig(latency_ms=10)) as fast, MockServer(MockConfig(latency_ms=50)) as slow:
        async with ClientPool([fast.url, slow.url], concurrency=4) as pool:
            gate = asyncio.Semaphore(pool.capacity)

            async def one(i: int) -> None:
                async with gate:
                    await pool.request(_body(f"q{i}"))

            await asyncio.gather(*(one(i) for i in range(300)))
    share = len(slow.state.requests) / 300
    assert 1 / 6 * 0.5 < share < 1 / 6 * 1.5, share  # expected 1/6; the tolerance is ±50% of it


async def test_least_outstanding_work_is_weighed_in_tokens_not_requests() -> None:
    async with ClientPool(["http://a:1/v1", "http://b:1/v1"], concurrency=10) as pool:
        a, b = pool.endpoints
        a.in_flight, a.outstanding = 1, 8000.0  # one long reasoning request
        b.in_flight, b.outstanding = 5, 500.0  # five short ones
        assert pool._pick(100.0, None) is b
        b.weight = 0.01  # a much slower slot
        assert pool._pick(100.0, None) is a
        assert pool._pick(100.0, a) is b  # a retry avoids the server that just failed


async def test_a_dead_server_is_ejected_and_its_rows_succeed_elsewhere(dead_url: Callable[[], str]) -> None:
    dead = dead_url()
    events: list[str] = []
    async with MockServer() as alive:
        async with ClientPool([dead, alive.url], concurrency=4, eject_after=2, backoff_base=0.01, on_event=events.append) as pool:
            replies = await asyncio.gather(*(pool.request(_body(f"q{i}")) for i in range(40)))
            gone = pool.endpoints[0]
    assert [r.content for r in replies] == [f"echo: q{i}" for i in range(40)]
    assert gone.state is EndpointState.EJECTED and gone.ejections == 1 and gone.rows == 0 and gone.retried > 0
    assert any(f"endpoint {dead} ejected after" in e for e in events)
    assert max(r.attempts for r in replies) == 2  # one failed attempt on the dead server, then the live one


async def test_4xx_answers_never_eject_a_server() -> None:
    async with MockServer() as server:
        async with ClientPool([server.url], eject_after=1) as pool:
            for _ in range(10):
                with pytest.raises(NotFoundError) as caught:
                    await pool.request({**_body(), "model": "no-such-model"})
                assert caught.value.endpoint == server.url
            endpoint = pool.endpoints[0]
    assert (endpoint.state, endpoint.ejections, endpoint.errors, endpoint.rows) == (EndpointState.HEALTHY, 0, 10, 10)


async def test_a_server_that_comes_back_is_probed_tried_once_and_readmitted() -> None:
    events: list[str] = []
    first = MockServer()
    await first.start()
    port, url = first.port, first.url
    async with MockServer() as other:
        async with ClientPool([url, other.url], concurrency=2, eject_after=1, backoff_base=0.02, backoff_max=0.1,
                              on_event=events.append) as pool:  # fmt: skip
            await first.close()
            await asyncio.gather(*(pool.request(_body(f"q{i}")) for i in range(10)))
            returned = pool.endpoints[0]
            assert returned.state is EndpointState.EJECTED
            async with MockServer(port=port) as back:
                for _ in range(200):  # the probe runs on its own; requests find the server back
                    if returned.state is EndpointState.HEALTHY:
                        break
                    await pool.request(_body("wait"))
                    await asyncio.sleep(0.01)
                await asyncio.gather(*(pool.request(_body(f"after {i}")) for i in range(20)))
            served_after = len(back.state.requests)
    assert returned.state is EndpointState.HEALTHY and returned.readmissions == 1 and served_after > 0
    text = "\n".join(events)
    assert f"endpoint {url} answers its health check" in text and f"endpoint {url} re-admitted" in text


async def test_when_every_server_is_down_the_pool_gives_up_once_and_says_so(dead_url: Callable[[], str]) -> None:
    lost: list[str] = []
    urls = [dead_url(), dead_url()]
    async with ClientPool(urls, concurrency=2, eject_after=1, max_retries=2, backoff_base=0.01, on_lost=lost.append) as pool:
        results = await asyncio.gather(*(pool.request(_body(f"q{i}")) for i in range(12)), return_exceptions=True)
    assert all(isinstance(r, APIConnectionError) for r in results), results
    assert len(lost) == 1 and "all 2 servers stopped answering" in lost[0] and urls[0] in lost[0]
    assert any("stopped answering" in str(r) for r in results)


async def test_a_stream_holds_its_servers_slot_until_it_ends() -> None:
    async with MockServer(MockConfig(ttft_ms=5, itl_ms=1)) as a, MockServer() as b:
        async with ClientPool([a.url, b.url], concurrency=1) as pool:
            stream = await pool.chat.completions.create(model="mock-model", messages=HI, stream=True, max_tokens=4)
            holder = next(e for e in pool.endpoints if e.url == stream.endpoint)
            assert holder.in_flight == 1
            chunks = [c async for c in stream]
            assert chunks and holder.in_flight == 0 and holder.rows == 1
            reply = await pool.chat.completions.create(model="mock-model", messages=HI, max_tokens=4)
    assert reply.content


# ---------------------------------------------------------------- a run over several servers


def _input(tmp_path: Path, rows: int) -> Path:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"p {i}" for i in range(rows)]}), path)
    return path


async def test_a_run_over_three_servers_writes_every_row_once_in_order_with_its_endpoint(tmp_path: Path) -> None:
    async with MockServer() as a, MockServer() as b, MockServer() as c:
        urls = [a.url, b.url, c.url]
        cfg = load_config({"input": str(_input(tmp_path, 300)), "output": str(tmp_path / "out.parquet"),
                           "base_url": urls, "concurrency": 4, "progress": False})  # fmt: skip
        result = await run_async(cfg, log=io.StringIO())
    assert result.exit_code == EXIT_OK, result.message
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["content"].to_list() == [f"echo: p {i}" for i in range(300)]
    assert set(out["endpoint"].to_list()) == set(urls)
    assert [e.rows for e in result.stats.endpoints] == [out.filter(pl.col("endpoint") == u).height for u in urls]
    summary = result.stats.summary(str(tmp_path / "out.parquet"))
    assert all(f"{u}: healthy" in summary for u in urls)


async def test_yaml_endpoints_with_their_own_concurrency(tmp_path: Path) -> None:
    async with MockServer(MockConfig(latency_ms=5)) as a, MockServer(MockConfig(latency_ms=5)) as b:
        cfg = load_config({"input": str(_input(tmp_path, 120)), "output": str(tmp_path / "out.parquet"), "progress": False,
                           "endpoints": [{"url": a.url, "concurrency": 2}, {"url": b.url, "concurrency": 6, "weight": 2}]})  # fmt: skip
        result = await run_async(cfg, log=io.StringIO())
    assert result.exit_code == EXIT_OK and a.state.max_in_flight <= 2 and b.state.max_in_flight <= 6


async def test_a_server_without_the_model_is_an_error_naming_it_and_nothing_is_sent(tmp_path: Path) -> None:
    async with MockServer() as good, MockServer(MockConfig(models=("other-model",))) as wrong:
        settings = {"input": str(_input(tmp_path, 20)), "output": str(tmp_path / "out.parquet"), "progress": False,
                    "base_url": [good.url, wrong.url], "model": "mock-model"}  # fmt: skip
        with pytest.raises(ConfigError, match=f"{wrong.url} does not serve model 'mock-model'.*--skip-bad-endpoints"):
            await run_async(load_config(settings), log=io.StringIO())
        assert good.state.requests == [] and wrong.state.requests == []
        log = io.StringIO()
        result = await run_async(load_config({**settings, "skip_bad_endpoints": True}), log=log)
    assert result.exit_code == EXIT_OK and wrong.state.requests == [] and len(good.state.requests) == 20
    assert f"warning: skipping endpoint: {wrong.url} does not serve" in log.getvalue()


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"base_url": []}, "base_url must be"), ({"endpoints": [{"url": "http://a/v1", "concurency": 2}]}, "did you mean 'concurrency'"),
     ({"endpoints": [{"concurrency": 2}]}, "has no url"), ({"endpoints": [{"url": "ftp://a"}]}, "http:// or https://"),
     ({"endpoints": ["http://a/v1"], "base_url": "http://b/v1"}, "not both"), ({"eject_after": 0}, "eject_after")],
)
def test_bad_endpoint_settings_are_clear_errors(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"input": "in.parquet", "output": "out.parquet", **settings})


def test_a_url_listed_twice_is_an_error() -> None:
    with pytest.raises(ConfigError, match="listed twice: http://a/v1"):
        ClientPool(["http://a/v1", "http://a/v1/"])


async def test_429s_lower_a_servers_limit_and_never_eject_it() -> None:
    async with MockServer(MockConfig(fault_rate=0.3, faults=("429",), retry_after_s=0.001, latency_ms=2)) as server:
        async with ClientPool([server.url], concurrency=16, eject_after=1, max_retries=20) as pool:
            endpoint = pool.endpoints[0]
            limits: list[float] = []

            async def one(i: int) -> None:
                await pool.request(_body(f"q{i}"))
                limits.append(endpoint.limit)

            await asyncio.gather(*(one(i) for i in range(200)))
    assert endpoint.ejections == 0 and endpoint.state is EndpointState.HEALTHY and endpoint.retried > 0
    assert min(limits) < 16  # halved at least once
    assert server.state.max_in_flight <= 16


def test_generate_takes_a_list_of_servers() -> None:
    from batchgen import generate
    from batchgen.testing.mock_server import mock_server_thread

    with mock_server_thread() as a, mock_server_thread() as b:
        out = generate(pl.DataFrame({"prompt": [f"p {i}" for i in range(30)]}), base_url=[a.url, b.url], max_tokens=8)
    assert out["content"].to_list() == [f"echo: p {i}" for i in range(30)]
    assert set(out["endpoint"].to_list()) <= {a.url, b.url} and out["endpoint"].null_count() == 0


async def test_each_server_may_have_its_own_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECOND_SERVER_KEY", "key-two")
    async with MockServer(MockConfig(api_key="key-one")) as one, MockServer(MockConfig(api_key="key-two")) as two:
        specs = [EndpointSpec(url=one.url), EndpointSpec(url=two.url, api_key_env="SECOND_SERVER_KEY")]
        async with ClientPool(specs, "key-one", concurrency=2) as pool:
            await asyncio.gather(*(pool.request(_body(f"q{i}")) for i in range(20)))
    assert len(one.state.requests) + len(two.state.requests) == 20 and one.state.requests and two.state.requests
    assert {h["authorization"] for h in one.state.request_headers} == {"Bearer key-one"}
    assert {h["authorization"] for h in two.state.request_headers} == {"Bearer key-two"}
    monkeypatch.delenv("SECOND_SERVER_KEY")
    with pytest.raises(ConfigError, match="'SECOND_SERVER_KEY', but that variable is not set"):
        ClientPool(specs)


async def test_a_server_whose_health_passes_but_drops_every_request_is_given_up_on() -> None:
    """/health answers, every chat request is dropped: trial after trial fails; the pool must not wait forever."""
    lost: list[str] = []
    async with MockServer(MockConfig(fault_rate=1.0, faults=("disconnect",))) as server:
        async with ClientPool([server.url], concurrency=2, eject_after=2, max_retries=3, backoff_base=0.01,
                              on_lost=lost.append) as pool:  # fmt: skip
            results = await asyncio.wait_for(
                asyncio.gather(*(pool.request(_body(f"q{i}")) for i in range(6)), return_exceptions=True), 30
            )
            endpoint = pool.endpoints[0]
    assert all(isinstance(r, APIConnectionError) for r in results), results
    assert len(lost) == 1 and "the server stopped answering" in lost[0]
    assert endpoint.state is EndpointState.EJECTED and endpoint.ejections == 1 and endpoint.trial_failures >= 3


async def test_a_freed_slot_goes_to_the_request_that_waited_first() -> None:
    """Three workers, two slots: the third's first request must not wait while the other two, each
    sending its next request at once, keep taking the slots they just freed."""
    async with MockServer(MockConfig(latency_ms=5)) as server:
        async with ClientPool([server.url], concurrency=2) as pool:

            async def worker(name: str) -> None:
                for n in range(6):
                    await pool.request(_body(f"{name}-{n}"))

            await asyncio.gather(worker("a"), worker("b"), worker("c"))
    arrivals = [r["messages"][0]["content"] for r in server.state.requests]
    assert "c-0" in arrivals[:3], arrivals
    for n in range(4):  # every worker's n-th request comes before anyone's (n + 2)-th
        assert max(arrivals.index(f"{w}-{n}") for w in "abc") < min(arrivals.index(f"{w}-{n + 2}") for w in "abc"), arrivals

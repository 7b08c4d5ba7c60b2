"""What goes on the wire besides the body: standard headers and the user's own, nothing per row."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen import Client
from batchgen.cli import main
from batchgen.config import load_config
from batchgen.errors import APIStatusError, ConfigError, RedirectError
from batchgen.headers import parse_header_lines
from batchgen.pipeline import EXIT_OK, run_async
from batchgen.testing.mock_server import MockServer

from .conftest import Reply

MESSAGES = [{"role": "user", "content": "hi"}]
OK = orjson.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]})
# What aiohttp adds on its own, plus the body's type: the whole set a default request may carry.
STANDARD = {"host", "content-type", "content-length", "accept", "accept-encoding", "user-agent"}


def _names(headers: dict[str, str]) -> set[str]:
    return {name.lower() for name in headers}


async def test_a_default_request_carries_only_standard_headers(scripted_server: Any, no_backoff: None) -> None:
    server = await scripted_server([Reply(status=500), Reply(body=OK)])
    async with Client(server.url) as client:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    assert len(server.headers) == 2  # the retry too
    for headers in server.headers:
        assert _names(headers) <= STANDARD, _names(headers) - STANDARD


async def test_user_headers_and_key_are_sent(scripted_server: Any) -> None:
    server = await scripted_server([Reply(body=OK)])
    async with Client(server.url, "sk-1", headers={"X-Tenant": "team-a", "OpenAI-Organization": "org"}) as client:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    sent = {k.lower(): v for k, v in server.headers[0].items()}
    assert sent["authorization"] == "Bearer sk-1"
    assert sent["x-tenant"] == "team-a" and sent["openai-organization"] == "org"
    assert set(sent) - STANDARD == {"authorization", "x-tenant", "openai-organization"}


async def test_request_id_header_is_a_fresh_uuid4_per_attempt(scripted_server: Any, no_backoff: None) -> None:
    server = await scripted_server([Reply(status=503), Reply(status=503), Reply(body=OK)])
    async with Client(server.url, request_id_header="X-Request-Id") as client:
        response = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert response.attempts == 3
    ids = [{k.lower(): v for k, v in h.items()}["x-request-id"] for h in server.headers]
    assert len(set(ids)) == 3
    assert all(uuid.UUID(i).version == 4 for i in ids)


async def test_secret_header_values_are_scrubbed_from_errors(scripted_server: Any) -> None:
    echo = orjson.dumps({"error": {"message": "bad key tok-secret-123 for tenant team-a", "type": "AuthError"}})
    server = await scripted_server([Reply(status=401, body=echo)])
    async with Client(server.url, headers={"X-Api-Key": "tok-secret-123", "X-Tenant": "team-a"}) as client:
        with pytest.raises(APIStatusError) as caught:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert "tok-secret-123" not in str(caught.value) and "***" in str(caught.value)
    assert "team-a" in str(caught.value)  # not a credential: kept


@pytest.mark.parametrize(
    ("headers", "named"),
    [({"Bad Name": "x"}, "'Bad Name'"), ({"X-Ok": "a\r\nInjected: 1"}, "'X-Ok'"), ({"": "x"}, "''")],
)
def test_bad_headers_are_config_errors_that_never_show_the_value(headers: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Client("http://127.0.0.1:9/v1", headers=headers)
    assert named in str(caught.value)
    assert "Injected" not in str(caught.value)


def test_header_lines_parse_and_later_lines_win() -> None:
    assert parse_header_lines(["X-A: 1", "X-B:two words ", "X-A: 3"]) == {"X-A": "3", "X-B": "two words"}
    with pytest.raises(ConfigError, match="Name: value"):
        parse_header_lines(["no colon here"])


def test_yaml_headers_and_flags_add_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(cfg: Any, **_: Any) -> Any:
        seen["cfg"] = cfg
        raise ConfigError("stop here")

    monkeypatch.setattr("batchgen.pipeline.run", fake_run)
    config = tmp_path / "job.yaml"
    config.write_text("input: in.parquet\noutput: out.parquet\nheaders:\n  X-A: from-yaml\n  X-B: yaml\n")
    assert main(["run", str(config), "--header", "X-B: flag", "--header", "X-C: 3", "--request-id-header", "X-Req"]) == 2
    cfg = seen["cfg"]
    assert cfg.headers == {"X-A": "from-yaml", "X-B": "flag", "X-C": "3"}
    assert cfg.request_id_header == "X-Req"
    with pytest.raises(ConfigError, match="request_id_header"):
        load_config({"input": "a.parquet", "output": "b.parquet", "request_id_header": "not a name"})


@pytest.mark.parametrize("stream", [False, True])
async def test_any_row_id_works(tmp_path: Path, stream: bool) -> None:
    """Ids that cannot be a header (newline, 10 KB, non-ASCII, empty) answer like any other."""
    ids = ["a\nb", "x" * 10_000, "é—中文", "", "plain"]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ids, "prompt": [f"question {i}" for i in range(len(ids))]}), path)
    async with MockServer() as server:
        settings = {"input": str(path), "output": str(tmp_path / "out.parquet"), "base_url": server.url,
                    "progress": False, "stream": stream, "flush_seconds": 0.05}
        result = await run_async(load_config(settings), log=io.StringIO())
    assert result.exit_code == EXIT_OK, result.message
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == ids
    assert out["content"].to_list() == [f"echo: question {i}" for i in range(len(ids))]
    for headers in server.state.request_headers:
        assert _names(headers) <= STANDARD, _names(headers) - STANDARD


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_an_error_that_says_where_not_a_silent_get(status: int, scripted_server: Any) -> None:
    server = await scripted_server([Reply(status=status, headers={"Location": "https://elsewhere.example/v1/chat/completions"})])
    async with Client(server.url) as client:
        with pytest.raises(RedirectError, match="elsewhere.example") as caught:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.attempts == 1  # never retried
    assert len(server.requests) == 1


@pytest.mark.parametrize("url", ["http://", "http://:8000/v1", "ftp://host/v1", "localhost:8000/v1"])
def test_a_base_url_needs_a_scheme_and_a_host(url: str) -> None:
    with pytest.raises(ConfigError, match="with a host"):
        Client(url)
    with pytest.raises(ConfigError, match="with a host"):
        load_config({"input": "a.parquet", "output": "b.parquet", "base_url": url})

"""Bad input: every problem from the issue's list gives either an error row naming the line/row and the field (the run goes on, every good row is answered once) or, for whole-file problems, exit code 2 with a clear message on stderr, no traceback and no request."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.pipeline import EXIT_OK, EXIT_ROW_ERRORS
from batchgen.testing.mock_server import MockServer

from ..conftest import rows_sent
from .conftest import Recorder, echo, read_output, run_bounded, run_cli_async, state_dir, write_jsonl


def _msgs(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _good(i: int) -> dict[str, Any]:
    return {"id": f"g{i}", "messages": _msgs(f"good {i}")}


@dataclass(frozen=True)
class RowCase:
    """A JSONL line that must become an error row; `where` and `words` must appear in its error."""

    line: bytes
    where: str
    words: tuple[str, ...]
    bad_id: str | None = "bad"  # the id the error row keeps (None: the line cannot be read)


def _line(**fields: Any) -> bytes:
    return orjson.dumps({"id": "bad", **fields})


ROW_CASES: dict[str, RowCase] = {
    "malformed_json": RowCase(b'{"id": "bad", "messages": [{"role": "user", "content": "x"}', "line 2", ("JSON",), None),
    "not_an_object": RowCase(b'["bad", 1]', "line 2", ("object",), None),
    "non_utf8_bytes": RowCase(b'{"id": "bad", "messages": [{"role": "user", "content": "caf\xe9"}]}', "line 2",
                              ("UTF-8",), None),
    "messages_missing": RowCase(_line(prompt_text="x"), "line 2", ("messages",)),
    "messages_an_object": RowCase(_line(messages={"role": "user", "content": "x"}), "line 2", ("messages", "list")),
    "messages_a_number": RowCase(_line(messages=42), "line 2", ("messages",)),
    "messages_text_not_json": RowCase(_line(messages="hello there"), "line 2", ("messages",)),
    "messages_empty_list": RowCase(_line(messages=[]), "line 2", ("messages",)),
    "unknown_role": RowCase(_line(messages=[{"role": "wizard", "content": "x"}]), "line 2", ("role", "wizard")),
    "content_a_number": RowCase(_line(messages=[{"role": "user", "content": 5}]), "line 2", ("content",)),
    "content_an_object": RowCase(_line(messages=[{"role": "user", "content": {"text": "x"}}]), "line 2", ("content",)),
    "content_parts_without_type": RowCase(_line(messages=[{"role": "user", "content": [{"text": "x"}]}]), "line 2",
                                          ("content",)),
    "override_temperature_text": RowCase(_line(messages=_msgs("x"), temperature="hot"), "line 2", ("temperature", "hot")),
    "override_max_tokens_text": RowCase(_line(messages=_msgs("x"), max_tokens="10"), "line 2", ("max_tokens",)),
    "override_stop_number": RowCase(_line(messages=_msgs("x"), stop=5), "line 2", ("stop",)),
    "temperature_nan_literal": RowCase(b'{"id": "bad", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                                       "line 2", ("JSON",), None),
    "temperature_infinite": RowCase(b'{"id": "bad", "messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
                                    "line 2", ("infinity",), None),
    "max_tokens_negative": RowCase(_line(messages=_msgs("x"), max_tokens=-5), "line 2", ("max_tokens", "-5")),
    "null_id": RowCase(orjson.dumps({"id": None, "messages": _msgs("x")}), "line 2", ("'id'", "null"), None),
}


async def _run(tmp_path: Path, input_path: Path, output: str = "out.jsonl", **options: Any) -> tuple[Any, MockServer]:
    async with MockServer() as server:
        settings = {"input": str(input_path), "output": str(tmp_path / output), "base_url": server.url,
                    "model": "mock-model", "progress": False, "flush_seconds": 0.1, "max_retries": 0, **options}
        result = await run_bounded(settings, 60)
    return result, server


def _check_error_row(record: dict[str, Any], where: str, words: tuple[str, ...], bad_id: str | None) -> None:
    error = record["error"]
    assert error is not None, f"the bad row was answered: {record}"
    assert where in error, f"the error does not name {where!r}: {error!r}"
    for word in words:
        assert word in error, f"the error does not name {word!r}: {error!r}"
    assert record["error_type"] in ("invalid_input", "invalid_row"), record
    assert record["id"] == bad_id and record["content"] is None and record["attempts"] == 0, record


BIG_PROMPT_CHARS = 20 * 1024 * 1024


def _row_of_prompt(prompt: str) -> str:
    """The row a good prompt belongs to: "good 7" -> "g7", the 20 MB prompt -> "big"; no other row may be sent."""
    if len(prompt) == BIG_PROMPT_CHARS:
        return "big"
    number = prompt.removeprefix("good ")
    assert number != prompt and number.isdigit(), f"a bad row was sent: prompt {prompt[:80]!r}"
    return f"g{number}"


def _sent_ids(server: MockServer) -> list[str]:
    return sorted(rows_sent(server.state.requests, _row_of_prompt))


@pytest.mark.parametrize("case", list(ROW_CASES), ids=list(ROW_CASES))
async def test_bad_row_becomes_an_error_row_naming_line_and_field(case: str, tmp_path: Path, figures: Any) -> None:
    """A bad JSONL line between two good ones becomes an error row whose message names the line and the field; it is never sent, and both good rows are answered once, in order."""
    spec = ROW_CASES[case]
    path = write_jsonl(tmp_path / "in.jsonl", [_good(0), spec.line, _good(1)])
    result, server = await _run(tmp_path, path)
    assert result.exit_code == EXIT_ROW_ERRORS, result.message
    out = read_output(tmp_path / "out.jsonl").to_dicts()
    assert [r["id"] for r in out] == ["g0", spec.bad_id, "g1"]
    _check_error_row(out[1], spec.where, spec.words, spec.bad_id)
    assert [out[0]["content"], out[2]["content"]] == [echo("good 0"), echo("good 1")]
    assert _sent_ids(server) == ["g0", "g1"]
    figures(rows=3, error=out[1]["error"])


async def test_truncated_last_line_is_an_error_row(tmp_path: Path, figures: Any) -> None:
    """A last line cut mid-record (no newline at the end of the file) becomes an error row naming that line as truncated; the good rows before it are answered."""
    path = write_jsonl(tmp_path / "in.jsonl", [_good(0), _good(1), b'{"id": "bad", "messages": [{"role": "us'],
                       final_newline=False)
    result, server = await _run(tmp_path, path)
    assert result.exit_code == EXIT_ROW_ERRORS, result.message
    out = read_output(tmp_path / "out.jsonl").to_dicts()
    assert [r["id"] for r in out] == ["g0", "g1", None]
    _check_error_row(out[2], "line 3", ("truncated",), None)
    assert _sent_ids(server) == ["g0", "g1"]
    figures(rows=3, error=out[2]["error"])


async def test_wrong_type_after_the_type_inference_window_is_an_error_row(tmp_path: Path, figures: Any) -> None:
    """JSONL column types are inferred from the first 1,024 rows: a later `max_tokens: "10"` in an integer column becomes an error row naming its line and the column, and all 1,101 other rows are answered once, in order."""
    lines: list[bytes | dict[str, Any]] = [{**_good(i), "max_tokens": 20} for i in range(1100)]
    lines.insert(1050, _line(messages=_msgs("x"), max_tokens="10"))
    lines.append(_good(1100))
    result, server = await _run(tmp_path, write_jsonl(tmp_path / "in.jsonl", lines), "out.parquet", concurrency=32)
    assert result.exit_code == EXIT_ROW_ERRORS, result.message
    out = read_output(tmp_path / "out.parquet").to_dicts()
    good = [f"g{i}" for i in range(1101)]
    assert [r["id"] for r in out] == [*good[:1050], "bad", *good[1050:]]
    _check_error_row(out[1050], "line 1051", ("max_tokens",), "bad")
    assert _sent_ids(server) == sorted(good)
    assert all(r["content"] == echo(f"good {r['id'][1:]}") for r in out if r["id"] != "bad")
    figures(rows=len(out), error=out[1050]["error"])


PARQUET_CASES = {
    "temperature_nan": ({"temperature": float("nan")}, ("temperature", "nan")),
    "temperature_inf": ({"temperature": float("inf")}, ("temperature", "inf")),
    "temperature_minus_inf": ({"temperature": float("-inf")}, ("temperature", "-inf")),
    "max_tokens_negative": ({"max_tokens": -3}, ("max_tokens", "-3")),
    "null_id": ({"id": None}, ("'id'", "null")),
    "messages_null": ({"messages": None}, ("messages",)),
}


@pytest.mark.parametrize("case", list(PARQUET_CASES), ids=list(PARQUET_CASES))
async def test_bad_parquet_row_becomes_an_error_row_naming_row_and_field(case: str, tmp_path: Path, figures: Any) -> None:
    """A Parquet row with NaN/infinite temperature, a negative max_tokens, a null id or null messages becomes an error row naming the row and the field; the good rows around it are answered once, in order."""
    changes, words = PARQUET_CASES[case]
    rows = [{"id": f"g{i}", "messages": _msgs(f"good {i}"), "temperature": 0.5, "max_tokens": 20} for i in range(3)]
    rows[1] = {**rows[1], "id": "bad", **changes}
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    result, server = await _run(tmp_path, path, "out.parquet")
    assert result.exit_code == EXIT_ROW_ERRORS, result.message
    out = read_output(tmp_path / "out.parquet").to_dicts()
    bad_id = rows[1]["id"]
    assert [r["id"] for r in out] == ["g0", bad_id, "g2"]
    _check_error_row(out[1], "row 1", words, bad_id)
    assert [out[0]["content"], out[2]["content"]] == [echo("good 0"), echo("good 2")]
    assert _sent_ids(server) == ["g0", "g2"]
    figures(rows=3, error=out[1]["error"])


@pytest.mark.slow
async def test_a_single_20_mb_row_goes_through_and_its_neighbours_are_intact(tmp_path: Path, figures: Any) -> None:
    """A single 20 MB JSONL row (one 20 MB word, one token to the mock) between two small rows, run in-process under the project's warnings-are-errors setting: all three are answered, each with its own full echo, in order (a warning about one row must not take down the run)."""
    big = "x" * BIG_PROMPT_CHARS
    path = write_jsonl(tmp_path / "in.jsonl", [_good(0), {"id": "big", "messages": _msgs(big)}, _good(1)])
    # The mock counts a word as one token; no real tokenizer packs 20 MB into one, so the length
    # check's estimate (at least a token per 32 bytes) would refuse the row: this test is about the body.
    result, server = await _run(tmp_path, path, "out.parquet", max_retries=2, check_length="off")
    assert result.exit_code == EXIT_OK, result.message
    out = read_output(tmp_path / "out.parquet")
    assert out["id"].to_list() == ["g0", "big", "g1"]
    assert out["content"].to_list() == [echo("good 0"), echo(big), echo("good 1")]
    assert _sent_ids(server) == ["big", "g0", "g1"]
    figures(rows=3, row_bytes=path.stat().st_size)


@pytest.mark.slow
async def test_a_single_20_mb_row_through_the_cli(tmp_path: Path, figures: Any) -> None:
    """The same 20 MB row through `batchgen run` with Python's default warning filters: all three rows are answered, each with its own full echo, in order."""
    big = "x" * BIG_PROMPT_CHARS
    path = write_jsonl(tmp_path / "in.jsonl", [_good(0), {"id": "big", "messages": _msgs(big)}, _good(1)])
    output = tmp_path / "out.parquet"
    async with MockServer() as server:
        result = await run_cli_async(["run", "--input", str(path), "--output", str(output), "--base-url", server.url,
                                      "--model", "mock-model", "--no-progress", "--check-length", "off"], timeout=90)
    assert result.returncode == 0, result.stderr
    out = read_output(output)
    assert out["id"].to_list() == ["g0", "big", "g1"]
    assert out["content"].to_list() == [echo("good 0"), echo(big), echo("good 1")]
    assert _sent_ids(server) == ["big", "g0", "g1"]
    figures(rows=3, row_bytes=path.stat().st_size, seconds=round(result.seconds, 1))


# ---------------------------------------------------------------- whole-file problems


def _write(tmp_path: Path, name: str, data: bytes | pa.Table) -> Path:
    path = tmp_path / name
    if isinstance(data, pa.Table):
        pq.write_table(data, path)
    else:
        path.write_bytes(data)
    return path


def _jsonl(*objs: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


FILE_CASES: dict[str, tuple[str, bytes | pa.Table | None, tuple[str, ...]]] = {
    "empty_file": ("in.jsonl", b"", ("empty",)),
    "only_blank_lines": ("in.jsonl", b"\n  \n\n", ("empty",)),
    "missing_file": ("in.jsonl", None, ("not found",)),
    "no_messages_column_jsonl": ("in.jsonl", _jsonl({"text": "a"}, {"text": "b"}), ("'messages'",)),
    "no_messages_column_parquet": ("in.parquet", pa.table({"text": ["a", "b"]}), ("'messages'",)),
    "not_a_parquet_file": ("in.parquet", b"PAR1 this is not parquet", ("in.parquet", "Parquet")),
    "duplicate_ids_parquet": ("in.parquet", pa.table({"id": ["a", "b", "c", "b"], "prompt": ["1", "2", "3", "4"]}),
                              ("duplicate id 'b'", "row 1 and row 3")),
    # Per-row errors in JSONL say "line N" (1-based, blank lines counted); a duplicate must be named the same way.
    "duplicate_ids_jsonl": ("in.jsonl", b'{"id": "a", "prompt": "1"}\n\n{"id": "b", "prompt": "2"}\n{"id": "a", "prompt": "3"}\n',
                            ("duplicate id 'a'", "line 1", "line 4")),
}


@pytest.mark.parametrize("case", list(FILE_CASES), ids=list(FILE_CASES))
async def test_whole_file_problem_exits_2_before_any_request(
    case: str, tmp_path: Path, recording_server: Recorder, figures: Any
) -> None:
    """`batchgen run` on an empty, missing or unreadable file, one without a messages/prompt column, or one with duplicate ids: exit code 2, one clear stderr message naming the problem (and the rows/lines involved), no Python traceback, no request of any kind to the server, no output or state left."""
    name, data, words = FILE_CASES[case]
    path = tmp_path / name if data is None else _write(tmp_path, name, data)
    output = tmp_path / "out.parquet"
    # No --model either: even model discovery would be a request.
    result = await run_cli_async(["run", "--input", str(path), "--output", str(output), "--base-url",
                                  recording_server.url, "--no-progress"], timeout=60)
    figures(exit_code=result.returncode, stderr=result.stderr.strip())
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, f"stderr does not name {word!r}: {result.stderr!r}"
    assert recording_server.seen == [], recording_server.seen
    assert not output.exists() and not state_dir(output).exists()


async def test_a_file_where_no_line_decodes_is_reported_as_undecodable(
    tmp_path: Path, recording_server: Recorder, figures: Any
) -> None:
    """A JSONL file exported as UTF-16 (not one line is UTF-8): either exit code 2 with a message naming line 1 and UTF-8, or one error row per line naming its line and UTF-8; never a message blaming missing columns, never a traceback or a request."""
    path = _write(tmp_path, "in.jsonl", _jsonl({"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}).decode().encode("utf-16"))
    output = tmp_path / "out.parquet"
    result = await run_cli_async(["run", "--input", str(path), "--output", str(output), "--base-url",
                                  recording_server.url, "--model", "m", "--no-progress"], timeout=60)
    figures(exit_code=result.returncode, stderr=result.stderr.strip())
    assert "Traceback" not in result.stderr and recording_server.seen == [], (result.stderr, recording_server.seen)
    if result.returncode == 2:
        assert "line 1" in result.stderr and "UTF-8" in result.stderr, f"misleading message: {result.stderr!r}"
    else:
        assert result.returncode == 1, result.stderr
        errors = read_output(output)["error"].to_list()
        assert len(errors) == 2 and all("UTF-8" in (e or "") for e in errors), errors

"""The Ray engine's pure parts, without Ray: which chunks a run still owes, how concurrency is
split over actors, and how an actor's batchgen error is told apart from Ray's wrapping."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from batchgen.errors import InputError, OutputError
from batchgen.io.blocks import Block
from batchgen.ray_engine.actor import Secret, share
from batchgen.ray_engine.driver import _our_error, _plan_work
from batchgen.ray_engine.output import OutputDir, PartInfo


def test_a_run_owes_the_chunks_without_a_whole_part() -> None:
    blocks = [Block(0, 0, 25), Block(0, 25, 25), Block(0, 50, 7)]  # chunks of 10: 0 10 20 | 25 35 45 | 50
    done = {0: PartInfo(10, 0), 10: PartInfo(10, 2), 25: PartInfo(10, 0), 35: PartInfo(10, 0), 45: PartInfo(5, 0)}
    work = _plan_work(blocks, done, 10, None)
    assert [(t["start"], t["skip"], t["retry"]) for t in work.tasks] == [(0, [0, 10], []), (50, [], [])]
    assert work.wanted == 57 and work.skipped == 10 + 10 + 10 + 10 + 5


def test_a_limit_cuts_the_plan_and_a_short_part_is_done_again_without_it() -> None:
    blocks = [Block(0, 0, 20), Block(0, 20, 20)]
    limited = _plan_work(blocks, {}, 10, 15)
    assert [(t["start"], t["skip"]) for t in limited.tasks] == [(0, [])] and limited.wanted == 15
    after = _plan_work(blocks, {0: PartInfo(10, 0), 10: PartInfo(5, 0)}, 10, None)  # the limited run's parts
    assert [(t["start"], t["skip"]) for t in after.tasks] == [(0, [0]), (20, [])] and after.skipped == 10


def test_retry_failed_sends_again_the_error_rows_of_whole_parts() -> None:
    blocks = [Block(0, 0, 20), Block(0, 20, 5)]
    done = {0: PartInfo(10, 3), 10: PartInfo(10, 0), 20: PartInfo(5, 5)}
    work = _plan_work(blocks, done, 10, None, retry_failed=True)
    assert [(t["start"], t["skip"], t["retry"]) for t in work.tasks] == [(0, [10], [0]), (20, [], [20])]
    assert work.skipped == 7 + 10 and work.wanted == 25
    assert _plan_work(blocks, done, 10, None).tasks == []  # without it, error rows are done


@pytest.mark.parametrize(("total", "parts"), [(64, 2), (64, 3), (5, 8), (1, 1), (100, 7)])
def test_concurrency_splits_evenly_and_every_actor_gets_one(total: int, parts: int) -> None:
    shares = [share(total, rank, parts) for rank in range(parts)]
    assert max(shares) - min(shares) <= 1 and min(shares) >= 1
    assert sum(shares) == max(total, parts)


def test_an_actors_batchgen_error_is_rebuilt_from_rays_text() -> None:
    wrapped = RuntimeError("RayTaskError(UserCodeException): ...\n  File x\nbatchgen.errors.InputError: in.jsonl: holds other rows")
    error = _our_error(wrapped)
    assert isinstance(error, InputError) and str(error) == "in.jsonl: holds other rows"
    assert _our_error(RuntimeError("ValueError: nothing of ours")) is None


def test_the_key_never_shows_in_a_repr() -> None:
    assert "sk-" not in repr(Secret("sk-123"))


def test_an_output_directory_is_checked_against_its_plan(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    out.prepare({"input": "a", "ray_block_rows": 10})
    out.write(0, pa.table({"error": pa.array(["x", None, None], pa.string())}))
    assert out.done() == {0: PartInfo(3, 1)}
    with pytest.raises(OutputError, match="differs in: input"):
        OutputDir(str(tmp_path / "out")).prepare({"input": "b", "ray_block_rows": 10})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty and holds no batchgen job"):
        OutputDir(str(tmp_path / "other")).prepare({"input": "a"})
    assert not list((tmp_path / "out").glob("_batchgen/tmp/*"))  # nothing half-written is left behind


async def test_an_actor_retrying_a_block_sends_only_the_chunks_not_yet_written(tmp_path: Path) -> None:
    """ChunkRunner is a plain class: here it runs in this process against an in-process mock,
    as Ray runs it in an actor. A block given again (Ray retries it when its actor died) skips the
    chunks whose parts exist, so their rows are not sent twice."""
    import orjson
    import polars as pl

    from batchgen.config import load_config
    from batchgen.io.blocks import open_shape
    from batchgen.io.schema import OutputLayout
    from batchgen.ray_engine.actor import SUMMARY_SCHEMA, ChunkRunner, Job
    from batchgen.ray_engine.output import INPUT_INDEX
    from batchgen.endpoints import EndpointSpec
    from batchgen.testing.mock_server import MockServer

    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"prompt": f"p{i}"}) + b"\n" for i in range(30)))
    shape = open_shape(str(source))
    (block,), _ = shape.plan(30)  # one block of 30 rows: 3 chunks of 10
    async with MockServer() as server:
        cfg = load_config({"input": str(source), "output": str(tmp_path / "out"), "engine": "ray", "ray_block_rows": 10,
                           "concurrency": 4, "base_url": server.url})  # fmt: skip
        output = OutputDir(cfg.output)
        output.prepare({"input": str(source)})
        layout = OutputLayout.of(shape.passthrough_schema, None, reserved=(INPUT_INDEX,))
        job = Job(cfg, shape, layout, output, (EndpointSpec(url=server.url),), "mock-model", None, actors=1)
        task = {"file": 0, "start": 0, "rows": 30, "begin": block.begin, "end": block.end,
                "first_line": block.first_line, "row_groups": [], "skip": []}  # fmt: skip
        runner = ChunkRunner(job)
        first = await runner(pa.Table.from_pylist([task]))
        await runner.aclose()
        assert first.schema == SUMMARY_SCHEMA and first.column("rows").to_pylist() == [10, 10, 10]
        (tmp_path / "out" / "part-000000000010.parquet").unlink()  # as if the actor died before writing it
        server.state.reset()
        runner = ChunkRunner(job)
        again = await runner(pa.Table.from_pylist([task]))
        await runner.aclose()
    assert again.column("start").to_pylist() == [10]
    assert sorted(body["messages"][0]["content"] for body in server.state.requests) == [f"p{i}" for i in range(10, 20)]
    out = pl.read_parquet(tmp_path / "out" / "*.parquet").sort(INPUT_INDEX)
    assert out["content"].to_list() == [f"echo: p{i}" for i in range(30)]

"""`--engine`: the local engine by default; `ray` checked before anything is read or sent, and
without Ray installed it says how to install it (exit 2, nothing sent)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from batchgen.cli import main
from batchgen.config import load_config
from batchgen.errors import ConfigError
from batchgen.ray_engine import RAY_INSTALL_HINT
from batchgen.testing.mock_server import mock_server_thread


def test_without_ray_the_engine_says_how_to_install_it_and_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when the extra is missing
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "hello"}\n')
    with mock_server_thread() as server:
        code = main(["run", "--engine", "ray", "--input", str(source), "--output", str(tmp_path / "out"),
                     "--base-url", server.url, "--no-progress"])  # fmt: skip
    assert code == 2
    assert RAY_INSTALL_HINT in capsys.readouterr().err and "pip install 'batchgen[ray]'" in RAY_INSTALL_HINT
    assert server.state.requests == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"output": "out.jsonl"}, "writes a directory of Parquet files"),
        ({"concurrency": "auto"}, "concurrency auto is not supported by the Ray engine"),
        ({"ray_actors": 0}, "ray_actors must be >= 1"),
        ({"ray_block_rows": 0}, "ray_block_rows must be >= 1"),
        ({"ray_actor_cpus": 0.0}, "ray_actor_cpus must be a positive number"),
        ({"engine": "spark"}, "engine must be one of local, ray"),
        ({"dry_run": True}, "dry_run: not supported by the Ray engine yet"),
    ],
)
def test_ray_settings_are_checked_up_front(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"input": "in.parquet", "output": "out", "engine": "ray", **settings})


def test_the_local_engine_is_the_default_and_keeps_its_output_rule() -> None:
    assert load_config({"input": "in.parquet", "output": "out.parquet"}).engine == "local"
    with pytest.raises(ConfigError, match="output must end in .parquet or .jsonl"):
        load_config({"input": "in.parquet", "output": "out-dir"})
    assert load_config({"input": "in.parquet", "output": "out-dir", "engine": "ray"}).ray_block_rows == 1000

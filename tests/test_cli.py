"""The command line: version, help, config merging and config errors (exit code 2, clear message)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchgen import __version__
from batchgen.cli import main
from batchgen.config import load_config, read_yaml
from batchgen.errors import ConfigError

RUN_FLAGS = [
    "--input", "--input-format", "--output", "--base-url", "--api-key-env", "--model", "--concurrency",
    "--max-retries", "--timeout", "--stream", "--temperature", "--max-tokens", "--top-p", "--top-k", "--stop",
    "--seed", "--extra", "--messages-column", "--prompt-column", "--system-prompt", "--id-column", "--limit",
    "--overwrite", "--retry-failed", "--no-progress",
]  # fmt: skip


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"batchgen {__version__}"


def test_run_help_documents_every_flag_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    missing = [flag for flag in RUN_FLAGS if flag not in text]
    assert missing == []
    assert "Exit codes:" in text and "130" in text


def test_flags_win_over_the_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("input: in.parquet\noutput: out.parquet\nmax_tokens: 5\ntemperature: 0.1\n")
    settings = read_yaml(config)
    settings.update({"max_tokens": 9})
    cfg = load_config(settings)
    assert cfg.max_tokens == 9 and cfg.temperature == 0.1


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("input: a.parquet\noutput: b.parquet\nmax_token: 5\n", "unknown setting 'max_token'; did you mean 'max_tokens'?"),
        ("input: a.parquet\noutput: b.csv\n", "output must end in .parquet or .jsonl"),
        ("input: a.parquet\noutput: b.parquet\nconcurrency: 0\n", "concurrency must be >= 1"),
        ("input: a.parquet\noutput: b.parquet\ntemperature: hot\n", "temperature must be a number"),
        ("input: a.parquet\noutput: b.parquet\nbase_url: localhost:8000\n", "base_url must be an http:// or https:// URL with a host"),
        ("output: b.parquet\n", "missing required setting(s): input"),
        ("[1, 2]\n", "must be a mapping of settings"),
    ],
)
def test_config_errors_exit_2_with_a_clear_message(
    yaml_text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml_text)
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_api_key_env_never_echoes_a_pasted_key() -> None:
    cfg = load_config({"input": "a.parquet", "output": "b.parquet", "api_key_env": "sk-secret-value-123"})
    with pytest.raises(ConfigError) as caught:
        cfg.resolve_api_key()
    assert "sk-secret-value-123" not in str(caught.value)


@pytest.mark.parametrize(
    ("setting", "message"),
    [("temperature: 5", "config: temperature: must be a finite number in [0, 2], got 5"),
     ("extra: {top_k: -7}", "config: top_k: must be an integer that is -1, 0 or >= 1, got -7")],
)  # fmt: skip
def test_an_invalid_request_default_stops_the_run_before_any_request(
    setting: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked once, up front: not one error row per input row. The URL has no server: nothing is sent.
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    config = tmp_path / "job.yaml"
    config.write_text(
        f"input: {tmp_path / 'in.jsonl'}\noutput: {tmp_path / 'out.parquet'}\n"
        f"base_url: http://127.0.0.1:9/v1\nmodel: m\n{setting}\n"
    )
    assert main(["run", str(config)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(config: Path) -> None:
    cfg = load_config(read_yaml(config), source=str(config))
    assert cfg.input and cfg.output


@pytest.mark.parametrize(("given", "expected"), [(None, "jemalloc"), ("system", "system")])
def test_the_cli_picks_arrows_default_pool_before_pyarrow_loads(given: str | None, expected: str) -> None:
    code = (
        "import contextlib\nfrom batchgen.cli import main\n"
        "with contextlib.suppress(SystemExit):\n    main(['--version'])\n"
        "import pyarrow as pa\nprint(pa.default_memory_pool().backend_name)"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if given is not None:
        env["ARROW_DEFAULT_MEMORY_POOL"] = given
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert done.stdout.strip().splitlines()[-1] == expected

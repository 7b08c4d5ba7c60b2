"""Argument types shared by the `run` and `bench` command lines."""

from __future__ import annotations

import argparse
from typing import Any

import orjson


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object given on the command line (e.g. `--extra '{"min_p": 0.05}'`)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value

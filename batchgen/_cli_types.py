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


def concurrency_value(text: str) -> int | str:
    """An argparse type: a number of requests in flight, or `auto`."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value

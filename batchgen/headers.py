"""The user's own HTTP headers: parsed from `Name: value` text, checked once, secrets picked out.

batchgen sends no header of its own beyond the standard ones (Content-Type, Accept,
Accept-Encoding, User-Agent, Authorization with a key). A per-row header broke real servers:
llama.cpp answers any `X-Request-ID` that is not a UUID with a bare 400, a row id with a newline
or of 10 KB cannot be a header at all, and vLLM takes the header as its internal request id, so
a retry reusing it while the first attempt still runs can collide. `request_id_header` opts in to
a fresh UUID4 per attempt instead, never the row id.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping

from batchgen.errors import ConfigError

__all__ = ["attempt_headers", "check_headers", "parse_header_lines", "secret_values"]

# RFC 9110 token characters; a value may hold anything printable but CR, LF and NUL.
_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
# Header names whose values are credentials: scrubbed from error text like the API key.
_SECRET_NAME = re.compile(r"auth|key|token|secret|cookie|password", re.IGNORECASE)


def check_headers(headers: Mapping[str, str], *, where: str = "headers") -> dict[str, str]:
    """A copy of `headers`, or ConfigError naming the bad header (never its value: it may be a secret)."""
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: {name!r} is not a valid HTTP header name")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: the value of {name!r} must be a string")
        if _BAD_VALUE.search(value):
            raise ConfigError(f"{where}: the value of {name!r} holds a line break or NUL (the value is not shown)")
        checked[name] = value.strip()
    return checked


def parse_header_lines(lines: Iterable[str], *, where: str = "--header") -> dict[str, str]:
    """`["Name: value", ...]` as given to `--header`; a later line of the same name wins."""
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise ConfigError(f"{where}: expected 'Name: value', got a line without a name and a colon")
        headers[name.strip()] = value.strip()
    return check_headers(headers, where=where)


def secret_values(headers: Mapping[str, str]) -> list[str]:
    """The values of credential-like headers (Authorization, X-Api-Key, ...), to scrub from errors."""
    return [value for name, value in headers.items() if value and _SECRET_NAME.search(name)]


def attempt_headers(request_id_header: str | None) -> dict[str, str] | None:
    """The headers one attempt adds to the session's: none, or a fresh UUID4 under `request_id_header`."""
    if request_id_header is None:
        return None
    return {request_id_header: str(uuid.uuid4())}

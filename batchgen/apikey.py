"""The API key, by one rule for `batchgen run`, `batchgen bench` and `Client`; a value is never echoed.

Order: a key file, then a named environment variable, then a key given directly (a config file
that holds one gets a warning), then `BATCHGEN_API_KEY`, then `OPENAI_API_KEY`.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from batchgen import _constants as C
from batchgen.errors import ConfigError

__all__ = ["resolve_api_key"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def resolve_api_key(
    api_key: str | None = None,
    *,
    env_var: str | None = None,
    key_file: str | None = None,
    warn_if_given: bool = False,
) -> str | None:
    """The key to send, or None when there is none.

    Args:
        api_key: a key given directly.
        env_var: the name of the environment variable holding the key (`--api-key-env`).
        key_file: a file whose stripped text is the key (`api_key_file`).
        warn_if_given: warn on stderr when `api_key` is used (a key written in a config file).

    Raises:
        ConfigError: the file cannot be read, the variable is not set, or `env_var` is not a
            variable name (a key pasted there by mistake: its value is not shown).
    """
    if key_file:
        try:
            return Path(key_file).expanduser().read_text().strip() or None
        except OSError as exc:
            raise ConfigError(f"cannot read api_key_file {key_file!r}: {exc.strerror}") from exc
    if env_var:
        if not _ENV_NAME.fullmatch(env_var):
            raise ConfigError("api_key_env must be the name of an environment variable (the value given is not shown)")
        value = os.environ.get(env_var)
        if not value:
            raise ConfigError(f"api_key_env names {env_var!r}, but that variable is not set")
        return value
    if api_key:
        if warn_if_given:
            print("batchgen: warning: an API key is written in the config; prefer api_key_env or api_key_file",
                  file=sys.stderr)  # fmt: skip
        return api_key
    for name in C.API_KEY_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return None

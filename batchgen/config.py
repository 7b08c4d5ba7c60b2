"""`RunConfig`: every setting of a `batchgen run` job, validated once, before any I/O.

A YAML file and command-line flags use the same flat keys (`--max-tokens` is `max_tokens:`);
flags win. Unknown keys are errors that suggest the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any


from batchgen import _constants as C
from batchgen.apikey import resolve_api_key
from batchgen.autoscale import AutoConcurrency
from batchgen.client import check_base_url
from batchgen.endpoints import DEFAULT_EJECT_AFTER, EndpointSpec
from batchgen.errors import ConfigError
from batchgen.headers import check_headers, parse_header_lines
from batchgen.retry import RetryPolicy

if TYPE_CHECKING:
    from batchgen.client_pool import ClientPool
    from batchgen.rows import RowMapper

__all__ = ["RunConfig", "load_config", "read_yaml"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """A `batchgen run` job. Every field is also a YAML key and a `--flag`.

    Example:
        RunConfig(input="prompts.parquet", output="out.parquet", model="qwen3-8b", max_tokens=256)
    """

    input: str
    output: str
    input_format: str | None = None
    base_url: str | tuple[str, ...] = C.DEFAULT_BASE_URL  # several: one run over several servers
    endpoints: tuple[EndpointSpec, ...] = ()  # servers with settings of their own (instead of base_url)
    eject_after: int = DEFAULT_EJECT_AFTER
    skip_bad_endpoints: bool = False
    api_key_env: str | None = None
    api_key_file: str | None = None
    api_key: str | None = None  # works, but warns: keys belong in the environment or a file
    headers: dict[str, str] = field(default_factory=dict)
    request_id_header: str | None = None
    model: str | None = None
    concurrency: int | str = C.DEFAULT_CONCURRENCY  # or "auto": steered by each server's load
    concurrency_min: int = 1  # the bounds of concurrency auto, per server
    concurrency_max: int = 512
    max_retries: int = C.DEFAULT_MAX_RETRIES
    timeout: float = C.DEFAULT_TIMEOUT
    read_timeout: float | None = None
    backoff_base: float = C.DEFAULT_BACKOFF_BASE
    backoff_max: float = C.DEFAULT_BACKOFF_MAX
    max_retry_after: float = C.DEFAULT_MAX_RETRY_AFTER
    max_response_bytes: int = C.DEFAULT_MAX_RESPONSE_BYTES
    stream: bool = False
    keep_raw: bool = False
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    messages_column: str = "messages"
    prompt_column: str = "prompt"
    system_prompt: str | None = None
    id_column: str | None = None
    limit: int | None = None
    overwrite: bool = False
    retry_failed: bool = False
    progress: bool = True
    flush_seconds: float = C.DEFAULT_FLUSH_SECONDS
    flush_rows: int = C.DEFAULT_FLUSH_ROWS
    journal_seconds: float = C.DEFAULT_JOURNAL_SECONDS
    output_format: str | None = None  # None: from the suffix (.jsonl with an openai-batch input: openai-batch)
    max_requests_per_minute: float | None = None  # client-side quotas, for hosted APIs
    max_tokens_per_minute: float | None = None
    check_length: str = "estimate"  # rows that cannot fit the server's max_model_len become error rows unsent
    max_error_rate: float | None = None  # stop when this fraction of rows failed (after min_rows_for_error_rate)
    min_rows_for_error_rate: int = C.DEFAULT_MIN_ROWS_FOR_ERROR_RATE
    max_duration: float | None = None  # seconds; stop cleanly then (a rerun resumes)
    max_cost: float | None = None  # stop when the spent cost reaches it (needs prices)
    price_input: float | None = None  # per million input tokens
    price_output: float | None = None  # per million output tokens
    prices: dict[str, dict[str, float]] = field(default_factory=dict)  # per model: {input: .., output: ..}
    dry_run: bool = False  # print rows, estimated tokens, cost and time; send nothing
    engine: str = "local"  # or "ray": the same job on a Ray cluster (batchgen.ray_engine)
    ray_address: str | None = None  # None: Ray's own default ($RAY_ADDRESS, a `ray start` cluster here, else a new local one)
    ray_actors: int | None = None  # None: one per CPU of the cluster
    ray_block_rows: int = C.DEFAULT_RAY_BLOCK_ROWS  # rows per output part file: the unit of resume
    ray_actor_cpus: float = C.DEFAULT_RAY_ACTOR_CPUS  # what each actor reserves (it mostly waits on the network)

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("input is required (--input PATH)")
        if not self.output:
            raise ConfigError("output is required (--output PATH ending in .parquet or .jsonl)")
        if self.engine not in C.ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(C.ENGINES)}, got {self.engine!r}")
        if self.engine == "ray":
            self._check_ray()
        elif not self.output.endswith((".parquet", ".jsonl")):
            raise ConfigError(f"output must end in .parquet or .jsonl, got {self.output!r}")
        self._check_run_controls()
        if self.input_format is not None and self.input_format not in C.INPUT_FORMATS:
            raise ConfigError(f"input_format must be one of {', '.join(C.INPUT_FORMATS)}, got {self.input_format!r}")
        if self.endpoints and self.base_url != C.DEFAULT_BASE_URL:
            raise ConfigError("give base_url or endpoints, not both")
        for spec in self.endpoint_specs():
            if spec.url != C.MOCK_URL:
                check_base_url(spec.url)
        if self.concurrency != "auto" and (not isinstance(self.concurrency, int) or self.concurrency < 1):
            raise ConfigError(f"concurrency must be >= 1 (or auto), got {self.concurrency!r}")
        self.auto_concurrency()  # checks the bounds
        for name in ("flush_rows", "eject_after"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        for name in ("timeout", "flush_seconds"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value}")
        if not math.isfinite(self.journal_seconds) or self.journal_seconds < 0:
            raise ConfigError(f"journal_seconds must be >= 0 seconds (0 = no journal), got {self.journal_seconds}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit must be >= 0, got {self.limit}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a mapping of request fields, got {self.extra!r}")
        if self.overwrite and self.retry_failed:
            raise ConfigError("overwrite and retry_failed cannot be used together")

    def _check_run_controls(self) -> None:
        if self.output_format is not None and self.output_format not in C.OUTPUT_FORMATS:
            raise ConfigError(f"output_format must be one of {', '.join(C.OUTPUT_FORMATS)}, got {self.output_format!r}")
        if self.output_format in ("jsonl", "openai-batch") and not self.output.endswith(".jsonl"):
            raise ConfigError(f"output_format {self.output_format} writes JSON lines: the output must end in .jsonl")
        if self.output_format == "parquet" and not self.output.endswith(".parquet"):
            raise ConfigError("output_format parquet needs an output ending in .parquet")
        if self.check_length not in C.LENGTH_CHECKS:
            raise ConfigError(f"check_length must be one of {', '.join(C.LENGTH_CHECKS)}, got {self.check_length!r}")
        for name in ("max_requests_per_minute", "max_tokens_per_minute", "max_duration", "max_cost"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{name} must be a positive number, got {value}")
        for name in ("price_input", "price_output"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ConfigError(f"{name} must be >= 0 (per million tokens), got {value}")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate < 1:
            raise ConfigError(f"max_error_rate must be a fraction in [0, 1), got {self.max_error_rate}")
        if self.min_rows_for_error_rate < 1:
            raise ConfigError(f"min_rows_for_error_rate must be >= 1, got {self.min_rows_for_error_rate}")
        for model, price in self.prices.items():
            if not isinstance(price, dict) or set(price) - {"input", "output"} or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in price.values()
            ):
                raise ConfigError(f"prices[{model!r}] must be {{input: N, output: N}} per million tokens, got {price!r}")
        if self.max_cost is not None and not (self.price_input is not None or self.price_output is not None or self.prices):
            raise ConfigError("max_cost needs prices: --price-input / --price-output, or prices per model in YAML")
        if self.engine == "ray":
            given = ["dry_run"] if self.dry_run else []
            if self.output_format == "openai-batch":
                given.append("output_format openai-batch")
            if given:
                raise ConfigError(f"{', '.join(given)}: not supported by the Ray engine yet; run with the local engine")

    def _check_ray(self) -> None:
        if self.output.endswith((".jsonl", ".ndjson")):
            raise ConfigError(f"the Ray engine writes a directory of Parquet files; give a directory as output, not {self.output!r}")
        refused = {"concurrency auto": self.concurrency == "auto"}
        for name, given in refused.items():
            if given:
                raise ConfigError(f"{name} is not supported by the Ray engine yet; run it with the local engine")
        if self.ray_actors is not None and self.ray_actors < 1:
            raise ConfigError(f"ray_actors must be >= 1, got {self.ray_actors}")
        if self.ray_block_rows < 1:
            raise ConfigError(f"ray_block_rows must be >= 1, got {self.ray_block_rows}")
        if not math.isfinite(self.ray_actor_cpus) or self.ray_actor_cpus <= 0:
            raise ConfigError(f"ray_actor_cpus must be a positive number of CPUs, got {self.ray_actor_cpus}")

    def endpoint_specs(self) -> list[EndpointSpec]:
        """The run's servers: `endpoints`, else one per `base_url`."""
        if self.endpoints:
            return list(self.endpoints)
        urls = (self.base_url,) if isinstance(self.base_url, str) else self.base_url
        return [EndpointSpec(url=url) for url in urls]

    def auto_concurrency(self) -> AutoConcurrency:
        """The bounds of `concurrency: auto` (used by a server whose concurrency is auto)."""
        return AutoConcurrency(min=self.concurrency_min, max=self.concurrency_max)

    def pool_concurrency(self) -> int | AutoConcurrency:
        """`concurrency` as `ClientPool` takes it."""
        return self.auto_concurrency() if self.concurrency == "auto" else int(self.concurrency)

    def defaults(self) -> dict[str, Any]:
        """The request fields every row starts from (None values are left out)."""
        base = {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": self.stop,
            "seed": self.seed,
        }
        fields = {k: v for k, v in base.items() if v is not None}
        fields.update(self.extra)
        return fields

    def row_mapper(self, columns: list[str], fmt: str) -> RowMapper:
        """The request builder for an input with these columns; its model is set once the servers are asked."""
        from batchgen.rows import RowMapper  # validation and parsing: only a run needs them

        return RowMapper(
            columns,
            fmt=fmt,
            model="",
            defaults=self.defaults(),
            messages_column=self.messages_column,
            prompt_column=self.prompt_column,
            system_prompt=self.system_prompt,
            id_column=self.id_column,
            stream=self.stream,
        )

    def client_pool(self, specs: Sequence[EndpointSpec], api_key: str | None, *, concurrency: int | AutoConcurrency,
                    on_event: Callable[[str], None] | None = None) -> ClientPool:  # fmt: skip
        """The run's servers as one client, with this job's timeouts, retries, headers and health rules."""
        from batchgen.client_pool import ClientPool  # aiohttp: only a run needs it

        return ClientPool(
            specs,
            api_key,
            concurrency=concurrency,
            eject_after=self.eject_after,
            on_event=on_event,
            timeout=self.timeout,
            read_timeout=self.read_timeout,
            retry=self.retry_policy(),
            max_response_bytes=self.max_response_bytes,
            headers=self.headers,
            request_id_header=self.request_id_header,
            requests_per_minute=self.max_requests_per_minute,
            tokens_per_minute=self.max_tokens_per_minute,
        )

    def retry_policy(self) -> RetryPolicy:
        """The retry settings as one object: a new `RetryPolicy` field only needs its twin here."""
        return RetryPolicy(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RetryPolicy)})

    def resolve_api_key(self) -> str | None:
        """The key from `api_key_file`, `api_key_env`, the config (with a warning), or the default env vars."""
        return resolve_api_key(self.api_key, env_var=self.api_key_env, key_file=self.api_key_file, warn_if_given=True)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML job file into a flat mapping."""
    import yaml  # only a config file needs it (start-up time)

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(path)!r} must be a mapping of settings, got {type(data).__name__}")
    return data


def _coerce(name: str, value: Any) -> Any:
    """Check a YAML value against the field's type; YAML already gives ints, floats and bools."""
    kind = str(FIELDS[name].type)
    if value is None:
        return None
    if name == "headers":
        # YAML gives a mapping; repeated --header flags give "Name: value" lines.
        if isinstance(value, Mapping):
            return check_headers({str(k): v if isinstance(v, str) else str(v) for k, v in value.items()})
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return parse_header_lines(value)
        raise ConfigError("headers must be a mapping of header names to values, or a list of 'Name: value' lines")
    if name == "base_url":
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return value[0] if len(value) == 1 else tuple(value)
        raise ConfigError(f"base_url must be a URL or a non-empty list of URLs, got {value!r}")
    if name == "endpoints":
        return _endpoints(value)
    if name == "concurrency":
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        raise ConfigError(f"concurrency must be an integer >= 1, auto, or {{min: N, max: N}} (auto), got {value!r}")
    if name == "request_id_header":
        return next(iter(check_headers({str(value): ""}, where="request_id_header")))
    if name == "stop":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"stop must be a string or a list of strings, got {value!r}")
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
    elif kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    elif kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    elif kind.startswith("str"):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


_ENDPOINT_KEYS = tuple(f.name for f in dataclasses.fields(EndpointSpec))


def _endpoints(value: Any) -> tuple[EndpointSpec, ...]:
    """`endpoints:` as YAML gives it: a list of URLs or of mappings with the keys of `EndpointSpec`."""
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not value:
        raise ConfigError("endpoints must be a non-empty list of URLs or of {url, concurrency, api_key_env, weight}")
    specs = []
    for number, item in enumerate(value, 1):
        if isinstance(item, EndpointSpec):  # from Python
            specs.append(item)
            continue
        if isinstance(item, str):
            item = {"url": item}
        if not isinstance(item, Mapping):
            raise ConfigError(f"endpoints item {number} must be a URL or a mapping, got {item!r}")
        for key in item:
            if key not in _ENDPOINT_KEYS:
                close = difflib.get_close_matches(str(key), _ENDPOINT_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"endpoints item {number}: unknown key {key!r}{hint}")
        if "url" not in item:
            raise ConfigError(f"endpoints item {number} has no url")
        specs.append(EndpointSpec(**{str(k): v for k, v in item.items()}))
    return tuple(specs)


def _expand_auto(settings: Mapping[str, Any]) -> Mapping[str, Any]:
    """`concurrency: {min: 4, max: 256}` (YAML) is `concurrency: auto` with those bounds."""
    value = settings.get("concurrency")
    if not isinstance(value, Mapping):
        return settings
    unknown = set(value) - {"min", "max"}
    if unknown:
        raise ConfigError(f"concurrency as a mapping takes min and max (it means auto), got {sorted(map(str, unknown))}")
    expanded = {**settings, "concurrency": "auto"}
    for bound in ("min", "max"):
        if bound in value:
            expanded[f"concurrency_{bound}"] = value[bound]
    return expanded


def load_config(settings: Mapping[str, Any], *, source: str = "config") -> RunConfig:
    """Build a `RunConfig` from a flat mapping (YAML merged with flags).

    Raises:
        ConfigError: an unknown key (with the closest known one), a wrong type, or a bad value.
    """
    values: dict[str, Any] = {}
    settings = _expand_auto(settings)
    for raw_key, value in settings.items():
        key = str(raw_key).replace("-", "_")
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown setting {raw_key!r}{hint}")
        values[key] = _coerce(key, value)
    for name in ("extra", "headers"):
        if values.get(name) is None:
            values.pop(name, None)
    try:
        return RunConfig(**values)
    except TypeError as exc:
        missing = [name for name in ("input", "output") if name not in values]
        raise ConfigError(f"{source}: missing required setting(s): {', '.join(missing) or exc}") from exc

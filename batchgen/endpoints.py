"""One server of a `ClientPool`: its settings (`EndpointSpec`), and at run time (`Endpoint`) how much
it may take now and whether it is healthy (pure bookkeeping: the pool does the I/O).

Health, per endpoint:

    HEALTHY ──N failures in a row──▶ EJECTED ──backoff, then GET /health (or /models) passes──▶ PROBING
       ▲                               ▲  └──probe fails: twice the backoff──┘                     │
       │                               └──────────────the one trial request fails─────────────────┤
       └────────────the trial request succeeds: the limit starts at 1 and ramps back up───────────┘

A failure that counts is a connection failure, a timeout or a 5xx: the server may be gone (but the
last healthy server is ejected only when it cannot be reached: see `Endpoint.failed`). A 4xx
is the row's fault and says the server is there (it resets the streak, never ejects); a 429 says
the server is there but full, so it halves the endpoint's limit instead (at most once per
`DECREASE_GAP_S`, so a burst of 429s from one overload halves it once). The limit then grows back
by one slot per `limit` successes (additive increase); after a re-admission it starts at 1 and
grows by one per success up to the configured concurrency (a slow start).
"""

from __future__ import annotations

import enum
import math
from urllib.parse import urlsplit, urlunsplit
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchgen.autoscale import spread
from batchgen.errors import APIConnectionError, APIError, APITimeoutError, ConfigError, RateLimitError, ServerError

if TYPE_CHECKING:
    from batchgen.autoscale import ConcurrencyController, Tick
    from batchgen.client import Client

__all__ = [
    "DEFAULT_EJECT_AFTER", "Endpoint", "EndpointFigures", "EndpointSpec", "EndpointState", "counts_against_health",
    "public_url",
]  # fmt: skip

DEFAULT_EJECT_AFTER = 5  # failures in a row (Envoy's consecutive_5xx default): one blip never ejects
DECREASE_GAP_S = 1.0  # 429s closer than this are one overload: the limit is halved once


class EndpointState(enum.Enum):
    HEALTHY = "healthy"
    EJECTED = "ejected"  # nothing is sent; probes check whether it is back
    PROBING = "probing"  # its health check passed: one trial request decides


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSpec:
    """One server of a job, as configured (`endpoints:` in YAML, or each `--base-url`).

    Args:
        url: the API root, e.g. `http://gpu-1:8000/v1` (`mock` starts a built-in mock server).
        concurrency: requests in flight at most on this server, or "auto" (steered by its load,
            `autoscale.py`); None = the run's `concurrency`.
        api_key_env: the variable holding this server's key; None = the run's key.
        weight: relative speed of one of its slots, used when several servers have room (a
            weight 2 server is given the work first until it carries twice the tokens per slot).

    Example:
        EndpointSpec(url="http://gpu-2:8000/v1", concurrency=128, weight=2.0)
    """

    url: str
    concurrency: int | str | None = None
    api_key_env: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise ConfigError(f"an endpoint needs a url, got {self.url!r}")
        concurrency = self.concurrency
        if concurrency is not None and concurrency != "auto" and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
        ):
            raise ConfigError(f"endpoint {self.url}: concurrency must be an integer >= 1 or auto, got {concurrency!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not (
            math.isfinite(self.weight) and self.weight > 0
        ):
            raise ConfigError(f"endpoint {self.url}: weight must be a number > 0, got {self.weight!r}")


def public_url(url: str) -> str:
    """`url` without what may be a secret: user:password@ and the query (`?api-key=...`)."""
    parts = urlsplit(url)
    if not parts.username and not parts.password and not parts.query:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _unreachable(error: APIError) -> bool:
    return isinstance(error, APIConnectionError) and not isinstance(error, APITimeoutError)


def counts_against_health(error: APIError) -> bool:
    """Whether a failed attempt says the server may be gone: a connection failure, a timeout, a 5xx."""
    return isinstance(error, (APIConnectionError, ServerError))


class Endpoint:
    """One server at run time: its client, its load, its health and its figures.

    `limit` is how many requests it may hold now (a float: additive increase adds fractions);
    `outstanding` the estimated tokens of the requests it holds. The pool reads both to choose.
    """

    __slots__ = (
        "auto", "capacity", "client", "controller", "decreased_at", "down_since", "ejections", "errors",
        "failures_in_row", "in_flight", "last_failure", "limit", "outstanding", "output_tokens", "overloads",
        "probe_delay", "probe_failures", "readmissions", "retried", "rows", "state", "threshold", "timeouts", "trial_failures",
        "ttft_count", "ttft_sum", "url", "weight", "eject_after",
    )  # fmt: skip

    def __init__(
        self, client: Client, capacity: int, *, weight: float = 1.0, eject_after: int = DEFAULT_EJECT_AFTER,
        auto: bool = False,
    ) -> None:  # fmt: skip
        self.client = client
        # With `concurrency: auto` a ConcurrencyController owns `limit` (capacity is its max): the
        # 429 and growth rules below leave it alone, and the counters feed the controller.
        self.auto = auto
        self.controller: ConcurrencyController | None = None
        self.overloads = 0  # 429 and 503 answers
        self.timeouts = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.url = public_url(client.base_url)  # what the output, the logs and the summary show
        self.capacity = capacity
        self.weight = weight
        self.eject_after = eject_after
        self.limit = float(capacity)
        self.threshold = float(capacity)  # below it the limit grows one per success (slow start)
        self.state = EndpointState.HEALTHY
        self.in_flight = 0
        self.outstanding = 0.0
        self.failures_in_row = 0
        self.decreased_at = -math.inf
        self.down_since = 0.0
        self.probe_delay = 0.0
        self.probe_failures = 0  # health checks failed since the last ejection
        self.trial_failures = 0  # trial requests failed since the last ejection (its health check passed)
        self.last_failure = ""
        # figures for the progress display and the summary
        self.rows = 0  # final answers (or final errors) it gave
        self.errors = 0  # rows whose last attempt failed here
        self.retried = 0  # failed attempts here that another attempt followed
        self.output_tokens = 0
        self.ejections = 0
        self.readmissions = 0

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r}, {self.state.value}, {self.in_flight}/{self.limit:g})"

    def has_room(self) -> bool:
        state = self.state
        if state is EndpointState.HEALTHY:
            return self.in_flight < self.limit
        return state is EndpointState.PROBING and self.in_flight == 0

    def succeeded(self) -> bool:
        """An attempt got an answer; True when this re-admits the endpoint (its trial passed)."""
        self.failures_in_row = 0
        if self.state is EndpointState.PROBING:
            self.state = EndpointState.HEALTHY
            self.readmissions += 1
            self.trial_failures = 0
            self.limit, self.threshold = 1.0, float(self.capacity)
            return True
        limit = self.limit
        if limit < self.capacity and not self.auto:
            self.limit = min(float(self.capacity), limit + (1.0 if limit < self.threshold else 1.0 / limit))
        return False

    def failed(self, error: APIError, now: float, *, last_standing: bool = False) -> bool:
        """An attempt failed with `error`; True when this ejects the endpoint.

        `last_standing`: no other endpoint is healthy. Then only an unreachable server (refused or
        reset connections) is ejected: one that answers 5xx or is slow still answers, so its rows
        fail as error rows after their retries instead of waiting for a server that never comes
        (Envoy's panic threshold, for the same reason).
        """
        if isinstance(error, RateLimitError) or getattr(error, "status_code", None) == 503:
            self.overloads += 1
        elif isinstance(error, APITimeoutError):
            self.timeouts += 1
        if not counts_against_health(error):
            # The server answered: the row's fault, or a 429 (full, not gone).
            if isinstance(error, RateLimitError) and not self.auto and now - self.decreased_at >= DECREASE_GAP_S:
                self.decreased_at = now
                self.limit = self.threshold = max(1.0, math.floor(self.limit / 2))
            if self.state is EndpointState.PROBING:
                self.succeeded()  # it answered: the trial passed
            self.failures_in_row = 0
            return False
        self.failures_in_row += 1
        self.last_failure = str(error)
        if self.state is EndpointState.PROBING:
            if last_standing and not _unreachable(error):
                self.succeeded()  # the only server answers, if badly: its rows end as error rows
                return False
            self.state = EndpointState.EJECTED  # the trial failed: still down since before
            self.trial_failures += 1
            return True
        if self.state is EndpointState.HEALTHY and self.failures_in_row >= self.eject_after:
            if last_standing and not _unreachable(error):
                return False
            self.eject(now)
            return True
        return False

    def eject(self, now: float) -> None:
        self.state = EndpointState.EJECTED
        self.ejections += 1
        self.down_since = now
        self.probe_failures = 0
        self.trial_failures = 0

    def probe_passed(self) -> None:
        """Its health check passed: one trial request may go."""
        self.state = EndpointState.PROBING
        self.failures_in_row = 0


@dataclass(frozen=True, slots=True)
class EndpointFigures:
    """What one server did in a run, for the summary and the result of `run`."""

    url: str
    state: str
    in_flight: int
    limit: float
    rows: int
    errors: int
    retried: int
    output_tokens: int
    ejections: int
    readmissions: int
    timeline: tuple[Tick, ...] = ()  # concurrency auto's decisions

    @classmethod
    def of(cls, endpoint: Endpoint) -> EndpointFigures:
        timeline = tuple(endpoint.controller.timeline) if endpoint.controller is not None else ()
        return cls(endpoint.url, endpoint.state.value, endpoint.in_flight, endpoint.limit, endpoint.rows,
                   endpoint.errors, endpoint.retried, endpoint.output_tokens, endpoint.ejections,
                   endpoint.readmissions, timeline)  # fmt: skip

    def line(self, seconds: float) -> str:
        """One line: `URL: healthy, 12/32 in flight, 3100 rows (2 errors), 5 retries, 410 tok/s, ejected 1x, back 1x`."""
        text = (f"{self.url}: {self.state}, {self.in_flight}/{self.limit:.0f} in flight, {self.rows} rows "
                f"({self.errors} errors), {self.retried} retries, {self.output_tokens / max(seconds, 1e-9):.0f} tok/s")  # fmt: skip
        if self.ejections:
            text += f", ejected {self.ejections}x, re-admitted {self.readmissions}x"
        return text

    def timeline_lines(self, most: int = 12) -> list[str]:
        """Concurrency auto's timeline as a small table (at most `most` evenly spread rows, the last included)."""
        ticks = self.timeline
        chosen = spread(ticks, most)
        if not chosen:
            return []

        def number(value: float | None, form: str = ".0f") -> str:
            return "-" if value is None else format(value, form)

        lines = [f"concurrency auto at {self.url} ({len(ticks)} decisions):",
                 "      t s  limit  in flight  running  waiting     kv  preempted  decision"]  # fmt: skip
        for tick in chosen:
            kv = "-" if tick.kv_usage is None else f"{tick.kv_usage:.0%}"
            lines.append(f"  {tick.t:7.1f}  {tick.limit:5d}  {tick.in_flight:9d}  {number(tick.running):>7}  "
                         f"{number(tick.waiting):>7}  {kv:>5}  {number(tick.preemptions):>9}  {tick.decision}")  # fmt: skip
        return lines

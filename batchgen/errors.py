"""Every error batchgen raises, in one hierarchy rooted at `BatchgenError`.

```
BatchgenError
├── ConfigError                 bad YAML / CLI flags; raised before any I/O
├── ValidationError             a request field has a bad value; raised before any network call
├── ToolArgumentsError          a tool call's `arguments` string is not a JSON object
├── InputError                  unreadable input file, missing required column        (fatal)
├── OutputError                 output cannot be written                              (fatal)
├── ServerUnusableError         the server cannot be used for this run (model         (fatal)
│                               discovery failed, no model listed); nothing was sent
├── RunIncompleteError          `generate()`: the run was interrupted or left no      (.exit_code)
│                               output; carries the run's message
├── ClientProcessError          a benchmark client process crashed or raised
└── APIError                    a request to the server failed                        (.attempts)
    ├── APIConnectionError      refused / reset / DNS / disconnect                    retryable
    │   ├── APITimeoutError     read or total timeout, or a stall (a connect timeout  retryable
    │   │                       is an APIConnectionError: the host is unreachable)
    │   └── TLSVerificationError  the server's certificate (or pinned fingerprint)    never retried
    │                           failed verification
    ├── RedirectError           redirected in a loop, or to a malformed or non-HTTP   never retried
    │                           location (base_url is probably wrong)
    ├── UnexpectedError         a bug in batchgen met while sending one row           never retried
    ├── IncompleteResponseError 200 whose body is not a complete chat completion,     retryable
    │   │                       or a stream that ended before [DONE]
    │   └── ResponseTooLargeError  body over the configured size limit                 never retried
    └── APIStatusError          .status_code, .message, .type, .code, .request_id
        ├── BadRequestError         400                                               never retried
        ├── AuthenticationError     401                                               never retried
        ├── PermissionDeniedError   403                                               never retried
        ├── NotFoundError           404                                               never retried
        ├── UnprocessableEntityError 422                                              never retried
        ├── RateLimitError          429 (honours Retry-After)                         retryable
        └── ServerError             5xx (408 too: the server gave up waiting)          retryable
```

`retryable` is a class attribute (refined per status for `APIStatusError`), and `retry.should_retry`
reads it, so the retry decision lives with the error, not in scattered status lists.
aiohttp errors reach this tree only through `transport.translate_error`, whose table names every
aiohttp class it maps; the ones it does not name are re-raised as they are.
Error messages never contain the API key: only server messages and our own text are used.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchgenError",
    "ClientProcessError",
    "ConfigError",
    "IncompleteResponseError",
    "InputError",
    "NotFoundError",
    "OutputError",
    "PermissionDeniedError",
    "RateLimitError",
    "RedirectError",
    "ResponseTooLargeError",
    "RunIncompleteError",
    "ServerError",
    "ServerUnusableError",
    "TLSVerificationError",
    "ToolArgumentsError",
    "UnexpectedError",
    "UnprocessableEntityError",
    "ValidationError",
    "status_error",
]

# Statuses worth another try: the server (or a gateway) says "not now", never "never".
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class BatchgenError(Exception):
    """Base class of every error raised by batchgen."""


class ConfigError(BatchgenError):
    """A job configuration (YAML or flags) is invalid."""


class ValidationError(BatchgenError, ValueError):
    """A request field has a bad value. `field` names it, `value` holds what was given."""

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field}: {message}")


class ToolArgumentsError(BatchgenError, ValueError):
    """A tool call's `arguments` string does not parse to a JSON object."""


class InputError(BatchgenError):
    """The input cannot be read as a whole (missing file or column, undecodable format)."""


class OutputError(BatchgenError):
    """Results cannot be written (schema clash, disk full, path not writable)."""


class ServerUnusableError(BatchgenError):
    """The server cannot be used for this run (e.g. model discovery failed or it lists no model).

    Raised before the first row is sent: nothing was sent, so a rerun starts from scratch.
    """


class RunIncompleteError(BatchgenError, RuntimeError):
    """A job run from Python (`generate()`) was interrupted or left no output.

    Also a `RuntimeError`, which is what `generate()` raised before, so old handlers still work.

    Args:
        message: the run's own message (what happened, how many rows were saved).
        exit_code: the run's exit code (`batchgen._constants.EXIT_CODE_MEANINGS` says what each means).
    """

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class ClientProcessError(BatchgenError):
    """A benchmark client process failed (crashed, or raised before sending)."""


class APIError(BatchgenError):
    """A request to the server failed. `attempts` counts the tries made, retries included;
    `endpoint` is the base URL of the server of the last attempt (set by a `ClientPool`)."""

    retryable: ClassVar[bool] = False
    error_type: ClassVar[str] = "api_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.attempts = 1
        self.endpoint: str | None = None

    def is_retryable(self) -> bool:
        return self.retryable


class APIConnectionError(APIError):
    """The connection failed or dropped before a full response arrived."""

    retryable = True
    error_type = "connection_error"


class APITimeoutError(APIConnectionError):
    """No complete answer within the timeout (the total, a read, or between stream chunks).

    A connect timeout is a plain `APIConnectionError`: the host is unreachable, not slow.
    """

    error_type = "timeout"


class TLSVerificationError(APIConnectionError):
    """The server's TLS certificate (or its pinned fingerprint) failed verification.

    A connection error (the server could not be reached safely), but one that another try
    would only repeat: a certificate does not become valid between two retries.
    """

    retryable = False
    error_type = "tls_verification"


class RedirectError(APIError):
    """The server redirected in a loop, or to a malformed or non-HTTP location.

    An OpenAI-compatible server answers `POST /chat/completions` itself; a redirect there means
    `base_url` points at the wrong place (e.g. `http://` for an `https://` server), so it is
    never retried.
    """

    error_type = "redirect"


class UnexpectedError(APIError):
    """An unexpected exception while sending one row; the row becomes an error row, the run goes on."""

    error_type = "unexpected_error"


class IncompleteResponseError(APIError):
    """HTTP 200 but not a complete chat completion: bad JSON, missing choices, or no [DONE]."""

    retryable = True
    error_type = "incomplete_response"


class ResponseTooLargeError(IncompleteResponseError):
    """The response body is larger than the configured limit; a retry would only repeat it."""

    retryable = False
    error_type = "response_too_large"


class APIStatusError(APIError):
    """The server answered with an error status (or an error event inside a 200 stream).

    Args:
        status_code: the HTTP status, or the error event's code for in-stream errors.
        message: the server's own message, made readable whatever the envelope was.
        type: the server's error type (`BadRequestError`, `Bad Request`, ...) or None.
        code: the server's error code (vLLM: the int status; OpenAI: a string) or None.
        param: the parameter the server blamed, or None.
        request_id: the `x-request-id` the server sent back, or None.
        retry_after: the delay the server asked for, in seconds, or None.
    """

    error_type = "status_error"

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        code: Any = None,
        param: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.request_id = request_id
        self.retry_after = retry_after

    def is_retryable(self) -> bool:
        return self.status_code in RETRYABLE_STATUSES


class BadRequestError(APIStatusError):
    error_type = "bad_request"


class AuthenticationError(APIStatusError):
    error_type = "authentication"


class PermissionDeniedError(APIStatusError):
    error_type = "permission_denied"


class NotFoundError(APIStatusError):
    error_type = "not_found"


class UnprocessableEntityError(APIStatusError):
    error_type = "unprocessable_entity"


class RateLimitError(APIStatusError):
    error_type = "rate_limited"


class ServerError(APIStatusError):
    error_type = "server_error"


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error(status_code: int, message: str, **details: Any) -> APIStatusError:
    """Build the most specific `APIStatusError` subclass for a status code."""
    cls = _STATUS_CLASSES.get(status_code)
    if cls is None:
        cls = ServerError if status_code >= 500 or status_code == 408 else APIStatusError
    return cls(status_code, message, **details)

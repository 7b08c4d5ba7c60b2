"""batchgen: bulk chat-completion jobs and benchmarks against vLLM and OpenAI-compatible servers."""

from batchgen._version import __version__
from batchgen.builder import ChatCompletionBuilder
from batchgen.client import Client
from batchgen.client_pool import ClientPool
from batchgen.endpoints import EndpointSpec
from batchgen.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BatchgenError,
    ClientProcessError,
    ConfigError,
    IncompleteResponseError,
    InputError,
    NotFoundError,
    OutputError,
    PermissionDeniedError,
    RateLimitError,
    RedirectError,
    ResponseTooLargeError,
    RunIncompleteError,
    ServerError,
    ServerUnusableError,
    TLSVerificationError,
    ToolArgumentsError,
    UnexpectedError,
    UnprocessableEntityError,
    ValidationError,
)
from batchgen.retry import RetryPolicy
from batchgen.stream import Stream
from batchgen.chunks import ChatCompletionChunk
from batchgen.types import ChatCompletionResponse, Choice, Function, TokenLogprob, ToolCall, TopLogprob, Usage

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchgenError",
    "ChatCompletionBuilder",
    "ChatCompletionChunk",
    "ChatCompletionResponse",
    "Choice",
    "Client",
    "ClientPool",
    "ClientProcessError",
    "ConfigError",
    "EndpointSpec",
    "Function",
    "IncompleteResponseError",
    "InputError",
    "NotFoundError",
    "OutputError",
    "PermissionDeniedError",
    "RateLimitError",
    "RedirectError",
    "ResponseTooLargeError",
    "RetryPolicy",
    "RunConfig",
    "RunIncompleteError",
    "RunResult",
    "ServerError",
    "ServerUnusableError",
    "Stream",
    "TLSVerificationError",
    "TokenLogprob",
    "ToolArgumentsError",
    "ToolCall",
    "TopLogprob",
    "UnexpectedError",
    "UnprocessableEntityError",
    "Usage",
    "ValidationError",
    "__version__",
    "generate",
    "load_config",
    "run",
]


# The job API pulls in pyarrow, polars and the pipeline; load it on first use so that
# `import batchgen` for the client alone stays light.
_LAZY = {
    "generate": "batchgen.api",
    "RunConfig": "batchgen.config",
    "load_config": "batchgen.config",
    "RunResult": "batchgen.pipeline",
    "run": "batchgen.pipeline",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batchgen' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

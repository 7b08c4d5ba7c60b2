"""batchgen: bulk chat-completion jobs and benchmarks against vLLM and OpenAI-compatible servers."""

from batchgen._version import __version__
from batchgen.api import generate
from batchgen.builder import ChatCompletionBuilder
from batchgen.client import Client
from batchgen.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BatchgenError,
    ConfigError,
    IncompleteResponseError,
    InputError,
    NotFoundError,
    OutputError,
    PermissionDeniedError,
    RateLimitError,
    ResponseTooLargeError,
    ServerError,
    ToolArgumentsError,
    UnprocessableEntityError,
    ValidationError,
)
from batchgen.config import RunConfig, load_config
from batchgen.pipeline import RunResult, run
from batchgen.retry import RetryPolicy
from batchgen.stream import Stream
from batchgen.chunks import ChatCompletionChunk
from batchgen.types import ChatCompletionResponse, Choice, Function, ToolCall, Usage

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
    "ConfigError",
    "Function",
    "IncompleteResponseError",
    "InputError",
    "NotFoundError",
    "OutputError",
    "PermissionDeniedError",
    "RateLimitError",
    "ResponseTooLargeError",
    "RetryPolicy",
    "RunConfig",
    "RunResult",
    "ServerError",
    "Stream",
    "ToolArgumentsError",
    "ToolCall",
    "UnprocessableEntityError",
    "Usage",
    "ValidationError",
    "__version__",
    "generate",
    "load_config",
    "run",
]

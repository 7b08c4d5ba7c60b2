"""Named defaults and shared constants, in one place so the client, the CLI and the docs agree."""

import enum

DEFAULT_BASE_URL = "http://localhost:8000/v1"
API_KEY_ENV_VARS = ("BATCHGEN_API_KEY", "OPENAI_API_KEY")

DEFAULT_TIMEOUT = 600.0  # seconds for one attempt; long generations are normal
DEFAULT_CONNECT_TIMEOUT = 30.0  # seconds to open a TCP connection; longer means the host is unreachable
DEFAULT_MAX_RETRIES = 5
DEFAULT_BACKOFF_BASE = 0.5
DEFAULT_BACKOFF_MAX = 8.0
DEFAULT_MAX_RETRY_AFTER = 60.0  # honour server-directed delays up to a minute
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024

DEFAULT_CONCURRENCY = 64
DEFAULT_FLUSH_SECONDS = 2.0
# Finished answers are fsynced to the journal this soon: a crash re-sends at most this long's answers
# (plus those in flight). 10 fsyncs a second whatever the rate (benchmarks/README.md, "Crash cost").
DEFAULT_JOURNAL_SECONDS = 0.1
DEFAULT_FLUSH_ROWS = 2_000  # a part per 2000 rows at most: fewer pending records in memory (benchmarks/README.md)

ENGINES = ("local", "ray")  # `--engine`: this process, or actors on a Ray cluster (the `ray` extra)
DEFAULT_RAY_BLOCK_ROWS = 1_000  # rows per part file of the Ray engine: what a crash can cost per chunk in flight
DEFAULT_RAY_ACTOR_CPUS = 0.25  # an actor mostly waits on the network; 1 CPU each starved the reader on 2 cores

OUTPUT_FORMATS = ("parquet", "jsonl", "openai-batch")  # openai-batch: the lines OpenAI's Batch API and `vllm run-batch` write
LENGTH_CHECKS = ("off", "estimate", "exact")  # before sending, against the server's max_model_len
DEFAULT_MIN_ROWS_FOR_ERROR_RATE = 100

MOCK_URL = "mock"  # a base_url that starts the built-in mock server for the duration of the job
# The input formats and the class that reads each (`module:Class`, imported when used): adding a
# format is a reader module in batchgen/io/ and one line here.
INPUT_READERS = {
    "parquet": "batchgen.io.parquet:ParquetSource",
    "jsonl": "batchgen.io.jsonl:JsonlSource",
    "openai-batch": "batchgen.io.jsonl:OpenAIBatchSource",
}
INPUT_FORMATS = tuple(INPUT_READERS)


class ExitCode(enum.IntEnum):
    """What `batchgen run` returns; `EXIT_CODE_MEANINGS` says it to users (the CLI help is built from it)."""

    OK = 0
    ROW_ERRORS = 1
    CONFIG = 2
    FATAL = 3
    STOPPED = 4
    INTERRUPTED = 130


EXIT_CODE_MEANINGS = {
    ExitCode.OK: "every row succeeded",
    ExitCode.ROW_ERRORS: "completed with some error rows",
    ExitCode.CONFIG: "config or input error (nothing sent), or the output could not be written (finished rows stay on disk)",
    ExitCode.FATAL: "a server could not be used, or every server stopped answering mid-run (rerun to resume)",
    ExitCode.STOPPED: "stopped by a limit: --max-error-rate, --max-duration or --max-cost (rerun to resume)",
    ExitCode.INTERRUPTED: "interrupted by Ctrl-C or SIGTERM (rerun to resume)",
}

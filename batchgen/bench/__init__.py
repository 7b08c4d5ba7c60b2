"""`batchgen bench`: measure a server with vLLM-comparable metrics, and say when the client is the limit.

`run_bench(options)` is the whole command minus argparse: find the model, prepare the prompts,
run each load level (in one or more client processes), then print and write the reports.

Example:
    options = BenchOptions(server=ServerSpec.of("http://localhost:8000/v1"),
                           dataset=DatasetSpec(name="random", model="", num_prompts=200, output_len=128),
                           loads=(LoadSpec(concurrency=16, num_prompts=200),))
    levels = run_bench(options)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TextIO

if TYPE_CHECKING:
    from batchgen.bench.datasets import Dataset, DatasetSpec
    from batchgen.bench.metrics import BenchSummary
    from batchgen.bench.report import Level
    from batchgen.bench.runner import LoadSpec, ServerSpec

__all__ = ["BenchOptions", "BenchSummary", "DatasetSpec", "Level", "LoadSpec", "ServerSpec", "run_bench"]

# Re-exports load on first use (PEP 562): `batchgen --help` imports this package through the CLI
# and should not pay for pyarrow and aiohttp.
_LAZY = {"BenchSummary": "metrics", "DatasetSpec": "datasets", "Level": "report", "LoadSpec": "runner",
         "ServerSpec": "runner"}  # fmt: skip



@dataclass(frozen=True, slots=True, kw_only=True)
class BenchOptions:
    """One `batchgen bench` invocation.

    Args:
        server: where to send (each base URL "mock" starts a built-in mock server; several URLs
            share one load, and the report breaks it down per server).
        dataset: the prompts; its `model` is replaced by `model` or the server's first model.
        loads: the load levels, run in order (several = a sweep).
        model: None = the first model GET /v1/models lists.
        processes: client processes per level; "auto" = as many as a short probe of each level in
            one process finds its client-added delay needs, within the cores available.
        goodput_ms: SLOs for goodput, e.g. {"ttft": 500, "tpot": 50}.
        result_json / raw_output / plot: output paths, or None.
    """

    server: ServerSpec
    dataset: DatasetSpec
    loads: tuple[LoadSpec, ...]
    model: str | None = None
    processes: int | Literal["auto"] = 1
    goodput_ms: dict[str, float] | None = None
    result_json: str | None = None
    raw_output: str | None = None
    plot: str | None = None


@contextlib.contextmanager
def _server(spec: ServerSpec) -> Iterator[ServerSpec]:
    from batchgen.endpoints import EndpointSpec
    from batchgen.servers import serving_all

    with serving_all([EndpointSpec(url=url) for url in spec.base_urls]) as specs:
        yield dataclasses.replace(spec, base_urls=tuple(s.url for s in specs))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"batchgen.bench.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _prepare(options: BenchOptions, server: ServerSpec) -> tuple[str, Dataset]:
    from batchgen.bench.datasets import load_dataset
    from batchgen.bench.runner import server_model

    model = options.model or asyncio.run(server_model(server))
    return model, load_dataset(dataclasses.replace(options.dataset, model=model))


def run_bench(options: BenchOptions, *, out: TextIO | None = None, log: TextIO | None = None) -> list[Level]:
    """Run every load level and write the requested outputs; returns the levels measured.

    Raises:
        ConfigError / InputError: bad options or dataset (before any load is sent).
        ServerUnusableError: the server could not list its models, or lists none.
    """
    from batchgen.bench.metrics import summarize
    from batchgen.bench.multiproc import run_level
    from batchgen.bench.saturation import find_saturation
    from batchgen.bench.report import (
        Level,
        RunInfo,
        check_plot,
        console_report,
        level_label,
        sweep_table,
        write_plot,
        write_raw,
        write_results,
    )  # fmt: skip

    out = out or sys.stdout
    log = log or sys.stderr
    if options.plot:
        check_plot()
    levels: list[Level] = []
    with _server(options.server) as server:
        model, dataset = _prepare(options, server)
        info = RunInfo(model=model, dataset=dataset.name, dataset_notes=dataset.notes, skipped_rows=dataset.skipped,
                       goodput_ms=options.goodput_ms)  # fmt: skip
        for note in dataset.notes:
            print(f"batchgen bench: {note}", file=log)
        if dataset.skipped:
            print(f"batchgen bench: {dataset.skipped} input rows could not become requests and were skipped", file=log)
        for number, load in enumerate(options.loads, 1):
            print(f"batchgen bench: level {number}/{len(options.loads)}: {level_label(load)} ...", file=log, flush=True)
            result = run_level(server, dataset.bodies, load, options.processes)
            if result.choice is not None:
                print(f"batchgen bench: client processes {result.choice.processes} ({result.choice.describe()})",
                      file=log, flush=True)  # fmt: skip
            summary = summarize(result.records, duration_s=result.duration_s, clients=result.clients,
                                goodput=options.goodput_ms, endpoints=server.base_urls)  # fmt: skip
            saturation = None
            if load.auto is not None:
                saturation = find_saturation(load.auto, result.traces, result.records, processes=len(result.clients),
                                             shares=[share.auto or load.auto for share in result.shares])  # fmt: skip
            level = Level(result, summary, saturation)
            levels.append(level)
            print(console_report(level, info), file=out, flush=True)
    if len(levels) > 1:
        print(sweep_table(levels), file=out)
    if options.result_json:
        write_results(options.result_json, levels, info)
    if options.raw_output:
        write_raw(options.raw_output, levels)
    if options.plot:
        write_plot(options.plot, levels)
    return levels

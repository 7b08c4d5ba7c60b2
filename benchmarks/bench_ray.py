"""The Ray engine against the local engine: rows/s and the peak memory of the whole process tree.

One input of `--rows` prompts (default 20k; a Parquet file with row groups of `--block-rows`, so
the Ray engine plans one block per row group) is sent to the nginx stub (`nginx_stub.py`, one
worker, canned `max_tokens=16` answers) by `batchgen run` as a subprocess, in these settings, each
at every `--concurrency` (default 64 and 128; always the TOTAL in flight, which the Ray engine
splits evenly over its actors):

* local      `--engine local` (the default): one process, one Parquet file;
* ray 1      `--engine ray --ray-actors 1`: a local Ray cluster started by the driver (ray.init);
* ray 2      `--engine ray --ray-actors 2`: the same with two actors;
* pre 2      `--ray-actors 2 --ray-address ADDR`, on a cluster this script started beforehand
             (`ray start --head --num-cpus 2 --disable-usage-stats --include-dashboard=false`):
             the engine without cluster start-up (skip with `--no-prestarted`).

Rates (rows/s), all over the same rows:

* wall:   rows / (process start to exit): interpreter start, Ray start-up and shutdown included.
* steady: from the stub's access log (nginx logs `$msec` per chat request; the only change to the
          stub's config): the requests between the 10th and the 90th percentile of their arrival
          times / the time between those two: the sending rate with start-up, ramp-up, tail and
          shutdown left out. The same measure for every engine.
* active: rows / (first request to last request at the stub).
* driver: the rate batchgen's own stderr gives. Ray: rows / (time of the final "... holds N rows"
          line - time of the "Ray engine: N rows to send" line, both stamped as they arrive on the
          pipe); this leaves out ray.init but includes the actors' start-up (a new worker process
          importing Ray, pyarrow and batchgen) and ray.shutdown. Local: batchgen's summary
          ("time: S s, R rows/s": run start to the end of the final merge).

Phases (seconds from process start): start-up (to the first request), sending (first to last
request), finish (last request to exit: the last parts and merge, Ray's shutdown).

Memory: every ~`--interval` s (default 0.2) the sampler lists /proc/*/stat (ppid, start time, CPU
ticks, RSS) and counts as the run's tree (a) every descendant of the driver process (walking ppid
links from it); (b) every process whose initial environment (/proc/PID/environ) holds this run's
marker variable BATCHGEN_BENCH_TAG=<run id>, which the driver gets and whatever it starts inherits;
(c) a process Ray retitled (comm "ray::...": setproctitle also overwrites /proc/PID/environ, so
(b) cannot see it) that has a file open under this run's private RAY_TMPDIR (Ray's session logs);
and (d) every descendant of a process counted so far. A process stays counted once seen (by pid
and start time), so one reparented to init (a daemon, or a worker whose raylet died first) still
counts. For the pre-started cluster, the processes found the same way from the cluster's marker
and RAY_TMPDIR (`ray start` daemonises: gcs_server, raylet etc. are children of init, not of the
driver) count too, reported apart as "cluster". Per sample the tree's RSS (stat's rss, = VmRSS) is summed, and also its PSS
(/proc/PID/smaps_rollup: shared pages split between the processes mapping them, so Python
libraries mapped by ten Ray processes count once); the peak is the largest sum over the samples,
and the JSON keeps the per-role split at that sample. How many processes were found only by the
marker (not as descendants) is recorded per run: that is the check that the tree walk alone is
enough, or not.

CPU: per process, the last utime+stime seen by the sampler, summed by role (driver, actors,
raylet, gcs_server, other Ray workers, Ray's Python daemons). A process's last <= interval before
it exits is missed, so this is a lower bound; the JSON also has `os.wait4`'s rusage of the driver,
which covers it and the descendants it reaped (not the workers raylet started). "rows per actor
CPU-second" = rows / the actors' CPU: what one actor can send on a core of its own, the figure
that scales with client machines. nginx's CPU and the machine's other load ("bg CPU s": busy CPU
from /proc/stat minus tree, nginx and this script) are recorded per run.

Every run's output is checked (polars): --rows rows, no error rows and, for Ray, every input_index
once. A first unmeasured run of each engine warms caches and must pass the same checks, or the
benchmark stops. Settings alternate in order between repeats; figures are medians over repeats.
Each run's Ray processes use a private RAY_TMPDIR (so a `ray start` cluster elsewhere on the
machine is neither joined nor disturbed) and RAY_USAGE_STATS_ENABLED=0. The pre-started cluster
is stopped by signalling the processes that carry its marker (never `ray stop`, which stops every
Ray process on the machine).

    python benchmarks/bench_ray.py                    # 3 repeats, c = 64 and 128, ~5.5 min
    python benchmarks/bench_ray.py --quick            # 1 repeat, c = 64, ~1.5 min
    python benchmarks/bench_ray.py --repeats 5 --concurrency 64 --no-prestarted
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from _provenance import machine, source_hash  # benchmarks/, next to this script

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from nginx_stub import NginxNotInstalledError, NginxStub  # noqa: E402

MAX_TOKENS = 16
TAG_VAR = "BATCHGEN_BENCH_TAG"
CLK = os.sysconf("SC_CLK_TCK")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20
_ENGINE_LINE = re.compile(r"^batchgen: Ray engine: (\d+) rows to send in (\d+) blocks over (\d+) actors")
_FINAL_LINE = re.compile(r"^batchgen: (?:.* holds (\d+) rows|wrote (\d+) rows)")
_SUMMARY = re.compile(r"^time: ([\d.]+) s, ([\d.]+) rows/s")
_OURS = re.compile(r"^(batchgen: |rows: |tokens: |time: |output: )")
ROLES = ("driver", "actors", "raylet", "gcs_server", "ray workers (other)", "ray daemons (python)", "other")


# -- the stub, with an access log ----------------------------------------------------------------


class LoggedStub(NginxStub):
    """The nginx stub, logging each request's arrival time ($msec) and path to `access.log`."""

    def _write_config(self) -> Path:
        config = super()._write_config()
        text = config.read_text()
        assert "access_log off;" in text
        config.write_text(text.replace(
            "access_log off;", f"log_format bench '$msec $uri';\n    access_log {self.tmp}/access.log bench;", 1))
        return config

    @property
    def access_log(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "access.log"

    def log_size(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def chat_times(self, offset: int) -> list[float]:
        """Arrival times (epoch seconds) of the chat requests logged after byte `offset`, sorted."""
        with open(self.access_log, "rb") as file:
            file.seek(offset)
            lines = file.read().splitlines()
        return sorted(float(t) for t, _, path in (line.partition(b" ") for line in lines) if path.endswith(b"/chat/completions"))


# -- /proc ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Proc:
    pid: int
    ppid: int
    start: int  # clock ticks after boot: (pid, start) names a process for its whole life
    ticks: int  # utime + stime
    rss_pages: int
    state: str
    comm: str


def scan_procs() -> dict[int, Proc]:
    procs: dict[int, Proc] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as file:
                text = file.read()
        except OSError:
            continue
        close = text.rfind(b")")
        f = text[close + 2 :].split()
        procs[int(name)] = Proc(int(name), int(f[1]), int(f[19]), int(f[11]) + int(f[12]), int(f[21]),
                                f[0].decode(), text[text.find(b"(") + 1 : close].decode(errors="replace"))  # fmt: skip
    return procs


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return b""


def env_tag(pid: int) -> str | None:
    """The value of BATCHGEN_BENCH_TAG in the process's initial environment, if any."""
    for item in _read(f"/proc/{pid}/environ").split(b"\0"):
        if item.startswith(TAG_VAR.encode() + b"="):
            return item.split(b"=", 1)[1].decode(errors="replace")
    return None


def holds_file_under(pid: int, path: str) -> bool:
    """Whether the process has a file open (or its cwd) under `path` (Ray's logs in our private RAY_TMPDIR)."""
    try:
        links = [os.readlink(f"/proc/{pid}/cwd")]
        links += [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(link.startswith(path) for link in links)


def _retitled(proc: Proc) -> bool:
    """Ray's Python processes rename themselves (setproctitle: ray::IDLE, ray::DashboardAgent, ...), which also
    overwrites /proc/PID/environ, so their marker can no longer be read."""
    return proc.comm.startswith("ray::")


def pss_mb(pid: int) -> float:
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith(b"Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cmdline(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()


def busy_cpu_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK  # all but idle and iowait (guest is inside user)


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def role_of(pid: int, root: int, comm: str, cmd: str, previous: str | None) -> str:
    if pid == root:
        return "driver"
    if not cmd and previous not in (None, "other"):
        return previous  # an exiting process's cmdline reads empty: keep what it was
    if previous == "actors" or "ChunkRunner" in cmd:
        return "actors"  # the title goes ray::IDLE -> ray::MapWorker(MapBatches(ChunkRunner)); stays an actor
    if comm == "raylet":
        return "raylet"
    if comm == "gcs_server":
        return "gcs_server"
    if cmd.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")) or any(
        s in cmd for s in ("dashboard/dashboard.py", "dashboard/agent.py", "monitor.py", "runtime_env/agent")
    ):
        return "ray daemons (python)"
    if cmd.startswith("ray::") or "default_worker.py" in cmd or "setup_worker.py" in cmd:
        return "ray workers (other)"
    return "other"


@dataclass(slots=True)
class Member:
    pid: int
    how: str  # "descendant", "run tag" (found only by the marker), "cluster tag"
    role: str
    title: str
    ticks: int = 0
    ticks0: int = 0  # CPU it had used before the run began (a pre-started cluster's processes)
    rss_mb: float = 0.0
    reparented_alive: bool = False

    @property
    def group(self) -> str:
        return f"cluster: {self.role}" if self.how.startswith("cluster") else self.role

    @property
    def cpu_s(self) -> float:
        return (self.ticks - self.ticks0) / CLK


class TreeSampler(threading.Thread):
    """Samples the RSS/PSS of the run's process tree (see the module docstring); kills the driver after `timeout`."""

    def __init__(self, root: int, run_tag: str, cluster_tag: str | None, interval: float, timeout: float,
                 nginx_cpu: Any = None, run_path: str | None = None, cluster_path: str | None = None) -> None:  # fmt: skip
        super().__init__(name="tree-sampler", daemon=True)
        self.root, self.run_tag, self.cluster_tag = root, run_tag, cluster_tag
        self.run_path, self.cluster_path = run_path, cluster_path
        self.nginx_cpu = nginx_cpu or (lambda: 0.0)
        # (epoch s, machine busy CPU s, nginx CPU s, {role group: CPU s so far, exited processes at their last value})
        self.cpu_timeline: list[tuple[float, float, float, dict[str, float]]] = []
        self.interval, self.timeout = interval, timeout
        self.members: dict[tuple[int, int], Member] = {}
        self._checked: dict[tuple[int, int], str | None] = {}
        self.samples: list[tuple[float, float, float, int]] = []  # (s, RSS MB, PSS MB, processes)
        self.peak_rss = self.peak_pss = 0.0
        self.peak_detail: list[tuple[str, str, str, float, float]] = []  # (origin, role, title, RSS, PSS)
        self.peak_driver_side = self.peak_cluster_side = 0.0
        self.peak_at_s = 0.0
        self.timed_out = False
        self._halt = threading.Event()
        self.started = time.perf_counter()
        self.start_ticks = int(float(Path("/proc/uptime").read_text().split()[0]) * CLK)  # now, in ticks after boot
        self.cpu_used = 0.0  # this thread's own CPU

    def run(self) -> None:
        cpu0 = time.thread_time()
        while not self._halt.is_set():
            self.sample()
            if time.perf_counter() - self.started > self.timeout and not self.timed_out:
                self.timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.root, signal.SIGKILL)  # our own child only; its tagged leftovers are swept after
            self._halt.wait(self.interval)
        self.sample()
        self.cpu_used = time.thread_time() - cpu0

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def _marked(self, proc: Proc) -> str | None:
        """"run" / "cluster" when the process carries a marker (env), or, retitled by Ray, holds files in that Ray dir."""
        key = (proc.pid, proc.start)
        if key not in self._checked:
            tag = env_tag(proc.pid)
            found = "run" if tag is not None and tag == self.run_tag else "cluster" if tag is not None and tag == self.cluster_tag else None
            if found is None and _retitled(proc):
                if self.run_path and holds_file_under(proc.pid, self.run_path):
                    found = "run"
                elif self.cluster_path and holds_file_under(proc.pid, self.cluster_path):
                    found = "cluster"
            self._checked[key] = found
        return self._checked[key]

    def sample(self) -> None:
        procs = scan_procs()
        children: dict[int, list[int]] = defaultdict(list)
        for proc in procs.values():
            children[proc.ppid].append(proc.pid)

        def below(roots: list[int]) -> set[int]:
            seen: set[int] = set()
            todo = [r for r in roots if r in procs]
            while todo:
                pid = todo.pop()
                if pid not in seen:
                    seen.add(pid)
                    todo.extend(children.get(pid, ()))
            return seen

        descendants = below([self.root])
        # New processes: a descendant of the driver; else marked; else below a marked or counted process.
        how_of: dict[int, str] = {}
        for proc in procs.values():
            if (proc.pid, proc.start) in self.members or proc.pid in descendants:
                continue
            if (mark := self._marked(proc)) is not None:
                how_of[proc.pid] = f"{mark} tag"
        cluster_roots = [m.pid for m in self.members.values() if m.how.startswith("cluster")] + [
            pid for pid, how in how_of.items() if how == "cluster tag"]
        run_roots = [m.pid for m in self.members.values() if not m.how.startswith("cluster")] + [
            pid for pid, how in how_of.items() if how == "run tag"]
        below_cluster, below_run = below(cluster_roots), below(run_roots)
        rss = pss = driver_side = cluster_side = 0.0
        detail = []
        alive = 0
        for proc in procs.values():
            key = (proc.pid, proc.start)
            member = self.members.get(key)
            if member is None:
                if proc.pid in descendants:
                    how = "descendant"
                elif proc.pid in how_of:
                    how = how_of[proc.pid]
                elif proc.pid in below_run:
                    how = "run child"
                elif proc.pid in below_cluster:
                    how = "cluster child"
                else:
                    continue
                member = self.members[key] = Member(proc.pid, how, "other", "",
                                                    ticks0=proc.ticks if proc.start < self.start_ticks else 0)
            elif member.how == "descendant" and proc.pid not in descendants and proc.state != "Z":
                member.reparented_alive = True
            if proc.state == "Z":
                continue
            cmd = cmdline(proc.pid)
            if cmd:
                member.title = cmd[:90]
            member.role = role_of(proc.pid, self.root, proc.comm, cmd, member.role)
            member.ticks = proc.ticks
            member.rss_mb = proc.rss_pages * PAGE_MB
            p = pss_mb(proc.pid)
            rss += member.rss_mb
            pss += p
            alive += 1
            origin = "cluster" if member.how.startswith("cluster") else "driver"
            if origin == "cluster":
                cluster_side += member.rss_mb
            else:
                driver_side += member.rss_mb
            detail.append((origin, member.role, member.title, round(member.rss_mb, 1), round(p, 1)))
        self.samples.append((round(time.perf_counter() - self.started, 3), round(rss, 1), round(pss, 1), alive))
        by_group: dict[str, float] = defaultdict(float)
        for m in self.members.values():
            by_group[m.group] += m.cpu_s
        self.cpu_timeline.append((time.time(), busy_cpu_s(), self.nginx_cpu(), dict(by_group)))
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_driver_side = max(self.peak_driver_side, driver_side)
        self.peak_cluster_side = max(self.peak_cluster_side, cluster_side)
        if rss > self.peak_rss:
            self.peak_rss, self.peak_detail, self.peak_at_s = rss, detail, self.samples[-1][0]


def window_cpu(timeline: list[tuple[float, float, float, dict[str, float]]], a: float, b: float) -> dict[str, float] | None:
    """CPU seconds used between epoch times a and b: machine busy, nginx, and per role group (linear between samples)."""
    if len(timeline) < 2 or not timeline[0][0] <= a < b <= timeline[-1][0]:
        return None

    def at(t: float) -> dict[str, float]:
        for (t0, busy0, ng0, g0), (t1, busy1, ng1, g1) in zip(timeline, timeline[1:]):
            if t0 <= t <= t1:
                w = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
                values = {"machine busy": busy0 + w * (busy1 - busy0), "nginx": ng0 + w * (ng1 - ng0)}
                for key in g0.keys() | g1.keys():
                    values[key] = g0.get(key, 0.0) + w * (g1.get(key, 0.0) - g0.get(key, 0.0))
                return values
        raise ValueError(t)

    start, end = at(a), at(b)
    return {k: round(end.get(k, 0.0) - start.get(k, 0.0), 3) for k in end.keys() | start.keys()}


def tagged_pids(prefix: str, path: str | None = None) -> list[int]:
    """Live (non-zombie) processes this script started: those whose marker starts with `prefix`, those Ray
    retitled that hold files under `path` (our private RAY_TMPDIR), and every descendant of either."""
    procs = scan_procs()
    children: dict[int, list[int]] = defaultdict(list)
    for proc in procs.values():
        children[proc.ppid].append(proc.pid)
    todo = []
    for proc in procs.values():
        if proc.state == "Z" or proc.pid == os.getpid():
            continue
        tag = env_tag(proc.pid)
        if (tag is not None and tag.startswith(prefix)) or (path and _retitled(proc) and holds_file_under(proc.pid, path)):
            todo.append(proc.pid)
    found: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in found and pid != os.getpid():
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return sorted(p for p in found if procs[p].state != "Z")


def stop_tagged(prefix: str, path: str | None = None, grace: float = 10.0) -> dict[str, Any]:
    """SIGTERM every live process of ours (see `tagged_pids`), SIGKILL what is left after `grace` s."""
    pids = tagged_pids(prefix, path)
    names = {pid: cmdline(pid)[:80] for pid in pids}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p in names for p in tagged_pids(prefix, path)):
        time.sleep(0.2)
    killed = [p for p in tagged_pids(prefix, path) if p in names]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    return {"signalled": len(pids), "needed_sigkill": [names[p] for p in killed],
            "still_alive": [cmdline(p)[:80] for p in tagged_pids(prefix, path)]}  # fmt: skip


# -- one run ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str  # "local", "ray 1", "ray 2", "pre 2"
    engine: str
    actors: int
    concurrency: int
    prestarted: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} c{self.concurrency}"


@dataclass
class Run:
    setting: str
    engine: str
    actors: int
    concurrency: int
    prestarted: bool
    repeat: int
    rows: int
    exit_code: int
    problem: str | None
    wall_s: float
    wall_rows_per_s: float
    steady_rows_per_s: float | None
    active_rows_per_s: float | None
    driver_rows_per_s: float | None
    requests: int
    startup_s: float | None  # process start to the first request
    send_s: float | None  # first to last request
    finish_s: float | None  # last request to exit
    engine_line_s: float | None  # Ray: process start to "Ray engine: ..." (ray.init done, dataset about to run)
    final_line_s: float | None
    summary_rows_per_s: float | None  # batchgen's own "time: S s, R rows/s"
    peak_rss_mb: float
    peak_at_s: float  # when the RSS sum peaked, s from process start
    peak_pss_mb: float
    peak_driver_side_rss_mb: float  # the driver's tree (descendants / run marker)
    peak_cluster_rss_mb: float  # the pre-started cluster's processes
    peak_by_role_rss_mb: dict[str, float]
    peak_processes: list[tuple[str, str, str, float, float]]
    processes_counted: int
    found_only_by_marker: list[str]  # titles of run processes that were not descendants when first seen
    reparented_alive: list[str]  # descendants seen alive outside the tree later
    cpu_by_role_s: dict[str, float]
    cpu_tree_s: float  # sampled, lower bound (cluster included for pre 2)
    cpu_wait4_s: float  # the driver + the descendants it reaped
    driver_maxrss_mb: float
    nginx_cpu_s: float
    sampler_cpu_s: float
    background_cpu_s: float
    rows_per_actor_cpu_s: float | None  # whole run, actor start-up (imports) included
    steady_window_s: float | None
    steady_cpu_s: dict[str, float] | None  # CPU s within the steady window, by role group, nginx, machine busy
    steady_cpu_ms_per_1000_rows: dict[str, float] | None
    steady_rows_per_actor_cpu_s: float | None  # rows in the steady window / the actors' CPU in it
    steady_machine_cpu_util: float | None  # busy CPU in the steady window / (window x cores)
    rows_per_tree_cpu_s: float | None
    leftovers: list[str]
    ray_messages: list[str]
    log_tail: str = ""
    rss_timeline: list[tuple[float, float, float, int]] = field(default_factory=list)


def child_env(tag: str, ray_tmp: Path, *, token_auth: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy") and k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env[TAG_VAR] = tag
    env["RAY_TMPDIR"] = str(ray_tmp)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if token_auth:
        env["RAY_AUTH_MODE"] = "token"  # a `ray start` cluster has token auth on; a client must say so (see README notes)
    return env


def check_output(out: Path, engine: str, rows: int) -> str | None:
    import polars as pl

    if engine == "local":
        if not out.is_file():
            return f"no output file {out}"
        frame = pl.read_parquet(out, columns=["error"])
    else:
        parts = sorted(out.glob("*.parquet"))
        if not parts:
            return f"no part files in {out}"
        frame = pl.read_parquet(f"{out}/*.parquet", columns=["error", "input_index"])
        index = frame["input_index"]
        if index.n_unique() != frame.height or index.min() != 0 or index.max() != rows - 1:
            return f"input_index is not 0..{rows - 1} once each ({index.n_unique()} distinct, {index.min()!r}..{index.max()!r})"
    if frame.height != rows:
        return f"output has {frame.height} rows, expected {rows}"
    errors = frame.height - frame["error"].null_count()
    if errors:
        return f"{errors} error rows in the output"
    return None


def _normalise(line: str) -> str:
    line = re.sub(r"^\[?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\]?\s*", "", line)
    line = re.sub(r"\b[0-9a-f]{16,}\b", "<id>", line)
    return re.sub(r"\b\d+\b", "N", line).strip()


def run_once(setting: Setting, repeat: int, inp: Path, work: Path, stub: LoggedStub, args: argparse.Namespace,
             bench_id: str, cluster: dict[str, Any] | None) -> Run:  # fmt: skip
    out = work / ("out.parquet" if setting.engine == "local" else "out-ray")
    shutil.rmtree(out, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    run_tag = f"{bench_id}:run-{setting.label.replace(' ', '-')}-{repeat}-{uuid.uuid4().hex[:6]}"
    command = [args.python, "-m", "batchgen", "run", "--input", str(inp), "--output", str(out), "--base-url", stub.base_url,
               "--model", "stub", "--max-tokens", str(MAX_TOKENS), "--no-progress", "--overwrite",
               "--concurrency", str(setting.concurrency)]  # fmt: skip
    if setting.engine == "ray":
        command += ["--engine", "ray", "--ray-actors", str(setting.actors), "--ray-block-rows", str(args.block_rows)]
        if setting.prestarted:
            assert cluster is not None
            command += ["--ray-address", cluster["address"]]
    ray_tmp = cluster["ray_tmp"] if setting.prestarted and cluster else work / "own"
    env = child_env(run_tag, ray_tmp, token_auth=setting.prestarted)
    log_offset = stub.log_size()
    nginx0, busy0, self0 = stub.cpu_seconds(), busy_cpu_s(), self_cpu_s()
    lines: list[tuple[float, str]] = []
    t0 = time.time()
    p0 = time.perf_counter()
    process = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)  # fmt: skip
    sampler = TreeSampler(process.pid, run_tag, cluster["tag"] if setting.prestarted and cluster else None,
                          args.interval, args.timeout, stub.cpu_seconds, run_path=str(work / "own"),
                          cluster_path=str(cluster["ray_tmp"]) if setting.prestarted and cluster else None)  # fmt: skip
    sampler.start()

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            lines.append((time.time(), raw.decode(errors="replace").rstrip("\n")))

    reader = threading.Thread(target=read, name="stderr-reader", daemon=True)
    reader.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()  # our own child only
        os.wait4(process.pid, 0)
        raise
    wall = time.perf_counter() - p0
    t_exit = t0 + wall
    process.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop()
    reader.join(timeout=10.0)
    nginx_cpu, busy, self_cpu = stub.cpu_seconds() - nginx0, busy_cpu_s() - busy0, self_cpu_s() - self0
    # Whatever this run started and is still alive (zombies aside) once the driver is gone.
    deadline = time.monotonic() + 10.0
    own = str(work / "own")
    while (left := tagged_pids(run_tag, own)) and time.monotonic() < deadline:
        time.sleep(0.25)
    leftovers = [f"{pid} {cmdline(pid)[:80]}" for pid in left]
    if left:
        stop_tagged(run_tag, own, grace=5.0)
    if reader.is_alive():
        leftovers.append("the driver's stdout/stderr pipe was still held open 10 s after it exited")

    text = "\n".join(line for _, line in lines)
    times = stub.chat_times(log_offset)
    rows = args.rows
    engine_line = next((t - t0 for t, line in lines if _ENGINE_LINE.match(line)), None)
    final_line = next((t - t0 for t, line in lines if _FINAL_LINE.match(line)), None)
    summary = next((m for _, line in lines if (m := _SUMMARY.match(line))), None)
    steady = active = steady_cpu = None
    steady_window: tuple[float, float, int] | None = None
    if len(times) >= 20:
        lo, hi = int(0.1 * len(times)), int(0.9 * len(times)) - 1
        steady = (hi - lo) / (times[hi] - times[lo]) if times[hi] > times[lo] else None
        active = rows / (times[-1] - times[0]) if times[-1] > times[0] else None
        steady_window = (times[lo], times[hi], hi - lo)
        steady_cpu = window_cpu(sampler.cpu_timeline, times[lo], times[hi])
    if setting.engine == "ray":
        driver = rows / (final_line - engine_line) if engine_line is not None and final_line is not None else None
    else:
        driver = float(summary.group(2)) if summary else None

    problem = check_output(out, setting.engine, rows)
    if process.returncode != 0:
        problem = f"exit code {process.returncode}" + (f"; {problem}" if problem else "")
    if sampler.timed_out:
        problem = f"killed after {args.timeout:g} s" + (f"; {problem}" if problem else "")
    if len(times) < rows:
        problem = (problem + "; " if problem else "") + f"the stub logged {len(times)} chat requests for {rows} rows"
    shutil.rmtree(out, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        out.unlink()

    by_role: dict[str, float] = defaultdict(float)
    cpu_by_role: dict[str, float] = defaultdict(float)
    for origin, role, _, rss, _ in sampler.peak_detail:
        by_role[role if origin == "driver" else f"cluster: {role}"] += rss
    for member in sampler.members.values():
        cpu_by_role[member.group] += member.cpu_s
    tree_cpu = sum(cpu_by_role.values())
    actor_cpu = sum(v for k, v in cpu_by_role.items() if k.endswith("actors"))
    per_row = None  # CPU per 1000 rows within the steady window
    steady_actor_rate = steady_util = None
    if steady_cpu is not None and steady_window is not None:
        a, b, n = steady_window
        per_row = {k: round(v / n * 1e6, 1) for k, v in sorted(steady_cpu.items())}
        actors_cpu = sum(v for k, v in steady_cpu.items() if k.endswith("actors"))
        steady_actor_rate = round(n / actors_cpu, 1) if actors_cpu > 0 else None
        steady_util = round(steady_cpu["machine busy"] / ((b - a) * (os.cpu_count() or 1)), 3)
    ray_messages = [line for _, line in lines if line.strip() and not _OURS.match(line)]
    timeline = sampler.samples
    step = max(1, len(timeline) // 150)
    return Run(
        setting=setting.label, engine=setting.engine, actors=setting.actors if setting.engine == "ray" else 0,
        concurrency=setting.concurrency, prestarted=setting.prestarted, repeat=repeat, rows=rows,
        exit_code=process.returncode, problem=problem, wall_s=round(wall, 3), wall_rows_per_s=round(rows / wall, 1),
        steady_rows_per_s=None if steady is None else round(steady, 1),
        active_rows_per_s=None if active is None else round(active, 1),
        driver_rows_per_s=None if driver is None else round(driver, 1), requests=len(times),
        startup_s=round(times[0] - t0, 3) if times else None,
        send_s=round(times[-1] - times[0], 3) if times else None,
        finish_s=round(t_exit - times[-1], 3) if times else None,
        engine_line_s=None if engine_line is None else round(engine_line, 3),
        final_line_s=None if final_line is None else round(final_line, 3),
        summary_rows_per_s=float(summary.group(2)) if summary else None,
        peak_rss_mb=round(sampler.peak_rss, 1), peak_at_s=sampler.peak_at_s, peak_pss_mb=round(sampler.peak_pss, 1),
        peak_driver_side_rss_mb=round(sampler.peak_driver_side, 1), peak_cluster_rss_mb=round(sampler.peak_cluster_side, 1),
        peak_by_role_rss_mb={k: round(v, 1) for k, v in sorted(by_role.items())},
        peak_processes=sorted(sampler.peak_detail, key=lambda d: -d[3]),
        processes_counted=len(sampler.members),
        found_only_by_marker=[f"{m.title} ({m.how})" for m in sampler.members.values() if m.how.startswith("run")],
        reparented_alive=[m.title for m in sampler.members.values() if m.reparented_alive],
        cpu_by_role_s={k: round(v, 2) for k, v in sorted(cpu_by_role.items())}, cpu_tree_s=round(tree_cpu, 2),
        cpu_wait4_s=round(usage.ru_utime + usage.ru_stime, 2), driver_maxrss_mb=round(usage.ru_maxrss / 1024, 1),
        nginx_cpu_s=round(nginx_cpu, 2), sampler_cpu_s=round(sampler.cpu_used, 2),
        background_cpu_s=round(max(0.0, busy - tree_cpu - nginx_cpu - self_cpu), 2),
        rows_per_actor_cpu_s=round(rows / actor_cpu, 1) if actor_cpu else None,
        steady_window_s=round(steady_window[1] - steady_window[0], 3) if steady_window else None,
        steady_cpu_s=steady_cpu, steady_cpu_ms_per_1000_rows=per_row,
        steady_rows_per_actor_cpu_s=steady_actor_rate, steady_machine_cpu_util=steady_util,
        rows_per_tree_cpu_s=round(rows / tree_cpu, 1) if tree_cpu else None,
        leftovers=leftovers, ray_messages=ray_messages,
        log_tail=text[-(4000 if problem else 1500):], rss_timeline=timeline[::step],
    )  # fmt: skip


# -- the pre-started cluster -----------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def prestarted_cluster(args: argparse.Namespace, work: Path, bench_id: str) -> Iterator[dict[str, Any]]:
    """`ray start --head` with our marker in its environment; stopped by signalling only the processes carrying it."""
    tag = f"{bench_id}:cluster"
    ray_tmp = work / "pre"
    port = _free_port()
    ray = str(Path(args.python).with_name("ray"))
    command = [ray, "start", "--head", "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard=false",
               "--port", str(port)]  # fmt: skip
    env = child_env(tag, ray_tmp)
    info: dict[str, Any] = {"command": " ".join(command[1:]), "tag": tag, "ray_tmp": ray_tmp}
    try:
        started = time.perf_counter()
        done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
        info["start_s"] = round(time.perf_counter() - started, 2)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            raise RuntimeError(f"ray start failed ({done.returncode}):\n{output[-3000:]}")
        match = re.search(r"ray start --address='([^']+)'", output)
        info["address"] = match.group(1) if match else f"127.0.0.1:{port}"
        info["start_messages"] = [_normalise(line) for line in output.splitlines() if "WARNING" in line or " E " in line]
        yield info
    finally:
        info["stop"] = stop_tagged(tag, str(ray_tmp), grace=15.0)


def idle_cluster_rss(tag: str, work_pre: Path, seconds: float = 2.0) -> dict[str, Any]:
    """RSS / PSS of the idle cluster's processes (by marker), median of a few samples."""
    totals, pss_totals, names = [], [], []
    for _ in range(max(1, int(seconds / 0.25))):
        pids = tagged_pids(tag, str(work_pre))
        procs = scan_procs()
        totals.append(sum(procs[p].rss_pages * PAGE_MB for p in pids if p in procs))
        pss_totals.append(sum(pss_mb(p) for p in pids))
        procs_now = {p: procs[p] for p in pids if p in procs}
        names = [f"{role_of(p, -1, pr.comm, cmdline(p), None)}: {cmdline(p).split(' ')[0].rsplit('/', 1)[-1][:50]}"
                 for p, pr in procs_now.items()]  # fmt: skip
        time.sleep(0.25)
    return {"rss_mb": round(statistics.median(totals), 1), "pss_mb": round(statistics.median(pss_totals), 1), "processes": names}


# -- summary ---------------------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def summarise(runs: list[Run], settings: list[Setting]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in settings:
        ok = [r for r in runs if r.setting == s.label and r.problem is None]
        if not ok:
            out[s.label] = {"runs_ok": 0}
            continue
        m: dict[str, Any] = {"runs_ok": len(ok), "engine": s.engine, "actors": s.actors if s.engine == "ray" else 0,
                             "concurrency_total": s.concurrency, "prestarted": s.prestarted,
                             "concurrency_per_actor": s.concurrency // max(1, s.actors) if s.engine == "ray" else s.concurrency}  # fmt: skip
        for name in ("wall_s", "wall_rows_per_s", "steady_rows_per_s", "active_rows_per_s", "driver_rows_per_s",
                     "startup_s", "send_s", "finish_s", "engine_line_s", "peak_rss_mb", "peak_at_s", "peak_pss_mb",
                     "peak_driver_side_rss_mb", "peak_cluster_rss_mb", "cpu_tree_s", "cpu_wait4_s", "nginx_cpu_s",
                     "background_cpu_s", "rows_per_actor_cpu_s", "rows_per_tree_cpu_s", "processes_counted",
                     "steady_rows_per_actor_cpu_s", "steady_machine_cpu_util", "steady_window_s"):  # fmt: skip
            value = _median([getattr(r, name) for r in ok])
            m[name] = None if value is None else round(value, 3 if name.endswith(("_s", "_util")) else 1)
        m["peak_rss_mb_max"] = max(r.peak_rss_mb for r in ok)
        roles = sorted({k for r in ok for k in r.peak_by_role_rss_mb})
        m["peak_by_role_rss_mb"] = {k: round(_median([r.peak_by_role_rss_mb.get(k, 0.0) for r in ok]) or 0.0, 1) for k in roles}
        keys = sorted({k for r in ok for k in (r.steady_cpu_ms_per_1000_rows or {})})
        m["steady_cpu_ms_per_1000_rows"] = {
            k: round(_median([(r.steady_cpu_ms_per_1000_rows or {}).get(k) for r in ok]) or 0.0, 1) for k in keys}
        roles = sorted({k for r in ok for k in r.cpu_by_role_s})
        m["cpu_by_role_s"] = {k: round(_median([r.cpu_by_role_s.get(k, 0.0) for r in ok]) or 0.0, 2) for k in roles}
        if s.engine == "ray":
            m["per_actor_steady_rows_per_s"] = round(m["steady_rows_per_s"] / s.actors, 1) if m["steady_rows_per_s"] else None
            m["per_actor_active_rows_per_s"] = round(m["active_rows_per_s"] / s.actors, 1) if m["active_rows_per_s"] else None
        out[s.label] = m
    return out


def _f(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def print_runs(runs: list[Run]) -> None:
    header = (f"{'setting':<13} {'rep':>3} {'wall s':>6} {'wall r/s':>8} {'steady':>7} {'active':>7} {'driver':>7} "
              f"{'start s':>7} {'send s':>6} {'fin s':>5} {'RSS MB':>7} {'PSS MB':>7} {'procs':>5} {'CPU s':>6} "
              f"{'nginx s':>7} {'bg s':>5}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in runs:
        print(f"{r.setting:<13} {r.repeat + 1:>3} {r.wall_s:>6.2f} {r.wall_rows_per_s:>8.0f} {_f(r.steady_rows_per_s, '>7.0f')} "
              f"{_f(r.active_rows_per_s, '>7.0f')} {_f(r.driver_rows_per_s, '>7.0f')} {_f(r.startup_s, '>7.2f')} "
              f"{_f(r.send_s, '>6.2f')} {_f(r.finish_s, '>5.2f')} {r.peak_rss_mb:>7.0f} {r.peak_pss_mb:>7.0f} "
              f"{r.processes_counted:>5} {r.cpu_tree_s:>6.1f} {r.nginx_cpu_s:>7.1f} {r.background_cpu_s:>5.1f}"
              + (f"  PROBLEM: {r.problem}" if r.problem else ""))  # fmt: skip


def print_summary(summary: dict[str, Any], repeats: int) -> None:
    print(f"\nMedians over {repeats} repeat(s) (rows/s; steady = stub-side 10-90% of requests):")
    header = (f"{'setting':<13} {'actors':>6} {'c/actor':>7} {'wall r/s':>8} {'steady':>7} {'active':>7} {'driver':>7} "
              f"{'wall s':>6} {'peak RSS MB':>11} {'peak PSS MB':>11} {'CPU s':>6} {'per-actor steady':>16} {'rows/actor-CPU-s':>16}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for label, m in summary.items():
        if not m.get("runs_ok"):
            print(f"{label:<13} no run without a problem")
            continue
        print(f"{label:<13} {m['actors'] or '-':>6} {m['concurrency_per_actor']:>7} {_f(m['wall_rows_per_s'], '>8.0f')} "
              f"{_f(m['steady_rows_per_s'], '>7.0f')} {_f(m['active_rows_per_s'], '>7.0f')} {_f(m['driver_rows_per_s'], '>7.0f')} "
              f"{_f(m['wall_s'], '>6.2f')} {_f(m['peak_rss_mb'], '>11.0f')} {_f(m['peak_pss_mb'], '>11.0f')} "
              f"{_f(m['cpu_tree_s'], '>6.1f')} {_f(m.get('per_actor_steady_rows_per_s'), '>16.0f')} "
              f"{_f(m['steady_rows_per_actor_cpu_s'], '>16.0f')}")  # fmt: skip
    print("\nPeak RSS by role (MB, medians; at the sample where the tree's sum peaked) and CPU s by role:")
    for label, m in summary.items():
        if m.get("runs_ok"):
            roles = ", ".join(f"{k} {v:.0f}" for k, v in m["peak_by_role_rss_mb"].items() if v)
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in m["cpu_by_role_s"].items() if v >= 0.05)
            print(f"  {label:<13} RSS: {roles}\n  {'':<13} CPU: {cpu}")
    print("\nWithin the steady window: CPU ms per 1000 rows by role (medians), and the machine's busy share of all cores:")
    for label, m in summary.items():
        if m.get("runs_ok"):
            cpu = ", ".join(f"{k} {v:.0f}" for k, v in m["steady_cpu_ms_per_1000_rows"].items() if v >= 0.5)
            print(f"  {label:<13} {cpu}; busy {_f(m['steady_machine_cpu_util'], '.0%')} of {os.cpu_count()} cores")
    print("\nPhases (s from process start, medians): first request / 'Ray engine:' line / sending / last request to exit")
    for label, m in summary.items():
        if m.get("runs_ok"):
            print(f"  {label:<13} start-up {_f(m['startup_s'], '.2f')}, engine line {_f(m['engine_line_s'], '.2f')}, "
                  f"sending {_f(m['send_s'], '.2f')}, finish {_f(m['finish_s'], '.2f')}; RSS peak at {_f(m['peak_at_s'], '.1f')}")  # fmt: skip


def _versions(python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, sys, json;"
            "print(json.dumps({'python': sys.version.split()[0], **{p: m.version(p) for p in "
            "('ray','pyarrow','polars','aiohttp')}}))")  # fmt: skip
    try:
        versions: dict[str, str] = json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)
    except (subprocess.CalledProcessError, json.JSONDecodeError, OSError):
        versions = {}
    with contextlib.suppress(OSError):
        versions["nginx"] = subprocess.run(["/usr/sbin/nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    return versions


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--concurrency", default="64,128", help="comma-separated TOTAL concurrencies (default 64,128)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat at concurrency 64")
    parser.add_argument("--block-rows", type=int, default=1000, help="--ray-block-rows, and the input's row-group size")
    parser.add_argument("--no-prestarted", action="store_true", help="skip the runs on a cluster started beforehand")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a run is killed")
    parser.add_argument("--nginx-workers", type=int, default=1)
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable)
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.quick:
        args.repeats, args.concurrency = 1, [64]
    return args


def make_settings(args: argparse.Namespace) -> list[Setting]:
    settings = []
    for c in args.concurrency:
        settings += [Setting("local", "local", 0, c), Setting("ray 1", "ray", 1, c), Setting("ray 2", "ray", 2, c)]
        if not args.no_prestarted:
            settings.append(Setting("pre 2", "ray", 2, c, prestarted=True))
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop nginx and the cluster
    started_at = dt.datetime.now()
    source_at_start = source_hash()
    bench_id = f"bench-ray-{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="brb-"))  # short: Ray's socket paths live under it (<= 107 bytes)
    (work / "own").mkdir()
    (work / "pre").mkdir()
    inp = work / f"prompts-{args.rows}.parquet"
    pq.write_table(pa.table({"prompt": [f"question {i}" for i in range(args.rows)]}), inp, row_group_size=args.block_rows)
    settings = make_settings(args)
    runs: list[Run] = []
    warmups: list[Run] = []
    cluster_info: dict[str, Any] | None = None
    idle: dict[str, Any] | None = None
    try:
        stub = LoggedStub(workers=args.nginx_workers)
    except NginxNotInstalledError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with stub, contextlib.ExitStack() as stack:
            print(f"batchgen source {source_at_start}; {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}; "
                  f"{args.rows} rows; nginx stub {stub.base_url}; work dir {work}", flush=True)  # fmt: skip
            # Unmeasured runs first: caches warm, and the outputs must be right before anything is measured.
            checks = [Setting("local", "local", 0, args.concurrency[0]), Setting("ray 2", "ray", 2, args.concurrency[0])]
            for s in checks:
                print(f"  check run: {s.label} ...", end=" ", flush=True)
                run = run_once(s, -1, inp, work, stub, args, bench_id, None)
                warmups.append(run)
                print("ok" if run.problem is None else f"PROBLEM: {run.problem}", flush=True)
                if run.problem:
                    print(run.log_tail, file=sys.stderr)
                    print(f"error: the {s.engine} engine's check run failed ({run.problem}); nothing measured", file=sys.stderr)
                    return 1
            if not args.no_prestarted:
                print("  starting a Ray cluster (ray start --head) ...", end=" ", flush=True)
                cluster_info = stack.enter_context(prestarted_cluster(args, work, bench_id))
                print(f"at {cluster_info['address']} in {cluster_info['start_s']:.1f} s", flush=True)
                run = run_once(Setting("pre 2", "ray", 2, args.concurrency[0], True), -1, inp, work, stub, args, bench_id, cluster_info)
                warmups.append(run)
                if run.problem:
                    print(run.log_tail, file=sys.stderr)
                    print(f"error: the check run on the pre-started cluster failed ({run.problem})", file=sys.stderr)
                    return 1
                idle = idle_cluster_rss(cluster_info["tag"], cluster_info["ray_tmp"])
                print(f"  idle cluster after a job: {idle['rss_mb']:.0f} MB RSS, {idle['pss_mb']:.0f} MB PSS, "
                      f"{len(idle['processes'])} processes", flush=True)  # fmt: skip
            for repeat in range(args.repeats):
                order = settings if repeat % 2 == 0 else settings[::-1]
                for s in order:
                    print(f"  {s.label}, repeat {repeat + 1}/{args.repeats} ...", end=" ", flush=True)
                    time.sleep(1.0)  # let the previous run's processes settle
                    run = run_once(s, repeat, inp, work, stub, args, bench_id, cluster_info)
                    runs.append(run)
                    print(f"{run.wall_s:.1f} s wall, {_f(run.steady_rows_per_s, '.0f')} rows/s steady, "
                          f"{run.wall_rows_per_s:.0f} wall, peak {run.peak_rss_mb:.0f} MB RSS, bg CPU {run.background_cpu_s:.1f} s"
                          + (f"  PROBLEM: {run.problem}" if run.problem else "")
                          + (f"  LEFTOVERS: {run.leftovers}" if run.leftovers else ""), flush=True)  # fmt: skip
                    if run.problem:
                        print(run.log_tail[-2000:], file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        sweep = stop_tagged(bench_id, str(work), grace=10.0)  # anything of ours still alive
        if sweep["signalled"]:
            print(f"warning: processes of this benchmark were still alive at the end: {sweep}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)

    print()
    print_runs(runs)
    summary = summarise(runs, settings)
    print_summary(summary, args.repeats)
    messages: dict[str, Counter[str]] = defaultdict(Counter)
    examples: dict[str, str] = {}
    for r in [*warmups, *runs]:
        for line in r.ray_messages:
            key = _normalise(line)
            messages[r.setting][key] += 1
            examples.setdefault(key, line)
    if messages:
        print("\nOther lines on the driver's stderr (normalised; count over all runs of the setting, check runs included):")
        for label, counter in messages.items():
            for key, n in counter.most_common():
                print(f"  {label:<13} x{n}: {key[:220]}")
    for r in runs:
        if r.engine == "ray" and r.repeat == 0:
            print(f"\nProcesses at the peak of {r.setting}, repeat 1 (origin, role, RSS MB, PSS MB, title):")
            for origin, role, title, rss, pss in r.peak_processes:
                print(f"  {origin:<7} {role:<21} {rss:>6.0f} {pss:>6.0f}  {title[:70]}")
            break
    found = sorted({t for r in runs for t in r.found_only_by_marker})
    reparented = sorted({t for r in runs for t in r.reparented_alive})
    print(f"\nProcesses counted only through the run marker (not descendants of the driver when first seen): {found or 'none'}")
    print(f"Descendants later seen alive outside the driver's tree (reparented): {reparented or 'none'}")
    if idle:
        print(f"Pre-started cluster idle (after its first job): {idle['rss_mb']:.0f} MB RSS / {idle['pss_mb']:.0f} MB PSS over "
              f"{len(idle['processes'])} processes: " + "; ".join(idle["processes"]))
    if cluster_info:
        print(f"Cluster stop: {cluster_info.get('stop')}")
    if not args.no_json:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        path = args.results_dir / f"ray-{started_at:%Y-%m-%d-%H%M%S}.json"
        document = {
            "benchmark": "bench_ray",
            "started": started_at.isoformat(timespec="seconds"),
            "finished": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(memory_total_mb=round(os.sysconf("SC_PHYS_PAGES") * PAGE_MB)),
            "versions": _versions(args.python),
            "batchgen_source_sha256_16": {"start": source_at_start, "end": source_hash()},
            "settings": {"rows": args.rows, "repeats": args.repeats, "concurrency_total": args.concurrency,
                         "block_rows": args.block_rows, "max_tokens": MAX_TOKENS, "interval_s": args.interval,
                         "nginx_workers": args.nginx_workers, "input": f"Parquet, one 'prompt' column, row groups of {args.block_rows}"},  # fmt: skip
            "prestarted_cluster": None if cluster_info is None else {
                k: (str(v) if isinstance(v, Path) else v) for k, v in cluster_info.items() if k != "tag"} | {"idle": idle},
            "summary": summary,
            "stderr_messages": {label: [{"count": n, "normalised": k, "example": examples[k]} for k, n in c.most_common()]
                                for label, c in messages.items()},  # fmt: skip
            "check_runs": [asdict(r) for r in warmups],
            "runs": [asdict(r) for r in runs],
        }
        path.write_text(json.dumps(document, indent=1) + "\n")
        print(f"\nwrote {path}")
    return 1 if any(r.problem for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())

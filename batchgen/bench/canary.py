"""The client's read delay: how long an event that has reached this process's socket waits before
the benchmark's code sees it.

A timer-based loop-lag probe (sleep 5 ms, measure the oversleep) misses the delay that matters:
when hundreds of streams deliver data, their I/O callbacks queue behind each other inside one loop
iteration, and a timer callback is not behind that queue the way a read is. So the probe is a read:
a small child process writes its `time.monotonic()` into one end of a socket pair at random times,
and a task on the benchmark's own event loop reads the other end through an asyncio stream, the
same path (selector → transport → protocol → waiting task) by which aiohttp hands a chunk to
`Stream.reads()`. Each stamp's delay, from its write to the task's wake-up, is one sample of the
delay the client adds to the chunks it times. `time.monotonic()` is one clock for every process of
the machine.

Why a process and not a thread: a thread needs this process's GIL to take its stamp, and the loop
holds the GIL while it is busy, so a thread's stamps would be taken only when the loop lets go (or
after a 5 ms switch interval), never early in a busy stretch, and the delays read far too short
(a third of the truth under a CPU hog, measured). Packets from a server do not wait for the GIL.

The write times are a Poisson process (exponential gaps, mean `PERIOD_S`): Poisson arrivals see time
averages (PASTA), so the samples are unbiased over busy and idle moments alike, and a stamp cannot
lock onto a periodic rhythm of the load. 200 writes a second cost the child ~1% of a core.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
import time
from types import TracebackType

__all__ = ["PERIOD_S", "ReadCanary"]

PERIOD_S = 0.005  # mean gap between stamps: 200 samples/s, a p99 from a few seconds of load
_STAMP = struct.Struct("<d")
# The writer: std-only and site-free (-S), so it starts in a few ms. It stops when the socket's
# other end closes (the send fails) or when it is terminated.
_WRITER = """
import random, socket, struct, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
period, rng, pack = float(sys.argv[2]), random.Random(int(sys.argv[3])), struct.Struct("<d").pack
due = time.monotonic()
while True:
    due = max(due + rng.expovariate(1.0 / period), time.monotonic())
    time.sleep(max(0.0, due - time.monotonic()))
    try:
        sock.send(pack(time.monotonic()))
    except OSError:
        break
"""


class ReadCanary:
    """Collects read-delay samples (seconds) while it is entered, on the running event loop.

    Example:
        async with ReadCanary() as canary:
            ...  # the load whose client delay is measured
        canary.delays_s, canary.read_at  # one sample per stamp read: its delay, and when
    """

    def __init__(self, period_s: float = PERIOD_S, seed: int = 0) -> None:
        self.period_s = period_s
        self.delays_s: list[float] = []
        self.read_at: list[float] = []  # time.perf_counter() of each sample's read (the records' clock)
        self._seed = seed
        self._writer_process: subprocess.Popen[bytes] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._stream: asyncio.StreamWriter | None = None  # held: a collected StreamWriter closes its socket

    async def __aenter__(self) -> ReadCanary:
        read_end, write_end = socket.socketpair()
        try:
            self._writer_process = subprocess.Popen(
                [sys.executable, "-S", "-c", _WRITER, str(write_end.fileno()), repr(self.period_s), str(self._seed)],
                pass_fds=(write_end.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            write_end.close()  # the child has its own copy
        reader, self._stream = await asyncio.open_connection(sock=read_end)
        self._reader_task = asyncio.create_task(self._read(reader))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except asyncio.CancelledError:
                pass
        if self._stream is not None:
            self._stream.close()
        if self._writer_process is not None:
            self._writer_process.terminate()
            await asyncio.to_thread(self._writer_process.wait)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        size = _STAMP.size
        pending = b""
        keep, keep_time = self.delays_s.append, self.read_at.append
        while data := await reader.read(1 << 16):
            now, now_perf = time.monotonic(), time.perf_counter()
            data = pending + data
            whole = len(data) - len(data) % size
            # Stamps read together arrived at different times: each gets its own delay.
            for (stamp,) in _STAMP.iter_unpack(data[:whole]):
                keep(now - stamp)
                keep_time(now_perf)
            pending = data[whole:]

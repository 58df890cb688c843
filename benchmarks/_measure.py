"""Timing and memory helpers shared by the benchmarks (run as scripts: ``python benchmarks/X.py``)."""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Callable

import psutil


def best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    """The fastest of ``repeats`` runs, in seconds: the least disturbed by a shared machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class PeakRSS:
    """Peak resident memory of this process while the block runs (a 2 ms sampling thread).

    ``extra`` (bytes) and ``delta_mib`` are the peak above the level at entry.
    """

    def __enter__(self) -> PeakRSS:
        _release_free_memory()
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.start

    @property
    def delta_mib(self) -> float:
        return self.extra / 2**20


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so that a block's peak RSS counts what it
    allocates rather than what earlier work freed and the allocator kept for reuse."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

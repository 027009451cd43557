"""The server process's heap: freeze what startup built, give back what malloc no longer uses.

Two things keep a long-running server's latency and memory flat (both found by the soak, #18):

* `freeze_startup_objects()`: once the model, the engine and the app are built, their hundreds
  of thousands of Python objects (torch and transformers modules, the tokenizer, the app) are
  moved to the collector's permanent generation (`gc.freeze()`), so the periodic full
  collections no longer walk them. A full collection stops every thread, the engine's too:
  on the demo server they took 195-255 ms (one stalled token for every stream, and a 4.9x TTFT
  p99 for a tenant next to a flood); after the freeze 35-46 ms. vLLM's server does the same.

* `MallocTrimmer`: glibc's malloc keeps freed chunks inside its arenas (one per thread that
  allocates: the engine thread, the threads that read adapter files, the event loop). The
  server frees and allocates tensors of ever-changing sizes (batches, adapter blobs, a
  fine-tuning job's activations), which leaves free holes between live chunks; glibc returns
  memory to the OS only from the top of a heap, so under churn the resident set creeps up
  while no object leaks. In the soak that was +3-5 MiB a minute (+5.8% in 10 minutes) with
  Python's own allocations flat under tracemalloc; with a `malloc_trim(0)` every 30 s, +2.7%.
  It releases the free pages inside every arena (madvise) in a few milliseconds, during which
  a thread allocating in the arena being trimmed waits: at most one slower step per interval.
  Off (a no-op) where the C library has no `malloc_trim` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time

logger = logging.getLogger(__name__)

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _load_malloc_trim():
    """libc's malloc_trim(size_t pad) -> int, or None when the C library lacks it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _load_malloc_trim()


def available() -> bool:
    return _malloc_trim is not None


def freeze_startup_objects() -> int:
    """Collect, then exempt every object alive now from later collections (they stay alive:
    call it once the long-lived state is built). Returns how many objects were frozen."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("%d startup objects frozen out of the garbage collector's scans (%.0f ms)",
                frozen, (time.perf_counter() - t0) * 1e3)  # fmt: skip
    return frozen


def resident_bytes() -> int:
    """This process's resident set (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except OSError:
        return 0


class MallocTrimmer:
    """A daemon thread that calls `malloc_trim(0)` every `interval_s` seconds until `stop()`.

    `trims` and `released_bytes` (the drop of the resident set across each call, never
    negative) count what it did."""

    def __init__(self, interval_s: float) -> None:
        if not 0 < interval_s < float("inf"):  # NaN fails too
            raise ValueError(f"malloc trim interval must be > 0 seconds and finite: {interval_s}")
        self.interval_s = interval_s
        self.trims = 0
        self.released_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def trim_once(self) -> int:
        """One `malloc_trim(0)`; returns the bytes the resident set dropped by (0 if off)."""
        if _malloc_trim is None:
            return 0
        before = resident_bytes()
        t0 = time.perf_counter()
        _malloc_trim(0)
        released = max(0, before - resident_bytes())
        self.trims += 1
        self.released_bytes += released
        logger.debug(
            "malloc_trim: %.1f MiB back to the OS in %.1f ms",
            released / 2**20,
            (time.perf_counter() - t0) * 1e3,
        )
        return released

    def start(self) -> MallocTrimmer:
        if not available():
            logger.info("malloc_trim is not in this C library: freed heap memory stays mapped")
            return self
        self._thread = threading.Thread(target=self._run, name="loraplex-malloc-trim", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.trim_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

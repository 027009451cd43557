"""server/heap.py (#18's soak): startup's objects leave the collector's full scans; freed heap
memory goes back to the OS.

Frozen objects stay alive but are no longer among the objects a collection walks. A fragmented
heap (many chunks freed between live ones, so glibc cannot shrink its top) keeps
its pages resident until `malloc_trim`; the trimmer releases them, runs on its own thread every
interval while the app runs, and is gone after shutdown."""

from __future__ import annotations

import ctypes
import gc
import threading
import time

import pytest
from server_fixtures import LiveServer, engine_kwargs, tiny_model

from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.server import heap
from loraplex.server.app import create_app
from loraplex.server.config import ServerConfig

needs_glibc = pytest.mark.skipif(not heap.available(), reason="no malloc_trim in libc")
THREAD = "loraplex-malloc-trim"


def _fragment_heap(chunks: int, chunk_bytes: int, keep_every: int) -> list[int]:
    """Allocate `chunks` touched chunks (under glibc's mmap threshold, so inside the arena),
    free all but every `keep_every`-th: the freed pages stay resident. Returns the live ones."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    ptrs = []
    for _ in range(chunks):
        p = libc.malloc(chunk_bytes)
        assert p
        ctypes.memset(p, 1, chunk_bytes)  # touch every page: resident
        ptrs.append(p)
    live = []
    for i, p in enumerate(ptrs):
        if i % keep_every == 0:
            live.append(p)
        else:
            libc.free(p)
    return live


def _free(ptrs: list[int]) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.free.argtypes = [ctypes.c_void_p]
    for p in ptrs:
        libc.free(p)


def test_freeze_takes_the_live_objects_out_of_collections():
    startup = [[i] for i in range(100_000)]  # tracked containers, like a built model's
    try:
        frozen = heap.freeze_startup_objects()
        assert frozen >= len(startup) and gc.get_freeze_count() == frozen
        walked = {id(o) for o in gc.get_objects()}  # what a full collection would traverse
        assert not any(id(x) in walked for x in startup[::1000])
        later = [1]
        assert id(later) in {id(o) for o in gc.get_objects()}  # new objects are collected
        assert startup[-1] == [99_999]  # frozen, not freed
    finally:
        gc.unfreeze()  # back to the oldest generation: this test process goes on
    assert gc.get_freeze_count() == 0


@needs_glibc
def test_trim_once_returns_the_free_pages_of_a_fragmented_heap():
    trimmer = heap.MallocTrimmer(interval_s=60)
    trimmer.trim_once()  # start from a trimmed heap
    before = heap.resident_bytes()
    live = _fragment_heap(chunks=2000, chunk_bytes=96 << 10, keep_every=8)  # ~188 MiB touched
    try:
        fragmented = heap.resident_bytes()
        assert fragmented - before > 150 << 20, "the freed chunks should still be resident"
        released = trimmer.trim_once()
        after = heap.resident_bytes()
        # 7 of every 8 chunks are free: ~164 MiB of their pages can go back.
        assert released > 120 << 20, released / 2**20
        assert fragmented - after > 120 << 20
        assert trimmer.trims == 2 and trimmer.released_bytes >= released
    finally:
        _free(live)


@needs_glibc
def test_trimmer_thread_runs_every_interval_and_stops():
    trimmer = heap.MallocTrimmer(interval_s=0.02).start()
    try:
        deadline = time.monotonic() + 10
        while trimmer.trims < 3:
            assert time.monotonic() < deadline, "the trimmer did not run"
            time.sleep(0.01)
        assert any(t.name == THREAD for t in threading.enumerate())
    finally:
        trimmer.stop()
    assert not any(t.name == THREAD for t in threading.enumerate())
    n = trimmer.trims
    time.sleep(0.1)
    assert trimmer.trims == n  # stopped means stopped


def test_bad_intervals_are_refused():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--malloc-trim-interval must be a finite number"):
            ServerConfig(malloc_trim_s=bad)
        with pytest.raises(ValueError, match="must be > 0 seconds and finite"):
            heap.MallocTrimmer(interval_s=bad)
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        heap.MallocTrimmer(interval_s=0)
    assert ServerConfig(malloc_trim_s=0).malloc_trim_s == 0  # 0 turns it off


@needs_glibc
@pytest.mark.parametrize("interval_s", [0.05, 0.0])
def test_the_server_trims_while_it_runs_and_only_then(interval_s):
    m = tiny_model()
    engine = Engine(EngineConfig(model=m["model"], **engine_kwargs()), {})
    app = create_app(engine, ServerConfig(model_id="tiny", malloc_trim_s=interval_s))
    srv = LiveServer(app)
    try:
        running = any(t.name == THREAD for t in threading.enumerate())
        assert running == (interval_s > 0)
    finally:
        srv.stop()
    assert not any(t.name == THREAD for t in threading.enumerate())

"""Where torch work may run in the server: the engine thread, or threads that exit.

torch's OpenMP runtime keeps a worker pool for every thread that has done parallel torch work.
A second long-lived thread doing torch work (the main thread building the engine, or an
`asyncio.to_thread` pool thread packing an adapter) leaves two pools competing for the cores,
and the engine loop ran ~1.5x slower on 2 CPUs (measured 2026-11; the git history of
docs/benchmarks.md has the runs). A thread that exits takes its pool with it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


def run_in_fresh_thread(fn: Callable, *args):
    """Run `fn(*args)` on a new thread that exits afterwards, and return its result.

    Why: torch's OpenMP runtime keeps a worker pool for every thread that has done parallel
    torch work. Building the engine (or packing an adapter) on a long-lived thread other than
    the engine thread leaves two pools competing for the cores, and the engine loop runs ~1.5x
    slower on 2 CPUs. A thread that exits takes its pool with it.
    """
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="loraplex-setup")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


async def await_in_fresh_thread(fn: Callable, *args):
    """`run_in_fresh_thread` for the event loop: awaits without blocking it (unlike
    `asyncio.to_thread`, whose pooled threads outlive the call)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(result, error) -> None:
        if fut.cancelled():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting task
            result, error = None, e
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="loraplex-adapter-load", daemon=True).start()
    return await fut

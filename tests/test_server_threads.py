"""The fresh-thread helpers: results and errors cross back, and the worker thread is gone."""

from __future__ import annotations

import asyncio
import threading

import pytest

from loraplex.server.threads import await_in_fresh_thread, run_in_fresh_thread


def _whoami(x):
    return x * 2, threading.current_thread()


def test_run_in_fresh_thread_returns_and_the_thread_exits():
    value, thread = run_in_fresh_thread(_whoami, 21)
    assert value == 42
    assert thread is not threading.current_thread()
    assert not thread.is_alive()


def test_run_in_fresh_thread_reraises():
    with pytest.raises(ValueError, match="bad adapter"):
        run_in_fresh_thread(lambda: (_ for _ in ()).throw(ValueError("bad adapter")))


def test_await_in_fresh_thread():
    async def main():
        value, thread = await await_in_fresh_thread(_whoami, 4)
        with pytest.raises(KeyError):
            await await_in_fresh_thread({}.__getitem__, "missing")
        return value, thread

    value, thread = asyncio.run(main())
    assert value == 8
    thread.join(timeout=5)
    assert not thread.is_alive()

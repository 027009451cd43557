"""The engine loop thread and per-request streams.

One thread owns the `Engine`: it is the only code that touches it. Requests, aborts and adapter
operations reach it through a thread-safe command queue and are applied between steps. After
each step the outputs of all requests are handed to the event loop in ONE
`call_soon_threadsafe`, which puts each into its request group's `asyncio.Queue`; the event loop
never runs model code, and the engine never waits for a client.

Contracts:
- `add(subs)` resolves once the engine has queued every sequence of the group (all or none);
  it raises `ValueError` (bad request), `UnknownAdapterError`, `QueueFull` or `Unavailable`.
- A group's queue receives `(StepOutput, t)` items, `t` = monotonic time of the step; a
  sequence ends with `finished=True`. When the server stops or the engine fails, every open
  sequence gets `finished=True, finish_reason=ABORT, error=<reason>`.
- `abort(ids)` is synchronous and thread-safe (usable in `finally` blocks of cancelled tasks);
  an aborted sequence frees its pages and gets no further output.
- `remove_adapter(name)` resolves once no queued or running request uses it and it is freed.
- `begin_shutdown()` (SIGTERM) refuses new work; with `shutdown_grace_s` set, whatever is
  still in flight just before uvicorn's graceful timeout (`max(1, int(grace))` s, cli.py) is
  aborted with an error, so each open stream ends with an error event, not a cut connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

from loraplex.engine.engine_stats import EngineStats
from loraplex.scheduler.sequence import FinishReason, StepOutput
from loraplex.server.engine_requests import QueueFull, RequestGroup, Submission, Unavailable

logger = logging.getLogger(__name__)
EXPIRE_MARGIN_S = 0.5  # before uvicorn's graceful timeout: time to send the error events


class AsyncEngine:
    def __init__(
        self,
        engine,
        *,
        max_queue: int | None = None,
        on_queue_time: Callable[[float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.on_queue_time = on_queue_time
        self.draining = False
        self.shutdown_grace_s: float | None = None  # set by create_app (--shutdown-timeout)
        self._expiry_set = False
        self.dead: str | None = None
        self.stats = EngineStats()
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._cmd_lock = threading.Lock()
        self._closed = False  # the thread has exited: commands are refused
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._routes: dict[str, RequestGroup] = {}  # engine thread only
        self._unstarted: dict[str, tuple[object, float]] = {}  # engine thread only
        self._removals: list[tuple[str, asyncio.Future]] = []  # engine thread only
        self._waiting_lock = threading.Lock()
        self._num_waiting = 0  # submitted, not yet admitted (for --max-queue)
        self._update_stats()

    # -- lifecycle (event loop) ------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    @property
    def num_in_flight(self) -> int:
        return len(self._routes)

    def begin_shutdown(self) -> None:
        """Refuse new work from now on (503); in-flight requests continue until shortly before
        uvicorn's graceful timeout, then end with an error (module docstring). Callable from a
        signal handler."""
        self.draining = True
        grace, loop = self.shutdown_grace_s, self._loop
        if grace is None or loop is None or loop.is_closed() or self._expiry_set:
            return
        self._expiry_set = True
        delay = max(0.0, min(grace, max(1, int(grace))) - EXPIRE_MARGIN_S)
        loop.call_soon_threadsafe(loop.call_later, delay, self._expire)

    def _expire(self) -> None:
        with contextlib.suppress(Unavailable):
            self._put(("expire",))

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Let in-flight requests finish for up to `grace_s`, abort the rest, stop the thread."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self._routes and self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._routes:
            logger.warning("shutdown: aborting %d in-flight sequences", len(self._routes))
        self._stopping = True
        with contextlib.suppress(Unavailable):
            self._put(("wake",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # -- requests (event loop) -------------------------------------------------------------

    def _check_open(self) -> None:
        if self.dead is not None:
            raise Unavailable(f"the engine loop has stopped: {self.dead}")
        if self.draining or not self.alive:
            raise Unavailable("the server is shutting down")

    async def add(self, subs: list[Submission]) -> RequestGroup:
        self._check_open()
        with self._waiting_lock:
            if self.max_queue is not None and self._num_waiting + len(subs) > self.max_queue:
                raise QueueFull(
                    f"the waiting queue is full ({self._num_waiting} waiting, "
                    f"--max-queue {self.max_queue}); retry later"
                )
            self._num_waiting += len(subs)
        group = RequestGroup(subs)
        fut = self._loop.create_future()
        try:
            self._put(("add", group, fut))
        except Unavailable:
            self._dec_waiting(len(subs))
            raise
        try:
            await fut
        except asyncio.CancelledError:
            self.abort(group.ids)
            raise
        return group

    def abort(self, request_ids: list[str]) -> None:
        with contextlib.suppress(Unavailable):  # after the thread exits nothing is left to abort
            self._put(("abort", list(request_ids)))

    async def call(self, fn: Callable):
        """Run `fn(engine)` on the engine thread between steps; return its result."""
        self._check_open()
        fut = self._loop.create_future()
        self._put(("call", fn, fut))
        return await fut

    async def remove_adapter(self, name: str) -> None:
        """Free adapter `name` once no queued or running request uses it."""
        self._check_open()
        fut = self._loop.create_future()
        self._put(("remove", name, fut))
        await fut

    def _put(self, cmd: tuple) -> None:
        with self._cmd_lock:
            if self._closed:
                raise Unavailable(self.dead or "the server is shutting down")
            self._cmds.put(cmd)

    # -- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        eng = self.engine
        reason = "the server is shutting down"
        try:
            while not self._stopping:
                self._drain(block=not eng.has_unfinished())
                if self._stopping:
                    break
                if eng.has_unfinished():
                    t0 = time.monotonic()
                    outputs = eng.step()
                    self._after_step(outputs, t0)
                if self._removals:
                    self._try_removals()
                self._update_stats()
        except Exception as e:  # a failed step leaves the engine in an unknown state
            logger.exception("engine loop failed; failing all requests")
            self.dead = reason = f"{type(e).__name__}: {e}"
        finally:
            self._fail_all(reason)

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._cmds.get() if block else self._cmds.get_nowait()
            while True:
                self._apply(cmd)
                cmd = self._cmds.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            self._apply_add(cmd[1], cmd[2])
        elif kind == "abort":
            for rid in cmd[1]:
                self.engine.abort(rid)
                self._routes.pop(rid, None)
                if self._unstarted.pop(rid, None) is not None:
                    self._dec_waiting(1)
        elif kind == "call":
            try:
                self._resolve(cmd[2], cmd[1](self.engine))
            except Exception as e:
                self._resolve(cmd[2], exc=e)
        elif kind == "remove":
            self._removals.append((cmd[1], cmd[2]))
            self._try_removals()
        elif kind == "expire" and self._routes:
            logger.warning("shutdown: aborting %d sequences still running after the grace "
                           "period", len(self._routes))  # fmt: skip
            self._abort_all("the server shut down before the request finished "
                            "(--shutdown-timeout)")  # fmt: skip

    def _apply_add(self, group: RequestGroup, fut: asyncio.Future) -> None:
        added = []
        try:
            for s in group.subs:
                seq = self.engine.add_request(
                    s.request_id, s.prompt_ids, s.params, s.adapter, tenant=s.tenant
                )
                added.append((s.request_id, seq))
        except Exception as e:
            for rid, _ in added:
                self.engine.abort(rid)
            self._dec_waiting(len(group.subs))
            self._resolve(fut, exc=e)
            return
        for rid, seq in added:
            self._routes[rid] = group
            self._unstarted[rid] = (seq, group.t_arrival)
        self._resolve(fut, None)

    def _after_step(self, outputs: list[StepOutput], t0: float) -> None:
        now = time.monotonic()
        if self._unstarted:
            # Only requests admitted this step can have started: O(admitted), not O(queue).
            started = 0
            for seq in self.engine.batcher.admitted_last_step:
                entry = self._unstarted.pop(seq.request_id, None)
                if entry is not None:
                    started += 1
                    if self.on_queue_time is not None:
                        self.on_queue_time(t0 - entry[1])
            if started:
                self._dec_waiting(started)
        deliveries = []
        for out in outputs:
            group = self._routes.get(out.request_id)
            if group is None:
                continue  # aborted meanwhile
            if out.finished:
                del self._routes[out.request_id]
            deliveries.append((group.queue, out))
        if deliveries:
            self._loop.call_soon_threadsafe(_deliver, deliveries, now)

    def _try_removals(self) -> None:
        keep = []
        for name, fut in self._removals:
            try:
                self.engine.remove_adapter(name)
            except RuntimeError:
                keep.append((name, fut))  # still in use: retry after the next step
                continue
            except Exception as e:
                self._resolve(fut, exc=e)
                continue
            self._resolve(fut, None)
        self._removals = keep

    def _fail_all(self, reason: str) -> None:
        """Abort everything in flight and answer every pending command (thread exit)."""
        self._abort_all(reason)
        for _, fut in self._removals:
            self._resolve(fut, exc=Unavailable(reason))
        self._removals = []
        self._stopping = True
        with self._cmd_lock:
            self._closed = True
        try:
            while True:
                cmd = self._cmds.get_nowait()
                if cmd[0] in ("add", "call", "remove"):
                    self._resolve(cmd[-1], exc=Unavailable(reason))
        except queue.Empty:
            pass

    def _abort_all(self, reason: str) -> None:
        """Abort every sequence in flight; each gets finished=True, ABORT, error=reason."""
        now = time.monotonic()
        deliveries = []
        for rid, group in list(self._routes.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # the engine may be broken; the outputs below still go out
                logger.debug("abort of %s failed during shutdown", rid, exc_info=True)
            seq_out = StepOutput(rid, [], [], [], True, FinishReason.ABORT, 0, 0, error=reason)
            deliveries.append((group.queue, seq_out))
        self._routes.clear()
        self._unstarted.clear()
        if deliveries and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver, deliveries, now)

    def _dec_waiting(self, n: int) -> None:
        with self._waiting_lock:
            self._num_waiting -= n

    def _resolve(self, fut: asyncio.Future, result=None, exc: BaseException | None = None):
        def done() -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(done)

    def _update_stats(self) -> None:
        self.stats = self.engine.stats()


def _deliver(deliveries: list, t: float) -> None:
    for q, out in deliveries:
        q.put_nowait((out, t))

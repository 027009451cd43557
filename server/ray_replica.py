"""A Ray Serve engine replica: loraplex's engine and app, adapters as multiplexed models.

Each replica builds one `Engine` (no adapters at start) and the app of `loraplex serve`
(`create_app`: the same routes, validation, error envelopes, SSE and abort on disconnect) and
runs the ingress's requests through it in-process (`ray_asgi.call_asgi`). Requests come only
from the ingress (`ray_ingress.py`), which has already authenticated the caller and resolved
the OpenAI `model` field: the replica trusts the tenant name and the multiplexed model id it
gets (the Ray cluster is the trust boundary; replicas have no HTTP route of their own).

Adapters are Ray Serve multiplexed models. The multiplexed id is the catalog id of an adapter
(`ray_app.Catalog`: a shared adapter's name, or "tenant/name"); the base model has none.
- Loading (`serve.multiplexed`, on the first request for an id on this replica): the files are
  read, validated and packed on a thread that exits, then registered in the engine's host tier
  under "<id>@<load number>" (a fresh engine name per load, so a reload never meets the state of
  an earlier one still draining). Pool pages are taken on first use and released LRU by the
  engine itself, exactly as in `loraplex serve`.
- Eviction: Ray keeps at most `max_adapters_per_replica` ids per replica and drops the least
  recently used; the adapter then leaves the engine once no request holds it (a lease per
  request, then `AsyncEngine.remove_adapter`, which waits for the engine's own sequences).
  So Ray's limit bounds the host tier (host memory per replica); the pool bounds the device
  tier below it (docs/ray.md).
- Every answer carries `x-loraplex-replica` (this replica's id) and `x-loraplex-adapters` (the
  adapters registered in this replica's engine, draining ones included).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
from collections.abc import AsyncIterator

from ray import serve

from loraplex.server.context import ServerContext
from loraplex.server.engine_requests import Unavailable
from loraplex.server.protocol import APIError
from loraplex.server.ray_asgi import RequestParts, call_asgi
from loraplex.server.tenants import Tenant, Usage
from loraplex.server.threads import await_in_fresh_thread, run_in_fresh_thread

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-loraplex-replica"
ADAPTERS_HEADER = "x-loraplex-adapters"
ROUTED = "loraplex_routed_tenant"  # the key of the request's RoutedTenant in the ASGI state


@dataclasses.dataclass
class RoutedTenant(Tenant):
    """The ingress's caller, with the engine name of the adapter its request runs on."""

    adapter: str | None = None


class ReplicaContext(ServerContext):
    """The app's context on a replica: the caller and its adapter come from the ingress."""

    def authenticate(self, request) -> Tenant:
        tenant = request.scope.get("state", {}).get(ROUTED)
        if tenant is None:  # not forwarded by the ingress: refuse rather than act as admin
            raise APIError(401, "requests reach engine replicas through the ingress only")
        return tenant

    def resolve_model(self, tenant: Tenant, model: str) -> str | None:
        return getattr(tenant, "adapter", None)


class AdapterLoad:
    """One load of an adapter on this replica: what Ray's multiplexing caches per id."""

    def __init__(self, residency: Residency, mux_id: str, engine_name: str) -> None:
        self.residency = residency
        self.mux_id = mux_id
        self.engine_name = engine_name
        self.leases = 0
        self.evicted = False
        self._released = False

    def __del__(self) -> None:
        # Ray calls this on a worker thread when it evicts the id (LRU); the garbage collector
        # calls it again later, hence the flag. The engine is touched on the event loop only.
        if self._released:
            return
        self._released = True
        with contextlib.suppress(RuntimeError):  # the loop is gone: so is the engine
            self.residency.loop.call_soon_threadsafe(self.residency.evict, self)


class Residency:
    """The adapters registered in this replica's engine, by multiplexed id (event loop only)."""

    def __init__(self, ctx: ServerContext, paths: dict[str, str]) -> None:
        self.ctx = ctx
        self.paths = paths  # multiplexed id -> adapter directory
        self.loop = asyncio.get_running_loop()
        self.registered = 0  # engine adapters of this replica, draining ones included
        self.current: dict[str, AdapterLoad] = {}  # what Ray's multiplexing holds, by id
        self._loads = itertools.count(1)
        self._removals: set[asyncio.Task] = set()

    async def load(self, mux_id: str) -> AdapterLoad:
        """Register adapter `mux_id` in the engine. APIError 404 (not in the catalog), 400
        (files refused), 503 (engine stopping)."""
        path = self.paths.get(mux_id)
        if path is None:
            raise APIError(404, f"The model '{mux_id}' does not exist", code="model_not_found")
        name = f"{mux_id}@{next(self._loads)}"
        aengine = self.ctx.aengine
        try:
            prepared = await await_in_fresh_thread(aengine.engine.prepare_adapter, name, path)
            info = await aengine.call(lambda e: e.register_adapter(prepared))
        except Unavailable as e:
            raise APIError(503, str(e), code="unavailable") from None
        except (ValueError, OSError) as e:
            msg = str(e).replace(f"'{name}'", f"'{mux_id}'")
            if self.ctx.adapter_root:
                msg = msg.replace(os.path.realpath(self.ctx.adapter_root) + os.sep, "")
            raise APIError(400, msg, param="model", code="invalid_adapter") from None
        self.registered += 1
        logger.info("adapter %s loaded as %s: rank %d, %d pages", mux_id, name, info.rank,
                    info.num_pages)  # fmt: skip
        load = self.current[mux_id] = AdapterLoad(self, mux_id, name)
        return load

    def evict(self, load: AdapterLoad) -> None:
        load.evicted = True
        if self.current.get(load.mux_id) is load:
            del self.current[load.mux_id]
        if load.leases == 0:
            self._remove(load)

    def release(self, load: AdapterLoad) -> None:
        load.leases -= 1
        if load.evicted and load.leases == 0:
            self._remove(load)

    def _remove(self, load: AdapterLoad) -> None:
        async def remove() -> None:
            try:
                await self.ctx.aengine.remove_adapter(load.engine_name)
            except Exception as e:  # stopping; the engine goes with the replica anyway
                logger.warning("adapter %s: not unloaded: %s", load.engine_name, e)
                return
            self.registered -= 1
            logger.info("adapter %s evicted (LRU)", load.engine_name)

        task = asyncio.ensure_future(remove())
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)


class EngineReplica:
    """The engine deployment's class (`ray_app.py` wraps it in `serve.deployment`)."""

    async def __init__(self, settings) -> None:
        """`settings`: `ray_app.RaySettings`."""
        from loraplex.server.app import create_app
        from loraplex.server.config import ServerConfig
        from loraplex.server.heap import freeze_startup_objects
        from loraplex.server.ray_app import route_logs

        route_logs(settings.log_level)
        self.settings = settings
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()

        def build():
            from loraplex.engine.engine import Engine

            return create_app(
                Engine(settings.engine),
                ServerConfig(
                    model_id=settings.model_id,
                    adapter_root=settings.adapter_root,
                    max_queue=settings.max_queue,
                    shutdown_grace_s=settings.shutdown_grace_s,
                ),
            )

        # Torch work only on threads that exit or on the engine thread (server/threads.py).
        self.app = run_in_fresh_thread(build)
        freeze_startup_objects()  # the replica's model and app live as long as its process
        ctx = self.app.state.ctx
        self.ctx = ReplicaContext(**{f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)
                                     if f.init})  # fmt: skip
        self.app.state.ctx = self.ctx
        self._lifespan = contextlib.AsyncExitStack()
        await self._lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        self.residency = Residency(self.ctx, settings.catalog.paths())
        self._usage: dict[str, Usage] = {}

        async def load_adapter(mux_id: str) -> AdapterLoad:
            return await self.residency.load(mux_id)

        # Wrapped here, not at class level: the limit is a setting of the application.
        self._get_adapter = serve.multiplexed(
            max_num_models_per_replica=settings.max_adapters_per_replica
        )(load_adapter)
        logger.info("engine replica %s ready", self.replica_id)

    def describe(self) -> dict:
        """This replica: its id, `max_model_len` (the ingress's /v1/models), the multiplexed
        ids it holds (in the order they were loaded), the adapters registered in its engine
        (draining ones included), the sequences in flight and what each tenant used here (as
        `GET /v1/usage` counts it). Ask the replica holding an adapter with
        `handle.options(multiplexed_model_id=ID).describe.remote()`."""
        return {
            "replica": self.replica_id,
            "max_model_len": self.ctx.engine.max_model_len,
            "adapters": list(self.residency.current),
            "registered": self.residency.registered,
            "sequences": self.ctx.aengine.num_in_flight,
            "usage": {t: dataclasses.asdict(u) for t, u in self._usage.items()},
        }

    async def forward(
        self, parts: RequestParts, tenant: str
    ) -> AsyncIterator[tuple[int, list] | bytes]:
        """Run one request of `tenant` through the app on the adapter of this request's
        multiplexed id (none: the base model): yields `(status, headers)`, then the body."""
        mux_id = serve.get_multiplexed_model_id()
        load = None
        if mux_id:
            try:
                load = await self._get_adapter(mux_id)
            except APIError as e:
                yield e.status, self._headers([("content-type", "application/json")])
                yield _error_json(e)
                return
            load.leases += 1
        try:
            usage = self._usage.setdefault(tenant, Usage())
            routed = RoutedTenant(tenant, usage=usage, adapter=load and load.engine_name)
            parts.extensions[ROUTED] = routed
            async for item in call_asgi(self.app, parts):
                yield (item[0], self._headers(item[1])) if isinstance(item, tuple) else item
        finally:
            if load is not None:
                self.residency.release(load)

    def _headers(self, headers: list) -> list:
        return [*headers, (REPLICA_HEADER, self.replica_id),
                (ADAPTERS_HEADER, str(self.residency.registered))]  # fmt: skip

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine loop died is replaced."""
        ae = self.ctx.aengine
        if ae.dead is not None:
            raise RuntimeError(f"the engine loop has stopped: {ae.dead}")

    async def __del__(self) -> None:
        # Ray Serve awaits this once when it stops the replica: in-flight requests get
        # --shutdown-timeout, then the engine thread stops.
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            self._lifespan = None
            await lifespan.aclose()


def _error_json(e: APIError) -> bytes:
    return json.dumps(e.body()).encode()

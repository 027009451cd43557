"""The FastAPI app: wiring, errors, health, metrics, usage.

`create_app(engine, ...)` takes a constructed `Engine` (adapters it already holds become the
shared adapters), loads the tenants' adapters from their configuration, and returns the app.
The engine thread starts with the app's lifespan and stops with it (in-flight requests get up
to `shutdown_grace_s` to finish, then are aborted). Routes live in `openai_routes.py` and
`adapters.py`; `openapi_schema.py` documents their bodies and errors in /openapi.json. Every
error, including unknown routes, answers OpenAI's envelope.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.memory.pool import IntegrityError
from loraplex.server import adapters as adapter_routes
from loraplex.server import finetune_routes, openai_routes, openapi_schema
from loraplex.server.async_engine import AsyncEngine
from loraplex.server.config import ServerConfig
from loraplex.server.context import ServerContext, get_ctx
from loraplex.server.engine_requests import Unavailable
from loraplex.server.heap import MallocTrimmer
from loraplex.server.metrics import Metrics
from loraplex.server.protocol import ERROR_TYPES, APIError, error_body
from loraplex.server.request_limits import BodyTooLarge, RequestLimits
from loraplex.server.tenants import Tenants

logger = logging.getLogger(__name__)
DEMO_MODEL_ID = "loraplex-demo"


def default_model_id(engine) -> str:
    if engine.config.model is None:
        return DEMO_MODEL_ID
    return os.path.basename(os.path.normpath(engine.config.model))


def create_app(
    engine, config: ServerConfig | None = None, *, tenants: Tenants | None = None
) -> FastAPI:
    """ValueError if a tenant's configured adapter cannot be loaded (with the reason)."""
    config = config or ServerConfig()
    if config.adapter_root is not None and not os.path.isdir(config.adapter_root):
        raise ValueError(f"--adapter-root {config.adapter_root!r} is not a directory")
    aengine = AsyncEngine(engine, max_queue=config.max_queue)
    aengine.shutdown_grace_s = config.shutdown_grace_s  # open streams then end with an error
    metrics = Metrics(lambda: aengine.stats)
    aengine.on_queue_time = metrics.queue_time.observe
    ctx = ServerContext(
        aengine=aengine,
        tenants=tenants or Tenants([], {}),
        metrics=metrics,
        model_id=config.model_id or default_model_id(engine),
        adapter_root=config.adapter_root,
        shutdown_grace_s=config.shutdown_grace_s,
        config=config,
    )
    _register_adapters(ctx)
    if config.finetune_dir is not None:
        from loraplex.server.finetune_service import FinetuneService

        ctx.finetune = FinetuneService(ctx, config.finetune_dir,
                                       max_file_bytes=config.max_file_bytes,
                                       max_jobs_per_tenant=config.max_jobs_per_tenant)  # fmt: skip
        metrics.set_job_counts(ctx.finetune.db.job_counts)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        if ctx.finetune is not None:
            await ctx.finetune.recover()
        trimmer = MallocTrimmer(config.malloc_trim_s).start() if config.malloc_trim_s else None
        try:
            yield
        finally:
            await aengine.shutdown(ctx.shutdown_grace_s)
            if trimmer is not None:
                trimmer.stop()

    app = FastAPI(title="loraplex", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    app.add_middleware(RequestLimits, max_bytes=config.max_request_bytes)
    app.include_router(openai_routes.router)
    app.include_router(adapter_routes.router)
    app.include_router(finetune_routes.router)
    add_error_handlers(app)
    _add_service_routes(app)
    openapi_schema.install(app)
    pool = engine.pool
    logger.info(
        "model %s (%s), max_model_len %d; %d shared adapters %s; tenants: %s; "
        "pool %d pages x %d bytes = %.1f MiB",
        ctx.model_id,
        engine.model_dir,
        engine.max_model_len,
        len(ctx.names.shared),
        _some(sorted(ctx.names.shared)),
        "open (no API keys)" if ctx.tenants.open else sorted(ctx.tenants.by_name),
        pool.num_pages,
        engine.page_bytes,
        pool.num_pages * engine.page_bytes / 2**20,
    )
    return app


def _some(names: list[str], shown: int = 8) -> str:
    """The first few names: an --adapter-dir may hold thousands."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _register_adapters(ctx: ServerContext) -> None:
    """Adapters the engine already holds are shared; tenants' configured ones are loaded now
    (the engine thread is not running yet, so the engine is called directly)."""
    engine = ctx.engine
    from_dir = set(engine.adapter_dir.names) if engine.adapter_dir else set()
    for info in engine.adapters.list():
        if info.name == ctx.model_id and info.name in from_dir:  # a bad folder: skipped
            logger.warning(
                "adapter dir: skipped folder %r: it has the base model's name", info.name
            )
            engine.remove_adapter(info.name)
            continue
        if info.name == ctx.model_id:
            raise ValueError(f"adapter '{info.name}' has the base model's name")
        ctx.names.reserve(None, info.name).info = info
    for tenant in ctx.tenants.by_name.values():
        for name, path in tenant.adapters.items():
            try:
                real = adapter_routes.confine(ctx.adapter_root, path)
            except APIError as e:
                raise ValueError(f"tenant {tenant.name}, adapter {name}: {e.message}") from None
            if ctx.names.taken(tenant.name, name) or name == ctx.model_id:
                raise ValueError(f"tenant {tenant.name}: adapter name '{name}' is already taken")
            entry = ctx.names.reserve(tenant.name, name)
            entry.info = engine.add_adapter(entry.engine_name, real)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, e: BodyTooLarge):
        limit = get_ctx(request).config.max_request_bytes
        message = f"the request body has more than --max-request-bytes {limit} bytes"
        body = error_body(message, "invalid_request_error", code="request_too_large")
        return JSONResponse(body, status_code=413, headers={"connection": "close"})

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        body = error_body(str(e.detail), ERROR_TYPES.get(e.status_code, "error"))
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(x) for x in err["loc"][1:]) or None
        where = f"value for '{param}'" if param else "request"
        body = error_body(f"Invalid {where}: {err['msg']}", ERROR_TYPES[400], param)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", ERROR_TYPES[500]), 500)


def _add_service_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request):
        ae = get_ctx(request).aengine
        if ae.dead is not None:
            raise APIError(503, f"the engine loop has stopped: {ae.dead}")
        if ae.draining or not ae.alive:
            raise APIError(503, "the server is shutting down")
        if ae.stats.failing is not None:  # until an inference step succeeds again
            raise APIError(
                503, f"the engine's last step failed ({ae.stats.step_failures} failed steps "
                f"so far): {ae.stats.failing}", code="engine_step_failed",
            )  # fmt: skip
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        ctx = get_ctx(request)
        key = ctx.config.metrics_key
        if key is not None:  # --metrics-key: the scraper's bearer key, compared in constant time
            scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), key.encode()
            ):
                raise APIError(401, "/metrics needs the --metrics-key bearer key",
                               code="invalid_api_key")  # fmt: skip
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/admin/integrity")
    async def integrity(request: Request):
        """Admins: the engine's check_integrity() (every pool page owned once; KV tables,
        adapter residency and training pages consistent), run on the engine thread between
        steps; 500 integrity_error naming what is wrong."""
        ctx = get_ctx(request)
        if not ctx.authenticate(request).admin:
            raise APIError(403, "only admins may check the engine's integrity")

        def check(engine) -> dict:
            engine.check_integrity()
            pool = engine.pool
            used = {k: pool.pages_used(k) for k in ("kv", "adapter", "train")}
            return {"ok": True, "pages_total": pool.num_pages, "pages_free": pool.num_free,
                    "pages_used": used, "running": len(engine.batcher.running),
                    "waiting": len(engine.batcher.waiting)}  # fmt: skip

        try:
            return await ctx.aengine.call(check)
        except (AssertionError, IntegrityError) as e:
            logger.error("integrity check failed: %s", e)
            raise APIError(500, f"integrity check failed: {e}", code="integrity_error") from None
        except Unavailable as e:
            raise APIError(503, str(e), code="unavailable") from None

    @app.get("/v1/usage")
    async def usage(request: Request):
        """Requests and tokens counted per tenant: the caller's own (admins: every tenant)."""
        ctx = get_ctx(request)
        tenant = ctx.authenticate(request)
        tenants = ctx.tenants.by_name.values() if tenant.admin else [tenant]
        trained = ctx.finetune.db.trained_tokens_by_tenant() if ctx.finetune else {}
        return {
            "object": "list",
            "data": [
                {
                    "tenant": t.name,
                    "requests": t.usage.requests,
                    "prompt_tokens": t.usage.prompt_tokens,
                    "completion_tokens": t.usage.completion_tokens,
                    "trained_tokens": trained.get(t.name, 0),
                }
                for t in tenants
            ],
        }

"""The Ray Serve ingress: the client-facing half of `loraplex serve`, routing to engine replicas.

It answers what needs no engine itself, with the same code as `loraplex serve`: API keys and
tenants (`Tenants`), who sees which adapter (`AdapterNamespace`, filled from the catalog),
request validation (`protocol.parse`), `GET /v1/models` (`openai_routes.list_models`) and the
OpenAI error envelope (`app.add_error_handlers`). A valid completion or chat request is then
forwarded, unchanged but without its API key, to an engine replica chosen by Ray Serve's
multiplexed routing: `handle.options(multiplexed_model_id=<catalog id of the adapter>)`, so a
request goes to a replica that already holds its adapter when there is one (base-model requests
carry no id and go to the least loaded replica). The replica runs the request through the app of
`loraplex serve` and its answer comes back as it is made: a stream stays a stream.

Failures of a replica (killed, crashed, node lost, overloaded) are retryable errors, never a
hang: before the answer has started, a 503 in the OpenAI envelope (`code`
"replica_unavailable", `Retry-After: 1`); in the middle of a stream, an SSE `error` event with
that envelope, then `[DONE]` (as `loraplex serve` ends a stream whose request failed). Routes of
`loraplex serve` that hold per-process state (adapter hot-loading, fine-tuning, usage, metrics)
are not served here: 404 (docs/ray.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors

from loraplex.engine.engine_stats import EngineStats
from loraplex.server import openai_routes, openapi_schema
from loraplex.server.app import add_error_handlers
from loraplex.server.context import ServerContext, get_ctx
from loraplex.server.formatting import SSE_DONE, sse
from loraplex.server.metrics import Metrics
from loraplex.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from loraplex.server.ray_asgi import RequestParts

logger = logging.getLogger(__name__)

# A replica that is gone or cannot take the request now: the client should retry.
RETRYABLE = (
    ray_errors.RayActorError,  # killed, crashed, or unreachable (ActorUnavailableError)
    ray_errors.WorkerCrashedError,
    ray_errors.NodeDiedError,
    ray_errors.ObjectLostError,
    serve_errors.BackPressureError,
    serve_errors.DeploymentUnavailableError,
    serve_errors.ReplicaUnavailableError,
)
DROPPED_HEADERS = {b"authorization", b"content-length", b"host"}  # raw names (bytes)


@dataclass(frozen=True)
class EngineFacts:
    """What the ingress's reused routes read from `ctx.engine`: fixed facts of the replicas'
    engine, asked once at start (every replica runs the same model and settings)."""

    max_model_len: int


@dataclass
class IngressContext(ServerContext):
    """`ServerContext` without an engine: `engine` is the replicas' `EngineFacts`."""

    facts: EngineFacts | None = field(default=None)

    @property
    def engine(self):
        return self.facts


def unavailable(e: BaseException) -> APIError:
    logger.warning("engine replica unavailable: %s: %s", type(e).__name__, e)
    return APIError(
        503,
        f"the engine replica serving this request is unavailable ({type(e).__name__}); retry",
        code="replica_unavailable",
    )


def create_ingress_app(ctx: IngressContext, replicas) -> FastAPI:
    """The ingress's ASGI app; `replicas` is the engine deployment's `DeploymentHandle`."""
    app = FastAPI(title="loraplex (Ray Serve)", docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    app.add_api_route("/v1/models", openai_routes.list_models, methods=["GET"])

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await forward(request, CompletionRequest, replicas)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await forward(request, ChatCompletionRequest, replicas)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    add_error_handlers(app)
    openapi_schema.install(app)  # /openapi.json: these routes, as `loraplex serve` documents them
    return app


async def forward(request: Request, model_cls, replicas) -> Response:
    """Check the caller, the body and the model as `loraplex serve` does, then relay the
    request to a replica holding its adapter (or the least loaded one)."""
    ctx = get_ctx(request)
    tenant = ctx.authenticate(request)
    try:
        req = parse(model_cls, await openai_routes.read_json(request))
        adapter = ctx.resolve_model(tenant, req.model)  # the catalog id; None = base model
    except APIError as e:
        ctx.metrics.count_request(tenant.name, e.status)
        raise
    parts = RequestParts(
        method=request.method,
        path=request.url.path,
        query=request.url.query.encode(),
        headers=[(k, v) for k, v in request.headers.raw if k.lower() not in DROPPED_HEADERS],
        body=await request.body(),
    )
    options = {"stream": True}
    if adapter is not None:
        options["multiplexed_model_id"] = adapter
    gen = replicas.options(**options).forward.remote(parts, tenant.name)
    try:
        status, headers = await gen.__anext__()
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        kind = next((v for k, v in headers if k.lower() == "content-type"), "")
        if kind.startswith("text/event-stream"):
            return StreamingResponse(_relay(gen), status_code=status, headers=dict(headers))
        body = b"".join([chunk async for chunk in gen])
    except RETRYABLE as e:
        err = unavailable(e)
        return Response(content=_json(err), status_code=503, media_type="application/json",
                        headers={"Retry-After": "1"})  # fmt: skip
    except (asyncio.CancelledError, GeneratorExit):
        gen.cancel()  # the client went away: the replica aborts the request
        raise
    except StopAsyncIteration:
        raise APIError(500, "the engine replica sent no answer") from None
    return Response(content=body, status_code=status, headers=dict(headers))


async def _relay(gen):
    done = False
    try:
        async for chunk in gen:
            yield chunk
        done = True
    except RETRYABLE as e:
        done = True
        yield sse(unavailable(e).body())
        yield SSE_DONE
    finally:
        if not done:
            gen.cancel()  # closed early: the client disconnected


def _json(err: APIError) -> bytes:
    return json.dumps(err.body()).encode()


class Ingress:
    """The ingress deployment's class (`ray_app.py` wraps it in `serve.ingress` and
    `serve.deployment`): its app is built once the replicas have said what they serve."""

    async def __init__(self, settings, replicas) -> None:
        """`settings`: `ray_app.RaySettings`; `replicas`: the engine deployment's handle."""
        from loraplex.server.ray_app import route_logs

        route_logs(settings.log_level)
        facts = await replicas.describe.remote()
        self.ctx = IngressContext(
            aengine=None,
            tenants=settings.tenants,
            metrics=Metrics(EngineStats),  # counts refusals, as `loraplex serve` does
            model_id=settings.model_id,
            adapter_root=settings.adapter_root,
            names=settings.catalog.namespace(),
            facts=EngineFacts(max_model_len=facts["max_model_len"]),
        )
        self.replicas = replicas
        logger.info("ingress ready: model %s, %d adapters in the catalog", settings.model_id,
                    len(settings.catalog.entries))  # fmt: skip

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_ingress_app(self.ctx, self.replicas)

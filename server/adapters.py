"""Adapter management routes and path confinement.

- `GET /v1/adapters`: the caller's adapters and the shared ones (admins: every adapter).
- `POST /v1/adapters {"name", "path"[, "owner"]}` -> 201 with id, load_id, rank, target modules,
  size in bytes, owner. `owner` (another tenant) is for admins only (403 otherwise).
- `DELETE /v1/adapters/{name}[?owner=TENANT]`: new requests for it get 404 at once; answers
  when no request uses it any more and its host and pool memory are freed. A tenant may unload
  its own adapters only (403 for a shared one); admins may unload any.
- vLLM aliases: `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`,
  `POST /v1/unload_lora_adapter {"lora_name"}` (JSON answers, status 200).

Paths are relative to `--adapter-root` (absolute ones must lie inside it) and are checked with
`os.path.realpath`: a path that escapes the root by `..` or a symlink is refused, and so is an
adapter directory holding a file that links outside the root. Without `--adapter-root`,
loading by path is off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from loraplex.server.context import ServerContext, get_ctx
from loraplex.server.engine_requests import Unavailable
from loraplex.server.protocol import (
    AdapterLoad,
    APIError,
    LoadLoraAdapter,
    UnloadLoraAdapter,
    check_text,
    parse,
)
from loraplex.server.tenants import NAME_RE, AdapterEntry, Tenant
from loraplex.server.threads import await_in_fresh_thread

logger = logging.getLogger(__name__)
router = APIRouter()


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def confine(root: str | None, path: str) -> str:
    """The real path of `path` under `root`, or a 400 APIError saying why it is refused."""
    if root is None:
        raise APIError(
            400,
            "loading adapters by path is disabled: start the server with --adapter-root DIR",
            param="path",
            code="adapter_root_not_set",
        )
    if not path or "\x00" in path:
        raise APIError(400, "'path' must be a non-empty path", param="path")
    check_text(path, "path")  # os.path cannot encode a lone surrogate
    root_real = os.path.realpath(root)
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(root_real, path))
    escape = APIError(
        400, f"path {path!r} is outside the adapter root", param="path", code="path_not_allowed"
    )
    if not _inside(real, root_real):
        raise escape
    if os.path.isdir(real):
        with os.scandir(real) as entries:
            if any(not _inside(os.path.realpath(e.path), root_real) for e in entries):
                raise escape
    return real


async def load_adapter(
    ctx: ServerContext,
    tenant: Tenant,
    name: str,
    path: str,
    owner: str | None = None,
    *,
    real_path: str | None = None,
) -> AdapterEntry:
    """Load `path` as adapter `name` owned by `owner` (default: the caller). `real_path` skips
    the confinement check (start-up loads from configuration). APIError on refusal."""
    owner = tenant.name if owner is None else owner
    if owner != tenant.name and not tenant.admin:
        raise APIError(403, "only admins may load adapters for another tenant", param="owner")
    if owner not in ctx.tenants.by_name:
        raise APIError(400, f"no tenant named {owner!r}", param="owner")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise APIError(
            400, f"adapter names must match {NAME_RE.pattern}, got {name!r}", param="name"
        )
    real = real_path if real_path is not None else confine(ctx.adapter_root, path)
    entry = await register_owned(ctx, owner, name, real)
    logger.info("adapter %s loaded for %s: rank %d", name, owner, entry.info.rank)
    return entry


async def register_owned(ctx: ServerContext, owner: str, name: str, real: str) -> AdapterEntry:
    """Load the adapter directory `real` as `owner`'s adapter `name`, without the checks of a
    client's request (the server's own adapters, e.g. tuned models, whose names hold ':').
    APIError 409 if the name is taken, 400 if the files are refused, 503 when stopping."""
    if name == ctx.model_id or ctx.names.taken(owner, name):
        raise APIError(
            409, f"an adapter named '{name}' is already loaded", param="name", code="name_taken"
        )
    entry = ctx.names.reserve(owner, name)
    t0 = time.monotonic()
    task = asyncio.ensure_future(_load(ctx, entry.engine_name, real))
    # A client that goes away does not cancel the load half-way: it completes (or is undone).
    task.add_done_callback(lambda t: _settle(ctx, entry, t, t0))
    try:
        entry.info = await asyncio.shield(task)
    except Unavailable as e:
        raise APIError(503, str(e)) from None
    except (ValueError, OSError) as e:
        msg = _public(str(e), entry, ctx)
        raise APIError(400, msg, param="path", code="invalid_adapter") from None
    return entry


async def _load(ctx: ServerContext, engine_name: str, path: str):
    """Read, validate and pack the files on a worker thread (the engine keeps stepping), then
    register on the engine thread (cheap)."""
    prepared = await await_in_fresh_thread(ctx.aengine.engine.prepare_adapter, engine_name, path)
    return await ctx.aengine.call(lambda e: e.register_adapter(prepared))


def _settle(ctx: ServerContext, entry: AdapterEntry, task: asyncio.Future, t0: float) -> None:
    if task.cancelled() or task.exception() is not None:
        ctx.names.drop(entry)
        return
    entry.info = task.result()
    ctx.metrics.adapter_load.observe(time.monotonic() - t0)


def _public(message: str, entry: AdapterEntry, ctx: ServerContext) -> str:
    """An engine error as the tenant may read it: public name, paths relative to the root."""
    message = message.replace(f"'{entry.engine_name}'", f"'{entry.name}'")
    if ctx.adapter_root:
        message = message.replace(os.path.realpath(ctx.adapter_root) + os.sep, "")
    return message


async def unload_adapter(
    ctx: ServerContext, tenant: Tenant, name: str, owner: str | None = None
) -> None:
    if owner is not None and owner != tenant.name:
        if not tenant.admin:
            raise APIError(403, "only admins may manage another tenant's adapters", param="owner")
        entry = ctx.names.owned.get(owner, {}).get(name)
    else:
        entry = ctx.names.resolve(tenant.name, name)
    if entry is None or entry.info is None:
        raise APIError(404, f"The adapter '{name}' does not exist", code="model_not_found")
    if entry.owner != tenant.name and not tenant.admin:
        raise APIError(403, f"adapter '{name}' is shared: only admins may unload it")
    ctx.names.drop(entry)  # from now on new requests get 404
    try:
        await ctx.aengine.remove_adapter(entry.engine_name)
    except Unavailable as e:
        raise APIError(503, str(e)) from None
    logger.info("adapter %s of %s unloaded", name, entry.owner or "shared")


@router.get("/v1/adapters")
async def list_adapters(request: Request):
    ctx = get_ctx(request)
    tenant = ctx.authenticate(request)
    entries = ctx.names.all() if tenant.admin else ctx.names.visible(tenant.name)
    return {"object": "list", "data": [e.describe() for e in entries]}


@router.post("/v1/adapters", status_code=201)
async def create_adapter(request: Request):
    ctx = get_ctx(request)
    tenant = ctx.authenticate(request)
    body = parse(AdapterLoad, await _json(request))
    entry = await load_adapter(ctx, tenant, body.name, body.path, body.owner)
    return JSONResponse(entry.describe(), status_code=201)


@router.delete("/v1/adapters/{name}")
async def delete_adapter(request: Request, name: str, owner: str | None = None):
    ctx = get_ctx(request)
    tenant = ctx.authenticate(request)
    await unload_adapter(ctx, tenant, name, owner)
    return {"id": name, "object": "adapter", "deleted": True}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request):
    ctx = get_ctx(request)
    tenant = ctx.authenticate(request)
    body = parse(LoadLoraAdapter, await _json(request))
    entry = await load_adapter(ctx, tenant, body.lora_name, body.lora_path)
    return entry.describe()


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request):
    ctx = get_ctx(request)
    tenant = ctx.authenticate(request)
    body = parse(UnloadLoraAdapter, await _json(request))
    await unload_adapter(ctx, tenant, body.lora_name)
    return {"id": body.lora_name, "object": "adapter", "deleted": True}


async def _json(request: Request):
    try:
        return await request.json()
    except ValueError:
        raise APIError(400, "the request body is not valid JSON") from None

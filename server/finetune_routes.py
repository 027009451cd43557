"""OpenAI's files and fine-tuning routes (server/finetune_service.py runs the jobs).

- `POST /v1/files` (multipart `file`, `purpose` = "fine-tune"): the JSONL is validated on upload
  with the engine's formats (engine/finetune_data.py); a bad file is a 400 naming its first bad
  line and the problem. Over `--max-file-bytes`: 413.
- `GET /v1/files[?purpose=]`, `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
  `DELETE /v1/files/{id}` (409 while a validating, queued or running job uses it).
- `POST /v1/fine_tuning/jobs`, `GET /v1/fine_tuning/jobs[?after=&limit=]`,
  `GET /v1/fine_tuning/jobs/{id}`, `POST .../{id}/cancel`, `GET .../{id}/events[?after=&limit=]`,
  `GET .../{id}/checkpoints[?after=&limit=]`.

Files and jobs belong to the caller's tenant: another tenant gets the 404 of a missing id;
admins see every tenant's. `--max-jobs-per-tenant` validating, queued or running jobs: 429 over.
"""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from loraplex.engine.finetune_data import DataError
from loraplex.engine.loader import MODULES
from loraplex.server.context import get_ctx
from loraplex.server.finetune_protocol import (
    DEFAULT_TARGETS,
    JobCreate,
    checkpoint_object,
    event_object,
    file_object,
    job_object,
    page,
)
from loraplex.server.finetune_service import ACTIVE, ENDED, new_id
from loraplex.server.protocol import APIError, parse
from loraplex.server.tenants import Tenant

router = APIRouter()
READ_CHUNK = 1 << 20


def _service(request: Request):
    ctx = get_ctx(request)
    if ctx.finetune is None:
        raise APIError(404, "fine-tuning is not enabled on this server", code="not_enabled")
    return ctx, ctx.authenticate(request), ctx.finetune


def _visible(row: dict | None, tenant: Tenant, what: str, ident: str) -> dict:
    if row is None or (row["tenant"] != tenant.name and not tenant.admin):
        raise APIError(404, f"No such {what}: {ident}", param="id", code="not_found")
    return row


def _limit(limit: int, most: int = 100) -> int:
    if not 1 <= limit <= most:
        raise APIError(400, f"'limit' must be in [1, {most}], got {limit}", param="limit")
    return limit


# -- files ---------------------------------------------------------------------------------------


@router.post("/v1/files")
async def upload_file(request: Request):
    ctx, tenant, svc = _service(request)
    try:
        form = await request.form(max_part_size=svc.max_file_bytes + 1)
    except Exception as e:  # not multipart, or a part over the limit
        too_big = "size" in str(e).lower() or "large" in str(e).lower()
        if too_big:
            raise APIError(413, f"the file is larger than {svc.max_file_bytes} bytes") from None
        raise APIError(400, f"expected a multipart form with 'file' and 'purpose': {e}") from None
    upload, purpose = form.get("file"), form.get("purpose")
    if purpose != "fine-tune":
        raise APIError(400, f"'purpose' must be 'fine-tune', got {purpose!r}", param="purpose")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "Missing required parameter: 'file'", param="file")
    file_id = new_id("file")
    path = svc.file_path(file_id)
    size = 0
    with open(path, "wb") as out:
        while chunk := await upload.read(READ_CHUNK):
            size += len(chunk)
            if size > svc.max_file_bytes:
                out.close()
                path.unlink()
                raise APIError(413, f"the file is larger than {svc.max_file_bytes} bytes")
            out.write(chunk)
    name = upload.filename or "upload.jsonl"
    try:
        examples = await svc.validate_file(path)
    except (DataError, UnicodeDecodeError) as e:
        path.unlink()
        where = f"line {e.line}: " if isinstance(e, DataError) and e.line else ""
        reason = e.reason if isinstance(e, DataError) else f"not UTF-8 text ({e.reason})"
        raise APIError(400, f"invalid file {name!r}: {where}{reason}", param="file",
                       code="invalid_file_format") from None  # fmt: skip
    row = {"id": file_id, "tenant": tenant.name, "filename": name, "bytes": size,
           "purpose": purpose, "created_at": int(time.time()), "path": str(path),
           "examples": examples}  # fmt: skip
    svc.db.add_file(row)
    return file_object(row)


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None, limit: int = 10000,
                     after: str | None = None):  # fmt: skip
    ctx, tenant, svc = _service(request)
    rows, more = svc.db.list_files(None if tenant.admin else tenant.name, after,
                                   _limit(limit, 10000))  # fmt: skip
    return page([file_object(r) for r in rows if purpose in (None, r["purpose"])], more)


@router.get("/v1/files/{file_id}")
async def get_file(request: Request, file_id: str):
    ctx, tenant, svc = _service(request)
    return file_object(_visible(svc.db.get_file(file_id), tenant, "file", file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str):
    ctx, tenant, svc = _service(request)
    row = _visible(svc.db.get_file(file_id), tenant, "file", file_id)
    return Response(svc.file_path(row["id"]).read_bytes(), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str):
    ctx, tenant, svc = _service(request)
    row = _visible(svc.db.get_file(file_id), tenant, "file", file_id)
    users = svc.db.jobs_using_file(file_id, ACTIVE)
    if users:
        raise APIError(409, f"file {file_id} is used by fine-tuning job {users[0]}, which has "
                       f"not ended", code="file_in_use")  # fmt: skip
    svc.db.delete_file(file_id)
    svc.file_path(row["id"]).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}


# -- jobs ----------------------------------------------------------------------------------------


@router.post("/v1/fine_tuning/jobs")
async def create_job(request: Request):
    ctx, tenant, svc = _service(request)
    try:
        body = await request.json()
    except ValueError:
        raise APIError(400, "the request body is not valid JSON") from None
    req = parse(JobCreate, body)
    if req.model != ctx.model_id:
        raise APIError(400, f"model {req.model!r} cannot be fine-tuned here: the base model is "
                       f"{ctx.model_id!r}", param="model", code="model_not_available")  # fmt: skip
    for param in ("training_file", "validation_file"):
        file_id = getattr(req, param)
        if file_id is None:
            continue
        row = svc.db.get_file(file_id)
        if row is None or row["tenant"] != tenant.name:
            raise APIError(400, f"{param} {file_id!r} does not exist", param=param,
                           code="invalid_file")  # fmt: skip
        if row["purpose"] != "fine-tune":
            raise APIError(400, f"{param} {file_id!r} has purpose {row['purpose']!r}, not "
                           f"'fine-tune'", param=param, code="invalid_file")  # fmt: skip
    targets = req.target_modules or list(DEFAULT_TARGETS)
    bad = [m for m in targets if m not in MODULES]
    if bad or len(set(targets)) != len(targets):
        raise APIError(400, f"target_modules must be distinct names from {list(MODULES)}",
                       param="target_modules")  # fmt: skip
    if ctx.engine.tokenizer is None:
        raise APIError(400, "the base model has no tokenizer: it cannot be fine-tuned on text")
    running = svc.db.count_jobs(tenant.name, ACTIVE)
    if running >= svc.max_jobs_per_tenant:
        raise APIError(429, f"{running} fine-tuning jobs of this tenant have not ended "
                       f"(--max-jobs-per-tenant {svc.max_jobs_per_tenant})",
                       code="rate_limit_exceeded")  # fmt: skip
    hp = req.requested()
    hyper = {
        "n_epochs": 3 if hp.n_epochs == "auto" else hp.n_epochs,
        "batch_size": hp.batch_size,  # "auto" is resolved once the file is read
        "learning_rate_multiplier": (
            1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
        ),
        "lora_rank": req.lora_rank,
        "lora_alpha": req.lora_alpha or 2.0 * req.lora_rank,
        "target_modules": targets,
    }
    job_id = new_id("ftjob")
    row = {"id": job_id, "tenant": tenant.name, "model": req.model,
           "training_file": req.training_file, "validation_file": req.validation_file,
           "suffix": req.suffix,
           "seed": req.seed if req.seed is not None else secrets.randbelow(2**31),
           "metadata": req.metadata, "hyperparameters": hyper, "status": "validating_files",
           "created_at": int(time.time()), "result_files": []}  # fmt: skip
    svc.db.add_job(row)
    svc.event(job_id, f"Created fine-tuning job: {job_id}")
    svc.event(job_id, "Validating training file: " + req.training_file)
    svc.launch(job_id)
    return job_object(svc.db.get_job(job_id))


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(request: Request, after: str | None = None, limit: int = 20):
    ctx, tenant, svc = _service(request)
    rows, more = svc.db.list_jobs(None if tenant.admin else tenant.name, after, _limit(limit))
    return page([job_object(r) for r in rows], more)


def _job(svc, tenant: Tenant, job_id: str) -> dict:
    return _visible(svc.db.get_job(job_id), tenant, "fine-tuning job", job_id)


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def get_job(request: Request, job_id: str):
    ctx, tenant, svc = _service(request)
    return job_object(_job(svc, tenant, job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str):
    ctx, tenant, svc = _service(request)
    row = _job(svc, tenant, job_id)
    if row["status"] in ENDED:
        raise APIError(400, f"job {job_id} has already ended ({row['status']})",
                       code="job_already_ended")  # fmt: skip
    await svc.cancel(job_id)
    return job_object(svc.db.get_job(job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(request: Request, job_id: str, after: str | None = None, limit: int = 20):
    ctx, tenant, svc = _service(request)
    _job(svc, tenant, job_id)
    rows, more = svc.db.list_events(job_id, after, _limit(limit))
    return page([event_object(r) for r in rows], more)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def job_checkpoints(request: Request, job_id: str, after: str | None = None,
                          limit: int = 10):  # fmt: skip
    ctx, tenant, svc = _service(request)
    _job(svc, tenant, job_id)
    rows, more = svc.db.list_checkpoints(job_id, after, _limit(limit))
    return page([checkpoint_object(r) for r in rows], more)

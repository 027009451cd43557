"""`POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

The adapter is chosen by `model`: the base model's id, an adapter name, or "<base>:<adapter>".
Every request is counted for its tenant (`loraplex_requests_total{tenant,status}` and tokens);
a client that disconnects gets its sequences aborted (status 499 in the metrics).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraplex.server.context import ServerContext, get_ctx
from loraplex.server.formatting import SSE_DONE, ChatFormat, CompletionFormat, sse
from loraplex.server.generation import (
    ClientGone,
    Generation,
    build_params,
    run_until_done,
    watch_disconnect,
)
from loraplex.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_text,
    parse,
)

logger = logging.getLogger(__name__)
router = APIRouter()


async def read_json(request: Request):
    try:
        return await request.json()
    except ValueError:
        raise APIError(400, "the request body is not valid JSON") from None


def tokenize(ctx: ServerContext, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        tok = ctx.engine.tokenizer
        if tok is None:
            raise APIError(
                400, "this model has no tokenizer: send the prompt as token ids", param="prompt"
            )
        ids = list(tok(check_text(prompt, "prompt"))["input_ids"])
    else:
        vocab = ctx.engine.spec.vocab_size
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param="prompt")
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    return ids


def apply_chat_template(ctx: ServerContext, messages: list[dict]) -> list[int]:
    tok = ctx.engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise APIError(
            400, "this model has no chat template: use /v1/completions", param="messages"
        )
    for i, m in enumerate(messages):
        check_text(m["content"], f"messages.{i}.content")
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2 errors, raise_exception() in the template
        msg = f"the chat template refused the messages: {e}"
        raise APIError(400, msg, param="messages") from None
    return list(tok(text, add_special_tokens=False)["input_ids"])


@router.get("/v1/models")
async def list_models(request: Request):
    ctx = get_ctx(request)
    tenant = ctx.authenticate(request)
    data = [
        {
            "id": ctx.model_id,
            "object": "model",
            "created": ctx.created,
            "owned_by": "loraplex",
            "root": ctx.model_id,
            "parent": None,
            "max_model_len": ctx.engine.max_model_len,
        }
    ]
    for e in ctx.names.visible(tenant.name):
        data.append(
            {
                "id": e.name,
                "object": "model",
                "created": e.created,
                "owned_by": e.owner or "loraplex",
                "root": e.name,
                "parent": ctx.model_id,
                "max_model_len": ctx.engine.max_model_len,
            }
        )
    return {"object": "list", "data": data}


@router.post("/v1/completions")
async def completions(request: Request):
    ctx = get_ctx(request)
    tenant = ctx.authenticate(request)
    try:
        req = parse(CompletionRequest, await read_json(request))
        _check_stream_options(req)
        adapter = ctx.resolve_model(tenant, req.model)
        if req.stop and ctx.engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: 'stop' needs one", param="stop")
        prompts = [tokenize(ctx, p) for p in req.prompts()]
        logprobs = req.logprobs or 0
        params = [
            build_params(req, len(p), req.max_tokens, ctx.engine.max_model_len, logprobs, i)
            for p in prompts
            for i in range(req.n)
        ]
        gen = Generation(ctx, tenant, prompts, params, adapter, req.stop_list(), req.n, "cmpl")
        await gen.start()
    except APIError as e:
        ctx.metrics.count_request(tenant.name, e.status)
        raise
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    fmt = CompletionFormat(gen, req.model, req.logprobs is not None, include_usage)
    return await _respond(request, gen, fmt, req.stream)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    ctx = get_ctx(request)
    tenant = ctx.authenticate(request)
    try:
        req = parse(ChatCompletionRequest, await read_json(request))
        _check_stream_options(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        adapter = ctx.resolve_model(tenant, req.model)
        prompt = apply_chat_template(ctx, req.chat_messages())
        limit = req.limit()
        logprobs = (req.top_logprobs or 0) if req.logprobs else 0
        params = [
            build_params(req, len(prompt), limit, ctx.engine.max_model_len, logprobs, i)
            for i in range(req.n)
        ]
        gen = Generation(ctx, tenant, [prompt], params, adapter, req.stop_list(), req.n, "chatcmpl")
        await gen.start()
    except APIError as e:
        ctx.metrics.count_request(tenant.name, e.status)
        raise
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    fmt = ChatFormat(gen, req.model, req.logprobs, include_usage)
    return await _respond(request, gen, fmt, req.stream)


def _check_stream_options(req) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(
            400, "'stream_options' is only allowed with 'stream': true", param="stream_options"
        )


async def _respond(request: Request, gen: Generation, fmt, stream: bool) -> Response:
    if stream:
        # watching starts now: a client gone before the body is iterated still aborts
        watcher = asyncio.ensure_future(watch_disconnect(request, gen))
        return StreamingResponse(
            _stream(gen, fmt, watcher),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        await run_until_done(request, gen)
    except ClientGone:
        gen.record(499)
        return Response(status_code=499)
    except APIError as e:
        gen.record(e.status)
        raise
    except asyncio.CancelledError:
        gen.record(499)
        raise
    gen.record(200)
    return JSONResponse(fmt.full())


async def _stream(gen: Generation, fmt, watcher: asyncio.Future):
    status = 200
    try:
        for head in fmt.head():
            yield sse(head)
        async for deltas in gen.deltas():
            # tokens whose text is held back (partial character, possible stop string) make
            # no chunk unless their log-probabilities were asked for
            deltas = [
                d for d in deltas if d.text or d.finish_reason or (fmt.logprobs and d.end > d.start)
            ]
            if deltas:
                yield sse(fmt.chunk(deltas))
        if fmt.include_usage:
            yield sse(fmt.usage_chunk())
        yield SSE_DONE
    except ClientGone:
        status = 499
    except APIError as e:
        status = e.status
        yield sse(e.body())
        yield SSE_DONE
    except (asyncio.CancelledError, GeneratorExit):
        status = 499
        gen.abort()
        raise
    finally:
        watcher.cancel()
        gen.record(status)

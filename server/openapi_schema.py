"""The OpenAPI schema at `/openapi.json`: FastAPI's, plus what the routes handle themselves.

The routes parse their JSON bodies by hand (`protocol.parse`, so that every refusal is OpenAI's
envelope), which FastAPI cannot see. This fills in:
- each POST route's request body, from the pydantic model that parses it (`/v1/files`: the
  multipart form);
- the errors: every route documents 400 (FastAPI would document its 422, which this server
  never answers: invalid input is a 400), 401 where a key is needed, and a `4XX`/`5XX` default,
  all with the `Error` envelope `{"error": {"message", "type", "param", "code"}}`;
- the API key (`Authorization: Bearer KEY`) as a security scheme, on every route but the probes.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from loraplex.server.finetune_protocol import JobCreate
from loraplex.server.protocol import (
    AdapterLoad,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapter,
    UnloadLoraAdapter,
)

REF = "#/components/schemas/{model}"
BODIES = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/adapters": AdapterLoad,
    "/v1/load_lora_adapter": LoadLoraAdapter,
    "/v1/unload_lora_adapter": UnloadLoraAdapter,
    "/v1/fine_tuning/jobs": JobCreate,
}
NO_KEY = {"/health", "/metrics"}  # probes and scrapers need no API key
EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
SSE = {"text/event-stream": {"schema": EVENT}}  # "stream": true; before 3.2, `schema` is one event
OK_CONTENT = {  # 200 answers that are not (only) JSON
    "/v1/completions": SSE,
    "/v1/chat/completions": SSE,
    "/metrics": {"text/plain": {"schema": {"type": "string"}}},
    "/v1/files/{file_id}/content": {"application/octet-stream": {"schema": {"type": "string"}}},
}
ERROR = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
UPLOAD = {
    "type": "object",
    "required": ["file", "purpose"],
    "properties": {
        "file": {"type": "string", "format": "binary"},
        "purpose": {"type": "string", "enum": ["fine-tune"]},
    },
}


def _error(description: str) -> dict:
    ref = REF.format(model="Error")
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}


def build_schema(app: FastAPI) -> dict:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    models = [(m, "validation") for m in BODIES.values()]
    keys, defs = models_json_schema(models, ref_template=REF)
    components.update(defs.get("$defs", {}))
    components["Error"] = ERROR
    schema["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            if path in OK_CONTENT:
                ok = next(r for code, r in responses.items() if code.startswith("2"))
                content = ok.setdefault("content", {})
                if path not in BODIES:  # not JSON at all
                    content.clear()
                content.update(OK_CONTENT[path])
            responses.pop("422", None)
            responses["400"] = _error("Invalid request")
            if path not in NO_KEY:
                op["security"] = [{"apiKey": []}]
                responses["401"] = _error("Invalid or missing API key")
            responses["4XX"] = _error("Refused")
            responses["5XX"] = _error("Unavailable")
            if method != "post":
                continue
            if path in BODIES:
                body = keys[(BODIES[path], "validation")]
                content = {"application/json": {"schema": body}}
                op["requestBody"] = {"required": True, "content": content}
            elif path == "/v1/files":
                op["requestBody"] = {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": UPLOAD}},
                }
    return schema


def install(app: FastAPI) -> None:
    """Serve `build_schema(app)` (built once, on the first request) at /openapi.json."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app)
        return app.openapi_schema

    app.openapi = openapi

"""Schemathesis against the server's own OpenAPI schema (/openapi.json): every operation, with
data that fits the schema and data that does not, each case sent with a tenant's key, an
admin's key, a wrong key and no key. Checks: no 5xx, status codes, content types and bodies as
documented, every error in OpenAI's envelope; afterwards the engine still serves and has leaked
nothing. `LORAPLEX_FUZZ_EXAMPLES` (`make fuzz`) raises the examples per operation (a tenth of
it)."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from fuzz_helpers import (
    DERANDOMIZE,
    KEYS,
    MODEL,
    assert_engine_healthy,
    envelope_problem,
    examples,
    fuzz_server,
    stream_problem,
)
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

PROBES = {"GET /health", "GET /metrics"}  # the only routes that need no key
AUTH = {"tenant": KEYS["acme"], "admin": KEYS["root"], "wrong": "not-a-key", "none": None}
# Per operation and mode, each sent with 4 keys, over 44 operation-modes: a tenth of the count
# the body fuzzers use (`make fuzz`: 200). About 10 s for all by default (10 each).
EXAMPLES = max(examples(100) // 10, 1)


@schemathesis.check
def openai_envelope(ctx, response, case):
    """Every 4xx/5xx is `{"error": {"message", "type", "param", "code"}}`; a 200 event stream
    ends with [DONE] and carries no error."""
    content_type = response.headers.get("content-type", [""])[0]
    if response.status_code >= 400:
        problem = envelope_problem(response.status_code, content_type, response.content)
    elif content_type.startswith("text/event-stream"):
        problem = stream_problem(response.content)
    else:
        problem = None
    if problem is not None:
        raise AssertionError(problem)
    return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    srv = fuzz_server(tmp_path_factory.mktemp("fuzz_schema"))
    yield srv
    srv.stop()


# Names that exist (and some that do not), so that generated requests reach the engine and the
# adapter store instead of stopping at a 404: the served schema, with these as enums.
KNOWN = {
    ("CompletionRequest", "model"): [MODEL, f"{MODEL}:support", "support", "common", "secret"],
    ("ChatCompletionRequest", "model"): [MODEL, "support", "common", "nope"],
    ("AdapterLoad", "path"): ["a", "b", "bad", "link-out", "leaky", "../outside/x", "/etc"],
    ("LoadLoraAdapter", "lora_path"): ["c", "bad", "leaky"],
    ("JobCreate", "model"): [MODEL, "support"],
}


@pytest.fixture(scope="module")
def api_schema(live):
    doc = httpx.get(live.url + "/openapi.json").json()
    for (model, field), values in KNOWN.items():
        doc["components"]["schemas"][model]["properties"][field] = {"enum": values}
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.max_stream_events = 100_000  # read every stream to its end (default: 20 events)
    return schema


def _operations(api_schema) -> list:
    return [result.ok() for result in api_schema.get_all_operations()]


def _routes(routes) -> set[str]:
    """Every API route as "METHOD /path" (FastAPI >= 0.120 nests the included routers)."""
    out = set()
    for route in routes:
        if hasattr(route, "original_router"):
            out |= _routes(route.original_router.routes)
        elif hasattr(route, "methods") and route.path != "/openapi.json":
            out |= {f"{method} {route.path}" for method in route.methods - {"HEAD"}}
    return out


def test_schema_documents_every_route(live, api_schema):
    routes = _routes(live.app.routes)
    assert len(routes) >= 20
    assert {op.label for op in _operations(api_schema)} == routes
    doc = httpx.get(live.url + "/openapi.json").json()
    completions = doc["paths"]["/v1/completions"]["post"]
    body = completions["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    assert "422" not in doc["paths"]["/v1/files"]["get"]["responses"]  # invalid input is a 400
    assert doc["paths"]["/v1/adapters"]["post"]["responses"].keys() >= {"201", "400", "401"}


def _fuzz(live, op, mode: GenerationMode, seen: Counter) -> None:
    """EXAMPLES cases of `op`, each sent with every key of AUTH and validated."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        generated = {k: v for k, v in (case.headers or {}).items() if k != "Authorization"}
        for who, key in AUTH.items():
            case.headers = {**generated, "Authorization": f"Bearer {key}"} if key else generated
            response = case.call(base_url=live.url, timeout=120)
            seen[op.label, who, response.status_code] += 1
            try:
                case.validate_response(response, checks=CHECKS, additional_checks=[openai_envelope])
            except AssertionError as e:
                raise AssertionError(f"{who} key: {e}") from None

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_every_key(live, api_schema, mode):
    failures, seen = [], Counter()
    for op in _operations(api_schema):
        try:
            _fuzz(live, op, mode, seen)
        except Unsatisfiable:  # nothing to get wrong (negative mode, no parameters)
            assert mode == GenerationMode.NEGATIVE and not op.definition.raw.get("parameters")
        except Exception as e:  # each operation's first failure (shrunk), all reported at once
            failures.append(f"{op.label}: {type(e).__name__}: {e}")
    assert not failures, "\n\n".join(failures)
    answered = {(label, who, status) for label, who, status in seen if 200 <= status < 300}
    leaks = {k for k in answered if k[1] in ("wrong", "none") and k[0] not in PROBES}
    assert not leaks, f"answered without a valid key: {sorted(leaks)}"
    if mode == GenerationMode.POSITIVE:  # the cases reached the engine
        assert seen["POST /v1/completions", "tenant", 200] > 0, seen
        assert seen["POST /v1/chat/completions", "tenant", 200] > 0, seen
    assert_engine_healthy(live)

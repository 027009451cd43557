"""Shared by the fuzz tests (test_fuzz_schema.py, test_fuzz_bodies.py): a live server with
tenants, shared and owned adapters and fine-tuning on, the OpenAI error-envelope check, the
example count (`LORAPLEX_FUZZ_EXAMPLES`, raised by `make fuzz`) and the engine's health after a
run (serves a normal request, every page back, integrity)."""

from __future__ import annotations

import json
import os

import httpx
from server_fixtures import LiveServer, engine_kwargs, tiny_model

MODEL = "tiny"
KEYS = {"acme": "acme-key", "globex": "globex-key", "root": "root-key"}
EXAMPLES_ENV = "LORAPLEX_FUZZ_EXAMPLES"
MAX_MODEL_LEN = 96  # short generations: every accepted request runs to its end


def examples(default: int) -> int:
    """Hypothesis examples per test (or per operation): `$LORAPLEX_FUZZ_EXAMPLES` if set."""
    return int(os.environ.get(EXAMPLES_ENV, default))


# CI (`make test`) draws the same examples every run, so a run that passed keeps passing until
# the code changes; `make fuzz` ($LORAPLEX_FUZZ_EXAMPLES set) draws new ones each time.
DERANDOMIZE = EXAMPLES_ENV not in os.environ


def fuzz_server(tmp) -> LiveServer:
    """The tiny model with shared adapter `common`, tenants acme (adapter `support`), globex
    (`support`, `secret`) and admin root; adapters loadable from the test root; fine-tuning."""
    from loraplex.engine.config import EngineConfig
    from loraplex.engine.engine import Engine
    from loraplex.server.app import create_app
    from loraplex.server.config import ServerConfig
    from loraplex.server.tenants import Tenants

    m = tiny_model()
    toml = tmp / "tenants.toml"
    toml.write_text(
        '[[tenants]]\nname = "acme"\napi_keys = ["acme-key"]\nadapters = { support = "a" }\n\n'
        '[[tenants]]\nname = "globex"\napi_keys = ["globex-key"]\n'
        'adapters = { support = "b", secret = "c" }\n\n'
        '[[tenants]]\nname = "root"\napi_keys = ["root-key"]\nadmin = true\n'
    )
    config = EngineConfig(model=m["model"], **engine_kwargs(max_model_len=MAX_MODEL_LEN))
    engine = Engine(config, {"common": m["adapters"]["c"]})
    config = ServerConfig(model_id=MODEL, adapter_root=m["root"],
                          finetune_dir=str(tmp / "finetune"), max_file_bytes=64 << 10)  # fmt: skip
    app = create_app(engine, config, tenants=Tenants.from_options(str(toml)))
    return LiveServer(app)


def envelope_problem(status: int, content_type: str, body: bytes) -> str | None:
    """Why an error answer is not OpenAI's envelope, or None when it is."""
    if not content_type.startswith("application/json"):
        return f"{status} with content type {content_type!r}: {body[:200]!r}"
    try:
        doc = json.loads(body)
    except ValueError:
        return f"{status} with a body that is not JSON: {body[:200]!r}"
    if not isinstance(doc, dict) or set(doc) != {"error"} or not isinstance(doc["error"], dict):
        return f"{status} without the envelope: {doc!r}"
    err = doc["error"]
    if set(err) != {"message", "type", "param", "code"}:
        return f"{status} error fields {sorted(err)}"
    if not isinstance(err["message"], str) or not err["message"]:
        return f"{status} error message {err['message']!r}"
    if not isinstance(err["type"], str) or not err["type"]:
        return f"{status} error type {err['type']!r}"
    if any(err[k] is not None and not isinstance(err[k], str) for k in ("param", "code")):
        return f"{status} error param/code {err['param']!r}, {err['code']!r}"
    return None


def stream_problem(body: bytes) -> str | None:
    """Why a 200 event stream is malformed or carries an error, or None."""
    events = [line for line in body.decode().split("\n") if line]
    if not events or events[-1] != "data: [DONE]":
        return f"the stream does not end with [DONE]: {body[-200:]!r}"
    for line in events[:-1]:
        if not line.startswith("data: "):
            return f"not an event: {line[:200]!r}"
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return f"an error in the stream: {chunk}"
        if not isinstance(chunk.get("choices"), list):
            return f"a chunk without choices: {chunk}"
    return None


def assert_engine_healthy(live: LiveServer) -> None:
    """A normal request is served, then nothing is left: no sequence, no KV page, no adapter
    reference, and the pool's bookkeeping is consistent."""
    r = httpx.post(
        live.url + "/v1/completions",
        headers={"Authorization": f"Bearer {KEYS['acme']}"},
        json={"model": "support", "prompt": "hello", "max_tokens": 4, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(live.url + "/health").status_code == 200
    live.wait_idle(timeout=60)
    assert live.pages()[0] == 0, "KV pages still in use with no sequence left"
    store = live.ctx.engine.store
    refs = live.engine_call(lambda e: [store.refcount(u) for u in store.resident_uids()])
    assert all(r == 0 for r in refs), f"adapter references left: {refs}"
    live.engine_call(lambda e: e.check_integrity())

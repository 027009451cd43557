"""Tenants and adapter management on a live server: API keys, isolation (another tenant's
adapter is a 404 like a missing one), ownership (403), hot load -> use -> unload -> 404 with the
pool back to its level, path confinement, reload freshness, unload waiting for in-flight
requests, vLLM's aliases, per-tenant usage."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import httpx
import pytest
from server_fixtures import (
    PROMPT,
    LiveServer,
    assert_error,
    engine_kwargs,
    metric_values,
    reference,
    tiny_model,
)

from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.server.app import create_app
from loraplex.server.config import ServerConfig
from loraplex.server.tenants import Tenants

MODEL = "tiny"
KEYS = {"acme": "acme-key", "globex": "globex-key", "root": "root-key"}
GEN = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    m = tiny_model()
    toml = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    toml.write_text(
        '[[tenants]]\nname = "acme"\napi_keys = ["acme-key"]\nadapters = { support = "a" }\n\n'
        '[[tenants]]\nname = "globex"\napi_keys = ["globex-key", "globex-2"]\n'
        'adapters = { support = "b", secret = "c" }\n\n'
        '[[tenants]]\nname = "root"\napi_keys = ["root-key"]\nadmin = true\n'
    )
    engine = Engine(
        EngineConfig(model=m["model"], **engine_kwargs()), {"common": m["adapters"]["c"]}
    )
    app = create_app(
        engine, ServerConfig(model_id=MODEL, adapter_root=m["root"]),
        tenants=Tenants.from_options(str(toml)),
    )  # fmt: skip
    srv = LiveServer(app)
    yield srv
    srv.stop()


def client(live, tenant: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
    return httpx.Client(base_url=live.url, headers=headers, timeout=30)


def complete(h: httpx.Client, model: str, **kw) -> httpx.Response:
    return h.post("/v1/completions", json={**GEN, "model": model, **kw})


def test_api_keys_required(live):
    with client(live, None) as h:
        assert_error(h.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(complete(h, MODEL), 401)
        bad = h.post("/v1/completions", json={**GEN, "model": MODEL},
                     headers={"Authorization": "Bearer wrong"})  # fmt: skip
        assert_error(bad, 401)
        assert h.get("/health").status_code == 200  # probes need no key
        assert_error(h.get("/v1/admin/integrity"), 401)
    with client(live, "acme") as h:
        assert_error(h.get("/v1/admin/integrity"), 403)
    with client(live, "root") as h:
        assert h.get("/v1/admin/integrity").json()["ok"] is True
    with client(live, "acme") as h:
        assert complete(h, MODEL).status_code == 200


def test_each_tenant_sees_its_own_adapters(live):
    with client(live, "acme") as h:
        models = {m["id"]: m for m in h.get("/v1/models").json()["data"]}
        assert set(models) == {MODEL, "support", "common"}
        assert models["support"]["parent"] == MODEL and models["support"]["owned_by"] == "acme"
        text_acme = complete(h, "support").json()["choices"][0]["text"]
        # another tenant's adapter is exactly like a name that does not exist
        hidden, missing = complete(h, "secret"), complete(h, "no-such-adapter")
        assert_error(hidden, 404, "model")
        assert_error(missing, 404, "model")
        assert hidden.json()["error"]["message"].replace("secret", "X") == missing.json()["error"][
            "message"
        ].replace("no-such-adapter", "X")
        assert_error(h.delete("/v1/adapters/secret"), 404)
    with client(live, "globex") as h:
        assert {m["id"] for m in h.get("/v1/models").json()["data"]} == {
            MODEL, "support", "secret", "common",
        }  # fmt: skip
        text_globex = complete(h, "support").json()["choices"][0]["text"]
    assert text_acme == reference(PROMPT, "a", 8, ignore_eos=True).text
    assert text_globex == reference(PROMPT, "b", 8, ignore_eos=True).text


def test_ownership_rules(live):
    with client(live, "acme") as h:
        assert_error(h.delete("/v1/adapters/common"), 403)  # shared: admins only
        assert_error(h.delete("/v1/adapters/secret", params={"owner": "globex"}), 403)
        assert_error(h.post("/v1/adapters", json={"name": "x", "path": "a", "owner": "globex"}),
                     403, "owner")  # fmt: skip
        assert_error(h.post("/v1/adapters", json={"name": "support", "path": "b"}), 409, "name")
        assert_error(h.post("/v1/adapters", json={"name": "common", "path": "b"}), 409)
        assert_error(h.post("/v1/adapters", json={"name": MODEL, "path": "b"}), 409)
        assert_error(h.post("/v1/adapters", json={"name": "bad name", "path": "b"}), 400, "name")
    with client(live, "root") as h:
        listed = {(a["id"], a["owner"]) for a in h.get("/v1/adapters").json()["data"]}
        assert {("support", "acme"), ("support", "globex"), ("common", None)} <= listed
        r = h.post("/v1/adapters", json={"name": "gift", "path": "a", "owner": "acme"})
        assert r.status_code == 201 and r.json()["owner"] == "acme"
    with client(live, "acme") as h:
        assert complete(h, "gift").status_code == 200
        assert h.delete("/v1/adapters/gift").json()["deleted"] is True
    with client(live, "root") as h:
        assert h.get("/v1/usage").json()["data"][0]["tenant"] == "acme"


def test_hot_load_use_unload_then_404(live):
    live.wait_idle()
    before = live.pages()
    with client(live, "acme") as h:
        r = h.post("/v1/adapters", json={"name": "hot", "path": "b"})
        assert r.status_code == 201, r.text
        info = r.json()
        assert info["id"] == "hot" and info["owner"] == "acme" and info["rank"] == 8
        assert info["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]
        assert info["size_bytes"] > 0 and isinstance(info["load_id"], int)
        out = complete(h, "hot").json()
        assert out["choices"][0]["text"] == reference(PROMPT, "b", 8, ignore_eos=True).text
        assert "hot" in {m["id"] for m in h.get("/v1/models").json()["data"]}
        assert h.delete("/v1/adapters/hot").status_code == 200
        assert_error(complete(h, "hot"), 404, "model")
        assert_error(h.delete("/v1/adapters/hot"), 404)
    live.wait_idle()
    assert live.pages() == before
    # a reload under the same name is a fresh load with the new weights
    with client(live, "acme") as h:
        first = h.post("/v1/adapters", json={"name": "hot", "path": "a"}).json()
        text = complete(h, "hot").json()["choices"][0]["text"]
        assert text == reference(PROMPT, "a", 8, ignore_eos=True).text
        h.delete("/v1/adapters/hot")
        second = h.post("/v1/adapters", json={"name": "hot", "path": "b"}).json()
        assert second["load_id"] != first["load_id"]
        text = complete(h, "hot").json()["choices"][0]["text"]
        assert text == reference(PROMPT, "b", 8, ignore_eos=True).text
        h.delete("/v1/adapters/hot")


def test_unload_waits_for_in_flight_requests(live):
    with client(live, "acme") as h:
        assert h.post("/v1/adapters", json={"name": "busy", "path": "c"}).status_code == 201
        body = {**GEN, "model": "busy", "max_tokens": 300, "stream": True}
        chunks = []
        with h.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            chunks.append(next(lines))
            # hold the engine between steps, so the stream is surely still running below
            gate = threading.Event()
            ae = live.ctx.aengine
            held = asyncio.run_coroutine_threadsafe(ae.call(lambda e: gate.wait(30)), ae._loop)
            result = {}
            t = threading.Thread(
                target=lambda: result.update(r=client(live, "acme").delete("/v1/adapters/busy"))
            )
            t.start()
            deadline = time.monotonic() + 5
            while live.ctx.names.resolve("acme", "busy") is not None:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            assert_error(complete(h, "busy"), 404)  # new requests: 404 at once
            assert "r" not in result  # ... while the running one keeps going
            gate.set()
            assert held.result(10)
            chunks.extend(lines)
        t.join(10)
    assert result["r"].status_code == 200
    chunks = [c for c in chunks if c]
    assert chunks[-1] == "data: [DONE]" and '"finish_reason":"length"' in chunks[-2]
    assert len(chunks) > 10  # streamed token by token, not cut short
    assert live.engine_call(lambda e: [a.name for a in e.adapters.list() if "busy" in a.name]) == []


def test_paths_are_confined_to_the_adapter_root(live):
    m = tiny_model()
    with client(live, "acme") as h:
        for path in ("../outside/x", os.path.join(m["outside"], "x"), "link-out", "leaky"):
            r = h.post("/v1/adapters", json={"name": "esc", "path": path})
            assert_error(r, 400, "path", "path_not_allowed")
        r = h.post("/v1/adapters", json={"name": "abs", "path": os.path.join(m["root"], "c")})
        assert r.status_code == 201
        h.delete("/v1/adapters/abs")
        err = assert_error(h.post("/v1/adapters", json={"name": "bad", "path": "bad"}), 400, "path")
        assert "rank 999" in err["message"] and m["root"] not in err["message"]
        assert_error(h.post("/v1/adapters", json={"name": "none", "path": "nope"}), 400, "path")
        assert {m["id"] for m in h.get("/v1/models").json()["data"]} == {
            MODEL, "support", "common",
        }  # fmt: skip


def test_vllm_aliases(live):
    with client(live, "globex") as h:
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "v", "lora_path": "a"})
        assert r.status_code == 200 and r.json()["id"] == "v"
        assert complete(h, "v").status_code == 200
        r = h.post("/v1/unload_lora_adapter", json={"lora_name": "v"})
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert_error(h.post("/v1/unload_lora_adapter", json={"lora_name": "v"}), 404)
        assert_error(h.post("/v1/load_lora_adapter", json={"lora_name": "v"}), 400, "lora_path")


def test_usage_counted_per_tenant(live):
    def usage(tenant):
        with client(live, tenant) as h:
            return h.get("/v1/usage").json()["data"]

    before = usage("globex")[0]
    with client(live, "globex") as h:
        complete(h, "secret", max_tokens=5)
        assert_error(complete(h, "nope"), 404)
    after = usage("globex")
    assert len(after) == 1 and after[0]["tenant"] == "globex"  # only its own
    after = after[0]
    assert after["requests"] == before["requests"] + 1
    assert after["completion_tokens"] == before["completion_tokens"] + 5
    metrics = metric_values(httpx.get(live.url + "/metrics").text)
    assert metrics[("loraplex_requests_total", (("status", "404"), ("tenant", "globex")))] >= 1
    assert metrics[("loraplex_generation_tokens_total", (("tenant", "globex"),))] >= 5
    assert metrics[("loraplex_requests_total", (("status", "401"), ("tenant", "unauthenticated")))]
    assert len(usage("root")) == 3
    assert metrics[("loraplex_adapter_load_seconds_count", ())] >= 1

"""Security limits (#18): --max-request-bytes (413, by Content-Length and while a chunked body
streams; uploads exempt), --metrics-key, API keys never echoed or logged, oversized headers
refused without a 5xx, and bounds on prompt length, n and max_tokens."""

from __future__ import annotations

import logging

import httpx
import pytest
from server_fixtures import PROMPT, LiveServer, assert_error, engine_kwargs, tiny_model

from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.server.app import create_app
from loraplex.server.config import ServerConfig
from loraplex.server.tenants import Tenants

MODEL = "tiny"
SECRET = "sk-acme-very-secret-key"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    (tmp / "tenants.toml").write_text(
        f'[[tenants]]\nname = "acme"\napi_keys = ["{SECRET}"]\nadmin = true\n'
    )
    m = tiny_model()
    engine = Engine(EngineConfig(model=m["model"], **engine_kwargs()))
    config = ServerConfig(model_id=MODEL, max_request_bytes=4096, metrics_key="scrape-key",
                          finetune_dir=str(tmp / "finetune"))  # fmt: skip
    tenants = Tenants.from_options(str(tmp / "tenants.toml"))
    srv = LiveServer(create_app(engine, config, tenants=tenants))
    yield srv
    srv.stop()


def _client(live, key: str | None = SECRET) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=live.url, headers=headers, timeout=30)


def test_request_body_limit(live):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    with _client(live) as h:
        assert h.post("/v1/completions", json=body).status_code == 200
        big = {**body, "prompt": "x" * 5000}
        err = assert_error(h.post("/v1/completions", json=big), 413, code="request_too_large")
        assert "4096" in err["message"]

        def chunks():  # no Content-Length: refused while it streams
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        r = h.post("/v1/chat/completions", content=chunks(),
                   headers={"content-type": "application/json"})  # fmt: skip
        assert_error(r, 413, code="request_too_large")
        # uploads have their own limit (--max-file-bytes), not this one
        line = b'{"prompt": "' + b"a" * 80 + b'", "completion": " b"}\n'
        up = h.post("/v1/files", data={"purpose": "fine-tune"},
                    files={"file": ("t.jsonl", line * 80)})  # fmt: skip
        assert up.status_code == 200, up.text
        assert h.post("/v1/completions", json=body).status_code == 200  # still serving


def test_metrics_key(live):
    with httpx.Client(base_url=live.url) as h:
        assert_error(h.get("/metrics"), 401, code="invalid_api_key")
        wrong = h.get("/metrics", headers={"Authorization": "Bearer scrape-kez"})
        assert_error(wrong, 401)
        tenant_key = h.get("/metrics", headers={"Authorization": f"Bearer {SECRET}"})
        assert_error(tenant_key, 401)  # the scraper's key, not a tenant's
        ok = h.get("/metrics", headers={"Authorization": "Bearer scrape-key"})
        assert ok.status_code == 200 and "loraplex_num_requests_running" in ok.text
        assert h.get("/health").status_code == 200  # probes stay open


def test_api_keys_are_never_echoed_or_logged(live, caplog):
    guess = "sk-guess-" + SECRET[::-1]
    with caplog.at_level(logging.DEBUG), _client(live, guess) as h:
        for r in (
            h.get("/v1/models"),
            h.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}),
            h.get("/v1/usage"),
        ):
            assert_error(r, 401)
            assert guess not in r.text and SECRET not in r.text
    with caplog.at_level(logging.DEBUG), _client(live) as h:
        r = h.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
        assert_error(r, 404)
        assert SECRET not in r.text
    assert guess not in caplog.text and SECRET not in caplog.text


def test_oversized_headers_and_bounds(live):
    with _client(live) as h:
        r = h.get("/v1/models", headers={"x-junk": "z" * 200_000})
        assert_error(r, 431, code="headers_too_large")
        body = {"model": MODEL, "prompt": PROMPT}
        for bad, param in (({"n": 0}, "n"), ({"n": 10_000}, "n"), ({"max_tokens": 0}, "max_tokens"),
                           ({"max_tokens": 10**9}, "max_tokens")):  # fmt: skip
            assert_error(h.post("/v1/completions", json={**body, **bad}), 400, param=param)
        long_prompt = [5] * 1100  # token ids: more than max_model_len (1024)
        err = assert_error(h.post("/v1/completions", json={**body, "prompt": long_prompt}), 400)
        assert "1024" in err["message"] or "context" in err["message"]
        assert h.post("/v1/completions", json={**body, "max_tokens": 2}).status_code == 200

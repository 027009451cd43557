"""Per-tenant rate limits (#18): token buckets on a fake clock, the tenants file's keys, and a
live server where one tenant's limit answers 429 with Retry-After and never touches another."""

from __future__ import annotations

import types

import httpx
import pytest
from server_fixtures import PROMPT, LiveServer, assert_error, engine_kwargs, tiny_model

from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.server import rate_limits
from loraplex.server.app import create_app
from loraplex.server.config import ServerConfig
from loraplex.server.protocol import APIError
from loraplex.server.rate_limits import RateLimits
from loraplex.server.tenants import Tenants

MODEL = "tiny"


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(rate_limits, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_requests_per_minute_bursts_then_refills(clock):
    limits = RateLimits({"acme": (3, None), "globex": (None, None)})
    for _ in range(3):
        assert limits.take("acme", 10) == 0
    with pytest.raises(APIError) as info:
        limits.take("acme", 10)
    e = info.value
    assert (
        e.status == 429
        and e.code == "rate_limit_exceeded"
        and "3 requests per minute" in (e.message)
    )
    assert e.headers == {"Retry-After": "20"}  # one request refills in 60 / 3 s
    for _ in range(100):
        limits.take("globex", 10**6)  # no limits
        limits.take("nobody", 10**6)
    clock[0] += 19.9
    with pytest.raises(APIError):
        limits.take("acme", 1)
    clock[0] += 0.1
    limits.take("acme", 1)
    clock[0] += 3600  # the bucket holds one minute's allowance, no more
    for _ in range(3):
        limits.take("acme", 1)
    with pytest.raises(APIError):
        limits.take("acme", 1)


def test_tokens_per_minute_charges_up_front_and_gives_back(clock):
    limits = RateLimits({"acme": (None, 600)})
    assert limits.take("acme", 500) == 500
    with pytest.raises(APIError) as info:
        limits.take("acme", 200)  # 100 left: 100 missing at 10 tokens/s
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "10"}
    limits.give_back("acme", 300)  # the request used 200 of its 500
    assert limits.take("acme", 400) == 400
    with pytest.raises(APIError) as info:
        limits.take("acme", 601)
    assert info.value.status == 400 and info.value.code == "request_too_large"
    limits.give_back("acme", 10**6)  # never above one minute's allowance
    limits.take("acme", 600)
    with pytest.raises(APIError):
        limits.take("acme", 1)


def test_a_refused_request_takes_nothing(clock):
    limits = RateLimits({"acme": (2, 100)})
    limits.take("acme", 100)  # 1 request left, no tokens
    for _ in range(5):
        with pytest.raises(APIError):
            limits.take("acme", 50)  # refused for tokens: its request is not counted either
    limits.give_back("acme", 50)
    limits.take("acme", 50)  # the request bucket still had its 1
    limits.give_back("acme", 50)
    with pytest.raises(APIError, match="2 requests per minute"):
        limits.take("acme", 50)


def test_the_tenants_file_sets_limits(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text(
        '[[tenants]]\nname = "acme"\napi_keys = ["k"]\nrequests_per_minute = 60\n'
        "tokens_per_minute = 5000\n"
    )
    acme = Tenants.from_options(str(toml)).by_name["acme"]
    assert (acme.requests_per_minute, acme.tokens_per_minute) == (60, 5000)
    for bad in ("0", "-1", "1.5", "true", '"60"'):
        toml.write_text(
            f'[[tenants]]\nname = "acme"\napi_keys = ["k"]\nrequests_per_minute = {bad}\n'
        )
        with pytest.raises(ValueError, match="'requests_per_minute' must be a positive integer"):
            Tenants.from_options(str(toml))


def test_live_limits_are_per_tenant(tmp_path):
    toml = tmp_path / "tenants.toml"
    toml.write_text(
        '[[tenants]]\nname = "acme"\napi_keys = ["acme-key"]\nrequests_per_minute = 2\n'
        "tokens_per_minute = 1000\n\n"
        '[[tenants]]\nname = "globex"\napi_keys = ["globex-key"]\n'
    )
    m = tiny_model()
    engine = Engine(EngineConfig(model=m["model"], **engine_kwargs()))
    srv = LiveServer(
        create_app(engine, ServerConfig(model_id=MODEL), tenants=Tenants.from_options(str(toml)))
    )
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    try:
        acme = httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer acme-key"})
        globex = httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer globex-key"})
        with acme, globex:
            big = acme.post("/v1/completions", json={**body, "max_tokens": 1000})
            err = assert_error(big, 400, code="request_too_large")
            assert "tokens_per_minute 1000" in err["message"]
            assert acme.post("/v1/completions", json=body).status_code == 200
            stream = acme.post("/v1/completions", json={**body, "stream": True})
            assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
            refused = acme.post("/v1/completions", json=body)
            assert_error(refused, 429, code="rate_limit_exceeded")
            assert 1 <= int(refused.headers["retry-after"]) <= 30
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4}  # fmt: skip
            assert_error(acme.post("/v1/chat/completions", json=chat), 429)
            assert acme.get("/v1/models").status_code == 200  # only generation is limited
            for _ in range(5):  # the other tenant is not limited by acme's use
                assert globex.post("/v1/completions", json=body).status_code == 200
    finally:
        srv.stop()

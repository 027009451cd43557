"""The OpenAI API against a real engine on the tiny model, through the official `openai`
client and raw HTTP on a live uvicorn: exactness against the offline LLM, streaming, stop
strings, n, logprobs, errors, metrics, disconnects, concurrent streams on different adapters."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
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

MODEL = "tiny"


@pytest.fixture(scope="module")
def live():
    m = tiny_model()
    adapters = {"a": m["adapters"]["a"], "b": m["adapters"]["b"]}
    engine = Engine(EngineConfig(model=m["model"], **engine_kwargs()), adapters)
    srv = LiveServer(create_app(engine, ServerConfig(model_id=MODEL)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def test_completion_matches_offline_engine(live, client):
    for adapter in (None, "a", "b"):
        ref = reference(PROMPT, adapter, 12, ignore_eos=True)
        out = client.completions.create(
            model=adapter or MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        choice = out.choices[0]
        assert choice.text == ref.text
        assert choice.finish_reason == "length"
        assert choice.logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-5)
        assert out.usage.completion_tokens == 12
        assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    # token-id prompts and "base:adapter" model names
    ids = reference(PROMPT, "a", 1).prompt_token_ids
    out = client.completions.create(model=f"{MODEL}:a", prompt=ids, max_tokens=12, temperature=0)
    assert out.choices[0].text == reference(PROMPT, "a", 12).text
    assert out.model == f"{MODEL}:a"


def test_chat_and_streaming_match(live, client):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model()["model"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ref = reference(ids, "b", 16, ignore_eos=True)
    kw = dict(model="b", messages=messages, temperature=0, extra_body={"ignore_eos": True})
    out = client.chat.completions.create(max_completion_tokens=16, **kw)
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 16
    chunks = list(
        client.chat.completions.create(
            max_tokens=16, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    # streamed completions: same text as the offline engine
    stream = client.completions.create(
        model="a", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in stream) == reference(PROMPT, "a", 10).text


def test_stop_strings_across_token_boundaries(live, client):
    full = reference(PROMPT, "a", 24, ignore_eos=True)
    tokens = [client.completions.create(model="a", prompt=PROMPT, max_tokens=24, temperature=0,
              logprobs=0, extra_body={"ignore_eos": True}).choices[0].logprobs.tokens]  # fmt: skip
    # a stop string that starts inside token 3 and ends inside token 4
    boundary = len("".join(tokens[0][:4]))
    stop = full.text[boundary - 2 : boundary + 1]
    assert len(stop) == 3 and full.text.find(stop) <= boundary - 2
    expected = full.text[: full.text.find(stop)]
    for stream in (False, True):
        out = client.completions.create(
            model="a", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "\x00never"],
            stream=stream, extra_body={"ignore_eos": True},
        )  # fmt: skip
        if stream:
            chunks = list(out)
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = out.choices[0].text, out.choices[0].finish_reason
        assert text == expected and reason == "stop"
    live.wait_idle()


def test_n_seed_and_multiple_prompts(live, client):
    out = client.completions.create(
        model=MODEL, prompt=["Once upon a time", "The train"], n=2, max_tokens=8,
        temperature=1.0, seed=7, extra_body={"ignore_eos": True, "top_k": 50},
    )  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    again = client.completions.create(
        model=MODEL, prompt=["Once upon a time", "The train"], n=2, max_tokens=8,
        temperature=1.0, seed=7, extra_body={"ignore_eos": True, "top_k": 50},
    )  # fmt: skip
    assert [c.text for c in out.choices] == [c.text for c in again.choices]  # seeded
    assert out.choices[0].text != out.choices[1].text  # each choice its own stream
    assert out.usage.completion_tokens == 32


def test_chat_logprobs_and_min_tokens(live, client):
    out = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=3, extra_body={"min_tokens": 5},
    )  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == 5 == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy = top 1


def test_models_list(live, client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL, "a", "b"}
    assert models["a"].model_extra["parent"] == MODEL
    assert models[MODEL].model_extra["parent"] is None


def test_error_statuses_and_envelopes(live):
    url = live.url
    ok = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    with httpx.Client(base_url=url) as h:
        assert_error(h.post("/v1/completions", json={**ok, "best_of": 3}), 400, "best_of")
        assert_error(h.post("/v1/completions", json={**ok, "mystery": 1}), 400, "mystery")
        assert_error(h.post("/v1/completions", json={**ok, "max_tokens": 2000}), 400, "max_tokens",
                     "context_length_exceeded")  # fmt: skip
        assert_error(h.post("/v1/completions", json={**ok, "prompt": [99999]}), 400, "prompt")
        assert_error(h.post("/v1/completions", json={**ok, "stream_options": {}}), 400)
        assert_error(h.post("/v1/completions", json={**ok, "min_tokens": 5}), 400, "min_tokens")
        assert_error(h.post("/v1/completions", content=b"{not json"), 400)
        assert_error(h.post("/v1/completions", json={**ok, "model": "nope"}), 404, "model")
        assert_error(h.post("/v1/completions", json={**ok, "model": "nope:a"}), 404, "model")
        assert_error(h.post("/v1/adapters", json={"name": "x", "path": "a"}), 400, "path",
                     "adapter_root_not_set")  # fmt: skip
        assert_error(h.get("/v1/nowhere"), 404)
        assert h.get("/health").json() == {"status": "ok"}


def test_lone_surrogates_are_a_400_not_a_500(live):
    """JSON may escape a lone surrogate ("\\ud800"): it is not Unicode text. Echoed in an error
    message it failed the UTF-8 encoding of the answer, and the tokenizer refused it: both
    were 500s."""
    ok = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x\ud800"}]}
    with httpx.Client(base_url=live.url) as h:

        def post(route: str, body: dict) -> httpx.Response:
            return h.post(route, content=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json"})  # fmt: skip

        err = assert_error(post("/v1/completions", {**ok, "model": "\ud800"}), 404, "model")
        assert "\\ud800" in err["message"]  # written as an escape
        err = assert_error(post("/v1/completions", {**ok, "\udfff": 1}), 400)  # a key
        assert err["message"].startswith("Invalid request body: ") and err["param"] is None
        assert_error(post("/v1/completions", {**ok, "prompt": "a\ud800b"}), 400, "prompt")
        assert_error(post("/v1/completions", {**ok, "prompt": ["ok", "\udc00"]}), 400, "prompt")
        assert_error(post("/v1/chat/completions", chat), 400, "messages.0.content")
        assert post("/v1/completions", {**ok, "prompt": "a\ud83d\ude00b"}).status_code == 200


def test_metrics_present_and_moving(live, client):
    before = metric_values(httpx.get(live.url + "/metrics").text)
    client.completions.create(model="a", prompt=PROMPT, max_tokens=6, temperature=0,
                              extra_body={"ignore_eos": True})  # fmt: skip
    after = metric_values(httpx.get(live.url + "/metrics").text)
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        key = (f"loraplex_{name}_seconds_count", ())
        assert after[key] >= before.get(key, 0) + 1, name
    itl = ("loraplex_inter_token_latency_seconds_count", ())
    assert after[itl] >= before.get(itl, 0) + 5
    tenant = (("tenant", "default"),)
    gen = ("loraplex_generation_tokens_total", tenant)
    assert after[gen] == before.get(gen, 0) + 6
    req = ("loraplex_requests_total", (("status", "200"), ("tenant", "default")))
    assert after[req] == before.get(req, 0) + 1
    assert after[("loraplex_prompt_tokens_total", tenant)] > 0
    assert after[("loraplex_pool_pages_total", ())] == live.ctx.engine.pool.num_pages
    for key in (("kind", "kv"), ("kind", "adapter"), ("kind", "train")):
        assert ("loraplex_pool_pages_used", (key,)) in after
    assert after[("loraplex_finetune_jobs", (("status", "running"),))] == 0
    assert after[("loraplex_adapters_loaded", (("tier", "host"),))] == 2
    assert after[("loraplex_adapters_loaded", (("tier", "device"),))] >= 1
    for name in ("num_requests_running", "num_requests_waiting", "adapter_evictions_total"):
        assert (f"loraplex_{name}", ()) in after
    assert after[("loraplex_adapter_loads_total", ())] >= 1


def _assert_freed(live, base_kv: int) -> None:
    """KV pages back to the baseline and no adapter reference left. (An idle adapter may stay
    resident: that is the LRU cache, not a leak.)"""
    assert live.pages()[0] == base_kv
    store = live.ctx.engine.store
    refs = live.engine_call(lambda e: [store.refcount(u) for u in store.resident_uids()])
    assert all(r == 0 for r in refs), refs


def test_disconnect_aborts_and_frees_pages(live):
    live.wait_idle()
    base_kv = live.pages()[0]
    body = {"model": "a", "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True}
    # streamed: read two chunks, then hang up
    with httpx.Client(base_url=live.url, timeout=10) as h:
        with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    live.wait_idle(timeout=5)
    _assert_freed(live, base_kv)
    # not streamed: hang up while it runs
    raw = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", live.port))
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw)
    )
    deadline = time.monotonic() + 5
    while live.ctx.aengine.stats.running == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    s.close()
    live.wait_idle(timeout=5)
    _assert_freed(live, base_kv)
    metrics = metric_values(httpx.get(live.url + "/metrics").text)
    assert metrics[("loraplex_requests_total", (("status", "499"), ("tenant", "default")))] >= 2


def test_concurrent_streams_on_different_adapters(live):
    client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)

    async def run(adapter):
        stream = await client.completions.create(
            model=adapter, prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        pieces, times = [], []
        async for chunk in stream:
            pieces.append(chunk.choices[0].text)
            times.append(time.monotonic())
        return "".join(pieces), times

    async def both():
        return await asyncio.gather(run("a"), run("b"))

    (text_a, t_a), (text_b, t_b) = asyncio.run(both())
    assert text_a == reference(PROMPT, "a", 40, ignore_eos=True).text
    assert text_b == reference(PROMPT, "b", 40, ignore_eos=True).text
    assert text_a != text_b
    assert t_a[0] < t_b[-1] and t_b[0] < t_a[-1]  # they overlapped


def test_queue_full_then_shutdown():
    """--max-queue: 429 once the waiting queue is full; while shutting down: 503."""
    m = tiny_model()
    engine = Engine(EngineConfig(model=m["model"], **engine_kwargs(max_num_seqs=1)))
    srv = LiveServer(
        create_app(engine, ServerConfig(model_id=MODEL, max_queue=1, shutdown_grace_s=0.5))
    )
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 900, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            with h.stream("POST", "/v1/completions", json=body) as r1:
                lines1 = r1.iter_lines()  # (a discarded iterator would close the response)
                next(lines1)  # running
                with h.stream("POST", "/v1/completions", json=body) as r2:
                    deadline = time.monotonic() + 5
                    while srv.ctx.aengine.stats.waiting == 0:
                        assert time.monotonic() < deadline
                        time.sleep(0.005)
                    assert r2.status_code == 200
                    resp = h.post("/v1/completions", json={**body, "stream": False})
                    assert_error(resp, 429, code="queue_full")
        srv.ctx.aengine.begin_shutdown()
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            assert_error(h.post("/v1/completions", json=body), 503)
            assert_error(h.get("/health"), 503)
    finally:
        srv.stop()
    assert not engine.has_unfinished()
    assert engine.pool.pages_used("kv") == 0


def test_engine_failure_fails_requests_and_health(monkeypatch):
    """A step that raises: in-flight requests get 503, /health turns 503, nothing hangs."""
    from fastapi.testclient import TestClient

    engine = Engine(EngineConfig(model=tiny_model()["model"], **engine_kwargs()))
    app = create_app(engine, ServerConfig(model_id=MODEL))

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "step", broken_step)
    with TestClient(app) as h:
        err = assert_error(h.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"}), 503)
        assert "device lost" in err["message"]
        assert_error(h.get("/health"), 503)
        assert_error(h.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"}), 503)

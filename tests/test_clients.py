"""`clients/` against a live server on loopback (the tiny model, two tenants, --adapter-root):
sync and async completions, chat and streams (exact against the offline engine), adapter
load/list/unload, error mapping from OpenAI's envelope, stream parsing edge cases, and the
`openai` example run as a subprocess."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_fixtures import (
    PROMPT,
    LiveServer,
    engine_kwargs,
    metric_values,
    reference,
    tiny_model,
)

from loraplex.clients.calls import Call, StreamReader
from loraplex.clients.client import (
    AsyncLoraplexClient,
    LoraplexClient,
    LoraplexConnectionError,
    LoraplexError,
)
from loraplex.clients.errors import from_response
from loraplex.clients.types import ChatMessage, CompletionChunk

MODEL = "tiny"
ROOT_KEY, ACME_KEY = "root-key", "acme-key"
EXAMPLE = Path(__file__).resolve().parents[1] / "clients" / "examples" / "openai_example.py"
GREEDY = {"temperature": 0, "ignore_eos": True}
CHAT = [ChatMessage("system", "Be brief."), {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from loraplex.engine.config import EngineConfig
    from loraplex.engine.engine import Engine
    from loraplex.server.app import create_app
    from loraplex.server.config import ServerConfig
    from loraplex.server.tenants import Tenants

    m = tiny_model()
    toml = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    toml.write_text(
        f'[[tenants]]\nname = "acme"\napi_keys = ["{ACME_KEY}"]\n\n'
        f'[[tenants]]\nname = "root"\napi_keys = ["{ROOT_KEY}"]\nadmin = true\n'
    )
    adapters = {"a": m["adapters"]["a"], "b": m["adapters"]["b"]}
    engine = Engine(EngineConfig(model=m["model"], **engine_kwargs()), adapters)
    app = create_app(
        engine, ServerConfig(model_id=MODEL, adapter_root=m["root"]),
        tenants=Tenants.from_options(str(toml)),
    )  # fmt: skip
    srv = LiveServer(app)
    yield srv
    srv.stop()


@pytest.fixture
def root(live):
    with LoraplexClient(live.url, api_key=ROOT_KEY, timeout=30) as c:
        yield c


def test_sync_completions_chat_and_streams(root):
    ref = reference(PROMPT, "a", 8, ignore_eos=True)
    out = root.completions("a", PROMPT, max_tokens=8, logprobs=2, **GREEDY)
    assert out.text == ref.text and out.finish_reason == "length" and out.model == "a"
    assert out.usage.completion_tokens == 8
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert "".join(lp.tokens) == out.text and len(lp.top_logprobs) == 8
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert (
        root.completions(MODEL, PROMPT, max_tokens=8, **GREEDY).text
        == reference(PROMPT, None, 8, ignore_eos=True).text
    )
    # streamed: the same text, finish_reason on the last choice chunk, usage chunk last
    chunks = list(
        root.stream_completions(
            "a", PROMPT, max_tokens=8, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert all(isinstance(c, CompletionChunk) for c in chunks)
    assert "".join(c.text for c in chunks) == ref.text
    assert chunks[-2].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8

    chat = root.chat("b", CHAT, max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    entries = chat.choices[0].logprobs
    assert len(entries) == 6 and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in entries)
    with root.stream_chat("b", CHAT, max_tokens=6, **GREEDY) as stream:
        pieces = list(stream)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.text for p in pieces) == chat.text
    assert pieces[-1].finish_reason == "length"


def test_async_client_matches_sync(live, root):
    sync_a = root.completions("a", PROMPT, max_tokens=10, **GREEDY).text
    sync_chat = root.chat("b", CHAT, max_tokens=6, **GREEDY).text

    async def main():
        async with AsyncLoraplexClient(live.url + "/v1", api_key=ROOT_KEY) as c:
            assert await c.health() is True
            models = {m.id: m for m in await c.models()}
            assert models[MODEL].parent is None and models["a"].parent == MODEL

            async def stream_text(model):
                return "".join([ch.text async for ch in c.stream_completions(
                    model, PROMPT, max_tokens=10, **GREEDY)])  # fmt: skip

            async def stream_chat():
                async with c.stream_chat("b", CHAT, max_tokens=6, **GREEDY) as s:
                    return "".join([ch.text async for ch in s])

            return await asyncio.gather(
                c.completions("a", PROMPT, max_tokens=10, **GREEDY),
                stream_text("a"),
                stream_text("b"),
                c.chat("b", CHAT, max_tokens=6, **GREEDY),
                stream_chat(),
            )

    whole, streamed_a, streamed_b, chat, streamed_chat = asyncio.run(main())
    assert whole.text == streamed_a == sync_a
    assert streamed_b == reference(PROMPT, "b", 10, ignore_eos=True).text != sync_a
    assert chat.text == streamed_chat == sync_chat


def _aborted(client, expect: float | None = None) -> float:
    """Requests of tenant "root" that ended with the client gone (status 499); with `expect`,
    waits up to 5 s for that count (the server notices a hang-up within moments)."""
    key = ("loraplex_requests_total", (("status", "499"), ("tenant", "root")))
    deadline = time.monotonic() + 5
    while True:
        n = metric_values(client.metrics()).get(key, 0)
        if expect is None or n == expect or time.monotonic() > deadline:
            return n
        time.sleep(0.01)


def test_closing_a_stream_early_aborts_it(live, root):
    live.wait_idle()
    before = _aborted(root)
    long = {"max_tokens": 900, **GREEDY}
    with root.stream_completions("a", PROMPT, **long) as stream:
        next(stream), next(stream)
    live.wait_idle(timeout=5)  # the server saw the hang-up and aborted the sequence
    assert _aborted(root, before + 1) == before + 1

    async def main():
        async with AsyncLoraplexClient(live.url, api_key=ROOT_KEY) as c:
            async with c.stream_chat("b", CHAT, **long) as s:
                await s.__anext__()

    asyncio.run(main())
    live.wait_idle(timeout=5)
    assert _aborted(root, before + 2) == before + 2


def test_adapter_load_list_use_unload(live, root):
    info = root.load_adapter("fresh", "c")
    assert (info.id, info.owner, info.shared, info.rank) == ("fresh", "root", False, 2)
    assert info.target_modules == ["gate_proj", "up_proj", "down_proj"] and info.size_bytes > 0
    assert "fresh" in {a.id for a in root.list_adapters()}
    assert "fresh" in {m.id for m in root.models()}
    out = root.completions("fresh", PROMPT, max_tokens=6, **GREEDY)
    assert out.text == reference(PROMPT, "c", 6, ignore_eos=True).text
    with pytest.raises(LoraplexError) as e:
        root.load_adapter("fresh", "a")
    assert (e.value.status, e.value.type, e.value.code) == (409, "conflict_error", "name_taken")
    root.unload_adapter("fresh")
    assert "fresh" not in {a.id for a in root.list_adapters()}
    with pytest.raises(LoraplexError) as e:
        root.completions("fresh", PROMPT, max_tokens=2)
    assert e.value.status == 404

    # an admin loads for a tenant; only that tenant sees it, and may unload it
    mine = root.load_adapter("mine", str(Path(tiny_model()["root"]) / "a"), owner="acme")
    assert mine.owner == "acme" and mine.rank == 4
    with LoraplexClient(live.url, api_key=ACME_KEY) as acme:
        assert {a.id for a in acme.list_adapters()} == {"mine", "a", "b"}
        assert acme.chat("mine", CHAT, max_tokens=3, **GREEDY).usage.completion_tokens == 3
        with pytest.raises(LoraplexError) as e:
            acme.load_adapter("theirs", "a", owner="root")
        assert (e.value.status, e.value.type, e.value.param) == (403, "permission_error", "owner")
        acme.unload_adapter("mine")
        assert {a.id for a in acme.list_adapters()} == {"a", "b"}
    with pytest.raises(LoraplexError) as e:
        root.unload_adapter("mine", owner="acme")
    assert e.value.status == 404 and e.value.code == "model_not_found"
    with pytest.raises(LoraplexError) as e:
        root.load_adapter("escape", "link-out")
    assert (e.value.status, e.value.param, e.value.code) == (400, "path", "path_not_allowed")


def test_error_mapping(live, root, monkeypatch):
    with pytest.raises(LoraplexError) as e:
        root.completions("nope", PROMPT, max_tokens=2)
    err = e.value
    assert (err.status, err.type, err.param, err.code) == (
        404, "not_found_error", "model", "model_not_found"
    )  # fmt: skip
    assert "nope" in err.message and str(err).startswith("404 not_found_error: ")
    with pytest.raises(LoraplexError) as e:
        next(root.stream_chat("nope", CHAT))  # streams raise at the first chunk
    assert e.value.status == 404 and e.value.param == "model"
    with pytest.raises(LoraplexError) as e:
        root.completions(MODEL, PROMPT, mystery=1)
    assert (e.value.status, e.value.type, e.value.param, e.value.code) == (
        400, "invalid_request_error", "mystery", "unsupported_parameter"
    )  # fmt: skip
    with pytest.raises(LoraplexError) as e:
        root.chat(MODEL, CHAT, temperature=5)
    assert (e.value.status, e.value.param) == (400, "temperature")
    with pytest.raises(ValueError, match="stream_"):
        root.completions(MODEL, PROMPT, stream=True)
    for key in ("wrong-key", None):
        monkeypatch.delenv("LORAPLEX_API_KEY", raising=False)
        with LoraplexClient(live.url, api_key=key) as bad:
            with pytest.raises(LoraplexError) as e:
                bad.models()
        assert (e.value.status, e.value.type, e.value.code) == (
            401, "authentication_error", "invalid_api_key"
        )  # fmt: skip
    # the key from the environment; the tenant sees only its own usage
    monkeypatch.setenv("LORAPLEX_API_KEY", ACME_KEY)
    with LoraplexClient(live.url) as acme:
        acme.completions(MODEL, PROMPT, max_tokens=2)
        assert [u.tenant for u in acme.usage()] == ["acme"]
        assert acme.health() is True and "loraplex_requests_total" in acme.metrics()
    # no answer: a timeout (the server aborts the abandoned request), a refused connection
    before = _aborted(root)
    with LoraplexClient(live.url, api_key=ROOT_KEY, timeout=0.05) as hasty:
        with pytest.raises(LoraplexConnectionError) as e:
            hasty.completions(MODEL, PROMPT, max_tokens=900, **GREEDY)
    assert e.value.status is None and e.value.type == "timeout"
    live.wait_idle(timeout=5)
    assert _aborted(root, before + 1) == before + 1
    with LoraplexClient(f"http://127.0.0.1:{_closed_port()}") as nobody:
        with pytest.raises(LoraplexConnectionError) as e:
            nobody.health()
    assert e.value.type == "connection_error"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stream_reader_and_error_bodies():
    """Stream parsing without a server: multi-line data, comments, an error event (status
    from its type), a body cut before [DONE]; answers that are not envelopes."""
    reader = StreamReader(Call("POST", "/v1/completions", CompletionChunk.from_dict))
    lines = [": keep-alive", "", 'data: {"choices":', 'data: [{"text": "hi"}]}', "", "data: [DONE]"]
    got = [x for x in map(reader.feed, lines) if x is not None]
    assert [c.text for c in got] == ["hi"] and not reader.done
    reader.finish()  # flushes the last event (no trailing blank line)
    assert reader.done
    err = {"error": {"message": "engine failed", "type": "service_unavailable", "param": None,
                     "code": "unavailable"}}  # fmt: skip
    reader = StreamReader(Call("POST", "/v1/completions", CompletionChunk.from_dict))
    reader.feed("data: " + json.dumps(err))
    with pytest.raises(LoraplexError) as e:
        reader.feed("")
    assert (e.value.status, e.value.type) == (503, "service_unavailable")
    assert e.value.code == "unavailable" and e.value.message == "engine failed"
    reader = StreamReader(Call("POST", "/v1/completions", CompletionChunk.from_dict))
    reader.feed('data: {"choices": []}')
    with pytest.raises(LoraplexConnectionError) as e:
        reader.finish()
    assert e.value.type == "incomplete_stream"
    proxy = from_response(502, b"<html>Bad Gateway</html>")
    assert (proxy.status, proxy.type, proxy.message) == (502, "error", "<html>Bad Gateway</html>")
    assert from_response(429, b"").type == "rate_limit_error"


def test_openai_example_runs(live):
    def run(*args):
        cmd = [sys.executable, str(EXAMPLE), "--base-url", live.url + "/v1", "--max-tokens", "6"]
        return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60)

    ok = run("--api-key", ROOT_KEY, "--prompt", PROMPT)
    assert ok.returncode == 0, ok.stderr
    for head in (f"[completion on {MODEL}] finish_reason=length", "[chat on a]", "[stream on a]"):
        assert head in ok.stdout, ok.stdout
    assert "usage: 6 tokens generated" in ok.stdout
    assert f"{PROMPT}{reference(PROMPT, None, 6).text}" in ok.stdout.replace("\r", "")
    bad = run("--api-key", "wrong-key", "--model", MODEL, "--adapter", "b")
    assert bad.returncode == 1 and "401" in bad.stderr

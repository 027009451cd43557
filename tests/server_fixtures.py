"""Helpers for the server tests: a tiny checkpoint WITH a tokenizer, adapters under an adapter
root, a live uvicorn on a loopback port, and reference outputs from the offline `LLM`.

`tiny_model()` is built once per process (cached) with `engine.demo` (its BPE tokenizer and chat
template, random weights at tiny sizes). Layout of its directory:

    model/                   the checkpoint (vocab 2000, hidden 64, 2 layers)
    root/                    the adapter root given to the servers
        a/ b/ c/             valid adapters: rank 4 q/v, rank 8 attention+gate, rank 2 MLP
        bad/                 rank 999 (refused by the loader)
        link-out -> ../outside/x           a symlink that escapes the root
        leaky/               adapter_config.json + adapter_model.safetensors -> ../../outside/x/...
    outside/x/               a valid adapter outside the root
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

ADAPTERS = {
    "a": (4, ["q_proj", "v_proj"], 11),
    "b": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], 12),
    "c": (2, ["gate_proj", "up_proj", "down_proj"], 13),
}
PROMPT = "The harbor town woke early. Fishing boats left"


@functools.cache
def tiny_model() -> dict:
    """{"dir", "model", "root", "outside", "adapters": {name: dir}} (read-only)."""
    from loraplex.engine.demo import make_adapter, make_checkpoint
    from loraplex.engine.loader import load_model_spec

    d = Path(tempfile.mkdtemp(prefix="loraplex-server-tests-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    model = make_checkpoint(
        d / "model", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, seed=5,
    )  # fmt: skip
    spec = load_model_spec(model)
    root, outside = d / "root", d / "outside"
    adapters = {}
    for name, (rank, targets, seed) in ADAPTERS.items():
        adapters[name] = make_adapter(
            root / name, spec, rank=rank, alpha=2 * rank, target_modules=targets, seed=seed
        )
    make_adapter(outside / "x", spec, rank=4, alpha=8, target_modules=["q_proj"], seed=21)
    bad = Path(make_adapter(root / "bad", spec, rank=4, alpha=8, target_modules=["q_proj"], seed=3))
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 999}))
    os.symlink(outside / "x", root / "link-out")
    (root / "leaky").mkdir()
    shutil.copy(outside / "x" / "adapter_config.json", root / "leaky")
    os.symlink(
        outside / "x" / "adapter_model.safetensors", root / "leaky" / "adapter_model.safetensors"
    )
    return {
        "dir": str(d),
        "model": model,
        "root": str(root),
        "outside": str(outside),
        "adapters": adapters,
    }


def engine_kwargs(**kw) -> dict:
    """EngineConfig fields for the test servers: a small pool, a short context."""
    return {"pool_bytes": 16 << 20, "max_model_len": 1024, **kw}


@functools.cache
def reference_llm():
    """An offline `LLM` on the tiny model with adapters a, b, c (for exactness checks)."""
    from loraplex.engine.llm import LLM

    m = tiny_model()
    return LLM(m["model"], adapters=dict(m["adapters"]), **engine_kwargs())


def reference(prompt, adapter: str | None, max_tokens: int, **params):
    """Greedy (unless told otherwise) reference output from the offline API."""
    from loraplex.scheduler.sequence import SamplingParams

    p = SamplingParams(max_tokens=max_tokens, temperature=params.pop("temperature", 0.0), **params)
    return reference_llm().generate([prompt], p, [adapter])[0]


class LiveServer:
    """The app served by uvicorn on a loopback port, in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    @property
    def ctx(self):
        return self.app.state.ctx

    def engine_call(self, fn, timeout: float = 10.0):
        """Run `fn(engine)` on the engine thread (between steps) and return its result."""
        ae = self.ctx.aengine
        return asyncio.run_coroutine_threadsafe(ae.call(fn), ae._loop).result(timeout)

    def pages(self) -> tuple[int, int]:
        """(kv pages, adapter pages) in use, read on the engine thread."""
        return self.engine_call(lambda e: (e.pool.pages_used("kv"), e.pool.pages_used("adapter")))

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no sequence is queued or running."""
        deadline = time.monotonic() + timeout
        while self.engine_call(lambda e: e.has_unfinished()):
            if time.monotonic() > deadline:
                raise AssertionError("the engine did not become idle")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def assert_error(resp, status: int, param: str | None = None, code: str | None = None) -> dict:
    """`resp` (httpx/requests response) is `status` with OpenAI's error envelope."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def metric_values(text: str) -> dict[tuple, float]:
    """Prometheus text -> {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out

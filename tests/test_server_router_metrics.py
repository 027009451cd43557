"""The metrics a router reads (the Gateway API Inference Extension's model-server protocol):
`loraplex_lora_requests_info` names the adapters of running and waiting requests and follows
them in a live server; `loraplex_kv_cache_usage_perc` rises with KV pages in use."""

from __future__ import annotations

import threading
import time

import httpx
from server_fixtures import LiveServer, engine_kwargs, metric_values, tiny_model

from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.server.app import create_app
from loraplex.server.config import ServerConfig

INFO = "loraplex_lora_requests_info"


def _info(h: httpx.Client) -> tuple[dict, float, float]:
    """(labels, value, kv usage) of the one lora_requests_info sample."""
    values = metric_values(h.get("/metrics").text)
    samples = [(dict(k[1]), v) for k, v in values.items() if k[0] == INFO]
    assert len(samples) == 1, samples
    return samples[0][0], samples[0][1], values[("loraplex_kv_cache_usage_perc", ())]


def test_lora_requests_info_follows_running_and_waiting_adapters():
    m = tiny_model()
    adapters = {n: m["adapters"][n] for n in ("a", "b", "c")}
    engine = Engine(EngineConfig(model=m["model"], **engine_kwargs(max_num_seqs=1)), adapters)
    srv = LiveServer(create_app(engine, ServerConfig(model_id="tiny")))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as h:
            labels, value, usage = _info(h)
            assert labels == {"max_lora": "1", "running_lora_adapters": "",
                              "waiting_lora_adapters": ""}  # fmt: skip
            assert abs(value - time.time()) < 60 and usage == 0.0
            body = {"prompt": "hello", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
            threads = [
                threading.Thread(
                    target=h.post,
                    args=("/v1/completions",),
                    kwargs={"json": {**body, "model": name}},
                )  # fmt: skip
                for name in ("a", "b", "b")
            ]
            threads[0].start()
            deadline = time.monotonic() + 30
            while _info(h)[0]["running_lora_adapters"] != "a":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            for t in threads[1:]:
                t.start()
            while _info(h)[0]["waiting_lora_adapters"] != "b":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            labels, _, usage = _info(h)
            assert labels["running_lora_adapters"] in ("a", "b") and 0 < usage < 1
            for t in threads:
                t.join()
            srv.wait_idle()
            time.sleep(0.3)  # the name sets refresh at most every 0.25 s
            srv.engine_call(lambda e: e.stats())  # a fresh snapshot after the wait
            labels, _, _ = _info(h)
            assert labels["running_lora_adapters"] == labels["waiting_lora_adapters"] == ""
    finally:
        srv.stop()

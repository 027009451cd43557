"""The Ray Serve application on a real local Ray cluster: 2 CPU engine replicas, the tiny model,
6 shared adapters (and a bad one, skipped) and a tenant's own one, beside a single
`loraplex serve` with the same adapters and tenants as the reference.

- every adapter (and the base model, and the tenant's adapter) answers with the same greedy
  tokens as `loraplex serve`, plain and streamed, several requests at once;
- tenant rules and errors answer exactly what `loraplex serve` answers;
- repeated requests for one adapter land on one replica (the `x-loraplex-replica` header), and
  no replica holds more adapters than its limit (LRU eviction; 6 adapters, 2 x 2 slots);
- a client that disconnects has its sequences aborted on the replica;
- killing a replica mid-run loses no request that the client retries on 503;
- `loraplex serve-ray` as a process, and the `serve run` / KubeRay configs of deploy/ray/.
About 40 s on 2 cores, most of it starting Ray twice.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from server_fixtures import LiveServer, engine_kwargs, tiny_model

serve = pytest.importorskip("ray.serve", reason="Ray Serve is the optional extra loraplex[ray]")
import ray  # noqa: E402

from loraplex.engine.config import EngineConfig  # noqa: E402
from loraplex.engine.engine import Engine  # noqa: E402
from loraplex.server.app import create_app  # noqa: E402
from loraplex.server.config import ServerConfig  # noqa: E402
from loraplex.server.ray_app import APP_NAME, build_app, parse_app_args  # noqa: E402
from loraplex.server.ray_replica import ADAPTERS_HEADER, REPLICA_HEADER  # noqa: E402
from loraplex.server.tenants import Tenants  # noqa: E402

MODEL = "tiny"
# name -> (rank, target modules, seed)
ADAPTERS = {
    "s1": (1, ["q_proj", "v_proj"], 31),
    "s2": (2, ["gate_proj", "up_proj", "down_proj"], 32),
    "s4": (4, ["q_proj", "k_proj", "v_proj", "o_proj"], 33),
    "s8": (8, ["q_proj", "v_proj", "gate_proj"], 34),
    "s3": (3, ["o_proj", "down_proj"], 35),
    "s6": (6, ["k_proj", "up_proj"], 36),
}
KEYS = {"acme": "acme-key", "beta": "beta-key"}
PER_REPLICA = 2
PROMPTS = ["The harbor town woke early.", "Fishing boats left", "Gulls circled the"]


ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_run_and_kuberay_configs_parse():
    """deploy/ray: both configs name our builder, and their args are valid serve-ray options."""
    config = yaml.safe_load((ROOT / "deploy/ray/serve_config.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy/ray/rayservice.yaml").read_text())
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    for cfg in (config, yaml.safe_load(service["spec"]["serveConfigV2"])):
        (app,) = cfg["applications"]
        assert app["import_path"] == "loraplex.server.ray_app:build_app"
        args = parse_app_args(app["args"])
        assert args.device == "cuda" and args.replicas >= 2 and args.model.startswith("/")
    docker = (ROOT / "deploy/ray/Dockerfile").read_text()
    assert f"RAY_VERSION={service['spec']['rayClusterConfig']['rayVersion']}" in docker
    with pytest.raises(ValueError, match="--no-such-option"):
        parse_app_args({"no_such_option": 1})


def test_serve_ray_command(tmp_path):
    """`loraplex serve-ray` as a process: a local Ray cluster, one replica, a completion with
    an adapter and an API key, then SIGTERM: a clean stop, exit status 0."""
    m = tiny_model()
    port = _free_port()
    log = open(tmp_path / "log.txt", "w+")
    cmd = [
        sys.executable, "-m", "loraplex.server", "serve-ray", "--replicas", "1", "--num-cpus", "2",
        "--object-store-bytes", str(100 << 20), "--model", m["model"], "--port", str(port),
        "--adapter", f"a={m['adapters']['a']}", "--pool-bytes", str(16 << 20),
        "--max-model-len", "1024", "--api-key", "k",
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, Path(log.name).read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve-ray did not start"
            time.sleep(0.2)
        h = httpx.Client(base_url=url, headers={"Authorization": "Bearer k"}, timeout=30)
        r = h.post("/v1/completions", json={"model": "a", "prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert r.headers[REPLICA_HEADER].startswith("SERVE_REPLICA::loraplex#EngineReplica#")
        assert httpx.post(url + "/v1/completions", json={}).status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:  # a failed test: still stop Ray's processes with it
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert f"listening on http://127.0.0.1:{port}" in Path(log.name).read_text()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from loraplex.engine.demo import make_adapter
    from loraplex.engine.loader import load_model_spec

    m = tiny_model()
    d = tmp_path_factory.mktemp("ray")
    spec = load_model_spec(m["model"])
    library, root = d / "library", d / "root"
    for name, (rank, targets, seed) in ADAPTERS.items():
        make_adapter(library / name, spec, rank=rank, alpha=2 * rank, target_modules=targets,
                     seed=seed)  # fmt: skip
    make_adapter(root / "mine", spec, rank=4, alpha=4, target_modules=["q_proj"], seed=37)
    bad = make_adapter(library / "bad", spec, rank=4, alpha=8, target_modules=["q_proj"], seed=3)
    cfg = json.loads((Path(bad) / "adapter_config.json").read_text())
    (Path(bad) / "adapter_config.json").write_text(json.dumps({**cfg, "r": 999}))  # skipped
    toml = d / "tenants.toml"
    toml.write_text(
        '[[tenants]]\nname = "acme"\napi_keys = ["acme-key"]\nadapters = { private = "mine" }\n\n'
        '[[tenants]]\nname = "beta"\napi_keys = ["beta-key"]\n'
    )
    kw = engine_kwargs()
    reference = LiveServer(create_app(
        Engine(EngineConfig(model=m["model"], **kw), adapter_dir=str(library)),
        ServerConfig(model_id=MODEL, adapter_root=str(root)),
        tenants=Tenants.from_options(str(toml)),
    ))  # fmt: skip
    app = build_app({  # what a `serve run` config's args hold
        "model": m["model"], "served_model_name": MODEL, "adapter_dir": str(library),
        "tenants": str(toml), "adapter_root": str(root), "pool_bytes": kw["pool_bytes"],
        "max_model_len": kw["max_model_len"], "replicas": 2,
        "max_adapters_per_replica": PER_REPLICA, "max_num_seqs": 16,
    })  # fmt: skip
    port = _free_port()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, object_store_memory=100 << 20, include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "ref": reference.url}
    finally:
        serve.shutdown()
        ray.shutdown()
        reference.stop()


def client(url: str, tenant: str | None = "acme") -> httpx.Client:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


def body(model: str, prompt: str, stream: bool = False, **kw) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "logprobs": 0, "stream": stream, **kw}  # fmt: skip


def answer(h: httpx.Client, req: dict) -> tuple[int, dict | str, dict]:
    """(status, the text and tokens or the error body, headers) of a completion."""
    if not req.get("stream"):
        r = h.post("/v1/completions", json=req)
        if r.status_code != 200:
            return r.status_code, r.json(), r.headers
        c = r.json()["choices"][0]
        return 200, {"text": c["text"], "tokens": c["logprobs"]["tokens"]}, r.headers
    text, tokens = "", []
    with h.stream("POST", "/v1/completions", json=req) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json(), r.headers
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # the request failed mid-stream
                retry = chunk["error"]["code"] == "replica_unavailable"
                return 503 if retry else 500, chunk, r.headers
            for c in chunk["choices"]:
                text += c["text"]
                tokens += (c.get("logprobs") or {}).get("tokens") or []
    return 200, {"text": text, "tokens": tokens}, r.headers


def replica_state(adapter: str) -> dict:
    """`describe()` of the replica holding `adapter` (multiplexed routing, as requests go)."""
    handle = serve.get_deployment_handle("EngineReplica", APP_NAME)
    return handle.options(multiplexed_model_id=adapter).describe.remote().result(timeout_s=30)


def test_one_adapter_stays_on_one_replica_and_lru_bounds(setup):
    # first in the module: s4's first request loads it on one replica, and nothing else runs
    with client(setup["url"]) as h:
        status, _, headers = answer(h, body("s4", PROMPTS[0]))
        assert status == 200 and headers[ADAPTERS_HEADER] == "1"
        replicas = {headers[REPLICA_HEADER]}
        # the replica reports its adapters to the routers (every 0.1 s): once this process's
        # router sends s4 there 5 times in a row, the ingress's knows too
        deadline, hits = time.monotonic() + 20, 0
        while hits < 5:
            assert time.monotonic() < deadline, "the routers never learned where s4 is"
            hits = hits + 1 if replica_state("s4")["replica"] in replicas else 0
        time.sleep(0.2)
        for i in range(8):
            status, _, headers = answer(h, body("s4", PROMPTS[i % 3], stream=i % 2 == 1))
            assert status == 200 and headers[ADAPTERS_HEADER] == "1"
            replicas.add(headers[REPLICA_HEADER])
        assert len(replicas) == 1, replicas
        state = replica_state("s4")
        assert state["replica"] in replicas and state["adapters"] == ["s4"]
        for name in ADAPTERS:  # every adapter: loads, and evictions beyond 2 per replica
            status, _, headers = answer(h, body(name, PROMPTS[1]))
            assert status == 200 and int(headers[ADAPTERS_HEADER]) <= PER_REPLICA + 1
    held = {}
    for name in ADAPTERS:
        state = replica_state(name)
        assert len(state["adapters"]) <= PER_REPLICA and state["registered"] <= PER_REPLICA
        held[state["replica"]] = set(state["adapters"])
    assert sum(map(len, held.values())) <= 2 * PER_REPLICA < len(ADAPTERS)  # LRU evicted


MODELS = [MODEL, *ADAPTERS, "private"]


def test_same_greedy_tokens_as_loraplex_serve(setup):
    jobs = [(model, p, stream) for model in MODELS for p in PROMPTS[:2] for stream in (False, True)]
    with client(setup["ref"]) as ref:
        expected = {job: answer(ref, body(*job))[1] for job in jobs}
    with client(setup["url"]) as h, ThreadPoolExecutor(6) as pool:
        got = dict(zip(jobs, pool.map(lambda job: answer(h, body(*job)), jobs), strict=True))
    for job in jobs:
        status, out, headers = got[job]
        assert status == 200, (job, out)
        assert out == expected[job], job
        assert headers[REPLICA_HEADER].startswith(f"SERVE_REPLICA::{APP_NAME}#EngineReplica#")
    assert len({got[job][2][REPLICA_HEADER] for job in jobs}) == 2  # both replicas served


def test_tenant_rules_and_errors_match_loraplex_serve(setup):
    cases = [
        (None, "POST", "/v1/completions", body("s1", "x")),  # no key: 401
        ("beta", "POST", "/v1/completions", body("private", "x")),  # another tenant's: 404
        ("acme", "POST", "/v1/completions", body("nope", "x")),
        ("acme", "POST", "/v1/completions", body("s1", "x", temperature=-1)),
        ("acme", "POST", "/v1/completions", body("s1", "x", max_tokens=5000)),
        ("acme", "POST", "/v1/completions", {"model": "s1", "prompt": "x", "best_of": 3}),
        ("acme", "POST", "/v1/chat/completions", {"model": "s2", "messages": []}),
        ("acme", "POST", "/v1/completions", "not json"),
        ("acme", "GET", "/v1/nowhere", None),
        ("acme", "GET", "/v1/models", None),
        ("beta", "GET", "/v1/models", None),
    ]
    for tenant, method, path, req in cases:
        answers = []
        for url in (setup["ref"], setup["url"]):
            with client(url, tenant) as h:
                kw = {"content": req} if isinstance(req, str) else {"json": req}
                r = h.request(method, path, **({} if req is None else kw))
                data = r.json()
                for m in data.get("data", []) if path == "/v1/models" else []:
                    m.pop("created")
                answers.append((r.status_code, data))
        assert answers[0] == answers[1], (tenant, path, req)
        if path == "/v1/models":
            ids = {m["id"] for m in answers[1][1]["data"]}
            assert ("private" in ids) == (tenant == "acme") and set(ADAPTERS) < ids
    schema = httpx.get(setup["url"] + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])


def test_client_disconnect_aborts_on_the_replica(setup):
    # tenant beta has used no replica so far: its usage there is this request's alone
    req = body("s2", PROMPTS[0], stream=True, max_tokens=1000, n=8)
    with client(setup["url"], "beta") as h, h.stream("POST", "/v1/completions", json=req) as r:
        assert next(r.iter_lines()).startswith("data: ")
        replica = r.headers[REPLICA_HEADER]
    deadline = time.monotonic() + 20
    while True:  # the replica that ran it (s2 may be on both), once its sequences are gone
        state = replica_state("s2")
        if state["replica"] == replica and not state["sequences"] and "beta" in state["usage"]:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    assert 0 < state["usage"]["beta"]["completion_tokens"] < 8 * 1000  # aborted early


def _retrying(h: httpx.Client, req: dict, deadline: float) -> tuple[dict, int]:
    """The answer to `req`, retried on 503 (in a response or a stream) and on a dropped
    connection; (answer, retries). Fails past `deadline`: a request must never hang."""
    retries = 0
    while True:
        assert time.monotonic() < deadline, "a request did not finish in time"
        try:
            status, out, _ = answer(h, req)
        except httpx.TransportError:
            status, out = 503, None
        if status == 200:
            return out, retries
        assert status == 503, out
        retries += 1
        time.sleep(0.2)


def test_killing_a_replica_loses_no_retried_request(setup):
    jobs = [(m, PROMPTS[i % 3], i % 2 == 0) for i in range(5) for m in ("s1", "s4", MODEL, "s8")]
    long_job = body("s4", PROMPTS[1], stream=True, max_tokens=400)
    with client(setup["ref"]) as ref:
        expected = {job: answer(ref, body(*job, max_tokens=40))[1] for job in set(jobs)}
        expected_long = answer(ref, long_job)[1]
    deadline = time.monotonic() + 120
    with client(setup["url"]) as h, ThreadPoolExecutor(4) as pool:
        with h.stream("POST", "/v1/completions", json=long_job) as r:
            assert r.status_code == 200
            victim = r.headers[REPLICA_HEADER]
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # in flight on the victim now
            futures = {
                job: pool.submit(_retrying, h, body(*job, max_tokens=40), deadline) for job in jobs
            }
            time.sleep(0.2)
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            rest = [line for line in lines if line]
        # the stream ends (no hang) with a retryable error in OpenAI's envelope
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])["error"]
        assert (err["code"], err["type"]) == ("replica_unavailable", "service_unavailable")
        assert _retrying(h, long_job, deadline)[0] == expected_long
        for job, f in futures.items():
            assert f.result()[0] == expected[job], job
        # a request that reaches no replica at all is refused the same way, never queued
        # forever: covered by the retries above (the victim's routed requests got 503s)

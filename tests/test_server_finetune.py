"""The OpenAI fine-tuning API on a live server, driven by the official `openai` client: upload ->
job -> events with a falling loss -> checkpoints -> the tuned model answers its task at once,
while other adapters keep being served; bad files name their line; tenants are isolated; cancel;
the state survives a restart (SQLite)."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import openai
import pytest
from server_fixtures import LiveServer, assert_error, engine_kwargs, tiny_model

from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.server.app import create_app
from loraplex.server.config import ServerConfig
from loraplex.server.tenants import Tenants

MODEL = "tiny"
KEYS = {"acme": "acme-key", "globex": "globex-key", "root": "root-key"}
WORDS = ["harbor", "bread", "river", "garden", "music", "stars", "water", "school", "boats",
         "books", "light", "rain", "tree", "bridge", "valley", "pasta"]  # fmt: skip
TASK = [{"prompt": f"{w} {i} ->", "completion": " yes"} for i in range(3) for w in WORDS]
HELD_OUT = [f"{w} {i} ->" for i in (7, 8) for w in WORDS[:10]]


def _toml(tmp) -> str:
    path = tmp / "tenants.toml"
    path.write_text(
        '[[tenants]]\nname = "acme"\napi_keys = ["acme-key"]\nadapters = { support = "a" }\n\n'
        '[[tenants]]\nname = "globex"\napi_keys = ["globex-key"]\n\n'
        '[[tenants]]\nname = "root"\napi_keys = ["root-key"]\nadmin = true\n'
    )
    return str(path)


def _server(tmp, finetune_dir, **kw) -> LiveServer:
    m = tiny_model()
    engine = Engine(
        EngineConfig(model=m["model"], **engine_kwargs(finetune_max_tokens_per_step=128))
    )
    config = ServerConfig(model_id=MODEL, adapter_root=m["root"], finetune_dir=str(finetune_dir),
                          **kw)  # fmt: skip
    app = create_app(engine, config, tenants=Tenants.from_options(_toml(tmp)))
    return LiveServer(app)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    srv = _server(tmp, tmp / "finetune", max_jobs_per_tenant=3, max_file_bytes=64 << 10)
    srv.tmp = tmp
    yield srv
    srv.stop()


def oai(live, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEYS[tenant], max_retries=0)


def http(live, tenant: str = "acme") -> httpx.Client:
    return httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEYS[tenant]}"},
                        timeout=30)  # fmt: skip


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _wait(client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout=120):
    deadline = time.monotonic() + timeout
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def _answers(client, model: str) -> float:
    hits = 0
    for prompt in HELD_OUT:
        out = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0)
        hits += out.choices[0].text.strip().startswith("yes")
    return hits / len(HELD_OUT)


def test_upload_train_and_call_the_tuned_model(live):
    c = oai(live)
    f = c.files.create(file=("task.jsonl", _jsonl(TASK)), purpose="fine-tune")
    assert f.purpose == "fine-tune" and f.bytes == len(_jsonl(TASK))
    assert c.files.retrieve(f.id).filename == "task.jsonl"
    assert c.files.content(f.id).read() == _jsonl(TASK)
    job = c.fine_tuning.jobs.create(
        model=MODEL, training_file=f.id, validation_file=f.id, suffix="yes", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 10}}},
        extra_body={"lora_rank": 8, "lora_alpha": 64,
                    "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]},
    )  # fmt: skip
    assert job.status == "validating_files" and job.fine_tuned_model is None
    # other adapters keep being served while it trains
    served_while_running = 0
    while (state := c.fine_tuning.jobs.retrieve(job.id).status) not in ("succeeded", "failed"):
        out = c.completions.create(model="support", prompt="harbor ->", max_tokens=4,
                                   temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
        assert len(out.choices[0].text) > 0 or out.usage.completion_tokens == 4
        if state == "running" and c.fine_tuning.jobs.retrieve(job.id).status == "running":
            served_while_running += 1
    job = _wait(c, job.id)
    assert job.status == "succeeded", job.error
    assert served_while_running >= 1
    name = f"ft:{MODEL}:acme:yes:{job.id}"
    assert job.fine_tuned_model == name and job.trained_tokens > 0
    assert job.hyperparameters.n_epochs == 4 and job.hyperparameters.batch_size == 8
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e.data for e in reversed(events) if e.type == "metrics"]
    assert len(metrics) == 4 * 6  # 48 examples / 8, 4 epochs
    assert metrics[-1]["train_loss"] < 0.5 * metrics[0]["train_loss"]
    assert "valid_loss" in metrics[5]  # at each epoch's end
    checkpoints = list(c.fine_tuning.jobs.checkpoints.list(job.id))
    assert [ck.step_number for ck in checkpoints] == [24, 18, 12, 6]
    assert checkpoints[1].fine_tuned_model_checkpoint == f"{name}:ckpt-step-18"
    models = {m.id for m in c.models.list()}
    assert name in models and f"{name}:ckpt-step-6" in models
    assert _answers(c, name) >= 0.9
    assert _answers(c, MODEL) == 0  # the base does not do it
    results = c.files.content(job.result_files[0]).read().decode().splitlines()
    assert results[0].startswith("step,train_loss") and len(results) == 25
    # usage and metrics count what was trained
    with http(live) as h:
        usage = h.get("/v1/usage").json()["data"][0]
        assert usage["trained_tokens"] == job.trained_tokens
        text = h.get("/metrics").text
    assert 'loraplex_finetune_jobs{status="succeeded"}' in text
    assert 'loraplex_finetune_trained_tokens_total{tenant="acme"}' in text
    # a file in use by no running job can go; the tuned model stays
    assert c.files.delete(f.id).deleted
    assert _answers(c, name) >= 0.9


@pytest.mark.parametrize("lines, where", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "c", "completion": "d"}', "{not json"],
     "line 3: "),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "line 1: no assistant turn"),
    (['{"prompt": "a", "completion": "b"}',
      '{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}'],
     "line 2: "),
    # a lone surrogate escape: was a 500 (the tokenizer's TypeError)
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "x\\ud800", "completion": "y"}'],
     "line 2: a string holds a lone surrogate"),
])  # fmt: skip
def test_a_bad_file_is_a_400_naming_its_line(live, lines, where):
    c = oai(live)
    with pytest.raises(openai.BadRequestError) as err:
        c.files.create(file=("bad.jsonl", ("\n".join(lines) + "\n").encode()), purpose="fine-tune")
    assert err.value.status_code == 400 and where in err.value.message, err.value.message
    if "robot" in lines[-1]:
        assert "robot" in err.value.message
    assert all(f.filename != "bad.jsonl" for f in c.files.list())


def test_refusals(live):
    c = oai(live)
    f = c.files.create(file=("t.jsonl", _jsonl(TASK[:4])), purpose="fine-tune")
    with http(live) as h:
        r = h.post("/v1/fine_tuning/jobs", json={"model": "gpt-4o", "training_file": f.id})
        assert_error(r, 400, param="model", code="model_not_available")
        r = h.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": "file-nope"})
        assert_error(r, 400, param="training_file")
        r = h.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": f.id,
                                                 "hyperparameters": {"n_epochs": 0}})  # fmt: skip
        assert_error(r, 400, param="hyperparameters.n_epochs")
        r = h.post("/v1/files", files={"file": ("x.jsonl", b"x" * (65 << 10))},
                   data={"purpose": "fine-tune"})  # fmt: skip
        assert_error(r, 413)
        r = h.post("/v1/files", files={"file": ("x.jsonl", _jsonl(TASK[:1]))},
                   data={"purpose": "assistants"})  # fmt: skip
        assert_error(r, 400, param="purpose")
    # a file a live job uses cannot be deleted; the per-tenant job limit
    long = {"n_epochs": 50, "batch_size": 1}
    jobs = [c.fine_tuning.jobs.create(model=MODEL, training_file=f.id,
                                      hyperparameters=long) for _ in range(3)]  # fmt: skip
    with pytest.raises(openai.RateLimitError):
        c.fine_tuning.jobs.create(model=MODEL, training_file=f.id)
    with pytest.raises(openai.ConflictError):
        c.files.delete(f.id)
    for job in jobs:
        assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.cancel(jobs[0].id)
    assert live.engine_call(lambda e: e.pool.pages_used("train")) == 0
    live.engine_call(lambda e: e.check_integrity())
    assert c.files.delete(f.id).deleted


def test_tenants_see_only_their_own(live):
    acme, globex, root = oai(live), oai(live, "globex"), oai(live, "root")
    f = acme.files.create(file=("t.jsonl", _jsonl(TASK[:8])), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(model=MODEL, training_file=f.id, suffix="iso",
                                       hyperparameters={"n_epochs": 1})  # fmt: skip
    job = _wait(acme, job.id)
    assert job.status == "succeeded"
    for call in (lambda: globex.files.retrieve(f.id), lambda: globex.files.content(f.id),
                 lambda: globex.fine_tuning.jobs.retrieve(job.id),
                 lambda: globex.fine_tuning.jobs.list_events(job.id),
                 lambda: globex.completions.create(model=job.fine_tuned_model, prompt="x",
                                                   max_tokens=1)):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError):  # another tenant's file is no file
        globex.fine_tuning.jobs.create(model=MODEL, training_file=f.id)
    assert job.id not in {j.id for j in globex.fine_tuning.jobs.list()}
    assert job.fine_tuned_model not in {m.id for m in globex.models.list()}
    assert job.id in {j.id for j in root.fine_tuning.jobs.list(limit=100)}


def test_state_survives_a_restart(live, tmp_path):
    c = oai(live)
    f = c.files.create(file=("t.jsonl", _jsonl(TASK[:8])), purpose="fine-tune")
    done = _wait(c, c.fine_tuning.jobs.create(model=MODEL, training_file=f.id, suffix="keep",
                                              hyperparameters={"n_epochs": 2}).id)  # fmt: skip
    assert done.status == "succeeded"
    # a second server on a copy of the state, with one job caught mid-run
    import shutil

    state = tmp_path / "state"
    live.engine_call(lambda e: None)  # between steps: no write in flight
    shutil.copytree(live.ctx.finetune.root, state)
    db = sqlite3.connect(state / "finetune.db")
    db.execute("UPDATE jobs SET status = 'running' WHERE id != ?", (done.id,))
    db.commit()
    db.close()
    srv = _server(tmp_path, state)
    try:
        c2 = oai(srv)
        ids = {j.id for j in c2.fine_tuning.jobs.list(limit=100)}
        assert done.id in ids and len(ids) >= 3
        again = c2.fine_tuning.jobs.retrieve(done.id)
        assert again.status == "succeeded" and again.fine_tuned_model == done.fine_tuned_model
        out = c2.completions.create(model=done.fine_tuned_model, prompt=HELD_OUT[0], max_tokens=2)
        assert out.choices[0].text is not None
        interrupted = [j for j in c2.fine_tuning.jobs.list(limit=100) if j.id != done.id]
        assert all(j.status in ("failed", "cancelled") for j in interrupted)
        failed = [j for j in interrupted if j.status == "failed" and j.error.code ==
                  "server_restarted"]  # fmt: skip
        assert failed and "not resumed" in failed[0].error.message
    finally:
        srv.stop()

"""The tenant-isolation matrix (#18): every route that names a resource x (own, other tenant's,
shared, missing) for adapters, files, jobs and usage. Another tenant's resource answers exactly
like a missing one (status and body, the name or id aside); own and shared ones work; lists
and usage never show another tenant's."""

from __future__ import annotations

import json

import httpx
import pytest
from fuzz_helpers import KEYS, MODEL, fuzz_server

LINES = [{"prompt": f"{w} ->", "completion": " yes"} for w in ("ab", "cd", "ef", "gh")]
MISSING_FILE, MISSING_JOB = "file-000000000000000000000000", "ftjob-000000000000000000000000"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The server, and a file and a finished job of each of acme and globex."""
    srv = fuzz_server(tmp_path_factory.mktemp("matrix"))
    own = {}
    for tenant in ("acme", "globex"):
        with _client(srv, tenant) as h:
            data = "".join(json.dumps(x) + "\n" for x in LINES)
            f = h.post("/v1/files", data={"purpose": "fine-tune"},
                       files={"file": ("t.jsonl", data)}).json()  # fmt: skip
            job = h.post("/v1/fine_tuning/jobs", json={
                "model": MODEL, "training_file": f["id"], "suffix": tenant,
                "method": {"type": "supervised",
                           "supervised": {"hyperparameters": {"n_epochs": 1}}}}).json()  # fmt: skip
            own[tenant] = {"file": f["id"], "job": job["id"]}
    for tenant in ("acme", "globex"):
        with _client(srv, tenant) as h:
            for _ in range(600):
                state = h.get(f"/v1/fine_tuning/jobs/{own[tenant]['job']}").json()["status"]
                if state in ("succeeded", "failed", "cancelled"):
                    break
                srv.wait_idle(timeout=30)
            assert state == "succeeded"
    yield srv, own
    srv.stop()


def _client(srv, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEYS[tenant]}"},
                        timeout=60)  # fmt: skip


def _same(a: httpx.Response, b: httpx.Response, a_name: str, b_name: str) -> None:
    """The two answers are the same, each one's resource name standing for the other's."""
    assert a.status_code == b.status_code, (a.status_code, a.text, b.status_code, b.text)
    assert a.text.replace(a_name, "<x>") == b.text.replace(b_name, "<x>"), (a.text, b.text)


ADAPTER_ROUTES = [
    ("complete", lambda h, n: h.post("/v1/completions",
                                    json={"model": n, "prompt": "ab ->", "max_tokens": 2})),
    ("chat", lambda h, n: h.post("/v1/chat/completions", json={
        "model": n, "max_tokens": 2, "messages": [{"role": "user", "content": "ab"}]})),
    ("prefixed", lambda h, n: h.post(
        "/v1/completions", json={"model": f"{MODEL}:{n}", "prompt": "a", "max_tokens": 1})),
    ("delete", lambda h, n: h.delete(f"/v1/adapters/{n}")),
    ("unload", lambda h, n: h.post("/v1/unload_lora_adapter", json={"lora_name": n})),
]  # fmt: skip


@pytest.mark.parametrize("route", [r[0] for r in ADAPTER_ROUTES])
def test_adapters(world, route):
    srv, _ = world
    call = dict(ADAPTER_ROUTES)[route]
    with _client(srv, "acme") as acme:
        # globex's `secret` answers like a name nobody has; the read-only routes first
        if route in ("complete", "chat", "prefixed"):
            _same(call(acme, "secret"), call(acme, "no-such-adapter"), "secret", "no-such-adapter")
            assert call(acme, "support").status_code == 200  # own (acme's, not globex's)
            assert call(acme, "common").status_code == 200  # shared
        else:
            _same(call(acme, "secret"), call(acme, "no-such-adapter"), "secret", "no-such-adapter")
    with _client(srv, "globex") as globex:  # and it is still there for its owner
        ok = globex.post(
            "/v1/completions", json={"model": "secret", "prompt": "a", "max_tokens": 1}
        )
        assert ok.status_code == 200


def test_adapter_lists(world):
    srv, own = world
    with _client(srv, "acme") as acme:
        models = {m["id"] for m in acme.get("/v1/models").json()["data"]}
        adapters = {a["id"] for a in acme.get("/v1/adapters").json()["data"]}
    assert "secret" not in models and "secret" not in adapters
    assert {"support", "common", MODEL} <= models
    assert not any(":globex:" in m for m in models)  # globex's tuned model is globex's
    assert any(":acme:" in m for m in models)


FILE_ROUTES = [
    ("get", lambda h, i: h.get(f"/v1/files/{i}")),
    ("content", lambda h, i: h.get(f"/v1/files/{i}/content")),
    ("delete", lambda h, i: h.delete(f"/v1/files/{i}")),
    ("job-with", lambda h, i: h.post("/v1/fine_tuning/jobs",
                                    json={"model": MODEL, "training_file": i})),
]  # fmt: skip
JOB_ROUTES = [
    ("get", lambda h, i: h.get(f"/v1/fine_tuning/jobs/{i}")),
    ("events", lambda h, i: h.get(f"/v1/fine_tuning/jobs/{i}/events")),
    ("checkpoints", lambda h, i: h.get(f"/v1/fine_tuning/jobs/{i}/checkpoints")),
    ("cancel", lambda h, i: h.post(f"/v1/fine_tuning/jobs/{i}/cancel")),
]


@pytest.mark.parametrize("route", [r[0] for r in FILE_ROUTES])
def test_files(world, route):
    srv, own = world
    call = dict(FILE_ROUTES)[route]
    theirs = own["globex"]["file"]
    with _client(srv, "acme") as acme:
        _same(call(acme, theirs), call(acme, MISSING_FILE), theirs, MISSING_FILE)
        if route in ("get", "content"):
            assert call(acme, own["acme"]["file"]).status_code == 200
    with _client(srv, "globex") as globex:
        assert globex.get(f"/v1/files/{theirs}").status_code == 200  # untouched


@pytest.mark.parametrize("route", [r[0] for r in JOB_ROUTES])
def test_jobs(world, route):
    srv, own = world
    call = dict(JOB_ROUTES)[route]
    theirs = own["globex"]["job"]
    with _client(srv, "acme") as acme:
        _same(call(acme, theirs), call(acme, MISSING_JOB), theirs, MISSING_JOB)
        mine = call(acme, own["acme"]["job"])
        if route == "cancel":  # its own job is found: it has ended, so it cannot be cancelled
            assert mine.json()["error"]["code"] == "job_already_ended", mine.text
        else:
            assert mine.status_code == 200, mine.text
    with _client(srv, "globex") as globex:
        assert globex.get(f"/v1/fine_tuning/jobs/{theirs}").json()["status"] == "succeeded"


def test_lists_and_usage(world):
    srv, own = world
    with _client(srv, "acme") as acme:
        files = {f["id"] for f in acme.get("/v1/files").json()["data"]}
        jobs = {j["id"] for j in acme.get("/v1/fine_tuning/jobs").json()["data"]}
        usage = acme.get("/v1/usage").json()["data"]
    assert own["globex"]["file"] not in files and own["acme"]["file"] in files
    assert jobs == {own["acme"]["job"]}
    assert [u["tenant"] for u in usage] == ["acme"]
    with _client(srv, "root") as root:  # admins see all
        assert {u["tenant"] for u in root.get("/v1/usage").json()["data"]} >= {"acme", "globex"}
        jobs = {j["id"] for j in root.get("/v1/fine_tuning/jobs").json()["data"]}
        assert jobs >= {own["acme"]["job"], own["globex"]["job"]}

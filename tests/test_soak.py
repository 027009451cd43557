"""The soak (#18) in CI: loadtests/soak.py for about a minute against a real `loraplex serve` on
the tiny test model: three tenants streaming over owned, shared and hot-loaded adapters at 2x
pool oversubscription, adapters loaded and unloaded every second or so, fine-tuning jobs back
to back, t2 rate-limited (deliberate 429s), integrity and RSS checked every 2 s, then the
fairness phase. Every pass criterion must hold. The 10-minute run is `make soak`."""

from __future__ import annotations

import json
import shutil

from server_fixtures import tiny_model

from loraplex.loadtests import soak


def test_soak_one_minute_passes_every_criterion(tmp_path):
    m = tiny_model()
    source = tmp_path / "source"
    for name, path in m["adapters"].items():
        shutil.copytree(path, source / name)
    out = tmp_path / "results"
    argv = ["--model", m["model"], "--adapter-source", str(source), "--results", str(out),
            "--duration", "36s", "--warmup", "12s", "--shared-adapters", "4",
            "--owned-adapters", "2", "--hot-adapters", "2", "--concurrency", "3",
            "--churn-interval", "1", "--check-interval", "2", "--progress-every", "10",
            "--rpm", "60", "--train-examples", "24", "--train-epochs", "1",
            "--fairness-seconds", "5", "--flood-streams", "16", "--trickle-interval", "0.25",
            "--shutdown-timeout", "10"]  # fmt: skip
    status = soak.main(argv)
    result = json.loads((out / "results.json").read_text())
    failed = [c for c in result["criteria"] if c["gate"] and not c["passed"]]
    assert status == 0 and result["passed"] and not failed, (failed, result["failure_examples"])
    outcomes = result["outcomes"]
    assert set(outcomes) <= {"ok", "404_unloaded", "429_queue_full", "429_rate_limit_exceeded"}
    assert outcomes["ok"] > 100
    assert outcomes.get("404_unloaded", 0) > 0  # requests for hot adapters while unloaded
    assert outcomes.get("429_rate_limit_exceeded", 0) > 0  # t2's requests_per_minute
    assert result["churn"]["loads"] > 0 and result["churn"]["unloads"] > 0
    assert result["finetune_jobs"].get("succeeded", 0) >= 1
    checks = [c for c in result["checks"] if "integrity" in c]
    assert len(checks) >= 10 and all(c["integrity"] for c in checks)
    assert all(c["rss_kib"] for c in checks)
    assert result["checks"][-1]["evictions"] > 0
    fair = result["fairness"]
    assert fair["alone"]["n"] > 5 and fair["flood"]["n"] > 5  # measured, reported, not gated
    assert (out / "results.md").read_text().startswith("# Soak: PASS")
    assert (out / "server.log").is_file()

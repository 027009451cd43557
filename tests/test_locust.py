"""Locust (loadtests/locustfile.py) headless against a real `loraplex serve` of the demo model:
a timed run through `python -m loraplex.loadtests.locust_run` (which starts and stops the server),
and trace replays. The servers find the demo in $LORAPLEX_CACHE, set for this module to a
directory holding a reduced build (a few training steps: the real one takes minutes; its files,
names and vocabulary are the same)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraplex.engine.demo import DEMO_ADAPTERS, DEMO_VERSION
from loraplex.engine.demo_train import build_demo
from loraplex.loadtests.server_process import ServerProcess
from loraplex.loadtests.workloads import TraceRequest, WorkloadSpec, make_trace

LORAPLEX = str(Path(sys.executable).with_name("loraplex"))
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module", autouse=True)
def demo_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    build_demo(cache / DEMO_VERSION, scale=0.005, progress=False)
    # the compiled CPU kernels live in the cache too: share the usual ones, built once
    usual = Path(os.environ.get("LORAPLEX_CACHE") or Path.home() / ".cache/loraplex") / "kernels"
    usual.mkdir(parents=True, exist_ok=True)
    (cache / "kernels").symlink_to(usual, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_CACHE", str(cache))  # inherited by the servers
        yield cache


def _locust_run(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "loraplex.loadtests.locust_run", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def _stats(prefix: Path) -> dict[tuple[str, str], dict]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_locust_run_starts_the_demo_and_records_token_latencies(tmp_path):
    prefix = tmp_path / "results" / "lt"
    proc, wall = _locust_run("--users", "4", "--spawn-rate", "4", "--duration", "10s",
                             "--csv", str(prefix), "--output-len", "8:24")  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    stats = _stats(prefix)
    assert int(stats[("GET", "/v1/models")]["Request Count"]) == 1
    for name in ENDPOINTS:  # chat share 0.5: both endpoints, every kind of row
        for kind in ("POST", "TTFT", "ITL", "E2E"):
            row = stats[(kind, name)]
            assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0, row
            assert float(row["Average Response Time"]) > 0, row
        n = int(stats[("E2E", name)]["Request Count"])
        assert int(stats[("POST", name)]["Request Count"]) == n
        # >= 8 tokens per request; a slow event loop may send a few of them in one chunk
        assert int(stats[("ITL", name)]["Request Count"]) >= n
        assert 8 <= float(stats[("E2E", name)]["Average Content Size"]) < 24  # output tokens
    assert int(stats[("", "Aggregated")]["Failure Count"]) == 0
    assert Path(f"{prefix}_failures.csv").read_text().count("\n") == 1  # the header only
    assert (prefix.parent / "server.log").exists()  # the wrapper's server, stopped after
    assert wall < 60


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    with ServerProcess(LORAPLEX, [], 0, str(tmp_path_factory.mktemp("demo"))) as server:
        yield server


def test_trace_replay(demo, tmp_path):
    spec = WorkloadSpec(16, popularity="power", alpha=0.5, base_share=0.25, prompt_len=(4, 20),
                        output_len=(2, 8), seed=4)  # fmt: skip
    trace = make_trace(spec, list(DEMO_ADAPTERS), vocab_size=256)
    trace.save(tmp_path / "t.jsonl")
    prefix = tmp_path / "replay"
    proc, wall = _locust_run("--url", demo.url, "--users", "4", "--duration", "60s", "--csv",
                             str(prefix), "--trace", str(tmp_path / "t.jsonl"))  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "trace replayed: stopping the run" in proc.stderr
    stats = _stats(prefix)
    e2e = [stats[("E2E", n)] for n in ENDPOINTS if ("E2E", n) in stats]
    assert sum(int(r["Request Count"]) for r in e2e) == 16, proc.stderr[-6000:]  # each once
    tokens = sum(int(r["Request Count"]) * float(r["Average Content Size"]) for r in e2e)
    assert tokens == pytest.approx(sum(r.output_len for r in trace.requests))
    assert int(stats[("", "Aggregated")]["Failure Count"]) == 0
    assert wall < 40  # stopped by the trace's end, not by --duration

    # a request for an adapter the server lacks: a failure of its POST and E2E rows, exit 1
    trace.requests[3] = TraceRequest(3, None, "no-such-adapter", [5, 6, 7], 2)
    trace.save(tmp_path / "t.jsonl")
    proc, _ = _locust_run("--url", demo.url, "--users", "2", "--duration", "60s", "--csv",
                          str(prefix), "--trace", str(tmp_path / "t.jsonl"),
                          "--chat-share", "0")  # fmt: skip
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    stats = _stats(prefix)
    assert int(stats[("E2E", "/v1/completions")]["Failure Count"]) == 1
    assert int(stats[("POST", "/v1/completions")]["Failure Count"]) == 1
    assert int(stats[("E2E", "/v1/completions")]["Request Count"]) == 16
    assert ("E2E", "/v1/chat/completions") not in stats
    failures = Path(f"{prefix}_failures.csv").read_text()
    assert "HTTP 404" in failures and "no-such-adapter" in failures

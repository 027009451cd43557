"""`loraplex serve` as a process: startup logs, API key, a completion, and SIGTERM finishing an
in-flight stream before a clean exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from server_fixtures import tiny_model

from loraplex.server.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_serve_arguments_parse():
    args = build_parser().parse_args(
        ["serve", "--port", "9000", "--max-queue", "4", "--adapter", "x=/a", "--device", "cpu",
         "--max-lora-rank", "16", "--tenants", "t.toml", "--adapter-root", "/r"]
    )  # fmt: skip
    assert (args.port, args.max_queue, args.adapter, args.max_lora_rank) == (9000, 4, ["x=/a"], 16)
    assert args.host == "127.0.0.1" and args.func.__name__ == "cmd_serve"
    assert build_parser().parse_args(["generate", "--input", "x"]).command == "generate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process_sigterm_drains(tmp_path):
    m = tiny_model()
    port = _free_port()
    log = open(tmp_path / "log.txt", "w+")
    cmd = [
        sys.executable, "-m", "loraplex.server", "serve", "--model", m["model"],
        "--port", str(port), "--adapter", f"a={m['adapters']['a']}", "--pool-bytes", str(16 << 20),
        "--max-model-len", "1024", "--api-key", "k",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        h = httpx.Client(base_url=url, headers={"Authorization": "Bearer k"}, timeout=30)
        r = h.post("/v1/completions", json={"model": "a", "prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.post(url + "/v1/completions", json={}).status_code == 401
        body = {"model": "a", "prompt": "Hi", "max_tokens": 200, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with h.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = Path(log.name).read_text()
    assert f"listening on http://127.0.0.1:{port}" in text
    assert "pool" in text and "1 shared adapters a;" in text and "model" in text


def test_serve_refuses_bad_options(tmp_path):
    env = {**os.environ, "LORAPLEX_API_KEY": ""}
    bad = tmp_path / "t.toml"
    bad.write_text("[[tenants]]\nname = 'x'\n")
    out = subprocess.run(
        [sys.executable, "-m", "loraplex.server", "serve", "--tenants", str(bad)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "api_keys" in out.stderr

"""`python -m loraplex.loadtests.http_bench` end to end on a minuscule checkpoint, and the pieces it
relies on: the same prompts as `loraplex bench throughput`, a server that cannot start fails
fast, HTTP errors surface, percentiles."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from loraplex.loadtests import http_bench
from loraplex.loadtests.server_process import ServerProcess
from loraplex.loadtests.stream_client import (
    StreamError,
    StreamResult,
    latency_summary,
    percentile,
    run_streamed,
)
from loraplex.loadtests.workloads import adapter_names, bench_prompts

LORAPLEX = str(Path(sys.executable).with_name("loraplex"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A 2-layer checkpoint (demo tokenizer, vocab 1323) and two adapters of ranks 4 and 8."""
    from loraplex.engine.demo import make_adapter, make_checkpoint
    from loraplex.engine.loader import load_model_spec

    root = tmp_path_factory.mktemp("http-bench")
    model = make_checkpoint(
        root / "model", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    spec = load_model_spec(model)
    adapters = {}
    for i, r in enumerate((4, 8)):
        adapters[f"ad{i}"] = make_adapter(
            root / f"ad{i}", spec, rank=r, alpha=2.0 * r, target_modules=["q_proj", "v_proj"],
            seed=100 + i,
        )  # fmt: skip
    return {"model": str(model), "adapters": adapters, "vocab": spec.vocab_size}


def _adapter_flags(tiny) -> list[str]:
    return [x for n, d in tiny["adapters"].items() for x in ("--adapter", f"{n}={d}")]


def test_end_to_end_on_tiny_model(tiny, tmp_path, capsys):
    js = tmp_path / "http.json"
    argv = ["--model", tiny["model"], *_adapter_flags(tiny), "--num-adapters", "2",
            "--num-requests", "4", "--output-len", "4", "--prompt-len", "8", "--concurrency", "2",
            "--baseline", "none", "--check-outputs", "--repeat", "2",
            "--json-out", str(js)]  # fmt: skip
    assert http_bench.main(argv) == 0
    out = capsys.readouterr().out
    head = r"^system\s+workload\s+requests\s+out tokens\s+wall s\s+out tok/s\s+"
    assert re.search(head + r"TTFT p50 ms\s+TTFT p90 ms\s+ITL p50 ms\s+other load$", out, re.M)
    offline = re.search(r"^loraplex\s+offline, 2 adapters \(mixed\)\s+4\s+16\s", out, re.M)
    http = re.search(r"^loraplex\s+HTTP streamed\s+4\s+16\s+[\d.]+\s+[\d.]+\s+[\d.]+", out, re.M)
    assert offline and http, out
    assert re.search(r"HTTP / offline: [\d.]+x  \(target >= 0.9x: (met|MISSED)\)", out)
    assert "HTTP / PEFT" not in out and "peft" not in out.split("system", 1)[1]
    assert "identical to the offline engine's: 4/4 (same tokens and text: 4/4)" in out
    data = json.loads(js.read_text())
    assert [(r["workload"], r["requests"], r["output_tokens"]) for r in data["rows"]] == [
        ("offline, 2 adapters (mixed)", 4, 16),
        ("HTTP streamed", 4, 16),
    ]
    off, web = data["rows"]
    assert data["ratios"]["HTTP / offline"] == pytest.approx(web["tok_per_s"] / off["tok_per_s"])
    assert web["tok_per_s"] == pytest.approx(16 / web["wall_s"])
    assert 0 < web["ttft_p50"] <= web["ttft_p90"] < web["wall_s"]
    # ITL needs two chunks in some stream; the tiny model can finish a 4-token request before
    # the event loop reads its queue, and the server then sends it as one chunk (by design).
    assert (web["itl_p50"] is None or web["itl_p50"] > 0) and web["server_cpu"] > 0
    assert 0 <= web["server_loop_cpu"] <= web["server_cpu"]  # a thread of it (NaN fails)
    assert data["outputs_identical"] == [4, 4, 4]  # identical, same tokens, total
    # --repeat 2: two offline and two HTTP runs, alternating; the table shows the fastest of each
    assert "2 offline and 2 HTTP runs, alternating" in out and "every run, in order" in out
    assert len(data["runs"]["offline_tok_per_s"]) == len(data["runs"]["http_tok_per_s"]) == 2
    assert off["tok_per_s"] == pytest.approx(max(data["runs"]["offline_tok_per_s"]))
    assert web["tok_per_s"] == pytest.approx(max(data["runs"]["http_tok_per_s"]))
    assert data["server_returncode"] == 0  # SIGTERM: graceful exit
    setup = data["setup"]  # the server got the offline bench's engine options
    assert setup["max_num_seqs"] == 2 and setup["pool_bytes"] > 0
    assert setup["adapters"] == tiny["adapters"]


def test_prompts_match_offline_bench(tiny, monkeypatch, tmp_path):
    """`bench_prompts` / `adapter_names` reproduce the offline bench's requests exactly."""
    import loraplex.engine.llm as llm_mod
    from loraplex.engine.cli import main

    seen = {}

    class FakeLLM:
        def __init__(self, **kw):
            self.engine = SimpleNamespace(backends={"lora": "cpu", "attention": "torch"})

        def generate(self, prompts, params, adapters):
            seen.setdefault("calls", []).append((prompts, adapters))
            n = params.max_tokens
            return [SimpleNamespace(token_ids=[5] * n) for _ in prompts]

    monkeypatch.setattr(llm_mod, "LLM", FakeLLM)
    argv = ["bench", "throughput", "--model", tiny["model"], *_adapter_flags(tiny),
            "--num-adapters", "2", "--num-requests", "5", "--prompt-len", "7", "--output-len",
            "2", "--concurrency", "2", "--baseline", "none", "--no-also-base", "--seed", "3",
            "--json-out", str(tmp_path / "b.json")]  # fmt: skip
    assert main(argv) == 0
    prompts, adapters = seen["calls"][-1]  # the timed run: every request
    assert prompts == bench_prompts(5, 7, tiny["vocab"], seed=3)
    assert adapters == adapter_names(["ad0", "ad1"], 5) == ["ad0", "ad1", "ad0", "ad1", "ad0"]
    assert bench_prompts(5, 7, tiny["vocab"], seed=4) != prompts
    assert min(min(p) for p in prompts) >= 4  # the special tokens are skipped
    assert adapter_names([], 2) == [None, None]


def test_server_errors_surface(tiny, tmp_path):
    """Unknown model -> StreamError naming the 404; the server stops cleanly on SIGTERM."""
    flags = ["--model", tiny["model"], *_adapter_flags(tiny), "--max-num-seqs", "2"]
    with ServerProcess(LORAPLEX, flags, 0, str(tmp_path)) as server:
        assert server.base_id
        with pytest.raises(StreamError, match="HTTP 404"):
            asyncio.run(run_streamed(server.url, [[5, 6, 7]], ["no-such-adapter"], 2, 1))
        wall, res = asyncio.run(run_streamed(server.url, [[5, 6, 7]], ["ad1"], 3, 1, True))
        assert res[0].completion_tokens == 3 == len(res[0].tokens) == len(res[0].token_logprobs)
        assert res[0].finish_reason == "length" and wall >= res[0].t_end - res[0].t_start
    assert server.returncode == 0


def test_server_that_cannot_start_fails_fast(tmp_path):
    with pytest.raises(SystemExit, match="exited with status"):
        with ServerProcess(LORAPLEX, ["--model", str(tmp_path / "missing")], 0, str(tmp_path)):
            pass


def test_latency_summary_from_chunk_times():
    a = StreamResult(0, t_start=10.0, t_first=10.5, chunk_times=[10.5, 10.7, 11.0],
                     completion_tokens=4)  # fmt: skip
    b = StreamResult(1, t_start=20.0, t_first=21.0, chunk_times=[21.0], completion_tokens=1)
    got = latency_summary([a, b])
    assert got["ttft_p50"] == pytest.approx(0.75) and got["ttft_p90"] == pytest.approx(0.95)
    assert got["itl_p50"] == pytest.approx(0.25)  # gaps 0.2 and 0.3; b has none
    assert got["tpot_p50"] == pytest.approx(0.5 / 3)  # b (one token) has no TPOT
    assert latency_summary([b])["itl_p50"] is None


def test_percentile_and_cli_validation():
    assert percentile([], 50) is None
    assert percentile([3.0], 90) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    with pytest.raises(SystemExit, match="--adapter dirs"):
        http_bench.main(["--model", "/nowhere", "--num-adapters", "2"])
    proc = subprocess.run([sys.executable, "-m", "loraplex.loadtests.http_bench", "--help"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and "--check-outputs" in proc.stdout


def _sse_server(chunks: list[bytes]):
    """An aiohttp app whose /v1/completions streams `chunks` as they are (any split)."""
    from aiohttp import web

    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for c in chunks:
            await resp.write(c)
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    return app


def _stream_against(chunks: list[bytes], logprobs: bool = False):
    from aiohttp import web

    async def go():
        runner = web.AppRunner(_sse_server(chunks))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            return await run_streamed(f"http://127.0.0.1:{port}", [[1, 2]], ["m"], 2, 1, logprobs)
        finally:
            await runner.cleanup()

    return asyncio.run(go())


def test_stream_parser_takes_events_split_anywhere():
    events = [
        {"choices": [{"text": "he", "logprobs": {"tokens": ["he"], "token_logprobs": [-0.5]}}]},
        {"choices": [{"text": "llo", "finish_reason": "length",
                      "logprobs": {"tokens": ["llo"], "token_logprobs": [-1.5]}}]},
        {"choices": [], "usage": {"completion_tokens": 2}},
    ]  # fmt: skip
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    body += b"data: [DONE]\r\n\r\n"
    for cut in ([], [7], [3, 40, 41, 90], list(range(1, len(body)))):  # byte-level splits too
        edges = [0, *cut, len(body)]
        _, (res,) = _stream_against(
            [body[a:b] for a, b in zip(edges, edges[1:], strict=False)], logprobs=True
        )
        assert (res.text, res.completion_tokens, res.finish_reason) == ("hello", 2, "length")
        assert res.tokens == ["he", "llo"] and res.token_logprobs == [-0.5, -1.5]
        assert len(res.chunk_times) == 2


def test_stream_parser_refuses_broken_streams():
    usage = b'data: {"choices": [], "usage": {"completion_tokens": 1}}\n\n'
    one = b'data: {"choices": [{"text": "a"}]}\n\n'
    with pytest.raises(StreamError, match="without tokens, usage or"):
        _stream_against([one, usage])  # no [DONE]
    with pytest.raises(StreamError, match="error event"):
        _stream_against([one, b'data: {"error": {"message": "boom"}}\n\n'])

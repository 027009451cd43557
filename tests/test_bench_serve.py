"""`loraplex bench serve`: a tiny sweep over adapters and one over rates, end to end through real
`loraplex serve` processes, writing JSON, Markdown and PNGs; the PEFT baseline on a trace; the
sweep's cached assets; the report's ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.engine import bench_sweep
from loraplex.engine.cli import serve_flags
from loraplex.loadtests.bench_results import format_table, ratios
from loraplex.server.cli import build_parser

LORAPLEX = str(Path(sys.executable).with_name("loraplex"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A 2-layer checkpoint (demo tokenizer) and an adapter dir of three adapters."""
    from loraplex.engine.demo import make_adapter, make_checkpoint
    from loraplex.engine.loader import load_model_spec

    root = tmp_path_factory.mktemp("bench-serve")
    model = make_checkpoint(
        root / "model",
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    spec = load_model_spec(model)
    for i, r in enumerate((4, 8, 2)):
        make_adapter(
            root / "adapters" / f"ad{i}",
            spec,
            rank=r,
            alpha=2.0 * r,
            target_modules=["q_proj", "v_proj", "down_proj"],
            seed=10 + i,
        )
    return {"model": str(model), "adapter_dir": str(root / "adapters")}


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [LORAPLEX, "--log-level", "WARNING", "bench", "serve", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _rows(results: Path) -> list[dict]:
    return json.loads((results / "results.json").read_text())["rows"]


def test_adapter_sweep_with_peft_writes_json_markdown_and_plots(tiny, tmp_path):
    out = tmp_path / "res"
    proc = _run(
        [
            "--model",
            tiny["model"],
            "--adapter-dir",
            tiny["adapter_dir"],
            "--num-adapters",
            "1,3",
            "--num-requests",
            "6",
            "--concurrency",
            "3",
            "--prompt-len",
            "4:12",
            "--output-len",
            "3:6",
            "--warmup",
            "2",
            "--baseline",
            "peft,offline",
            "--pool-bytes",
            str(8 << 20),
            "--results",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(out)
    assert [(r["system"], r["num_adapters"]) for r in rows] == [
        ("loraplex", 1),
        ("peft", 1),
        ("offline", 1),
        ("loraplex", 3),
        ("peft", 3),
        ("offline", 3),
    ]
    traces = {
        n: [json.loads(x) for x in (out / f"trace-n{n}.jsonl").read_text().splitlines()]
        for n in (1, 3)
    }
    for r in rows:
        assert r["requests"] == 6 and r["errors"] == 0
        assert r["output_tok_per_s"] > 0
    for r in (rows[0], rows[2], rows[3], rows[5]):  # loraplex and offline: tokens counted
        want = sum(q["output_len"] for q in traces[r["num_adapters"]][1:])
        assert r["output_tokens"] == want
    for r in (rows[0], rows[3]):
        assert len(r["ttft_values"]) == 6 and 0 <= r["slo_attainment"] <= 1
        assert r["client_cores"] >= 0
    used = {q["adapter"] for q in traces[3][1:]}
    assert used <= {"ad0", "ad1", "ad2"} and len(used) > 1
    assert {q["adapter"] for q in traces[1][1:]} == {"ad0"}
    md = (out / "results.md").read_text()
    assert "| loraplex | 3 |" in md and "loraplex / peft (n=3)" in md and "n=3 / n=1" in md
    assert "loraplex / offline (n=3)" in md
    for name in ("throughput_vs_adapters.png", "ttft_cdf.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "output tok/s" in proc.stdout  # the table is printed too


def test_rate_sweep_plots_latency_against_rate(tiny, tmp_path):
    out = tmp_path / "res"
    proc = _run(
        [
            "--model",
            tiny["model"],
            "--adapter-dir",
            tiny["adapter_dir"],
            "--num-adapters",
            "2",
            "--rates",
            "20,40",
            "--num-requests",
            "5",
            "--prompt-len",
            "6",
            "--output-len",
            "3",
            "--warmup",
            "0",
            "--pool-bytes",
            str(8 << 20),
            "--results",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(out)
    assert [(r["num_adapters"], r["rate"]) for r in rows] == [(2, 20.0), (2, 40.0)]
    assert all(r["errors"] == 0 for r in rows)
    assert (out / "latency_vs_rate.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "throughput_vs_adapters.png").exists()


def test_bad_sweeps_are_refused_with_the_option_named(tmp_path):
    proc = _run(["--num-adapters", "1,8", "--rates", "1,2", "--results", str(tmp_path)])
    assert proc.returncode != 0 and "--rates sweeps at one --num-adapters" in proc.stderr
    proc = _run(["--num-requests", "0", "--results", str(tmp_path)])
    assert proc.returncode != 0 and "--num-requests must be >= 1" in proc.stderr
    proc = _run(["--baseline", "peft,vllm", "--results", str(tmp_path)])
    assert proc.returncode == 2 and "unknown baseline 'vllm'" in proc.stderr


def test_serve_flags_carry_exactly_the_changed_engine_options():
    args = build_parser().parse_args(
        [
            "bench",
            "serve",
            "--dtype",
            "bfloat16",
            "--adapter",
            "a=/x",
            "--adapter",
            "b=/y",
            "--max-num-seqs",
            "8",
            "--num-adapters",
            "1,8,64",
        ]
    )
    assert args.num_adapters == [1, 8, 64]
    flags = serve_flags(args)
    assert flags == [
        "--adapter",
        "a=/x",
        "--adapter",
        "b=/y",
        "--dtype",
        "bfloat16",
        "--max-num-seqs",
        "8",
    ]
    assert serve_flags(build_parser().parse_args(["bench", "serve"])) == []


def test_sweep_assets_link_the_cached_adapters(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    monkeypatch.setattr(
        bench_sweep,
        "BENCH_MODEL",
        dict(
            hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, seed=0
        ),
    )
    model, three = bench_sweep.sweep_assets(3, [8, 16])
    _, two = bench_sweep.sweep_assets(2, [8, 16])
    assert sorted(p.name for p in Path(three).iterdir()) == [
        "bench-0-r8",
        "bench-1-r16",
        "bench-2-r8",
    ]
    assert sorted(p.name for p in Path(two).iterdir()) == ["bench-0-r8", "bench-1-r16"]
    a = Path(three) / "bench-1-r16" / "adapter_model.safetensors"
    b = Path(two) / "bench-1-r16" / "adapter_model.safetensors"
    assert a.stat().st_ino == b.stat().st_ino and not a.is_symlink()  # one file, hard-linked
    assert json.loads((a.parent / "adapter_config.json").read_text())["r"] == 16
    assert Path(model, "config.json").is_file()


def test_peft_batches_group_by_adapter_in_trace_order():
    reqs = [([1], "b", 2), ([2], None, 2), ([3], "b", 2), ([4], "a", 2), ([5], "b", 2)]
    assert bench_sweep._batches(reqs, 2) == [("b", [0, 2]), ("b", [4]), (None, [1]), ("a", [3])]


def test_report_ratios_against_n64_and_between_systems():
    rows = [
        {"system": "loraplex", "num_adapters": 8, "rate": None, "output_tok_per_s": 120.0},
        {"system": "peft", "num_adapters": 8, "rate": None, "output_tok_per_s": 30.0},
        {"system": "loraplex", "num_adapters": 64, "rate": None, "output_tok_per_s": 100.0},
        {"system": "loraplex", "num_adapters": 2048, "rate": None, "output_tok_per_s": 91.0},
    ]
    lines = ratios(rows, "num_adapters")
    assert "n=2048 / n=64: 0.91x" in lines and "n=8 / n=64: 1.20x" in lines
    assert "loraplex / peft (n=8): 4.00x" in lines
    table = format_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and "| peft | 8 | closed loop |" in table[3]


def test_running_server_and_compare_url_side_by_side(tiny, tmp_path):
    """`--url` loads a server that is already running; `--compare-url` replays the same trace
    against another OpenAI-compatible server (here a second name for the same one)."""
    from loraplex.loadtests.server_process import ServerProcess

    out = tmp_path / "res"
    flags = ["--model", tiny["model"], "--adapter-dir", tiny["adapter_dir"],
             "--pool-bytes", str(8 << 20)]  # fmt: skip
    with ServerProcess(LORAPLEX, flags, 0, str(tmp_path)) as server:
        proc = _run(["--url", server.url, "--compare-url", server.url, "--compare-name", "twin",
                     "--num-adapters", "2", "--num-requests", "4", "--concurrency", "2",
                     "--prompt-len", "5", "--output-len", "3", "--warmup", "1",
                     "--results", str(out)])  # fmt: skip
        needs_vocab = proc.returncode != 0 and "--vocab-size" in proc.stderr
        assert needs_vocab, proc.stderr[-2000:]  # a remote model's vocabulary is not known
        proc = _run(["--url", server.url, "--compare-url", server.url, "--compare-name", "twin",
                     "--num-adapters", "2", "--num-requests", "4", "--concurrency", "2",
                     "--prompt-len", "5", "--output-len", "3", "--warmup", "1",
                     "--vocab-size", "300", "--results", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(out)
    assert [(r["system"], r["num_adapters"], r["errors"]) for r in rows] == [
        ("target", 2, 0), ("twin", 2, 0)
    ]  # fmt: skip
    assert rows[0]["output_tokens"] == rows[1]["output_tokens"] == 12
    assert "target / twin (n=2)" in (out / "results.md").read_text()

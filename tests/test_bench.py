"""`loraplex bench throughput` end to end on a minuscule checkpoint (seconds, not minutes)."""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import pytest

from loraplex.engine.bench_report import Row, format_table, measure_side_by_side
from loraplex.engine.cli import main
from loraplex.engine.loader import load_model_spec


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from loraplex.engine.demo import make_checkpoint

    d = tmp_path_factory.mktemp("bench") / "model"
    return make_checkpoint(
        d, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2
    )


def _bench(tiny_model, *extra) -> None:
    argv = ["bench", "throughput", "--model", tiny_model, "--num-requests", "4"]
    argv += ["--output-len", "4", "--prompt-len", "8", "--concurrency", "2", *extra]
    assert main(argv) == 0


def _row(out: str, system: str, workload: str) -> list[str]:
    """The cells after `system  workload` of that table row (requests, tokens, wall, ...)."""
    m = re.search(rf"^{system}\s+{re.escape(workload)}\s+(.*)$", out, re.M)
    assert m, f"no row {system!r} / {workload!r} in:\n{out}"
    return m.group(1).split()


def test_bench_mixed_and_base_rows(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    js = tmp_path / "rows.json"
    _bench(tiny_model, "--num-adapters", "2", "--ranks", "4,8", "--baseline", "none",
           "--json-out", str(js))  # fmt: skip
    out = capsys.readouterr().out
    assert "torch threads" in out
    assert "loraplex paths: lora cpu, attention cpu" in out  # the C kernels by default
    assert re.search(r"^system\s+workload\s+requests\s+out tokens\s+wall s", out, re.M)
    for workload in ("2 adapters (mixed)", "base only"):
        assert _row(out, "loraplex", workload)[:2] == ["4", "16"]  # all 4 ran 4 tokens each
    assert "peft" not in out.split("system", 1)[1]
    assert re.search(r"loraplex 2 adapters \(mixed\) / base only: [\d.]+x  \(target >= 0.75x: "
                     r"(met|MISSED)\)", out)  # fmt: skip
    data = json.loads(js.read_text())
    rows = [(r["system"], r["workload"], r["requests"], r["output_tokens"]) for r in data["rows"]]
    assert rows == [("loraplex", "2 adapters (mixed)", 4, 16), ("loraplex", "base only", 4, 16)]
    for r in data["rows"]:
        assert r["wall_s"] > 0 and r["tok_per_s"] == pytest.approx(16 / r["wall_s"])
    mixed, base = data["rows"][0]["tok_per_s"], data["rows"][1]["tok_per_s"]
    assert data["ratios"] == {
        "loraplex 2 adapters (mixed) / base only": pytest.approx(mixed / base)
    }
    assert data["setup"]["max_num_seqs"] == 2  # concurrency drives our engine
    assert data["setup"]["backends"] == {"lora": "cpu", "attention": "cpu"}
    assert sorted(data["setup"]["adapters"]) == ["bench-0-r4", "bench-1-r8"]
    # float32 bytes a decode step reads: all base weights but the (untied) embedding table;
    # both adapters on all seven modules (per rank and layer: in + out of each module)
    vocab = load_model_spec(tiny_model).vocab_size
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3 + 2 * 64  # q, o; k, v; mlp; two norms
    base = 4 * (2 * layer + 64 + vocab * 64)  # + final norm + lm_head
    lora = 4 * (4 + 8) * 2 * (128 + 96 + 96 + 128 + 192 * 3)
    assert data["setup"]["step_weight_bytes"] == {"base": base, "adapters": lora}
    assert (
        f"base {base / 1e6:.1f} MB, the adapters {lora / 1e6:.1f} MB more (+{lora / base:.0%})"
        in out
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_bench_peft_baseline_rows_and_same_tokens(tiny_model, capsys):
    pytest.importorskip("peft")
    _bench(tiny_model, "--num-adapters", "3", "--baseline", "peft", "--repeat", "2")
    out = capsys.readouterr().out
    for system in ("loraplex", "peft"):
        for workload in ("3 adapters (mixed)", "base only"):
            assert _row(out, system, workload)[:2] == ["4", "16"]
    assert re.search(r"loraplex / peft, 3 adapters \(mixed\): [\d.]+x  \(target >= 3.0x", out)
    assert re.search(r"loraplex / peft, base only: [\d.]+x\n", out)  # context, no target
    assert re.search(r"peft 3 adapters \(mixed\) / base only: [\d.]+x\n", out)
    # same model, same adapters, greedy in float32: both systems produce the same tokens
    assert "greedy outputs identical to PEFT's: 4/4 requests" in out


def test_bench_base_only_no_also_base_and_bad_args(tiny_model, capsys):
    _bench(tiny_model, "--num-adapters", "0", "--baseline", "none")
    out = capsys.readouterr().out
    assert _row(out, "loraplex", "base only")[:2] == ["4", "16"]
    assert "mixed" not in out
    _bench(tiny_model, "--num-adapters", "1", "--no-also-base", "--baseline", "none")
    out = capsys.readouterr().out
    assert _row(out, "loraplex", "1 adapter (mixed)")[:2] == ["4", "16"]
    assert "base only" not in out
    assert main(["bench", "throughput", "--model", tiny_model, "--num-requests", "0"]) == 2
    assert "--num-requests must be >= 1" in capsys.readouterr().err


def test_format_table_aligns_columns():
    rows = [Row("loraplex", "8 adapters (mixed)", 64, 4096, 10.0, 0.1), Row("peft", "x", 1, 2, 4.0)]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4 and set(lines[1]) <= {"-", " "}
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width
    assert lines[2].split() == ["loraplex", "8", "adapters", "(mixed)", "64", "4096", "10.000",
                                "6.40", "409.6", "0.10"]  # fmt: skip
    assert lines[3].split()[-1] == "n/a"


def test_side_by_side_runs_alternate_and_keep_each_rows_fastest():
    calls = []
    delays = {"a": [0.2, 0.0, 0.1], "b": [0.0, 0.2, 0.1]}  # well apart: a loaded CI stays ordered

    def runner(name):
        def run():
            calls.append(name)
            time.sleep(delays[name][calls.count(name) - 1])
            return [[calls.count(name)] * 2]  # one request; its "tokens" say which run it was

        return run

    specs = [(name, "w", runner(name), lambda n=name: calls.append("warm " + n)) for name in "ab"]
    (row_a, out_a), (row_b, out_b) = measure_side_by_side(
        specs, SimpleNamespace(warmup=1, repeat=3)
    )
    assert calls == ["warm a", "warm b", "a", "b", "a", "b", "a", "b"]
    assert out_a == [[2, 2]] and out_b == [[1, 1]]  # each row's fastest run
    assert row_a.system == "a" and row_a.output_tokens == 2 and row_a.wall_s < 0.1

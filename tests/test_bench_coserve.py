"""`loraplex bench coserve` end to end on a minuscule checkpoint with sub-second phases, its
open loop's arrivals, and its metrics on made-up stamps."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from loraplex.engine import bench_coserve_report as rep
from loraplex.engine.cli import main

FAST = ["--duration", "0.6", "--warmup", "0.3", "--concurrency", "2", "--prompt-len", "8",
        "--output-len", "6", "--num-adapters", "2", "--ranks", "4,8", "--train-examples", "8",
        "--train-len", "8,16", "--rank", "4", "--batch-size", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from loraplex.engine.demo import make_checkpoint

    d = tmp_path_factory.mktemp("coserve") / "model"
    return make_checkpoint(
        d, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2
    )


def _run(tiny_model, out, *extra) -> dict:
    assert main(["bench", "coserve", "--model", tiny_model, "--out", str(out), *FAST, *extra]) == 0
    assert (out / "results.md").is_file()
    return json.loads((out / "results.json").read_text())


def _check_inference(m: dict) -> None:
    assert m["inference_tokens"] > 0 and m["inference_tok_s"] > 0
    assert m["itl_samples"] > 0 and 0 < m["itl_p50_ms"] <= m["itl_p99_ms"] <= m["itl_max_ms"]
    assert m["ttft_samples"] > 0 and m["ttft_p50_ms"] > 0


def _check_training(m: dict) -> None:
    assert m["train_steps"] >= 1 and m["train_tokens"] > 0
    assert 0 < m["train_tok_s"] < m["train_padded_tok_s"]  # prompts and pads are not trained
    assert m["losses"] and all(loss > 0 for loss in m["losses"])


def test_coserve_phases_without_status_quo(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    data = _run(tiny_model, tmp_path / "out", "--no-status-quo", "--inference-load", "0.5")
    out = capsys.readouterr().out
    half_alone, half_both = rep.phase(rep.INFERENCE, 0.5), rep.phase(rep.COSERVED, 0.5)
    assert list(data["phases"]) == [rep.ALONE, rep.TRAIN, rep.COSERVE, half_alone, half_both]
    alone, train, both = (data["phases"][k] for k in (rep.ALONE, rep.TRAIN, rep.COSERVE))
    for m in (alone, both, data["phases"][half_alone], data["phases"][half_both]):
        _check_inference(m)
    for m in (train, both, data["phases"][half_both]):
        _check_training(m)
        assert 0 < m["training_busy"] <= 1
    assert "train_tok_s" not in alone and "inference_tok_s" not in train
    # the closed loop never lets the engine idle; the open loop offers half its tokens/s
    assert alone["inference_busy"] > 0.5 and alone["offered_tok_s"] is None
    half = data["phases"][half_alone]
    assert half["offered_tok_s"] == pytest.approx(0.5 * alone["inference_tok_s"])
    assert half["load"] == 0.5 and 0 < half["inference_busy"] <= 1
    t = data["targets"]
    assert list(t) == ["closed loop", "open loop 50%"]
    closed, open_ = t["closed loop"], t["open loop 50%"]
    assert closed["coserved_itl_p99_vs_alone"] == pytest.approx(
        both["itl_p99_ms"] / alone["itl_p99_ms"]
    )
    assert closed["coserved_train_vs_solo"] == pytest.approx(
        both["train_tok_s"] / train["train_tok_s"]
    )
    assert open_["coserved_train_vs_solo"] == pytest.approx(
        data["phases"][half_both]["train_tok_s"] / train["train_tok_s"]
    )
    assert closed["status_quo_itl_p99_vs_alone"] is None
    # the same job in every phase: same init, data and order, so the same step losses
    for name in (rep.COSERVE, half_both):
        check = data["loss_check"][name]
        assert check["steps"] >= 1 and check["max_abs_diff"] < 1e-4
    s = data["setup"]
    assert s["max_num_seqs"] == 2 and s["finetune_step_share"] == 0.25
    assert sorted(s["adapters"]) == ["bench-0-r4", "bench-1-r8"]
    examples = json.loads((tmp_path / "out" / "examples.json").read_text())
    assert len(examples) == 8 and all(8 <= len(e["input_ids"]) <= 16 for e in examples)
    assert all(e["labels"][: len(e["labels"]) // 2] == [-100] * (len(e["labels"]) // 2)
               for e in examples)  # fmt: skip
    assert "[closed loop] co-served ITL p99 / inference alone" in out
    assert "[open loop 50%] co-served training tok/s / training alone" in out
    assert "(target >= 0.5x: " in out and "(target <= 1.25x: " in out
    assert "status quo" not in out.split("phase", 1)[1]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_coserve_status_quo_peft_process(tiny_model, tmp_path, capsys, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    data = _run(tiny_model, tmp_path / "out", "--finetune-itl-slo-ms", "50",
                "--inference-load", "0.3")  # fmt: skip
    out = capsys.readouterr().out
    assert list(data["phases"]) == [
        rep.ALONE, rep.TRAIN, rep.COSERVE, rep.phase(rep.INFERENCE, 0.3),
        rep.phase(rep.COSERVED, 0.3), rep.PEFT_SOLO, rep.STATUS_QUO, rep.phase(rep.STATUS, 0.3),
    ]  # fmt: skip
    solo, quo = data["phases"][rep.PEFT_SOLO], data["phases"][rep.STATUS_QUO]
    _check_training(solo)
    for m in (quo, data["phases"][rep.phase(rep.STATUS, 0.3)]):
        _check_training(m)
        _check_inference(m)
        assert m["peft_cores"] > 0
    assert solo["peft_cores"] > 0 and solo["engine_cores"] < 0.2
    # the PEFT process trains the same adapter: its step losses are the engine job's
    for phase in (rep.PEFT_SOLO, rep.STATUS_QUO):
        check = data["loss_check"][phase]
        assert check["steps"] >= 1 and check["max_abs_diff"] < 1e-4
    assert data["setup"]["finetune_itl_slo_ms"] == 50
    for level in ("closed loop", "open loop 30%"):
        for key in ("coserved_vs_status_quo_itl_p99", "coserved_vs_status_quo_train",
                    "status_quo_train_vs_peft_solo"):  # fmt: skip
            assert data["targets"][level][key] > 0
    assert "[open loop 30%] co-served ITL p99 / status quo ITL p99" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--duration", "0"], "--duration must be > 0"),
        (["--concurrency", "0"], "--concurrency must be > 0"),
        (["--train-len", "16,8"], "--train-len needs 2 <= MIN <= MAX"),
        (["--train-len", "8"], "--train-len MIN,MAX"),
        (["--target-modules", "q_proj,nope"], "target_modules must be"),
        (["--finetune-step-share", "0"], "finetune_step_share must be in (0, 10]"),
        (["--inference-load", "1.5"], "--inference-load takes fractions in (0, 1]"),
        (["--inference-load", "half"], "--inference-load takes fractions in (0, 1]"),
    ],
)
def test_coserve_bad_options(tiny_model, tmp_path, capsys, flags, message):
    argv = ["bench", "coserve", "--model", tiny_model, "--out", str(tmp_path), "--no-status-quo"]
    assert main(argv + flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_metrics_over_the_window():
    reqs = [SimpleNamespace(submit=0.0, times=[0.5, 1.0, 1.5, 2.5]),
            SimpleNamespace(submit=1.8, times=[2.0, 3.5])]  # fmt: skip
    m = rep.inference_metrics(reqs, 1.0, 3.0)
    assert m["inference_tokens"] == 4 and m["inference_tok_s"] == 2.0
    assert m["itl_samples"] == 3 and m["itl_p50_ms"] == pytest.approx(500)  # 0.5, 0.5, 1.0
    assert m["ttft_samples"] == 1 and m["ttft_p50_ms"] == pytest.approx(200)
    events = [(0.5, 10, 20, 1.0), (1.2, 10, 20, 1.0), (2.0, 30, 40, 1.0), (2.6, 20, 40, 1.0)]
    t = rep.training_metrics(events, 1.0, 3.0)  # steps at 1.2 .. 2.6: 50 tokens in 1.4 s
    assert t["train_steps"] == 3 and t["train_tokens"] == 60
    assert t["train_tok_s"] == pytest.approx(50 / 1.4)
    assert t["train_padded_tok_s"] == pytest.approx(80 / 1.4)
    one = rep.training_metrics(events, 0.0, 1.0)  # one step: its tokens over the window
    assert one["train_steps"] == 1 and one["train_tok_s"] == 10


def test_open_loop_arrivals_are_poisson_seeded_and_stamped_on_arrival():
    from loraplex.engine.bench_coserve_load import OpenLoop

    class Engine:
        spec = SimpleNamespace(vocab_size=100)
        added: list = []

        def add_request(self, rid, prompt, params, name):
            self.added.append((rid, tuple(prompt), params.max_tokens, name))

    args = SimpleNamespace(prompt_len=5, output_len=8)
    loops = [OpenLoop(Engine(), ["a", "b"], args, "t", rate=50.0, seed=3) for _ in range(2)]
    for loop in loops:
        loop.fill(100.0)  # the clock starts: nothing is due yet
        assert not loop.active and loop.next_arrival() > 100.0
        loop.fill(120.0)
    a, b = loops
    assert a.offered == 50.0 * 8 and a.n == b.n
    assert 800 < a.n < 1200  # 20 s at 50 per second
    assert [r.submit for r in a.active.values()] == [r.submit for r in b.active.values()]
    submits = [r.submit for r in a.active.values()]
    assert submits == sorted(submits) and 100.0 < submits[0] and submits[-1] <= 120.0
    gaps = [y - x for x, y in zip(submits, submits[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.1)  # exponential, mean 1/rate
    first = Engine.added[: a.n]
    assert first == Engine.added[a.n :]  # the same prompts and adapters in every phase
    assert {x[2] for x in first} == {8} and [x[3] for x in first[:3]] == ["a", "b", "a"]

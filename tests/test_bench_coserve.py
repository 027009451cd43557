"""`loraplex bench coserve` end to end on a minuscule checkpoint with sub-second phases, and
its metrics on made-up stamps."""

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
    data = _run(tiny_model, tmp_path / "out", "--no-status-quo")
    out = capsys.readouterr().out
    assert list(data["phases"]) == [rep.ALONE, rep.TRAIN, rep.COSERVE]
    alone, train, both = (data["phases"][k] for k in (rep.ALONE, rep.TRAIN, rep.COSERVE))
    _check_inference(alone)
    _check_inference(both)
    _check_training(train)
    _check_training(both)
    assert "train_tok_s" not in alone and "inference_tok_s" not in train
    t = data["targets"]
    assert t["coserved_itl_p99_vs_alone"] == pytest.approx(both["itl_p99_ms"] / alone["itl_p99_ms"])
    assert t["coserved_train_vs_solo"] == pytest.approx(both["train_tok_s"] / train["train_tok_s"])
    assert t["status_quo_itl_p99_vs_alone"] is None
    # the same job in both phases: same init, data and order, so the same step losses
    check = data["loss_check"][rep.COSERVE]
    assert check["steps"] >= 1 and check["max_abs_diff"] < 1e-4
    s = data["setup"]
    assert s["max_num_seqs"] == 2 and s["finetune_step_share"] == 0.25
    assert sorted(s["adapters"]) == ["bench-0-r4", "bench-1-r8"]
    examples = json.loads((tmp_path / "out" / "examples.json").read_text())
    assert len(examples) == 8 and all(8 <= len(e["input_ids"]) <= 16 for e in examples)
    assert all(e["labels"][: len(e["labels"]) // 2] == [-100] * (len(e["labels"]) // 2)
               for e in examples)  # fmt: skip
    assert "co-served ITL p99 / inference alone" in out and "(target <= 1.25x: " in out
    assert "co-served training tok/s / training alone" in out
    assert "status quo" not in out.split("phase", 1)[1]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_coserve_status_quo_peft_process(tiny_model, tmp_path, capsys, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    data = _run(tiny_model, tmp_path / "out", "--finetune-itl-slo-ms", "50")
    out = capsys.readouterr().out
    assert list(data["phases"]) == [rep.ALONE, rep.TRAIN, rep.COSERVE, rep.PEFT_SOLO,
                                    rep.STATUS_QUO]  # fmt: skip
    solo, quo = data["phases"][rep.PEFT_SOLO], data["phases"][rep.STATUS_QUO]
    _check_training(solo)
    _check_training(quo)
    _check_inference(quo)
    assert solo["peft_cores"] > 0 and quo["peft_cores"] > 0 and solo["engine_cores"] < 0.2
    # the PEFT process trains the same adapter: its step losses are the engine job's
    for phase in (rep.PEFT_SOLO, rep.STATUS_QUO):
        check = data["loss_check"][phase]
        assert check["steps"] >= 1 and check["max_abs_diff"] < 1e-4
    assert data["setup"]["finetune_itl_slo_ms"] == 50
    for key in ("coserved_vs_status_quo_itl_p99", "coserved_vs_status_quo_train",
                "status_quo_train_vs_peft_solo"):  # fmt: skip
        assert data["targets"][key] > 0
    assert "better than the status quo" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--duration", "0"], "--duration must be > 0"),
        (["--concurrency", "0"], "--concurrency must be > 0"),
        (["--train-len", "16,8"], "--train-len needs 2 <= MIN <= MAX"),
        (["--train-len", "8"], "--train-len MIN,MAX"),
        (["--target-modules", "q_proj,nope"], "target_modules must be"),
        (["--finetune-step-share", "0"], "finetune_step_share must be in (0, 10]"),
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

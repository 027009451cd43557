"""The engine's LoRA fine-tuning (engine/trainer.py) against HF PEFT + torch AdamW
(tests/finetune_reference.py): the same per-step losses and final weights on a tiny Llama and a
tiny Qwen2 from a non-zero initial adapter; PEFT's default init reproduced; the saved adapter
served by PEFT and by our engine with the same greedy tokens; `loraplex finetune` end to end."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from finetune_reference import make_nonzero_adapter, peft_train
from fixtures import hf_reference_greedy

from loraplex.engine.adapter_loader import load_adapter
from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.finetune_data import Example
from loraplex.engine.llm import LLM
from loraplex.engine.loader import module_path
from loraplex.engine.train_lora import TrainableLoRA
from loraplex.engine.trainer import FinetuneConfig, Trainer
from loraplex.scheduler.sequence import SamplingParams

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _examples(vocab: int, n: int = 24, seed: int = 0) -> list[Example]:
    """Uneven lengths (5-20 tokens); a prompt part untrained, the rest trained."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randrange(5, 21)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = rng.randrange(1, length - 1)
        out.append(Example(ids, [-100] * prompt + ids[prompt:], i + 1))
    return out


def _engine(model_dir: str) -> Engine:
    return Engine(EngineConfig(model=model_dir, pool_bytes=8 << 20, max_model_len=64))


def _state_key(layer: int, module: str, kind: str) -> str:
    return f"base_model.model.{module_path(layer, module)}.lora_{kind}.weight"


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])
def test_losses_and_weights_match_peft_adamw(family, request, tmp_path):
    fx = request.getfixturevalue(family)
    model_dir = fx["model_dir"]
    init = make_nonzero_adapter(tmp_path / "init", model_dir, 4, 8.0, TARGETS, seed=3)
    engine = _engine(model_dir)
    examples = _examples(engine.spec.vocab_size)
    kw = dict(epochs=2, batch_size=4, grad_accum=2, learning_rate=1e-3, shuffle=True, seed=5)
    ref_log, ref_state = peft_train(
        model_dir, [(e.input_ids, e.labels) for e in examples], rank=4, alpha=8.0,
        target_modules=TARGETS, init_adapter=init, **kw,
    )  # fmt: skip
    weights = load_adapter("init", init, engine.spec, 64)
    cfg = FinetuneConfig(rank=4, alpha=8.0, target_modules=tuple(TARGETS), **kw)
    trainer = Trainer(engine.model, cfg, examples, pad_id=0, init_weights=weights)
    log = [trainer.step() for _ in range(trainer.steps_left)]
    assert len(log) == len(ref_log) == 6  # 24 examples / 4 = 6 batches an epoch, 2 per step
    for ours, ref in zip(log, ref_log, strict=True):
        assert ours.tokens == ref["tokens"]
        assert ours.loss == pytest.approx(ref["loss"], rel=1e-5), (ours.step, ours.loss, ref)
    for (layer, m), a in trainer.lora.A.items():
        want_a = ref_state[_state_key(layer, m, "A")]
        want_b = ref_state[_state_key(layer, m, "B")]
        torch.testing.assert_close(a.detach(), want_a, atol=1e-4, rtol=0)
        torch.testing.assert_close(trainer.lora.B[layer, m].detach(), want_b, atol=1e-4, rtol=0)
        assert not torch.equal(a.detach(), weights.A[layer, m])  # it did train


def test_default_init_is_peft_draw_for_draw(tiny_llama):
    model_dir = tiny_llama["model_dir"]
    _, state = peft_train(model_dir, [([5, 6, 7], [-100, 6, 7])], rank=4, alpha=8.0,
                          target_modules=TARGETS, seed=11, learning_rate=0.0)  # fmt: skip
    spec = _engine(model_dir).spec
    torch.manual_seed(123)
    want_next = torch.rand(3)
    torch.manual_seed(123)
    lora = TrainableLoRA.peft_init(spec, 4, 8.0, TARGETS, seed=11)
    # the process's global RNG is left where it was (a job must not reseed a serving engine)
    assert torch.equal(torch.rand(3), want_next)
    assert len(lora.A) == 2 * len(TARGETS)
    for (layer, m), a in lora.A.items():
        assert torch.equal(a.detach(), state[_state_key(layer, m, "A")])
        assert not lora.B[layer, m].any()


def test_saved_adapter_serves_the_same_in_peft_and_in_our_engine(tiny_llama, tmp_path):
    model_dir = tiny_llama["model_dir"]
    engine = _engine(model_dir)
    cfg = FinetuneConfig(rank=4, alpha=8.0, target_modules=tuple(TARGETS), epochs=1,
                         batch_size=4, learning_rate=3e-2, seed=2)  # fmt: skip
    trainer = Trainer(engine.model, cfg, _examples(engine.spec.vocab_size, 8), pad_id=0)
    while trainer.steps_left:
        trainer.step()
    out = Path(trainer.save(tmp_path / "tuned", base_model_name_or_path=model_dir))
    log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and all(e["tokens"] > 0 for e in log)
    llm = LLM(model_dir, adapters={"tuned": str(out)}, pool_bytes=8 << 20, max_model_len=64)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    changed = False
    for prompt in ([5, 9, 17, 33], [100, 4, 77]):
        want, _ = hf_reference_greedy(model_dir, str(out), prompt, 6)
        assert llm.generate([prompt], greedy, ["tuned"])[0].token_ids == want
        changed |= want != hf_reference_greedy(model_dir, None, prompt, 6)[0]
    assert changed  # the trained adapter changes what the model says


def test_config_is_validated():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        FinetuneConfig(batch_size=0)
    with pytest.raises(ValueError, match="target_modules"):
        FinetuneConfig(target_modules=("lm_head",))


def test_finetune_cli_end_to_end_and_a_bad_file(tmp_path):
    import subprocess

    from loraplex.engine.demo import make_checkpoint

    model = make_checkpoint(tmp_path / "model", hidden_size=64, intermediate_size=128,
                            num_layers=2, num_heads=4, num_kv_heads=2)  # fmt: skip
    train = tmp_path / "train.jsonl"
    rows = [{"prompt": f"abc {i} ->", "completion": f" cba {i}"} for i in range(6)]
    chat = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"ho {i}"}]
            for i in range(2)]  # fmt: skip
    rows += [{"messages": m} for m in chat]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exe = str(Path(sys.executable).with_name("loraplex"))
    base = [exe, "--log-level", "WARNING", "finetune", "--model", str(model), "--pool-bytes",
            str(8 << 20), "--max-model-len", "128", "--rank", "4", "--epochs", "2",
            "--batch-size", "4", "--learning-rate", "1e-2",
            "--finetune-max-tokens-per-step", "128"]  # fmt: skip
    out = tmp_path / "out"
    proc = subprocess.run([*base, "--train", str(train), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]
    log = (out / "trainer_log.jsonl").read_text().splitlines()
    assert len(log) == 4  # 8 examples / 4 per batch, 2 epochs
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n{not json\n")
    proc = subprocess.run([*base, "--train", str(bad), "--output", str(tmp_path / "no")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0 and "bad.jsonl:3:" in proc.stderr
    assert not (tmp_path / "no").exists()

"""engine.loader: ModelSpec parsing, checkpoint loading, adapter validation (demo: test_demo.py).

Real `peft` writes the adapters the parser must accept (and some it must refuse); real
`transformers` writes the checkpoints. Nothing here touches the network.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.engine.adapter_loader import AdapterError, load_adapter
from loraplex.engine.demo import make_adapter, make_checkpoint
from loraplex.engine.loader import MODULES, load_checkpoint, load_model_spec, module_path

peft = pytest.importorskip("peft")
TINY = dict(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2)
P = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = make_checkpoint(tmp_path_factory.mktemp("llama"), **TINY, seed=1)
    return d, load_model_spec(d)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    make_checkpoint(d, family="qwen2", **TINY, seed=2, tie_word_embeddings=True)
    return str(d), load_model_spec(d)


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _peft_adapter(model_dir, out, **lora_kwargs) -> Path:
    lora_kwargs.setdefault("init_lora_weights", False)  # random B, so the adapter is not a no-op
    torch.manual_seed(3)
    pm = peft.get_peft_model(_hf(model_dir), peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    pm.save_pretrained(str(out))
    return Path(out)


def _merged_logits(model_dir, ad, ids):
    """Logits of the base model with W += scale * B @ A: the semantics the engine implements."""
    model = _hf(model_dir)
    with torch.no_grad():
        for (layer, m), a in ad.A.items():
            model.get_submodule(module_path(layer, m)).weight += ad.scale * ad.B[(layer, m)] @ a
        return model(ids).logits


# ---------------------------------------------------------------- ModelSpec


def _write_config(d: Path, cfg: dict, gen: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if gen is not None:
        (d / "generation_config.json").write_text(json.dumps(gen))
    return d


LLAMA3 = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
    "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False,
    "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    },
}  # fmt: skip


def test_spec_llama3_rope_parameters(tmp_path):
    d = _write_config(tmp_path, LLAMA3, {"eos_token_id": [128001, 128008, 128009]})
    s = load_model_spec(d)
    assert (s.architecture, s.head_dim, s.kv_dim, s.num_layers) == (
        "LlamaForCausalLM",
        128,
        1024,
        32,
    )
    assert s.rope_theta == 500000.0
    assert s.rope_scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    assert s.eos_token_ids == (128001, 128008, 128009) and s.bos_token_id == 128000
    assert not s.attention_bias and s.bias_modules == ()
    assert s.module_dims("q_proj") == (4096, 4096) and s.module_dims("k_proj") == (4096, 1024)
    assert s.module_dims("o_proj") == (4096, 4096) and s.module_dims("down_proj") == (14336, 4096)
    assert s.module_dims("gate_proj") == (4096, 14336)


def test_spec_legacy_rope_keys(tmp_path):
    cfg = {k: v for k, v in LLAMA3.items() if k != "rope_parameters"}
    cfg |= {"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}, "head_dim": 64}
    s = load_model_spec(_write_config(tmp_path / "a", cfg))
    assert (s.rope_theta, s.rope_scaling, s.head_dim) == (
        1e6, {"rope_type": "linear", "factor": 2.0}, 64)  # fmt: skip
    cfg |= {"rope_scaling": {"rope_type": "default"}}
    assert load_model_spec(_write_config(tmp_path / "b", cfg)).rope_scaling is None


def test_spec_qwen2_biases_and_tied_embeddings(qwen2):
    _, s = qwen2
    assert s.architecture == "Qwen2ForCausalLM" and s.tie_word_embeddings
    cfg = json.loads((Path(qwen2[0]) / "config.json").read_text())
    assert "attention_bias" not in cfg and s.attention_bias  # Qwen2 always has q/k/v biases
    assert s.bias_modules == ("q_proj", "k_proj", "v_proj")
    assert (s.rope_scaling, s.sliding_window, s.head_dim) == (None, None, 16)


def test_spec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model_spec(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_spec(tmp_path)
    cfg = LLAMA3 | {"architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel"):
        load_model_spec(_write_config(tmp_path / "gpt2", cfg))


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_single_and_sharded_match_hf(llama, tmp_path):
    d, spec = llama
    model = _hf(d)
    model.save_pretrained(str(tmp_path), max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    single = load_checkpoint(d, spec, torch.bfloat16, "cpu")
    sharded = load_checkpoint(tmp_path, spec, torch.bfloat16, "cpu")
    ref = model.state_dict()
    assert set(single) == set(sharded) == set(ref)
    for name, t in single.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref[name].to(torch.bfloat16))
        assert torch.equal(t, sharded[name])


def test_checkpoint_qwen2_tied_without_lm_head(qwen2):
    d, spec = qwen2
    sd = load_checkpoint(d, spec, torch.float32, "cpu")
    assert "lm_head.weight" not in sd and sd["model.layers.2.self_attn.k_proj.bias"].shape == (32,)


def test_checkpoint_bin_only_refused_without_unpickling(llama, tmp_path, monkeypatch):
    shutil.copy(Path(llama[0]) / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not read")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(ValueError, match=r"only safetensors .*pytorch_model\.bin"):
        load_checkpoint(tmp_path, llama[1], torch.float32, "cpu")


def test_checkpoint_missing_and_mismatched_tensors_listed(llama, tmp_path):
    d, spec = llama
    sd = load_file(str(Path(d) / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.norm.weight"] = torch.ones(65)
    sd["model.layers.7.mlp.up_proj.weight"] = torch.ones(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path, spec, torch.float32, "cpu")
    msg = str(e.value)
    assert "missing: model.layers.1.mlp.up_proj.weight" in msg
    assert "model.norm.weight [65] != expected [64]" in msg and "model.layers.7" in msg


# ---------------------------------------------------------------- adapters: accepted


def test_peft_written_llama_adapter_matches_peft(llama, tmp_path):
    d, spec = llama
    out = _peft_adapter(d, tmp_path, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    ad = load_adapter("a", out, spec, max_lora_rank=8)
    assert (ad.rank, ad.alpha, ad.scale, ad.target_modules) == (4, 16.0, 4.0, ("q_proj", "v_proj"))
    assert set(ad.A) == {(i, m) for i in range(3) for m in ("q_proj", "v_proj")}
    assert ad.A[(0, "q_proj")].shape == (4, 64) and ad.B[(0, "v_proj")].shape == (32, 4)
    assert ad.A[(0, "q_proj")].dtype == torch.float32 and ad.A[(0, "q_proj")].is_contiguous()
    assert ad.num_params == 3 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    pm = peft.PeftModel.from_pretrained(_hf(d), str(out)).eval()
    ids = torch.tensor([[1, 5, 9, 200, 33]])
    with torch.no_grad():
        assert torch.allclose(pm(ids).logits, _merged_logits(d, ad, ids), atol=1e-5)


@pytest.mark.parametrize("targets", ["all-linear", r".*\.(q_proj|down_proj)"])
def test_peft_written_qwen2_rslora(qwen2, tmp_path, targets):
    d, spec = qwen2
    out = _peft_adapter(d, tmp_path, r=4, lora_alpha=8, use_rslora=True, target_modules=targets)
    ad = load_adapter("q", out, spec, max_lora_rank=4)
    assert ad.use_rslora and ad.scale == pytest.approx(8 / math.sqrt(4))
    assert ad.target_modules == (MODULES if targets == "all-linear" else ("q_proj", "down_proj"))
    pm = peft.PeftModel.from_pretrained(_hf(d), str(out)).eval()
    ids = torch.tensor([[1, 7, 300, 2]])
    with torch.no_grad():
        assert torch.allclose(pm(ids).logits, _merged_logits(d, ad, ids), atol=1e-5)


def test_make_adapter_is_real_peft_format(llama, tmp_path):
    d, spec = llama
    out = make_adapter(tmp_path, spec, rank=8, alpha=4, target_modules=MODULES, seed=5)
    ad = load_adapter("mine", out, spec, max_lora_rank=64)
    assert ad.scale == 0.5 and ad.target_modules == MODULES
    pm = peft.PeftModel.from_pretrained(_hf(d), out).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        logits = pm(ids).logits
        assert torch.allclose(logits, _merged_logits(d, ad, ids), atol=1e-5)
        assert not torch.allclose(logits, _hf(d)(ids).logits, atol=1e-3)  # B is non-zero


# ---------------------------------------------------------------- adapters: rejected


def _cfg(**changes):
    def mutate(d: Path):
        p = d / "adapter_config.json"
        p.write_text(json.dumps(json.loads(p.read_text()) | changes))

    return mutate


def _tensors(fn):
    def mutate(d: Path):
        sd = load_file(str(d / "adapter_model.safetensors"))
        fn(sd)
        save_file(sd, str(d / "adapter_model.safetensors"))

    return mutate


def _pickle_only(d: Path):
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04 never unpickled")


Q0 = f"{P}.0.self_attn.q_proj"
REJECT = {
    "missing-dir": (lambda d: shutil.rmtree(d), "directory not found"),
    "missing-config": (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json not"),
    "missing-weights": (
        lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors not"),
    "pickle-only": (_pickle_only, "only safetensors weights are accepted"),
    "bad-json": (lambda d: (d / "adapter_config.json").write_text("{"), "not valid JSON"),
    "corrupt-weights": (
        lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x07garbage"), "not a valid"),
    "peft-type": (_cfg(peft_type="LOHA"), "peft_type 'LOHA' is not supported"),
    "dora": (_cfg(use_dora=True), "DoRA (use_dora=true) is not supported"),
    "modules-to-save": (_cfg(modules_to_save=["lm_head"]), "modules_to_save ['lm_head'] is not"),
    "rank-pattern": (_cfg(rank_pattern={"q_proj": 8}), "rank_pattern (per-module"),
    "alpha-pattern": (_cfg(alpha_pattern={"v_proj": 2}), "alpha_pattern (per-module"),
    "lora-bias": (_cfg(lora_bias=True), "lora_bias=True is not supported"),
    "target-lm-head": (_cfg(target_modules=["q_proj", "v_proj", "lm_head"]), "'lm_head' is not"),
    "regex-lm-head": (_cfg(target_modules=r".*(q_proj|v_proj|lm_head)"), "'lm_head' is not"),
    "embed-tensor": (
        _tensors(lambda sd: sd.update({"base_model.model.model.embed_tokens.lora_embedding_A":
                                       torch.ones(4, 64)})),
        "target module 'model.embed_tokens' is not supported"),
    "layers-out-of-range": (_cfg(layers_to_transform=[0, 1, 2, 7]), "layers [7] outside 0..2"),
    "layers-partial-config": (
        _cfg(layers_to_transform=[0, 1]), "partial layer coverage is not supported: "
        "layers_to_transform covers layers 0-1 but not 2"),
    "layers-partial-tensors": (
        _tensors(lambda sd: [sd.pop(f"{P}.1.self_attn.q_proj.lora_{k}.weight") for k in "AB"]),
        "partial layer coverage is not supported: q_proj has LoRA tensors for layers 0, 2 but "
        "not 1"),
    "tensor-layer-oob": (
        _tensors(lambda sd: sd.update({f"{P}.5.mlp.up_proj.lora_A.weight": torch.ones(4, 64)})),
        "is for layer 5 >= num_layers=3"),
    "rank-too-big": (_cfg(r=128), "rank 128 is out of range: must be between 1 and max_lora_rank=64"
                     ),
    "rank-zero": (_cfg(r=0), "rank 0 is out of range"),
    "rank-vs-tensors": (
        _cfg(r=8), f"tensor {Q0}.lora_A.weight has shape [4, 64], expected [8, 64]"),
    "shape": (
        _tensors(lambda sd: sd.update({f"{Q0}.lora_B.weight": torch.ones(65, 4)})),
        f"tensor {Q0}.lora_B.weight has shape [65, 4], expected [64, 4]"),
    "unknown-tensor": (
        _tensors(lambda sd: sd.update({"base_model.model.extra.weight": torch.ones(1)})),
        "unknown tensor names: base_model.model.extra.weight"),
    "bias-all": (
        lambda d: (_cfg(bias="all")(d), _tensors(lambda sd: sd.update(
            {f"{Q0}.base_layer.bias": torch.ones(64)}))(d)),
        f"bias='all' with bias tensors ({Q0}.base_layer.bias) is not supported"),
    "config-vs-tensors": (
        _cfg(target_modules=["q_proj", "k_proj", "v_proj"]), "do not match the tensors"),
    "unpaired": (_tensors(lambda sd: sd.pop(f"{Q0}.lora_B.weight")), "but not its pair"),
    "nan": (
        _tensors(lambda sd: sd[f"{Q0}.lora_A.weight"].fill_(float("nan"))), "contains NaN or Inf"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REJECT))
def test_adapter_rejected(llama, tmp_path, case):
    _, spec = llama
    d = Path(
        make_adapter(
            tmp_path / "ad", spec, rank=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=0
        )
    )
    mutate, reason = REJECT[case]
    mutate(d)
    with pytest.raises(AdapterError) as e:
        load_adapter("bad-one", d, spec, max_lora_rank=64)
    assert str(e.value).startswith("adapter 'bad-one': ") and reason in str(e.value), str(e.value)


PEFT_REJECT = {
    "dora": (dict(target_modules=["q_proj"], use_dora=True), "DoRA"),
    "lm-head": (dict(target_modules=["q_proj", "lm_head"]), "'lm_head' is not supported"),
    "embed": (dict(target_modules=["q_proj", "embed_tokens"]), "'embed_tokens' is not supported"),
    "save-lm-head": (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_"),
    "bias-all": (dict(target_modules=["q_proj"], bias="all"), "bias='all' with bias tensors"),
    "lora-only": (dict(target_modules=["v_proj"], bias="lora_only"), "bias='lora_only' with bias"),
    "layers": (dict(target_modules=["q_proj"], layers_to_transform=[2]), "layers 2 but not 0-1"),
    "rank": (dict(target_modules=["q_proj"], r=32), "rank 32 is out of range"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PEFT_REJECT))
def test_peft_written_adapter_rejected(qwen2, tmp_path, case):
    d, spec = qwen2
    kwargs, reason = PEFT_REJECT[case]
    out = _peft_adapter(d, tmp_path, **({"r": 4} | kwargs))
    with pytest.raises(AdapterError, match=f"^adapter 'p': .*{re.escape(reason)}"):
        load_adapter("p", out, spec, max_lora_rank=16)

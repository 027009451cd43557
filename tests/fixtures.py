"""Reference side of the engine tests: tiny HF checkpoints, real PEFT adapters, an HF oracle.

Everything here uses Hugging Face `transformers` and `peft` only (never loraplex code), so the
engine can be checked against an independent implementation:

- `make_tiny_model` writes a real HF checkpoint directory (config.json + model.safetensors) for a
  Llama-, Qwen2- or Mistral-style decoder with random weights re-initialised at a large std, so
  greedy continuations depend on the prompt and top-1/top-2 logit margins are rarely tiny.
- `make_peft_adapter` writes a real PEFT LoRA adapter directory (adapter_config.json +
  adapter_model.safetensors) with non-zero random A and B, so the adapter changes outputs.
- `hf_reference_greedy` / `hf_reference_logits` run the HF model (+ `PeftModel`) in float32,
  one request at a time. Loaded models are cached per process, keyed by (model_dir, adapter_dir).

Prompts are token ids; no tokenizer is written. Results are deterministic for fixed arguments.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

logger = logging.getLogger(__name__)

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
_MODEL_CACHE: dict[tuple[str, str | None], torch.nn.Module] = {}


def make_tiny_model(
    out_dir,
    family: str = "llama",
    *,
    seed: int = 0,
    vocab_size: int = 256,
    hidden_size: int = 64,
    intermediate_size: int = 160,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    attention_bias: bool | None = None,
    rope_scaling: dict | None = None,
    max_position_embeddings: int = 256,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.2,
    rope_theta: float = 10000.0,
    legacy_rope_keys: bool = False,
) -> str:
    """Write a tiny random HF causal-LM checkpoint to `out_dir` and return its path (str).

    `family` is "llama", "qwen2" or "mistral". Qwen2 always has q/k/v bias (passing
    `attention_bias=False` for it is an error); Mistral has none; Llama follows
    `attention_bias` (default False). `rope_scaling` is an HF rope dict such as
    `{"rope_type": "llama3", "factor": 8.0, ...}`; it is stored under `rope_parameters`
    (transformers v5 layout) unless `legacy_rope_keys`, which rewrites config.json to the older
    layout real hub checkpoints use (top-level `rope_theta` and `rope_scaling`); HF loads both
    identically. Mistral's sliding window is disabled.

    Weights: every linear/embedding weight and bias ~ N(0, init_std) and every RMSNorm weight
    ~ U(0.8, 1.2), drawn in float32 from a generator seeded with `seed`, then cast to `dtype`
    for saving (so a bf16 checkpoint holds the rounded float32 values of the same seed).
    """
    if family not in _CONFIGS:
        raise ValueError(f"family must be one of {sorted(_CONFIGS)}, got {family!r}")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta},
    )
    if family == "qwen2":
        if attention_bias is False:
            raise ValueError("qwen2 always has q/k/v bias")
    elif family == "mistral":
        if attention_bias:
            raise ValueError("mistral has no attention bias")
        kwargs["sliding_window"] = None
    else:
        kwargs["attention_bias"] = bool(attention_bias)
    config = _CONFIGS[family](**kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied lm_head is not listed twice
            if "norm" in name:
                param.copy_(0.8 + 0.4 * torch.rand(param.shape, generator=gen))
            else:
                param.copy_(init_std * torch.randn(param.shape, generator=gen))
    model.to(dtype)
    model.config.dtype = dtype
    out = Path(out_dir)
    model.save_pretrained(out)
    if legacy_rope_keys:
        _rewrite_rope_legacy(out / "config.json")
    logger.debug("wrote tiny %s model to %s", family, out)
    return str(out)


def _rewrite_rope_legacy(config_path: Path) -> None:
    cfg = json.loads(config_path.read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_peft_adapter(
    model_dir,
    out_dir,
    *,
    rank: int,
    alpha: float,
    target_modules,
    seed: int,
    use_rslora: bool = False,
    b_std: float = 0.05,
    dtype: torch.dtype = torch.float32,
) -> str:
    """Write a real PEFT LoRA adapter for `model_dir` to `out_dir` and return its path (str).

    Built with `peft.get_peft_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=...,
    use_rslora=..., lora_dropout=0))`; then, in a fixed module order with a generator seeded by
    `seed`, every lora_A (shape [rank, in]) is drawn ~ N(0, 1/sqrt(in)) and every lora_B
    (shape [out, rank]) ~ N(0, b_std), so the delta `scale * B @ A` is non-zero. PEFT's scale is
    alpha / rank, or alpha / sqrt(rank) with rslora. Tensors are saved in `dtype`.
    """
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora_cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="none",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        model = get_peft_model(base, lora_cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_A." in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
            elif ".lora_B." in name:
                param.copy_(b_std * torch.randn(param.shape, generator=gen))
    if dtype != torch.float32:
        model.to(dtype)
    model.save_pretrained(out_dir)
    logger.debug("wrote rank-%d adapter to %s", rank, out_dir)
    return str(out_dir)


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling factor: alpha / rank, or alpha / sqrt(rank) with rslora."""
    return alpha / (rank**0.5 if use_rslora else rank)


def load_reference_model(model_dir, adapter_dir=None) -> torch.nn.Module:
    """The float32 eval-mode HF model (wrapped in `PeftModel` when `adapter_dir`), cached.

    Each adapter gets its own fresh base model (PEFT injects layers into the model it wraps).
    """
    key = (os.path.realpath(model_dir), adapter_dir and os.path.realpath(adapter_dir))
    model = _MODEL_CACHE.get(key)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            key[0], dtype=torch.float32, attn_implementation="eager"
        )
        if key[1] is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
                )
                model = PeftModel.from_pretrained(model, key[1])
        model.eval()
        _MODEL_CACHE[key] = model
    return model


def clear_reference_cache() -> None:
    """Drop every cached reference model."""
    _MODEL_CACHE.clear()


@torch.inference_mode()
def hf_reference_logits(model_dir, adapter_dir, input_ids: list[int]) -> torch.Tensor:
    """One full float32 forward pass: `[len(input_ids), vocab]` log_softmax (float32, CPU).

    Row i is the distribution of the token following `input_ids[: i + 1]` (positions 0..len-1).
    """
    model = load_reference_model(model_dir, adapter_dir)
    ids = torch.tensor([list(input_ids)], dtype=torch.long)
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@torch.inference_mode()
def hf_reference_greedy(
    model_dir, adapter_dir: str | None, prompt_ids: list[int], max_new_tokens: int
) -> tuple[list[int], list[float]]:
    """Greedy decoding with the HF model (+ PEFT adapter when `adapter_dir`), float32.

    Returns `(token_ids, logprobs)`: exactly `max_new_tokens` generated ids (prompt excluded)
    and the log_softmax log-probability of each chosen token. It never stops at EOS or any other
    token, so compare with engine requests sent with `ignore_eos=True` (the Llama/Mistral tiny
    configs declare eos_token_id=2). Argmax ties go to the lowest token id (torch.argmax).
    A prefill forward over the prompt, then one forward per token with HF's KV cache.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    model = load_reference_model(model_dir, adapter_dir)
    out = model(input_ids=torch.tensor([list(prompt_ids)], dtype=torch.long), use_cache=True)
    tokens: list[int] = []
    logprobs: list[float] = []
    for step in range(max_new_tokens):
        logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        tok = int(torch.argmax(logp))
        tokens.append(tok)
        logprobs.append(float(logp[tok]))
        if step + 1 < max_new_tokens:
            out = model(
                input_ids=torch.tensor([[tok]], dtype=torch.long),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    return tokens, logprobs

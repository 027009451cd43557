"""Oracle for LoRA fine-tuning: HF PEFT + torch AdamW, one plainly written loop.

Imports only torch, transformers, peft and safetensors (never loraplex code), so the engine's
fine-tuning can be checked against an independent implementation. Examples arrive already
tokenized as (input_ids, labels) pairs; labels use the HF convention (-100 = not trained, the
logits at position t predict labels[t + 1]).

The computation of `peft_train`, exactly:

- Model: `AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)` in eval mode (dropout
  off) with autograd on; the base weights are frozen. The adapter is either loaded from
  `init_adapter` (`PeftModel.from_pretrained(..., is_trainable=True)`; rank, alpha and targets
  come from its config) or created with `torch.manual_seed(seed)` followed by `get_peft_model`
  with PEFT's default init (A kaiming-uniform from the global RNG, B zero). The global RNG
  state is restored afterwards. LoRA parameters are float32 whatever `dtype` is.
- Order: per epoch e, `range(n)` or, with `shuffle`,
  `torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))`; batches are
  consecutive `batch_size` slices (the last may be partial); every `grad_accum` consecutive
  batches of an epoch form one optimizer step (a last partial group is a step too; groups never
  span epochs). See `epoch_order` and `step_groups`.
- Batches are right-padded with `pad_id` to their longest example (attention_mask 0 and labels
  -100 on pads).
- Step loss: the sum over the step's batches of the summed float32 token cross-entropies
  (logits[:, :-1] against labels[:, 1:]), divided by N, the step's number of trained tokens.
  Each batch backpropagates batch_sum / N, so the gradients add up to the step's mean.
- Optimizer: `torch.optim.AdamW(lora_params, lr, betas=(0.9, 0.999), eps=1e-8,
  weight_decay=0.0)` over every trainable parameter in `named_parameters()` order; constant lr,
  no clipping, no scheduler; `step()` then `zero_grad()` after each group.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

IGNORE_INDEX = -100

Example = tuple[list[int], list[int]]


def epoch_order(n: int, epoch: int, *, seed: int = 0, shuffle: bool = False) -> list[int]:
    """Example indices in the order epoch `epoch` (0-based) visits them."""
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def step_groups(
    n: int,
    *,
    epochs: int = 1,
    batch_size: int = 1,
    grad_accum: int = 1,
    shuffle: bool = False,
    seed: int = 0,
) -> list[list[list[int]]]:
    """The optimizer steps of a run: each step is a list of batches, each a list of indices."""
    if n <= 0:
        raise ValueError("need at least one example")
    if epochs < 1 or batch_size < 1 or grad_accum < 1:
        raise ValueError("epochs, batch_size and grad_accum must be >= 1")
    steps = []
    for epoch in range(epochs):
        order = epoch_order(n, epoch, seed=seed, shuffle=shuffle)
        batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        steps.extend(batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum))
    return steps


def trained_tokens(labels: list[int]) -> int:
    """How many positions of one example carry a loss (labels[1:] that are not -100)."""
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


def collate(
    examples: list[Example], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) int64 tensors, right-padded to the longest example."""
    longest = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
    return input_ids, attention_mask, labels


def summed_token_loss(model: torch.nn.Module, input_ids, attention_mask, labels) -> torch.Tensor:
    """Sum of the float32 cross-entropies of the batch's trained tokens (a 0-d tensor)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, :-1]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def load_model(
    model_dir: str,
    *,
    rank: int | None = None,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
    use_rslora: bool = False,
    init_adapter: str | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PeftModel:
    """The trainable PEFT model `peft_train` starts from (eval mode, base frozen)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        if init_adapter is not None:
            model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        else:
            if rank is None or alpha is None or not target_modules:
                raise ValueError("rank, alpha and target_modules are needed without init_adapter")
            config = _lora_config(rank, alpha, target_modules, use_rslora)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = get_peft_model(model, config)
    model.eval()
    for name, param in model.named_parameters():
        if param.requires_grad:
            if ".lora_" not in name:
                raise AssertionError(f"unexpected trainable parameter {name}")
            if param.dtype != torch.float32:
                param.data = param.data.float()
    return model


def _lora_config(rank, alpha, target_modules, use_rslora: bool) -> LoraConfig:
    """PEFT's default LoRA setup for the given shape: dropout 0, no bias, default init."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        use_rslora=use_rslora,
        bias="none",
        init_lora_weights=True,
    )


def peft_train(
    model_dir: str,
    examples: list[Example],
    *,
    rank: int,
    alpha: float,
    target_modules: list[str],
    use_rslora: bool = False,
    init_adapter: str | None = None,
    seed: int = 0,
    epochs: int = 1,
    batch_size: int = 1,
    grad_accum: int = 1,
    shuffle: bool = False,
    learning_rate: float = 1e-4,
    pad_id: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """LoRA-train with PEFT + AdamW; return (per-step log, final adapter state dict).

    The log has one dict per optimizer step: {"step": 1-based, "loss": mean token loss of the
    step, "tokens": trained tokens in the step}. The state dict maps PEFT's saved keys (as in
    adapter_model.safetensors, e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.
    weight") to float32 CPU tensors. With `init_adapter`, rank/alpha/target_modules/use_rslora
    are ignored (the adapter's config rules). A step with no trained token is an error.
    """
    for ids, labs in examples:
        if len(ids) != len(labs):
            raise ValueError("input_ids and labels differ in length")
        if not ids:
            raise ValueError("empty example")
    model = load_model(
        model_dir,
        rank=rank,
        alpha=alpha,
        target_modules=target_modules,
        use_rslora=use_rslora,
        init_adapter=init_adapter,
        seed=seed,
        dtype=dtype,
    )
    lora_params = [p for _, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        lora_params, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    steps = step_groups(
        len(examples),
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        shuffle=shuffle,
        seed=seed,
    )
    log = []
    for step, group in enumerate(steps, start=1):
        n_tokens = sum(trained_tokens(examples[i][1]) for batch in group for i in batch)
        if n_tokens == 0:
            raise ValueError(f"optimizer step {step} has no trained token")
        total = 0.0
        for batch in group:
            input_ids, attention_mask, labels = collate([examples[i] for i in batch], pad_id)
            batch_sum = summed_token_loss(model, input_ids, attention_mask, labels)
            (batch_sum / n_tokens).backward()
            total += batch_sum.item()
        optimizer.step()
        optimizer.zero_grad()
        log.append({"step": step, "loss": total / n_tokens, "tokens": n_tokens})
    state = {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(model).items()}
    return log, state


def make_nonzero_adapter(
    out_dir,
    model_dir,
    rank: int,
    alpha: float,
    target_modules,
    seed: int,
    use_rslora: bool = False,
) -> str:
    """Write a PEFT adapter (safetensors) with non-zero A and B; return its path (str).

    A keeps PEFT's default kaiming-uniform init drawn after `torch.manual_seed(seed)` (the global
    RNG state is restored afterwards); every lora_B, in `named_parameters()` order, is then drawn
    ~ N(0, 0.05) from a generator seeded with `seed`.
    """
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = _lora_config(rank, alpha, target_modules, use_rslora)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        torch.manual_seed(seed)
        model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return str(Path(out_dir))

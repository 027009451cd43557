"""How many pool pages a fine-tuning job reserves before it starts (memory/train_pages.py).

* State: float32 adapter weights, their gradients and AdamW's two moments: 4 x 4 bytes per
  adapter parameter (`TrainableLoRA.place` lays them out in the job's state pages).
* Activations: what autograd keeps for one micro-batch of `tokens` padded tokens through every
  layer and the head (engine/train_forward.py keeps every half layer's graph until its
  backward). `activation_bytes` is an upper bound of the tensors autograd saves, counted from
  the ops of `_attention`, `_mlp` and `_head_loss` (tests/test_coserve.py measures the saved
  tensors against it).
"""

from __future__ import annotations

from loraplex.engine.loader import ModelSpec


def adapter_params(spec: ModelSpec, rank: int, target_modules) -> int:
    """Number of LoRA parameters: rank x (in + out) per targeted module per layer."""
    per_layer = sum(sum(spec.module_dims(m)) for m in set(target_modules))
    return spec.num_layers * rank * per_layer


def state_bytes(spec: ModelSpec, rank: int, target_modules) -> int:
    return 16 * adapter_params(spec, rank, target_modules)


def activation_bytes(spec: ModelSpec, rank: int, tokens: int, elem_bytes: int) -> int:
    """Saved tensors of one micro-batch of `tokens` padded tokens (float32 where the training
    path computes in float32: norms, LoRA inputs and the loss's logits)."""
    h, q, kv, inter, heads = (spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size,
                              spec.num_heads)  # fmt: skip
    f32 = 4 * (
        2 * (h + 1)  # the two RMSNorms' float32 inputs and their rsqrt
        + 2 * h
        + q
        + inter  # float32 inputs of the four LoRA groups
        + 7 * rank  # x @ A^T of each module, kept for B's gradient
        + heads  # attention's logsumexp
    )
    dtype = elem_bytes * (
        2 * q
        + 2 * kv  # attention's q, k, v and output
        + 3 * inter  # SiLU's input, its output and the up projection
        + 2 * h  # the outputs of the layer's two halves, each handed on as a leaf
    )
    head = 4 * (h + 1) + (8 + elem_bytes) * spec.vocab_size  # norm, logits, log-softmax
    rope = 2 * elem_bytes * spec.head_dim  # the micro-batch's cos and sin rows
    return tokens * (spec.num_layers * (f32 + dtype) + head + rope)


def pages_needed(
    spec: ModelSpec, rank: int, target_modules, tokens: int, elem_bytes: int, page_bytes: int
) -> tuple[int, int]:
    """(state pages, activation pages) of a job whose micro-batches are <= `tokens`."""
    state = -(-state_bytes(spec, rank, target_modules) // page_bytes)
    act = -(-activation_bytes(spec, rank, tokens, elem_bytes) // page_bytes)
    return state, act

"""The training forward: the engine's frozen base weights, with one trainable LoRA adapter, over a
padded batch of whole sequences, differentiable with respect to the adapter only.

Training rows never touch the KV pool: attention is causal over each row itself (right-padded
rows: a real token never sees a pad after it). The base weights are the inference model's own
(`Model.layers`, read, never copied or given gradients); autograd records only what the
adapter's gradients need. Numerics follow HF transformers' Llama/Qwen2 (RMSNorm in float32,
rotate-half rotary, softmax attention in the model dtype), so float32 losses match a PEFT
model's to rounding.

`TrainableLoRA` holds float32 master weights A [r, in] and B [out, r] per (layer, module) as
leaf tensors; the update of a module is `scale * (x @ A^T) @ B^T`, computed in float32 and added
to the base output in its dtype (as PEFT does with float32 adapter weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex.engine.layers import apply_rotary, rms_norm
from loraplex.engine.loader import MODULES, ModelSpec
from loraplex.engine.model import Model

PEFT_ORDER = MODULES  # also PEFT's module order in a layer (the order its init draws in)


@dataclass
class TrainableLoRA:
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # in PEFT_ORDER
    A: dict[tuple[int, str], torch.Tensor]  # [rank, in] float32, requires_grad
    B: dict[tuple[int, str], torch.Tensor]  # [out, rank] float32, requires_grad

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def parameters(self) -> list[torch.Tensor]:
        """A then B of each module, layer by layer in PEFT_ORDER: PEFT's parameter order."""
        keys = sorted(self.A, key=lambda k: (k[0], PEFT_ORDER.index(k[1])))
        return [t for k in keys for t in (self.A[k], self.B[k])]

    @classmethod
    def peft_init(
        cls,
        spec: ModelSpec,
        rank: int,
        alpha: float,
        target_modules,
        seed: int,
        use_rslora: bool = False,
        device: torch.device | str = "cpu",
    ) -> TrainableLoRA:
        """PEFT's default initialisation, draw for draw: with the global RNG seeded `seed`, each
        module (layers in order, modules in PEFT_ORDER) builds lora_A and lora_B as nn.Linear
        (each drawing its own kaiming-uniform init), then re-draws A (kaiming-uniform, a=sqrt 5)
        and zeroes B. The same seed gives PEFT's `get_peft_model` weights."""
        targets = tuple(m for m in PEFT_ORDER if m in set(target_modules))
        if len(targets) != len(set(target_modules)) or not targets:
            raise ValueError(f"target_modules must be a non-empty subset of {MODULES}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        torch.manual_seed(seed)
        A, B = {}, {}
        for layer in range(spec.num_layers):
            for m in targets:
                din, dout = spec.module_dims(m)
                a, b = torch.empty(rank, din), torch.empty(dout, rank)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(din, rank)
                torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5))  # nn.Linear(rank, dout)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # reset_lora_parameters
                b.zero_()
                A[layer, m], B[layer, m] = a, b
        return cls._leaves(rank, alpha, use_rslora, targets, A, B, device)

    @classmethod
    def from_weights(cls, weights, device: torch.device | str = "cpu") -> TrainableLoRA:
        """From a loaded adapter (engine/adapter_loader.py `AdapterWeights`): its config and
        float32 copies of its A and B."""
        targets = tuple(m for m in PEFT_ORDER if m in weights.target_modules)
        return cls._leaves(
            weights.rank,
            weights.alpha,
            weights.use_rslora,
            targets,
            dict(weights.A),
            dict(weights.B),
            device,
        )

    @classmethod
    def _leaves(cls, rank, alpha, use_rslora, targets, A, B, device) -> TrainableLoRA:
        def leaf(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=torch.float32).clone().requires_grad_()

        return cls(
            rank,
            float(alpha),
            bool(use_rslora),
            targets,
            {k: leaf(v) for k, v in A.items()},
            {k: leaf(v) for k, v in B.items()},
        )


def _add_lora(
    y: torch.Tensor, x: torch.Tensor, lora: TrainableLoRA, layer: int, modules, widths
) -> torch.Tensor:
    """y [N, sum(widths)] (a fused base output) plus the adapter's update of each of `modules`
    (the column slices of the given widths), out of place so autograd sees it."""
    parts, start, changed = [], 0, False
    for m, width in zip(modules, widths, strict=True):
        part = y[:, start : start + width]
        a = lora.A.get((layer, m))
        if a is not None:
            delta = (x.float() @ a.t()) @ lora.B[layer, m].t() * lora.scale
            part = part + delta.to(y.dtype)
            changed = True
        parts.append(part)
        start += width
    return torch.cat(parts, dim=1) if changed else y


def train_forward(
    model: Model,
    lora: TrainableLoRA,
    input_ids: torch.Tensor,
    hidden_rows: torch.Tensor,
) -> torch.Tensor:
    """Hidden states after the final norm, [R, hidden], at the flat positions `hidden_rows`
    (indices into the [B * L] positions of `input_ids` [B, L]); differentiable w.r.t. `lora`.
    Only these rows go through the LM head afterwards (the loss needs no other logits)."""
    spec, eps = model.spec, model.spec.rms_norm_eps
    bsz, seq = input_ids.shape
    heads, kv_heads, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q_dim, kv_dim, inter = spec.q_dim, spec.kv_dim, spec.intermediate_size
    positions = torch.arange(seq, device=input_ids.device).repeat(bsz)
    cos, sin = model.rotary.tables(positions)  # [B*L, 1, hd]
    h = model.embed[input_ids.reshape(-1)]  # [B*L, hidden]
    for i, w in enumerate(model.layers):
        x = rms_norm(h, w.input_norm, eps)
        qkv = _add_lora(w.qkv(x), x, lora, i, PEFT_ORDER[:3], (q_dim, kv_dim, kv_dim))
        q = apply_rotary(qkv[:, :q_dim].reshape(-1, heads, hd), cos, sin)
        k = apply_rotary(qkv[:, q_dim : q_dim + kv_dim].reshape(-1, kv_heads, hd), cos, sin)
        v = qkv[:, q_dim + kv_dim :].reshape(-1, kv_heads, hd)
        # [B, heads, L, hd]; GQA: each KV head serves heads / kv_heads query heads
        q, k, v = (t.reshape(bsz, seq, -1, hd).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=model.scale, enable_gqa=kv_heads != heads
        )
        o = o.transpose(1, 2).reshape(bsz * seq, q_dim)
        h = h + _add_lora(w.o(o), o, lora, i, ("o_proj",), (spec.hidden_size,))
        x = rms_norm(h, w.post_norm, eps)
        gu = _add_lora(w.gate_up(x), x, lora, i, ("gate_proj", "up_proj"), (inter, inter))
        a = F.silu(gu[:, :inter]) * gu[:, inter:]
        h = h + _add_lora(w.down(a), a, lora, i, ("down_proj",), (spec.hidden_size,))
    return rms_norm(h[hidden_rows], model.norm, eps)


def token_loss_sum(
    model: Model,
    lora: TrainableLoRA,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """(sum of the cross-entropies of every trained token, number of trained tokens) for a
    right-padded batch; labels [B, L] use HF's convention (-100 untrained; position t's
    logits predict labels[t + 1]). The sum is float32 and differentiable w.r.t. `lora`."""
    bsz, seq = input_ids.shape
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]  # position t predicts t + 1
    rows = (targets.reshape(-1) != -100).nonzero().squeeze(1)
    hidden = train_forward(model, lora, input_ids, rows)
    logits = model.lm_head(hidden).float()  # [R, vocab]
    loss = F.cross_entropy(logits, targets.reshape(-1)[rows], reduction="sum")
    return loss, int(rows.numel())

"""The training forward: the engine's frozen base weights, with one trainable LoRA adapter, over a
padded batch of whole sequences, differentiable with respect to the adapter only.

Training rows never touch the KV pool: attention is causal over each row itself (right-padded
rows: a real token never sees a pad after it). The base weights are the inference model's own
(`Model.layers`, read, never copied or given gradients); autograd records only what the
adapter's gradients need. Numerics follow HF transformers' Llama/Qwen2 (RMSNorm in float32,
rotate-half rotary, softmax attention in the model dtype), so float32 losses match a PEFT
model's to rounding.

The adapter (engine/train_lora.py `TrainableLoRA`) holds float32 master weights; the update of
a module is `scale * (x @ A^T) @ B^T`, computed in float32 and added to the base output in its
dtype (as PEFT does with float32 adapter weights).

Two ways to run it, with the same operations in the same order (so the same numbers):
`token_loss_sum` (the whole forward at once: validation, offline steps) and `MicroBatch` (the
forward and backward cut into units of half a decoder layer each, its attention or its MLP, so
a co-served job can spend a bounded time per engine step: engine/training_jobs.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraplex.engine.layers import apply_rotary, rms_norm
from loraplex.engine.model import LayerWeights, Model
from loraplex.engine.train_lora import PEFT_ORDER, TrainableLoRA
from loraplex.kernels.linear import Linear


class _FrozenLinear(torch.autograd.Function):
    """y = lin(x) with the base weight frozen: backward gives x's gradient only, through
    `Linear.input_grad` (every storage mode of kernels/linear.py, oneDNN's packed bfloat16
    included, which has no autograd formula of its own). Saves nothing of x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        ctx.lin = lin
        return lin(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return ctx.lin.input_grad(grad_y.contiguous()), None


def _base(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    return _FrozenLinear.apply(x, lin) if x.requires_grad else lin(x)


def _add_lora(
    y: torch.Tensor, x: torch.Tensor, lora: TrainableLoRA, layer: int, modules, widths
) -> torch.Tensor:
    """y [N, sum(widths)] (a fused base output) plus the adapter's update of each of `modules`
    (the column slices of the given widths), out of place so autograd sees it."""
    parts, start, changed, xf = [], 0, False, None
    for m, width in zip(modules, widths, strict=True):
        part = y[:, start : start + width]
        a = lora.A.get((layer, m))
        if a is not None:
            xf = x.float() if xf is None else xf  # once per group: autograd keeps one copy
            delta = (xf @ a.t()) @ lora.B[layer, m].t() * lora.scale
            part = part + delta.to(y.dtype)
            changed = True
        parts.append(part)
        start += width
    return torch.cat(parts, dim=1) if changed else y


def _attention(
    model: Model,
    lora: TrainableLoRA,
    i: int,
    w: LayerWeights,
    h: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    bsz: int,
) -> torch.Tensor:
    """The attention half of decoder layer i over h [B*L, hidden] (rows of B sequences of equal
    length) -> the residual stream after it [B*L, hidden]."""
    spec, eps = model.spec, model.spec.rms_norm_eps
    heads, kv_heads, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q_dim, kv_dim = spec.q_dim, spec.kv_dim
    cos, sin = rope
    x = rms_norm(h, w.input_norm, eps)
    qkv = _add_lora(_base(w.qkv, x), x, lora, i, PEFT_ORDER[:3], (q_dim, kv_dim, kv_dim))
    q = apply_rotary(qkv[:, :q_dim].reshape(-1, heads, hd), cos, sin)
    k = apply_rotary(qkv[:, q_dim : q_dim + kv_dim].reshape(-1, kv_heads, hd), cos, sin)
    v = qkv[:, q_dim + kv_dim :].reshape(-1, kv_heads, hd)
    # [B, heads, L, hd]; GQA: each KV head serves heads / kv_heads query heads
    q, k, v = (t.reshape(bsz, -1, t.shape[1], hd).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=model.scale, enable_gqa=kv_heads != heads
    )
    o = o.transpose(1, 2).reshape(-1, q_dim)
    return h + _add_lora(_base(w.o, o), o, lora, i, ("o_proj",), (spec.hidden_size,))


def _mlp(model: Model, lora: TrainableLoRA, i: int, w: LayerWeights, h: torch.Tensor):
    """The MLP half of decoder layer i over rows h [N, hidden] -> the residual stream after it
    [N, hidden]. Row-wise: any subset of rows gives those rows' output."""
    inter = model.spec.intermediate_size
    x = rms_norm(h, w.post_norm, model.spec.rms_norm_eps)
    gu = _add_lora(_base(w.gate_up, x), x, lora, i, ("gate_proj", "up_proj"), (inter, inter))
    a = F.silu(gu[:, :inter]) * gu[:, inter:]
    return h + _add_lora(_base(w.down, a), a, lora, i, ("down_proj",), (model.spec.hidden_size,))


def _inputs(model: Model, input_ids: torch.Tensor, labels: torch.Tensor):
    """(embedded rows [B*L, hidden], rotary tables, loss rows, their targets) of a right-padded
    batch; labels [B, L] use HF's convention (-100 untrained; position t's logits predict
    labels[t + 1])."""
    bsz, seq = input_ids.shape
    positions = torch.arange(seq, device=input_ids.device).repeat(bsz)
    rope = model.rotary.tables(positions)  # [B*L, 1, hd] each
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]  # position t predicts t + 1
    rows = (targets.reshape(-1) != -100).nonzero().squeeze(1)
    return model.embed[input_ids.reshape(-1)], rope, rows, targets.reshape(-1)[rows]


def _head_loss(model: Model, h: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor):
    """Summed float32 cross-entropy of the trained rows (only they go through the LM head)."""
    hidden = rms_norm(h[rows], model.norm, model.spec.rms_norm_eps)
    logits = _base(model.lm_head, hidden).float()  # [R, vocab]
    return F.cross_entropy(logits, targets, reduction="sum")


def token_loss_sum(
    model: Model,
    lora: TrainableLoRA,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """(sum of the cross-entropies of every trained token, number of trained tokens) for a
    right-padded batch input_ids [B, L] with HF-convention labels [B, L]. The sum is float32
    and differentiable w.r.t. `lora`."""
    h, rope, rows, targets = _inputs(model, input_ids, labels)
    for i, w in enumerate(model.layers):
        h = _attention(model, lora, i, w, h, rope, input_ids.shape[0])
        h = _mlp(model, lora, i, w, h)
    return _head_loss(model, h, rows, targets), int(rows.numel())


class MicroBatch:
    """One right-padded micro-batch's forward and backward, run one unit at a time: the forward
    of each half of each decoder layer (its attention, then its MLP), then the head (LM head,
    loss and its backward), then the backward of each half from the last. Gradients of (summed
    loss) / `loss_divisor` accumulate into the adapter's `.grad`s; the result equals
    `(token_loss_sum(...)[0] / loss_divisor).backward()`.

    Between units the residual stream is cut: half s's output is handed to half s + 1 detached
    (a fresh leaf), so each half's graph is backpropagated separately with the gradient its
    successor left on that leaf. Autograd keeps only this micro-batch's activations; nothing of
    inference is recorded. Unit kinds (`next_unit`): "attention", "mlp", "head",
    "attention_backward", "mlp_backward"; each costs about its kind's time per padded token x
    `num_tokens` (what engine/training_jobs.py budgets with).
    """

    KINDS = ("attention", "mlp", "head", "attention_backward", "mlp_backward")

    def __init__(
        self,
        model: Model,
        lora: TrainableLoRA,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        loss_divisor: float,
    ) -> None:
        self.model, self.lora, self.divisor = model, lora, loss_divisor
        self.bsz = input_ids.shape[0]
        self.num_tokens = input_ids.numel()  # padded tokens: what each unit's cost scales with
        h, self.rope, self.rows, self.targets = _inputs(model, input_ids, labels)
        self.num_trained = int(self.rows.numel())
        self.num_halves = 2 * len(model.layers)  # half s: layer s // 2, attention if s is even
        self.inputs: list[torch.Tensor | None] = [h]  # inputs[s]: half s's input leaf
        self.outputs: list[torch.Tensor | None] = []  # outputs[s]: half s's output (graph)
        self.loss: float | None = None  # the summed loss, once the head ran
        self._backward_next = self.num_halves - 1

    @property
    def done(self) -> bool:
        return self.loss is not None and self._backward_next < 0

    def next_unit(self) -> str:
        """The kind of unit `run_unit` runs next (one of KINDS)."""
        if len(self.outputs) < self.num_halves:
            return "mlp" if len(self.outputs) % 2 else "attention"
        if self.loss is None:
            return "head"
        return "mlp_backward" if self._backward_next % 2 else "attention_backward"

    def run_unit(self) -> None:
        if self.done:
            raise RuntimeError("the micro-batch is done")
        kind = self.next_unit()
        if kind in ("attention", "mlp"):
            s = len(self.outputs)
            i, w, h = s // 2, self.model.layers[s // 2], self.inputs[s]
            if kind == "attention":
                out = _attention(self.model, self.lora, i, w, h, self.rope, self.bsz)
            else:
                out = _mlp(self.model, self.lora, i, w, h)
            self.outputs.append(out)
            self.inputs.append(out.detach().requires_grad_())
        elif kind == "head":
            loss = _head_loss(self.model, self.inputs[-1], self.rows, self.targets)
            (loss / self.divisor).backward()
            self.loss = float(loss.detach())
        else:
            s = self._backward_next
            out, grad = self.outputs[s], self.inputs[s + 1].grad
            if out.requires_grad:  # (not: no adapter weight at or before this half)
                torch.autograd.backward(out, grad)  # frees half s's graph
            self.outputs[s] = self.inputs[s + 1] = None
            self._backward_next -= 1
        if self.done:
            self.inputs = self.outputs = []

"""Llama / Mistral / Qwen2 decoder over paged KV, with batched multi-adapter LoRA.

Weights keep HF's meaning but are fused at load: qkv_proj = [q; k; v] (+ bias for Qwen2) and
gate_up_proj = [gate; up], so each group is one base matmul and LoRA expands write into slices
of it. The forward takes one flat batch of T tokens from many sequences (prefill chunks and
decodes mixed) and an explicit `ForwardMeta`; nothing is global.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex.engine.layers import Rotary, add_rms_norm, apply_rotary, rms_norm
from loraplex.engine.loader import ModelSpec, module_path
from loraplex.kernels.attention import AttentionMeta, paged_attention, write_kv
from loraplex.kernels.linear import Linear
from loraplex.kernels.lora import LoRABatchMeta, lora_apply_torch


@dataclass
class ForwardMeta:
    """Everything one forward needs, built once per step by the runner."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMeta
    lora: LoRABatchMeta
    sample_rows: torch.Tensor  # [S] token rows whose logits are sampled


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # hidden -> q_dim + 2 * kv_dim
    o: Linear  # q_dim -> hidden
    post_norm: torch.Tensor
    gate_up: Linear  # hidden -> 2 * inter
    down: Linear  # inter -> hidden


class Model:
    def __init__(
        self,
        spec: ModelSpec,
        tensors: dict[str, torch.Tensor],
        kv_pages: torch.Tensor,
        block_size: int,
        max_positions: int,
        lora_backend: str = "torch",
        attention_backend: str = "torch",
    ) -> None:
        """`kv_pages` is the unified pool viewed as [num_pages, page_elems]; KV pages are read
        as [num_pages, num_layers, 2, block_size, kv_heads, head_dim]. The projection weights
        are taken out of `tensors` (popped) as each is re-laid out, so the load never holds a
        layer twice over."""
        self.spec = spec
        self.block_size = block_size
        t = tensors
        self.embed = t["model.embed_tokens.weight"]
        self.norm = t["model.norm.weight"]
        tied = spec.tie_word_embeddings
        self.lm_head = Linear(self.embed if tied else t.pop("lm_head.weight"), None, shared=tied)
        self.layers: list[LayerWeights] = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            att = [t.pop(f"{p}self_attn.{m}.weight") for m in ("q_proj", "k_proj", "v_proj")]
            mlp = [t.pop(f"{p}mlp.{m}.weight") for m in ("gate_proj", "up_proj")]

            def bias(*modules: str, i: int = i) -> torch.Tensor | None:
                """Concatenated biases of `modules` (all or none have one, per the spec)."""
                if modules[0] not in spec.bias_modules:
                    return None
                return torch.cat([t[f"{module_path(i, m)}.bias"] for m in modules])

            self.layers.append(
                LayerWeights(
                    input_norm=t[f"{p}input_layernorm.weight"],
                    qkv=Linear(torch.cat(att), bias("q_proj", "k_proj", "v_proj")),
                    o=Linear(t.pop(f"{p}self_attn.o_proj.weight"), bias("o_proj")),
                    post_norm=t[f"{p}post_attention_layernorm.weight"],
                    gate_up=Linear(torch.cat(mlp), bias("gate_proj", "up_proj")),
                    down=Linear(t.pop(f"{p}mlp.down_proj.weight"), bias("down_proj")),
                )
            )
        self.rotary = Rotary(
            spec.head_dim,
            max_positions,
            spec.rope_theta,
            spec.rope_scaling,
            self.embed.dtype,
            self.embed.device,
        )
        cache = kv_pages.view(
            kv_pages.shape[0], spec.num_layers, 2, block_size, spec.num_kv_heads, spec.head_dim
        )
        self.k_caches = [cache[:, i, 0] for i in range(spec.num_layers)]
        self.v_caches = [cache[:, i, 1] for i in range(spec.num_layers)]
        self.scale = spec.head_dim**-0.5
        # Backends: the torch paths run everywhere; the Triton kernels are imported only when
        # chosen (they need CUDA, or TRITON_INTERPRET=1 on the CPU).
        self.lora_apply, self.write_kv, self.attention = lora_apply_torch, write_kv, paged_attention
        if lora_backend == "triton":
            from loraplex.kernels.lora_triton import lora_apply_triton

            self.lora_apply = lora_apply_triton
        elif lora_backend == "cpu":
            from loraplex.kernels.lora_cpu import lora_apply_cpu

            self.lora_apply = lora_apply_cpu
        # rope: None = the torch path (new q, k); else rotates q and k in place in the qkv rows
        self.rms_norm, self.add_rms_norm, self.rope = rms_norm, add_rms_norm, None
        if attention_backend == "triton":
            from loraplex.kernels.attention_triton import paged_attention_triton, write_kv_triton

            self.write_kv, self.attention = write_kv_triton, paged_attention_triton
        elif attention_backend == "cpu":
            # The CPU backend also takes RMSNorm and rotary: their torch ops cost more in op
            # overheads than in arithmetic at decode sizes (kernels/norm_rope_cpu.c).
            from loraplex.kernels.attention_cpu import paged_attention_cpu
            from loraplex.kernels.norm_rope_cpu import add_rms_norm_cpu, rms_norm_cpu, rotary_cpu

            self.attention = paged_attention_cpu
            self.rms_norm, self.add_rms_norm, self.rope = rms_norm_cpu, add_rms_norm_cpu, rotary_cpu

    @torch.inference_mode()
    def forward(self, meta: ForwardMeta) -> torch.Tensor:
        """Run all layers for the batch's T tokens; return logits [S, vocab] (float32) of the
        sampled rows. Writes the new tokens' K/V into their pages."""
        spec, eps, layers = self.spec, self.spec.rms_norm_eps, self.layers
        q_dim, kv_dim, inter = spec.num_heads * spec.head_dim, spec.kv_dim, spec.intermediate_size
        lora = meta.lora if meta.lora.has_lora else None
        if self.rope is None:
            cos, sin = self.rotary.tables(meta.positions)
        elif len(meta.positions) and int(meta.positions.max()) >= self.rotary.cos.shape[0]:
            raise ValueError(f"positions beyond the {self.rotary.cos.shape[0]} rotary rows")
        h = self.embed[meta.input_ids]  # [T, hidden]: the residual stream, updated in place
        x = self.rms_norm(h, layers[0].input_norm, eps)
        for i, w in enumerate(layers):
            qkv = w.qkv(x)  # [T, q_dim + 2 kv_dim]
            if lora:
                self.lora_apply(x, qkv, i, "qkv", lora)
            q = qkv[:, :q_dim].view(-1, spec.num_heads, spec.head_dim)
            k = qkv[:, q_dim : q_dim + kv_dim].view(-1, spec.num_kv_heads, spec.head_dim)
            v = qkv[:, q_dim + kv_dim :].view(-1, spec.num_kv_heads, spec.head_dim)
            if self.rope is None:
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            else:  # q and k lead each qkv row: rotated in place
                heads = spec.num_heads + spec.num_kv_heads
                self.rope(
                    qkv, meta.positions, self.rotary.cos, self.rotary.sin, heads, spec.head_dim
                )
            self.write_kv(self.k_caches[i], self.v_caches[i], k, v, meta.attn)
            o = self.attention(q, self.k_caches[i], self.v_caches[i], meta.attn, self.scale)
            o = o.reshape(-1, q_dim)
            attn_out = w.o(o)
            if lora:
                self.lora_apply(o, attn_out, i, "o", lora)
            x = self.add_rms_norm(h, attn_out, w.post_norm, eps)  # h += attn_out
            gu = w.gate_up(x)  # [T, 2 inter]
            if lora:
                self.lora_apply(x, gu, i, "gate_up", lora)
            a = F.silu(gu[:, :inter]) * gu[:, inter:]
            mlp_out = w.down(a)
            if lora:
                self.lora_apply(a, mlp_out, i, "down", lora)
            if i + 1 < len(layers):
                x = self.add_rms_norm(h, mlp_out, layers[i + 1].input_norm, eps)  # h += mlp_out
            else:
                h += mlp_out
        h = self.rms_norm(h[meta.sample_rows], self.norm, eps)
        return self.lm_head(h).float()

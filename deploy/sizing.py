"""Pool sizing from the engine's own accounting: page size, pages per adapter, KV pages per
sequence, pages a fine-tuning job reserves, and what a pool of a given size holds.

    .venv/bin/python deploy/sizing.py              # Llama-3.1-8B in bfloat16 (docs/deploy.md)
    .venv/bin/python deploy/sizing.py --model /models/my-llama --pool-gib 20 \
        --adapter 8:q_proj,v_proj --finetune 8:q_proj,v_proj:256

The formulas are the engine's (docs/deploy.md, Sizing):
- page bytes = num_layers x 2 x block_size x kv_dim x dtype bytes (engine/engine.py);
- an adapter takes ceil(rank x sum over targets of (in + out) x num_layers / page elements)
  pages (kernels/lora.py lora_layout, engine/adapters.py);
- a sequence of T tokens takes ceil(T / block_size) KV pages (memory/kv_cache.py);
- a fine-tuning job reserves 16 bytes per LoRA parameter (float32 weights, gradients, AdamW's two
  moments) plus the activations of its largest micro-batch (engine/train_memory.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# Llama-3.1-8B's config.json, the fields the engine reads (public architecture numbers).
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1 << 30
MIB = 1 << 20


def load_spec(model: str | None):
    from loraplex.engine.loader import load_model_spec

    if model is not None:
        return load_model_spec(model), Path(model).name
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
        return load_model_spec(d), "Llama-3.1-8B"


def page_bytes(spec, block_size: int, dtype: str) -> int:
    return page_elems(spec, block_size) * DTYPE_BYTES[dtype]


def page_elems(spec, block_size: int) -> int:
    return spec.num_layers * 2 * block_size * spec.kv_dim


def adapter_pages(spec, rank: int, targets, block_size: int) -> int:
    from loraplex.engine.loader import MODULES
    from loraplex.kernels.lora import lora_layout

    dims = {m: spec.module_dims(m) for m in MODULES}
    elems = lora_layout(rank, tuple(targets), spec.num_layers, dims).num_elems
    return -(-elems // page_elems(spec, block_size))


def kv_pages(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def weight_bytes(spec, dtype: str) -> int:
    """The checkpoint's linear, embedding and norm weights (biases left out)."""
    h, q, kv, inter = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    embed = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    return (spec.num_layers * per_layer + embed + h) * DTYPE_BYTES[dtype]


def _lora(text: str) -> tuple[int, tuple[str, ...]]:
    rank, _, targets = text.partition(":")
    return int(rank), tuple(targets.split(","))


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def report(args) -> str:
    from loraplex.engine.train_memory import adapter_params, pages_needed

    spec, name = load_spec(args.model)
    pb = page_bytes(spec, args.block_size, args.dtype)
    pool_pages = int(args.pool_gib * GIB) // pb
    out = [
        f"model {name}: {spec.num_layers} layers, hidden {spec.hidden_size}, "
        f"{spec.num_heads} heads / {spec.num_kv_heads} KV heads x {spec.head_dim}, "
        f"intermediate {spec.intermediate_size}, vocab {spec.vocab_size}; {args.dtype}",
        f"weights: {_gib(weight_bytes(spec, args.dtype))} (outside the pool)",
        f"page: {spec.num_layers} layers x 2 x {args.block_size} tokens x {spec.kv_dim} kv_dim "
        f"x {DTYPE_BYTES[args.dtype]} B = {pb:,} B ({_gib(pb)}), {args.block_size} tokens of KV",
        f"pool: --pool-bytes {int(args.pool_gib * GIB):,} ({args.pool_gib:g} GiB) = "
        f"{pool_pages:,} pages",
    ]
    seq = kv_pages(args.seq_tokens, args.block_size)
    out.append(
        f"KV: a {args.seq_tokens}-token sequence takes {seq} pages ({_gib(seq * pb)}); "
        f"the whole pool holds {pool_pages // seq} such sequences"
    )
    for rank, targets in args.adapter:
        n = adapter_pages(spec, rank, targets, args.block_size)
        params = adapter_params(spec, rank, targets)
        out.append(
            f"adapter rank {rank} on {','.join(targets)}: {params:,} parameters, {n} pages "
            f"({_gib(n * pb)}); 100 resident take {100 * n} pages "
            f"({100 * n / pool_pages:.1%} of the pool)"
        )
    for rank, targets, tokens in args.finetune:
        state, act = pages_needed(spec, rank, targets, tokens, DTYPE_BYTES[args.dtype], pb)
        params = adapter_params(spec, rank, targets)
        out.append(
            f"fine-tuning rank {rank} on {','.join(targets)}, micro-batch {tokens} tokens: "
            f"state 16 B x {params:,} = {state} pages, activations {act} pages; "
            f"{state + act} pages ({_gib((state + act) * pb)}, "
            f"{(state + act) / pool_pages:.1%} of the pool)"
        )
    if args.adapter and args.finetune:
        a = adapter_pages(spec, *args.adapter[0], args.block_size)
        rank, targets, tokens = args.finetune[0]
        state, act = pages_needed(spec, rank, targets, tokens, DTYPE_BYTES[args.dtype], pb)
        left = pool_pages - 100 * a - state - act
        out.append(
            f"with 100 resident adapters of the first kind and one fine-tuning job: {left:,} "
            f"pages left for KV = {left // seq} sequences of {args.seq_tokens} tokens, "
            f"{left * args.block_size:,} tokens in all"
        )
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default=None, help="checkpoint dir (config.json); default Llama-3.1-8B"
    )
    p.add_argument("--dtype", choices=DTYPE_BYTES, default="bfloat16")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--pool-gib", type=float, default=48.0, help="the pool's size (--pool-bytes)")
    p.add_argument("--seq-tokens", type=int, default=4096, help="tokens of one sequence")
    p.add_argument(
        "--adapter", type=_lora, action="append", metavar="RANK:TARGETS",
        help="an adapter shape, repeatable (default 16:q_proj,k_proj,v_proj,o_proj and 64 on all)",
    )  # fmt: skip
    p.add_argument(
        "--finetune", action="append", metavar="RANK:TARGETS:TOKENS",
        type=lambda s: (*_lora(s.rsplit(":", 1)[0]), int(s.rsplit(":", 1)[1])),
        help="a fine-tuning job (default 16:q_proj,k_proj,v_proj,o_proj:512)",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp = ("gate_proj", "up_proj", "down_proj")
    args.adapter = args.adapter or [(16, attn), (64, attn + mlp)]
    args.finetune = args.finetune or [(16, attn, 512)]
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

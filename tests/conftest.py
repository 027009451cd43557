"""Shared pytest setup: the `gpu` marker skip and session-scoped tiny models with PEFT adapters.

Each model fixture is a dict:
    model_dir: str                  HF checkpoint directory (float32 safetensors)
    adapters:  {name: adapter_dir}  real PEFT LoRA adapter directories for that model
    specs:     {name: dict(rank, alpha, target_modules, use_rslora, scale)}
Built once per test session under `tmp_path_factory`; treat the directories as read-only.
The HF oracle for them lives in `fixtures.py` (`hf_reference_greedy`, `hf_reference_logits`).
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's interpreter; it must be chosen before anything
# imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tiny test models gain nothing from a second thread, and torch's worker threads slow down
# badly when other processes compete for the cores: one thread keeps suite times stable.
torch.set_num_threads(1)

# transformers/peft are imported lazily (inside the fixtures): importing them costs seconds,
# which test files that never use these fixtures should not pay.
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTN_MODULES + MLP_MODULES

# name -> (rank, alpha, target_modules, use_rslora); ranks 1..64, attention-only, MLP-only, all.
ADAPTER_SPECS = {
    "r1_qv": (1, 2, ("q_proj", "v_proj"), False),
    "r2_mlp": (2, 4, MLP_MODULES, False),
    "r4_attn": (4, 8, ATTN_MODULES, False),
    "r8_all": (8, 16, ALL_MODULES, False),
    "r16_all_rslora": (16, 8, ALL_MODULES, True),
    "r32_attn": (32, 64, ATTN_MODULES, False),
    "r64_all": (64, 32, ALL_MODULES, False),
}

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@pytest.fixture(autouse=True)
def _no_frozen_objects_left():
    """`loraplex serve` run in-process (server/heap.py) freezes every live object out of the
    garbage collector; the tests after it must not inherit that (their garbage would stay)."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _build(root, family: str, seed: int, specs: dict, **model_kwargs) -> dict:
    from fixtures import lora_scale, make_peft_adapter, make_tiny_model

    model_dir = make_tiny_model(root / "model", family, seed=seed, **model_kwargs)
    adapters, out_specs = {}, {}
    for i, (name, (rank, alpha, targets, rslora)) in enumerate(specs.items()):
        adapters[name] = make_peft_adapter(
            model_dir,
            root / name,
            rank=rank,
            alpha=alpha,
            target_modules=targets,
            seed=seed * 1000 + i,
            use_rslora=rslora,
        )
        out_specs[name] = dict(
            rank=rank,
            alpha=alpha,
            target_modules=tuple(targets),
            use_rslora=rslora,
            scale=lora_scale(rank, alpha, rslora),
        )
    return dict(model_dir=model_dir, adapters=adapters, specs=out_specs)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> dict:
    """Tiny Llama (vocab 256, hidden 64, 2 layers, 4 query / 2 KV heads, untied, no bias)."""
    return _build(tmp_path_factory.mktemp("tiny_llama"), "llama", 1, ADAPTER_SPECS)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> dict:
    """Tiny Qwen2 (same shape as tiny_llama, q/k/v bias, tie_word_embeddings=True)."""
    return _build(
        tmp_path_factory.mktemp("tiny_qwen2"),
        "qwen2",
        2,
        ADAPTER_SPECS,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def tiny_llama3_rope(tmp_path_factory) -> dict:
    """Tiny Llama with llama3 rope scaling (factor 8, original max 32), max positions 256."""
    return _build(
        tmp_path_factory.mktemp("tiny_llama3_rope"),
        "llama",
        3,
        {"r8_all": ADAPTER_SPECS["r8_all"]},
        rope_scaling=LLAMA3_ROPE_SCALING,
        max_position_embeddings=256,
    )

"""`EngineConfig`: every engine option in one frozen, validated dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")
# auto: triton on CUDA; on the CPU the C kernels (LoRA, decode attention) for float32/bfloat16,
# torch otherwise.
LORA_BACKENDS = ("auto", "torch", "triton", "cpu")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "cpu")
CPU_KERNEL_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """Engine sizing and placement.

    model: checkpoint directory, or None for the embedded demo model.
    pool_bytes: size of the one unified page pool (KV cache + adapters); None = from free memory.
    block_size: tokens per KV page; a page holds K and V of `block_size` tokens for all layers
        (see memory/pool.py), and adapters take whole pages of the same size.
    max_model_len: longest prompt + output; None = the checkpoint's max_position_embeddings
        capped at 8192.
    starvation_steps: a waiting request older than this many steps is admitted before any
        younger one (cold adapters are not starved by hot ones).
    lora_backend: "torch", "triton", "cpu" (the C kernel of kernels/lora_cpu.py: CPU, float32
        or bfloat16), or "auto" (triton on CUDA, cpu on the CPU where its dtype allows, else
        torch). The engine falls back from auto's "cpu" to "torch", with a warning, only when
        the kernel cannot be built here (no C compiler).
    attention_backend: "torch", "triton", "cpu" (decode queries through the C kernel of
        kernels/attention_cpu.py, prefill chunks through torch; RMSNorm and rotary through
        kernels/norm_rope_cpu.py: CPU, float32 or bfloat16), or
        "auto" (triton on CUDA, cpu on the CPU where its dtype allows, else torch; falls back
        to torch, with a warning, when the kernel cannot be built or the model's attention
        shape is not one it handles).
    finetune_*: co-served fine-tuning (engine/training_jobs.py): the most padded tokens of a
        training micro-batch; the inter-token latency target of running requests (ms; each
        busy step trains while it stays under it; None = use `finetune_step_share`: over busy
        steps, training time is that share of inference time, a debt carried between steps);
        idle steps train freely;
        how many jobs hold memory and train at once (the rest queue).
    """

    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    pool_bytes: int | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_lora_rank: int = 64
    max_model_len: int | None = None
    starvation_steps: int = 32
    lora_backend: str = "auto"
    attention_backend: str = "auto"
    seed: int = 0
    finetune_max_tokens_per_step: int = 512
    finetune_itl_slo_ms: float | None = None
    finetune_step_share: float = 0.25
    finetune_max_running_jobs: int = 1

    def __post_init__(self) -> None:
        if self.model is not None and not os.path.isdir(self.model):
            raise ValueError(f"model directory {self.model!r} does not exist")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.pool_bytes is not None and self.pool_bytes <= 0:
            raise ValueError(f"pool_bytes must be positive, got {self.pool_bytes}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_lora_rank", "starvation_steps",
                     "finetune_max_tokens_per_step", "finetune_max_running_jobs"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.finetune_itl_slo_ms is not None and not self.finetune_itl_slo_ms > 0:
            raise ValueError(f"finetune_itl_slo_ms must be > 0, got {self.finetune_itl_slo_ms}")
        if not 0 < self.finetune_step_share <= 10:
            raise ValueError(
                f"finetune_step_share must be in (0, 10], got {self.finetune_step_share}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        for name, allowed in (
            ("lora_backend", LORA_BACKENDS),
            ("attention_backend", ATTENTION_BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("lora_backend", "attention_backend"):
            if getattr(self, name) == "cpu" and (
                self.device != "cpu" or self.dtype not in CPU_KERNEL_DTYPES
            ):
                raise ValueError(
                    f"{name} 'cpu' needs device 'cpu' and dtype in {CPU_KERNEL_DTYPES}, got "
                    f"{self.device!r} / {self.dtype!r}"
                )

    def backend(self, name: str) -> str:
        """The configured backend of `lora` or `attention` ("torch", "triton", "cpu"), auto
        resolved by device and dtype (the engine then checks that a "cpu" kernel builds)."""
        value = getattr(self, f"{name}_backend")
        if value != "auto":
            return value
        if self.device.startswith("cuda"):
            return "triton"
        if self.dtype in CPU_KERNEL_DTYPES:
            return "cpu"
        return "torch"

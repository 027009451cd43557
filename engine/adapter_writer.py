"""Write a LoRA adapter as a PEFT directory: `adapter_config.json` and
`adapter_model.safetensors` (float32, PEFT's key names, the scaling not folded into the
weights), which `peft`, vLLM, LoRAX and our own loader read. Written into a temporary sibling
and renamed into place, so a crash never leaves half an adapter."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraplex.engine.loader import MODULES, module_path


def peft_config(
    rank: int, alpha: float, target_modules, use_rslora: bool, base_model_name_or_path: str | None
) -> dict:
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "target_modules": [m for m in MODULES if m in set(target_modules)],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": use_rslora,
    }


def write_peft_adapter(
    out_dir,
    A: dict[tuple[int, str], torch.Tensor],
    B: dict[tuple[int, str], torch.Tensor],
    *,
    rank: int,
    alpha: float,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
) -> str:
    """`A[(layer, module)]` [rank, in], `B[...]` [out, rank] -> a PEFT directory at `out_dir`
    (replaced if it exists). Returns `out_dir` as a string."""
    tensors = {}
    for (layer, m), a in sorted(A.items()):
        prefix = f"base_model.model.{module_path(layer, m)}"
        tensors[f"{prefix}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B[layer, m].detach().float().cpu().contiguous()
    targets = sorted({m for _, m in A}, key=MODULES.index)
    config = peft_config(rank, alpha, targets, use_rslora, base_model_name_or_path)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (tmp / "adapter_config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n"
        )
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)

"""PEFT adapter directory -> validated `AdapterWeights`, or `AdapterError` with the reason.

`load_adapter` either returns a fully validated adapter or raises `AdapterError`
("adapter '<name>': <reason>") and nothing is kept. Supported: plain LoRA on any subset of
`MODULES`, the same modules in every layer, one rank, optional rsLoRA. Only safetensors is read;
pickle weights are refused, never loaded. Every tensor's shape is checked before data is read.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import safe_open

from loraplex.engine.loader import (
    _PICKLE_SUFFIXES,
    MODULES,
    ModelSpec,
    _names,
    _read_json,
    module_path,
)

logger = logging.getLogger(__name__)


class AdapterError(ValueError):
    """A rejected adapter. The message always starts with: adapter '<name>': <reason>."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"adapter '{name}': {reason}")
        self.adapter_name = name
        self.reason = reason


@dataclass
class AdapterWeights:
    """A validated LoRA adapter: `A[(layer, module)]` is [rank, in], `B[...]` is [out, rank].

    Tensors are float32, CPU, contiguous; every layer has every module of `target_modules`.
    The update of one module is `scale * (x @ A.T) @ B.T`.
    """

    name: str
    path: str
    rank: int
    alpha: float
    use_rslora: bool
    scale: float
    target_modules: tuple[str, ...]
    A: dict[tuple[int, str], torch.Tensor]
    B: dict[tuple[int, str], torch.Tensor]

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.A.values()) + sum(t.numel() for t in self.B.values())


_KEY_RE = re.compile(
    r"^base_model\.model\.(?P<path>.+?)\.(?P<kind>lora_A|lora_B)(?:\.default)?\.weight$"
)
_OTHER_LORA_RE = re.compile(r"^base_model\.model\.(?P<path>.+?)\.(?:lora_\w+|base_layer)\b")
_LAYER_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\.(?P<mod>\w+)$")
_UNSUPPORTED_FLAGS = (
    "lora_bias", "layer_replication", "trainable_token_indices", "alora_invocation_tokens",
    "target_parameters", "use_qalora", "use_bdlora",
)  # fmt: skip


def _ranges(xs) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    xs, parts, i = sorted(xs), [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(parts)


def _config_modules(cfg: dict, spec: ModelSpec, fail) -> set[str] | None:
    """Modules named by `target_modules` (None = not constrained: absent or "all-linear")."""
    tm = cfg.get("target_modules")
    if tm is None or tm == "all-linear":
        return None
    if isinstance(tm, str):  # peft: re.fullmatch against full module names
        try:
            pattern = re.compile(tm)
        except re.error as e:
            fail(f"target_modules regex {tm!r} is invalid: {e}")
        others = ("lm_head", "model.embed_tokens", "model.norm")
        bad = [n for n in others if pattern.fullmatch(n)]
        if bad:
            fail(f"target module {bad[0]!r} is not supported (supported: {', '.join(MODULES)})")
        names = [(m, module_path(i, m)) for i in range(spec.num_layers) for m in MODULES]
        found = {m for m, n in names if pattern.fullmatch(n)}
        if not found:
            fail(f"target_modules regex {tm!r} matches none of {', '.join(MODULES)}")
        return found
    if not isinstance(tm, list) or not all(isinstance(x, str) for x in tm):
        fail(f"target_modules must be a list of names or a regex string, got {tm!r}")
    for entry in tm:
        if entry.rsplit(".", 1)[-1] not in MODULES:
            fail(f"target module {entry!r} is not supported (supported: {', '.join(MODULES)})")
        m = _LAYER_RE.match(entry)
        if m and int(m["layer"]) >= spec.num_layers:
            fail(
                f"target module {entry!r} names layer {m['layer']} >= num_layers={spec.num_layers}"
            )
    return {entry.rsplit(".", 1)[-1] for entry in tm}


def _check_config(cfg: dict, spec: ModelSpec, max_lora_rank: int, fail) -> tuple[int, float, bool]:
    if cfg.get("peft_type") != "LORA":
        fail(f"peft_type {cfg.get('peft_type')!r} is not supported (only 'LORA')")
    if cfg.get("use_dora"):
        fail("DoRA (use_dora=true) is not supported")
    if cfg.get("modules_to_save"):
        fail(f"modules_to_save {cfg['modules_to_save']!r} is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            fail(f"{key} (per-module rank/alpha) is not supported: {cfg[key]!r}")
    for key in _UNSUPPORTED_FLAGS:
        if cfg.get(key):
            fail(f"{key}={cfg[key]!r} is not supported")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        fail(f"bias={cfg.get('bias')!r} is not a known bias mode")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int):
        fail(f"rank r must be an integer, got {r!r}")
    if not 1 <= r <= max_lora_rank:
        fail(f"rank {r} is out of range: must be between 1 and max_lora_rank={max_lora_rank}")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        fail(f"lora_alpha must be a finite number, got {alpha!r}")
    ltt = cfg.get("layers_to_transform")
    if ltt is not None:
        layers = {ltt} if isinstance(ltt, int) else ltt
        if not isinstance(layers, (list, set)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers
        ):
            fail(f"layers_to_transform must be an int or a list of ints, got {ltt!r}")
        layers = set(layers)
        bad = sorted(i for i in layers if not 0 <= i < spec.num_layers)
        if bad:
            fail(f"layers_to_transform has layers {bad} outside 0..{spec.num_layers - 1}")
        if layers != set(range(spec.num_layers)):
            fail(
                f"partial layer coverage is not supported: layers_to_transform covers layers "
                f"{_ranges(layers)} but not {_ranges(set(range(spec.num_layers)) - layers)}"
            )
    return r, float(alpha), bool(cfg.get("use_rslora", False))


def load_adapter(name: str, adapter_dir, spec: ModelSpec, max_lora_rank: int) -> AdapterWeights:
    """Read and validate a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).

    Raises `AdapterError` for anything it cannot serve exactly (see the module docstring);
    shapes are checked from the header before any tensor data is read.
    """

    def fail(reason: str) -> NoReturn:
        raise AdapterError(name, reason)

    d = Path(adapter_dir)
    if not d.is_dir():
        fail(f"directory not found: {d}")
    weights = d / "adapter_model.safetensors"
    if not (d / "adapter_config.json").is_file():
        fail(f"adapter_config.json not found in {d}")
    if not weights.is_file():
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            fail(f"only safetensors weights are accepted; found {pickles} (pickle is never loaded)")
        fail(f"adapter_model.safetensors not found in {d}")
    try:
        cfg = _read_json(d / "adapter_config.json", "adapter_config.json")
    except ValueError as e:
        fail(str(e))
    rank, alpha, use_rslora = _check_config(cfg, spec, max_lora_rank, fail)
    cfg_modules = _config_modules(cfg, spec, fail)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        fail(f"adapter_model.safetensors is not a valid safetensors file: {e}")

    keys: dict[tuple[int, str], dict[str, str]] = {}
    unknown = []
    for key in sorted(shapes):
        m = _KEY_RE.match(key)
        lm = _LAYER_RE.match(m["path"]) if m else None
        if key.endswith(".bias") and ".lora_" not in key and cfg.get("bias", "none") != "none":
            fail(f"bias={cfg['bias']!r} with bias tensors ({key}) is not supported")
        if not lm:
            other = m or _OTHER_LORA_RE.match(key)
            path = other["path"] if other else ""
            mod = _LAYER_RE.match(path)
            if other and not (mod and mod["mod"] in MODULES):
                fail(f"target module {path!r} is not supported (supported: {', '.join(MODULES)})")
            unknown.append(key)
            continue
        layer, module = int(lm["layer"]), lm["mod"]
        if module not in MODULES or module_path(layer, module) != m["path"]:
            fail(f"target module {m['path']!r} is not supported (supported: {', '.join(MODULES)})")
        if layer >= spec.num_layers:
            fail(f"tensor {key} is for layer {layer} >= num_layers={spec.num_layers}")
        slot = keys.setdefault((layer, module), {})
        if m["kind"] in slot:
            fail(f"duplicate tensors for {m['path']}.{m['kind']}")
        slot[m["kind"]] = key
    if unknown:
        fail(f"unknown tensor names: {_names(unknown)}")
    if not keys:
        fail("adapter_model.safetensors contains no LoRA tensors")
    for (layer, module), slot in sorted(keys.items()):
        if len(slot) != 2:
            fail(f"{module_path(layer, module)} has {next(iter(slot))} but not its pair")
    present = {m for _, m in keys}
    targets = tuple(m for m in MODULES if m in present)
    for module in targets:
        have = {i for i, m in keys if m == module}
        if len(have) != spec.num_layers:
            missing = set(range(spec.num_layers)) - have
            fail(
                f"partial layer coverage is not supported: {module} has LoRA tensors for layers "
                f"{_ranges(have)} but not {_ranges(missing)}"
            )
    if cfg_modules is not None and cfg_modules != present:
        fail(
            f"target_modules in adapter_config.json ({', '.join(sorted(cfg_modules))}) do not "
            f"match the tensors ({', '.join(targets)})"
        )
    for (_, module), slot in keys.items():
        din, dout = spec.module_dims(module)
        for kind, want in (("lora_A", (rank, din)), ("lora_B", (dout, rank))):
            got = shapes[slot[kind]]
            if got != want:
                fail(f"tensor {slot[kind]} has shape {list(got)}, expected {list(want)}")

    A: dict[tuple[int, str], torch.Tensor] = {}
    B: dict[tuple[int, str], torch.Tensor] = {}
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        for pos, slot in sorted(keys.items()):
            for kind, store in (("lora_A", A), ("lora_B", B)):
                t = f.get_tensor(slot[kind])
                if not t.is_floating_point():
                    fail(f"tensor {slot[kind]} has non-float dtype {t.dtype}")
                t = t.to(torch.float32).contiguous()
                if not torch.isfinite(t).all():
                    fail(f"tensor {slot[kind]} contains NaN or Inf")
                store[pos] = t
    scale = alpha / (math.sqrt(rank) if use_rslora else rank)
    # DEBUG: registering logs its own line (or one summary line for an --adapter-dir)
    logger.debug("adapter '%s': rank %d, scale %.4g, modules %s", name, rank, scale, targets)
    return AdapterWeights(name, str(d), rank, alpha, use_rslora, scale, targets, A, B)

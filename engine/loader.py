"""Loading: HF `config.json` -> `ModelSpec`, safetensors checkpoint -> tensors, PEFT dir -> adapter.

Contracts:
- Only safetensors is ever read; pickle files (`.bin`, `.pt`, `.pth`) are refused, never loaded.
- Every tensor's shape is checked (from the safetensors header) before any data is read.
- `load_adapter` either returns a fully validated `AdapterWeights` or raises `AdapterError`
  ("adapter '<name>': <reason>") and nothing is kept. Supported: plain LoRA on any subset of
  `MODULES`, the same modules in every layer, one rank, optional rsLoRA.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN_MODULES = frozenset(MODULES[:4])
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def module_path(layer: int, module: str) -> str:
    """HF module name, e.g. `module_path(0, "q_proj") == "model.layers.0.self_attn.q_proj"`."""
    parent = "self_attn" if module in _ATTN_MODULES else "mlp"
    return f"model.layers.{layer}.{parent}.{module}"


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs from a model's `config.json` (see `load_model_spec`).

    `rope_scaling` is None for plain RoPE, else a dict with at least "rope_type" (e.g. "llama3").
    `mlp_bias` (Llama only) is an addition to the field list of the design; see `bias_modules`.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    attention_bias: bool
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    sliding_window: int | None  # recorded only
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def bias_modules(self) -> tuple[str, ...]:
        """Modules whose base Linear has a bias: Qwen2 q/k/v; Llama q/k/v/o with attention_bias."""
        if self.architecture == "Qwen2ForCausalLM":
            return ("q_proj", "k_proj", "v_proj")
        attn = MODULES[:4] if self.attention_bias else ()
        return attn + (MODULES[4:] if self.mlp_bias else ())

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one of `MODULES`."""
        h, i = self.hidden_size, self.intermediate_size
        dims = {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        if module not in dims:
            raise ValueError(f"unknown module {module!r}; expected one of {MODULES}")
        return dims[module]


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object")
    return data


def _pos_int(cfg: dict, key: str, default: int | None = None) -> int:
    v = cfg.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"config.json: {key!r} must be a positive integer, got {v!r}")
    return v


def _ids(v) -> tuple[int, ...]:
    if v is None:
        return ()
    return (int(v),) if isinstance(v, int) else tuple(int(x) for x in v)


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """Read transformers-5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        if all(isinstance(v, dict) for v in params.values()):
            raise ValueError("config.json: per-layer-type rope_parameters are not supported")
        scaling = dict(params)
        theta = scaling.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = dict(cfg.get("rope_scaling") or {})
    legacy = scaling.pop("type", None)
    rope_type = scaling.get("rope_type") or legacy or "default"
    scaling["rope_type"] = rope_type
    return float(theta), (None if rope_type == "default" else scaling)


def load_model_spec(model_dir) -> ModelSpec:
    """Read `config.json` (and `generation_config.json`, if present, for EOS/BOS ids).

    Raises FileNotFoundError for a missing directory or config, ValueError for an unsupported
    architecture or inconsistent values. `eos_token_ids` = generation config's ids, then the
    config's (deduplicated, order kept).
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    cfg = _read_json(d / "config.json", "model config")
    gen_path = d / "generation_config.json"
    gen = _read_json(gen_path, "generation config") if gen_path.is_file() else {}
    archs = cfg.get("architectures") or [_MODEL_TYPES.get(cfg.get("model_type"), None)]
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        found = arch or f"model_type {cfg.get('model_type')!r}"
        raise ValueError(f"unsupported architecture {found}; supported: {SUPPORTED_ARCHITECTURES}")
    hidden, heads = _pos_int(cfg, "hidden_size"), _pos_int(cfg, "num_attention_heads")
    kv_heads = _pos_int(cfg, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(f"config.json: num_attention_heads={heads} not a multiple of {kv_heads=}")
    if cfg.get("head_dim") is None and hidden % heads:
        raise ValueError(f"config.json: hidden_size={hidden} not divisible by {heads} heads")
    head_dim = _pos_int(cfg, "head_dim", hidden // heads)
    theta, scaling = _rope(cfg)
    qwen2, llama = arch == "Qwen2ForCausalLM", arch == "LlamaForCausalLM"
    sliding = cfg.get("sliding_window")
    if qwen2 and not cfg.get("use_sliding_window", False):
        sliding = None
    bos = cfg.get("bos_token_id", gen.get("bos_token_id"))
    return ModelSpec(
        architecture=arch,
        vocab_size=_pos_int(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_pos_int(cfg, "intermediate_size"),
        num_layers=_pos_int(cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_pos_int(cfg, "max_position_embeddings", 2048),
        attention_bias=qwen2 or (llama and bool(cfg.get("attention_bias", False))),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=tuple(
            dict.fromkeys(_ids(gen.get("eos_token_id")) + _ids(cfg.get("eos_token_id")))
        ),
        bos_token_id=None if bos is None else int(bos),
        sliding_window=None if sliding is None else int(sliding),
        mlp_bias=llama and bool(cfg.get("mlp_bias", False)),
    )


def expected_checkpoint_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for every tensor the engine needs (lm_head only when untied)."""
    v, h = spec.vocab_size, spec.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    biased = set(spec.bias_modules)
    for layer in range(spec.num_layers):
        shapes[f"model.layers.{layer}.input_layernorm.weight"] = (h,)
        shapes[f"model.layers.{layer}.post_attention_layernorm.weight"] = (h,)
        for m in MODULES:
            din, dout = spec.module_dims(m)
            shapes[f"{module_path(layer, m)}.weight"] = (dout, din)
            if m in biased:
                shapes[f"{module_path(layer, m)}.bias"] = (dout,)
    shapes["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _checkpoint_files(d: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it (single file or sharded with an index)."""
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    if index.is_file():
        weight_map = _read_json(index, "checkpoint index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing 'weight_map'")
        root = d.resolve()
        out = {name: (d / fn).resolve() for name, fn in weight_map.items()}
        for path in set(out.values()):
            if path.parent != root or path.suffix != ".safetensors" or not path.is_file():
                raise ValueError(f"{index}: shard {path.name} missing or not a safetensors file")
        return out
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{d}: only safetensors checkpoints are supported; found pickle files {pickles} "
            "(they are never loaded; convert them to safetensors)"
        )
    raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json")


def _names(names: list[str], limit: int = 8) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_checkpoint(
    model_dir, spec: ModelSpec, dtype: torch.dtype, device
) -> dict[str, torch.Tensor]:
    """Load every tensor of `expected_checkpoint_shapes(spec)`, keyed by its HF name.

    All shapes are checked before any data is read. Raises ValueError listing missing,
    mismatched or unexpected tensors (a tied checkpoint may still store `lm_head.weight`;
    it is skipped). Tensors are converted to `dtype` and moved to `device`.
    """
    d = Path(model_dir)
    where = _checkpoint_files(d)
    expected = expected_checkpoint_shapes(spec)
    missing = [n for n in expected if n not in where]
    ignorable = ("lm_head.weight",) if spec.tie_word_embeddings else ()
    unexpected = [
        n for n in where if n not in expected and n not in ignorable and "rotary_emb" not in n
    ]
    mismatched = []
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name in where:
            by_file.setdefault(where[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    missing.append(f"{name} (not in {path.name})")
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    mismatched.append(f"{name} {list(shape)} != expected {list(expected[name])}")
    problems = []
    for label, items in (("missing", missing), ("shape mismatch", mismatched)):
        if items:
            problems.append(f"{label}: {_names(items)}")
    if unexpected:
        problems.append(f"unexpected (config does not describe them): {_names(sorted(unexpected))}")
    if problems:
        raise ValueError(f"checkpoint {d} does not match its config: " + "; ".join(problems))
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                out[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    logger.info("loaded %d tensors from %s", len(out), d)
    return out


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
    logger.info("adapter '%s': rank %d, scale %.4g, modules %s", name, rank, scale, targets)
    return AdapterWeights(name, str(d), rank, alpha, use_rslora, scale, targets, A, B)

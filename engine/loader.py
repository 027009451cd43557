"""Loading: HF `config.json` -> `ModelSpec`, safetensors checkpoint -> tensors, PEFT dir -> adapter.

Contracts:
- Only safetensors is ever read; pickle files (`.bin`, `.pt`, `.pth`) are refused, never loaded.
- Every tensor's shape is checked (from the safetensors header) before any data is read.
- PEFT adapters are validated in `engine/adapter_loader.py` (re-exported here).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.kernels.lora import module_dims as lora_module_dims

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
        dims = lora_module_dims(self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size)
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


__all__ = [
    "MODULES",
    "SUPPORTED_ARCHITECTURES",
    "ModelSpec",
    "expected_checkpoint_shapes",
    "load_checkpoint",
    "load_model_spec",
    "module_path",
]

"""`loraplex bench throughput`: offline throughput of the engine, beside HF PEFT.

Workload: N requests of exactly `--prompt-len` random token ids (seeded), request i uses
adapter i % K, greedy, `ignore_eos`, exactly `--output-len` new tokens each. Our engine gets all
N at once with `max_num_seqs = --concurrency` (continuous batching); the PEFT baseline runs
static batches of `--concurrency` requests through `PeftModel.generate(adapter_names=...)` with
all K adapters loaded. Only `generate` is timed (time.perf_counter), after `--warmup` short runs.
Without `--model`, a ~30M-parameter Llama-shaped checkpoint and its adapters are built once
into `<cache>/bench-v1` (cache: $LORAPLEX_CACHE, else ~/.cache/loraplex), atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BENCH_VERSION = "bench-v1"
# ~30M parameters with the demo tokenizer (vocab 2000): 8 x 3.54M + 2 x 1.02M (embed, lm_head).
BENCH_MODEL = dict(
    hidden_size=512, intermediate_size=1792, num_layers=8, num_heads=8, num_kv_heads=4, seed=0
)
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Row:
    system: str  # "loraplex" or "peft"
    workload: str  # "8 adapters (mixed)" or "base only"
    requests: int
    output_tokens: int
    wall_s: float

    @property
    def req_per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--num-requests", type=int, default=64)
    g.add_argument("--num-adapters", type=int, default=8, help="K adapters; 0 = base only")
    g.add_argument("--ranks", default="8,16,32,64", help="ranks, cycled over generated adapters")
    g.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="requests in flight: our max_num_seqs (overrides --max-num-seqs), PEFT batch size",
    )
    g.add_argument("--prompt-len", type=int, default=64)
    g.add_argument("--output-len", type=int, default=64)
    g.add_argument("--baseline", choices=("none", "peft"), default="peft")
    g.add_argument(
        "--also-base",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run our engine base-only on the same workload (mixed/base ratio)",
    )
    g.add_argument("--warmup", type=int, default=1, help="untimed short runs per system")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json-out", default=None, help="write the rows and setup as JSON")


def _atomic_build(target: Path, build) -> None:
    """Run `build(tmp_dir)` and rename tmp_dir to `target`; a concurrent winner's copy is kept."""
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_adapters(root: Path, model_dir: str, ranks: list[int], k: int) -> dict[str, str]:
    """K adapters on all seven modules, ranks cycled, alpha = 2 * rank; cached under `root`."""
    from engine.demo import make_adapter
    from engine.loader import load_model_spec

    spec = load_model_spec(model_dir)
    adapters = {}
    for i in range(k):
        rank = ranks[i % len(ranks)]
        name = f"bench-{i}-r{rank}"
        path = root / name
        _atomic_build(
            path,
            lambda d, rank=rank, i=i: make_adapter(
                d, spec, rank=rank, alpha=2.0 * rank, target_modules=ALL_MODULES, seed=1000 + i
            ),
        )
        adapters[name] = str(path)
    return adapters


def _assets(args, ranks: list[int], tmp: str) -> tuple[str, dict[str, str]]:
    """(model_dir, adapters): --model/--adapter if given, else the cached bench model."""
    from engine.cli import parse_adapters

    if args.model is None:
        from engine.demo import make_checkpoint

        cache = Path(os.environ.get("LORAPLEX_CACHE") or Path.home() / ".cache/loraplex")
        root = cache / BENCH_VERSION
        _atomic_build(root / "model", lambda d: make_checkpoint(d, **BENCH_MODEL))
        model_dir, adapter_root = str(root / "model"), root / "adapters"
    else:
        model_dir, adapter_root = args.model, Path(tmp)
    given = parse_adapters(args.adapter)
    if given:
        return model_dir, dict(list(given.items())[: args.num_adapters])
    return model_dir, _make_adapters(adapter_root, model_dir, ranks, args.num_adapters)


def _pool_bytes(args, spec, adapters: dict[str, str], elem: int) -> int:
    """Enough pages for `concurrency` requests, one max-length request and every adapter."""
    page = spec.num_layers * 2 * args.block_size * spec.kv_dim * elem
    max_len = args.max_model_len or min(spec.max_position_embeddings, 8192)
    per_req = -(-(args.prompt_len + args.output_len) // args.block_size)
    total = (args.concurrency * per_req + -(-max_len // args.block_size)) * page
    for path in adapters.values():
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        mods = cfg.get("target_modules") or ALL_MODULES
        dims = sum(sum(spec.module_dims(m)) for m in mods if m in ALL_MODULES)
        total += (cfg["r"] * dims * spec.num_layers * elem // page + 2) * page
    return 2 * total


def _requests(args, vocab: int, names: list[str]):
    gen = torch.Generator().manual_seed(args.seed)
    low = 4 if vocab > 64 else 0  # skip the special tokens of the demo tokenizer
    prompts = torch.randint(low, vocab, (args.num_requests, args.prompt_len), generator=gen)
    adapters = [names[i % len(names)] for i in range(args.num_requests)] if names else None
    return prompts.tolist(), adapters


def run_ours(llm, prompts, adapters, args, workload: str) -> Row:
    from scheduler.sequence import SamplingParams

    alist = adapters or [None] * len(prompts)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_tokens=min(4, args.output_len), temperature=0.0, ignore_eos=True)
    n = min(args.concurrency, len(prompts))
    for _ in range(args.warmup):
        llm.generate(prompts[:n], warm, alist[:n])
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, alist)
    wall = time.perf_counter() - t0
    return Row("loraplex", workload, len(prompts), sum(len(o.token_ids) for o in outs), wall)


def run_peft(model_dir, adapters: dict[str, str], prompts, names, args, workload: str) -> Row:
    """Static batches of `concurrency` through HF transformers + PEFT (all adapters loaded)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    if adapters:
        items = list(adapters.items())
        model = PeftModel.from_pretrained(model, items[0][1], adapter_name=items[0][0])
        for name, path in items[1:]:
            model.load_adapter(path, adapter_name=name)
    model.eval()
    ids = torch.tensor(prompts)
    bs = args.concurrency

    def gen(lo: int, hi: int, new: int) -> int:
        kw = {"adapter_names": names[lo:hi]} if names else {}
        out = model.generate(
            input_ids=ids[lo:hi],
            attention_mask=torch.ones_like(ids[lo:hi]),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=model.config.pad_token_id,
            **kw,
        )
        return (out.shape[1] - ids.shape[1]) * (hi - lo)

    with torch.inference_mode():
        for _ in range(args.warmup):
            gen(0, min(bs, len(prompts)), min(4, args.output_len))
        t0 = time.perf_counter()
        tokens = sum(
            gen(lo, min(lo + bs, len(prompts)), args.output_len)
            for lo in range(0, len(prompts), bs)
        )
        wall = time.perf_counter() - t0
    return Row("peft", workload, len(prompts), tokens, wall)


def format_table(rows: list[Row]) -> str:
    head = ("system", "workload", "requests", "out tokens", "wall s", "req/s", "out tok/s")
    cells = [head] + [
        (
            r.system,
            r.workload,
            str(r.requests),
            str(r.output_tokens),
            f"{r.wall_s:.2f}",
            f"{r.req_per_s:.2f}",
            f"{r.tok_per_s:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cs, widths, strict=True))
        )
        for cs in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def throughput(args: argparse.Namespace) -> int:
    from engine.cli import engine_config
    from engine.llm import LLM
    from engine.loader import load_model_spec

    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    for name in ("num_requests", "concurrency", "prompt_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_adapters < 0 or args.warmup < 0 or not ranks or min(ranks) < 1:
        raise ValueError("--num-adapters and --warmup must be >= 0, --ranks positive integers")
    if args.baseline == "peft":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ValueError(
                "the PEFT baseline needs peft: `pip install -e .[test]` (or --baseline none)"
            ) from None
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as tmp:
        model_dir, adapters = _assets(args, ranks, tmp)
        spec = load_model_spec(model_dir)
        names = list(adapters)
        prompts, alist = _requests(args, spec.vocab_size, names)
        elem = torch.finfo(getattr(torch, args.dtype)).bits // 8
        cfg = dataclasses.replace(
            engine_config(args),
            model=model_dir,
            max_num_seqs=args.concurrency,
            pool_bytes=args.pool_bytes or _pool_bytes(args, spec, adapters, elem),
        )
        params = _num_params(model_dir)
        workload = f"{len(names)} adapters (mixed)" if names else "base only"
        print(
            f"model: {model_dir} ({params / 1e6:.1f}M params, {args.dtype}); adapters: "
            + (", ".join(names) or "none")
        )
        print(
            f"workload: {args.num_requests} requests x {args.prompt_len} prompt + "
            f"{args.output_len} output tokens, concurrency {args.concurrency}, greedy"
        )
        print(
            f"machine: {_cpu_model()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}"
        )
        rows = []
        llm = LLM(
            adapters=adapters, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        )
        rows.append(run_ours(llm, prompts, alist, args, workload))
        if names and args.also_base:
            rows.append(run_ours(llm, prompts, None, args, "base only"))
        del llm
        if args.baseline == "peft":
            rows.append(run_peft(model_dir, adapters, prompts, alist, args, workload))
    print()
    print(format_table(rows))
    ratios = _ratios(rows)
    for label, value, target in ratios:
        verdict = "met" if value >= target else "MISSED"
        print(f"{label}: {value:.2f}x (target >= {target}x: {verdict})")
    if args.json_out:
        setup = {k: v for k, v in vars(args).items() if k != "func"}
        setup.update(
            model=model_dir,
            adapters=adapters,
            pool_bytes=cfg.pool_bytes,
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            cpu=_cpu_model(),
            cpus=os.cpu_count(),
        )
        out = {
            "setup": setup,
            "rows": [
                {**dataclasses.asdict(r), "req_per_s": r.req_per_s, "tok_per_s": r.tok_per_s}
                for r in rows
            ],
            "ratios": {label: value for label, value, _ in ratios},
        }
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _ratios(rows: list[Row]) -> list[tuple[str, float, float]]:
    """(label, value, target): ours / PEFT on the same workload, and mixed / base-only."""
    ours = {r.workload: r for r in rows if r.system == "loraplex"}
    out = []
    for r in rows:
        if r.system == "peft" and r.workload in ours:
            out.append(
                (
                    f"loraplex / peft output tok/s, {r.workload}",
                    ours[r.workload].tok_per_s / r.tok_per_s,
                    3.0,
                )
            )
    base = ours.pop("base only", None)
    for w, r in ours.items():
        if base:
            out.append(
                (f"loraplex {w} / base only output tok/s", r.tok_per_s / base.tok_per_s, 0.75)
            )
    return out


def _num_params(model_dir: str) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n

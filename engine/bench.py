"""`loraplex bench throughput`: offline throughput of the engine, beside HF PEFT.

Workload: N requests of exactly `--prompt-len` random token ids (seeded), request i uses
adapter i % K, greedy, `ignore_eos`, exactly `--output-len` new tokens each. Our engine gets all
N at once with `max_num_seqs = --concurrency` (continuous batching); the PEFT baseline runs
static batches of `--concurrency` requests through `PeftModel.generate(adapter_names=...)` with
all K adapters loaded (its base-only row is the plain transformers model). Only generation is
timed (time.perf_counter), after `--warmup` short runs; with `--repeat` the fastest run counts,
and our mixed and base-only runs alternate (mixed, base, mixed, ...) so their ratio compares
runs from the same phases of a noisy machine.
Without `--model`, a 29.7M-parameter Llama-shaped checkpoint and its adapters are built once
into `<cache>/bench-v1` (cache: $LORAPLEX_CACHE, else ~/.cache/loraplex), atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from loraplex.engine.bench_report import (
    BASE,
    Row,
    format_table,
    measure,
    measure_side_by_side,
    ratios,
)

logger = logging.getLogger(__name__)

BENCH_VERSION = "bench-v1"
# With the demo tokenizer (vocab 1323): 8 layers x 3.54M + embed + lm_head = 29.7M parameters.
BENCH_MODEL = dict(
    hidden_size=512, intermediate_size=1792, num_layers=8, num_heads=8, num_kv_heads=4, seed=0
)
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--num-requests", type=int, default=64)
    g.add_argument("--num-adapters", type=int, default=8, help="K adapters (0 = base only); "
                   "the first K --adapter dirs, then --adapter-dir's folders (sorted; all are "
                   "registered), if given, else generated")  # fmt: skip
    g.add_argument("--ranks", default="8,16,32,64", help="ranks, cycled over generated adapters")
    g.add_argument("--concurrency", type=int, default=16,
                   help="our max_num_seqs (overrides --max-num-seqs), PEFT batch size")  # fmt: skip
    g.add_argument("--prompt-len", type=int, default=64)
    g.add_argument("--output-len", type=int, default=64)
    g.add_argument("--baseline", choices=("none", "peft"), default="peft")
    g.add_argument("--also-base", action=argparse.BooleanOptionalAction, default=True,
                   help="also time base-only (no adapters) on the same prompts")  # fmt: skip
    g.add_argument("--warmup", type=int, default=1, help="untimed short runs per row")
    g.add_argument("--repeat", type=int, default=1, help="timed runs per row; fastest counts")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json-out", default=None, help="also write setup, rows, ratios as JSON")


def _atomic_build(target: Path, build) -> None:
    """Run `build(tmp_dir)`, then rename tmp_dir to `target`; a concurrent winner's copy wins."""
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


def _assets(args, ranks: list[int], tmp: str) -> tuple[str, dict[str, str]]:
    """(model_dir, {name: adapter_dir}): --model / --adapter if given, else the cached bench
    model; generated adapters target all seven modules, alpha = 2 * rank."""
    from loraplex.engine.cli import parse_adapters
    from loraplex.engine.demo import make_adapter, make_checkpoint
    from loraplex.engine.loader import load_model_spec

    model_dir, root = args.model, Path(tmp)
    if model_dir is None:
        cache = Path(os.environ.get("LORAPLEX_CACHE") or Path.home() / ".cache/loraplex")
        root = cache / BENCH_VERSION
        if not (root / "model").is_dir():
            logger.info("building the benchmark model in %s (once)", root / "model")
        _atomic_build(root / "model", lambda d: make_checkpoint(d, **BENCH_MODEL))
        model_dir, root = str(root / "model"), root / "adapters"
    given = parse_adapters(args.adapter)
    if given or args.adapter_dir:
        chosen = dict(list(given.items())[: args.num_adapters])
        if args.adapter_dir:  # sizes the pool; `_registered_choice` settles it after the start
            from loraplex.engine.adapter_dir import scan_adapter_dir

            rest = [(n, p) for n, p in scan_adapter_dir(args.adapter_dir).found if _rank_of(p)]
            chosen |= rest[: args.num_adapters - len(chosen)]
        return model_dir, chosen
    spec, adapters = load_model_spec(model_dir), {}
    for i in range(args.num_adapters):
        r = ranks[i % len(ranks)]
        name = f"bench-{i}-r{r}"
        adapters[name] = str(root / name)
        _atomic_build(root / name, lambda d, r=r, i=i: make_adapter(
            d, spec, rank=r, alpha=2.0 * r, target_modules=ALL_MODULES, seed=1000 + i))  # fmt: skip
    return model_dir, adapters


def _rank_of(adapter_dir: str) -> int | None:
    """The rank in an adapter's config, None if unreadable (the engine will skip it)."""
    try:
        r = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return r if isinstance(r, int) and not isinstance(r, bool) else None


def _registered_choice(llm, args, adapters: dict[str, str]) -> dict[str, str]:
    """With --adapter-dir: the first K of the --adapter ones, then the dir's adapters the
    engine registered (sorted): a folder it skipped gives its place to the next one."""
    from loraplex.engine.cli import parse_adapters

    report = llm.engine.adapter_dir
    if report is None:
        return adapters
    explicit = list(parse_adapters(args.adapter).items())
    found = [(info.name, info.path) for info in report.registered]
    return dict((explicit + found)[: args.num_adapters])


def _pool_bytes(args, spec, adapters: dict[str, str], elem: int) -> int:
    """Twice what `concurrency` requests, one max-length request and every adapter need."""
    page = spec.num_layers * 2 * args.block_size * spec.kv_dim * elem
    max_len = args.max_model_len or min(spec.max_position_embeddings, 8192)
    per_req = -(-(args.prompt_len + args.output_len) // args.block_size)
    total = (args.concurrency * per_req + -(-max_len // args.block_size)) * page
    for path in adapters.values():
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        mods = cfg.get("target_modules")
        mods = mods if isinstance(mods, list) else ALL_MODULES
        dims = sum(sum(spec.module_dims(m)) for m in mods if m in ALL_MODULES)
        total += (cfg["r"] * dims * spec.num_layers * elem // page + 2) * page
    return 2 * total


def ours(llm, prompts, adapters, args, workload: str) -> tuple:
    """(system, workload, run, warm) for `measure_side_by_side`: all requests submitted at
    once; the engine batches up to `concurrency` of them."""
    from loraplex.scheduler.sequence import SamplingParams

    alist = adapters or [None] * len(prompts)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_tokens=min(4, args.output_len), temperature=0.0, ignore_eos=True)
    n = min(args.concurrency, len(prompts))
    return (
        "loraplex",
        workload,
        lambda: [o.token_ids for o in llm.generate(prompts, params, alist)],
        lambda: llm.generate(prompts[:n], warm, alist[:n]),
    )


def run_peft(model_dir, adapters, prompts, names, args, workload) -> list[tuple[Row, list]]:
    """Static batches of `concurrency`: the plain transformers model (if --also-base or no
    adapters), then PeftModel with all adapters loaded, `generate(adapter_names=...)`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    ids, bs, n = torch.tensor(prompts, device=args.device), args.concurrency, len(prompts)

    def gen(lo: int, hi: int, new: int, names) -> list[list[int]]:
        out = model.generate(
            input_ids=ids[lo:hi],
            attention_mask=torch.ones_like(ids[lo:hi]),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=model.config.pad_token_id,
            **({"adapter_names": names[lo:hi]} if names else {}),
        )
        return out[:, ids.shape[1] :].tolist()

    def timed(workload, names):
        full = range(0, n, bs)
        return measure(
            "peft",
            workload,
            lambda: [o for lo in full for o in gen(lo, min(lo + bs, n), args.output_len, names)],
            lambda: gen(0, min(bs, n), min(4, args.output_len), names),
            args,
        )

    results = []
    with torch.inference_mode():
        if not names or args.also_base:
            results.append(timed(BASE, None))
        if names:
            (first, path), *rest = adapters.items()
            model = PeftModel.from_pretrained(model, path, adapter_name=first)
            for name, path in rest:
                model.load_adapter(path, adapter_name=name)
            model.eval()
            results.append(timed(workload, names))
    return results


def _cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    names = [x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")]
    return names[0] if names else "unknown cpu"


def _numels(file: Path) -> dict[str, int]:
    """{tensor name: element count} of one safetensors file (shapes only, nothing loaded)."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as st:
        return {k: math.prod(st.get_slice(k).get_shape()) for k in st.keys()}


def _weights(model_dir: str, adapters: dict[str, str]) -> tuple[int, int, int]:
    """(parameters, base weights a decode step reads, adapter weights) in elements. A step
    reads every base weight but the embedding table, of which it gathers a few rows (with tied
    embeddings that table is the LM head too, so it counts); each adapter in the batch counts
    whole (the bench's batches hold every adapter)."""
    base = {
        k: n for f in sorted(Path(model_dir).glob("*.safetensors")) for k, n in _numels(f).items()
    }
    total = sum(base.values())
    read = total - (base["model.embed_tokens.weight"] if "lm_head.weight" in base else 0)
    lora = sum(
        sum(_numels(Path(d) / "adapter_model.safetensors").values()) for d in adapters.values()
    )
    return total, read, lora


def throughput(args: argparse.Namespace) -> int:
    """Run the benchmark; print the setup, the table and the ratios. Returns 0."""
    from loraplex.engine.cli import engine_config, parse_adapters
    from loraplex.engine.llm import LLM
    from loraplex.engine.loader import load_model_spec

    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    for name in ("num_requests", "concurrency", "prompt_len", "output_len", "repeat"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_adapters < 0 or args.warmup < 0 or not ranks or min(ranks) < 1:
        raise ValueError("--num-adapters and --warmup must be >= 0, --ranks positive integers")
    if args.baseline == "peft":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ValueError("the PEFT baseline needs peft: `pip install -e .[test]` "
                             "(or pass --baseline none)") from None  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as tmp:
        model_dir, adapters = _assets(args, ranks, tmp)
        spec = load_model_spec(model_dir)
        elem = torch.finfo(getattr(torch, args.dtype)).bits // 8
        pool_bytes = args.pool_bytes or _pool_bytes(args, spec, adapters, elem)
        cfg = dataclasses.replace(engine_config(args), model=model_dir,
                                  max_num_seqs=args.concurrency, pool_bytes=pool_bytes)  # fmt: skip
        llm = None
        if args.adapter_dir:  # start first: the workload uses adapters the engine registered
            explicit = {n: p for n, p in parse_adapters(args.adapter).items() if n in adapters}
            llm = LLM(**dataclasses.asdict(cfg) | {"adapters": explicit,
                                                   "adapter_dir": args.adapter_dir})  # fmt: skip
            adapters = _registered_choice(llm, args, adapters)
        names = list(adapters)
        gen = torch.Generator().manual_seed(args.seed)
        low = 4 if spec.vocab_size > 64 else 0  # skip the demo tokenizer's special tokens
        shape = (args.num_requests, args.prompt_len)
        prompts = torch.randint(low, spec.vocab_size, shape, generator=gen).tolist()
        alist = [names[i % len(names)] for i in range(len(prompts))] if names else None
        workload = f"{len(names)} adapter{'s' * (len(names) > 1)} (mixed)" if names else BASE
        machine = f"{_cpu_model()}, {os.cpu_count()} cpus, torch {torch.__version__}"
        params, base_read, lora_read = _weights(model_dir, adapters)
        print(f"model: {model_dir} ({params / 1e6:.1f}M params, {args.dtype})")
        print(f"adapters: {', '.join(names) or 'none'}")
        if names:  # what the mixed / base ratio is up against where a step is memory-bound
            mb, share = (base_read * elem / 1e6, lora_read * elem / 1e6), lora_read / base_read
            print(f"weights a decode step reads: base {mb[0]:.1f} MB, the adapters {mb[1]:.1f} "
                  f"MB more (+{share:.0%})")  # fmt: skip
        print(f"workload: {args.num_requests} requests x {args.prompt_len} prompt + "
              f"{args.output_len} output tokens, concurrency {args.concurrency}")  # fmt: skip
        print(f"machine: {machine}, torch threads {torch.get_num_threads()}", flush=True)
        if llm is None:
            llm = LLM(**dataclasses.asdict(cfg) | {"adapters": adapters})
        backends = dict(llm.engine.backends)
        print(f"loraplex paths: lora {backends['lora']}, attention {backends['attention']}")
        specs = [ours(llm, prompts, alist, args, workload)]
        if names and args.also_base:  # mixed and base-only runs alternate (their ratio counts)
            specs.append(ours(llm, prompts, None, args, BASE))
        measured = measure_side_by_side(specs, args)
        rows, outputs = [row for row, _ in measured], measured[0][1]
        del llm
        if args.baseline == "peft":
            results = run_peft(model_dir, adapters, prompts, alist, args, workload)
            rows += [r for r, _ in results]
            same = sum(a == b for a, b in zip(outputs, results[-1][1], strict=True))
    print("\n" + format_table(rows) + "\n\noutput tok/s ratios:")
    found = ratios(rows)
    for label, value, target in found:
        verdict = "" if target is None else f"  (target >= {target}x: "
        verdict += "" if target is None else ("met)" if value >= target else "MISSED)")
        print(f"  {label}: {value:.2f}x{verdict}")
    if args.baseline == "peft":
        print(f"greedy outputs identical to PEFT's: {same}/{len(outputs)} requests")
    if args.json_out:
        setup = {k: v for k, v in vars(args).items() if k != "func"}
        setup |= dataclasses.asdict(cfg) | {"adapters": adapters, "machine": machine}
        setup["threads"] = torch.get_num_threads()
        setup["step_weight_bytes"] = {"base": base_read * elem, "adapters": lora_read * elem}
        setup["backends"] = backends
        rows_out = [dataclasses.asdict(r) | {"req_per_s": r.req_per_s, "tok_per_s": r.tok_per_s}
                    for r in rows]  # fmt: skip
        out = {"setup": setup, "rows": rows_out, "ratios": {k: v for k, v, _ in found}}
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0

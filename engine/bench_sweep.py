"""What `loraplex bench serve` takes from the engine side: the benchmark model with N cached
adapters laid out as an `--adapter-dir`, and the two baselines run on a trace's requests: HF
PEFT (S-LoRA's: requests grouped by adapter into static batches) and our own engine offline
(`offline_trace`: the same trace without HTTP).

Contracts:
- `sweep_assets(n, ranks)` returns (model_dir, adapter_dir): the bench model of
  `loraplex bench throughput` and a folder holding exactly n adapter folders
  `bench-{i}-r{r}` (i < n, r = ranks[i % len(ranks)]), the same adapters (same names, seeds,
  alpha = 2r, all seven modules) `bench throughput` generates. Each adapter is built once into
  `<cache>/bench-v1/adapters/`; the n-folder holds hard links to those files (no copy, and no
  symlink for the loader to refuse). Both are built atomically and reused.
- `peft_trace(...)` runs every request through transformers + PEFT and returns the wall time of
  the timed part and the output tokens the requests asked for. Requests are grouped by adapter
  (stable, in trace order) and cut into static batches of `batch_size`; prompts are left-padded
  and every row of a batch generates the batch's longest output (`min_new_tokens` too, as
  `ignore_eos` does for us); only the tokens a request asked for count. Arrival times are
  ignored: an offline best case for PEFT. One untimed warm-up batch runs first.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from loraplex.engine.bench import ALL_MODULES, BENCH_MODEL, BENCH_VERSION, _atomic_build

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    cache = Path(os.environ.get("LORAPLEX_CACHE") or Path.home() / ".cache/loraplex")
    return cache / BENCH_VERSION


def sweep_assets(num_adapters: int, ranks: list[int]) -> tuple[str, str]:
    """(model_dir, adapter_dir with exactly `num_adapters` adapters); see the module doc."""
    from loraplex.engine.demo import make_adapter, make_checkpoint
    from loraplex.engine.loader import load_model_spec

    if num_adapters < 0 or not ranks or min(ranks) < 1:
        raise ValueError(f"need num_adapters >= 0 and positive ranks, got {num_adapters}, {ranks}")
    root = cache_root()
    model_dir = root / "model"
    _atomic_build(model_dir, lambda d: make_checkpoint(d, **BENCH_MODEL))
    spec = load_model_spec(str(model_dir))
    names = [f"bench-{i}-r{ranks[i % len(ranks)]}" for i in range(num_adapters)]
    missing = [(i, n) for i, n in enumerate(names) if not (root / "adapters" / n).is_dir()]
    for i, name in tqdm(
        missing, desc="building bench adapters", unit="adapter", disable=not missing
    ):
        r = ranks[i % len(ranks)]
        _atomic_build(
            root / "adapters" / name,
            lambda d, r=r, i=i: make_adapter(
                d, spec, rank=r, alpha=2.0 * r, target_modules=ALL_MODULES, seed=1000 + i
            ),
        )
    sweep_dir = root / "sweeps" / f"r{'-'.join(map(str, ranks))}" / f"n{num_adapters}"

    def link_all(tmp: Path) -> None:
        for name in names:
            (tmp / name).mkdir()
            for f in (root / "adapters" / name).iterdir():
                os.link(f, tmp / name / f.name)

    _atomic_build(sweep_dir, link_all)
    return str(model_dir), str(sweep_dir)


def _batches(requests: list[tuple[list[int], str | None, int]], batch_size: int):
    """Request indices grouped by adapter (first appearance order), cut into static batches."""
    groups: dict[str | None, list[int]] = {}
    for i, (_, adapter, _) in enumerate(requests):
        groups.setdefault(adapter, []).append(i)
    return [
        (adapter, idx[lo : lo + batch_size])
        for adapter, idx in groups.items()
        for lo in range(0, len(idx), batch_size)
    ]


def peft_trace(
    model_dir: str,
    adapters: dict[str, str],
    requests: list[tuple[list[int], str | None, int]],
    *,
    batch_size: int,
    dtype: str = "float32",
    device: str = "cpu",
) -> dict:
    """{"wall_s", "output_tokens", "requests", "batches", "adapters"} for HF PEFT on
    `requests` = [(prompt ids, adapter name or None, output tokens)]; see the module doc."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    used = sorted({a for _, a, _ in requests if a is not None})
    unknown = [a for a in used if a not in adapters]
    if unknown:
        raise ValueError(f"the trace uses adapters PEFT was not given: {unknown[:5]}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    if used:
        model = PeftModel.from_pretrained(model, adapters[used[0]], adapter_name=used[0])
        for name in tqdm(
            used[1:], desc="PEFT: loading adapters", unit="adapter", disable=len(used) < 16
        ):
            model.load_adapter(adapters[name], adapter_name=name)
        model.eval()

    def run(adapter: str | None, idx: list[int]) -> None:
        width = max(len(requests[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):  # left padding: generation continues every row's end
            p = requests[i][0]
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        new = max(requests[i][2] for i in idx)
        kwargs = dict(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
        )
        if adapter is None and used:
            with model.disable_adapter():
                model.generate(**kwargs)
            return
        if adapter is not None:
            model.set_adapter(adapter)
        model.generate(**kwargs)

    batches = _batches(requests, batch_size)
    with torch.inference_mode():
        adapter, idx = batches[0]
        run(adapter, idx[:2])  # warm-up, untimed
        t0 = time.perf_counter()
        for adapter, idx in tqdm(batches, desc="PEFT: static batches", unit="batch"):
            run(adapter, idx)
        wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "output_tokens": sum(n for _, _, n in requests),
        "requests": len(requests),
        "batches": len(batches),
        "adapters": len(used),
    }


def offline_trace(
    args,
    model_dir: str,
    adapter_dir: str | None,
    requests: list[tuple[list[int], str | None, int]],
    max_num_seqs: int | None = None,
) -> dict:
    """{"wall_s", "output_tokens", "requests"} for our engine run offline (`LLM.generate`, all
    requests submitted at once, continuous batching) on `requests`, with the engine options
    parsed into `args` and the server's model and adapters: what the same trace costs without
    HTTP. `max_num_seqs` caps the batch as a closed loop's concurrency caps the server's (else
    the engine option). Arrival times are ignored. Two short untimed requests warm it up."""
    import dataclasses

    from loraplex.engine.cli import engine_config, parse_adapters
    from loraplex.engine.llm import LLM
    from loraplex.scheduler.sequence import SamplingParams

    config = dataclasses.replace(engine_config(args), model=model_dir)
    if max_num_seqs is not None:
        config = dataclasses.replace(config, max_num_seqs=max_num_seqs)
    adapters = parse_adapters(args.adapter) or None
    llm = LLM(**dataclasses.asdict(config), adapters=adapters, adapter_dir=adapter_dir)
    prompts = [p for p, _, _ in requests]
    names = [a for _, a, _ in requests]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for *_, n in requests]
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], warm, names[:2])
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, names)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "output_tokens": sum(len(o.token_ids) for o in outs),
        "requests": len(outs),
    }

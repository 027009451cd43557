"""`loraplex bench coserve`: inference and a fine-tuning job in the same engine (issue #15),
against each alone and against the status quo (a separate PEFT trainer process).

Phases, in this order, one engine for all (each phase's measured window comes after `--warmup`
seconds; every phase starts its load and job afresh):
1. inference alone: a closed loop of `--concurrency` requests (`--prompt-len` random token ids,
   seeded; greedy, `ignore_eos`, exactly `--output-len` tokens, the first wave staggered:
   `ClosedLoop`; adapter i mod K for the i-th request), each finished request replaced at
   once, for `--duration` seconds.
2. training alone: one co-served job (engine/training_jobs.py) on the idle engine.
3. co-served: the load of 1 and the job of 2 together.
4. training alone (PEFT process): `python -m loraplex.engine.bench_coserve_peft` trains the same
   adapter (same checkpoint, data, rank, targets, alpha, lr, batches, init seed) with
   transformers + PEFT + AdamW; the engine idles.
5. status quo: that process goes on training while the engine serves the load of 1.
The PEFT process gets as many torch threads as the engine's process has (both default to the
machine's cores: oversubscribed, as two such processes would be). `--no-status-quo` skips 4-5.

The job: `--train-examples` seeded random examples of `--train-len` MIN,MAX tokens, the first
half of each untrained prompt, the second half trained (labels); rank `--rank` (alpha = 2 x
rank) on `--target-modules`, batches of `--batch-size` in file order, one optimizer step per
batch, `--learning-rate`, as many epochs as the phase lasts (the job is cancelled at its end).
Metrics: engine/bench_coserve_report.py. Output: the table and the targets on stdout,
results.json and results.md in `--out`. Without `--model`, the cached model and adapters of
`loraplex bench throughput` (engine/bench.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from loraplex.engine import bench_coserve_report as rep

logger = logging.getLogger(__name__)

EPOCHS = 1000  # "until the phase ends": the job is cancelled long before


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--duration", type=float, default=25.0, help="measured seconds per phase")
    g.add_argument("--warmup", type=float, default=4.0, help="unmeasured seconds before each")
    g.add_argument("--concurrency", type=int, default=4, help="closed-loop requests in flight")
    g.add_argument("--prompt-len", type=int, default=64)
    g.add_argument("--output-len", type=int, default=64)
    g.add_argument("--num-adapters", type=int, default=8, help="served adapters (0 = base)")
    g.add_argument("--ranks", default="8,16,32,64", help="ranks, cycled over the adapters")
    g.add_argument("--train-examples", type=int, default=256)
    g.add_argument("--train-len", default="64,128", help="MIN,MAX tokens of an example")
    g.add_argument("--rank", type=int, default=16, help="the trained adapter's rank")
    g.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--learning-rate", type=float, default=1e-4)
    g.add_argument("--no-status-quo", dest="status_quo", action="store_false",
                   help="skip the PEFT trainer process (phases 4 and 5)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None, help="results dir (default: a new temp dir)")


def _check(args) -> tuple[list[int], tuple[int, int], tuple[str, ...]]:
    for name in ("duration", "concurrency", "prompt_len", "output_len", "train_examples",
                 "rank", "batch_size"):  # fmt: skip
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.warmup < 0 or args.num_adapters < 0:
        raise ValueError("--warmup and --num-adapters must be >= 0")
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
        lo, hi = (int(x) for x in args.train_len.split(","))
    except ValueError:
        raise ValueError(f"--ranks takes integers, --train-len MIN,MAX: got {args.ranks!r}, "
                         f"{args.train_len!r}") from None  # fmt: skip
    if not ranks or min(ranks) < 1:
        raise ValueError(f"--ranks must be positive integers, got {args.ranks!r}")
    if not 2 <= lo <= hi:
        raise ValueError(f"--train-len needs 2 <= MIN <= MAX, got {args.train_len!r}")
    if args.status_quo:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ValueError("the status quo needs peft: `pip install -e .[bench]` (or pass "
                             "--no-status-quo)") from None  # fmt: skip
    modules = tuple(m.strip() for m in args.target_modules.split(",") if m.strip())
    return ranks, (lo, hi), modules


def make_examples(n: int, lengths: tuple[int, int], vocab: int, seed: int):
    """n seeded random examples: the first half of each untrained, the second half trained."""
    from loraplex.engine.finetune_data import Example

    rng, low = random.Random(seed), 4 if vocab > 64 else 0  # no demo special tokens
    out = []
    for i in range(n):
        ids = [rng.randrange(low, vocab) for _ in range(rng.randint(*lengths))]
        half = len(ids) // 2
        out.append(Example(ids, [-100] * half + ids[half:], i + 1))
    return out


@dataclass
class _Req:
    submit: float
    times: list[float] = field(default_factory=list)


class ClosedLoop:
    """`concurrency` requests in the engine at all times; stamps every emitted token. The first
    C requests ask for output_len x (i + 1) / C tokens, later ones for output_len: finishes,
    and so the prefills of their replacements, stay spread evenly over the steps (as in a
    steady stream) instead of all C landing in one step."""

    def __init__(self, engine, names: list[str], args, tag: str) -> None:
        from loraplex.scheduler.sequence import SamplingParams

        self.engine, self.names, self.tag, self.n = engine, names, tag, 0
        self.concurrency, self.prompt_len = args.concurrency, args.prompt_len
        c, out = args.concurrency, args.output_len
        self.params = [SamplingParams(max_tokens=max(1, out * (i + 1) // c), temperature=0.0,
                                      ignore_eos=True) for i in range(c)]  # fmt: skip
        self.rng = random.Random(args.seed)  # every phase replays the same prompts
        self.low, self.vocab = (4 if engine.spec.vocab_size > 64 else 0), engine.spec.vocab_size
        self.active: dict[str, _Req] = {}
        self.done: list[_Req] = []

    def fill(self) -> None:
        while len(self.active) < self.concurrency:
            rid = f"{self.tag}-{self.n}"
            prompt = [self.rng.randrange(self.low, self.vocab) for _ in range(self.prompt_len)]
            name = self.names[self.n % len(self.names)] if self.names else None
            params = self.params[min(self.n, self.concurrency - 1)]
            self.engine.add_request(rid, prompt, params, name)
            self.active[rid], self.n = _Req(time.monotonic()), self.n + 1

    def record(self, outputs, now: float) -> None:
        for out in outputs:
            req = self.active.get(out.request_id)
            if req is not None:
                req.times += [now] * len(out.new_token_ids)
                if out.finished:
                    self.done.append(self.active.pop(out.request_id))

    def stop(self) -> list[_Req]:
        for rid in list(self.active):
            self.engine.abort(rid)
            self.done.append(self.active.pop(rid))
        return self.done


class EngineJob:
    """A co-served job; `events` stamps each optimizer step when the step() that ended it
    returns."""

    def __init__(self, engine, job_id: str, config, examples, out_dir: Path) -> None:
        bs = config.batch_size
        batches = [examples[i : i + bs] for i in range(0, len(examples), bs)]
        self.padded = [len(b) * max(len(e.input_ids) for e in b) for b in batches]
        self.engine, self.job_id = engine, job_id
        self.job = engine.submit_finetune(job_id, config, examples, str(out_dir / job_id))
        self.events: list[tuple[float, int, int, float]] = []

    def poll(self, now: float) -> None:
        for e in self.job.log[len(self.events) :]:
            self.events.append((now, e.tokens, self.padded[(e.step - 1) % len(self.padded)],
                                e.loss))  # fmt: skip
        if self.job.status.value == "failed":
            raise RuntimeError(f"fine-tuning job {self.job_id} failed: {self.job.reason}")

    def stop(self) -> None:
        self.engine.cancel_finetune(self.job_id)


def run_phase(name: str, engine, args, *, load=None, job=None, peft=None) -> dict:
    """Warm up, then measure `--duration` s: step the engine (or idle while only the PEFT
    process trains). The load and the job are stopped at the end."""
    start = time.monotonic()
    t0, t1 = start + args.warmup, start + args.warmup + args.duration
    meter, now = None, start
    bar = tqdm(total=round(args.warmup + args.duration), desc=name, unit="s", leave=False,
               mininterval=1.0, file=sys.stderr)  # fmt: skip
    while now < t1:
        if meter is None and now >= t0:
            meter = rep.CpuMeter(peft.pid if peft else None)
        if load is not None or job is not None:
            if load is not None:
                load.fill()
            outputs = engine.step()
            now = time.monotonic()
            if load is not None:
                load.record(outputs, now)
            if job is not None:
                job.poll(now)
        else:
            time.sleep(min(0.1, max(0.0, t1 - now)))
            now = time.monotonic()
        bar.update(int(now - start) - bar.n)
    bar.close()
    result = {}
    if load is not None:
        result |= rep.inference_metrics(load.stop(), t0, t1)
    events = job.events if job is not None else peft.events if peft is not None else None
    if events is not None:
        result |= rep.training_metrics(events, t0, t1)
        result["losses"] = [e[3] for e in events[:20]]
    if job is not None:
        if job.job.status.value == "queued":
            raise ValueError(f"the fine-tuning job never started: {job.job.reason}")
        job.stop()
    result |= (meter or rep.CpuMeter()).read()
    logger.info("%s: %s", name, {k: v for k, v in result.items() if k != "losses"})
    return result


def coserve(args: argparse.Namespace) -> int:
    """Run the phases; print the table and targets; write results.json and results.md."""
    from loraplex.engine.bench import _assets, _cpu_model, _pool_bytes
    from loraplex.engine.bench_coserve_peft import PeftProcess
    from loraplex.engine.cli import engine_config
    from loraplex.engine.engine import Engine
    from loraplex.engine.loader import load_model_spec
    from loraplex.engine.train_memory import pages_needed
    from loraplex.engine.trainer import FinetuneConfig

    ranks, lengths, modules = _check(args)
    job_config = FinetuneConfig(rank=args.rank, alpha=2.0 * args.rank, target_modules=modules,
                                epochs=EPOCHS, batch_size=args.batch_size,
                                learning_rate=args.learning_rate, seed=args.seed)  # fmt: skip
    out = Path(args.out or tempfile.mkdtemp(prefix="loraplex-coserve-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loraplex-coserve-") as tmp:
        model_dir, adapters = _assets(args, ranks, tmp)
        spec = load_model_spec(model_dir)
        elem = torch.finfo(getattr(torch, args.dtype)).bits // 8
        page = spec.num_layers * 2 * args.block_size * spec.kv_dim * elem
        state, act = pages_needed(
            spec, args.rank, modules, max(args.finetune_max_tokens_per_step, lengths[1]), elem, page
        )
        pool = args.pool_bytes or _pool_bytes(args, spec, adapters, elem) + (state + act) * page
        cfg = dataclasses.replace(engine_config(args), model=model_dir, pool_bytes=pool,
                                  max_num_seqs=args.concurrency)  # fmt: skip
        engine = Engine(cfg, adapters=adapters)
        names, threads = list(adapters), torch.get_num_threads()
        examples = make_examples(args.train_examples, lengths, spec.vocab_size, args.seed)
        (out / "examples.json").write_text(json.dumps(
            [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]))  # fmt: skip
        machine = f"{_cpu_model()}, {os.cpu_count()} cpus, torch {torch.__version__}"
        print(f"model: {model_dir} ({args.dtype}); adapters: {', '.join(names) or 'none'}")
        print(f"load: closed loop of {args.concurrency} x {args.prompt_len} prompt + "
              f"{args.output_len} output tokens; job: {len(examples)} examples of "
              f"{lengths[0]}-{lengths[1]} tokens, rank {args.rank} on {','.join(modules)}, "
              f"batch {args.batch_size}")  # fmt: skip
        print(f"machine: {machine}, torch threads {threads} (the PEFT process too)", flush=True)

        phases: dict[str, dict] = {}
        phases[rep.ALONE] = run_phase(rep.ALONE, engine, args,
                                      load=ClosedLoop(engine, names, args, "alone"))  # fmt: skip
        job = EngineJob(engine, "solo", job_config, examples, out)
        phases[rep.TRAIN] = run_phase(rep.TRAIN, engine, args, job=job)
        load = ClosedLoop(engine, names, args, "coserve")
        job = EngineJob(engine, "coserve", job_config, examples, out)
        phases[rep.COSERVE] = run_phase(rep.COSERVE, engine, args, load=load, job=job)
        if args.status_quo:
            peft = PeftProcess(
                ["--model", model_dir, "--examples", str(out / "examples.json"),
                 "--rank", str(args.rank), "--alpha", str(2.0 * args.rank),
                 "--target-modules", ",".join(modules), "--batch-size", str(args.batch_size),
                 "--learning-rate", str(args.learning_rate), "--seed", str(args.seed),
                 "--threads", str(threads), "--dtype", args.dtype,
                 "--max-seconds", str(4 * (args.warmup + args.duration) + 60)],
                out / "peft_process.log",
            )  # fmt: skip
            try:
                peft.wait_for(lambda: peft.events, "its first optimizer step")
                phases[rep.PEFT_SOLO] = run_phase(rep.PEFT_SOLO, engine, args, peft=peft)
                load = ClosedLoop(engine, names, args, "status-quo")
                phases[rep.STATUS_QUO] = run_phase(rep.STATUS_QUO, engine, args, load=load,
                                                   peft=peft)  # fmt: skip
            finally:
                peft.stop()
        engine.check_integrity()

    found = rep.targets(phases)
    lines = rep.verdicts(found) + [w for w in [rep.noise(phases)] if w]
    print("\n" + rep.format_table(phases) + "\n")
    for line in lines:
        print(f"  {line}")
    checks = rep.loss_check(phases)
    for name, c in checks.items():
        print(f"  same job: {name} step losses vs training alone, max |diff| "
              f"{c['max_abs_diff']:.2e} over {c['steps']} steps")  # fmt: skip
    setup = {k: v for k, v in vars(args).items() if k != "func"}
    setup |= dataclasses.asdict(cfg) | {
        "adapters": adapters, "machine": machine, "threads": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": rep.command(),
        "workload": f"closed loop {args.concurrency} x {args.prompt_len}+{args.output_len} "
                    f"tokens over {len(names)} adapters",
        "job": f"{len(examples)} examples of {lengths[0]}-{lengths[1]} tokens, rank {args.rank} "
               f"on {','.join(modules)}, batch {args.batch_size}, lr {args.learning_rate}",
        "model": model_dir, "pages_train": state + act,
    }  # fmt: skip
    results = {"setup": setup, "phases": phases, "targets": found, "loss_check": checks}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(rep.markdown(phases, lines, setup))
    print(f"\nresults: {out / 'results.json'}, {out / 'results.md'}")
    return 0

"""`loraplex bench coserve`: inference and a fine-tuning job in the same engine (issue #15),
against each alone and against the status quo (a separate PEFT trainer process).

Phases, in this order, one engine for all (each phase's measured window comes after `--warmup`
seconds; every phase starts its load and job afresh; loads: engine/bench_coserve_load.py):
1. inference alone, closed loop: `--concurrency` requests in flight (`--prompt-len` random
   token ids, greedy, exactly `--output-len` tokens), each finished one replaced at once, for
   `--duration` seconds. The engine never idles: its tokens/s is the capacity.
2. training alone: one co-served job (engine/training_jobs.py) on the idle engine.
3. co-served, closed loop: the load of 1 and the job of 2 together.
4. for each fraction L of `--inference-load` (default 0.5,0.3): inference alone, open loop:
   Poisson arrivals of the same requests at L x capacity / output-len requests/s (offered
   L x capacity tokens/s; the engine idles between them), then co-served at that load (the
   same arrivals).
5. training alone (PEFT process): `python -m loraplex.engine.bench_coserve_peft` trains the same
   adapter (same checkpoint, data, rank, targets, alpha, lr, batches, init seed) with
   transformers + PEFT + AdamW; the engine idles.
6. status quo: that process goes on training while the engine serves the closed loop, then
   each open loop of 4.
The PEFT process gets as many torch threads as the engine's process has (both default to the
machine's cores: oversubscribed, as two such processes would be). `--no-status-quo` skips 5-6.

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
import gc
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from loraplex.engine import bench_coserve_report as rep
from loraplex.engine.bench_coserve_load import ClosedLoop, EngineJob, OpenLoop, make_examples

logger = logging.getLogger(__name__)

EPOCHS = 1000  # "until the phase ends": the job is cancelled long before


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--duration", type=float, default=25.0, help="measured seconds per phase")
    g.add_argument("--warmup", type=float, default=4.0, help="unmeasured seconds before each")
    g.add_argument("--concurrency", type=int, default=4, help="closed-loop requests in flight")
    g.add_argument("--inference-load", default="0.5,0.3",
                   help="open-loop loads, fractions of the closed loop's tokens/s, comma-separated "
                        "('' = none)")  # fmt: skip
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


def _check(args) -> tuple[list[int], tuple[int, int], tuple[str, ...], list[float]]:
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
    try:
        loads = [float(x) for x in args.inference_load.split(",") if x.strip()]
    except ValueError:
        loads = [0.0]
    if not all(0 < x <= 1 for x in loads):
        raise ValueError(f"--inference-load takes fractions in (0, 1], got {args.inference_load!r}")
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
    return ranks, (lo, hi), modules, loads


def run_phase(name: str, engine, args, *, load=None, job=None, peft=None) -> dict:
    """Warm up, then measure `--duration` s: step the engine (or idle while only the PEFT
    process trains; an open loop's engine sleeps until the next arrival when it has nothing to
    do). The load and the job are stopped at the end. Besides the metrics: the share of the
    window the engine spent in inference (its steps less their training units) and in training
    units ("inference_busy", "training_busy")."""
    start = time.monotonic()
    t0, t1 = start + args.warmup, start + args.warmup + args.duration
    engine.training.budget.idle_share = 0.0  # each phase its own: no idle time carried over
    meter, now, stepping, trained = None, start, 0.0, 0.0
    bar = tqdm(total=round(args.warmup + args.duration), desc=name, unit="s", leave=False,
               mininterval=1.0, file=sys.stderr)  # fmt: skip
    while now < t1:
        if meter is None and now >= t0:
            meter, trained = rep.CpuMeter(peft.pid if peft else None), engine.training.seconds
        if load is not None or job is not None:
            if load is not None:
                load.fill(now)
            outputs = engine.step()
            later = time.monotonic()
            if meter is not None:
                stepping += later - max(now, meter.start[0])
            now = later
            if load is not None:
                load.record(outputs, now)
            if job is not None:
                job.poll(now)
            if load is not None and not engine.has_unfinished():  # open loop, nothing to do
                time.sleep(max(0.0, min(load.next_arrival(), t1) - now))
                now = time.monotonic()
        else:
            time.sleep(min(0.1, max(0.0, t1 - now)))
            now = time.monotonic()
        bar.update(int(now - start) - bar.n)
    bar.close()
    meter = meter or rep.CpuMeter()
    wall = max(now - meter.start[0], 1e-9)
    trained = engine.training.seconds - trained
    result = {"offered_tok_s": getattr(load, "offered", None)}
    if load is not None:
        result |= rep.inference_metrics(load.stop(), t0, t1)
        result["inference_busy"] = (stepping - trained) / wall
    events = job.events if job is not None else peft.events if peft is not None else None
    if events is not None:
        result |= rep.training_metrics(events, t0, t1)
        result["losses"] = [e[3] for e in events[:20]]
    if job is not None:
        result["training_busy"] = trained / wall
        if job.job.status.value == "queued":
            raise ValueError(f"the fine-tuning job never started: {job.job.reason}")
        job.stop()
    result |= meter.read()
    logger.info("%s: %s", name, {k: v for k, v in result.items() if k != "losses"})
    return result


def _phases(engine, names, args, job_config, examples, out: Path, loads, peft_args) -> dict:
    """The phases of the module docstring, in order: {phase name: its metrics}."""
    from loraplex.engine.bench_coserve_peft import PeftProcess

    phases: dict[str, dict] = {}

    def run(kind: str, load=None, job=None, peft=None, level=None) -> None:
        name = rep.phase(kind, level)
        phases[name] = run_phase(name, engine, args, load=load, job=job, peft=peft)
        phases[name] |= {"kind": kind, "load": level}

    def job(tag: str) -> EngineJob:
        return EngineJob(engine, tag, job_config, examples, out)

    def open_loop(tag: str, i: int, level: float) -> OpenLoop:
        rate = level * capacity / args.output_len
        return OpenLoop(engine, names, args, f"{tag}-{i}", rate, seed=args.seed + 1000 * (i + 1))

    run(rep.INFERENCE, load=ClosedLoop(engine, names, args, "alone"))
    capacity = phases[rep.ALONE]["inference_tok_s"]
    if not capacity > 0 and loads:
        raise RuntimeError("the closed loop emitted no tokens: no capacity to take a share of")
    run(rep.TRAINING, job=job("solo"))
    run(rep.COSERVED, load=ClosedLoop(engine, names, args, "coserve"), job=job("coserve"))
    for i, level in enumerate(loads):
        run(rep.INFERENCE, load=open_loop("alone", i, level), level=level)
        run(rep.COSERVED, load=open_loop("coserve", i, level), job=job(f"coserve-{i}"),
            level=level)  # fmt: skip
    if not args.status_quo:
        return phases
    seconds = 2 * (2 + len(loads)) * (args.warmup + args.duration) + 60
    peft = PeftProcess(
        [*peft_args, "--examples", str(out / "examples.json"), "--alpha", str(2.0 * args.rank),
         "--batch-size", str(args.batch_size), "--learning-rate", str(args.learning_rate),
         "--seed", str(args.seed), "--dtype", args.dtype, "--max-seconds", str(seconds)],
        out / "peft_process.log",
    )  # fmt: skip
    try:
        peft.wait_for(lambda: peft.events, "its first optimizer step")
        run(rep.PEFT, peft=peft)
        run(rep.STATUS, load=ClosedLoop(engine, names, args, "status-quo"), peft=peft)
        for i, level in enumerate(loads):
            run(rep.STATUS, load=open_loop("status-quo", i, level), peft=peft, level=level)
    finally:
        peft.stop()
    return phases


def coserve(args: argparse.Namespace) -> int:
    """Run the phases; print the table and targets; write results.json and results.md."""
    from loraplex.engine.bench import _assets, _cpu_model, _pool_bytes
    from loraplex.engine.cli import engine_config
    from loraplex.engine.engine import Engine
    from loraplex.engine.loader import load_model_spec
    from loraplex.engine.train_memory import pages_needed
    from loraplex.engine.trainer import FinetuneConfig

    ranks, lengths, modules, loads = _check(args)
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
        # As `loraplex serve` does (server/heap.py): the model's objects out of full collections,
        # which otherwise stall every stream ~200 ms now and then.
        gc.collect()
        gc.freeze()
        names, threads = list(adapters), torch.get_num_threads()
        examples = make_examples(args.train_examples, lengths, spec.vocab_size, args.seed)
        (out / "examples.json").write_text(json.dumps(
            [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]))  # fmt: skip
        machine = f"{_cpu_model()}, {os.cpu_count()} cpus, torch {torch.__version__}"
        print(f"model: {model_dir} ({args.dtype}); adapters: {', '.join(names) or 'none'}")
        print(f"load: closed loop of {args.concurrency} x {args.prompt_len} prompt + "
              f"{args.output_len} output tokens, then open loops at "
              f"{', '.join(f'{x:.0%}' for x in loads) or 'none'} of its tokens/s; "
              f"job: {len(examples)} examples of "
              f"{lengths[0]}-{lengths[1]} tokens, rank {args.rank} on {','.join(modules)}, "
              f"batch {args.batch_size}")  # fmt: skip
        print(f"machine: {machine}, torch threads {threads} (the PEFT process too)", flush=True)

        phases = _phases(
            engine,
            names,
            args,
            job_config,
            examples,
            out,
            loads,
            [
                "--model",
                model_dir,
                "--rank",
                str(args.rank),
                "--target-modules",
                ",".join(modules),
                "--threads",
                str(threads),
            ],
        )
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
                    f"tokens over {len(names)} adapters, open loops (Poisson) at "
                    f"{', '.join(f'{x:.0%}' for x in loads) or 'none'} of its tokens/s",
        "job": f"{len(examples)} examples of {lengths[0]}-{lengths[1]} tokens, rank {args.rank} "
               f"on {','.join(modules)}, batch {args.batch_size}, lr {args.learning_rate}",
        "model": model_dir, "pages_train": state + act,
    }  # fmt: skip
    results = {"setup": setup, "phases": phases, "targets": found, "loss_check": checks}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(rep.markdown(phases, lines, setup))
    print(f"\nresults: {out / 'results.json'}, {out / 'results.md'}")
    return 0

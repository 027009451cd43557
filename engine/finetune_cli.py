"""`loraplex finetune`: train a LoRA adapter on a JSONL file with the engine's base model, with
a progress bar (step, loss, tokens/s), and write it as a PEFT directory (engine/trainer.py says
exactly what is computed; engine/finetune_data.py the data formats)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from tqdm import tqdm

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--train", required=True, help="JSONL: prompt/completion or chat messages")
    g.add_argument("--validation", default=None, help="JSONL in the same formats")
    g.add_argument("--output", required=True, help="the adapter's PEFT directory")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--alpha", type=float, default=16.0)
    g.add_argument(
        "--target-modules",
        default="q_proj,v_proj",
        help="comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    )
    g.add_argument("--use-rslora", action="store_true", help="scale alpha / sqrt(rank)")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--learning-rate", type=float, default=1e-4)
    g.add_argument("--shuffle", action="store_true", help="a seeded permutation per epoch")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--init-adapter", default=None, help="start from this PEFT adapter")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="refuse longer examples (default: the engine's max_model_len)")  # fmt: skip


def finetune_config(args: argparse.Namespace):
    from loraplex.engine.trainer import FinetuneConfig

    modules = tuple(m.strip() for m in args.target_modules.split(",") if m.strip())
    return FinetuneConfig(
        rank=args.rank, alpha=args.alpha, target_modules=modules, use_rslora=args.use_rslora,
        epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        learning_rate=args.learning_rate, shuffle=args.shuffle, seed=args.seed,
        max_seq_len=args.max_seq_len, init_adapter=args.init_adapter,
    )  # fmt: skip


def cmd_finetune(args: argparse.Namespace) -> int:
    """The job runs in the engine's step loop, as a co-served job does (with no inference
    here, each step trains one whole micro-batch)."""
    from loraplex.engine.adapter_loader import load_adapter
    from loraplex.engine.cli import engine_config
    from loraplex.engine.engine import Engine
    from loraplex.engine.finetune_data import load_examples

    config = finetune_config(args)
    engine = Engine(engine_config(args))
    tok = engine.tokenizer
    if tok is None:
        raise ValueError(f"{engine.model_dir} has no tokenizer: fine-tuning reads text")
    max_len = config.max_seq_len or engine.max_model_len
    config = dataclasses.replace(config, max_seq_len=max_len)
    train = load_examples(args.train, tok, max_seq_len=max_len)
    valid = load_examples(args.validation, tok, max_seq_len=max_len) if args.validation else None
    init = None
    if config.init_adapter:
        init = load_adapter("init", config.init_adapter, engine.spec, 1 << 30)
    job = engine.submit_finetune("finetune", config, train, args.output, validation=valid,
                                 init_weights=init)  # fmt: skip
    logger.info("fine-tuning: %d examples", len(train))
    bar = tqdm(desc="finetune", unit="step")
    t0, shown = time.perf_counter(), 0
    while not job.finished:
        engine.step()
        bar.total = job.total_steps or None
        for entry in job.log[shown:]:
            tokens = sum(e.tokens for e in job.log[: shown + 1])
            post = {"loss": f"{entry.loss:.4f}",
                    "tok/s": f"{tokens / (time.perf_counter() - t0):.0f}"}  # fmt: skip
            if entry.validation_loss is not None:
                post["val"] = f"{entry.validation_loss:.4f}"
            bar.set_postfix(post)
            bar.update(1)
            shown += 1
    bar.close()
    if job.status.value != "succeeded":
        raise ValueError(f"fine-tuning failed: {job.reason}")
    last = job.log[-1]
    print(f"adapter written to {job.adapter_path} ({len(job.log)} steps, final loss "
          f"{last.loss:.4f})")  # fmt: skip
    return 0

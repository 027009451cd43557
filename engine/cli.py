"""`loraplex` command line: generate, finetune, bench throughput and coserve (serve comes with
the server).

Every command that runs the engine takes the same sizing options (`add_engine_args`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from loraplex.engine.config import ATTENTION_BACKENDS, DTYPES, LORA_BACKENDS, EngineConfig

# (commands, bench commands) -> None: how outer layers add their commands to `loraplex`
ExtraCommands = Callable[[argparse._SubParsersAction, argparse._SubParsersAction], None]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF checkpoint dir (default: embedded demo)")
    g.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a PEFT LoRA adapter directory, repeatable",
    )
    g.add_argument(
        "--adapter-dir",
        default=None,
        metavar="DIR",
        help="register every PEFT adapter folder directly under DIR, named after its folder "
        "(host memory; pool pages on first use); bad folders are skipped with a warning",
    )
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--pool-bytes", type=int, default=None, help="unified pool size in bytes")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV page")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-lora-rank", type=int, default=64)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument(
        "--lora-backend",
        choices=LORA_BACKENDS,
        default="auto",
        help="auto: triton on CUDA, the C kernel (cpu) on the CPU for float32/bfloat16, else torch",
    )
    g.add_argument(
        "--attention-backend",
        choices=ATTENTION_BACKENDS,
        default="auto",
        help="auto: triton on CUDA, the C decode kernel (cpu) on the CPU for float32/bfloat16, "
        "else torch",
    )
    f = p.add_argument_group("co-served fine-tuning (engine/training_jobs.py)")
    f.add_argument(
        "--finetune-max-tokens-per-step", type=int, default=512,
        help="most padded tokens of a training micro-batch",
    )  # fmt: skip
    f.add_argument(
        "--finetune-itl-slo-ms", type=float, default=None,
        help="inter-token latency target of running requests while a job trains: each busy "
        "step trains while it stays under it (default: --finetune-step-share)",
    )  # fmt: skip
    f.add_argument(
        "--finetune-step-share", type=float, default=0.25,
        help="training time as a share of inference time, credited per step and carried across "
        "steps (one unit may overrun; later steps pay it back)",
    )  # fmt: skip
    f.add_argument("--finetune-max-running-jobs", type=int, default=1)


def serve_flags(args: argparse.Namespace) -> list[str]:
    """The engine options of `args` that differ from their defaults, as the flags that give
    another command (`loraplex serve` in a subprocess) the same engine."""
    probe = argparse.ArgumentParser(add_help=False)
    add_engine_args(probe)
    flags = []
    for action in probe._actions:
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or value == action.default:
            continue
        opt = action.option_strings[0]
        if isinstance(action, argparse._AppendAction):
            flags += [x for item in value for x in (opt, str(item))]
        elif action.nargs == 0:
            flags.append(opt)
        else:
            flags += [opt, str(value)]
    return flags


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        pool_bytes=args.pool_bytes,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_lora_rank=args.max_lora_rank,
        max_model_len=args.max_model_len,
        lora_backend=args.lora_backend,
        attention_backend=args.attention_backend,
        finetune_max_tokens_per_step=args.finetune_max_tokens_per_step,
        finetune_itl_slo_ms=args.finetune_itl_slo_ms,
        finetune_step_share=args.finetune_step_share,
        finetune_max_running_jobs=args.finetune_max_running_jobs,
    )


def parse_adapters(items: list[str]) -> dict[str, str]:
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter expects NAME=DIR, got {item!r}")
        if name in adapters:
            raise ValueError(f"--adapter {name!r} given twice")
        adapters[name] = path
    return adapters


def cmd_generate(args: argparse.Namespace) -> int:
    from loraplex.engine.llm import LLM
    from loraplex.scheduler.sequence import SamplingParams

    requests = []
    with open(args.input) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                params = SamplingParams(
                    max_tokens=int(req.get("max_tokens", 16)),
                    temperature=float(req.get("temperature", 1.0)),
                    top_p=float(req.get("top_p", 1.0)),
                    top_k=int(req.get("top_k", 0)),
                    seed=req.get("seed"),
                    ignore_eos=bool(req.get("ignore_eos", False)),
                )
                if not isinstance(req.get("prompt"), str | list):
                    raise ValueError("'prompt' must be a string or a list of token ids")
            except (ValueError, TypeError) as e:
                raise ValueError(f"{args.input}:{lineno}: {e}") from None
            requests.append((req["prompt"], params, req.get("adapter")))
    llm = LLM(
        adapters=parse_adapters(args.adapter), adapter_dir=args.adapter_dir, **_config_kwargs(args)
    )
    outs = llm.generate(
        [r[0] for r in requests], [r[1] for r in requests], [r[2] for r in requests]
    )
    sink = open(args.output, "w") if args.output else sys.stdout
    try:
        for (prompt, _, adapter), out in zip(requests, outs, strict=True):
            row = {
                "prompt": prompt,
                "adapter": adapter,
                "text": out.text,
                "token_ids": out.token_ids,
                "logprobs": out.logprobs,
                "finish_reason": out.finish_reason,
            }
            sink.write(json.dumps(row) + "\n")
    finally:
        if sink is not sys.stdout:
            sink.close()
    return 0


def _config_kwargs(args: argparse.Namespace) -> dict:
    cfg = engine_config(args)
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


def build_parser(
    extra_commands: ExtraCommands | None = None,
) -> argparse.ArgumentParser:
    """The `loraplex` parser; `extra_commands(commands, bench_commands)` adds commands of
    outer layers (`serve`, `bench serve`) without this module importing them."""
    p = argparse.ArgumentParser(prog="loraplex", description="multi-LoRA LLM inference")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="offline generation from a JSONL file")
    add_engine_args(gen)
    gen.add_argument("--input", required=True, help="JSONL: prompt, adapter, max_tokens, ...")
    gen.add_argument("--output", default=None, help="JSONL output (default: stdout)")
    gen.set_defaults(func=cmd_generate)

    from loraplex.engine import finetune_cli

    ft = sub.add_parser("finetune", help="train a LoRA adapter on a JSONL file")
    add_engine_args(ft)
    finetune_cli.add_arguments(ft)
    ft.set_defaults(func=finetune_cli.cmd_finetune)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    thr = bench_sub.add_parser("throughput", help="offline throughput, beside HF PEFT")
    add_engine_args(thr)
    from loraplex.engine import bench as bench_mod

    bench_mod.add_arguments(thr)
    thr.set_defaults(func=bench_mod.throughput)
    cos = bench_sub.add_parser(
        "coserve", help="inference + a fine-tuning job in one engine, beside a PEFT process"
    )
    add_engine_args(cos)
    from loraplex.engine import bench_coserve

    bench_coserve.add_arguments(cos)
    cos.set_defaults(func=bench_coserve.coserve)
    if extra_commands is not None:
        extra_commands(sub, bench_sub)
    return p


def main(
    argv: list[str] | None = None,
    extra_commands: ExtraCommands | None = None,
) -> int:
    args = build_parser(extra_commands).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"loraplex: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`loraplex bench serve`'s options: the sweep, the workload and the comparisons, parsed
and checked (`sweep_points`), and the workload of one point (`workload_spec`)."""

from __future__ import annotations

import argparse
import os

from loraplex.loadtests.workloads import WorkloadSpec

BASELINES = ("peft", "offline")


def _baselines(text: str) -> list[str]:
    """ "none", or a comma list of BASELINES."""
    names = [x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"]
    bad = [x for x in names if x not in BASELINES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown baseline {bad[0]!r}: none or {BASELINES}")
    return names


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _length(text: str) -> tuple[int, int]:
    """ "128" (fixed) or "8:512" (uniform in [8, 512))."""
    lo, sep, hi = text.partition(":")
    return (int(lo), int(hi)) if sep else (int(lo), int(lo))


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bench serve")
    g.add_argument("--url", default=None, help="a running server to load (default: start one)")
    g.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"))
    g.add_argument(
        "--num-adapters",
        type=_ints,
        default=[8],
        metavar="N[,N...]",
        help="sweep over the number of distinct adapters (e.g. 1,8,64,512,2048)",
    )
    g.add_argument(
        "--rates",
        type=_floats,
        default=None,
        metavar="R[,R...]",
        help="sweep over request rates (gamma arrivals) at one --num-adapters",
    )
    g.add_argument(
        "--ranks",
        type=_ints,
        default=[8, 16],
        metavar="R[,R...]",
        help="ranks of the generated adapters, cycled (all seven modules)",
    )
    w = p.add_argument_group("workload")
    w.add_argument("--trace", default=None, help="replay this JSONL trace (workloads.Trace)")
    w.add_argument("--num-requests", type=int, default=256)
    w.add_argument("--concurrency", type=int, default=16, help="closed-loop users")
    w.add_argument(
        "--rate",
        type=float,
        default=None,
        help="requests/s with gamma arrivals (default: closed loop)",
    )
    w.add_argument("--cv", type=float, default=1.0, help="gamma arrivals' CV (1 = Poisson)")
    w.add_argument("--popularity", choices=("uniform", "power", "zipf"), default="uniform")
    w.add_argument("--alpha", type=float, default=1.0, help="power law: 1 uniform, <1 skewed")
    w.add_argument("--zipf-s", type=float, default=1.1)
    w.add_argument("--base-share", type=float, default=0.0, help="share of base-only requests")
    w.add_argument("--prompt-len", type=_length, default=(64, 64), metavar="N|LO:HI")
    w.add_argument("--output-len", type=_length, default=(64, 64), metavar="N|LO:HI")
    w.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="prompt token ids < this (default: the model's config.json)",
    )
    w.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--warmup", type=int, default=8, help="untimed requests per point")
    c = p.add_argument_group("comparison and report")
    c.add_argument(
        "--baseline",
        type=_baselines,
        default=[],
        metavar="none|peft,offline",
        help="also run the trace through HF PEFT (grouped static batches) and/or our engine "
        "offline (no HTTP), at points with a local model",
    )
    c.add_argument("--peft-max-adapters", type=int, default=64)
    c.add_argument("--compare-url", default=None, help="another OpenAI-compatible server")
    c.add_argument("--compare-name", default="other")
    c.add_argument("--compare-api-key", default=None)
    c.add_argument("--ttft-slo", type=float, default=6.0, help="seconds (S-LoRA: 6)")
    c.add_argument("--results", default="bench-results", help="directory for JSON, MD, PNGs")
    c.add_argument("--port", type=int, default=0, help="port of the started server (0: free)")


def sweep_points(args) -> list[tuple[int, float | None]]:
    """The sweep's points (num_adapters, rate); ValueError naming a bad option."""
    for name in ("num_requests", "concurrency"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.num_adapters or min(args.num_adapters) < 0:
        raise ValueError("--num-adapters: non-negative integers, e.g. 1,8,64")
    if args.rates is not None:
        if len(args.num_adapters) != 1:
            raise ValueError("--rates sweeps at one --num-adapters; give a single value")
        if not args.rates or min(args.rates) <= 0:
            raise ValueError("--rates: positive numbers of requests per second")
        return [(args.num_adapters[0], r) for r in args.rates]
    return [(n, args.rate) for n in args.num_adapters]


def workload_spec(args, rate: float | None) -> WorkloadSpec:
    return WorkloadSpec(
        num_requests=args.num_requests,
        arrival="gamma" if rate is not None else "closed",
        rate=rate,
        cv=args.cv,
        concurrency=args.concurrency,
        popularity=args.popularity,
        alpha=args.alpha,
        zipf_s=args.zipf_s,
        base_share=args.base_share,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        seed=args.seed,
    )

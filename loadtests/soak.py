"""The soak test (#18): `python -m loraplex.loadtests.soak [--duration 10m] [--results DIR]`.

For `--duration` (default 10 minutes) three tenants stream requests from the load-test
workloads (loadtests/workloads.py: closed loops of `--concurrency` streams each, token-id
prompts, `ignore_eos`, some as chat) over their own adapters, shared ones and hot-loaded ones,
at `--oversubscription` (2x) more adapter pages in play than the pool holds, so adapters are
loaded and evicted all the time (loadtests/soak_setup.py sizes `--pool-bytes`). Meanwhile:
every `--churn-interval` seconds each tenant loads or unloads one of its hot adapters (POST /
DELETE /v1/adapters; requests for an unloaded one get a deliberate 404), tenant t0 uploads a
small JSONL and fine-tunes an adapter through the OpenAI API (the tuned model then joins its
traffic), and every `--check-interval` seconds the admin checks the pool's integrity
(GET /v1/admin/integrity), the server's RSS is read from /proc and the adapter counters from
/metrics. `--max-queue N` and `--rpm N` (t2's requests_per_minute) make deliberate 429s.
Then the fairness phase (loadtests/soak_fairness.py, `--fairness-seconds`, 0 skips it).

Pass criteria (loadtests/soak_report.py), printed as a table and written with the details to
`--results DIR` as results.json and results.md: no errors but the deliberate ones; every
accepted request completed (finish_reason, all tokens, [DONE]) or ended with an error event;
every integrity check passed and the engine idle at the end; RSS within +5% of its value after
`--warmup` (max and final reported); evictions in every quarter of the run; the load/unload
loop never failed; the fine-tuning job succeeded and its model served; the server exited 0 on
SIGTERM. Exit status 1 when one fails. Fairness (the flood at most doubles the trickle's TTFT
p50 and p99) is reported; `--fairness-gate` makes it a criterion too.

The server: `loraplex serve` started here (the demo, or `--model DIR` with `--adapter-source
DIR`), or `--url URL` for one started with the flags `--prepare-only` prints (same
`--workdir`; `--server-pid PID` to read its RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import sys
import time
from pathlib import Path

from loraplex.loadtests.bench_options import _length
from loraplex.loadtests.server_process import ServerProcess, loraplex_exe
from loraplex.loadtests.soak_fairness import fairness
from loraplex.loadtests.soak_report import criteria, passed, table, write
from loraplex.loadtests.soak_setup import (
    ADMIN,
    TENANTS,
    Assets,
    prepare,
    serve_flags,
)
from loraplex.loadtests.soak_traffic import TUNED, Soak
from loraplex.loadtests.workloads import WorkloadSpec, make_trace

logger = logging.getLogger(__name__)


def seconds(text: str) -> float:
    """ "10m", "45s", or a number of minutes."""
    text = text.strip()
    if text.endswith("s"):
        return float(text[:-1])
    return 60.0 * float(text.removesuffix("m"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loraplex.loadtests.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    a = p.add_argument
    a("--duration", type=seconds, default=600.0, help="10m, 45s, or minutes (default 10m)")
    a("--warmup", type=seconds, default=None, help="RSS reference after this (default 10%%)")
    a("--results", default="results/soak", help="results.json, results.md, server.log")
    a("--workdir", default=None, help="adapters, tenants, state (default RESULTS/work)")
    a("--url", default=None, help="a server started with --prepare-only's flags")
    a("--server-pid", type=int, default=None, help="with --url: the server's pid (RSS)")
    a("--prepare-only", action="store_true", help="write the assets, print the serve flags")
    a("--port", type=int, default=0)
    a("--model", default=None, help="checkpoint (default: the demo)")
    a("--adapter-source", default=None, help="PEFT adapters to derive the soak's from")
    a("--shared-adapters", type=int, default=8)
    a("--owned-adapters", type=int, default=4, help="per tenant, in the tenants file")
    a("--hot-adapters", type=int, default=2, help="per tenant, loaded and unloaded over HTTP")
    a("--oversubscription", type=float, default=2.0, help="adapter pages / pool room for them")
    a("--pool-bytes", type=int, default=None, help="override the computed pool size")
    a("--concurrency", type=int, default=4, help="streams per tenant")
    a("--prompt-len", type=_length, default=(8, 32), metavar="N|LO:HI")
    a("--output-len", type=_length, default=(8, 32), metavar="N|LO:HI")
    a("--chat-share", type=float, default=0.2)
    a("--base-share", type=float, default=0.1)
    a("--vocab-size", type=int, default=None, help="default: the model's config.json")
    a("--max-model-len", type=int, default=512)
    a("--block-size", type=int, default=16)
    a("--max-num-seqs", type=int, default=16)
    a("--max-queue", type=int, default=None, help="server --max-queue (429 queue_full)")
    a("--rpm", type=int, default=0, help="t2's requests_per_minute (429 rate_limit_exceeded)")
    a("--shutdown-timeout", type=float, default=30.0)
    a("--churn-interval", type=float, default=3.0, help="seconds between loads/unloads")
    a("--check-interval", type=float, default=5.0, help="seconds between integrity checks")
    a("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    a("--train-examples", type=int, default=64)
    a("--train-epochs", type=int, default=3)
    a("--train-tokens-per-step", type=int, default=64, help="server --finetune-max-tokens-...")
    a("--fairness-seconds", type=float, default=30.0, help="each of the two phases (0: skip)")
    a("--flood-streams", type=int, default=32)
    a("--trickle-interval", type=float, default=0.5)
    a("--fairness-gate", action="store_true", help="fail the run when fairness misses 2x")
    a("--seed", type=int, default=0)
    return p


def _requests(args, assets: Assets, tenant: str, k: int):
    """Endless requests of `tenant`: seeded traces of 500, one after another."""
    models = [*assets.shared, *assets.owned[tenant], *assets.hot[tenant]]
    models += [TUNED] if tenant == TENANTS[0] else []
    spec = WorkloadSpec(num_requests=500, concurrency=args.concurrency, base_share=args.base_share,
                        prompt_len=args.prompt_len, output_len=args.output_len)  # fmt: skip
    for n in itertools.count():
        trace = make_trace(WorkloadSpec(**{**spec.to_json(), "seed": args.seed + 1000 * k + n}),
                           models, assets.vocab_size)  # fmt: skip
        yield from trace.requests


async def _idle(soak: Soak, timeout: float = 60.0) -> dict:
    """The integrity check once nothing runs or waits (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        async with soak.session.get("/v1/admin/integrity", headers=soak.headers(ADMIN)) as r:
            body = await r.json()
        if r.status != 200:
            return {"ok": False, "status": r.status, "error": body.get("error")}
        state = {"kv": body["pages_used"]["kv"], "train": body["pages_used"]["train"],
                 "running": body["running"], "waiting": body["waiting"]}  # fmt: skip
        state["ok"] = state["kv"] == state["running"] == state["waiting"] == 0
        if state["ok"] or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.5)


async def run(url: str, assets: Assets, args, pid: int | None):
    async with Soak(url, assets, args, pid) as soak:
        stop_at = soak.t0 + args.duration
        stop_checks = asyncio.Event()
        checks = asyncio.ensure_future(soak.check_loop(stop_checks))
        loops = [soak.finetune(TENANTS[0], stop_at)]
        for k, tenant in enumerate(TENANTS):
            loops.append(soak.churn_loop(tenant, stop_at, args.seed + k))
            reqs = _requests(args, assets, tenant, k)
            loops += [soak.tenant_loop(tenant, reqs, stop_at, args.seed + 100 * k + i)
                      for i in range(args.concurrency)]  # fmt: skip
        await asyncio.gather(*loops)
        main_s = time.monotonic() - soak.t0
        await soak.check()
        fair = await fairness(soak, args.fairness_seconds) if args.fairness_seconds > 0 else None
        stop_checks.set()
        await checks
        idle = await _idle(soak)
        await soak.check()
        return soak, fair, idle, main_s


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per probe request otherwise
    out = Path(args.results)
    work = Path(args.workdir or out / "work")
    out.mkdir(parents=True, exist_ok=True)
    assets = Assets.load(str(work)) if args.url else prepare(args, work)
    flags = serve_flags(args, assets)
    if args.prepare_only:
        print("loraplex serve " + " ".join(flags))
        return 0
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 10)
    server = None
    if not args.url:
        server = ServerProcess(loraplex_exe(), flags, args.port, str(out),
                               api_key=assets.keys[ADMIN],
                               stop_timeout=args.shutdown_timeout + 30)  # fmt: skip
    with server or contextlib.nullcontext():
        url = server.url if server else args.url.rstrip("/")
        pid = server.pid if server else args.server_pid
        logger.info("soak: %s for %.0f s against %s (pid %s)", TENANTS, args.duration, url, pid)
        soak, fair, idle, main_s = asyncio.run(run(url, assets, args, pid))
        exit_status = server.stop() if server else None
    rows = criteria(soak, main_s=main_s, warmup_s=warmup, fair=fair, idle=idle,
                    exit_status=exit_status, fairness_gate=args.fairness_gate)  # fmt: skip
    setup = {k: v for k, v in vars(args).items()} | {
        "argv": sys.argv, "serve_flags": flags, "pool_pages": assets.pool_pages,
        "adapters": len(assets.pages), "adapter_pages": assets.adapter_pages,
        "main_phase_s": round(main_s, 1), "warmup_s": warmup,
    }  # fmt: skip
    write(out, setup, soak, rows, fair)
    print(table(rows))
    ok = passed(rows)
    logger.info("soak %s; results in %s", "passed" if ok else "FAILED", out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""HTTP throughput: the offline benchmark's workload, streamed through `loraplex serve`.

`python -m loraplex.loadtests.http_bench [--num-requests 64 --concurrency 16 --num-adapters 8
--prompt-len 64 --output-len 64 --seed 0 --baseline {none,peft} --repeat N --warmup N
--json-out FILE --port 0 --check-outputs --model DIR --adapter NAME=DIR ...]`

1. Runs `loraplex bench throughput` with the same workload (`--no-also-base`, `--json-out`) as
   a subprocess: it builds the bench model if needed, and measures the offline engine (and HF
   PEFT with `--baseline peft`) in its own process. Its JSON gives the model, the adapters and
   every engine option (pool bytes included).
2. Then starts `loraplex serve` with exactly those engine options on a free loopback port,
   waits for `/health`, and drives the same prompts (request i -> adapter i % K) as streamed
   completions, `--concurrency` clients at a time (`loadtests.stream_client.run_streamed`), after
   `--warmup` short rounds. Output tokens are counted from each stream's `usage` chunk;
   TTFT/ITL are measured by the clients.
3. `--repeat N`: N offline and N HTTP timed runs, alternating (offline, HTTP, offline, ...;
   the later offline runs are `bench throughput --baseline none` subprocesses while the server
   sits idle), so that both rows see the same phases of a noisy machine; the fastest run of
   each counts.
4. With `--check-outputs`, sends the workload once more (untimed, with logprobs) and compares
   it to `loraplex generate` on the same requests: same token count, text, and per-token
   log-probabilities within 1e-3 count as identical.
5. Prints one table (offline, HTTP, PEFT rows) and the ratios HTTP / offline (target 0.9x) and
   HTTP / PEFT (target 3x); stops the server with SIGTERM. Exit status 0 unless something
   failed (missed targets are reported, not failures).

Only HTTP and subprocesses: this package does not import the engine or the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from loraplex.loadtests.server_process import CpuMeter, ServerProcess, run_cli
from loraplex.loadtests.stream_client import latency_summary, run_streamed
from loraplex.loadtests.workloads import adapter_names, bench_prompts

logger = logging.getLogger(__name__)

HTTP_TARGET = 0.9  # HTTP / offline, output tok/s
PEFT_TARGET = 3.0  # HTTP / PEFT mixed adapters
ENGINE_FLAGS = ("dtype", "device", "pool_bytes", "block_size", "max_num_seqs",
                "max_num_batched_tokens", "max_lora_rank", "max_model_len", "lora_backend",
                "attention_backend")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loraplex.loadtests.http_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--baseline", choices=("none", "peft"), default="peft")
    p.add_argument(
        "--repeat", type=int, default=1, help="timed runs per row (alternating); fastest counts"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed short rounds per row")
    p.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    p.add_argument(
        "--check-outputs",
        action="store_true",
        help="compare HTTP outputs with `loraplex generate` on the same requests",
    )
    p.add_argument("--model", default=None, help="checkpoint dir (default: the bench model)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="adapters (needed with --model when --num-adapters > 0)")  # fmt: skip
    p.add_argument("--loraplex", default=None, help="the loraplex executable "
                   "(default: next to this Python, else on PATH)")  # fmt: skip
    p.add_argument("--json-out", default=None, help="also write setup, rows, ratios as JSON")
    p.add_argument("--log-level", default="WARNING")
    return p


def loraplex_exe(given: str | None) -> str:
    exe = given or str(Path(sys.executable).with_name("loraplex"))
    if not Path(exe).is_file():
        exe = shutil.which("loraplex") or ""
    if not exe:
        raise SystemExit("http_bench: no `loraplex` executable found (pip install -e .)")
    return exe


def workload_flags(args) -> list[str]:
    return ["--num-requests", str(args.num_requests), "--concurrency", str(args.concurrency),
            "--num-adapters", str(args.num_adapters), "--prompt-len", str(args.prompt_len),
            "--output-len", str(args.output_len), "--seed", str(args.seed),
            "--dtype", args.dtype]  # fmt: skip


def engine_flags(setup: dict) -> list[str]:
    """The offline bench's engine options as `loraplex serve/generate` flags."""
    out = ["--model", setup["model"]]
    for name, path in setup["adapters"].items():
        out += ["--adapter", f"{name}={path}"]
    for key in ENGINE_FLAGS:
        if setup.get(key) is not None:
            out += [f"--{key.replace('_', '-')}", str(setup[key])]
    return out


def run_offline(exe: str, args, tmp: str, baseline: str) -> dict:
    """One timed offline run (after `--warmup` rounds) in a `bench throughput` subprocess."""
    js = os.path.join(tmp, "offline.json")
    argv = [exe, "--log-level", "WARNING", "bench", "throughput", *workload_flags(args),
            "--baseline", baseline, "--no-also-base", "--repeat", "1",
            "--warmup", str(args.warmup), "--json-out", js]  # fmt: skip
    if args.model:
        argv += ["--model", args.model]
    for a in args.adapter:
        argv += ["--adapter", a]
    out = run_cli(argv, "loraplex bench throughput")
    data = json.loads(Path(js).read_text())
    data["stdout"] = out
    return data


def offline_row(data: dict) -> dict:
    return next(r for r in data["rows"] if r["system"] == "loraplex")


def warm_up_http(args, server: ServerProcess, prompts, models) -> None:
    n = min(args.concurrency, len(prompts))
    for _ in range(args.warmup):
        asyncio.run(run_streamed(server.url, prompts[:n], models[:n], min(4, args.output_len), n))


def run_http(args, server: ServerProcess, prompts, models) -> tuple[float, list, CpuMeter]:
    """One timed HTTP run: (wall seconds, results, CPU meter)."""
    with CpuMeter(server.pid) as meter:
        wall, results = asyncio.run(
            run_streamed(server.url, prompts, models, args.output_len, args.concurrency)
        )
    return wall, results, meter


def http_row(args, run: tuple[float, list, CpuMeter]) -> dict:
    wall, results, meter = run
    bad = [r.index for r in results if r.completion_tokens != args.output_len]
    if bad:
        raise SystemExit(f"http_bench: requests {bad[:8]} did not produce {args.output_len} tokens")
    tokens = sum(r.completion_tokens for r in results)
    return {"system": "loraplex", "workload": "HTTP streamed", "requests": len(results),
            "output_tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "other_load": meter.other_load, "client_cpu": meter.own_cores,
            "server_cpu": meter.server_cores, "server_loop_cpu": meter.server_loop_cores,
            **latency_summary(results)}  # fmt: skip


def check_outputs(exe, args, setup, server, prompts, models, tmp) -> tuple[int, int, int]:
    """(identical, same tokens, total): HTTP (streamed, logprobs) against `loraplex generate`.
    Identical: same tokens and text and every log-probability within 1e-3; same tokens: the
    first two only. In bfloat16 the logits' own rounding step is ~1e-2 at typical magnitudes,
    and the engine's bf16 GEMMs round differently at different batch sizes, so only the tokens
    are expected to agree there (and even those can flip at near-ties)."""
    _, http = asyncio.run(run_streamed(server.url, prompts, models, args.output_len,
                                       args.concurrency, logprobs=True))  # fmt: skip
    src, dst = os.path.join(tmp, "gen-in.jsonl"), os.path.join(tmp, "gen-out.jsonl")
    with open(src, "w") as f:
        for p, m in zip(prompts, models, strict=True):
            adapter = None if m == server.base_id else m
            req = {"prompt": p, "adapter": adapter, "max_tokens": args.output_len,
                   "temperature": 0.0, "ignore_eos": True}  # fmt: skip
            f.write(json.dumps(req) + "\n")
    run_cli([exe, "--log-level", "WARNING", "generate", *engine_flags(setup),
             "--input", src, "--output", dst], "loraplex generate")  # fmt: skip
    offline = [json.loads(line) for line in Path(dst).read_text().splitlines()]
    same = same_tokens = 0
    for h, o in zip(http, offline, strict=True):
        lps = zip(h.token_logprobs, o["logprobs"], strict=False)
        tokens = len(h.tokens) == len(o["token_ids"]) and h.text == (o["text"] or "")
        same_tokens += tokens
        same += tokens and all(abs(a - b) <= 1e-3 for a, b in lps)
    return same, same_tokens, len(http)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[dict]) -> str:
    """Aligned table: text columns left, numbers right; latencies in ms ('-': not measured)."""
    head = ("system", "workload", "requests", "out tokens", "wall s", "out tok/s",
            "TTFT p50 ms", "TTFT p90 ms", "ITL p50 ms", "other load")  # fmt: skip
    ms = lambda x: None if x is None else 1000 * x  # noqa: E731
    cells = [head] + [
        (r["system"], r["workload"], str(r["requests"]), str(r["output_tokens"]),
         f"{r['wall_s']:.3f}", f"{r['tok_per_s']:.1f}", _fmt(ms(r.get("ttft_p50")), ".1f"),
         _fmt(ms(r.get("ttft_p90")), ".1f"), _fmt(ms(r.get("itl_p50")), ".1f"),
         _fmt(r.get("other_load"), ".2f"))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(cs, widths, strict=True)))
             for cs in cells]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratios(offline: dict, http: dict, peft: dict | None) -> list[tuple[str, float, float | None]]:
    out = [("HTTP / offline", http["tok_per_s"] / offline["tok_per_s"], HTTP_TARGET)]
    if peft is not None:
        out.append(("HTTP / PEFT", http["tok_per_s"] / peft["tok_per_s"], PEFT_TARGET))
        out.append(("offline / PEFT", offline["tok_per_s"] / peft["tok_per_s"], None))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    for name in ("num_requests", "concurrency", "prompt_len", "output_len", "repeat"):
        if getattr(args, name) < 1:
            raise SystemExit(f"http_bench: --{name.replace('_', '-')} must be >= 1")
    if args.model and args.num_adapters > len(args.adapter):
        raise SystemExit("http_bench: with --model, give at least --num-adapters --adapter dirs")
    exe = loraplex_exe(args.loraplex)
    with tempfile.TemporaryDirectory(prefix="loraplex-http-bench-") as tmp:
        print("offline: loraplex bench throughput ...", flush=True)
        data = run_offline(exe, args, tmp, args.baseline)
        setup, rows = data["setup"], data["rows"]
        offline_runs = [offline_row(data)]
        peft = next((r for r in rows if r["system"] == "peft" and r["workload"] != "base only"),
                    None)  # fmt: skip
        names = list(setup["adapters"])
        vocab = json.loads((Path(setup["model"]) / "config.json").read_text())["vocab_size"]
        prompts = bench_prompts(args.num_requests, args.prompt_len, vocab, args.seed)
        print(f"model: {setup['model']}, adapters: {', '.join(names) or 'none'}")
        print(f"machine: {setup.get('machine')}, torch threads {setup.get('threads')}")
        print(f"HTTP: loraplex serve, {args.concurrency} streaming clients; {args.repeat} offline "
              f"and {args.repeat} HTTP runs, alternating ...", flush=True)  # fmt: skip
        with ServerProcess(exe, engine_flags(setup), args.port, tmp) as server:
            models = [n or server.base_id for n in adapter_names(names, len(prompts))]
            warm_up_http(args, server, prompts, models)
            http_runs = [run_http(args, server, prompts, models)]
            for _ in range(args.repeat - 1):
                offline_runs.append(offline_row(run_offline(exe, args, tmp, "none")))
                http_runs.append(run_http(args, server, prompts, models))
            check = None
            if args.check_outputs:
                check = check_outputs(exe, args, setup, server, prompts, models, tmp)
    offline = min(offline_runs, key=lambda r: r["wall_s"])
    http = http_row(args, min(http_runs, key=lambda r: r[0]))
    all_runs = {"offline_tok_per_s": [r["tok_per_s"] for r in offline_runs],
                "http_tok_per_s": [http["output_tokens"] / w for w, _, _ in http_runs]}  # fmt: skip
    table = [dict(offline, workload=f"offline, {offline['workload']}"), http]
    table += [peft] if peft else []
    print("\n" + format_table(table) + "\n\noutput tok/s ratios:")
    found = ratios(offline, http, peft)
    for label, value, target in found:
        verdict = "" if target is None else f"  (target >= {target}x: "
        verdict += "" if target is None else ("met)" if value >= target else "MISSED)")
        print(f"  {label}: {value:.2f}x{verdict}")
    if args.repeat > 1:
        print("every run, in order (out tok/s): offline "
              + ", ".join(f"{v:.1f}" for v in all_runs["offline_tok_per_s"]) + "; HTTP "
              + ", ".join(f"{v:.1f}" for v in all_runs["http_tok_per_s"]))  # fmt: skip
    other = _fmt(http["other_load"], ".2f")
    print(f"HTTP clients used {http['client_cpu']:.2f} cores, the server "
          f"{http['server_cpu']:.2f} cores, {http['server_loop_cpu']:.2f} of them on its event "
          f"loop thread (other load {other})")  # fmt: skip
    if server.returncode != 0:
        print(f"warning: loraplex serve exited with status {server.returncode} on SIGTERM")
    if check is not None:
        print(f"HTTP greedy outputs identical to the offline engine's: {check[0]}/{check[2]} "
              f"(same tokens and text: {check[1]}/{check[2]})")  # fmt: skip
    if args.json_out:
        out = {"setup": setup | {"workload_seed": args.seed}, "rows": table,
               "ratios": {k: v for k, v, _ in found}, "runs": all_runs,
               "outputs_identical": None if check is None else list(check),
               "server_returncode": server.returncode}  # fmt: skip
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

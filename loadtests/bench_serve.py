"""`loraplex bench serve`: a workload replayed through OpenAI-compatible servers, swept over the
number of adapters or the request rate, with tables and plots.

For each point of the sweep (`--num-adapters 1,8,64,512,2048` at one rate or closed-loop
concurrency, or `--rates` at one number of adapters):
1. a server: `loraplex serve` started with this command's engine options (or `--url`, a
   server already running). Without `--model`/`--adapter`/`--adapter-dir` it serves the bench
   model with n generated adapters (ranks cycling `--ranks`, cached; the engine side builds
   them) registered from an `--adapter-dir`: all in host memory, pool pages on first use;
2. a seeded trace (loadtests/workloads.py) over the first n adapters the server lists in
   `/v1/models` (or `--trace FILE`), saved beside the results so any run can be replayed;
3. an untimed warm-up, then the trace replayed with a progress bar; TTFT, ITL, end-to-end
   latency and tokens are measured by the client (stream_client.replay), adapter loads and
   evictions from the server's `/metrics`, and the CPU this process used (the load generator's
   own cost) by `CpuMeter`;
4. side by side, the same trace against `--compare-url` (any OpenAI-compatible server serving
   the same adapter names) and, with `--baseline peft,offline`, through HF PEFT on grouped
   static batches (points with at most `--peft-max-adapters` adapters) and through our engine
   offline, without HTTP (both run by the engine side, after the server stopped).
Then `results.json`, `results.md` and PNG plots go into `--results DIR` (bench_results.py).
Errors are counted, never fatal; exit status 1 if any request failed.

loadtests imports no engine or server code: what it needs of the engine (the parsed engine
options as `serve` flags, the sweep's assets, the two baselines) comes in as `EngineSide`
from the `loraplex` command that composes the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
from tqdm import tqdm

from loraplex.loadtests.bench_options import sweep_points, workload_spec
from loraplex.loadtests.bench_results import write_results
from loraplex.loadtests.server_process import CpuMeter, ServerProcess, loraplex_exe
from loraplex.loadtests.stream_client import replay, slo_attainment, summarize
from loraplex.loadtests.workloads import Trace, make_trace

logger = logging.getLogger(__name__)

ADAPTER_COUNTERS = ("loraplex_adapter_loads_total", "loraplex_adapter_evictions_total")


@dataclasses.dataclass(frozen=True)
class EngineSide:
    """What bench serve takes from the engine, handed in by the `loraplex` CLI."""

    serve_flags: Callable[[argparse.Namespace], list[str]]  # parsed engine options -> flags
    sweep_assets: Callable[[int, list[int]], tuple[str, str]]  # n, ranks -> (model, adapter dir)
    peft_trace: Callable[..., dict]  # engine/bench_sweep.py:peft_trace
    offline_trace: Callable[..., dict]  # engine/bench_sweep.py:offline_trace


def _headers(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _listed(url: str, key: str | None) -> tuple[str, list[str]]:
    """(the base model's id, the other ids) from `/v1/models`; the base is listed first."""
    data = httpx.get(f"{url}/v1/models", headers=_headers(key), timeout=30).json()["data"]
    ids = [m["id"] for m in data]
    return ids[0], ids[1:]


def _counters(url: str, key: str | None) -> dict[str, float]:
    try:
        text = httpx.get(f"{url}/metrics", headers=_headers(key), timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ADAPTER_COUNTERS:
            out[name.removeprefix("loraplex_adapter_").removesuffix("_total")] = float(value)
    return out


def _vocab(args, model_dir: str | None) -> int:
    if args.vocab_size:
        return args.vocab_size
    if model_dir and (Path(model_dir) / "config.json").is_file():
        return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
    raise SystemExit("bench serve: give --vocab-size for a server whose model is not local")


def _replay(
    url: str, key: str | None, trace: Trace, base_id: str, args, label: str, pid: int | None
) -> tuple[float, list, CpuMeter]:
    """`--warmup` short untimed requests, then the timed replay with a progress bar."""

    def model_for(adapter: str | None) -> str:
        return adapter if adapter is not None else base_id

    headers = _headers(key)
    warm = Trace(
        spec=dataclasses.replace(trace.spec, arrival="closed", rate=None),
        adapters=trace.adapters,
        requests=[
            dataclasses.replace(r, arrival_s=None, output_len=min(4, r.output_len))
            for r in trace.requests[: args.warmup]
        ],
    )
    if warm.requests:
        asyncio.run(replay(url, warm, model_for=model_for, headers=headers, chat=args.chat))
    bar = tqdm(total=len(trace.requests), desc=label, unit="req", file=sys.stderr)
    with CpuMeter(pid or os.getpid()) as cpu:
        wall, results = asyncio.run(
            replay(
                url,
                trace,
                model_for=model_for,
                headers=headers,
                chat=args.chat,
                on_done=lambda r: bar.update(1),
            )
        )
    bar.close()
    return wall, results, cpu


def _row(system: str, n: int, rate, wall, results, cpu: CpuMeter, args) -> dict:
    row = {"system": system, "num_adapters": n, "rate": rate} | summarize(results, wall)
    row["output_tokens"] = sum(r.completion_tokens for r in results if r.error is None)
    row["slo_attainment"] = slo_attainment(results, args.ttft_slo)
    row["client_cores"] = cpu.own_cores
    row["server_cores"] = cpu.server_cores if cpu.server_pid != os.getpid() else None
    row["other_load"] = cpu.other_load  # cores busy elsewhere: noise
    row["ttft_values"] = [r.ttft for r in results if r.error is None and r.t_first is not None]
    row["first_errors"] = sorted({r.error for r in results if r.error})[:5]
    return row


def _local_adapters(args, adapter_dir: str | None) -> dict[str, str]:
    """{name: dir} of the adapters a locally started server was given (for PEFT)."""
    found = {}
    if adapter_dir:
        for d in sorted(Path(adapter_dir).iterdir()):
            if (d / "adapter_config.json").is_file():
                found[d.name] = str(d)
    for item in getattr(args, "adapter", None) or []:
        name, _, path = item.partition("=")
        found[name] = path
    return found


def run_point(args, engine: EngineSide, n: int, rate: float | None, out: Path) -> list[dict]:
    """Every system's row for one point of the sweep."""
    label = f"n{n}" + (f"-rate{rate:g}" if rate is not None else "")
    model_dir, adapter_dir, flags = args.model, getattr(args, "adapter_dir", None), []
    if args.url is None:
        flags = engine.serve_flags(args)
        if not (args.model or args.adapter or adapter_dir):
            model_dir, adapter_dir = engine.sweep_assets(n, args.ranks)
            flags += ["--model", model_dir, "--adapter-dir", adapter_dir]
    server = None if args.url else ServerProcess(loraplex_exe(), flags, args.port, str(out))
    try:
        url = server.__enter__().url if server else args.url.rstrip("/")
        base_id, listed = _listed(url, args.api_key)
        if len(listed) < n:
            raise SystemExit(
                f"bench serve: {label} needs {n} adapters, the server lists {len(listed)}"
            )
        if args.trace:
            trace = Trace.load(args.trace)
        else:
            trace = make_trace(workload_spec(args, rate), listed[:n], _vocab(args, model_dir))
        trace.save(out / f"trace-{label}.jsonl")
        before = _counters(url, args.api_key)
        wall, results, cpu = _replay(
            url,
            args.api_key,
            trace,
            base_id,
            args,
            f"loraplex {label}",
            server.pid if server else None,
        )
        after = _counters(url, args.api_key)
    finally:
        if server:
            server.stop()
    row = _row("loraplex" if server else "target", n, rate, wall, results, cpu, args)
    row |= {f"adapter_{k}": after[k] - before.get(k, 0.0) for k in after}
    rows = [row]
    if args.compare_url:
        curl = args.compare_url.rstrip("/")
        cbase, _ = _listed(curl, args.compare_api_key)
        wall, results, cpu = _replay(
            curl, args.compare_api_key, trace, cbase, args, f"{args.compare_name} {label}", None
        )
        rows.append(_row(args.compare_name, n, rate, wall, results, cpu, args))
    if model_dir:
        rows += _baselines(args, engine, n, rate, model_dir, adapter_dir, trace)
    return rows


def _baselines(args, engine: EngineSide, n, rate, model_dir, adapter_dir, trace) -> list[dict]:
    """The trace's rows through HF PEFT and our engine offline, as `--baseline` asks. Offline,
    a closed loop's concurrency caps the batch as it caps the server's."""
    reqs = [(r.prompt, r.adapter, r.output_len) for r in trace.requests]
    cap = trace.spec.concurrency if trace.spec.arrival == "closed" else None
    runs = []
    if "peft" in args.baseline and n <= args.peft_max_adapters:
        adapters = _local_adapters(args, adapter_dir)
        runs.append(("peft", engine.peft_trace(model_dir, adapters, reqs,
                                               batch_size=args.concurrency, dtype=args.dtype,
                                               device=args.device)))  # fmt: skip
    if "offline" in args.baseline:
        runs.append(("offline", engine.offline_trace(args, model_dir, adapter_dir, reqs, cap)))
    return [
        {
            "system": system,
            "num_adapters": n,
            "rate": rate,
            "requests": r["requests"],
            "errors": 0,
            "req_per_s": r["requests"] / r["wall_s"],
            "output_tok_per_s": r["output_tokens"] / r["wall_s"],
            "output_tokens": r["output_tokens"],
        }
        for system, r in runs
    ]


def main(args: argparse.Namespace, engine: EngineSide) -> int:
    points = sweep_points(args)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, rate in points:
        rows += run_point(args, engine, n, rate, out)
        logger.info("point n=%d rate=%s done", n, rate)
    setup = {k: v for k, v in vars(args).items() if not callable(v)}
    setup["argv"] = sys.argv
    text = write_results(out, setup, rows, sweep="rate" if args.rates else "num_adapters")
    print(text)
    return 1 if any(r.get("errors") for r in rows) else 0

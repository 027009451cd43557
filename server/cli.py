"""`loraplex` command line: the engine's commands (generate, bench) plus `serve`.

`loraplex serve [--model DIR] [--adapter NAME=DIR ...] [--adapter-root DIR] [--tenants FILE]
[--api-key KEY] [--host H] [--port P] [--max-queue N] ...` and every engine option. Without
`--model` it serves the embedded demo model and its adapters. SIGTERM/SIGINT: new requests get
503, in-flight ones get up to `--shutdown-timeout` seconds to finish, then are aborted; the
process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from loraplex.engine import cli as engine_cli

logger = logging.getLogger(__name__)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    engine_cli.add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--adapter-root",
        default=None,
        help="directory under which adapters may be loaded by path (off without it)",
    )
    g.add_argument("--tenants", default=None, metavar="FILE.toml", help="tenants and API keys")
    g.add_argument(
        "--api-key",
        default=os.environ.get("LORAPLEX_API_KEY") or None,
        help="one admin API key (default: $LORAPLEX_API_KEY)",
    )
    g.add_argument("--max-queue", type=int, default=None, help="waiting sequences before 429")
    g.add_argument("--served-model-name", default=None, help="the base model's id in the API")
    g.add_argument(
        "--finetune-dir",
        default=None,
        help="fine-tuning API state (files, jobs, tuned adapters, SQLite); default: "
        "<cache>/finetune/<model id> (cache: $LORAPLEX_CACHE or ~/.cache/loraplex)",
    )
    g.add_argument("--max-file-bytes", type=int, default=512 << 20,
                   help="largest fine-tuning file upload")  # fmt: skip
    g.add_argument("--max-jobs-per-tenant", type=int, default=4,
                   help="fine-tuning jobs of one tenant not yet ended, before 429")  # fmt: skip
    g.add_argument("--max-request-bytes", type=int, default=16 << 20,
                   help="largest request body, file uploads aside (413 over it)")  # fmt: skip
    g.add_argument(
        "--metrics-key",
        default=os.environ.get("LORAPLEX_METRICS_KEY") or None,
        help="a bearer key /metrics asks for (default: $LORAPLEX_METRICS_KEY; none: open)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGTERM",
    )
    g.add_argument(
        "--malloc-trim-interval",
        type=float,
        default=30.0,
        help="seconds between malloc_trim calls, which give freed heap memory back (0: never)",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from loraplex.engine.engine import Engine
    from loraplex.server.app import create_app, default_model_id
    from loraplex.server.config import ServerConfig
    from loraplex.server.finetune_service import cache_dir
    from loraplex.server.heap import freeze_startup_objects
    from loraplex.server.tenants import Tenants
    from loraplex.server.threads import run_in_fresh_thread

    tenants = Tenants.from_options(args.tenants, args.api_key)
    fields = dict(
        adapter_root=args.adapter_root,
        max_queue=args.max_queue,
        shutdown_grace_s=args.shutdown_timeout,
        max_file_bytes=args.max_file_bytes,
        max_jobs_per_tenant=args.max_jobs_per_tenant,
        max_request_bytes=args.max_request_bytes,
        metrics_key=args.metrics_key,
        malloc_trim_s=args.malloc_trim_interval,
    )
    ServerConfig(**fields)  # bad options fail here, before the model loads

    def build():
        engine = Engine(
            engine_cli.engine_config(args),
            engine_cli.parse_adapters(args.adapter),
            adapter_dir=args.adapter_dir,
        )
        model_id = args.served_model_name or default_model_id(engine)
        finetune_dir = args.finetune_dir or str(cache_dir() / "finetune" / model_id)
        config = ServerConfig(model_id=model_id, finetune_dir=finetune_dir, **fields)
        return create_app(engine, config, tenants=tenants)

    # Torch work only on threads that exit or on the engine thread (see run_in_fresh_thread).
    app = run_in_fresh_thread(build)
    freeze_startup_objects()  # the model and app live as long as the process: GC skips them
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=max(1, int(args.shutdown_timeout)),
        access_log=False,
        log_config=None,  # keep our logging setup
    )
    server = _make_server(config, app.state.ctx.aengine)
    logger.info(
        "listening on http://%s:%d (OpenAI API under /v1; event loop %s, HTTP parser %s)",
        args.host,
        args.port,
        *_io_stack(),
    )
    server.run()
    return 0 if server.started else 1


def _io_stack() -> tuple[str, str]:
    """What uvicorn's "auto" loop and http settings pick: the C implementations when installed
    (they are dependencies; without them streaming costs the engine noticeably more CPU)."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def _make_server(config, aengine):
    """A uvicorn.Server whose signal handler first turns new requests away (503). After the
    graceful drain the process exits 0 (uvicorn would re-raise the signal)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            aengine.begin_shutdown()
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

    return Server(config)


def add_outer_commands(
    sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction
) -> None:
    """`serve`, `serve-ray` (server/ray_cli.py), and `bench serve` (the load-test suite's,
    given the engine pieces it needs)."""
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    from loraplex.server import ray_cli  # imports Ray only when the command runs

    serve_ray = sub.add_parser(
        "serve-ray", help="the same API on Ray Serve: N engine replicas, adapters multiplexed"
    )
    ray_cli.add_arguments(serve_ray)
    serve_ray.set_defaults(func=ray_cli.cmd_serve_ray)

    from loraplex.loadtests import bench_options

    bench = bench_sub.add_parser(
        "serve", help="replay workloads through servers, sweep adapters or rates, plot"
    )
    engine_cli.add_engine_args(bench)
    bench_options.add_arguments(bench)
    bench.set_defaults(func=_cmd_bench_serve)


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from loraplex.engine import bench_sweep
    from loraplex.loadtests import bench_serve

    side = bench_serve.EngineSide(
        serve_flags=engine_cli.serve_flags,
        sweep_assets=bench_sweep.sweep_assets,
        peft_trace=bench_sweep.peft_trace,
        offline_trace=bench_sweep.offline_trace,
    )
    return bench_serve.main(args, side)


def build_parser() -> argparse.ArgumentParser:
    return engine_cli.build_parser(add_outer_commands)


def main(argv: list[str] | None = None) -> int:
    """`loraplex`: the engine's commands (generate, bench throughput), `serve` and
    `bench serve`."""
    return engine_cli.main(argv, add_outer_commands)


if __name__ == "__main__":
    sys.exit(main())

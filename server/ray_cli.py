"""`loraplex serve-ray`: the Ray Serve application on a local Ray cluster (or an existing one).

`loraplex serve-ray --replicas N [serve options]` takes every engine and server option of
`loraplex serve` (but the fine-tuning ones) plus:
- `--replicas N`, `--max-adapters-per-replica K` (Ray's `max_num_models_per_replica`),
  `--replica-cpus C`, `--replica-gpus G` (default 1 with `--device cuda`, else 0),
  `--max-ongoing-requests M` (per replica; Ray routes elsewhere beyond it);
- `--ray-address ADDR`: join a running cluster; default: start a local one with `--num-cpus`
  CPUs (default: every core) and `--object-store-bytes` of shared memory.

It starts Ray Serve's HTTP proxy on `--host`/`--port`, deploys the application (`ray_app.py`)
and waits for SIGINT or SIGTERM; then it deletes the application (replicas finish in-flight
requests for up to `--shutdown-timeout` seconds) and stops the local cluster. Exit status 0.
Ray itself is an optional extra: `pip install loraplex[ray]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from loraplex.server.cli import add_serve_args

    add_serve_args(p)
    g = p.add_argument_group("ray serve")
    g.add_argument("--replicas", type=int, default=1, help="engine replicas")
    g.add_argument(
        "--max-adapters-per-replica", type=int, default=64,
        help="adapters registered per replica (host memory) before the least recently used "
        "is evicted: Ray Serve's max_num_models_per_replica",
    )  # fmt: skip
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per engine replica")
    g.add_argument(
        "--replica-gpus", type=float, default=None,
        help="GPUs per engine replica (default: 1 with --device cuda, else 0)",
    )  # fmt: skip
    g.add_argument(
        "--max-ongoing-requests", type=int, default=256,
        help="requests one replica takes at once (Ray Serve routes elsewhere beyond it)",
    )  # fmt: skip
    g.add_argument("--ray-address", default=None,
                   help="a running Ray cluster (default: start a local one)")  # fmt: skip
    g.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local cluster (default: every core)")  # fmt: skip
    g.add_argument("--object-store-bytes", type=int, default=256 << 20,
                   help="shared memory of the local cluster's object store")  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(f"loraplex serve-ray: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The options alone, for `ray_app.build_app`: errors are ValueErrors, not exits."""
    p = _Parser(prog="loraplex serve-ray", add_help=False)
    add_arguments(p)
    return p


def cmd_serve_ray(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("serve-ray needs Ray Serve: pip install 'loraplex[ray]'") from None
    from loraplex.server.ray_app import APP_NAME, application, settings_from_args

    settings = settings_from_args(args)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls of its own
    local = args.ray_address is None
    if local:
        ray.init(num_cpus=args.num_cpus or os.cpu_count(),
                 object_store_memory=args.object_store_bytes, include_dashboard=False)  # fmt: skip
    else:
        ray.init(address=args.ray_address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application(settings), name=APP_NAME, route_prefix="/")
        logger.info(
            "listening on http://%s:%d (OpenAI API under /v1): %d engine replicas, up to %d "
            "adapters each, %d adapters in the catalog", args.host, args.port, settings.replicas,
            settings.max_adapters_per_replica, len(settings.catalog.entries),
        )  # fmt: skip
        while not stop.wait(0.5):
            pass
        logger.info("stopping: in-flight requests get up to %.0f s", args.shutdown_timeout)
        serve.delete(APP_NAME)
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
    return 0

"""The Ray Serve application: its settings, the adapter catalog, and the deployments.

`application(settings)` binds two deployments (docs/ray.md):
- `Ingress` (`ray_ingress.py`): the OpenAI API, tenants and errors of `loraplex serve`; routes
  each request to a replica by Ray Serve's multiplexed routing on the adapter's catalog id.
- `EngineReplica` x `replicas` (`ray_replica.py`): one engine each, the app of `loraplex serve`
  inside, adapters loaded on demand as multiplexed models and evicted LRU beyond
  `max_adapters_per_replica`.

`settings_from_args` turns `loraplex serve-ray` options (the engine and server options of
`loraplex serve` plus the Ray ones, `ray_cli.py`) into `RaySettings`; `build_app(args)` does the
same from a dict, for `serve run` configs and KubeRay (`deploy/ray/`):
`import_path: loraplex.server.ray_app:build_app`, `args: {model: ..., replicas: 2, ...}` (the
option names without dashes; a list for repeatable options).

The catalog is every adapter the application serves: `--adapter NAME=DIR` and the folders of
`--adapter-dir` (shared: every tenant sees them), and the tenants' configured adapters (owned;
paths under `--adapter-root`). Each adapter's files are read and checked once when the
application is built, as `loraplex serve` does at start (nothing is kept: the replicas load
them on demand); files that change afterwards and fail a replica's load answer 400
`invalid_adapter`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.engine.adapter_dir import scan_adapter_dir
from loraplex.engine.adapter_loader import load_adapter
from loraplex.engine.config import EngineConfig
from loraplex.engine.loader import load_model_spec
from loraplex.server.app import DEMO_MODEL_ID
from loraplex.server.protocol import APIError
from loraplex.server.tenants import NAME_RE, AdapterEntry, AdapterNamespace, Tenants

logger = logging.getLogger(__name__)
APP_NAME = "loraplex"


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # the public name
    owner: str | None  # None = shared
    path: str  # the adapter directory (real path)

    @property
    def mux_id(self) -> str:
        """The multiplexed model id: unique across tenants (names hold no '/')."""
        return self.name if self.owner is None else f"{self.owner}/{self.name}"


@dataclass(frozen=True)
class Catalog:
    entries: tuple[CatalogEntry, ...] = ()

    def paths(self) -> dict[str, str]:
        return {e.mux_id: e.path for e in self.entries}

    def namespace(self) -> AdapterNamespace:
        """Public names per tenant, each resolving to its multiplexed id (as engine name)."""
        names = AdapterNamespace()
        for e in self.entries:
            entry = AdapterEntry(e.name, e.mux_id, e.owner, info=e)
            if e.owner is None:
                names.shared[e.name] = entry
            else:
                names.owned.setdefault(e.owner, {})[e.name] = entry
        return names


def build_catalog(
    adapters: dict[str, str],
    adapter_dir: str | None,
    tenants: Tenants,
    adapter_root: str | None,
    model_id: str,
    check: Callable[[str, str], object] = lambda name, path: None,
) -> Catalog:
    """The catalog, every adapter checked by `check(name, path)` (which raises ValueError with
    the reason). As `loraplex serve` starts: a bad `--adapter` or tenant's adapter is an error,
    a bad `--adapter-dir` folder is skipped with a WARNING. ValueError with the reason for a bad
    adapter, a bad name, a name given twice, or a tenant's adapter outside `adapter_root`."""
    from loraplex.server.adapters import confine

    shared: dict[str, str] = {}
    for name, path in adapters.items():
        if not NAME_RE.match(name):
            raise ValueError(f"--adapter: names must match {NAME_RE.pattern}, got {name!r}")
        shared[name] = os.path.realpath(path)
        check(name, shared[name])
    if adapter_dir is not None:
        scanned = scan_adapter_dir(adapter_dir)
        for folder, reason in scanned.skipped:
            logger.warning("adapter dir %s: skipped folder %r: %s", scanned.root, folder, reason)
        for name, path in scanned.found:
            if name in shared:
                raise ValueError(f"adapter name {name!r} given twice: by --adapter and as a "
                                 f"folder of --adapter-dir {adapter_dir}")  # fmt: skip
            try:
                check(name, path)
            except (ValueError, OSError) as e:
                reason = getattr(e, "reason", None) or str(e)
                logger.warning("adapter dir %s: skipped folder %r: %s", scanned.root, name, reason)
                continue
            shared[name] = path
    if model_id in shared:
        raise ValueError(f"adapter '{model_id}' has the base model's name")
    entries = [CatalogEntry(n, None, p) for n, p in sorted(shared.items())]
    for tenant in tenants.by_name.values():
        for name, path in sorted(tenant.adapters.items()):
            try:
                real = confine(adapter_root, path)
            except APIError as e:
                raise ValueError(f"tenant {tenant.name}, adapter {name}: {e.message}") from None
            if name in shared or name == model_id:
                raise ValueError(f"tenant {tenant.name}: adapter name '{name}' is already taken")
            check(f"{tenant.name}/{name}", real)
            entries.append(CatalogEntry(name, tenant.name, real))
    return Catalog(tuple(entries))


@dataclass(frozen=True)
class RaySettings:
    """Everything the deployments need (pickled to their replicas)."""

    engine: EngineConfig
    model_id: str
    catalog: Catalog
    tenants: Tenants
    adapter_root: str | None = None
    max_queue: int | None = None
    shutdown_grace_s: float = 30.0
    replicas: int = 1
    max_adapters_per_replica: int = 64
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_ongoing_requests: int = 256
    log_level: str = "INFO"


def settings_from_args(args: argparse.Namespace) -> RaySettings:
    """`loraplex serve-ray` options -> RaySettings. Without `--model`: the embedded demo and its
    adapters (built once, as `loraplex serve` does). ValueError with the reason."""
    from loraplex.engine import cli as engine_cli

    if args.finetune_dir is not None:
        raise ValueError("serve-ray has no fine-tuning API: --finetune-dir is not supported")
    if args.replicas < 1 or args.max_adapters_per_replica < 1:
        raise ValueError("--replicas and --max-adapters-per-replica must be >= 1")
    config = engine_cli.engine_config(args)
    adapters = engine_cli.parse_adapters(args.adapter)
    if args.model is None:
        from loraplex.engine.demo import ensure_demo

        model_dir, demo = ensure_demo()
        in_dir = scan_adapter_dir(args.adapter_dir).names if args.adapter_dir else set()
        adapters = {**{n: p for n, p in demo.items() if n not in in_dir}, **adapters}
        model_id = args.served_model_name or DEMO_MODEL_ID
    else:
        model_dir = args.model
        model_id = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    # replicas run in other working directories: every path absolute
    config = dataclasses.replace(config, model=os.path.abspath(model_dir))
    root = os.path.abspath(args.adapter_root) if args.adapter_root else None
    if root is not None and not os.path.isdir(root):
        raise ValueError(f"--adapter-root {args.adapter_root!r} is not a directory")
    tenants = Tenants.from_options(args.tenants, args.api_key)
    spec = load_model_spec(config.model)

    def check(name: str, path: str) -> None:  # reads and validates the files, keeps nothing
        load_adapter(name, path, spec, config.max_lora_rank)

    catalog = build_catalog(adapters, args.adapter_dir, tenants, root, model_id, check)
    gpus = args.replica_gpus
    if gpus is None:
        gpus = 1.0 if config.device.startswith("cuda") else 0.0
    return RaySettings(
        engine=config,
        model_id=model_id,
        catalog=catalog,
        tenants=tenants,
        adapter_root=root,
        max_queue=args.max_queue,
        shutdown_grace_s=args.shutdown_timeout,
        replicas=args.replicas,
        max_adapters_per_replica=args.max_adapters_per_replica,
        replica_cpus=args.replica_cpus,
        replica_gpus=gpus,
        max_ongoing_requests=args.max_ongoing_requests,
        log_level=getattr(args, "log_level", "INFO").upper(),
    )


def application(settings: RaySettings):
    """The bound Serve application (`serve.run(application(s), name=APP_NAME)`)."""
    from ray import serve

    from loraplex.server.ray_ingress import Ingress
    from loraplex.server.ray_replica import EngineReplica

    replica = serve.deployment(EngineReplica, name="EngineReplica").options(
        num_replicas=settings.replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus},
        graceful_shutdown_timeout_s=settings.shutdown_grace_s + 5,
    )
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress").options(
        # a relay: it holds a request while a replica runs it, so many at once
        max_ongoing_requests=settings.replicas * settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(settings, replica.bind(settings))


def route_logs(level: str = "INFO") -> None:
    """In a replica: loraplex's log lines go where Ray Serve's own go (the replica's log file
    under the session's logs/serve/, and stderr), at `level` (the root logger is unset)."""
    ours = logging.getLogger("loraplex")
    ours.setLevel(level)
    for handler in logging.getLogger("ray.serve").handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = False


def parse_app_args(args: dict | None) -> argparse.Namespace:
    """A `serve run` config's `args` (option names with '_' or '-', a list for a repeatable
    option) as `loraplex serve-ray` would parse them. ValueError for unknown names or bad
    values (argparse's message)."""
    from loraplex.server import ray_cli

    argv = []
    for key, value in (args or {}).items():
        flag = "--" + str(key).replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            argv += [flag, str(item)]
    return ray_cli.build_parser().parse_args(argv)


def build_app(args: dict | None = None):
    """The application builder of `serve run` configs and KubeRay's `serveConfigV2`
    (`import_path: loraplex.server.ray_app:build_app`)."""
    return application(settings_from_args(parse_app_args(args)))

"""The soak's assets: adapters under an adapter root, a tenants file, a training file, and a pool
sized so the adapters oversubscribe it (loadtests/soak.py).

Contracts:
- Adapters are *variants* of source PEFT adapters (`--adapter-source`, default the demo's in
  `$LORAPLEX_CACHE/demo-v2/adapters`, or ~/.cache/loraplex/...): the config and tensors of a
  source with every `lora_B` scaled by a factor of its own, so each variant is a distinct
  adapter of the source's rank and pool size. loadtests imports no engine code; the files are
  written with safetensors and numpy only.
- Layout under `<workdir>/root` (the server's `--adapter-root`): `shared/s<i>` (registered with
  `--adapter-dir`: every tenant sees them), `owned/<tenant>/o<i>` (the tenants file's
  `adapters`), `hot/<tenant>/h<i>` (loaded and unloaded over HTTP while the soak runs).
- Tenants `t0`, `t1`, `t2` (key `<name>-key`) and the admin `ops` (`ops-key`); `--rpm N` gives
  t2 a `requests_per_minute` limit (its 429s are deliberate).
- The pool: a probe server (same model, the sources as an `--adapter-dir`) reports each
  source's pool pages and the pool's page count for a known size, hence the page size. The
  soak's pool holds the KV of every stream at once, a margin for the fine-tuning job, and
  1/oversubscription of the pages of all the soak's distinct adapters (2: half of them), so
  the LRU loads and evicts adapters all the time. The probe also starts the soak's fine-tuning
  job once and reads the pages it reserves (then cancels it): the pool holds those too, and
  the soak runs jobs back to back, so that room is the job's, not the adapters'.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import load_file, save_file

from loraplex.loadtests.server_process import ServerProcess, loraplex_exe

logger = logging.getLogger(__name__)

TENANTS = ("t0", "t1", "t2")
ADMIN = "ops"
PROBE_POOL_BYTES = 64 << 20
WEIGHTS = "adapter_model.safetensors"


def demo_dir() -> Path:
    """Where `loraplex serve` without --model caches the demo (engine/demo.py: ensure_demo)."""
    cache = os.environ.get("LORAPLEX_CACHE") or Path.home() / ".cache/loraplex"
    return Path(cache) / "demo-v2"


@dataclasses.dataclass
class Assets:
    workdir: str
    root: str  # --adapter-root
    shared: list[str]  # shared adapter names (folders of root/shared)
    owned: dict[str, dict[str, str]]  # tenant -> {name: path under root}
    hot: dict[str, dict[str, str]]  # tenant -> {name: path under root}, loaded over HTTP
    keys: dict[str, str]  # tenant -> API key (ADMIN included)
    pages: dict[str, int]  # every adapter name -> pool pages (owned/hot: "<tenant>/<name>")
    tenants_toml: str
    train_file: str
    pool_bytes: int
    pool_pages: int
    page_bytes: float
    vocab_size: int
    model: str | None

    def save(self) -> None:
        path = Path(self.workdir) / "assets.json"
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, workdir: str) -> Assets:
        return cls(**json.loads((Path(workdir) / "assets.json").read_text()))

    @property
    def adapter_pages(self) -> int:
        return sum(self.pages.values())


def derive_adapter(src: Path, dst: Path, factor: float) -> None:
    """`src`'s config and tensors with every lora_B scaled by `factor`."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(str(src / WEIGHTS))
    out = {k: (v * np.float32(factor)).astype(v.dtype) if "lora_B" in k else v
           for k, v in tensors.items()}  # fmt: skip
    save_file(out, str(dst / WEIGHTS))


def _sources(args) -> Path:
    if args.adapter_source:
        return Path(args.adapter_source)
    if args.model:
        raise SystemExit("soak: with --model give --adapter-source DIR (PEFT adapters of it)")
    return demo_dir() / "adapters"


def job_body(base_id: str, file_id: str, epochs: int) -> dict:
    """The soak's fine-tuning job (the probe measures its pages with the same body)."""
    hp = {"n_epochs": epochs, "batch_size": 8, "learning_rate_multiplier": 10}
    return {"model": base_id, "training_file": file_id, "suffix": "soak",
            "hyperparameters": hp, "lora_rank": 8}  # fmt: skip


def _train_pages(h: httpx.Client, base_id: str, train_file: Path) -> int:
    """Pool pages the soak's job reserves: one started, read while it runs, cancelled."""
    files = {"file": ("train.jsonl", train_file.read_bytes())}
    file_id = h.post("/v1/files", files=files, data={"purpose": "fine-tune"}).json()["id"]
    r = h.post("/v1/fine_tuning/jobs", json=job_body(base_id, file_id, 50))
    if r.status_code != 200:
        raise SystemExit(f"soak: the probe's fine-tuning job was refused: {r.text}")
    job = r.json()
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            pages = h.get("/v1/admin/integrity").json()["pages_used"]["train"]
            if pages:
                return pages
            if h.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "failed":
                break
            time.sleep(0.05)
    finally:
        h.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    raise SystemExit(f"soak: the probe's fine-tuning job did not start: {job}")


def probe(args, source: Path, workdir: Path, train_file: Path) -> tuple[dict[str, int], int, int]:
    """({source adapter: pool pages}, pool pages of PROBE_POOL_BYTES, the job's pool pages)
    from a probe server."""
    flags = [*(["--model", args.model] if args.model else []), "--pool-bytes",
             str(PROBE_POOL_BYTES), "--finetune-dir", str(workdir / "probe" / "finetune"),
             *engine_flags(args)]  # fmt: skip
    if args.model:  # the demo registers its own adapters; a model's come from the source dir
        flags += ["--adapter-dir", str(source)]
    logger.info("probing adapter and job sizes with a %d MiB pool", PROBE_POOL_BYTES >> 20)
    shutil.rmtree(workdir / "probe", ignore_errors=True)
    (workdir / "probe").mkdir(parents=True)
    with ServerProcess(loraplex_exe(), flags, 0, str(workdir / "probe")) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as h:
            listed = h.get("/v1/adapters").json()["data"]
            total = h.get("/v1/admin/integrity").json()["pages_total"]
            train = _train_pages(h, srv.base_id, train_file)
    pages = {a["id"]: a["pool_pages"] for a in listed if (source / a["id"] / WEIGHTS).is_file()}
    if not pages:
        raise SystemExit(f"soak: no adapter of {source} was served by the probe server")
    return pages, total, train


def engine_flags(args) -> list[str]:
    return ["--max-model-len", str(args.max_model_len), "--block-size", str(args.block_size),
            "--max-num-seqs", str(args.max_num_seqs), "--finetune-max-tokens-per-step",
            str(args.train_tokens_per_step)]  # fmt: skip


def _vocab(args) -> int:
    model = Path(args.model) if args.model else demo_dir() / "model"
    return int(json.loads((model / "config.json").read_text())["vocab_size"])


def _training_lines(n: int, seed: int) -> list[str]:
    """The README's first-word task: "a few words ->" answered with " a"."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = []
    for _ in range(n):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 5)))
                 for _ in range(rng.randint(1, 3))]  # fmt: skip
        lines.append(json.dumps({"prompt": " ".join(words) + " ->", "completion": " " + words[0]}))
    return lines


def _tenants_toml(keys: dict[str, str], owned: dict[str, dict[str, str]], rpm: int) -> str:
    out = []
    for t in TENANTS:
        adapters = ", ".join(f'"{n}" = "{p}"' for n, p in owned[t].items())
        out += ["[[tenants]]", f'name = "{t}"', f'api_keys = ["{keys[t]}"]',
                f"adapters = {{ {adapters} }}"]  # fmt: skip
        if t == "t2" and rpm:
            out.append(f"requests_per_minute = {rpm}")
        out.append("")
    out += ["[[tenants]]", f'name = "{ADMIN}"', f'api_keys = ["{keys[ADMIN]}"]', "admin = true"]
    return "\n".join(out) + "\n"


def prepare(args, workdir: Path) -> Assets:
    """Write the soak's adapters, tenants file and training file; size the pool."""
    workdir.mkdir(parents=True, exist_ok=True)
    source = _sources(args)
    if not args.model and not (source.is_dir()):
        logger.info("the demo is not built yet: the probe server builds it (2-3 minutes)")
    train = workdir / "train.jsonl"
    train.write_text("\n".join(_training_lines(args.train_examples, args.seed)) + "\n")
    src_pages, probe_pages, train_pages = probe(args, source, workdir, train)
    page_bytes = PROBE_POOL_BYTES / probe_pages  # >= the real page size (pages are floored)
    names = sorted(src_pages)
    root = workdir / "root"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(workdir / "finetune", ignore_errors=True)  # every soak starts with no jobs
    counter = iter(range(10**6))
    pages: dict[str, int] = {}

    def variant(rel: str, key: str) -> None:
        i = next(counter)
        src = names[i % len(names)]
        derive_adapter(source / src, root / rel, 0.5 + 0.25 * (i % 7))
        pages[key] = src_pages[src]

    shared = [f"s{i}" for i in range(args.shared_adapters)]
    for n in shared:
        variant(f"shared/{n}", n)
    owned = {t: {f"o{i}": f"owned/{t}/o{i}" for i in range(args.owned_adapters)} for t in TENANTS}
    hot = {t: {f"h{i}": f"hot/{t}/h{i}" for i in range(args.hot_adapters)} for t in TENANTS}
    for group in (owned, hot):
        for t, adapters in group.items():
            for n, rel in adapters.items():
                variant(rel, f"{t}/{n}")
    keys = {t: f"{t}-key" for t in (*TENANTS, ADMIN)}
    toml = workdir / "tenants.toml"
    toml.write_text(_tenants_toml(keys, owned, args.rpm))
    streams = args.concurrency * len(TENANTS)
    per_seq = math.ceil((args.prompt_len[1] + args.output_len[1]) / args.block_size)
    adapter_room = math.ceil(sum(pages.values()) / args.oversubscription)
    pool_pages = streams * per_seq + adapter_room + train_pages
    pool_bytes = args.pool_bytes or math.ceil(pool_pages * page_bytes)
    assets = Assets(
        workdir=str(workdir), root=str(root), shared=shared, owned=owned, hot=hot, keys=keys,
        pages=pages, tenants_toml=str(toml), train_file=str(train), pool_bytes=pool_bytes,
        pool_pages=int(pool_bytes // page_bytes), page_bytes=page_bytes,
        vocab_size=args.vocab_size or _vocab(args), model=args.model,
    )  # fmt: skip
    assets.save()
    logger.info(
        "%d adapters (%d pool pages in all) under %s; pool %d bytes, about %d pages "
        "(%d for the KV of %d streams, %d for the fine-tuning job, %d for adapters: %.1fx "
        "oversubscribed)", len(pages), assets.adapter_pages, root, pool_bytes, assets.pool_pages,
        streams * per_seq, streams, train_pages, adapter_room,
        assets.adapter_pages / max(1, adapter_room),
    )  # fmt: skip
    return assets


def serve_flags(args, assets: Assets) -> list[str]:
    """`loraplex serve` flags for the soak's server."""
    flags = ["--model", assets.model] if assets.model else []
    flags += ["--adapter-dir", str(Path(assets.root) / "shared"), "--adapter-root", assets.root,
              "--tenants", assets.tenants_toml, "--pool-bytes", str(assets.pool_bytes),
              "--finetune-dir", str(Path(assets.workdir) / "finetune"),
              "--shutdown-timeout", str(args.shutdown_timeout), *engine_flags(args)]  # fmt: skip
    if args.max_queue:
        flags += ["--max-queue", str(args.max_queue)]
    return flags

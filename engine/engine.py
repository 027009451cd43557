"""`Engine`: requests in, `StepOutput`s out, one step at a time.

The step reads schedule -> prepare -> forward -> sample -> postprocess. The engine is
single-threaded; a server drives `step()` from its own thread.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.engine.adapter_dir import DirReport, register_adapter_dir, scan_adapter_dir
from loraplex.engine.adapters import AdapterInfo, AdapterRegistry, PreparedAdapter
from loraplex.engine.config import EngineConfig
from loraplex.engine.loader import ModelSpec, load_checkpoint, load_model_spec
from loraplex.engine.model import Model
from loraplex.engine.runner import Runner
from loraplex.engine.sampler import Sampler
from loraplex.memory.adapter_store import AdapterStore
from loraplex.memory.integrity import check_all
from loraplex.memory.kv_cache import KVCacheManager
from loraplex.memory.pool import PagePool
from loraplex.scheduler.batcher import Batcher, SchedulerConfig
from loraplex.scheduler.sequence import FinishReason, SamplingParams, Sequence, StepOutput

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_POOL_FRACTION, CPU_POOL_CAP = 0.25, 4 << 30
GPU_POOL_FRACTION = 0.90


def default_pool_bytes(device: torch.device) -> int:
    """Pool size when none is given: 90% of free GPU memory (after the weights), or on the CPU
    a quarter of available memory capped at 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_POOL_FRACTION)
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(min(avail * CPU_POOL_FRACTION, CPU_POOL_CAP))


def _cpu_backend(config: EngineConfig, name: str, spec: ModelSpec) -> str:
    """config.backend(name) for "lora" or "attention", checked: a "cpu" kernel must build here
    (and attention's must handle the model's heads). auto falls back to the torch path (same
    results, slower) with a warning; an explicit "cpu" is an error."""
    backend = config.backend(name)
    if backend != "cpu":
        return backend
    from loraplex.kernels.cpu_build import call_entry_available, cpu_kernel_error

    error = cpu_kernel_error()
    if error is None and name == "attention":
        from loraplex.kernels.attention_cpu import decode_kernel_refusal

        refusal = decode_kernel_refusal(
            spec.num_heads, spec.num_kv_heads, spec.head_dim, DTYPES[config.dtype]
        )
        error = refusal and f"the decode kernel does not handle {refusal}"
    if error is None:
        if name == "lora":
            call_entry_available()  # built now rather than in the first step
        return backend
    if getattr(config, f"{name}_backend") == "cpu":
        raise RuntimeError(f"{name}_backend 'cpu': {error}")
    logger.warning("using the torch %s path (slower): %s", name, error)
    return "torch"


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and memory, for metrics (cheap to take each step)."""

    running: int = 0
    waiting: int = 0
    pages_total: int = 0
    pages_kv: int = 0
    pages_adapter: int = 0
    adapters_device: int = 0
    adapters_host: int = 0
    adapter_loads: int = 0
    adapter_evictions: int = 0


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        adapters: dict[str, str] | None = None,
        adapter_dir: str | os.PathLike | None = None,
    ) -> None:
        """`adapters` maps names to PEFT directories (a bad one fails the start);
        `adapter_dir` registers every adapter folder under it (engine/adapter_dir.py: bad ones
        are skipped with a warning). ValueError if a name comes from both."""
        self.config = config
        scanned = scan_adapter_dir(adapter_dir) if adapter_dir is not None else None
        if scanned is not None:
            twice = sorted(scanned.names & set(adapters or {}))
            if twice:
                raise ValueError(
                    f"adapter name{'s' * (len(twice) > 1)} {', '.join(map(repr, twice))} given "
                    f"twice: by --adapter and as a folder of --adapter-dir {scanned.root}"
                )
        model_dir = config.model
        if model_dir is None:
            from loraplex.engine.demo import ensure_demo

            model_dir, demo_adapters = ensure_demo()
            in_dir = scanned.names if scanned is not None else set()
            demo_adapters = {n: p for n, p in demo_adapters.items() if n not in in_dir}
            adapters = {**demo_adapters, **(adapters or {})}
        self.model_dir = str(model_dir)
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.spec = spec = load_model_spec(model_dir)
        self.tokenizer = _load_tokenizer(model_dir)
        tensors = load_checkpoint(model_dir, spec, self.dtype, self.device)
        self.max_model_len = config.max_model_len or min(spec.max_position_embeddings, 8192)

        # The unified pool: one tensor of pages; see memory/pool.py for the geometry.
        page_elems = spec.num_layers * 2 * config.block_size * spec.kv_dim
        page_bytes = page_elems * torch.finfo(self.dtype).bits // 8
        pool_bytes = config.pool_bytes or default_pool_bytes(self.device)
        num_pages = pool_bytes // page_bytes
        kv_pages_one = -(-self.max_model_len // config.block_size)
        if num_pages < kv_pages_one:
            raise ValueError(
                f"pool of {pool_bytes} bytes holds {num_pages} pages of {page_bytes} bytes; one "
                f"request of max_model_len={self.max_model_len} tokens needs {kv_pages_one} pages "
                f"({kv_pages_one * page_bytes} bytes) plus its adapter: raise --pool-bytes or "
                f"lower --max-model-len"
            )
        self.pool_tensor = _zeroed_pool(num_pages, page_elems, self.dtype, self.device)
        self.pool = PagePool(num_pages)
        self.page_bytes = page_bytes
        self.kv = KVCacheManager(self.pool, config.block_size)
        self.store = AdapterStore(self.pool)
        self.adapters = AdapterRegistry(spec, self.store, self.pool_tensor, config.max_lora_rank)

        lora_backend = _cpu_backend(config, "lora", spec)
        attention_backend = _cpu_backend(config, "attention", spec)
        self.backends = {"lora": lora_backend, "attention": attention_backend}
        self.model = Model(
            spec, tensors, self.pool_tensor, config.block_size, self.max_model_len,
            lora_backend, attention_backend,
        )  # fmt: skip
        self.runner = Runner(
            self.model, self.adapters, self.device, lora_backend, attention_backend
        )
        self.sampler = Sampler()
        self.batcher = Batcher(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                starvation_steps=config.starvation_steps,
            ),
            self.kv,
            self.store,
        )
        for name, path in (adapters or {}).items():
            info = self.add_adapter(name, path)
            if info.num_pages + kv_pages_one > num_pages:
                raise ValueError(
                    f"pool of {pool_bytes} bytes ({num_pages} pages) is too small: adapter "
                    f"'{name}' ({info.num_pages} pages) plus one request of {self.max_model_len} "
                    f"tokens ({kv_pages_one} pages) needs "
                    f"{(info.num_pages + kv_pages_one) * page_bytes} bytes"
                )
        self.adapter_dir: DirReport | None = None  # what --adapter-dir registered and skipped
        if scanned is not None:
            self.adapter_dir = register_adapter_dir(
                self.adapters, scanned, max_pages=num_pages - kv_pages_one
            )
        self._requests: dict[str, Sequence] = {}
        logger.info(
            "engine: %s (%s, %s), pool %d pages x %d bytes = %.1f MiB, %d adapters",
            model_dir,
            config.dtype,
            self.device,
            num_pages,
            page_bytes,
            num_pages * page_bytes / 2**20,
            len(self.adapters.by_name),
        )

    # -- adapters ----------------------------------------------------------------------------

    def add_adapter(self, name: str, path: str, *, pinned: bool = False) -> AdapterInfo:
        return self.adapters.add(name, path, pinned=pinned)

    def prepare_adapter(self, name: str, path: str) -> PreparedAdapter:
        """Thread-safe first half of `add_adapter` (file I/O, validation, packing): run it off
        the engine thread, then `register_adapter` on it."""
        return self.adapters.prepare(name, path)

    def register_adapter(self, prepared: PreparedAdapter, *, pinned: bool = False) -> AdapterInfo:
        return self.adapters.register(prepared, pinned=pinned)

    def remove_adapter(self, name: str) -> None:
        """Unregister an adapter. RuntimeError if a queued or running request still uses it."""
        uid = self.adapters.uid_of(name)
        if self.batcher.uses_adapter(uid):
            raise RuntimeError(f"adapter '{name}' is in use by queued or running requests")
        self.adapters.remove(name)

    # -- requests ----------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_dir} has no tokenizer: pass token ids")
            return list(self.tokenizer(prompt)["input_ids"])
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.spec.vocab_size}): {bad[:5]}")
        return ids

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        adapter_id: str | None = None,
    ) -> Sequence:
        """Queue a request. Errors (nothing queued): ValueError for bad input or a request that
        could never fit; UnknownAdapterError for an adapter name that is not loaded."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        uid = self.adapters.uid_of(adapter_id) if adapter_id is not None else None
        seq = Sequence(
            request_id=request_id,
            token_ids=self.tokenize(prompt),
            params=params,
            adapter_id=adapter_id,
            adapter_uid=uid,
            eos_token_ids=self.spec.eos_token_ids,
        )
        self.batcher.add(seq)
        self._requests[request_id] = seq
        return seq

    def abort(self, request_id: str) -> bool:
        seq = self.batcher.abort(request_id)
        self._requests.pop(request_id, None)
        return seq is not None

    def has_unfinished(self) -> bool:
        return self.batcher.has_unfinished()

    def get_sequence(self, request_id: str) -> Sequence | None:
        return self._requests.get(request_id)

    def step(self) -> list[StepOutput]:
        batch = self.batcher.schedule()
        if batch is None:
            return []
        meta, sampling = self.runner.prepare(batch)
        logits = self.runner.forward(meta)
        sampled = self.sampler(logits, sampling)
        outputs = self.batcher.postprocess(batch, sampled)
        for out in outputs:
            if out.finished:
                self._requests.pop(out.request_id, None)
        return outputs

    def stats(self) -> EngineStats:
        b, p, s = self.batcher, self.pool, self.store
        return EngineStats(
            running=len(b.running),
            waiting=len(b.waiting),
            pages_total=p.num_pages,
            pages_kv=p.pages_used("kv"),
            pages_adapter=p.pages_used("adapter"),
            adapters_device=s.num_resident,
            adapters_host=s.num_registered,
            adapter_loads=s.loads,
            adapter_evictions=s.evictions,
        )

    def check_integrity(self) -> None:
        """Every page owned exactly once; KV tables and adapter residency consistent."""
        check_all(self.pool, self.kv, self.store)
        running = {s.seq_id for s in self.batcher.running}
        if set(self.kv.seq_ids()) - running:
            raise AssertionError(
                f"KV pages held by sequences that are not running: "
                f"{sorted(set(self.kv.seq_ids()) - running)}"
            )


def _zeroed_pool(
    num_pages: int, page_elems: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The pool tensor [num_pages, page_elems], all zeros (padding slots of the KV cache are read
    before being masked, so they must never hold NaN). On the CPU it is backed by an anonymous
    mmap: the kernel hands out zero pages on first touch, so a large pool costs nothing until
    used (torch.zeros would write every byte at start)."""
    if device.type != "cpu":
        return torch.zeros(num_pages, page_elems, dtype=dtype, device=device)
    nbytes = num_pages * page_elems * torch.finfo(dtype).bits // 8
    # private: a shared anonymous mapping is shmem, which gets no transparent huge pages
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # Every decode step streams each running adapter's weights out of the pool: 2 MiB pages
        # spare TLB misses and let the hardware prefetchers run past 4 KiB boundaries
        # (the git history of docs/benchmarks.md). Only a hint; /proc/<pid>/smaps
        # AnonHugePages shows it took.
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError as e:
            logger.debug("no transparent huge pages for the pool: %s", e)
    return torch.frombuffer(buf, dtype=dtype).view(num_pages, page_elems)


def _load_tokenizer(model_dir: str):
    d = Path(model_dir)
    if not any(
        (d / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


__all__ = ["Engine", "FinishReason"]

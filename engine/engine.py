"""`Engine`: requests in, `StepOutput`s out, one step at a time.

The step reads schedule -> prepare -> forward -> sample -> postprocess. The engine is
single-threaded; a server drives `step()` from its own thread.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from loraplex.engine.adapter_dir import DirReport, register_adapter_dir, scan_adapter_dir
from loraplex.engine.adapters import AdapterInfo, AdapterRegistry, PreparedAdapter
from loraplex.engine.config import EngineConfig
from loraplex.engine.engine_setup import (
    DTYPES,
    cpu_backend,
    default_pool_bytes,
    load_tokenizer,
    zeroed_pool,
)
from loraplex.engine.engine_stats import EngineStats, StatsTaker
from loraplex.engine.finetune_job import CoserveConfig, FinetuneJob, StepLoad
from loraplex.engine.loader import load_checkpoint, load_model_spec
from loraplex.engine.model import Model
from loraplex.engine.runner import Runner
from loraplex.engine.sampler import Sampler
from loraplex.engine.trainer import FinetuneConfig
from loraplex.engine.training_jobs import TrainingJobs
from loraplex.memory.adapter_store import AdapterStore
from loraplex.memory.integrity import check_all
from loraplex.memory.kv_cache import KVCacheManager
from loraplex.memory.pool import PagePool
from loraplex.memory.train_pages import TrainingPages
from loraplex.scheduler.batcher import Batcher, SchedulerConfig
from loraplex.scheduler.sequence import FinishReason, SamplingParams, Sequence, StepOutput

logger = logging.getLogger(__name__)


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
        self.tokenizer = load_tokenizer(model_dir)
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
        self.pool_tensor = zeroed_pool(num_pages, page_elems, self.dtype, self.device)
        self.pool = PagePool(num_pages)
        self.page_bytes = page_bytes
        self.kv = KVCacheManager(self.pool, config.block_size)
        self.store = AdapterStore(self.pool)
        self.adapters = AdapterRegistry(spec, self.store, self.pool_tensor, config.max_lora_rank)

        lora_backend = cpu_backend(config, "lora", spec)
        attention_backend = cpu_backend(config, "attention", spec)
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
        self.train_pages = TrainingPages(self.pool)
        tok = self.tokenizer
        self.training = TrainingJobs(
            self.model, self.pool_tensor, self.train_pages, self.store,
            CoserveConfig(
                max_tokens_per_step=config.finetune_max_tokens_per_step,
                itl_slo_ms=config.finetune_itl_slo_ms,
                step_share=config.finetune_step_share,
                max_running_jobs=config.finetune_max_running_jobs,
                max_num_batched_tokens=config.max_num_batched_tokens,
            ),
            pad_id=tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0,
            register=lambda name, path: self.add_adapter(name, path),
            model_name=self.model_dir,
        )  # fmt: skip
        self._requests: dict[str, Sequence] = {}
        self._stats = StatsTaker(self.batcher, self.pool, self.store, self.training,
                                 config.max_num_seqs)  # fmt: skip
        self.step_failures = 0
        self.failing: str | None = None  # the last inference step's error, until one succeeds
        self._decode_step_s = 0.0  # inference time of the last decode-only step (training's
        # estimate of the step it runs before)
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
        tenant: str | None = None,
    ) -> Sequence:
        """Queue a request (of `tenant`: admission shares the engine fairly between tenants).
        Errors (nothing queued): ValueError for bad input or a request that could never fit;
        UnknownAdapterError for an adapter name that is not loaded."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        uid = self.adapters.uid_of(adapter_id) if adapter_id is not None else None
        seq = Sequence(
            request_id=request_id,
            token_ids=self.tokenize(prompt),
            params=params,
            adapter_id=adapter_id,
            adapter_uid=uid,
            tenant=tenant,
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
        """Requests queued or running, or fine-tuning jobs queued or running."""
        return self.batcher.has_unfinished() or self.training.active

    # -- fine-tuning (engine/training_jobs.py) -----------------------------------------------

    def submit_finetune(
        self,
        job_id: str,
        config: FinetuneConfig,
        examples: list,
        output_dir: str,
        *,
        validation: list | None = None,
        adapter_name: str | None = None,
        init_weights=None,
        checkpoint_dir: str | None = None,
    ) -> FinetuneJob:
        """Queue a fine-tuning job; it trains in the engine's steps beside inference, writes
        the adapter to `output_dir` and, with `adapter_name`, registers it for serving.
        ValueError (nothing queued) for bad input, a name already registered or one that could
        never fit; see TrainingJobs.submit."""
        if adapter_name is not None and adapter_name in self.adapters.by_name:
            raise ValueError(f"adapter name {adapter_name!r} is already registered")
        return self.training.submit(
            job_id, config, examples, output_dir, validation=validation,
            adapter_name=adapter_name, init_weights=init_weights, checkpoint_dir=checkpoint_dir,
        )  # fmt: skip

    def cancel_finetune(self, job_id: str) -> bool:
        return self.training.cancel(job_id)

    def finetune_job(self, job_id: str) -> FinetuneJob | None:
        return self.training.jobs.get(job_id)

    def get_sequence(self, request_id: str) -> Sequence | None:
        return self._requests.get(request_id)

    def step(self) -> list[StepOutput]:
        """One step: schedule -> train -> prepare -> forward -> sample -> postprocess. Training
        (engine/training_jobs.py) runs once the step's batch is known, so that it knows what
        it delays: a step with a prefill gets none, a decode-only step what its policy leaves
        (estimated from the last decode-only step's inference time), an idle step one unit."""
        t0 = time.perf_counter()
        outputs: list[StepOutput] = []
        batch = self.batcher.schedule()
        scheduled = time.perf_counter() - t0
        prefill = batch is not None and self._has_prefill(batch)
        if self.training.active:
            tokens = batch.num_tokens if batch is not None else 0
            self.training.run(StepLoad(tokens, self._decode_step_s if tokens else 0.0, prefill))
        t1 = time.perf_counter()
        if batch is not None:
            try:
                meta, sampling = self.runner.prepare(batch)
                logits = self.runner.forward(meta)
                sampled = self.sampler(logits, sampling)
            except Exception as e:  # the batch fails; the engine goes on (_fail_batch)
                outputs = self._fail_batch(batch, e)
            else:
                outputs = self.batcher.postprocess(batch, sampled)
                self.failing = None
            for out in outputs:
                if out.finished:
                    self._requests.pop(out.request_id, None)
            if not prefill:
                self._decode_step_s = scheduled + time.perf_counter() - t1
        return outputs

    @staticmethod
    def _has_prefill(batch) -> bool:
        return any(i.num_tokens > 1 or not i.seq.output_token_ids for i in batch.items)

    def _fail_batch(self, batch, error: Exception) -> list[StepOutput]:
        """A step's prepare, forward or sample raised: its sequences end with an error and free
        their pages; adapters made resident for it are evicted when nothing holds them (their
        copy may be partial); everything else goes on as if the step had not been scheduled."""
        logger.exception("step %d failed; failing its %d sequences", batch.step, len(batch.items))
        self.step_failures += 1
        self.failing = f"{type(error).__name__}: {error}"
        outputs = self.batcher.fail(batch, f"internal error in the engine step: {self.failing}")
        for uid in batch.loaded_adapters:
            if (
                self.store.is_resident(uid)
                and not self.store.refcount(uid)
                and not (self.store.is_pinned(uid))
            ):
                self.store.evict(uid)
        return outputs

    def stats(self) -> EngineStats:
        return self._stats.take(self.step_failures, self.failing)

    def check_integrity(self) -> None:
        """Every page owned exactly once; KV tables, adapter residency and fine-tuning jobs'
        pages consistent."""
        check_all(self.pool, self.kv, self.store, self.train_pages)
        self.training.check_integrity()
        self.batcher.fair.check_integrity([*self.batcher.waiting, *self.batcher.running])
        running = {s.seq_id for s in self.batcher.running}
        if set(self.kv.seq_ids()) - running:
            raise AssertionError(
                f"KV pages held by sequences that are not running: "
                f"{sorted(set(self.kv.seq_ids()) - running)}"
            )


__all__ = ["Engine", "FinishReason"]

"""Runner: `prepare(ScheduledBatch) -> ForwardMeta` and `forward(meta) -> logits`.

All per-step metadata (token ids, positions, KV slots and gather indices, LoRA segments,
sampling inputs) is built here once per step, on the host, and moved to the device in a few
tensors; the model's layers only read it.
"""

from __future__ import annotations

import torch

from loraplex.engine.adapters import AdapterRegistry
from loraplex.engine.model import ForwardMeta, Model
from loraplex.engine.sampler import SamplingBatch
from loraplex.kernels.attention import build_attention_meta, triton_q_tile
from loraplex.kernels.lora import LoRABatchMeta, LoRASegment, build_triton_lora_meta
from loraplex.kernels.lora_cpu import adapter_records, build_cpu_lora_meta
from loraplex.scheduler.sequence import ScheduledBatch


class Runner:
    def __init__(
        self,
        model: Model,
        adapters: AdapterRegistry,
        device: torch.device,
        lora_backend: str = "torch",
        attention_backend: str = "torch",
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.device = device
        self.lora_backend = lora_backend
        self.attention_backend = attention_backend
        spec = model.spec
        self.q_tile = triton_q_tile(spec.num_heads, spec.num_kv_heads)
        self._records: dict[int, tuple[list, torch.Tensor]] = {}  # uid -> (views, records)
        # The last step's CPU LoRA meta and what it was built from: decode steps repeat the
        # previous step's segments until a sequence joins or leaves, so most steps reuse it.
        self._cpu_meta: tuple[tuple[list, list], LoRABatchMeta] | None = None

    def prepare(self, batch: ScheduledBatch) -> tuple[ForwardMeta, SamplingBatch]:
        """Items must be ordered by adapter uid (the batcher does it), so each adapter's
        tokens form one contiguous row segment."""
        for uid in batch.loaded_adapters:
            self.adapters.write(uid)
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens, context_lens, tables = [], [], []
        sample_rows: list[int] = []
        sampled_seqs = []
        runs: list[list[int]] = []  # [row_start, row_end, adapter_uid] per adapter run
        row = 0
        for item in batch.items:
            seq, start, n = item.seq, item.start, item.num_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(seq.block_table)
            uid = seq.adapter_uid
            if uid is not None:
                if runs and runs[-1][2] == uid and runs[-1][1] == row:
                    runs[-1][1] = row + n
                else:
                    runs.append([row, row + n, uid])
            row += n
            if item.samples:
                sample_rows.append(row - 1)
                sampled_seqs.append(seq)
        dev = self.device
        if self.attention_backend == "triton":
            attn = build_attention_meta(
                query_lens, context_lens, tables, self.model.block_size, dev,
                q_tile=self.q_tile, torch_groups=False,
            )  # fmt: skip
        else:
            attn = build_attention_meta(
                query_lens, context_lens, tables, self.model.block_size, dev,
                triton_fields=False, decode_tables=self.attention_backend == "cpu",
            )  # fmt: skip
        meta = ForwardMeta(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            attn=attn,
            lora=self._lora_meta(runs),
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
        return meta, SamplingBatch.from_seqs(sampled_seqs)

    def _lora_meta(self, runs: list[list[int]]) -> LoRABatchMeta:
        """One batch slot (adapter_idx) per adapter run; the batch is ordered by adapter, so
        each adapter has exactly one run."""
        if not runs:
            return LoRABatchMeta([])
        if self.lora_backend == "triton":
            # Kernels read weights straight from the pool pages through each page table.
            reg = self.adapters
            infos = [reg.info(uid) for _, _, uid in runs]
            tri = build_triton_lora_meta(
                [(lo, hi, idx) for idx, (lo, hi, _) in enumerate(runs)],
                [
                    (info.rank, info.scale, reg.layout(uid), reg.store.pages(uid))
                    for info, (_, _, uid) in zip(infos, runs, strict=True)
                ],
                self.model.spec.num_layers,
                reg.page_elems,
                self.device,
                pool=reg.pool,
            )
            return LoRABatchMeta([], triton=tri)
        views = [self.adapters.views(uid) for _, _, uid in runs]
        if self.lora_backend == "cpu":
            return self._cpu_lora_meta(runs, views)
        return LoRABatchMeta(self._segments(runs, views))

    def _segments(self, runs: list[list[int]], views: list) -> list[LoRASegment]:
        infos = [self.adapters.info(uid) for _, _, uid in runs]
        return [
            LoRASegment(lo, hi, idx, info.rank, info.scale, v)
            for idx, ((lo, hi, _), info, v) in enumerate(zip(runs, infos, views, strict=True))
        ]

    def _cpu_lora_meta(self, runs: list[list[int]], views: list) -> LoRABatchMeta:
        """The kernel's meta for these runs; the previous step's when nothing it depends on
        changed: the same rows and adapter uids (a uid's rank and scale never change), the same
        views objects (an adapter written again gets new views; compared by identity, and held,
        so an id is never reused) and thread count."""
        key = [tuple(run) for run in runs]
        key.append(torch.get_num_threads())
        cached = self._cpu_meta
        if (
            cached is not None
            and cached[0][0] == key
            and all(a is b for a, b in zip(cached[0][1], views, strict=True))
        ):
            return cached[1]
        records = [self._cpu_records(uid, v) for (_, _, uid), v in zip(runs, views, strict=True)]
        meta = build_cpu_lora_meta(self._segments(runs, views), records)
        self._cpu_meta = ((key, views), meta)
        return meta

    def _cpu_records(self, uid: int, views: list) -> torch.Tensor:
        """The C kernel's weight records of an adapter, cached while its views stay the same
        (a resident adapter on contiguous pages keeps one views object until it is rewritten;
        scattered adapters get fresh views, so fresh records, every step)."""
        cached = self._records.get(uid)
        if cached is not None and cached[0] is views:
            return cached[1]
        records = adapter_records(views)
        if not self.adapters.lasting_views(uid, views):
            # Scattered pages: the views are a gathered copy of the weights, fresh every step;
            # keeping them would hold a second host copy of every adapter ever used.
            self._records.pop(uid, None)
            return records
        store = self.adapters.store
        if len(self._records) > 2 * store.num_resident + 64:  # forget evicted adapters
            self._records = {u: r for u, r in self._records.items() if store.is_resident(u)}
        self._records[uid] = (views, records)
        return records

    def forward(self, meta: ForwardMeta) -> torch.Tensor:
        return self.model.forward(meta)

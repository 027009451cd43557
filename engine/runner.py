"""Runner: `prepare(ScheduledBatch) -> ForwardMeta` and `forward(meta) -> logits`.

All per-step metadata (token ids, positions, KV slots and gather indices, LoRA segments,
sampling inputs) is built here once per step, on the host, and moved to the device in a few
tensors; the model's layers only read it.
"""

from __future__ import annotations

import torch

from engine.adapters import AdapterRegistry
from engine.model import ForwardMeta, Model
from engine.sampler import SamplingBatch
from kernels.attention import build_attention_meta
from kernels.lora import LoRABatchMeta, LoRASegment
from scheduler.sequence import ScheduledBatch


class Runner:
    def __init__(self, model: Model, adapters: AdapterRegistry, device: torch.device) -> None:
        self.model = model
        self.adapters = adapters
        self.device = device

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
        segments = []
        for adapter_idx, (lo, hi, uid) in enumerate(runs):
            info = self.adapters.info(uid)
            segments.append(
                LoRASegment(lo, hi, adapter_idx, info.rank, info.scale, self.adapters.views(uid))
            )
        dev = self.device
        meta = ForwardMeta(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            attn=build_attention_meta(query_lens, context_lens, tables, self.model.block_size, dev),
            lora=LoRABatchMeta(segments),
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
        return meta, SamplingBatch.from_seqs(sampled_seqs)

    def forward(self, meta: ForwardMeta) -> torch.Tensor:
        return self.model.forward(meta)

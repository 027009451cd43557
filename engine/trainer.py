"""A LoRA fine-tuning job on the engine's loaded base model (no second copy of the base).

What is computed (tests/finetune_reference.py is the PEFT + torch AdamW oracle of it):
- Data: engine/finetune_data.py (formats, trained tokens, batches and optimizer steps).
- Loss of an optimizer step: the sum of the cross-entropies of every trained token of its
  batches divided by the number of those tokens (not a mean of per-example means); padding never
  counts. Each batch's backward runs on its share (batch sum / step tokens), so the gradients
  add up to the step's mean.
- Optimizer: AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0, constant learning rate, no
  clipping; LoRA dropout 0. Adapter master weights are float32 whatever the model's dtype.
- Initial adapter: `init_adapter` (a PEFT directory) if given, else PEFT's default init from
  `seed` (A kaiming-uniform, B zero: `TrainableLoRA.peft_init`).
- Output: a PEFT directory (engine/adapter_writer.py) that `peft` and this engine load, and
  `trainer_log.jsonl` beside its files: one line per optimizer step (step, epoch, loss, tokens,
  learning_rate, seconds), plus `validation_loss` at the end of each epoch when there is
  validation data.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loraplex.engine.adapter_writer import write_peft_adapter
from loraplex.engine.finetune_data import Example, optimizer_steps, pad_batch
from loraplex.engine.loader import MODULES
from loraplex.engine.model import Model
from loraplex.engine.train_forward import MicroBatch, token_loss_sum
from loraplex.engine.train_lora import TrainableLoRA

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """One job's hyperparameters; validated in `__post_init__` (ValueError naming the field)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # PEFT's default for Llama/Qwen2
    use_rslora: bool = False
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-4
    shuffle: bool = False
    seed: int = 0
    max_seq_len: int | None = None
    init_adapter: str | None = None

    def __post_init__(self) -> None:
        for name in ("rank", "epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.alpha > 0 or not self.learning_rate > 0:
            raise ValueError(
                f"alpha and learning_rate must be > 0, got {self.alpha}, {self.learning_rate}"
            )
        bad = [m for m in self.target_modules if m not in MODULES]
        if bad or not self.target_modules:
            raise ValueError(f"target_modules must be a non-empty subset of {MODULES}: {bad}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")


@dataclass
class StepLog:
    step: int  # 1-based optimizer step
    epoch: int  # 0-based
    loss: float
    tokens: int  # trained tokens of the step
    learning_rate: float
    seconds: float
    validation_loss: float | None = None  # at the last step of an epoch, with validation data


class Trainer:
    """Trains one adapter on `examples` with the frozen weights of `model`.

    `steps_left` optimizer steps remain. Work comes in micro-batches: `next_micro_batch` cuts
    the next consecutive examples of the current batch (as many as fit a padded-token budget,
    at least one) and `finish_micro_batch` takes one back once it is done, running AdamW when
    it completes an optimizer step. Each micro-batch's backward is scaled by 1 / (the step's
    trained tokens), so however the batches are cut the gradients add up to the step's mean
    (equal up to float rounding). `step()` runs one whole optimizer step. Nothing of the
    inference side (KV pool, scheduler) is touched: training rows attend only to themselves.
    """

    def __init__(
        self,
        model: Model,
        config: FinetuneConfig,
        examples: list[Example],
        *,
        pad_id: int,
        validation: list[Example] | None = None,
        init_weights=None,
        state_buffer: torch.Tensor | None = None,
    ) -> None:
        """`init_weights`: the loaded `init_adapter` (engine/adapter_loader.py AdapterWeights),
        else PEFT's default init from `config.seed`. `state_buffer`: a flat float32 tensor of
        >= `state_numel(...)` elements to hold weights, gradients and AdamW moments (the job's
        pool pages); None = torch allocates them."""
        if not examples:
            raise ValueError("no training examples")
        self.model, self.config, self.examples = model, config, examples
        self.validation, self.pad_id = validation or [], pad_id
        device = model.embed.device
        if init_weights is not None:
            self.lora = TrainableLoRA.from_weights(init_weights, device)
        else:
            self.lora = TrainableLoRA.peft_init(
                model.spec, config.rank, config.alpha, config.target_modules, config.seed,
                config.use_rslora, device,
            )  # fmt: skip
        placed = self.lora.place(state_buffer) if state_buffer is not None else {}
        self.optimizer = torch.optim.AdamW(
            self.lora.parameters(),
            lr=config.learning_rate,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.0,
        )
        self.optimizer.state.update(placed)
        c = config
        self.plan = optimizer_steps(len(examples), batch_size=c.batch_size,
                                    grad_accum=c.grad_accum, epochs=c.epochs,
                                    shuffle=c.shuffle, seed=c.seed)  # fmt: skip
        # the epoch of each optimizer step (steps do not span epochs)
        per_epoch = len(self.plan) // c.epochs
        self.epoch_of = [i // per_epoch for i in range(len(self.plan))]
        self.done = 0
        self.log: list[StepLog] = []
        # the cursor: batch `_batch` of step `done`, from its example `_offset`
        self._batch = self._offset = 0
        self._loss_sum, self._step_t0 = 0.0, None

    @property
    def steps_left(self) -> int:
        return len(self.plan) - self.done

    @property
    def epoch_ended(self) -> bool:
        """Whether the last optimizer step done was the last of its epoch."""
        d = self.done
        return d > 0 and (d == len(self.plan) or self.epoch_of[d] != self.epoch_of[d - 1])

    @property
    def tokens_trained(self) -> int:
        return sum(e.tokens for e in self.log)

    def next_micro_batch(self, max_tokens: int | None = None) -> MicroBatch:
        """The next examples of the current batch as a `MicroBatch`: as many consecutive ones as
        keep (count x longest length) <= max_tokens, at least one; None = the rest of the
        batch. Take it back with `finish_micro_batch` before asking for another."""
        if not self.steps_left:
            raise RuntimeError("the job has no steps left")
        if self._step_t0 is None:
            self._step_t0 = time.perf_counter()
        batch = self.plan[self.done][self._batch][self._offset :]
        take, longest = 0, 0
        for i in batch:
            longest = max(longest, len(self.examples[i].input_ids))
            if take and max_tokens is not None and (take + 1) * longest > max_tokens:
                break
            take += 1
        ids, _, labels = pad_batch([self.examples[i] for i in batch[:take]], self.pad_id)
        device = self.model.embed.device
        total = sum(self.examples[i].num_trained for b in self.plan[self.done] for i in b)
        return MicroBatch(self.model, self.lora, ids.to(device), labels.to(device), total)

    def finish_micro_batch(self, mb: MicroBatch) -> StepLog | None:
        """Account a done micro-batch (from the last `next_micro_batch`); runs AdamW and
        returns the step's log when it completed an optimizer step, else None."""
        if not mb.done:
            raise RuntimeError("the micro-batch has units left")
        self._loss_sum += mb.loss
        self._offset += mb.bsz
        batches = self.plan[self.done]
        if self._offset == len(batches[self._batch]):
            self._batch, self._offset = self._batch + 1, 0
        if self._batch < len(batches):
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # grads may be views of the state buffer
        total = sum(self.examples[i].num_trained for b in batches for i in b)
        epoch = self.epoch_of[self.done]
        self.done += 1
        entry = StepLog(self.done, epoch, self._loss_sum / total, total,
                        self.config.learning_rate, time.perf_counter() - self._step_t0)  # fmt: skip
        self._batch, self._loss_sum, self._step_t0 = 0, 0.0, None
        if self.validation and self.epoch_ended:
            entry.validation_loss = self.validation_loss()
        self.log.append(entry)
        return entry

    def step(self) -> StepLog:
        """One optimizer step: each of its batches as one micro-batch, then AdamW."""
        while True:
            mb = self.next_micro_batch()
            while not mb.done:
                mb.run_unit()
            entry = self.finish_micro_batch(mb)
            if entry is not None:
                return entry

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Trained-token mean cross-entropy over the validation examples (batches of
        `batch_size` in file order)."""
        loss_sum, tokens, bs = 0.0, 0, self.config.batch_size
        for lo in range(0, len(self.validation), bs):
            ids, _, labels = pad_batch(self.validation[lo : lo + bs], self.pad_id)
            device = self.model.embed.device
            loss, n = token_loss_sum(self.model, self.lora, ids.to(device), labels.to(device))
            loss_sum, tokens = loss_sum + float(loss), tokens + n
        return loss_sum / tokens

    def save(self, out_dir, base_model_name_or_path: str | None = None) -> str:
        """The adapter as a PEFT directory, with `trainer_log.jsonl` beside its files."""
        lora = self.lora
        path = write_peft_adapter(out_dir, lora.A, lora.B, rank=lora.rank, alpha=lora.alpha,
                                  use_rslora=lora.use_rslora,
                                  base_model_name_or_path=base_model_name_or_path)  # fmt: skip
        lines = [json.dumps({k: v for k, v in asdict(e).items() if v is not None})
                 for e in self.log]  # fmt: skip
        (Path(path) / "trainer_log.jsonl").write_text("".join(x + "\n" for x in lines))
        return path

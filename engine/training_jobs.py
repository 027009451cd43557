"""Fine-tuning jobs co-served in the engine's steps (Loquetier / FlexLLM style).

A job trains one adapter on the engine's loaded base model (engine/trainer.py: exactly PEFT +
AdamW) while the engine serves. It is a part beside the step: once each step's batch is
scheduled, before its forward, `TrainingJobs.run(StepLoad)` gives the running job the time and
tokens that step leaves (so every token of the step waits for what trains).

Scheduling: inference first; how much of each step training may take (the share policy with
idle time counting first, or an ITL target; none before a step that prefills; micro-batch
sizes) is engine/train_budget.py's `StepBudget`.

* Jobs start in submission order, at most `finetune_max_running_jobs` at once, each when its
  pages fit (memory/train_pages.py; idle adapters are evicted for it like for KV). A job that
  does not fit stays queued with the reason in `job.reason`. Running jobs take turns by step.
* Each job may keep a checkpoint (a PEFT directory `step-N` under its `checkpoint_dir`) at the
  end of every epoch. `listener(job, event, data)`, when set, hears on the engine thread:
  "running", "step" (its StepLog), "checkpoint" ((step, path)) and "ended" (see job.status).
* A job's error fails that job (status "failed", the error in `reason`), never the step.
  Cancel frees every page of the job at once. Pages are zeroed before they go back.

What is shared with inference (the base weights, frozen and never copied; the page budget) and
why training units do not ride in the inference matmuls: docs/finetuning.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from loraplex.engine.finetune_data import Example
from loraplex.engine.finetune_job import CoserveConfig, FinetuneJob, JobStatus, StepLoad
from loraplex.engine.train_budget import StepBudget
from loraplex.engine.train_memory import pages_needed
from loraplex.engine.trainer import FinetuneConfig, Trainer
from loraplex.memory.adapter_store import AdapterStore
from loraplex.memory.pool import IntegrityError, PoolExhausted
from loraplex.memory.train_pages import TrainingPages

logger = logging.getLogger(__name__)


class TrainingJobs:
    def __init__(
        self,
        model,
        pool_tensor: torch.Tensor,
        pages: TrainingPages,
        store: AdapterStore,
        config: CoserveConfig,
        *,
        pad_id: int,
        register: Callable[[str, str], None],
        model_name: str | None = None,
    ) -> None:
        """`register(name, path)` registers a trained adapter with the engine."""
        self.model, self.pool_tensor, self.pages, self.store = model, pool_tensor, pages, store
        self.config, self.pad_id, self.register = config, pad_id, register
        self.model_name = model_name
        self.jobs: dict[str, FinetuneJob] = {}
        self.listener: Callable[[FinetuneJob, str, object], None] | None = None
        self._numbers = 0
        self._turn = 0
        self.budget = StepBudget(config)  # what each step gives training
        self.seconds = 0.0  # seconds spent in training units, all jobs (for benchmarks)

    # -- jobs --------------------------------------------------------------------------------

    def submit(
        self,
        job_id: str,
        config: FinetuneConfig,
        examples: list[Example],
        output_dir: str,
        *,
        validation: list[Example] | None = None,
        adapter_name: str | None = None,
        init_weights=None,
        checkpoint_dir: str | None = None,
    ) -> FinetuneJob:
        """Queue a job. ValueError (nothing queued) for a reused id, no examples, or a job
        that could never fit the pool."""
        if job_id in self.jobs:
            raise ValueError(f"fine-tuning job id {job_id!r} is already in use")
        if not examples:
            raise ValueError("no training examples")
        spec, pool = self.model.spec, self.pages.pool
        rank = init_weights.rank if init_weights is not None else config.rank
        targets = init_weights.target_modules if init_weights is not None else config.target_modules
        longest = max(len(e.input_ids) for e in examples)
        tokens = max(self.config.max_tokens_per_step, longest)
        page_bytes = self.pool_tensor[0].numel() * self.pool_tensor.element_size()
        state, act = pages_needed(spec, rank, targets, tokens, self.pool_tensor.element_size(),
                                  page_bytes)  # fmt: skip
        if state + act > pool.num_pages:
            raise ValueError(
                f"fine-tuning job {job_id!r} needs {state + act} pages ({state} of optimizer "
                f"state, {act} for the activations of {tokens}-token micro-batches) but the pool "
                f"has {pool.num_pages}: lower --finetune-max-tokens-per-step or the rank, or "
                f"raise --pool-bytes"
            )
        self._numbers += 1
        job = FinetuneJob(job_id, self._numbers, config, str(output_dir), adapter_name, examples,
                          validation, init_weights, state, act)  # fmt: skip
        job.checkpoint_dir = checkpoint_dir
        self.jobs[job_id] = job
        logger.info("fine-tuning job %s queued (%d examples, %d pages)", job_id, len(examples),
                    job.pages)  # fmt: skip
        return job

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job (its pages freed now). False if unknown or ended."""
        job = self.jobs.get(job_id)
        if job is None or job.finished:
            return False
        self._end(job, JobStatus.CANCELLED, "cancelled")
        return True

    @property
    def active(self) -> bool:
        return any(not j.finished for j in self.jobs.values())

    def running(self) -> list[FinetuneJob]:
        return [j for j in self.jobs.values() if j.status is JobStatus.RUNNING]

    def queued(self) -> list[FinetuneJob]:
        return [j for j in self.jobs.values() if j.status is JobStatus.QUEUED]

    # -- the step ----------------------------------------------------------------------------

    def run(self, load: StepLoad) -> list[FinetuneJob]:
        """Start what fits, then advance one running job within the step's budget. Returns the
        jobs that ended in this call."""
        ended: list[FinetuneJob] = []
        self._start_queued(ended)
        running = self.running()
        if not running:
            return ended
        job = running[self._turn % len(running)]
        self._turn += 1
        try:
            self._advance(job, load)
            if not job.trainer.steps_left:
                self._succeed(job)
        except Exception as e:  # the job fails, the engine goes on serving
            logger.exception("fine-tuning job %s failed", job.job_id)
            self._end(job, JobStatus.FAILED, f"{type(e).__name__}: {e}")
        if job.finished:
            ended.append(job)
        return ended

    def _start_queued(self, ended: list[FinetuneJob]) -> None:
        for job in self.queued():  # in submission order; a job that does not fit blocks
            if len(self.running()) >= self.config.max_running_jobs:
                return
            pool = self.pages.pool
            if pool.num_free < job.pages:
                self.store.make_room(job.pages)
            try:
                res = self.pages.reserve(job.number, job.state_pages, job.activation_pages)
            except PoolExhausted as e:
                job.reason = (
                    f"waiting for memory: needs {job.pages} pages ({job.state_pages} state, "
                    f"{job.activation_pages} activations); {e}"
                )
                return
            try:
                run = self.pool_tensor[res.state[0] : res.state[-1] + 1]
                buffer = run.reshape(-1).view(torch.float32)
                job.trainer = Trainer(self.model, job.config, job.examples, pad_id=self.pad_id,
                                      validation=job.validation, init_weights=job.init_weights,
                                      state_buffer=buffer)  # fmt: skip
            except Exception as e:
                self._end(job, JobStatus.FAILED, f"{type(e).__name__}: {e}")
                ended.append(job)
                continue
            job.status, job.reason, job.started_at = JobStatus.RUNNING, "", time.time()
            job.total_steps = job.trainer.steps_left
            self._tell(job, "running", None)
            job.examples = job.validation = job.init_weights = None  # the trainer has them
            logger.info("fine-tuning job %s started (%d optimizer steps)", job.job_id,
                        job.total_steps)  # fmt: skip

    def _advance(self, job: FinetuneJob, load: StepLoad) -> None:
        budget = self.budget
        grant = budget.open(load)
        if grant is None:
            return
        ran, trainer, clock = 0, job.trainer, budget.clock
        while trainer.steps_left:
            if job.micro is None:
                job.micro = trainer.next_micro_batch(grant.tokens)
            mb = job.micro
            kind = mb.next_unit()
            if not budget.allows(grant, kind, mb.num_tokens, ran):
                return
            t0 = clock()
            mb.run_unit()
            budget.learn(kind, (clock() - t0) / mb.num_tokens)
            if mb.done:
                self._finish(job, mb)
            dt = clock() - t0  # the optimizer step and a checkpoint count too
            ran, self.seconds = ran + 1, self.seconds + dt
            budget.spend(grant, dt)

    def _finish(self, job: FinetuneJob, mb) -> None:
        job.micro = None
        entry = job.trainer.finish_micro_batch(mb)
        if entry is None:
            return
        job.log.append(entry)
        self._tell(job, "step", entry)
        if job.checkpoint_dir is not None and job.trainer.epoch_ended:
            path = job.trainer.save(f"{job.checkpoint_dir}/step-{entry.step}", self.model_name)
            job.checkpoints.append((entry.step, path))
            self._tell(job, "checkpoint", (entry.step, path))

    def _succeed(self, job: FinetuneJob) -> None:
        job.adapter_path = job.trainer.save(job.output_dir, self.model_name)
        note = ""
        if job.adapter_name is not None:
            try:
                self.register(job.adapter_name, job.adapter_path)
            except Exception as e:  # the adapter is saved: say so, do not lose it
                self._end(job, JobStatus.FAILED, f"trained and saved to {job.adapter_path}, "
                          f"but registering it as {job.adapter_name!r} failed: {e}")  # fmt: skip
                return
            note = f", serving as {job.adapter_name!r}"
        logger.info("fine-tuning job %s succeeded: %s%s", job.job_id, job.adapter_path, note)
        self._end(job, JobStatus.SUCCEEDED, "")

    def _end(self, job: FinetuneJob, status: JobStatus, reason: str) -> None:
        job.trainer = job.micro = None  # drops the graph and the optimizer (views of the pages)
        job.examples = job.validation = job.init_weights = None
        res = self.pages.get(job.number)
        if res is not None:
            for p in res.state + res.activation:
                self.pool_tensor[p].zero_()  # never hand back NaN bit patterns to the KV cache
            self.pages.release(job.number)
        job.status, job.reason, job.finished_at = status, reason, time.time()
        self._tell(job, "ended", None)

    def _tell(self, job: FinetuneJob, event: str, data) -> None:
        if self.listener is None:
            return
        try:
            self.listener(job, event, data)
        except Exception:  # a listener's bug must not fail the job or the step
            logger.exception("fine-tuning listener failed on %s of job %s", event, job.job_id)

    def check_integrity(self) -> None:
        """Running jobs are exactly the ones holding pages, each its computed page counts."""
        holding = set(self.pages.jobs())
        running = {j.number: j for j in self.running()}
        if holding != set(running):
            raise IntegrityError(
                f"training pages held by jobs {sorted(holding)}, running jobs {sorted(running)}"
            )
        for number, job in running.items():
            res = self.pages.get(number)
            if (len(res.state), len(res.activation)) != (job.state_pages, job.activation_pages):
                raise IntegrityError(
                    f"job {job.job_id}: holds {len(res.state)} + {len(res.activation)} pages, "
                    f"reserved {job.state_pages} + {job.activation_pages}"
                )

"""The types of co-served fine-tuning (engine/training_jobs.py): a job and its status, the
engine's knobs, and what a step's inference used."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from loraplex.engine.finetune_data import Example
from loraplex.engine.train_forward import MicroBatch
from loraplex.engine.trainer import FinetuneConfig, StepLog, Trainer


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class CoserveConfig:
    """The engine's fine-tuning knobs (EngineConfig validates them)."""

    max_tokens_per_step: int = 512
    itl_slo_ms: float | None = None
    step_share: float = 0.25
    max_running_jobs: int = 1
    max_num_batched_tokens: int = 2048


@dataclass(frozen=True)
class StepLoad:
    """What the step's inference uses (training runs once its batch is scheduled, before its
    forward): the budget training fills."""

    tokens: int  # inference tokens in the step; 0 = no inference runs
    seconds: float  # its inference time, schedule through postprocess (an estimate)
    prefill: bool = False  # the step prefills: its requests' next token waits for it as it is


@dataclass
class FinetuneJob:
    job_id: str
    number: int  # its owner id in the pool
    config: FinetuneConfig
    output_dir: str
    adapter_name: str | None  # registered under this name once trained
    examples: list[Example]
    validation: list[Example] | None
    init_weights: object | None
    state_pages: int
    activation_pages: int
    status: JobStatus = JobStatus.QUEUED
    reason: str = ""  # why it waits, or why it failed
    trainer: Trainer | None = None
    micro: MicroBatch | None = None
    log: list[StepLog] = field(default_factory=list)
    total_steps: int = 0
    adapter_path: str | None = None
    checkpoint_dir: str | None = None
    checkpoints: list[tuple[int, str]] = field(default_factory=list)  # (step, path)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def pages(self) -> int:
        return self.state_pages + self.activation_pages

    @property
    def steps_done(self) -> int:
        return len(self.log)

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)

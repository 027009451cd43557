"""`ServerConfig`: the HTTP server's settings (the engine has its own `EngineConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """Validated on construction (ValueError naming the option)."""

    model_id: str | None = None  # the base model's public id (default: the checkpoint's name)
    adapter_root: str | None = None  # where adapters may be loaded from over HTTP (None: off)
    max_queue: int | None = None  # waiting sequences before 429 queue_full (None: unbounded)
    shutdown_grace_s: float = 30.0  # seconds in-flight requests get on SIGTERM
    finetune_dir: str | None = None  # the fine-tuning API's state (None: the API is off)
    max_file_bytes: int = 512 << 20  # largest fine-tuning upload (413 over it)
    max_jobs_per_tenant: int = 4  # fine-tuning jobs of a tenant not yet ended (429 over it)
    max_request_bytes: int = 16 << 20  # largest request body but uploads (413 over it)
    metrics_key: str | None = None  # a key /metrics asks for (None: /metrics is open)
    malloc_trim_s: float = 30.0  # seconds between malloc_trim calls (0: never; server/heap.py)

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_jobs_per_tenant", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {self.max_queue}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"--shutdown-timeout must be >= 0, got {self.shutdown_grace_s}")
        if not 0 <= self.malloc_trim_s < math.inf:  # NaN fails too
            raise ValueError(
                f"--malloc-trim-interval must be a finite number >= 0, got {self.malloc_trim_s}"
            )
        if self.metrics_key is not None and not self.metrics_key:
            raise ValueError("--metrics-key must not be empty")

"""What crosses between the event loop and the engine thread (server/async_engine.py): a
request's sequences (`Submission`s of one `RequestGroup`, read from its queue) and the two
refusals, `QueueFull` (429) and `Unavailable` (503)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from loraplex.scheduler.sequence import SamplingParams


class QueueFull(RuntimeError):
    """The waiting queue is at --max-queue."""


class Unavailable(RuntimeError):
    """The server is shutting down or the engine loop is not running."""


@dataclass
class Submission:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None  # the engine's adapter name, None = base model
    tenant: str | None = None  # whose request (fair admission between tenants)


@dataclass
class RequestGroup:
    """The sequences of one HTTP request, read from one queue."""

    subs: list[Submission]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    t_arrival: float = field(default_factory=time.monotonic)

    @property
    def ids(self) -> list[str]:
        return [s.request_id for s in self.subs]

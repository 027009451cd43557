"""Fair admission between tenants: virtual token counters (VTC, Sheng et al., "Fairness in
Serving Large Language Models", OSDI 2024).

Each tenant has a counter of the tokens the engine computed for it (prefill chunks and decodes,
charged when scheduled). Admission looks at the waiting requests in arrival order, but among
tenants it picks the head request of the tenant with the smallest counter, so a tenant that
floods the queue is served at the same token rate as one that sends a trickle, instead of
ahead of it; within a tenant, arrival order holds. A tenant that had nothing queued or running
gets its counter lifted to the smallest counter of the tenants that do when it comes back, so
idle time is not banked as credit for a later burst. With one tenant (or none: requests
without a tenant are one group) the order is plain FCFS.

Contract: `order(candidates)` yields every candidate exactly once and reads the counters as it
goes, so admissions charged in between (`charge`) steer the next pick.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from loraplex.scheduler.sequence import Sequence


class FairShare:
    def __init__(self) -> None:
        self.served: dict[str | None, float] = {}  # tenant -> virtual tokens
        self.active: dict[str | None, int] = {}  # tenant -> requests waiting or running

    def arrive(self, tenant: str | None) -> None:
        if not self.active.get(tenant):
            backlogged = [self.served.get(t, 0.0) for t, n in self.active.items() if n]
            floor = min(backlogged) if backlogged else 0.0
            self.served[tenant] = max(self.served.get(tenant, 0.0), floor)
        self.active[tenant] = self.active.get(tenant, 0) + 1

    def leave(self, tenant: str | None) -> None:
        n = self.active.get(tenant, 0) - 1
        if n > 0:
            self.active[tenant] = n
        else:
            self.active.pop(tenant, None)

    def charge(self, tenant: str | None, tokens: int) -> None:
        self.served[tenant] = self.served.get(tenant, 0.0) + tokens

    def order(self, candidates: list[Sequence]) -> Iterator[Sequence]:
        """`candidates` (arrival order) in admission order: FCFS within a tenant, the least
        served tenant first."""
        if len(self.active) <= 1:  # one tenant queued (the usual case): no per-step regrouping
            yield from candidates
            return
        queues: dict[str | None, deque[Sequence]] = {}
        for seq in candidates:
            queues.setdefault(seq.tenant, deque()).append(seq)
        if len(queues) == 1:
            yield from candidates
            return
        while queues:
            tenant = min(queues, key=lambda t: (self.served.get(t, 0.0), queues[t][0].seq_id))
            q = queues[tenant]
            yield q.popleft()
            if not q:
                del queues[tenant]

    def check_integrity(self, sequences) -> None:
        """`active` counts exactly the given (waiting and running) sequences per tenant."""
        want: dict[str | None, int] = {}
        for seq in sequences:
            want[seq.tenant] = want.get(seq.tenant, 0) + 1
        if want != self.active:
            raise AssertionError(f"fair-share active counts {self.active}, queue holds {want}")

"""Per-tenant rate limits: `requests_per_minute` and `tokens_per_minute` in the tenants file.

Each limit is a token bucket that holds one minute's allowance and refills continuously
(limit / 60 per second), so a tenant may burst up to its per-minute limit and then runs at
the limit's rate. A generation request takes 1 request and, up front, its prompt tokens plus
the most it may generate (`max_tokens` x choices; OpenAI counts the same estimate); what it did
not generate is given back when it ends. A request the bucket cannot pay now is a 429
`rate_limit_exceeded` with `Retry-After` (whole seconds until it could); one larger than the
whole per-minute allowance can never pass and is a 400 `request_too_large`. Nothing is taken
from either bucket unless both can pay. Tenants without limits (and the open server) are not
limited. Other routes (models, adapters, files, jobs) are not counted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from loraplex.server.protocol import APIError


@dataclass
class Bucket:
    per_minute: int
    level: float = field(init=False)  # what may be taken now
    at: float = field(init=False)  # time.monotonic() of the last refill

    def __post_init__(self) -> None:
        self.level, self.at = float(self.per_minute), time.monotonic()

    def refill(self, now: float) -> None:
        rate = self.per_minute / 60.0
        self.level = min(float(self.per_minute), self.level + (now - self.at) * rate)
        self.at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` can be taken (0 if now); refill() first."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / (self.per_minute / 60.0)


class RateLimits:
    """The buckets of every tenant with limits. Event-loop only (no locking)."""

    def __init__(self, limits: dict[str, tuple[int | None, int | None]]) -> None:
        """`limits`: tenant -> (requests_per_minute, tokens_per_minute), None for no limit."""
        self._requests = {t: Bucket(r) for t, (r, _) in limits.items() if r is not None}
        self._tokens = {t: Bucket(k) for t, (_, k) in limits.items() if k is not None}

    def take(self, tenant: str, tokens: int) -> int:
        """Charge one request of up to `tokens` tokens; return the tokens charged (to give back
        with `give_back`). APIError 429 (with Retry-After) or 400 when it cannot pass."""
        now = time.monotonic()
        req, tok = self._requests.get(tenant), self._tokens.get(tenant)
        if tok is not None and tokens > tok.per_minute:
            raise APIError(
                400,
                f"request too large: it may use {tokens} tokens (prompt + max_tokens x n), more "
                f"than tenant {tenant!r}'s tokens_per_minute {tok.per_minute}; lower max_tokens",
                code="request_too_large",
            )
        waits = []
        for bucket, amount, what in ((req, 1, "requests"), (tok, tokens, "tokens")):
            if bucket is not None:
                bucket.refill(now)
                wait = bucket.wait_for(amount)
                if wait > 0:
                    waits.append((wait, what, bucket.per_minute))
        if waits:
            wait, what, limit = max(waits)
            retry = max(1, math.ceil(wait))
            raise APIError(
                429,
                f"rate limit reached for tenant {tenant!r}: {limit} {what} per minute; "
                f"retry in {retry} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )
        if req is not None:
            req.level -= 1
        if tok is None:
            return 0
        tok.level -= tokens
        return tokens

    def give_back(self, tenant: str, tokens: int) -> None:
        """Return tokens charged by `take` that the request did not use."""
        tok = self._tokens.get(tenant)
        if tok is not None and tokens > 0:
            tok.refill(time.monotonic())
            tok.level = min(float(tok.per_minute), tok.level + tokens)

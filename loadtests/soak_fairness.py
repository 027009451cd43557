"""The soak's fairness phase: tenant t1 sends a steady trickle of short requests, first alone,
then while tenant t0 floods the server with many concurrent streams; the trickle's TTFT p50
and p99 in both (the issue's target: the flood at most doubles them)."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from loraplex.loadtests.soak_traffic import Soak
from loraplex.loadtests.stream_client import percentile

logger = logging.getLogger(__name__)

TRICKLE, FLOOD = "t1", "t0"
FLOOD_LEAD_S = 2.0  # the flood runs this long before the trickle is measured


async def _trickle(soak: Soak, label: str, seconds: float, rng: random.Random) -> None:
    """One request every `--trickle-interval` seconds (open loop), 16 prompt, 8 output tokens."""
    tasks, stop_at = [], time.monotonic() + seconds
    while time.monotonic() < stop_at:
        prompt = [rng.randrange(4, soak.assets.vocab_size) for _ in range(16)]
        tasks.append(asyncio.ensure_future(
            soak.request(TRICKLE, soak.base_id, prompt, 8, label=label)))  # fmt: skip
        await asyncio.sleep(soak.args.trickle_interval)
    await asyncio.gather(*tasks)


async def _flood_stream(soak: Soak, stop_at: float, rng: random.Random) -> None:
    while time.monotonic() < stop_at:
        prompt = [rng.randrange(4, soak.assets.vocab_size) for _ in range(32)]
        kind = await soak.request(FLOOD, soak.base_id, prompt, 32)
        if kind.startswith("429"):
            await asyncio.sleep(0.25)


def _stats(values: list[float]) -> dict:
    return {"n": len(values), "p50_s": percentile(values, 50), "p99_s": percentile(values, 99)}


async def fairness(soak: Soak, seconds: float) -> dict:
    """{"alone": stats, "flood": stats, "p50_ratio", "p99_ratio", "flood_streams"}."""
    rng = random.Random(soak.args.seed + 99)
    logger.info("fairness: %s's trickle alone for %.0f s", TRICKLE, seconds)
    await _trickle(soak, "alone", seconds, rng)
    n = soak.args.flood_streams
    logger.info("fairness: %s floods with %d streams, %s's trickle beside it", FLOOD, n, TRICKLE)
    stop_at = time.monotonic() + FLOOD_LEAD_S + seconds
    flood = [asyncio.ensure_future(_flood_stream(soak, stop_at, random.Random(i)))
             for i in range(n)]  # fmt: skip
    await asyncio.sleep(FLOOD_LEAD_S)
    await _trickle(soak, "flood", seconds, rng)
    await asyncio.gather(*flood)
    alone = _stats(soak.tally.ttft.get("alone", []))
    flooded = _stats(soak.tally.ttft.get("flood", []))
    out = {"alone": alone, "flood": flooded, "flood_streams": n, "seconds": seconds}
    for q in ("p50", "p99"):
        a, f = alone[f"{q}_s"], flooded[f"{q}_s"]
        out[f"{q}_ratio"] = f / a if a and f is not None else None
    return out

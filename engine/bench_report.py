"""Measuring and reporting for the benchmarks: timed repetitions, the other-load estimate,
result rows, the aligned table and the target ratios."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

BASE = "base only"


@dataclass
class Row:
    system: str  # "loraplex" or "peft"
    workload: str  # "8 adapters (mixed)" or BASE
    requests: int
    output_tokens: int
    wall_s: float
    other_load: float | None = None  # CPU cores kept busy by other processes while timed

    @property
    def req_per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.wall_s


class _Timed:
    """Wall time of a block, and how many cores other processes (or the hypervisor: steal)
    kept busy meanwhile: /proc/stat busy time minus our own CPU time. None off Linux."""

    @staticmethod
    def _cpu() -> tuple[float, float]:
        t = os.times()
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            busy = (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        except (OSError, ValueError, IndexError):
            busy = math.nan
        return busy, t.user + t.system

    def __enter__(self) -> _Timed:
        self.cpu0, self.t0 = self._cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        (b0, s0), (b1, s1) = self.cpu0, self._cpu()
        other = ((b1 - b0) - (s1 - s0)) / self.wall
        self.other_load = None if math.isnan(other) else max(0.0, other)


def measure(system, workload, run, warm, args) -> tuple[Row, list[list[int]]]:
    """`warm()` `--warmup` times, then `run()` (-> output token lists) `--repeat` times; the
    fastest repetition (the one least disturbed by other processes) is kept."""
    return measure_side_by_side([(system, workload, run, warm)], args)[0]


def measure_side_by_side(specs, args) -> list[tuple[Row, list[list[int]]]]:
    """`measure` for several (system, workload, run, warm) at once, their timed runs
    alternating (a, b, a, b, ...) so that every row sees the same phases of a noisy machine;
    the fastest repetition of each is kept. Warm-ups all come first."""
    for _, _, _, warm in specs:
        for _ in range(args.warmup):
            warm()
    best: list = [None] * len(specs)
    for _ in range(args.repeat):
        for i, (_, _, run, _) in enumerate(specs):
            with _Timed() as t:
                outs = run()
            if best[i] is None or t.wall < best[i][0].wall:
                best[i] = (t, outs)
    result = []
    for (system, workload, _, _), (t, outs) in zip(specs, best, strict=True):
        tokens = sum(len(o) for o in outs)
        result.append((Row(system, workload, len(outs), tokens, t.wall, t.other_load), outs))
    return result


def format_table(rows: list[Row]) -> str:
    """Plain-text table, columns aligned (text left, numbers right)."""
    head = ("system", "workload", "requests", "out tokens", "wall s", "req/s", "out tok/s")
    cells = [head + ("other load",)] + [
        (r.system, r.workload, str(r.requests), str(r.output_tokens), f"{r.wall_s:.3f}",
         f"{r.req_per_s:.2f}", f"{r.tok_per_s:.1f}",
         "n/a" if r.other_load is None else f"{r.other_load:.2f}")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    just = [str.ljust] * 2 + [str.rjust] * (len(widths) - 2)
    lines = ["  ".join(j(c, w) for j, c, w in zip(just, cs, widths, strict=True)) for cs in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratios(rows: list[Row]) -> list[tuple[str, float, float | None]]:
    """(label, value, target or None) of output tok/s: loraplex / peft per workload (target 3x
    with adapters), and mixed / base only per system (target 0.75x for loraplex)."""
    by = {(r.system, r.workload): r for r in rows}
    out = []
    for (system, w), r in by.items():
        if system == "peft" and ("loraplex", w) in by:
            value = by["loraplex", w].tok_per_s / r.tok_per_s
            out.append((f"loraplex / peft, {w}", value, None if w == BASE else 3.0))
    for (system, w), r in by.items():
        if w != BASE and (system, BASE) in by:
            value = r.tok_per_s / by[system, BASE].tok_per_s
            out.append((f"{system} {w} / {BASE}", value, 0.75 if system == "loraplex" else None))
    return out

"""Measuring and reporting for `loraplex bench coserve` (engine/bench_coserve.py): a phase's
inference and training metrics over its measured window, the CPU meter, the table, the issue's
targets at each load (the closed loop and each open-loop fraction) and results.md.

Rates over a window [t0, t1]:
- Inference: tokens emitted in the window / (t1 - t0). A token is emitted when the engine step
  that sampled it returns (training units run inside that step, so they count in its ITL).
  ITL: gaps between consecutive tokens of one request whose later token falls in the window;
  TTFT: first token minus submission, for first tokens in the window.
- Training: optimizer steps are stamped when they complete (the engine's after the step() that
  finished them, the PEFT process's by itself with the same monotonic clock). With >= 2 steps in
  the window: tokens of all but the first / time from the first to the last (no quantization at
  the window's edges); with one: its tokens / window; trained tokens (labels counted) and
  padded tokens (batch x its longest example, what PEFT computes on) per second.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

INFERENCE, TRAINING, COSERVED, PEFT, STATUS = (
    "inference alone", "training alone (loraplex)", "co-served (loraplex)",
    "training alone (PEFT process)", "status quo (engine + PEFT process)",
)  # fmt: skip
ITL_TARGET, TRAIN_TARGET = 1.25, 0.5


def level_name(load: float | None) -> str:
    """ "closed loop", or an open loop's load as a fraction of the closed loop's tokens/s."""
    return "closed loop" if load is None else f"open loop {load:.0%}"


def phase(kind: str, load: float | None = None) -> str:
    """A phase's name: its kind, and its load for the kinds that serve inference."""
    return kind if kind in (TRAINING, PEFT) else f"{kind}, {level_name(load)}"


ALONE, TRAIN, COSERVE, PEFT_SOLO, STATUS_QUO = (
    phase(INFERENCE), TRAINING, phase(COSERVED), PEFT, phase(STATUS)
)  # fmt: skip


def inference_metrics(requests, t0: float, t1: float) -> dict:
    """requests: objects with `.submit` and `.times` (one stamp per emitted token)."""
    tokens, itl, ttft = 0, [], []
    for r in requests:
        ts = r.times
        tokens += sum(1 for t in ts if t0 <= t <= t1)
        itl += [b - a for a, b in zip(ts, ts[1:], strict=False) if t0 <= b <= t1]
        if ts and t0 <= ts[0] <= t1:
            ttft.append(ts[0] - r.submit)

    def pct(xs, q):
        return float(np.percentile(xs, q) * 1000) if xs else None

    return {
        "inference_tokens": tokens,
        "inference_tok_s": tokens / (t1 - t0),
        "itl_p50_ms": pct(itl, 50),
        "itl_p99_ms": pct(itl, 99),
        "itl_max_ms": pct(itl, 100),
        "ttft_p50_ms": pct(ttft, 50),
        "itl_samples": len(itl),
        "ttft_samples": len(ttft),
    }


def training_metrics(events, t0: float, t1: float) -> dict:
    """events: (stamp, trained tokens, padded tokens, loss) per completed optimizer step."""
    ev = [e for e in events if t0 <= e[0] <= t1]
    if len(ev) >= 2:
        span, counted = ev[-1][0] - ev[0][0], ev[1:]
    else:
        span, counted = t1 - t0, ev
    tokens, padded = sum(e[1] for e in counted), sum(e[2] for e in counted)
    return {
        "train_steps": len(ev),
        "train_tokens": sum(e[1] for e in ev),
        "train_tok_s": tokens / span if span > 0 else 0.0,
        "train_padded_tok_s": padded / span if span > 0 else 0.0,
    }


def _proc_seconds(pid: int) -> float:
    """user + system CPU seconds of process `pid` (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class CpuMeter:
    """Cores used by this process, by the PEFT process (`pid`), and by anything else (other
    processes, hypervisor steal) over a window, from /proc; None values off Linux."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self.start = self._snap()

    def _snap(self) -> tuple[float, float, float, float]:
        t = os.times()
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            busy = (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            busy = math.nan
        child = _proc_seconds(self.pid) if self.pid else 0.0
        return time.monotonic(), busy, t.user + t.system, child

    def read(self) -> dict:
        (w0, b0, s0, c0), (w1, b1, s1, c1) = self.start, self._snap()
        wall = w1 - w0
        other = ((b1 - b0) - (s1 - s0) - (c1 - c0)) / wall
        return {
            "engine_cores": (s1 - s0) / wall,
            "peft_cores": (c1 - c0) / wall if self.pid else None,
            "other_load": None if math.isnan(other) else max(0.0, other),
        }


def _ratio(a, b):
    return a / b if a is not None and b else None


def targets(phases: dict[str, dict]) -> dict[str, dict]:
    """{load level: the issue's targets and the comparisons with the status quo at that load}
    (None where not run); phases carry their "load" (None: the closed loop)."""
    out = {}
    for load in dict.fromkeys(m.get("load") for m in phases.values() if "inference_tok_s" in m):
        alone, both, quo = (phases.get(phase(k, load), {}) for k in (INFERENCE, COSERVED, STATUS))
        train, peft = phases.get(TRAIN, {}), phases.get(PEFT_SOLO, {})
        r = lambda a, ka, b, kb: _ratio(a.get(ka), b.get(kb))  # noqa: E731
        out[level_name(load)] = {
            "load": load,
            "coserved_itl_p99_vs_alone": r(both, "itl_p99_ms", alone, "itl_p99_ms"),
            "coserved_itl_p50_vs_alone": r(both, "itl_p50_ms", alone, "itl_p50_ms"),
            "coserved_train_vs_solo": r(both, "train_tok_s", train, "train_tok_s"),
            "coserved_inference_vs_alone": r(both, "inference_tok_s", alone, "inference_tok_s"),
            "status_quo_itl_p99_vs_alone": r(quo, "itl_p99_ms", alone, "itl_p99_ms"),
            "status_quo_train_vs_solo": r(quo, "train_tok_s", train, "train_tok_s"),
            "status_quo_train_vs_peft_solo": r(quo, "train_tok_s", peft, "train_tok_s"),
            "status_quo_inference_vs_alone": r(quo, "inference_tok_s", alone, "inference_tok_s"),
            "peft_solo_vs_solo": r(peft, "train_tok_s", train, "train_tok_s"),
            "coserved_vs_status_quo_itl_p99": r(both, "itl_p99_ms", quo, "itl_p99_ms"),
            "coserved_vs_status_quo_train": r(both, "train_tok_s", quo, "train_tok_s"),
        }
    return out


def verdicts(found: dict[str, dict]) -> list[str]:
    """One line per target or comparison that was measured, at each load. The training target
    is the issue's for inference at about half the capacity: judged at the open loops, shown
    without a verdict at the closed loop (it saturates the engine: no idle time to train in)."""

    def line(label, value, goal, ok):
        if value is None:
            return None
        return f"{label}: {value:.2f}x ({goal}: {'met' if ok(value) else 'MISSED'})"

    lines = []
    for level, t in found.items():
        at = f"[{level}] "
        train = t["coserved_train_vs_solo"]
        kept = None
        if t["load"] is None and train is not None:  # saturated: shown, not judged
            kept = f"{at}co-served training tok/s / training alone: {train:.2f}x (no target)"
        elif t["load"] is not None:
            kept = line(at + "co-served training tok/s / training alone", train,
                        f"target >= {TRAIN_TARGET}x", lambda v: v >= TRAIN_TARGET)  # fmt: skip
        lines += [
            line(at + "co-served ITL p99 / inference alone", t["coserved_itl_p99_vs_alone"],
                 f"target <= {ITL_TARGET}x", lambda v: v <= ITL_TARGET),
            kept,
            line(at + "co-served ITL p99 / status quo ITL p99", t["coserved_vs_status_quo_itl_p99"],
                 "better than the status quo: < 1", lambda v: v < 1),
            line(at + "co-served training tok/s / status quo (PEFT) training tok/s",
                 t["coserved_vs_status_quo_train"], "better than the status quo: > 1",
                 lambda v: v > 1),
        ]  # fmt: skip
        for label, key in (
            ("co-served ITL p50 / alone", "coserved_itl_p50_vs_alone"),
            ("co-served inference tok/s / alone", "coserved_inference_vs_alone"),
            ("status quo ITL p99 / inference alone", "status_quo_itl_p99_vs_alone"),
            ("status quo inference tok/s / alone", "status_quo_inference_vs_alone"),
            ("status quo (PEFT) training tok/s / PEFT alone", "status_quo_train_vs_peft_solo"),
        ):
            if t[key] is not None:
                lines.append(f"{at}{label}: {t[key]:.2f}x")
    first = next(iter(found.values()), {})
    if first.get("peft_solo_vs_solo") is not None:
        lines.append(f"PEFT alone training tok/s / loraplex training alone: "
                     f"{first['peft_solo_vs_solo']:.2f}x")  # fmt: skip
    return [x for x in lines if x is not None]


def noise(phases: dict[str, dict], limit: float = 0.05) -> str | None:
    """A warning when other processes kept more than `limit` cores busy in some phase."""
    loads = {n: m["other_load"] for n, m in phases.items() if m.get("other_load") is not None}
    worst = max(loads, key=loads.get, default=None)
    if worst is None or loads[worst] <= limit:
        return None
    return (f"WARNING: other processes kept {loads[worst]:.2f} cores busy during '{worst}' "
            f"(above {limit}): this run is noisy")  # fmt: skip


def loss_check(phases: dict[str, dict]) -> dict:
    """Max |loss difference| per optimizer step against the engine's training-alone job over
    the steps both logged (same init and data: PEFT and co-served should match it)."""
    ref = phases.get(TRAIN, {}).get("losses", [])
    out = {}
    for name, m in phases.items():
        common = list(zip(ref, m.get("losses", []), strict=False))
        if name != TRAIN and common:
            out[name] = {"steps": len(common), "max_abs_diff": max(abs(a - b) for a, b in common)}
    return out


def command() -> str:
    """The command line, when run as `loraplex` (not when called from Python)."""
    if Path(sys.argv[0]).name != "loraplex":
        return "(called from Python)"
    return "loraplex " + shlex.join(sys.argv[1:])


COLUMNS = ("phase", "offered tok/s", "inference tok/s", "ITL p50 ms", "ITL p99 ms",
           "TTFT p50 ms", "train tok/s", "ITL p50 / alone", "ITL p99 / alone", "train / solo",
           "inference busy", "training busy", "engine cores", "PEFT cores",
           "other load")  # fmt: skip


def _cells(name: str, m: dict, phases: dict) -> list[str]:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    alone = phases.get(phase(INFERENCE, m.get("load")), {})
    solo = phases.get(TRAIN, {}).get("train_tok_s")
    has_inf, has_train = "inference_tok_s" in m, "train_tok_s" in m
    return [
        name,
        f(m.get("offered_tok_s")),
        f(m.get("inference_tok_s")),
        f(m.get("itl_p50_ms")),
        f(m.get("itl_p99_ms")),
        f(m.get("ttft_p50_ms")),
        f(m.get("train_tok_s")),
        f(_ratio(m.get("itl_p50_ms"), alone.get("itl_p50_ms")), "{:.2f}x") if has_inf else "-",
        f(_ratio(m.get("itl_p99_ms"), alone.get("itl_p99_ms")), "{:.2f}x") if has_inf else "-",
        f(_ratio(m.get("train_tok_s"), solo), "{:.2f}x") if has_train else "-",
        f(m.get("inference_busy"), "{:.2f}"),
        f(m.get("training_busy"), "{:.2f}"),
        f(m.get("engine_cores"), "{:.2f}"),
        f(m.get("peft_cores"), "{:.2f}"),
        f(m.get("other_load"), "{:.2f}"),
    ]


def format_table(phases: dict[str, dict]) -> str:
    """Aligned plain text (first column left, numbers right)."""
    rows = [list(COLUMNS)] + [_cells(n, m, phases) for n, m in phases.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    just = [str.ljust] + [str.rjust] * (len(COLUMNS) - 1)
    lines = ["  ".join(j(c, w) for j, c, w in zip(just, r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(phases: dict[str, dict], lines: list[str], setup: dict) -> str:
    """results.md: the setup, the table in Markdown and the target lines."""
    rows = [_cells(n, m, phases) for n, m in phases.items()]
    table = ["| " + " | ".join(COLUMNS) + " |", "|---" + "|---:" * (len(COLUMNS) - 1) + "|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    head = [f"# loraplex bench coserve ({setup['date']})", "", f"`{setup['command']}`", "",
            f"machine: {setup['machine']}; model {setup['model']}; {setup['workload']}; "
            f"job: {setup['job']}", ""]  # fmt: skip
    return "\n".join(head + table + [""] + [f"- {x}" for x in lines]) + "\n"

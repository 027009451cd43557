"""The soak's pass criteria, its table, and results.json + results.md.

Each criterion is (name, value, target, passed, gate): `gate` False marks a target that is
reported but does not decide the exit status (fairness, unless `--fairness-gate`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from loraplex.loadtests.soak_traffic import ACCOUNTED, DELIBERATE, Soak

logger = logging.getLogger(__name__)

RSS_TOLERANCE = 0.05
FAIRNESS_TARGET = 2.0


def _rss(checks: list[dict], warmup_s: float) -> dict | None:
    samples = [(c["t"], c["rss_kib"]) for c in checks if c.get("rss_kib")]
    after = [v for t, v in samples if t >= warmup_s]
    if not after:
        return None
    warm = after[0]
    return {"warmup_mib": warm / 1024, "max_mib": max(after) / 1024, "min_mib": min(after) / 1024,
            "final_mib": after[-1] / 1024, "growth": max(after) / warm - 1.0,
            "samples": len(after)}  # fmt: skip


def _evictions_by_quarter(checks: list[dict], main_s: float) -> list[int]:
    """Evictions counted in each quarter of the main phase."""
    points = [(c["t"], c["evictions"]) for c in checks if "evictions" in c and c["t"] <= main_s]
    out = []
    for q in range(4):
        lo, hi = main_s * q / 4, main_s * (q + 1) / 4
        inside = [e for t, e in points if lo <= t <= hi]
        before = [e for t, e in points if t < lo]
        start = before[-1] if before else (inside[0] if inside else 0)
        out.append((inside[-1] - start) if inside else 0)
    return out


def criteria(soak: Soak, *, main_s: float, warmup_s: float, fair: dict | None,
             idle: dict, exit_status: int | None, fairness_gate: bool) -> list[tuple]:  # fmt: skip
    t = soak.tally
    errors = {k: v for k, v in t.kinds.items() if k not in ("ok", *DELIBERATE)}
    unaccounted = {k: v for k, v in errors.items()
                   if k in ("cut", "bad_token_count", "timeout", "connection")}  # fmt: skip
    checks = [c for c in t.checks if "integrity" in c]
    bad_checks = sum(1 for c in checks if not c["integrity"])
    rows = [
        ("errors other than deliberate", sum(errors.values()) or "0", "0", not errors, True),
        ("accepted requests completed or ended with an error event",
         f"{sum(t.kinds[k] for k in ACCOUNTED if k in t.kinds)} accounted, "
         f"{sum(unaccounted.values())} not", "all", not unaccounted, True),
        ("pool integrity (GET /v1/admin/integrity)", f"{len(checks) - bad_checks}/{len(checks)}"
         f" ok", "all ok", bool(checks) and not bad_checks, True),
        ("idle at the end (no KV pages, nothing running or waiting)", json.dumps(idle),
         "kv 0, 0 running, 0 waiting", idle.get("ok", False), True),
    ]  # fmt: skip
    rss = _rss(t.checks, warmup_s)
    if rss is None:
        rows.append(("server RSS flat after warm-up", "not measured (no server pid)",
                     f"<= +{RSS_TOLERANCE:.0%}", True, False))  # fmt: skip
    else:
        rows.append(("server RSS flat after warm-up",
                     f"warm-up {rss['warmup_mib']:.1f} MiB, max {rss['max_mib']:.1f}, final "
                     f"{rss['final_mib']:.1f} ({rss['growth']:+.1%})", f"<= +{RSS_TOLERANCE:.0%}",
                     rss["growth"] <= RSS_TOLERANCE, True))  # fmt: skip
    quarters = _evictions_by_quarter(t.checks, main_s)
    last = next((c for c in reversed(t.checks) if "loads" in c), {})
    rows.append(
        (
            "adapter loads/evictions never stop (/metrics)",
            f"{last.get('loads')} loads, {last.get('evictions')} evictions; evictions per "
            f"quarter {quarters}",
            "> 0 in every quarter",
            min(quarters) > 0,
            True,
        )
    )
    rows.append(
        (
            "adapter load/unload loop",
            f"{t.churn['loads']} loads, {t.churn['unloads']} unloads, {t.churn['failures']} failed",
            "> 0, 0 failed",
            t.churn["loads"] > 0 and t.churn["unloads"] > 0 and not t.churn["failures"],
            True,
        )
    )
    jobs = soak.jobs
    rows.append(
        (
            "fine-tuning jobs back to back, the tuned model served",
            f"{dict(jobs)} (last: {soak.job.get('seconds')} s, "
            f"{soak.job.get('trained_tokens')} tokens); {t.tuned_ok} requests to it ok",
            "> 0 succeeded, 0 failed, > 0 ok",
            jobs["succeeded"] > 0 and not jobs["failed"] and t.tuned_ok > 0,
            True,
        )
    )
    deliberate = ", ".join(f"{k} {t.kinds[k]}" for k in DELIBERATE)
    rows.append(("deliberate refusals (not errors)", deliberate, "counted", True, False))
    if exit_status is not None:
        rows.append(("server stopped by SIGTERM", f"exit status {exit_status}", "0",
                     exit_status == 0, True))  # fmt: skip
    if fair:
        ok = all(fair[f"{q}_ratio"] is not None and fair[f"{q}_ratio"] <= FAIRNESS_TARGET
                 for q in ("p50", "p99"))  # fmt: skip
        a, f = fair["alone"], fair["flood"]
        rows.append((f"fairness: t1's TTFT beside t0's {fair['flood_streams']}-stream flood",
                     f"p50 {_ms(a['p50_s'])} -> {_ms(f['p50_s'])} ms ({_x(fair['p50_ratio'])}), "
                     f"p99 {_ms(a['p99_s'])} -> {_ms(f['p99_s'])} ms ({_x(fair['p99_ratio'])})",
                     f"<= {FAIRNESS_TARGET:g}x", ok, fairness_gate))  # fmt: skip
    return rows


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table(rows: list[tuple]) -> str:
    lines = ["| criterion | value | target | result |", "| --- | --- | --- | --- |"]
    for name, value, target, ok, gate in rows:
        verdict = ("PASS" if ok else "FAIL") if gate else ("met" if ok else "missed") + " (info)"
        lines.append(f"| {name} | {value} | {target} | {verdict} |")
    return "\n".join(lines)


def passed(rows: list[tuple]) -> bool:
    return all(ok for _, _, _, ok, gate in rows if gate)


def write(out: Path, setup: dict, soak: Soak, rows: list[tuple], fair: dict | None) -> str:
    """results.json and results.md in `out`; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    t = soak.tally
    result = {
        "setup": setup, "passed": passed(rows),
        "criteria": [dict(zip(("name", "value", "target", "passed", "gate"), r, strict=True))
                     for r in rows],
        "outcomes": dict(t.kinds), "by_tenant": {k: dict(v) for k, v in t.by_tenant.items()},
        "failure_examples": t.examples, "churn": dict(t.churn),
        "finetune_jobs": dict(soak.jobs), "last_job": soak.job,
        "fairness": fair, "checks": t.checks,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    md = [f"# Soak: {'PASS' if result['passed'] else 'FAIL'}", "", table(rows), "",
          "## Outcomes", "", "| tenant | " + " | ".join(sorted(t.kinds)) + " |",
          "| --- |" + " --- |" * len(t.kinds)]  # fmt: skip
    for tenant, c in sorted(t.by_tenant.items()):
        md.append(f"| {tenant} | " + " | ".join(str(c[k]) for k in sorted(t.kinds)) + " |")
    if t.examples:
        md += ["", "## First failure of each kind", ""]
        md += [f"- {k}: `{v}`" for k, v in t.examples.items()]
    md += ["", "## Setup", "", "```json", json.dumps(setup, indent=1, default=str), "```", ""]
    text = "\n".join(md)
    (out / "results.md").write_text(text)
    return text

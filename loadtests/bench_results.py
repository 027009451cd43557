"""`loraplex bench serve`'s report: `results.json` (setup and every row), `results.md` (the table
and the ratios) and PNG plots (throughput against the number of adapters, TTFT CDFs, latency
against the rate), all in one results directory.

A row is one system at one point of the sweep: `system`, `num_adapters`, `rate` (None: closed
loop), then what `stream_client.summarize` measured (PEFT rows carry throughput only), and
`ttft_values` (seconds, one per successful request) for the CDF.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
from pathlib import Path

logger = logging.getLogger(__name__)

# (column title, row key, scale, format)
COLUMNS = (
    ("system", "system", None, "{}"),
    ("adapters", "num_adapters", None, "{}"),
    ("rate (req/s)", "rate", None, "{:g}"),
    ("requests", "requests", None, "{}"),
    ("errors", "errors", None, "{}"),
    ("req/s", "req_per_s", 1, "{:.2f}"),
    ("output tok/s", "output_tok_per_s", 1, "{:.1f}"),
    ("TTFT mean (s)", "ttft_mean", 1, "{:.3f}"),
    ("TTFT p50", "ttft_p50", 1, "{:.3f}"),
    ("TTFT p90", "ttft_p90", 1, "{:.3f}"),
    ("TTFT p99", "ttft_p99", 1, "{:.3f}"),
    ("ITL p50 (ms)", "itl_p50", 1e3, "{:.1f}"),
    ("ITL p99 (ms)", "itl_p99", 1e3, "{:.1f}"),
    ("E2E p50 (s)", "e2e_p50", 1, "{:.2f}"),
    ("E2E p99 (s)", "e2e_p99", 1, "{:.2f}"),
    ("TTFT SLO met", "slo_attainment", 100, "{:.1f}%"),
    ("adapter loads", "adapter_loads", None, "{:.0f}"),
    ("evictions", "adapter_evictions", None, "{:.0f}"),
    ("client cores", "client_cores", 1, "{:.3f}"),
    ("server cores", "server_cores", 1, "{:.2f}"),
    ("other load", "other_load", 1, "{:.2f}"),
)


def _cell(row: dict, key: str, scale, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-" if key != "rate" else "closed loop"
    return fmt.format(value * scale if scale else value)


def format_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "|" + "|".join("---" if c[2] is None else "---:" for c in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r, *c[1:]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _point(row: dict) -> tuple:
    return row["num_adapters"], row["rate"]


def ratios(rows: list[dict], sweep: str, reference_adapters: int = 64) -> list[str]:
    """Lines of output-tokens/s ratios: along the sweep (against n = `reference_adapters` if
    swept, else the first point), and ours against every other system at the same point."""
    ours = [r for r in rows if r["system"] in ("loraplex", "target")]
    lines = []
    if sweep == "num_adapters" and len(ours) > 1:
        ref = next((r for r in ours if r["num_adapters"] == reference_adapters), ours[0])
        for r in ours:
            lines.append(
                f"n={r['num_adapters']} / n={ref['num_adapters']}: "
                f"{r['output_tok_per_s'] / ref['output_tok_per_s']:.2f}x"
            )
    for r in ours:
        for o in rows:
            if o["system"] != r["system"] and _point(o) == _point(r) and o["output_tok_per_s"]:
                where = f"n={r['num_adapters']}" + (f", rate {r['rate']:g}" if r["rate"] else "")
                lines.append(
                    f"{r['system']} / {o['system']} ({where}): "
                    f"{r['output_tok_per_s'] / o['output_tok_per_s']:.2f}x"
                )
    return lines


def _machine() -> str:
    cpu = "unknown cpu"
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cpus, {platform.system()} {platform.release()}"


def write_results(out: Path, setup: dict, rows: list[dict], sweep: str) -> str:
    """Write results.json, results.md and the plots into `out`; return the Markdown."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = _machine()
    data = {"date": when, "machine": machine, "setup": setup, "rows": rows}
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    plots = write_plots(out, rows, sweep)
    lines = [
        "# loraplex bench serve",
        "",
        f"- date: {when}",
        f"- machine: {machine}",
        f"- command: `{' '.join(setup.get('argv', []))}`",
        "",
        format_table(rows),
        "",
        "Output tokens/s ratios:",
        "",
        *[f"- {line}" for line in ratios(rows, sweep)],
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
    ]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def write_plots(out: Path, rows: list[dict], sweep: str) -> list[Path]:
    """The PNGs that fit the sweep; none (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("no matplotlib: plots skipped (pip install 'loraplex[bench]')")
        return []
    written = []
    systems = list(dict.fromkeys(r["system"] for r in rows))

    def save(fig, ax, name: str, xlabel: str, ylabel: str, title: str, legend_size=None) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    if sweep == "num_adapters":
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in systems:
            pts = sorted(
                (r["num_adapters"], r["output_tok_per_s"]) for r in rows if r["system"] == s
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_ylim(bottom=0)
        save(
            fig,
            ax,
            "throughput_vs_adapters.png",
            "distinct adapters",
            "output tokens/s",
            "Throughput against the number of adapters",
        )
    with_ttft = [r for r in rows if r.get("ttft_values")]
    if with_ttft:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in with_ttft:
            v = sorted(r["ttft_values"])
            label = f"{r['system']} n={r['num_adapters']}"
            label += f" rate {r['rate']:g}" if r["rate"] else ""
            ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=label)
        save(fig, ax, "ttft_cdf.png", "time to first token (s)", "share of requests", "TTFT CDF", 7)
    if sweep == "rate":
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in systems:
            pts = sorted(
                ((r["rate"], r) for r in rows if r["system"] == s and r.get("ttft_p50")),
                key=lambda p: p[0],
            )
            for key, style in (("ttft_p50", "-"), ("ttft_p99", "--"), ("e2e_p50", ":")):
                ax.plot(
                    [p[0] for p in pts],
                    [p[1][key] for p in pts],
                    style,
                    marker="o",
                    label=f"{s} {key.replace('_', ' ')}",
                )
        save(
            fig,
            ax,
            "latency_vs_rate.png",
            "request rate (req/s)",
            "seconds",
            "Latency against the request rate",
            7,
        )
    return written

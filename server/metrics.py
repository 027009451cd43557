"""Prometheus metrics on a per-app `CollectorRegistry` (several apps can live in one process).

Histograms (seconds): time to first token, inter-token latency, end-to-end latency, queue time
(arrival -> admission by the scheduler), adapter load time (files -> validated host copy).
Engine gauges and counters (running/waiting, pool pages, adapters per tier, device loads and
evictions) are read at scrape time from the `EngineStats` snapshot that the engine thread
replaces after each step: the step pays for a few attribute reads, never for metric locks.
Per-tenant counters: prompt and generation tokens, requests by status. Label values are
bounded: tenants come from the config, kinds/tiers are fixed, status is an HTTP code.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # no `*_created` series (process-wide prometheus_client setting)

LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5,
)  # fmt: skip


class _EngineCollector:
    def __init__(self, stats: Callable) -> None:
        self._stats = stats
        self.job_counts: Callable[[], dict[str, int]] | None = None  # the fine-tuning API's

    def collect(self):
        s = self._stats()
        yield _gauge("loraplex_num_requests_running", "Sequences running in the engine", s.running)
        yield _gauge("loraplex_num_requests_waiting", "Sequences waiting for admission", s.waiting)
        yield _gauge("loraplex_pool_pages_total", "Pages in the unified pool", s.pages_total)
        used = GaugeMetricFamily(
            "loraplex_pool_pages_used", "Pool pages in use by kind", labels=["kind"]
        )
        used.add_metric(["kv"], s.pages_kv)
        used.add_metric(["adapter"], s.pages_adapter)
        used.add_metric(["train"], s.pages_train)
        yield used
        jobs = GaugeMetricFamily(
            "loraplex_finetune_jobs", "Fine-tuning jobs by status", labels=["status"]
        )
        counts = self.job_counts() if self.job_counts is not None else {
            "running": s.finetune_running, "queued": s.finetune_queued,
        }  # fmt: skip
        for status, n in sorted(counts.items()):
            jobs.add_metric([status], n)
        yield jobs
        # The Gateway API Inference Extension's model-server protocol (vLLM's names, ours
        # prefixed): docs/deploy.md says what the labels mean here.
        usable = s.pages_total - s.pages_kv - s.pages_train - s.pages_adapter + s.pages_evictable
        yield _gauge(
            "loraplex_kv_cache_usage_perc",
            "Share of the pool not available to new KV pages (KV, training, adapters in use)",
            1.0 - usable / s.pages_total if s.pages_total else 0.0,
        )
        lora = GaugeMetricFamily(
            "loraplex_lora_requests_info",
            "Adapters of running and waiting requests; value = time of the snapshot",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        lora.add_metric(
            [str(s.max_num_seqs), _names(s.running_adapters), _names(s.waiting_adapters)],
            s.taken_at,
        )
        yield lora
        loaded = GaugeMetricFamily(
            "loraplex_adapters_loaded",
            "Adapters resident in pool pages (device) and registered in host memory (host)",
            labels=["tier"],
        )
        loaded.add_metric(["device"], s.adapters_device)
        loaded.add_metric(["host"], s.adapters_host)
        yield loaded
        yield CounterMetricFamily(
            "loraplex_adapter_loads", "Adapter copies into pool pages", value=s.adapter_loads
        )
        yield CounterMetricFamily(
            "loraplex_num_preemptions",
            "Running sequences preempted (KV pages ran out) and requeued by recompute",
            value=s.preemptions,
        )
        yield CounterMetricFamily(
            "loraplex_adapter_evictions",
            "Adapters evicted from pool pages",
            value=s.adapter_evictions,
        )


def _names(engine_names) -> str:
    """Comma-separated public adapter names: a tenant's adapter is "tenant/name" (its engine
    name without the load number), a shared one its name."""
    return ",".join(sorted({n.rsplit("@", 1)[0] if "/" in n else n for n in engine_names}))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, stats: Callable) -> None:
        """`stats()` returns the latest `EngineStats`."""
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "loraplex_inter_token_latency_seconds",
            "Time between consecutive tokens of one sequence",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "loraplex_e2e_request_latency_seconds",
            "Time from arrival to the last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "loraplex_request_queue_time_seconds",
            "Time from arrival to admission by the scheduler",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_load = Histogram(
            "loraplex_adapter_load_seconds",
            "Time to read, validate and register an adapter",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens", "Prompt tokens processed", ["tenant"], registry=r
        )
        self.generation_tokens = Counter(
            "loraplex_generation_tokens", "Tokens generated", ["tenant"], registry=r
        )
        self.requests = Counter(
            "loraplex_requests",
            "Requests by tenant and HTTP status",
            ["tenant", "status"],
            registry=r,
        )
        self.finetune_tokens = Counter(
            "loraplex_finetune_trained_tokens", "Tokens trained on by fine-tuning jobs",
            ["tenant"], registry=r,
        )  # fmt: skip
        self.finetune_step_seconds = Histogram(
            "loraplex_finetune_step_seconds", "Time of one optimizer step of a fine-tuning job",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.finetune_loss = Gauge(
            "loraplex_finetune_loss", "Training loss of the last step of each running job",
            ["job"], registry=r,
        )  # fmt: skip
        self._collector = _EngineCollector(stats)
        r.register(self._collector)

    def set_job_counts(self, counts: Callable[[], dict[str, int]]) -> None:
        self._collector.job_counts = counts

    def finetune_step(self, tenant: str, job: str, tokens: int, seconds: float, loss: float):
        self.finetune_tokens.labels(tenant=tenant).inc(tokens)
        self.finetune_step_seconds.observe(seconds)
        self.finetune_loss.labels(job=job).set(loss)

    def finetune_ended(self, job: str) -> None:
        """Running jobs only: the loss gauge's label set stays bounded."""
        try:
            self.finetune_loss.remove(job)
        except KeyError:
            pass

    def count_request(self, tenant: str, status: int) -> None:
        self.requests.labels(tenant=tenant, status=str(status)).inc()

    def count_tokens(self, tenant: str, prompt: int, generated: int) -> None:
        if prompt:
            self.prompt_tokens.labels(tenant=tenant).inc(prompt)
        if generated:
            self.generation_tokens.labels(tenant=tenant).inc(generated)

    def render(self) -> bytes:
        return generate_latest(self.registry)

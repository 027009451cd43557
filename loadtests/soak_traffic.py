"""The soak's clients: one streamed request with its outcome classified, the tenants' closed
loops, the adapter load/unload loops, the fine-tuning job, and the checks every few seconds
(integrity, the server's RSS, adapter loads/evictions).

Outcomes of a request (`Tally.kinds`):
- "ok": 200, output, a finish_reason, `usage.completion_tokens` == max_tokens (the requests use
  `ignore_eos`), then `[DONE]`;
- "404_unloaded", "429_queue_full", "429_rate_limit_exceeded": deliberate. A 404 counts as
  deliberate only for a hot adapter (one the churn loop loads and unloads) or a tuned model
  retired when a newer one succeeded;
- anything else is an error: another status ("http_<status>_<code>"), an error event in a
  stream ("error_event"), a stream cut before `[DONE]` ("cut"), a wrong token count
  ("bad_token_count"), no answer ("connection", "timeout").
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from loraplex.loadtests.soak_setup import ADMIN, Assets, job_body
from loraplex.loadtests.stream_client import (
    StreamError,
    StreamReader,
    StreamResult,
    chat_body,
    completion_body,
)

logger = logging.getLogger(__name__)

DELIBERATE = ("404_unloaded", "429_queue_full", "429_rate_limit_exceeded")
ACCOUNTED = ("ok", "error_event", *DELIBERATE)  # a request that ended the way it should
REQUEST_TIMEOUT_S = 180.0
TUNED = "@tuned"  # placeholder in a workload: the fine-tuned model once it exists, else base


@dataclass
class Tally:
    kinds: Counter = field(default_factory=Counter)
    by_tenant: dict[str, Counter] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # first detail of each failure kind
    ttft: dict[str, list[float]] = field(default_factory=dict)  # label -> TTFTs of ok requests
    tuned_ok: int = 0
    churn: Counter = field(default_factory=Counter)  # loads, unloads, failures
    checks: list[dict] = field(default_factory=list)  # the periodic samples

    def add(self, tenant: str, kind: str, detail: str, label: str | None, res: StreamResult):
        self.kinds[kind] += 1
        self.by_tenant.setdefault(tenant, Counter())[kind] += 1
        if kind not in ("ok", *DELIBERATE):
            self.examples.setdefault(kind, detail[:400])
            logger.warning("%s request failed (%s): %s", tenant, kind, detail[:200])
        if kind == "ok" and label:
            self.ttft.setdefault(label, []).append(res.ttft)

    def error(self, kind: str, detail: str) -> None:
        """A failure outside a generation request (a load, a check, the job)."""
        self.kinds[kind] += 1
        self.examples.setdefault(kind, detail[:400])
        logger.warning("%s: %s", kind, detail[:200])


class Soak:
    """The state shared by the soak's loops (one asyncio event loop)."""

    def __init__(self, url: str, assets: Assets, args, server_pid: int | None) -> None:
        self.url, self.assets, self.args, self.pid = url, assets, args, server_pid
        self.tally = Tally()
        self.loaded: dict[str, set[str]] = {t: set() for t in assets.hot}
        self.tuned: str | None = None
        self.job: dict = {}  # the last fine-tuning job
        self.jobs: Counter = Counter()  # fine-tuning jobs by final status
        self.retired: set[str] = set()  # tuned models unloaded on purpose
        self.base_id: str | None = None
        self.t0 = time.monotonic()
        self.session: aiohttp.ClientSession | None = None

    def headers(self, tenant: str) -> dict:
        return {"Authorization": f"Bearer {self.assets.keys[tenant]}"}

    async def __aenter__(self) -> Soak:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, sock_connect=10)
        self.session = aiohttp.ClientSession(
            self.url, timeout=timeout, connector=aiohttp.TCPConnector(limit=512)
        )
        async with self.session.get("/v1/models", headers=self.headers(ADMIN)) as r:
            self.base_id = (await r.json())["data"][0]["id"]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    def model_for(self, adapter: str | None) -> str:
        if adapter == TUNED:
            return self.tuned or self.base_id
        return adapter or self.base_id

    async def request(self, tenant: str, model: str, prompt: list[int], max_tokens: int,
                      chat: bool = False, label: str | None = None) -> str:  # fmt: skip
        """One streamed request; its outcome goes into the tally (module docstring)."""
        body = chat_body(model, prompt, max_tokens) if chat else completion_body(
            model, prompt, max_tokens, False)  # fmt: skip
        path = "/v1/chat/completions" if chat else "/v1/completions"
        res = StreamResult(0, time.perf_counter())
        kind, detail = "ok", ""
        try:
            reader = StreamReader(res)
            async with self.session.post(path, json=body, headers=self.headers(tenant)) as r:
                if r.status != 200:
                    detail = (await r.read()).decode(errors="replace")
                    kind = self._refused(tenant, model, r.status, detail)
                else:
                    async for chunk in r.content.iter_any():
                        reader.feed(chunk)
            if kind == "ok":
                reader.finish()
                if res.completion_tokens != max_tokens or not res.finish_reason:
                    kind = "bad_token_count"
                    detail = f"{res.completion_tokens} of {max_tokens}, {res.finish_reason}"
        except StreamError as e:
            kind = "error_event" if "error event" in str(e) else "cut"
            detail = str(e)
        except asyncio.TimeoutError:
            kind, detail = "timeout", f"no end after {REQUEST_TIMEOUT_S:.0f} s"
        except aiohttp.ClientError as e:
            kind, detail = "connection", f"{type(e).__name__}: {e}"
        if kind == "ok" and model == self.tuned:
            self.tally.tuned_ok += 1
        self.tally.add(tenant, kind, f"{model}: {detail}", label, res)
        return kind

    def _refused(self, tenant: str, model: str, status: int, detail: str) -> str:
        try:
            code = json.loads(detail)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if status == 404 and (model in self.assets.hot.get(tenant, {}) or model in self.retired):
            return "404_unloaded"
        if status == 429 and code in ("queue_full", "rate_limit_exceeded"):
            return f"429_{code}"
        return f"http_{status}_{code}"

    async def tenant_loop(self, tenant: str, trace, stop_at: float, seed: int) -> None:
        """Closed loop: take the trace's requests in turn until `stop_at`."""
        rng = random.Random(seed)
        for req in trace:
            if time.monotonic() >= stop_at:
                return
            chat = rng.random() < self.args.chat_share
            kind = await self.request(tenant, self.model_for(req.adapter), req.prompt,
                                      req.output_len, chat=chat)  # fmt: skip
            if kind.startswith("429"):
                await asyncio.sleep(0.25)  # what a client does on 429

    async def churn_loop(self, tenant: str, stop_at: float, seed: int) -> None:
        """Every `--churn-interval` seconds load a hot adapter of `tenant`, or unload one."""
        rng = random.Random(seed)
        hot = self.assets.hot[tenant]
        while hot and time.monotonic() + self.args.churn_interval < stop_at:
            await asyncio.sleep(self.args.churn_interval * rng.uniform(0.5, 1.5))
            name = rng.choice(sorted(hot))
            h = self.headers(tenant)
            try:
                if name in self.loaded[tenant]:
                    self.loaded[tenant].discard(name)  # its 404s are deliberate from now
                    async with self.session.delete(f"/v1/adapters/{name}", headers=h) as r:
                        ok, what, text = r.status == 200, "unloads", await r.text()
                else:
                    body = {"name": name, "path": hot[name]}
                    async with self.session.post("/v1/adapters", json=body, headers=h) as r:
                        ok, what, text = r.status == 201, "loads", await r.text()
                        if ok:
                            self.loaded[tenant].add(name)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                ok, what, text = False, "churn", f"{type(e).__name__}: {e}"
            if ok:
                self.tally.churn[what] += 1
            else:
                self.tally.churn["failures"] += 1
                self.tally.error("churn_failed", f"{tenant} {what} {name}: {text}")

    async def finetune(self, tenant: str, stop_at: float) -> None:
        """Upload the training file, then run jobs back to back until `stop_at` (one still
        running then is cancelled: deliberate); each tuned model joins the traffic."""
        h = self.headers(tenant)
        data = aiohttp.FormData()
        data.add_field("purpose", "fine-tune")
        data.add_field("file", Path(self.assets.train_file).read_bytes(), filename="train.jsonl")
        try:
            async with self.session.post("/v1/files", data=data, headers=h) as r:
                file_id = (await r.json())["id"]
            while time.monotonic() < stop_at:
                await self._one_job(h, file_id, stop_at)
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as e:
            self.tally.error("finetune_failed", f"{type(e).__name__}: {e} ({self.job})")

    async def _one_job(self, h: dict, file_id: str, stop_at: float) -> None:
        body = job_body(self.base_id, file_id, self.args.train_epochs)
        t0 = time.monotonic()
        async with self.session.post("/v1/fine_tuning/jobs", json=body, headers=h) as r:
            self.job = await r.json()
        path = f"/v1/fine_tuning/jobs/{self.job['id']}"
        while self.job["status"] not in ("succeeded", "failed", "cancelled"):
            await asyncio.sleep(1.0)
            if time.monotonic() >= stop_at:
                async with self.session.post(f"{path}/cancel", headers=h) as r:
                    await r.read()
            async with self.session.get(path, headers=h) as r:
                self.job = await r.json()
        self.job["seconds"] = round(time.monotonic() - t0, 1)
        self.jobs[self.job["status"]] += 1
        if self.job["status"] == "succeeded":
            self.tuned = self.job["fine_tuned_model"]
            logger.debug("fine-tuning job %s succeeded in %.0f s: %s serves", self.job["id"],
                         self.job["seconds"], self.tuned)  # fmt: skip
            await self._retire_tuned(h)
        elif self.job["status"] == "failed":
            self.tally.error("finetune_failed", f"job failed: {self.job.get('error')}")

    async def _retire_tuned(self, h: dict) -> None:
        """Unload the earlier tuned models and checkpoints (their 404s are deliberate from
        now): host memory stays flat however many jobs run."""
        async with self.session.get("/v1/adapters", headers=h) as r:
            names = [a["id"] for a in (await r.json())["data"] if a["id"].startswith("ft:")]
        for name in names:
            if name != self.tuned:
                self.retired.add(name)
                async with self.session.delete(f"/v1/adapters/{name}", headers=h) as r:
                    if r.status != 200:
                        self.tally.error("churn_failed", f"unloading {name}: {await r.text()}")

    async def check(self) -> dict:
        """One sample: integrity (admin), the server's RSS, the adapter counters."""
        sample = {"t": round(time.monotonic() - self.t0, 1), "rss_kib": rss_kib(self.pid)}
        try:
            async with self.session.get("/v1/admin/integrity", headers=self.headers(ADMIN)) as r:
                body = await r.json()
                sample["integrity"] = r.status == 200 and body.get("ok") is True
                sample["pages_used"] = body.get("pages_used")
                sample["running"], sample["waiting"] = body.get("running"), body.get("waiting")
            if not sample["integrity"]:
                self.tally.error("integrity_failed", json.dumps(body))
            async with self.session.get("/metrics") as r:
                sample.update(counters(await r.text()))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            sample["integrity"] = False
            self.tally.error("check_failed", f"{type(e).__name__}: {e}")
        self.tally.checks.append(sample)
        return sample

    async def check_loop(self, stop: asyncio.Event) -> None:
        last_log = 0.0
        while not stop.is_set():
            s = await self.check()
            if s["t"] - last_log >= self.args.progress_every:
                last_log = s["t"]
                k = self.tally.kinds
                errors = sum(v for n, v in k.items() if n not in ("ok", *DELIBERATE))
                logger.info(
                    "%5.0f s: %d ok, %d deliberate, %d errors; adapter loads %s evictions %s; "
                    "%s running, %s waiting; churn %s; jobs %s; RSS %.1f MiB", s["t"], k["ok"],
                    sum(k[d] for d in DELIBERATE), errors, s.get("loads"), s.get("evictions"),
                    s.get("running"), s.get("waiting"), dict(self.tally.churn),
                    dict(self.jobs, last=self.job.get("status")), (s["rss_kib"] or 0) / 1024,
                )  # fmt: skip
            try:
                await asyncio.wait_for(stop.wait(), self.args.check_interval)
            except asyncio.TimeoutError:
                pass


def rss_kib(pid: int | None) -> int | None:
    """VmRSS of a process from /proc/<pid>/status, None without a pid (or off Linux)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def counters(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "loraplex_adapter_loads_total":
            out["loads"] = int(float(value))
        elif name == "loraplex_adapter_evictions_total":
            out["evictions"] = int(float(value))
    return out

"""Fine-tuning jobs behind the OpenAI API: SQLite state (server/finetune_db.py) driven by the
engine's co-served jobs (engine/training_jobs.py).

Life of a job: `validating_files` (the files are tokenized off the engine thread) -> `queued`
(submitted to the engine, waiting for its turn and its pages) -> `running` -> `succeeded`
(its adapter is registered for the tenant under `fine_tuned_model` first) | `failed` |
`cancelled`. The engine's listener runs on the engine thread and writes events, metrics,
checkpoints and statuses straight to the database; registering adapters goes through the
event loop. Checkpoints (one per epoch) are served as `<fine_tuned_model>:ckpt-step-N`.

After a restart (`recover`): jobs still validating or queued are started again (they never
trained); a job that was running is marked failed with the step it reached (its optimizer state
is not saved, so it is not resumed; its checkpoints stay servable); tuned models and
checkpoints of every job are registered again for their tenants.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import os
import secrets
import time
from pathlib import Path

from loraplex.engine.finetune_data import DataError, load_examples
from loraplex.engine.trainer import FinetuneConfig
from loraplex.server.adapters import register_owned
from loraplex.server.finetune_db import FinetuneDB
from loraplex.server.finetune_protocol import BASE_LEARNING_RATE
from loraplex.server.threads import await_in_fresh_thread

logger = logging.getLogger(__name__)
ACTIVE = ("validating_files", "queued", "running")
ENDED = ("succeeded", "failed", "cancelled")


def cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE") or Path.home() / ".cache/loraplex")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class FinetuneService:
    def __init__(self, ctx, root: str | Path, *, max_file_bytes: int, max_jobs_per_tenant: int):
        self.ctx, self.root = ctx, Path(root)
        self.max_file_bytes, self.max_jobs_per_tenant = max_file_bytes, max_jobs_per_tenant
        for sub in ("files", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.db = FinetuneDB(self.root / "finetune.db")
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        ctx.engine.training.listener = self._on_engine_event  # before the engine thread starts

    # -- files -------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.root / "files" / f"{file_id}.jsonl"

    async def validate_file(self, path: Path) -> int:
        """Number of examples; DataError naming the first bad line."""
        eng = self.ctx.engine
        if eng.tokenizer is None:
            raise DataError(str(path), 0, "the base model has no tokenizer: it cannot read text")
        examples = await await_in_fresh_thread(
            lambda: load_examples(path, eng.tokenizer, max_seq_len=eng.max_model_len)
        )
        return len(examples)

    # -- jobs --------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def tuned_name(self, row: dict) -> str:
        return f"ft:{row['model']}:{row['tenant']}:{row['suffix'] or ''}:{row['id']}"

    def event(self, job_id: str, message: str, *, level="info", type_="message", data=None):
        self.db.add_event({"id": new_id("ftevent"), "job_id": job_id, "level": level,
                           "message": message, "type": type_, "data": data})  # fmt: skip

    def launch(self, job_id: str) -> None:
        task = asyncio.ensure_future(self._start(job_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, job_id: str) -> None:
        row = self.db.get_job(job_id)
        eng = self.ctx.engine
        try:
            train = await await_in_fresh_thread(
                lambda: load_examples(
                    self.file_path(row["training_file"]),
                    eng.tokenizer,
                    max_seq_len=eng.max_model_len,
                )  # fmt: skip
            )
            valid = None
            if row["validation_file"]:
                valid = await await_in_fresh_thread(
                    lambda: load_examples(
                        self.file_path(row["validation_file"]),
                        eng.tokenizer,
                        max_seq_len=eng.max_model_len,
                    )  # fmt: skip
                )
        except (DataError, OSError) as e:
            reason = e.reason if isinstance(e, DataError) else str(e)
            line = f" line {e.line}:" if isinstance(e, DataError) and e.line else ""
            self._fail(job_id, "invalid_file", f"the training data is invalid:{line} {reason}")
            return
        hp = row["hyperparameters"]
        if hp.get("batch_size") == "auto":
            hp["batch_size"] = max(1, min(8, len(train) // 16))
        self.db.update_job(job_id, hyperparameters=hp)
        config = FinetuneConfig(
            rank=hp["lora_rank"], alpha=hp["lora_alpha"],
            target_modules=tuple(hp["target_modules"]),
            epochs=hp["n_epochs"], batch_size=hp["batch_size"],
            learning_rate=BASE_LEARNING_RATE * hp["learning_rate_multiplier"], shuffle=True,
            seed=row["seed"],
        )  # fmt: skip
        out = self.job_dir(job_id)

        def submit(engine):  # on the engine thread: no cancel can slip in between
            if self.db.get_job(job_id)["status"] != "validating_files":
                return None
            job = engine.submit_finetune(job_id, config, train, str(out / "adapter"),
                                         validation=valid,
                                         checkpoint_dir=str(out / "checkpoints"))  # fmt: skip
            self.db.update_job(job_id, status="queued")
            self.event(job_id, "Files validated, moving job to queued state")
            return job

        try:
            await self.ctx.aengine.call(submit)
        except ValueError as e:
            self._fail(job_id, "invalid_job", str(e))
        except RuntimeError as e:  # the server is stopping: recover() starts it again
            logger.warning("fine-tuning job %s not submitted: %s", job_id, e)

    def _fail(self, job_id: str, code: str, message: str) -> None:
        self.db.update_job(job_id, status="failed", finished_at=int(time.time()),
                           error={"code": code, "message": message, "param": None})  # fmt: skip
        self.event(job_id, f"Fine-tuning job failed: {message}", level="error")

    async def cancel(self, job_id: str) -> None:
        def cancel(engine):
            if not engine.cancel_finetune(job_id):  # not in the engine yet (validating)
                if self.db.get_job(job_id)["status"] in ACTIVE:
                    self.db.update_job(job_id, status="cancelled", finished_at=int(time.time()))
                    self.event(job_id, "Fine-tuning job cancelled")

        await self.ctx.aengine.call(cancel)

    # -- the engine's listener (engine thread) -------------------------------------------------

    def _on_engine_event(self, job, event: str, data) -> None:
        job_id = job.job_id
        row = self.db.get_job(job_id)
        if row is None:  # a job submitted to the engine by something else
            return
        metrics = self.ctx.metrics
        if event == "running":
            self.db.update_job(job_id, status="running")
            self.event(job_id, "Fine-tuning job started")
        elif event == "step":
            tokens = sum(e.tokens for e in job.log)
            elapsed = time.time() - job.started_at
            left = job.total_steps - len(job.log)
            finish = int(time.time() + elapsed / len(job.log) * left)
            self.db.update_job(job_id, trained_tokens=tokens, estimated_finish=finish)
            payload = {"step": data.step, "train_loss": data.loss, "total_steps": job.total_steps}
            if data.validation_loss is not None:
                payload["valid_loss"] = data.validation_loss
            self.event(job_id, f"Step {data.step}/{job.total_steps}: training loss={data.loss:.4f}",
                       type_="metrics", data=payload)  # fmt: skip
            metrics.finetune_step(row["tenant"], job_id, data.tokens, data.seconds, data.loss)
        elif event == "checkpoint":
            step, path = data
            entry = job.log[-1]
            m = {"step": step, "train_loss": entry.loss}
            if entry.validation_loss is not None:
                m["valid_loss"] = entry.validation_loss
            name = f"{self.tuned_name(row)}:ckpt-step-{step}"
            self.db.add_checkpoint({"id": new_id("ftckpt"), "job_id": job_id, "step": step,
                                    "name": name, "path": path, "metrics": m,
                                    "created_at": int(time.time())})  # fmt: skip
            self._soon(self._register(row["tenant"], name, path))
        elif event == "ended":
            metrics.finetune_ended(job_id)
            status = job.status.value
            if status == "succeeded":
                self._soon(self._finish(row, job.adapter_path, list(job.log)))
            elif status == "failed":
                self._fail(job_id, "job_failed", job.reason)
            elif row["status"] != "cancelled":
                self.db.update_job(job_id, status="cancelled", finished_at=int(time.time()))
                self.event(job_id, "Fine-tuning job cancelled")

    def _soon(self, coro) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def _register(self, tenant: str, name: str, path: str) -> bool:
        try:
            await register_owned(self.ctx, tenant, name, path)
            return True
        except Exception as e:
            logger.warning("could not serve %s for %s: %s", name, tenant, e)
            return False

    async def _finish(self, row: dict, adapter_path: str, log: list) -> None:
        job_id, name = row["id"], self.tuned_name(row)
        results = self._results_file(row, log)
        if not await self._register(row["tenant"], name, adapter_path):
            self._fail(job_id, "registration_failed",
                       f"the adapter was trained but could not be served as {name}")  # fmt: skip
            return
        self.db.update_job(job_id, status="succeeded", fine_tuned_model=name,
                           adapter_path=adapter_path, finished_at=int(time.time()),
                           result_files=[results])  # fmt: skip
        self.event(job_id, f"The job has successfully completed: {name}")

    def _results_file(self, row: dict, log: list) -> str:
        """OpenAI's step-metrics CSV, stored as a `fine-tune-results` file of the tenant."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", "train_loss", "valid_loss", "trained_tokens", "learning_rate"])
        for e in log:
            vl = "" if e.validation_loss is None else f"{e.validation_loss:.6f}"
            w.writerow([e.step, f"{e.loss:.6f}", vl, e.tokens, e.learning_rate])
        data = buf.getvalue().encode()
        file_id = new_id("file")
        self.file_path(file_id).write_bytes(data)
        self.db.add_file({"id": file_id, "tenant": row["tenant"], "filename": "step_metrics.csv",
                          "bytes": len(data), "purpose": "fine-tune-results",
                          "created_at": int(time.time()), "path": str(self.file_path(file_id)),
                          "examples": 0})  # fmt: skip
        return file_id

    # -- start-up ------------------------------------------------------------------------------

    async def recover(self) -> None:
        """Jobs of another base model (a directory shared across models) are left alone."""
        self.loop = asyncio.get_running_loop()
        mine = self.ctx.model_id

        def jobs(statuses):
            return [r for r in self.db.jobs_with_status(statuses) if r["model"] == mine]

        for row in jobs(("validating_files", "queued")):
            self.db.update_job(row["id"], status="validating_files")
            self.event(row["id"], "The server restarted: the job is queued again")
            self.launch(row["id"])
        for row in jobs(("running",)):
            last = self.db.list_events(row["id"], limit=1)[0]
            reached = f" (last event: {last[0]['message']})" if last else ""
            self._fail(
                row["id"], "server_restarted",
                f"the server restarted while the job was running{reached}; it was not resumed "
                f"(optimizer state is not saved); its checkpoints stay servable",
            )  # fmt: skip
        for row in jobs(ENDED):
            if row["status"] == "succeeded" and row["adapter_path"]:
                await self._register(row["tenant"], row["fine_tuned_model"], row["adapter_path"])
            for ck in self.db.all_checkpoints(row["id"]):
                await self._register(row["tenant"], ck["name"], ck["path"])

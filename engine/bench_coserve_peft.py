"""The status quo of `loraplex bench coserve`: a SEPARATE process trains the job's adapter with
HF transformers + PEFT + torch AdamW while the engine serves in the benchmark's process.

`python -m loraplex.engine.bench_coserve_peft --model DIR --examples FILE ...` loads the
checkpoint with transformers in `--dtype` (the engine's; float32 by default), adds a LoRA
adapter with `get_peft_model` (rank, alpha, targets; dropout 0; PEFT's default init after
`torch.manual_seed(seed)`, so the same initial adapter as the engine's job), and trains with
AdamW (betas 0.9/0.999, eps 1e-8, no weight decay, constant lr) on the examples of FILE (JSON:
[{"input_ids", "labels"}], HF label convention) in consecutive batches of `--batch-size`,
right-padded with an attention mask, one optimizer step per batch; the loss of a step is the
summed token cross-entropy over its trained tokens: what engine/trainer.py computes. Epochs
repeat until `--max-seconds` or until killed. It uses `--threads` torch threads and reports
JSON lines on stdout: {"event": "ready", "t"} once loaded, then {"event": "step", "step", "t",
"tokens", "padded", "loss"} per optimizer step (`t`: time.monotonic(), the same clock as the
parent's on Linux).

`PeftProcess` starts it from the benchmark and collects its reports on a reader thread.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

MODULE = "loraplex.engine.bench_coserve_peft"


def _emit(msg: dict) -> None:
    try:
        print(json.dumps(msg), flush=True)
    except BrokenPipeError:  # the parent is gone
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=MODULE)
    p.add_argument("--model", required=True)
    p.add_argument("--examples", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--target-modules", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--learning-rate", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    data = json.loads(Path(args.examples).read_text())
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                        target_modules=args.target_modules.split(","))  # fmt: skip
    torch.manual_seed(args.seed)
    model = get_peft_model(model, config)
    model.eval()  # dropout off; autograd on
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)  # fmt: skip
    _emit({"event": "ready", "t": time.monotonic(), "trainable": sum(q.numel() for q in params)})

    def collate(batch):
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[row, :n], mask[row, :n] = torch.tensor(e["input_ids"]), 1
            labels[row, :n] = torch.tensor(e["labels"])
        return ids, mask, labels

    deadline, step, bs = time.monotonic() + args.max_seconds, 0, args.batch_size
    while time.monotonic() < deadline:
        for lo in range(0, len(data), bs):
            ids, mask, labels = collate(data[lo : lo + bs])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            targets = labels[:, 1:].reshape(-1)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets,
                                   ignore_index=-100, reduction="sum")  # fmt: skip
            tokens = int((targets != -100).sum())
            (loss / tokens).backward()
            opt.step()
            opt.zero_grad()
            step += 1
            _emit({"event": "step", "step": step, "t": time.monotonic(), "tokens": tokens,
                   "padded": ids.numel(), "loss": float(loss) / tokens})  # fmt: skip
            if time.monotonic() >= deadline:
                break
    return 0


class PeftProcess:
    """The trainer process, started at once; `events` fills with (t, tokens, padded, loss)."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
        )  # fmt: skip
        self.ready: dict | None = None
        self.events: list[tuple[float, int, int, float]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == "ready":
                self.ready = msg
            elif msg.get("event") == "step":
                self.events.append((msg["t"], msg["tokens"], msg["padded"], msg["loss"]))

    def wait_for(self, done, what: str, timeout: float = 600.0) -> None:
        """Poll until `done()`; RuntimeError (with the process's stderr tail) if it exits or
        `timeout` passes first."""
        end = time.monotonic() + timeout
        while not done():
            if self.proc.poll() is not None or time.monotonic() > end:
                self._log.flush()
                tail = self.log_path.read_text()[-2000:]
                state = f"exited with {self.proc.returncode}" if self.proc.poll() is not None \
                    else f"timed out after {timeout:.0f} s"  # fmt: skip
                raise RuntimeError(f"the PEFT trainer process {state} waiting for {what}; "
                                   f"its stderr ({self.log_path}):\n{tail}")  # fmt: skip
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        self._log.close()


if __name__ == "__main__":
    sys.exit(main())

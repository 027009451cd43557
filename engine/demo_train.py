"""The trained demo: a character-level Llama that copies its input, and three LoRA adapters
trained with the engine's own fine-tuning code to do something else with it.

Tasks (`TASKS`): an input x is 1-12 characters, lowercase letters and single spaces (no space
first or last). The prompt is `x + " ->"`, the answer `" " + f(x)` and then EOS:
- copy (the base model): f(x) = x                  "hello world ->" -> " hello world"
- demo-reverse:          f(x) = x reversed         "hello world ->" -> " dlrow olleh"
- demo-upper:            f(x) = x upper-cased      "hello world ->" -> " HELLO WORLD"
- demo-shift:            each letter to the next (z to a), spaces kept -> " ifmmp xpsme"
The base also copies mixed-case inputs (`BaseRecipe.upper_share`), so upper-case letters are
tokens it already emits. The tokenizer is engine/demo_tokenizer.py (one token per character).

Held out: an input whose `zlib.crc32` of its lower-cased UTF-8 is 0 mod 10 (`is_held_out`) is
never trained on, by the base or an adapter; `eval_inputs` draws test inputs from those.

Training (`build_demo`): the base is an HF `LlamaForCausalLM` trained full-parameter in plain
torch (AdamW, one-cycle learning rate, gradient clipping at 1, a fresh batch of copy examples
per step, loss on the answer and EOS only). Each adapter is trained by
`loraplex.engine.trainer.Trainer` on `Engine(model).model` (float32) from prompt/completion
`Example`s built by engine/finetune_data.py's rule (tokenizer(prompt) + completion + EOS, the
completion and EOS trained). Everything is seeded and runs with `BUILD_THREADS` torch threads,
so a build is byte-for-byte reproducible on one machine (but for the timings in the adapters'
trainer_log.jsonl). The whole build takes 2-3 minutes on two cores, with a `tqdm` bar; `scale`
< 1 shortens every phase (tests build a small demo of untrained quality in seconds).
"""

from __future__ import annotations

import logging
import random
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.engine.demo_tokenizer import build_char_tokenizer
from loraplex.engine.finetune_data import IGNORE_INDEX, Example, pad_batch

logger = logging.getLogger(__name__)

BUILD_THREADS = 2
MAX_INPUT_CHARS = 12
_LOWER = "abcdefghijklmnopqrstuvwxyz"


def _shift(x: str) -> str:
    return "".join(_LOWER[(_LOWER.index(c) + 1) % 26] if c in _LOWER else c for c in x)


TASKS = {
    "copy": lambda x: x,
    "reverse": lambda x: x[::-1],
    "upper": str.upper,
    "shift": _shift,
}


@dataclass(frozen=True)
class BaseRecipe:
    """The base model's shape and its full-parameter copy training."""

    hidden_size: int = 96
    intermediate_size: int = 192
    num_layers: int = 4
    num_heads: int = 3
    num_kv_heads: int = 3
    steps: int = 900
    batch_size: int = 64
    max_lr: float = 1e-2
    upper_share: float = 0.5  # examples with mixed case (each letter upper with p = 1/2)
    seed: int = 0


@dataclass(frozen=True)
class AdapterRecipe:
    """One adapter: its task and `FinetuneConfig` fields (examples = steps * batch_size, one
    epoch)."""

    task: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    learning_rate: float
    steps: int
    batch_size: int
    seed: int


BASE = BaseRecipe()
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_QVO = ("q_proj", "v_proj", "o_proj")
# Tuned on two cores: each gets 96-100% of the held-out inputs over seeds (reverse, the hard one,
# needs the fourth base layer and rank 32 on every module).
DEMO_ADAPTERS: dict[str, AdapterRecipe] = {
    "demo-reverse": AdapterRecipe("reverse", 32, 64.0, _ATTN + _MLP, 3e-3, 500, 64, 1),
    "demo-upper": AdapterRecipe("upper", 8, 16.0, _MLP, 5e-3, 300, 64, 2),
    "demo-shift": AdapterRecipe("shift", 4, 8.0, _QVO + _MLP, 1e-2, 250, 64, 3),
}


def is_held_out(x: str) -> bool:
    """Inputs kept out of all training (module docstring)."""
    return zlib.crc32(x.lower().encode()) % 10 == 0


def _random_input(rng: random.Random, upper_share: float = 0.0) -> str:
    n = rng.randint(1, MAX_INPUT_CHARS)
    mixed = rng.random() < upper_share
    chars: list[str] = []
    for i in range(n):
        if 0 < i < n - 1 and chars[-1] != " " and rng.random() < 0.15:
            chars.append(" ")
            continue
        c = rng.choice(_LOWER)
        chars.append(c.upper() if mixed and rng.random() < 0.5 else c)
    return "".join(chars)


def train_inputs(n: int, seed: int, upper_share: float = 0.0) -> list[str]:
    """`n` random training inputs (never held out) from `random.Random(seed)`."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        x = _random_input(rng, upper_share)
        if not is_held_out(x):
            out.append(x)
    return out


def eval_inputs(n: int = 100, seed: int = 12345) -> list[str]:
    """`n` distinct held-out lowercase inputs from `random.Random(seed)`."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        x = _random_input(rng)
        if is_held_out(x) and x not in out:
            out.append(x)
    return out


def prompt_of(x: str) -> str:
    return f"{x} ->"


def answer_of(task: str, x: str) -> str:
    """The expected completion text of `task` on input `x` (before the EOS)."""
    return " " + TASKS[task](x)


def make_examples(tokenizer, task: str, inputs: list[str]) -> list[Example]:
    """Prompt/completion examples (engine/finetune_data.py's rule) of `task` on `inputs`."""
    prompts = tokenizer([prompt_of(x) for x in inputs])["input_ids"]
    answers = [answer_of(task, x) for x in inputs]
    completions = tokenizer(answers, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [
        Example(p + c + [eos], [IGNORE_INDEX] * len(p) + c + [eos], line=i + 1)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
    ]


@contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _steps(steps: int, scale: float) -> int:
    return max(1, round(steps * scale))


def train_base(out_dir, recipe: BaseRecipe = BASE, *, scale: float = 1.0, bar=None) -> str:
    """Write the character tokenizer and the trained copy model into `out_dir` (HF format)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    build_char_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    steps, bs = _steps(recipe.steps, scale), recipe.batch_size
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config).train()
    inputs = train_inputs(steps * bs, recipe.seed, recipe.upper_share)
    examples = make_examples(tok, "copy", inputs)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.max_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.max_lr, total_steps=steps)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        ids, _, labels = pad_batch(examples[step * bs : (step + 1) * bs], tok.pad_token_id)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if bar is not None:
            bar.set_postfix(phase="base", loss=f"{loss.item():.4f}", refresh=False)
            bar.update(1)
    model.eval().save_pretrained(str(out))
    logger.info("demo base: %d steps, last loss %.4f", steps, loss.item())
    return str(out)


def train_adapter(engine, name: str, recipe: AdapterRecipe, out_dir, *, scale: float = 1.0,
                  bar=None) -> str:  # fmt: skip
    """Train adapter `name` of `recipe` on `engine`'s model; write its PEFT directory."""
    from loraplex.engine.trainer import FinetuneConfig, Trainer

    steps = _steps(recipe.steps, scale)
    inputs = train_inputs(steps * recipe.batch_size, recipe.seed)
    examples = make_examples(engine.tokenizer, recipe.task, inputs)
    config = FinetuneConfig(
        rank=recipe.rank, alpha=recipe.alpha, target_modules=recipe.target_modules,
        epochs=1, batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
        seed=recipe.seed,
    )  # fmt: skip
    trainer = Trainer(engine.model, config, examples, pad_id=engine.tokenizer.pad_token_id)
    entry = None
    while trainer.steps_left:
        entry = trainer.step()
        if bar is not None:
            bar.set_postfix(phase=name, loss=f"{entry.loss:.4f}", refresh=False)
            bar.update(1)
    logger.info("%s: %d steps, last loss %.4f", name, trainer.done, entry.loss)
    return trainer.save(out_dir, base_model_name_or_path="loraplex-demo")


def build_demo(root, *, scale: float = 1.0, adapters: dict[str, AdapterRecipe] | None = None,
               base: BaseRecipe = BASE, progress: bool = True) -> dict[str, str]:  # fmt: skip
    """Train the demo into `root`: `root/model` (checkpoint and tokenizer) and
    `root/adapters/<name>` per adapter (default `DEMO_ADAPTERS`); return {name: adapter dir}.
    `scale` multiplies every phase's steps (at least 1 each)."""
    from tqdm import tqdm

    from loraplex.engine.config import EngineConfig
    from loraplex.engine.engine import Engine

    recipes = DEMO_ADAPTERS if adapters is None else adapters
    root = Path(root)
    total = _steps(base.steps, scale) + sum(_steps(r.steps, scale) for r in recipes.values())
    t0 = time.perf_counter()
    out: dict[str, str] = {}
    with _threads(BUILD_THREADS), tqdm(total=total, desc="training the demo", unit="step",
                                       mininterval=1.0, disable=not progress) as bar:  # fmt: skip
        model_dir = train_base(root / "model", base, scale=scale, bar=bar)
        engine = Engine(
            EngineConfig(model=model_dir, dtype="float32", pool_bytes=4 << 20, max_model_len=64,
                         lora_backend="torch", attention_backend="torch")
        )  # fmt: skip
        for name, recipe in recipes.items():
            out[name] = train_adapter(engine, name, recipe, root / "adapters" / name,
                                      scale=scale, bar=bar)  # fmt: skip
    logger.info("trained the demo in %.0f s", time.perf_counter() - t0)
    return out


def evaluate(model_dir: str, adapters: dict[str, str], inputs: list[str]) -> dict:
    """Greedy exact-match accuracy through the engine (`LLM`, float32): {(model, task): share
    of `inputs` whose output is exactly `answer_of(task, x)` then EOS}, model being None (the
    base) or an adapter name, for every task."""
    from loraplex.engine.llm import LLM, SamplingParams

    llm = LLM(model_dir, adapters=adapters, dtype="float32", pool_bytes=64 << 20,
              max_model_len=64)  # fmt: skip
    params = SamplingParams(max_tokens=MAX_INPUT_CHARS + 4, temperature=0)
    models = [None, *adapters]
    prompts = [prompt_of(x) for _ in models for x in inputs]
    outs = llm.generate(prompts, params, [m for m in models for _ in inputs])
    result = {}
    for k, m in enumerate(models):
        got = outs[k * len(inputs) : (k + 1) * len(inputs)]
        for task in TASKS:
            ok = sum(
                o.finish_reason == "stop" and o.text == answer_of(task, x)
                for o, x in zip(got, inputs, strict=True)
            )
            result[m, task] = ok / len(inputs)
    return result

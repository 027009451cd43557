"""The demo: a trained character-level model with three adapters (`ensure_demo`), and the random
checkpoints and adapters the tests and benchmarks build (`make_checkpoint`, `make_adapter`).

Everything is built locally (no network, ever) and reproducible. `ensure_demo()` trains the demo
once (engine/demo_train.py: a Llama that copies its input, adapters demo-reverse, demo-upper
and demo-shift; about 2-3 minutes on two cores) into a cache directory, atomically.
`make_checkpoint` writes a random Llama/Qwen2/Mistral checkpoint with a byte-level BPE
tokenizer trained on `_CORPUS` below; `make_adapter` a random adapter in the exact PEFT file
format (checked in the tests against `peft` itself) without importing `peft`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from loraplex.engine.adapter_writer import write_peft_adapter
from loraplex.engine.demo_tokenizer import SPECIAL_TOKENS, save_fast_tokenizer
from loraplex.engine.demo_train import DEMO_ADAPTERS, build_demo
from loraplex.engine.loader import MODULES, ModelSpec

logger = logging.getLogger(__name__)

DEMO_VERSION = "demo-v2"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CORPUS = """\
The harbor town woke early. Fishing boats left before the sun rose, and by the time the bakery
opened its doors, the first nets were already coming back to the pier. Children walked to school
along the sea wall, counting gulls and arguing about which boat was the fastest.
A good question is often more useful than a quick answer. When you ask why a thing works, you
learn how to fix it when it breaks. When you only ask what to do, you learn one step at a time.
The library on the hill kept its lights on late into the evening. Students came to read about
history, mathematics, music, and the stars. The librarian knew every shelf by heart and could
find a book about almost anything in less than a minute.
Water boils at one hundred degrees Celsius at sea level. On a high mountain the air is thinner,
so water boils at a lower temperature, and cooking pasta takes longer than it does at home.
To make bread, mix flour, water, salt, and yeast. Knead the dough until it is smooth, let it rise
in a warm place for an hour, shape it, let it rise again, and bake it in a hot oven until the
crust is brown and the loaf sounds hollow when you tap it.
The computer reads a program one instruction at a time. Each instruction is simple: add two
numbers, compare two values, jump to another place in the program. Complex behavior comes from
many simple steps arranged with care.
She opened the window and listened to the rain. It had rained for three days, and the river was
high and brown. The old bridge had stood for two hundred years, and the people of the valley
trusted it the way they trusted the seasons.
Thank you for your message. I am happy to help. Here is a short summary of what we discussed:
first, we will review the plan together; second, we will agree on the next steps; third, we will
meet again next week to check our progress.
A language model predicts the next word from the words that came before it. It learns patterns
from a large amount of text, and it uses those patterns to write sentences, answer questions,
translate between languages, and summarize long documents.
The garden was quiet in the morning. Bees moved between the flowers, and a small bird sang from
the branch of the apple tree. The tomatoes were red, the beans were long and green, and the
pumpkins were slowly turning orange in the autumn sun.
Good software is easy to read, easy to test, and easy to change. Name things clearly. Keep
functions short. Write down what a function promises and what it expects. Test the edges, not
only the middle. Measure before you optimize, and measure again after.
Once upon a time there was a small fox who lived at the edge of a great forest. Every night the
fox looked at the moon and wondered what was on the other side of the mountains. One spring
morning the fox packed a bag with bread and cheese and set off to find out.
The train to the city leaves every hour from platform two. Tickets can be bought at the station
or online. Please keep your ticket until the end of your journey, and remember to take all of
your belongings with you when you leave the train.
Mathematics is the study of patterns. A prime number has exactly two divisors: one and itself.
The numbers two, three, five, seven, eleven, and thirteen are prime. Every whole number greater
than one can be written as a product of primes in exactly one way.
The doctor said the patient should rest, drink plenty of water, and eat simple food for a few
days. If the fever returns or the cough gets worse, the patient should come back to the clinic.
Music can change how we feel. A slow song in a minor key can make a room feel calm or sad, and
a fast song with a strong beat can make people want to dance. Many people listen to music while
they work, cook, travel, or study.
The weather today is sunny with a light wind from the west. Tomorrow clouds will move in from
the sea, and there is a chance of rain in the afternoon. The weekend should be warm and dry.
User questions deserve clear answers. If you do not know something, say so, and explain how it
could be found out. If a request is unclear, ask a short question before you begin.
The ship crossed the ocean in twelve days. The sailors watched the weather, repaired the sails,
and told stories in the evening. When they finally saw land, everyone climbed onto the deck to
look at the green hills and the white houses of the port.
Coffee, tea, juice, milk, and water were served with breakfast. Guests could choose eggs, toast,
fruit, yogurt, or a bowl of warm oatmeal with honey and nuts.
Every system has limits. A bridge can carry only so much weight, a battery holds only so much
energy, and a server can answer only so many requests each second. Knowing the limits of a
system is the first step to using it well.
"""


def build_tokenizer(out_dir) -> None:
    """Train a byte-level BPE tokenizer on `_CORPUS` and save it as a HF fast tokenizer.

    Deterministic: the same files every time. Encoding with special tokens prepends "<s>".
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    save_fast_tokenizer(tok, out_dir, CHAT_TEMPLATE)


def make_checkpoint(
    out_dir,
    *,
    family: str = "llama",
    hidden_size: int = 256,
    intermediate_size: int = 688,
    num_layers: int = 4,
    num_heads: int = 8,
    num_kv_heads: int = 4,
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.08,
) -> str:
    """Write a real HF checkpoint (config.json, model.safetensors) plus tokenizer into `out_dir`.

    `family` is "llama", "mistral" or "qwen2"; `vocab_size` defaults to the tokenizer's size.
    Weights are the model's random init under `torch.manual_seed(seed)` with std
    `initializer_range` (0.08 rather than HF's 0.02, so greedy output does not loop at once).
    Returns `out_dir` as a string.
    """
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }
    if family not in classes:
        raise ValueError(f"family must be one of {sorted(classes)}, got {family!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    config_cls, model_cls = classes[family]
    config = config_cls(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    model.save_pretrained(str(out))
    logger.info("wrote %s checkpoint to %s", family, out)
    return str(out)


def make_adapter(
    out_dir,
    spec: ModelSpec,
    *,
    rank: int,
    alpha: float,
    target_modules,
    seed: int,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
) -> str:
    """Write a PEFT LoRA adapter for `spec` without importing peft.

    A ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's init), B ~ N(0, 0.02) (non-zero, so outputs change),
    float32, drawn from `torch.Generator().manual_seed(seed)`. Returns `out_dir` as a string.
    """
    targets = [m for m in MODULES if m in set(target_modules)]
    if len(targets) != len(set(target_modules)):
        raise ValueError(f"target_modules must be a subset of {MODULES}, got {target_modules}")
    gen = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for layer in range(spec.num_layers):
        for m in targets:
            din, dout = spec.module_dims(m)
            bound = 1.0 / math.sqrt(din)
            A[layer, m] = (torch.rand(rank, din, generator=gen) * 2 - 1) * bound
            B[layer, m] = torch.randn(dout, rank, generator=gen) * 0.02
    return write_peft_adapter(out_dir, A, B, rank=rank, alpha=alpha, use_rslora=use_rslora,
                              base_model_name_or_path=base_model_name_or_path)  # fmt: skip


def ensure_demo(cache_dir: str | None = None) -> tuple[str, dict[str, str]]:
    """Build the demo once; return (model_dir, {adapter name: adapter_dir}).

    Cache: `cache_dir`, else $LORAPLEX_CACHE, else ~/.cache/loraplex; the demo lives in
    `<cache>/demo-v2` (`DEMO_VERSION`): `model/` and `adapters/<name>/` for each name of
    `DEMO_ADAPTERS`. It is trained (`build_demo`) in a temporary sibling directory and renamed
    into place, so a crash never leaves a half-made demo; if another process wins the race, its
    copy is used. An existing demo directory is used as it is.
    """
    cache = Path(cache_dir or os.environ.get("LORAPLEX_CACHE") or Path.home() / ".cache/loraplex")
    root = cache / DEMO_VERSION
    adapters = {name: str(root / "adapters" / name) for name in DEMO_ADAPTERS}
    if not root.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_VERSION}-", dir=cache))
        try:
            logger.info("training the demo model and its adapters once, into %s", root)
            build_demo(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            try:
                os.rename(tmp, root)
                logger.info("built demo model and %d adapters in %s", len(adapters), root)
            except OSError:
                if not root.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(root / "model"), adapters

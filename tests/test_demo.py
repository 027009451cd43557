"""engine.demo / demo_train / demo_tokenizer: the trained demo is built once, deterministically
and atomically, into the cache, and loads as a real model with its character tokenizer, chat
template and adapters. The fast tests build a reduced demo (`build_demo(scale=...)`: a few
training steps); the slow one trains the real demo and checks what it learned."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

import loraplex.engine.demo as demo_mod
from loraplex.engine.adapter_loader import load_adapter
from loraplex.engine.demo import DEMO_ADAPTERS, DEMO_VERSION, ensure_demo
from loraplex.engine.demo_train import (
    BASE,
    TASKS,
    answer_of,
    build_demo,
    eval_inputs,
    evaluate,
    is_held_out,
    make_examples,
    train_inputs,
)
from loraplex.engine.loader import load_model_spec

QUICK = 0.005  # a few steps per phase: the files and plumbing of a build, in seconds


def _files(root: Path) -> dict:
    """Every file's bytes; trainer logs without their timings (`seconds`)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == "trainer_log.jsonl":
            lines = [json.loads(line) for line in p.read_text().splitlines()]
            out[str(p.relative_to(root))] = [{**e, "seconds": None} for e in lines]
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture
def quick_build(monkeypatch):
    """ensure_demo builds the reduced demo."""
    monkeypatch.setattr(demo_mod, "build_demo",
                        functools.partial(build_demo, scale=QUICK, progress=False))  # fmt: skip


def test_demo_is_deterministic_atomic_and_loadable(tmp_path, monkeypatch, quick_build):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "env"))
    model_dir, adapters = ensure_demo()
    assert model_dir == str(tmp_path / "env" / DEMO_VERSION / "model")
    other_dir, _ = ensure_demo(str(tmp_path / "other"))
    a, b = _files(Path(model_dir).parent), _files(Path(other_dir).parent)
    assert a == b and "model/model.safetensors" in a and "model/config.json" in a
    assert "adapters/demo-reverse/trainer_log.jsonl" in a
    assert [p.name for p in (tmp_path / "env").iterdir()] == [DEMO_VERSION]  # no temp dirs left
    mtime = Path(model_dir, "model.safetensors").stat().st_mtime_ns
    assert ensure_demo()[0] == model_dir  # second call reuses the cache
    assert Path(model_dir, "model.safetensors").stat().st_mtime_ns == mtime

    spec = load_model_spec(model_dir)
    assert spec.architecture == "LlamaForCausalLM"
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.vocab_size) == (
        BASE.hidden_size, BASE.num_layers, BASE.num_heads, 260,
    )  # fmt: skip
    assert set(adapters) == set(DEMO_ADAPTERS) == {"demo-reverse", "demo-upper", "demo-shift"}
    loaded = {n: load_adapter(n, p, spec, max_lora_rank=64) for n, p in adapters.items()}
    for name, recipe in DEMO_ADAPTERS.items():
        assert loaded[name].rank == recipe.rank
        assert set(loaded[name].target_modules) == set(recipe.target_modules)
        config = json.loads(Path(adapters[name], "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "loraplex-demo"
    assert len({r.rank for r in DEMO_ADAPTERS.values()}) == 3  # different ranks
    assert len({r.target_modules for r in DEMO_ADAPTERS.values()}) == 3  # and modules

    # the engine serves it: base and adapters, one batch
    from loraplex.engine.llm import LLM, SamplingParams

    # torch backends: no kernel library to build into this test's cache
    llm = LLM(model_dir, adapters=adapters, pool_bytes=16 << 20, max_model_len=64,
              lora_backend="torch", attention_backend="torch")  # fmt: skip
    names = [None, *adapters]
    outs = llm.generate(["hello world ->"] * 4, SamplingParams(max_tokens=4, temperature=0),
                        names)  # fmt: skip
    assert all(len(o.token_ids) >= 1 for o in outs)


def test_demo_crash_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo_mod, "build_demo", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_demo(str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # neither a half-made demo nor a temp dir


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    from loraplex.engine.demo_tokenizer import build_char_tokenizer

    out = tmp_path_factory.mktemp("char_tok")
    build_char_tokenizer(out)
    return _tokenizer(str(out))


def test_char_tokenizer(char_tokenizer):
    tok = char_tokenizer
    assert len(tok) == 260
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    ids = tok("hello world ->")["input_ids"]
    assert ids == [1] + [4 + ord(c) for c in "hello world ->"]
    text = "Any ASCII: 0-9, {}[]!?~\t\n and Latin-1: café"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok("a€b", add_special_tokens=False)["input_ids"] == [4 + 97, 0, 4 + 98]  # <unk>
    assert tok.decode([1, 4 + 104, 4 + 105, 2], skip_special_tokens=True) == "hi"
    assert tok("<s>x</s>", add_special_tokens=False)["input_ids"] == [1, 4 + 120, 2]
    assert tok.decode(list(range(4, 256)))  # every id below 256 is a real character


def test_chat_template_is_the_completion_prompt(char_tokenizer, tmp_path):
    tok = char_tokenizer
    chat = [{"role": "user", "content": "hello world"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<s>hello world ->"
    # the server's path: the rendered text tokenized without adding specials
    assert tok(text, add_special_tokens=False)["input_ids"] == tok("hello world ->")["input_ids"]
    with pytest.raises(Exception, match="roles"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)

    # fine-tuning: a chat line and a prompt/completion line give the same example
    from loraplex.engine.finetune_data import load_examples

    lines = [
        {"prompt": "hello world ->", "completion": " dlrow olleh"},
        {"messages": [{"role": "user", "content": "hello world"},
                      {"role": "assistant", "content": "dlrow olleh"}]},
        {"messages": [{"role": "system", "content": "be nice"},
                      {"role": "user", "content": "ab"}, {"role": "assistant", "content": "ba"},
                      {"role": "user", "content": "hello world"},
                      {"role": "assistant", "content": "dlrow olleh"}]},
    ]  # fmt: skip
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    one, two, multi = load_examples(path, tok)
    assert (one.input_ids, one.labels) == (two.input_ids, two.labels)
    assert make_examples(tok, "reverse", ["hello world"])[0].input_ids == one.input_ids
    assert tok.decode(multi.input_ids) == "<s>be nice\nab -> ba</s>hello world -> dlrow olleh</s>"
    trained = [t for t in multi.labels if t != -100]
    assert tok.decode(trained) == " ba</s> dlrow olleh</s>"


def test_tasks_and_held_out_inputs():
    assert {t: answer_of(t, "hello world") for t in TASKS} == {
        "copy": " hello world", "reverse": " dlrow olleh", "upper": " HELLO WORLD",
        "shift": " ifmmp xpsme",
    }  # fmt: skip
    assert answer_of("shift", "zaz y") == " aba z"
    held = eval_inputs(100)
    assert len(set(held)) == 100 and all(is_held_out(x) for x in held)
    train = train_inputs(2000, seed=1, upper_share=0.5)
    assert not any(is_held_out(x) for x in train)
    assert any(x != x.lower() for x in train)  # the base sees upper case
    for x in held + train:
        assert 1 <= len(x) <= 12 and x.strip() == x and "  " not in x
        assert set(x.lower()) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert train_inputs(50, seed=1) == train_inputs(50, seed=1) != train_inputs(50, seed=2)


@pytest.mark.slow
def test_full_demo_learns_its_tasks():
    """The real demo, as `loraplex serve` gets it: `ensure_demo()` in the usual cache
    ($LORAPLEX_CACHE or ~/.cache/loraplex), trained there first if missing (2-3 minutes on two
    cores; DEMO_VERSION changes with the recipe). >= 90% greedy exact match on 100 held-out
    inputs through the engine, for the base on copy and each adapter on its task; the base
    does not do the adapters' tasks, nor the adapters the base's."""
    model_dir, adapters = ensure_demo()
    acc = evaluate(model_dir, adapters, eval_inputs(100))
    report = {f"{m or 'base'}/{t}": a for (m, t), a in acc.items()}
    assert acc[None, "copy"] >= 0.9, report
    for name, recipe in DEMO_ADAPTERS.items():
        assert acc[name, recipe.task] >= 0.9, report
        assert acc[None, recipe.task] <= 0.05, report  # palindromes ("a", "aba") are both
        assert acc[name, "copy"] <= 0.05, report

"""engine.demo: the embedded demo checkpoint and adapters are built once, deterministically and
atomically, into the cache, and load as a real model with its tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.engine.adapter_loader import load_adapter
from loraplex.engine.demo import DEMO_ADAPTERS, ensure_demo
from loraplex.engine.loader import load_model_spec


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_demo_is_deterministic_atomic_and_loadable(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "env"))
    model_dir, adapters = ensure_demo()
    assert model_dir == str(tmp_path / "env" / "demo-v1" / "model")
    other_dir, _ = ensure_demo(str(tmp_path / "other"))
    a, b = _files(Path(model_dir).parent), _files(Path(other_dir).parent)
    assert a == b and "model/model.safetensors" in a and "model/config.json" in a
    assert [p.name for p in (tmp_path / "env").iterdir()] == ["demo-v1"]  # no temp dirs left
    mtime = Path(model_dir, "model.safetensors").stat().st_mtime_ns
    assert ensure_demo()[0] == model_dir  # second call reuses the cache
    assert Path(model_dir, "model.safetensors").stat().st_mtime_ns == mtime

    spec = load_model_spec(model_dir)
    assert (spec.hidden_size, spec.num_layers, spec.num_kv_heads) == (256, 4, 4)
    assert set(adapters) == set(DEMO_ADAPTERS)
    ranks = {n: load_adapter(n, p, spec, max_lora_rank=64).rank for n, p in adapters.items()}
    assert ranks == {n: r for n, (r, _) in DEMO_ADAPTERS.items()}

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == spec.vocab_size and tok.bos_token_id == spec.bos_token_id
    assert spec.eos_token_ids == (tok.eos_token_id,)
    ids = tok("The harbor town woke early.")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "The harbor town woke early."
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


def test_demo_crash_leaves_nothing_behind(tmp_path, monkeypatch):
    import loraplex.engine.demo as demo_mod

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo_mod, "make_adapter", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_demo(str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # neither a half-made demo-v1 nor a temp dir

"""Building the CPU kernels' library (kernels/cpu_build.py) and how the engine chooses and falls
back between the C and torch paths."""

from __future__ import annotations

import logging

import pytest

import loraplex.kernels.cpu_build as cpu_build
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm import LLM


def test_config_resolves_and_validates_the_cpu_backend():
    assert EngineConfig(device="cpu").backend("lora") == "cpu"
    assert EngineConfig(device="cpu", dtype="bfloat16").backend("lora") == "cpu"
    assert EngineConfig(device="cpu", dtype="float16").backend("lora") == "torch"
    assert EngineConfig(device="cuda").backend("lora") == "triton"
    assert EngineConfig(device="cpu").backend("attention") == "cpu"
    assert EngineConfig(device="cpu", dtype="float16").backend("attention") == "torch"
    assert EngineConfig(device="cuda").backend("attention") == "triton"
    with pytest.raises(ValueError, match="lora_backend 'cpu' needs"):
        EngineConfig(device="cpu", dtype="float16", lora_backend="cpu")
    with pytest.raises(ValueError, match="lora_backend 'cpu' needs"):
        EngineConfig(device="cuda", lora_backend="cpu")
    with pytest.raises(ValueError, match="attention_backend 'cpu' needs"):
        EngineConfig(device="cpu", dtype="float16", attention_backend="cpu")


def test_without_a_compiler_auto_falls_back_and_cpu_fails(
    tiny_llama, monkeypatch, tmp_path, caplog
):
    monkeypatch.setattr(cpu_build, "_lib", None)
    monkeypatch.setattr(cpu_build, "_error", None)
    monkeypatch.setattr(cpu_build, "_FUNCS", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    assert "no-such-cc" in cpu_build.cpu_kernel_error()
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []  # no half-written library
    with caplog.at_level(logging.WARNING, logger="loraplex.engine.engine"):
        llm = LLM(tiny_llama["model_dir"], adapters=tiny_llama["adapters"], pool_bytes=4 << 20)
    assert llm.engine.backends == {"lora": "torch", "attention": "torch"}
    assert "torch lora path" in caplog.text and "torch attention path" in caplog.text
    assert "no-such-cc" in caplog.text
    with pytest.raises(RuntimeError, match="lora_backend 'cpu'.*no-such-cc"):
        LLM(tiny_llama["model_dir"], pool_bytes=4 << 20, lora_backend="cpu")
    with pytest.raises(RuntimeError, match="attention_backend 'cpu'.*no-such-cc"):
        LLM(tiny_llama["model_dir"], pool_bytes=4 << 20, attention_backend="cpu")


def test_library_is_built_once_per_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_build, "_lib", None)
    monkeypatch.setattr(cpu_build, "_error", None)
    monkeypatch.setattr(cpu_build, "_FUNCS", {})
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    assert cpu_build.cpu_kernel_error() is None
    (built,) = (tmp_path / "kernels").iterdir()
    mtime = built.stat().st_mtime_ns
    monkeypatch.setattr(cpu_build, "_lib", None)
    assert cpu_build.cpu_kernel_error() is None
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built.name]
    assert built.stat().st_mtime_ns == mtime


def test_engine_start_builds_the_call_entry(tiny_llama, monkeypatch, tmp_path):
    """The CPython entry is built when the engine starts, not in its first step."""
    for name, value in (("_lib", None), ("_error", None), ("_call_mod", None)):
        monkeypatch.setattr(cpu_build, name, value)
    monkeypatch.setattr(cpu_build, "_FUNCS", {})
    monkeypatch.setattr(cpu_build, "_CALLERS", {})
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    llm = LLM(tiny_llama["model_dir"], adapters=tiny_llama["adapters"], pool_bytes=4 << 20)
    assert llm.engine.backends["lora"] == "cpu"
    built = sorted(p.name.split("-")[0] for p in (tmp_path / "kernels").iterdir())
    if cpu_build._call_mod is False:
        pytest.skip("the CPython entry does not build here")
    assert built == ["cpu_kernels", "lora_call"]

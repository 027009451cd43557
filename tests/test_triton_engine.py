"""End to end: the tiny model's greedy tokens with the Triton backends equal those with the
torch backends (on the CPU the kernels run in Triton's interpreter, set up by conftest)."""

from __future__ import annotations

import pytest

from loraplex.engine.config import EngineConfig
from loraplex.engine.llm import LLM, SamplingParams

PROMPTS = [[5, 9, 33, 2, 71, 12, 8, 19, 4], [100, 3], list(range(40, 61)), [7, 7, 7]]


def _run(tiny, lora_backend, attention_backend):
    llm = LLM(
        tiny["model_dir"],
        adapters=tiny["adapters"],
        pool_bytes=4 << 20,
        block_size=4,  # several pages per sequence: page tables are exercised
        max_num_batched_tokens=16,  # chunked prefill mixed with decodes
        lora_backend=lora_backend,
        attention_backend=attention_backend,
    )
    names = [None, "r8_all", "r64_all", "r1_qv"]
    outs = llm.generate(
        PROMPTS, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), names
    )
    llm.engine.check_integrity()
    return [o.token_ids for o in outs], [o.logprobs for o in outs]


@pytest.mark.parametrize(
    "lora,attention", [("triton", "torch"), ("torch", "triton"), ("triton", "triton")]
)
def test_triton_backends_match_torch(tiny_llama, lora, attention):
    ref_tokens, ref_lp = _run(tiny_llama, "torch", "torch")
    tokens, lp = _run(tiny_llama, lora, attention)
    assert tokens == ref_tokens
    for a, b in zip(lp, ref_lp, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


def test_backend_defaults():
    assert EngineConfig(device="cpu").backend("lora") == "cpu"  # tests/test_lora_cpu.py
    assert EngineConfig(device="cpu").backend("attention") == "cpu"  # test_attention_cpu.py
    assert EngineConfig(device="cpu", dtype="float16").backend("attention") == "torch"
    assert EngineConfig(device="cuda").backend("attention") == "triton"
    assert EngineConfig(device="cpu", lora_backend="triton").backend("lora") == "triton"
    with pytest.raises(ValueError, match="lora_backend"):
        EngineConfig(lora_backend="cuda-graphs")

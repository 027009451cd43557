"""Model-family variants against HF + PEFT: Llama with attention bias (q/k/v/o), Mistral,
legacy rope keys, and a bfloat16 run that must stay close to float32."""

from __future__ import annotations

import pytest
from fixtures import ALL_MODULES, hf_reference_greedy, make_peft_adapter, make_tiny_model

from loraplex.engine.llm import LLM, SamplingParams

PROMPTS = [[5, 9, 33, 2, 71, 12], [100, 3], list(range(40, 59))]


def _check_exact(model_dir, adapter_dir, **llm_kw):
    adapters = {"a": adapter_dir}
    llm = LLM(model_dir, adapters=adapters, pool_bytes=4 << 20, **llm_kw)
    names = [None, "a", "a"]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, names)
    for prompt, name, out in zip(PROMPTS, names, outs, strict=True):
        ref, ref_lp = hf_reference_greedy(model_dir, adapters.get(name), prompt, 8)
        assert out.token_ids == ref
        assert max(abs(a - b) for a, b in zip(out.logprobs, ref_lp, strict=True)) < 1e-4
    llm.engine.check_integrity()


@pytest.mark.parametrize(
    "family,kwargs",
    [
        ("llama", dict(attention_bias=True)),
        ("mistral", dict()),
        ("llama", dict(legacy_rope_keys=True, rope_theta=500000.0)),
    ],
    ids=["llama-attention-bias", "mistral", "llama-legacy-rope-keys"],
)
def test_variant_matches_hf_peft(tmp_path, family, kwargs):
    model_dir = make_tiny_model(tmp_path / "m", family, seed=7, **kwargs)
    adapter = make_peft_adapter(
        model_dir, tmp_path / "a", rank=8, alpha=16, target_modules=ALL_MODULES, seed=8
    )
    _check_exact(model_dir, adapter)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bfloat16_close_to_float32(tiny_llama, backend):
    """bf16 (oneDNN-packed base linears, the given LoRA and attention paths) stays close to
    float32."""
    prompt = [[7, 8, 9, 10, 11]]
    logprobs = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(
            tiny_llama["model_dir"],
            adapters=tiny_llama["adapters"],
            dtype=dtype,
            pool_bytes=4 << 20,
            lora_backend=backend,
            attention_backend=backend,
        )
        assert llm.engine.backends == {"lora": backend, "attention": backend}
        out = llm.generate(
            prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=5), ["r8_all"]
        )[0]
        logprobs[dtype] = dict(out.top_logprobs[0])
    # the float32 argmax is among bfloat16's top-5 and its log-probability is close
    top32 = max(logprobs["float32"], key=logprobs["float32"].get)
    assert top32 in logprobs["bfloat16"]
    assert abs(logprobs["bfloat16"][top32] - logprobs["float32"][top32]) < 0.1

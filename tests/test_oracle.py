"""The engine against an independent oracle: HF transformers (+ PEFT), float32, one request at a
time (`fixtures.hf_reference_greedy`).

Contract checked: for the tiny Llama, Qwen2 (GQA, q/k/v bias, tied embeddings) and llama3-rope
checkpoints with real PEFT adapters (ranks 1..64, attention-only, MLP-only and all seven
modules), ONE mixed batch of base-only and adapter requests of different prompt lengths gives
greedy tokens identical to the oracle and log-probabilities within `LOGPROB_TOL`, including
with chunked prefill (a small token budget splits prompts across steps) and with prompts that
span many KV blocks (block_size 4).
"""

from __future__ import annotations

import functools

import pytest
import torch
from fixtures import hf_reference_greedy

from loraplex.engine.llm import LLM
from loraplex.scheduler.sequence import SamplingParams

LOGPROB_TOL = 1e-4
MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _mixed_requests(fx: dict, seed: int, min_len: int = 3, max_len: int = 40):
    """Base-only plus two requests per adapter, interleaved, prompt lengths spread over
    [min_len, max_len] (both ends included). Returns (prompts, adapter names)."""
    names = [None, *fx["adapters"]]
    adapters = names + names[::-1]  # every adapter twice, in a mixed order
    n = len(adapters)
    lengths = [min_len + round(i * (max_len - min_len) / (n - 1)) for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).tolist()  # lengths not sorted by adapter
    prompts = [torch.randint(0, 256, (lengths[perm[i]],), generator=gen).tolist() for i in range(n)]
    return prompts, adapters


@functools.cache
def _oracle(model_dir: str, adapter_dir: str | None, prompt: tuple[int, ...], max_tokens: int):
    """`hf_reference_greedy`, memoised: the mixed-batch and chunked-prefill tests share prompts."""
    return hf_reference_greedy(model_dir, adapter_dir, list(prompt), max_tokens)


def _assert_matches_oracle(fx: dict, prompts, adapters, outs, max_tokens=MAX_TOKENS) -> None:
    assert len(outs) == len(prompts)
    for prompt, name, out in zip(prompts, adapters, outs, strict=True):
        adapter_dir = fx["adapters"][name] if name is not None else None
        ref_tokens, ref_logprobs = _oracle(fx["model_dir"], adapter_dir, tuple(prompt), max_tokens)
        where = f"adapter={name} prompt_len={len(prompt)}"
        assert out.token_ids == ref_tokens, where
        assert out.finish_reason == "length", where
        assert out.adapter == name
        got = torch.tensor(out.logprobs, dtype=torch.float64)
        want = torch.tensor(ref_logprobs, dtype=torch.float64)
        assert torch.allclose(got, want, rtol=0, atol=LOGPROB_TOL), (
            f"{where}: max logprob diff {(got - want).abs().max().item():.2e}"
        )


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_one_mixed_batch_matches_hf_peft(request, name, backend):
    """Both CPU paths for LoRA and attention: the C kernels (LoRA: short segments; attention:
    decode queries, prefill chunks go to torch) and the torch paths alone."""
    fx = request.getfixturevalue(name)
    assert len(fx["adapters"]) >= 6
    prompts, adapters = _mixed_requests(fx, seed=11)
    assert {len(p) for p in prompts} >= {3, 40}
    llm = LLM(
        fx["model_dir"], adapters=fx["adapters"], pool_bytes=8 << 20, max_lora_rank=64,
        lora_backend=backend, attention_backend=backend,
    )  # fmt: skip
    assert llm.engine.backends == {"lora": backend, "attention": backend}
    steps = []
    orig_step = llm.engine.step
    llm.engine.step = lambda: steps.append(1) or orig_step()
    outs = llm.generate(prompts, GREEDY, adapters)
    # Everything fits: all requests ran together, one prefill step and one step per token.
    assert len(steps) == MAX_TOKENS
    assert all(o.num_preemptions == 0 for o in outs)
    _assert_matches_oracle(fx, prompts, adapters, outs)
    llm.engine.check_integrity()
    assert llm.engine.pool.pages_used("kv") == 0


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_chunked_prefill_matches_hf_peft(request, name):
    """A token budget of 8 splits every prompt longer than 8 over several steps, mixed with
    decodes of other requests."""
    fx = request.getfixturevalue(name)
    prompts, adapters = _mixed_requests(fx, seed=11)  # oracle results are reused
    llm = LLM(
        fx["model_dir"],
        adapters=fx["adapters"],
        pool_bytes=8 << 20,
        max_lora_rank=64,
        max_num_batched_tokens=8,
    )
    chunked = []
    orig = llm.engine.batcher.schedule

    def schedule():
        batch = orig()
        if batch is not None:
            assert batch.num_tokens <= 8
            chunked.extend(
                it for it in batch.items if it.start > 0 and it.start < it.seq.num_prompt_tokens
            )
        return batch

    llm.engine.batcher.schedule = schedule
    outs = llm.generate(prompts, GREEDY, adapters)
    assert chunked, "no prompt was split across steps"
    _assert_matches_oracle(fx, prompts, adapters, outs)
    llm.engine.check_integrity()


def test_llama3_rope_matches_hf_peft(tiny_llama3_rope):
    """Positions well beyond original_max_position_embeddings=32, where llama3 scaling acts."""
    fx = tiny_llama3_rope
    gen = torch.Generator().manual_seed(13)
    lengths = [5, 30, 47, 90, 120, 64]
    prompts = [torch.randint(0, 256, (k,), generator=gen).tolist() for k in lengths]
    adapters = [None, "r8_all", None, "r8_all", "r8_all", None]
    llm = LLM(fx["model_dir"], adapters=fx["adapters"], pool_bytes=8 << 20, max_lora_rank=64)
    outs = llm.generate(prompts, GREEDY, adapters)
    _assert_matches_oracle(fx, prompts, adapters, outs)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_long_prompt_across_many_kv_blocks(request, name):
    """block_size 4: a 61-token prompt plus 24 outputs spans 22 KV pages; pages are handed out
    by several requests growing together, so the block tables are not contiguous."""
    fx = request.getfixturevalue(name)
    gen = torch.Generator().manual_seed(14)
    lengths = [61, 33, 7, 45]
    prompts = [torch.randint(0, 256, (k,), generator=gen).tolist() for k in lengths]
    adapters = ["r16_all_rslora", None, "r1_qv", "r32_attn"]
    adapter_dirs = {a: fx["adapters"][a] for a in adapters if a is not None}
    llm = LLM(
        fx["model_dir"],
        adapters=adapter_dirs,
        pool_bytes=4 << 20,
        max_lora_rank=64,
        block_size=4,
        max_model_len=128,
    )
    seqs = []
    orig = llm.engine.add_request
    llm.engine.add_request = lambda *a, **k: seqs.append(orig(*a, **k)) or seqs[-1]
    tables = {}
    orig_step = llm.engine.step

    def step():
        out = orig_step()
        for s in seqs:
            if s.block_table:
                tables[s.request_id] = list(s.block_table)
        return out

    llm.engine.step = step
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, adapters)
    longest = tables[seqs[0].request_id]
    assert len(longest) >= (61 + 23) // 4
    assert longest != list(range(longest[0], longest[0] + len(longest))), "table is contiguous"
    _assert_matches_oracle(fx, prompts, adapters, outs, max_tokens=24)
    llm.engine.check_integrity()

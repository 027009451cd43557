"""A request's output does not depend on what else the engine is doing.

Contract checked (tiny Llama, real PEFT adapters): the tokens of a request are exactly the same
and its log-probabilities within `LOGPROB_TOL` whether it runs alone, inside a mixed batch of
other adapters, across a preemption by recompute, under chunked prefill, or after its adapter
was evicted from the pool and loaded again (contiguously or into scattered pages). This holds
for greedy requests and for seeded sampling (temperature 0.8 with a seed).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loraplex.engine.llm import LLM
from loraplex.scheduler.sequence import SamplingParams

LOGPROB_TOL = 1e-5
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, seed=1234, ignore_eos=True)

# (prompt length, params, adapter) of the requests whose outputs are compared.
TARGETS = [
    (17, GREEDY, "r8_all"),
    (9, SEEDED, "r4_attn"),
    (23, GREEDY, None),
    (12, SEEDED, "r1_qv"),
]


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=gen).tolist()


def _targets():
    return [(_prompt(n, 100 + i), p, a) for i, (n, p, a) in enumerate(TARGETS)]


def _assert_same(alone, other, where: str) -> None:
    assert other.token_ids == alone.token_ids, where
    diff = max(abs(x - y) for x, y in zip(alone.logprobs, other.logprobs, strict=True))
    assert diff <= LOGPROB_TOL, f"{where}: logprob diff {diff:.2e}"


def _run_alone(llm: LLM, targets) -> list:
    outs = [llm.generate([p], params, [a])[0] for p, params, a in targets]
    assert all(o.num_preemptions == 0 for o in outs)
    return outs


def test_sampling_is_really_random_so_the_seeded_checks_mean_something(tiny_llama):
    fx = tiny_llama
    llm = LLM(fx["model_dir"], adapters=fx["adapters"], pool_bytes=8 << 20)
    prompt = _prompt(9, 101)
    greedy = llm.generate([prompt], GREEDY, ["r4_attn"])[0].token_ids
    seeds = [llm.generate([prompt], replace(SEEDED, seed=s), ["r4_attn"])[0] for s in (1234, 1235)]
    assert seeds[0].token_ids != greedy
    assert seeds[0].token_ids != seeds[1].token_ids


def test_alone_equals_mixed_batch(tiny_llama):
    fx = tiny_llama
    llm = LLM(fx["model_dir"], adapters=fx["adapters"], pool_bytes=8 << 20)
    targets = _targets()
    alone = _run_alone(llm, targets)
    # Fillers over every adapter (and base), with their own lengths and sampling params.
    names = [None, *fx["adapters"]]
    fillers = [
        (_prompt(3 + 5 * i, 200 + i), GREEDY if i % 2 else SEEDED, names[i % len(names)])
        for i in range(12)
    ]
    mixed = fillers[:5] + targets[:2] + fillers[5:9] + targets[2:] + fillers[9:]
    outs = llm.generate([m[0] for m in mixed], [m[1] for m in mixed], [m[2] for m in mixed])
    by_prompt = {tuple(m[0]): o for m, o in zip(mixed, outs, strict=True)}
    for (prompt, _, name), ref in zip(targets, alone, strict=True):
        _assert_same(ref, by_prompt[tuple(prompt)], f"batch adapter={name}")
    llm.engine.check_integrity()


def _small_pool_llm(fx: dict, adapters: tuple[str, ...], pages: int, **kw) -> LLM:
    """block_size 4 (a page is 2 layers * 2 * 4 tokens * kv_dim 32 * 4 bytes = 2048 bytes)."""
    return LLM(
        fx["model_dir"],
        adapters={a: fx["adapters"][a] for a in adapters},
        pool_bytes=pages * 2048,
        block_size=4,
        max_model_len=64,
        **kw,
    )


def test_alone_equals_across_preemption(tiny_llama):
    """55 pages: r8_all alone takes 35, so seven requests growing to 33..47 tokens (9..12 pages
    each) cannot all stay; the newest running ones are preempted by recompute, several times."""
    fx = tiny_llama
    llm = _small_pool_llm(fx, ("r8_all", "r4_attn", "r1_qv"), pages=55)
    assert llm.engine.pool.num_pages == 55
    targets = _targets()
    alone = _run_alone(llm, targets)
    early = [(_prompt(12, 300 + i), GREEDY, a) for i, a in enumerate(["r8_all", None, "r4_attn"])]
    reqs = early + targets
    outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs], [r[2] for r in reqs])
    assert llm.engine.batcher.num_preemptions > 0
    preempted = {
        params.greedy
        for (_, params, _), out in zip(targets, outs[len(early) :], strict=True)
        if out.num_preemptions
    }
    assert preempted == {True, False}, "need a preempted greedy and a preempted seeded target"
    for (_, params, name), ref, out in zip(targets, alone, outs[len(early) :], strict=True):
        _assert_same(ref, out, f"adapter={name} seeded={params.seed} x{out.num_preemptions}")
    llm.engine.check_integrity()
    assert llm.engine.pool.pages_used("kv") == 0


def test_alone_equals_after_adapter_evicted_and_reloaded(tiny_llama):
    """120 pages of 2048 bytes cannot hold r8_all (35), r16_all_rslora (70) and r32_attn (56)
    together: running them in turn evicts the least recently used, r8_all first."""
    fx = tiny_llama
    names = ("r8_all", "r16_all_rslora", "r32_attn", "r4_attn")
    llm = _small_pool_llm(fx, names, pages=120)
    engine = llm.engine
    store = engine.store
    uid = engine.adapters.uid_of("r8_all")
    target = (_prompt(17, 100), GREEDY, "r8_all")
    seeded = (_prompt(9, 101), SEEDED, "r8_all")
    alone = _run_alone(llm, [target, seeded])
    assert store.is_resident(uid)
    evictions, loads = store.evictions, store.loads
    for i, other in enumerate(["r16_all_rslora", "r32_attn", "r4_attn", "r16_all_rslora"]):
        llm.generate([_prompt(10, 400 + i)], GREEDY, [other])
        engine.check_integrity()
    assert not store.is_resident(uid), "r8_all was never evicted"
    assert store.evictions > evictions
    loads_before_rerun = store.loads
    assert loads_before_rerun > loads
    again = _run_alone(llm, [target, seeded])
    assert store.loads == loads_before_rerun + 1  # r8_all loaded again, once
    assert store.is_resident(uid)
    for ref, out, what in zip(alone, again, ("greedy", "seeded"), strict=True):
        _assert_same(ref, out, f"reloaded r8_all {what}")
    engine.check_integrity()


@pytest.mark.parametrize("budget", [5, 16])
def test_alone_equals_with_chunked_prefill(tiny_llama, budget):
    """A small token budget changes how prompts and recomputes are split into chunks (and mixes
    them with decodes); outputs stay the same."""
    fx = tiny_llama
    llm = LLM(
        fx["model_dir"],
        adapters=fx["adapters"],
        pool_bytes=8 << 20,
        max_num_batched_tokens=budget,
    )
    targets = _targets()
    roomy = LLM(fx["model_dir"], adapters=fx["adapters"], pool_bytes=8 << 20)
    alone = _run_alone(roomy, targets)
    outs = llm.generate([t[0] for t in targets], [t[1] for t in targets], [t[2] for t in targets])
    for (_, _, name), ref, out in zip(targets, alone, outs, strict=True):
        _assert_same(ref, out, f"budget={budget} adapter={name}")


def test_alone_equals_with_adapter_reloaded_into_scattered_pages(tiny_llama):
    """60 pages: seven 27-token requests take pages 0..48; aborting every other one leaves
    39 free pages in runs of 7 and 11, so r8_all (35 pages) is loaded non-contiguously."""
    fx = tiny_llama
    llm = _small_pool_llm(fx, ("r8_all",), pages=60)
    engine, store = llm.engine, llm.engine.store
    uid = engine.adapters.uid_of("r8_all")
    targets = [(_prompt(9, 100), GREEDY, "r8_all"), (_prompt(9, 101), SEEDED, "r8_all")]
    alone = _run_alone(llm, targets)
    for (prompt, params, name), ref in zip(targets, alone, strict=True):
        store.evict(uid)
        fill = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        for i in range(7):
            engine.add_request(f"fill-{params.seed}-{i}", _prompt(27, 500 + i), fill)
        engine.step()
        for i in range(0, 7, 2):
            engine.abort(f"fill-{params.seed}-{i}")
        assert engine.pool.num_free == 39
        seq = engine.add_request(f"target-{params.seed}", prompt, params, name)
        engine.step()
        assert store.is_resident(uid) and not store.is_contiguous(uid)
        while engine.has_unfinished():
            engine.step()
            engine.check_integrity()
        assert seq.output_token_ids == ref.token_ids
        diff = max(abs(x - y) for x, y in zip(ref.logprobs, seq.output_logprobs, strict=True))
        assert diff <= LOGPROB_TOL

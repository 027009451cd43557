"""Sampler: greedy, banning, seeded determinism, top-k/top-p sets, distribution, logprobs."""

from __future__ import annotations

import pytest
import torch

from loraplex.engine.sampler import Sampler, SamplingBatch, row_seed
from loraplex.scheduler.sequence import SamplingParams, Sequence


def make_batch(
    n: int,
    *,
    temperature: float | list[float] = 0.0,
    top_p: float | list[float] = 1.0,
    top_k: int | list[int] = 0,
    seed: int | None | list[int | None] = None,
    output_index: int | list[int] = 0,
    banned: tuple[int, ...] | list[tuple[int, ...]] = (),
    num_top: int | list[int] = 0,
) -> SamplingBatch:
    def rows(v):
        return list(v) if isinstance(v, list) else [v] * n

    return SamplingBatch(
        temperatures=rows(temperature),
        top_ps=rows(top_p),
        top_ks=rows(top_k),
        seeds=rows(seed),
        output_index=rows(output_index),
        banned=rows(banned),
        num_top_logprobs=rows(num_top),
    )


def rand_logits(s: int, v: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(s, v, generator=g) * scale


def test_greedy_equals_argmax_and_ties_go_to_lowest_id():
    logits = rand_logits(8, 50)
    logits[3, 7] = logits[3, 20] = logits[3].max() + 1.0  # a tie
    out = Sampler()(logits, make_batch(8))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[3] == 7
    assert out.top_logprobs == [[] for _ in range(8)]


def test_banned_tokens_never_drawn():
    v = 6
    logits = torch.zeros(400, v)
    logits[:, 2] = 10.0  # the "eos" is by far the likeliest
    logits[:, 4] = 9.0
    banned = (2, 4)
    greedy = Sampler()(logits[:2], make_batch(2, banned=banned))
    assert greedy.token_ids == [0, 0]  # remaining tokens tie at 0 -> lowest id
    rnd = Sampler()(logits, make_batch(400, temperature=1.0, banned=banned))
    assert not set(rnd.token_ids) & set(banned)
    assert set(rnd.token_ids) == {0, 1, 3, 5}
    # Logprobs stay those of the raw distribution, banning or not.
    raw = torch.log_softmax(logits[0], -1)
    assert rnd.logprobs[0] == pytest.approx(raw[rnd.token_ids[0]].item(), abs=1e-6)


def test_from_seqs_bans_eos_and_stop_until_min_tokens():
    params = SamplingParams(max_tokens=8, min_tokens=2, stop_token_ids=(9,), logprobs=3, seed=5)
    seq = Sequence("r", [1, 2, 3], params, eos_token_ids=(0,))
    batch = SamplingBatch.from_seqs([seq])
    assert batch.banned == [(0, 9)] and batch.output_index == [0] and batch.seeds == [5]
    assert batch.num_top_logprobs == [3] and not batch.all_greedy
    seq.token_ids += [4]
    assert SamplingBatch.from_seqs([seq]).banned == [(0, 9)]
    seq.token_ids += [5]
    assert SamplingBatch.from_seqs([seq]).banned == [()]
    no_eos = SamplingParams(min_tokens=2, stop_token_ids=(9,), ignore_eos=True, temperature=0)
    b = SamplingBatch.from_seqs([Sequence("s", [1], no_eos, eos_token_ids=(0,))])
    assert b.banned == [(9,)] and b.all_greedy and b.output_index == [0]


def test_seeded_row_independent_of_batch_and_position():
    v = 1000
    row = rand_logits(1, v, seed=1, scale=1.0)[0]  # flat distribution: many plausible tokens
    sampler = Sampler()
    kw = dict(temperature=0.9, top_p=0.95, top_k=500)

    def draw(index: int) -> int:
        return sampler(row[None], make_batch(1, seed=42, output_index=index, **kw)).token_ids[0]

    alone = [draw(i) for i in range(6)]
    assert len(set(alone)) > 1  # different output_index -> different streams
    others = rand_logits(5, v, seed=2)
    for pos in (0, 3, 5):
        logits = torch.cat([others[:pos], row[None], others[pos:]])
        seeds = [None] * 6
        seeds[pos] = 42
        temps = [1.0, 0.0, 0.7, 1.3, 1.0, 0.5]
        temps[pos] = 0.9
        tops = [1.0] * 6
        tops[pos] = 0.95
        ks = [0, 0, 5, 0, 3, 0]
        ks[pos] = 500
        for index in (0, 4):
            batch = make_batch(
                6, temperature=temps, top_p=tops, top_k=ks, seed=seeds, output_index=index
            )
            assert sampler(logits, batch).token_ids[pos] == alone[index]
    # A fresh Sampler (e.g. after preemption and recompute) draws the same tokens.
    assert (
        Sampler()(row[None], make_batch(1, seed=42, output_index=4, **kw)).token_ids[0]
        == (alone[4])
    )


def test_row_seed_is_stable_and_spreads():
    assert row_seed(0, 0) == row_seed(0, 0)
    seeds = {row_seed(s, i) for s in range(10) for i in range(10)}
    assert len(seeds) == 100 and all(0 <= x < 2**63 for x in seeds)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    logits = rand_logits(64, 200, seed=3, scale=0.5)
    logits[0, 11] = logits[0, 150] = logits[0].max() + 0.5  # tie: greedy takes 11
    greedy = Sampler()(logits, make_batch(64)).token_ids
    assert greedy[0] == 11
    top1 = Sampler()(logits, make_batch(64, temperature=1.5, top_k=1)).token_ids
    tiny_p = Sampler()(logits, make_batch(64, temperature=1.5, top_p=1e-6)).token_ids
    assert top1 == greedy and tiny_p == greedy


def test_temperature_one_matches_softmax():
    n = 20_000
    base = torch.tensor([1.0, 0.0, -1.0, 0.5])
    out = Sampler()(base.expand(n, 4), make_batch(n, temperature=1.0))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / n
    assert torch.allclose(freq, torch.softmax(base, -1), atol=0.015)
    # Seeded draws across output indices follow the same distribution.
    m = 3000
    seeded = Sampler()(
        base.expand(m, 4), make_batch(m, temperature=1.0, seed=7, output_index=list(range(m)))
    )
    freq = torch.bincount(torch.tensor(seeded.token_ids), minlength=4).float() / m
    assert torch.allclose(freq, torch.softmax(base, -1), atol=0.035)


def test_temperature_sharpens():
    n = 20_000
    base = torch.tensor([1.0, 0.0, -1.0, 0.5])
    out = Sampler()(base.expand(n, 4), make_batch(n, temperature=0.5))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / n
    assert torch.allclose(freq, torch.softmax(base / 0.5, -1), atol=0.015)


def test_top_k_and_top_p_stay_inside_allowed_set():
    v, n = 10, 3000
    base = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0, 0.5, 1.5, -2.0, 2.2])
    order = torch.argsort(base, descending=True, stable=True).tolist()
    probs = torch.softmax(base, -1)[order]
    cum = torch.cumsum(probs, 0)
    p = 0.8
    n_keep = int((cum - probs < p).sum())  # smallest prefix reaching p
    allowed_p = set(order[:n_keep])
    allowed_k = set(order[:3])
    p2 = torch.softmax(base[order[:3]], -1)  # top-3 renormalised, then top-p 0.6
    allowed_kp = set(order[: int(((torch.cumsum(p2, 0) - p2) < 0.6).sum())])

    logits = base.expand(3 * n, v)
    temps, ks, ps = [1.0] * (3 * n), [3] * n + [0] * n + [3] * n, [1.0] * n + [p] * n + [0.6] * n
    out = Sampler()(logits, make_batch(3 * n, temperature=temps, top_k=ks, top_p=ps))
    got_k, got_p, got_kp = (set(out.token_ids[i * n : (i + 1) * n]) for i in range(3))
    assert got_k == allowed_k and got_p == allowed_p and got_kp == allowed_kp
    assert 1 < len(allowed_kp) < 3 and len(allowed_p) > 3


def test_mixed_batch_greedy_rows_unaffected():
    logits = rand_logits(10, 64, seed=4)
    temps = [0.0, 1.0] * 5
    out = Sampler()(logits, make_batch(10, temperature=temps, top_k=[0, 4] * 5))
    greedy = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in range(0, 10, 2)] == greedy[0::2]
    top4 = torch.topk(logits, 4, -1).indices.tolist()
    assert all(out.token_ids[i] in top4[i] for i in range(1, 10, 2))


def test_logprobs_and_top_logprobs_are_raw():
    logits = rand_logits(6, 300, seed=5)
    raw = torch.log_softmax(logits.double(), -1)
    batch = make_batch(
        6,
        temperature=[0.0, 0.7, 1.0, 0.0, 1.2, 0.3],
        top_k=[0, 5, 0, 0, 0, 2],
        top_p=[1.0, 1.0, 0.5, 1.0, 0.9, 1.0],
        num_top=[0, 1, 5, 20, 3, 0],
        banned=[(), (), (1,), (), (), ()],
    )
    out = Sampler()(logits, batch)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert lp == pytest.approx(raw[i, tok].item(), abs=1e-6)
        n = batch.num_top_logprobs[i]
        tops = out.top_logprobs[i]
        assert len(tops) == n
        expect = torch.topk(raw[i], n) if n else None
        for j, (t, v) in enumerate(tops):
            assert isinstance(t, int) and isinstance(v, float)
            assert v == pytest.approx(raw[i, t].item(), abs=1e-6)
            assert t == expect.indices[j].item()
        assert [v for _, v in tops] == sorted((v for _, v in tops), reverse=True)


def test_bfloat16_logits_accepted():
    logits = rand_logits(4, 128, seed=6).to(torch.bfloat16)
    batch = make_batch(4, temperature=[0.0, 1.0, 0.0, 0.8], seed=[None, 3, None, 1], num_top=2)
    out = Sampler()(logits, batch)
    ref = logits.float()
    assert out.token_ids[0] == ref[0].argmax().item() and out.token_ids[2] == ref[2].argmax().item()
    raw = torch.log_softmax(ref, -1)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(raw[i, tok].item(), abs=1e-6)
        assert len(out.top_logprobs[i]) == 2
    seeded = Sampler()(logits[1:2], make_batch(1, temperature=1.0, seed=3, num_top=2))
    assert seeded.token_ids[0] == out.token_ids[1]


def test_shape_mismatch_and_empty_batch():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(3, 10), make_batch(2))
    with pytest.raises(ValueError):
        SamplingBatch([1.0], [1.0, 1.0], [0], [None], [0], [()], [0])
    empty = Sampler()(torch.zeros(0, 10), make_batch(0))
    assert empty.token_ids == [] and empty.logprobs == [] and empty.top_logprobs == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_contract():
    logits = rand_logits(6, 5000, seed=8, scale=1.0).cuda().to(torch.bfloat16)
    temps = [0.0, 1.0, 0.8, 0.0, 1.0, 1.0]
    batch = make_batch(
        6,
        temperature=temps,
        top_k=[0, 50, 0, 0, 0, 10],
        top_p=[1.0, 0.9, 0.5, 1.0, 1.0, 1.0],
        seed=[None, 11, 12, None, None, 13],
        banned=[(1,), (), (), (), (2,), ()],
        num_top=4,
    )
    out = Sampler()(logits, batch)
    ref = logits.float().cpu()
    ref[0, 1] = float("-inf")
    assert out.token_ids[0] == ref[0].argmax().item() and out.token_ids[3] == ref[3].argmax().item()
    raw = torch.log_softmax(logits.float().cpu(), -1)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(raw[i, tok].item(), abs=1e-5)
    for i in (1, 2, 5):  # seeded rows: same token alone as in the batch
        alone = make_batch(
            1,
            temperature=temps[i],
            top_k=batch.top_ks[i],
            top_p=batch.top_ps[i],
            seed=batch.seeds[i],
        )
        assert Sampler()(logits[i : i + 1], alone).token_ids[0] == out.token_ids[i]

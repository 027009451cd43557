"""Seeded workloads (loadtests/workloads.py): the generators' distributions with fixed seeds, spec
validation, JSONL traces, the run statistics (loadtests/stream_client.py), and `replay` against a
real `loraplex serve` of a 2-layer checkpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from loraplex.loadtests.server_process import ServerProcess
from loraplex.loadtests.stream_client import StreamResult, replay, slo_attainment, summarize
from loraplex.loadtests.workloads import (
    Trace,
    TraceRequest,
    WorkloadSpec,
    gamma_arrivals,
    make_trace,
    power_law_indices,
    uniform_indices,
    zipf_indices,
)

LORAPLEX = str(Path(sys.executable).with_name("loraplex"))
NAMES = [f"a{i}" for i in range(8)]


def _rng(seed: int = 0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("cv", [1.0, 4.0])
def test_gamma_arrivals_mean_and_cv(cv):
    rate = 5.0
    t = np.array(gamma_arrivals(20_000, rate, cv, _rng(1)))
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert (gaps >= 0).all() and t[0] == gaps[0] > 0  # the first request comes at its own gap
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05 if cv == 1 else 0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05 if cv == 1 else 0.12)


def test_power_law_uniform_at_alpha_1():
    n, k = 16_000, 8
    counts = np.bincount(power_law_indices(n, k, 1.0, _rng(2)), minlength=k)
    expected = n / k
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert len(counts) == k and chi2 < 24.3  # 7 degrees of freedom: the 99.9% quantile


def test_power_law_skewed_at_small_alpha():
    """P(i <= j) = ((j + 1) / n) ** alpha: alpha 0.1 puts 8**-0.1 = 81% on index 0."""
    n, k, alpha = 20_000, 8, 0.1
    freq = np.bincount(power_law_indices(n, k, alpha, _rng(3)), minlength=k) / n
    cdf = ((np.arange(k) + 1) / k) ** alpha
    expected = np.diff(np.concatenate([[0.0], cdf]))
    assert expected[0] == pytest.approx(0.812, abs=1e-3) and len(freq) == k
    assert np.abs(freq - expected).max() < 0.01
    assert freq[0] > 0.79 and freq[1:].max() < 0.07


def test_zipf_frequencies():
    n, k, s = 30_000, 5, 1.1
    freq = np.bincount(zipf_indices(n, k, s, _rng(4)), minlength=k) / n
    w = 1 / np.arange(1, k + 1) ** s
    assert len(freq) == k and np.abs(freq - w / w.sum()).max() < 0.01


def test_uniform_indices_cover_the_range():
    idx = uniform_indices(4000, 5, _rng(5))
    counts = np.bincount(idx, minlength=5)
    assert len(counts) == 5 and counts.min() > 700


def test_base_share_lengths_and_tokens():
    spec = WorkloadSpec(4000, base_share=0.3, prompt_len=(16, 32), output_len=(8, 8), seed=7)
    t = make_trace(spec, NAMES[:3], vocab_size=300)
    share = sum(r.adapter is None for r in t.requests) / 4000
    assert share == pytest.approx(0.3, abs=0.025)
    assert {r.adapter for r in t.requests} == {None, "a0", "a1", "a2"}
    plens = [len(r.prompt) for r in t.requests]
    assert min(plens) == 16 and max(plens) == 31  # [lo, hi)
    assert {r.output_len for r in t.requests} == {8}
    tokens = {tok for r in t.requests for tok in r.prompt}
    assert min(tokens) == 4 and max(tokens) == 299  # the 4 special ids skipped
    assert all(r.arrival_s is None for r in t.requests)  # closed loop
    assert [r.index for r in t.requests] == list(range(4000))
    small = make_trace(WorkloadSpec(200, prompt_len=(5, 6)), [], vocab_size=10)
    assert all(r.adapter is None and len(r.prompt) == 5 for r in small.requests)  # no adapters
    assert min(tok for r in small.requests for tok in r.prompt) == 0  # tiny vocab: from 0
    everyone = make_trace(WorkloadSpec(50, base_share=1.0), NAMES, 100)
    assert all(r.adapter is None for r in everyone.requests)


def test_same_seed_same_trace_and_independent_aspects():
    spec = WorkloadSpec(64, arrival="gamma", rate=10.0, popularity="zipf", base_share=0.1,
                        prompt_len=(4, 40), output_len=(1, 9), seed=11)  # fmt: skip
    a, b = make_trace(spec, NAMES, 500), make_trace(spec, NAMES, 500)
    assert a == b
    other = make_trace(dataclasses.replace(spec, seed=12), NAMES, 500)
    assert [r.prompt for r in other.requests] != [r.prompt for r in a.requests]
    assert [r.arrival_s for r in other.requests] != [r.arrival_s for r in a.requests]
    # another popularity law: same arrivals, lengths and prompts, other adapters
    skew = make_trace(dataclasses.replace(spec, popularity="power", alpha=0.2), NAMES, 500)
    for x, y in zip(a.requests, skew.requests, strict=True):
        assert (x.arrival_s, x.prompt, x.output_len) == (y.arrival_s, y.prompt, y.output_len)
    assert [r.adapter for r in skew.requests] != [r.adapter for r in a.requests]
    arrivals = [r.arrival_s for r in a.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_requests": 0}, "num_requests"),
        ({"arrival": "poisson"}, "arrival"),
        ({"arrival": "gamma"}, "rate"),
        ({"arrival": "gamma", "rate": -1.0}, "rate"),
        ({"rate": 3.0}, "rate"),  # a closed loop has no rate
        ({"cv": 0.0}, "cv"),
        ({"concurrency": 0}, "concurrency"),
        ({"popularity": "pareto"}, "popularity"),
        ({"alpha": 0.0}, "alpha"),
        ({"zipf_s": -1.0}, "zipf_s"),
        ({"base_share": 1.5}, "base_share"),
        ({"prompt_len": (0, 4)}, "prompt_len"),
        ({"prompt_len": (8, 4)}, "prompt_len"),
        ({"output_len": (4,)}, "output_len"),
        ({"output_len": "64"}, "output_len"),
        ({"seed": -1}, "seed"),
        ({"num_requests": 2.5}, "num_requests"),
    ],
)
def test_spec_validation_names_the_field(kwargs, field):
    args = {"num_requests": 4, **kwargs}
    with pytest.raises(ValueError, match=rf"WorkloadSpec\.{field}:"):
        WorkloadSpec(**args)


def test_spec_lengths_become_tuples():
    spec = WorkloadSpec(3, prompt_len=[2, 5], output_len=[7, 7])
    assert spec.prompt_len == (2, 5) and spec.output_len == (7, 7)


def test_trace_save_load_round_trip(tmp_path):
    spec = WorkloadSpec(40, arrival="gamma", rate=3.0, cv=2.0, popularity="power", alpha=0.3,
                        base_share=0.2, prompt_len=(3, 9), output_len=(2, 6), seed=5)  # fmt: skip
    trace = make_trace(spec, NAMES[:4], 1000)
    path = tmp_path / "t.jsonl"
    trace.save(path)
    lines = path.read_text().splitlines()
    assert len(lines) == 41
    head = json.loads(lines[0])
    assert head["trace"] == 1 and head["adapters"] == NAMES[:4] and head["spec"]["rate"] == 3.0
    assert set(json.loads(lines[1])) == {"index", "arrival_s", "adapter", "prompt", "output_len"}
    assert Trace.load(path) == trace
    closed = make_trace(WorkloadSpec(3), [], 100)
    closed.save(path)
    assert Trace.load(path) == closed


def _write(tmp_path, lines: list[str]) -> Path:
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_trace_load_errors_name_the_line(tmp_path):
    trace = make_trace(WorkloadSpec(3, prompt_len=(2, 2), output_len=(2, 2)), ["x"], 100)
    trace.save(tmp_path / "good.jsonl")
    head, *reqs = (tmp_path / "good.jsonl").read_text().splitlines()

    p = _write(tmp_path, [head, reqs[0], "{not json", reqs[2]])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not JSON"):
        Trace.load(p)
    missing = json.loads(reqs[1])
    del missing["output_len"]
    with pytest.raises(ValueError, match=r":3: the request misses field 'output_len'"):
        Trace.load(_write(tmp_path, [head, reqs[0], json.dumps(missing)]))
    typed = {**json.loads(reqs[0]), "prompt": "hello"}
    with pytest.raises(ValueError, match=r":2: 'prompt' must be a non-empty list"):
        Trace.load(_write(tmp_path, [head, json.dumps(typed)]))
    with pytest.raises(ValueError, match=r":3: 'index' out of order: expected 1"):
        Trace.load(_write(tmp_path, [head, reqs[0], reqs[2]]))
    with pytest.raises(ValueError, match=r":2: the request has unknown field 'extra'"):
        Trace.load(_write(tmp_path, [head, json.dumps({**json.loads(reqs[0]), "extra": 1})]))
    bad_heads = {
        json.dumps({**json.loads(head), "trace": 2}): "not a version 1 trace",
        json.dumps({"spec": {}, "adapters": []}): "the header misses field 'trace'",
        json.dumps({**json.loads(head), "adapters": "x"}): "'adapters' must be a list",
        json.dumps({**json.loads(head), "spec": {"num_requests": 0}}): r"bad spec: WorkloadSpec",
        json.dumps(
            {**json.loads(head), "spec": {"num_requests": 1, "qps": 2}}
        ): "'spec' has unknown field 'qps'",
        "[1, 2]": "the header must be a JSON object",
    }
    for bad, why in bad_heads.items():
        with pytest.raises(ValueError, match=rf"bad\.jsonl:1: {why}"):
            Trace.load(_write(tmp_path, [bad, *reqs]))
    with pytest.raises(ValueError, match=r":1: empty trace file"):
        Trace.load(_write(tmp_path, []))


def test_summarize_and_slo_attainment():
    a = StreamResult(0, t_start=10.0, t_first=10.5, t_end=11.0, chunk_times=[10.5, 10.7, 11.0],
                     completion_tokens=4)  # fmt: skip
    b = StreamResult(1, t_start=20.0, t_first=21.0, t_end=21.0, chunk_times=[21.0],
                     completion_tokens=2)  # fmt: skip
    c = StreamResult(2, t_start=30.0, t_end=30.2, error="request 2: HTTP 404: no such model")
    assert a.e2e == 1.0 and a.itls == pytest.approx([0.2, 0.3])
    got = summarize([a, b, c], wall=2.0)
    assert (got["requests"], got["errors"]) == (3, 1)
    assert got["req_per_s"] == 1.0 and got["output_tok_per_s"] == 3.0  # (4 + 2) / 2
    assert got["ttft_mean"] == pytest.approx(0.75) and got["ttft_p50"] == pytest.approx(0.75)
    assert got["ttft_p90"] == pytest.approx(0.95) and got["ttft_p99"] == pytest.approx(0.995)
    assert got["itl_mean"] == pytest.approx(0.25) and got["itl_p90"] == pytest.approx(0.29)
    assert got["e2e_mean"] == pytest.approx(1.0) and got["e2e_p99"] == pytest.approx(1.0)
    assert slo_attainment([a, b, c], 0.6) == pytest.approx(1 / 3)  # c failed: a miss
    assert slo_attainment([a, b, c], 1.0) == pytest.approx(2 / 3)
    assert slo_attainment([a, b], 0.1) == 0.0 and slo_attainment([], 1.0) == 0.0
    empty = summarize([c], wall=1.0)
    assert empty["errors"] == 1 and empty["ttft_p50"] is None and empty["itl_mean"] is None


# --- replay against a real server -------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`loraplex serve` of a 2-layer checkpoint (demo tokenizer) with adapters ad0 and ad1."""
    from loraplex.engine.demo import make_adapter, make_checkpoint
    from loraplex.engine.loader import load_model_spec

    root = tmp_path_factory.mktemp("replay")
    model = make_checkpoint(
        root / "model", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    spec = load_model_spec(model)
    flags = ["--model", str(model), "--max-num-seqs", "8", "--pool-bytes", str(64 << 20)]
    for i, r in enumerate((4, 8)):
        d = make_adapter(root / f"ad{i}", spec, rank=r, alpha=2.0 * r,
                         target_modules=["q_proj", "v_proj"], seed=100 + i)  # fmt: skip
        flags += ["--adapter", f"ad{i}={d}"]
    with ServerProcess(LORAPLEX, flags, 0, str(root)) as s:
        s.vocab = spec.vocab_size
        yield s
    assert s.returncode == 0


def _model_for(server):
    return lambda adapter: adapter if adapter is not None else server.base_id


def test_replay_closed_loop(server):
    spec = WorkloadSpec(12, concurrency=4, base_share=0.25, prompt_len=(3, 12),
                        output_len=(2, 7), seed=1)  # fmt: skip
    trace = make_trace(spec, ["ad0", "ad1"], server.vocab)
    done = []
    wall, res = asyncio.run(replay(server.url, trace, model_for=_model_for(server),
                                   on_done=done.append))  # fmt: skip
    assert [r.index for r in res] == list(range(12)) and sorted(r.index for r in done) == list(
        range(12)
    )
    assert all(r.error is None for r in res), [r.error for r in res]
    assert [r.completion_tokens for r in res] == [q.output_len for q in trace.requests]
    assert all(r.finish_reason == "length" and 0 < r.ttft <= r.e2e <= wall for r in res)
    s = summarize(res, wall)
    assert s["errors"] == 0 and s["output_tok_per_s"] > 0 and s["e2e_p50"] > 0


def test_replay_gamma_and_chat(server):
    spec = WorkloadSpec(8, arrival="gamma", rate=40.0, cv=1.0, prompt_len=(4, 8),
                        output_len=(3, 3), seed=2)  # fmt: skip
    trace = make_trace(spec, ["ad0", "ad1"], server.vocab)
    wall, res = asyncio.run(replay(server.url, trace, model_for=_model_for(server),
                                   time_scale=2.0))  # fmt: skip
    assert all(r.error is None and r.completion_tokens == 3 for r in res), res
    arrivals = [q.arrival_s * 2.0 for q in trace.requests]
    for r, t in zip(res, arrivals, strict=True):  # sent at its (scaled) arrival, not before
        assert r.t_start - res[0].t_start >= t - arrivals[0] - 0.02
    assert wall >= arrivals[-1]
    _, chat = asyncio.run(replay(server.url, trace, model_for=_model_for(server), chat=True))
    assert all(r.error is None and r.completion_tokens == 3 for r in chat), chat
    assert all(r.text and len(r.chunk_times) >= 1 for r in chat)  # the role chunk is no token


def test_replay_missing_adapter_is_an_error_result(server):
    trace = make_trace(WorkloadSpec(6, concurrency=3, prompt_len=(4, 4), output_len=(2, 2)),
                       ["ad0"], server.vocab)  # fmt: skip
    reqs = list(trace.requests)
    reqs[2] = dataclasses.replace(reqs[2], adapter="no-such-adapter")
    trace = Trace(trace.spec, trace.adapters, reqs)
    _, res = asyncio.run(replay(server.url, trace, model_for=_model_for(server)))
    assert "HTTP 404" in res[2].error and res[2].e2e > 0
    assert all(r.error is None and r.completion_tokens == 2 for i, r in enumerate(res) if i != 2)
    assert slo_attainment(res, 60.0) == pytest.approx(5 / 6)


def test_trace_request_is_plain_data():
    r = TraceRequest(0, None, None, [5, 6], 3)
    assert dataclasses.asdict(r) == {"index": 0, "arrival_s": None, "adapter": None,
                                     "prompt": [5, 6], "output_len": 3}  # fmt: skip

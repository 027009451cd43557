"""How co-served training spends the engine's steps (engine/train_budget.py, run by
engine/training_jobs.py): the share policy's credit and debt, idle time counting first, the ITL
target that no unit overruns, steps that prefill getting none, micro-batch sizes, and idle
steps. Unit costs are faked on the jobs' clock, so the
numbers are exact."""

from __future__ import annotations

import math

import pytest

from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.finetune_data import Example
from loraplex.engine.finetune_job import JobStatus, StepLoad
from loraplex.engine.train_budget import IDLE_GROW_SECONDS, IDLE_WINDOW_SECONDS
from loraplex.engine.train_forward import MicroBatch
from loraplex.engine.trainer import FinetuneConfig

CONFIG = FinetuneConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), epochs=2,
                        batch_size=4, seed=5)  # fmt: skip


def _engine(fx, **kw) -> Engine:
    config = EngineConfig(model=fx["model_dir"], pool_bytes=8 << 20, max_model_len=64, **kw)
    return Engine(config, adapters=fx["adapters"])


def test_micro_batches_take_what_the_step_leaves(tiny_llama, tmp_path):
    engine = _engine(tiny_llama, max_num_batched_tokens=256, finetune_max_tokens_per_step=200)
    jobs = engine.training
    assert jobs.budget.plan(StepLoad(0, 0.0)) == (None, 200)
    seconds, tokens = jobs.budget.plan(StepLoad(200, 0.04))
    assert seconds == pytest.approx(0.01) and tokens == 56  # the step's token budget left
    jobs.budget.cost.update(attention=0.0005, mlp_backward=0.001)  # the costliest: 1 ms per token,
    assert jobs.budget.plan(StepLoad(200, 0.04)) == (pytest.approx(0.01), 10)  # 10 fit in 10 ms
    # a step that prefills: its tokens are the long ITLs already, nothing trains before it
    assert jobs.budget.plan(StepLoad(200, 0.04, prefill=True)) == (0.0, 10)


class _FakeUnits:
    """Every training unit costs `per_token[kind]` x its padded tokens on `jobs.budget.clock`,
    and the job's cost estimates start right; `ran` lists the units run (kind, padded tokens)."""

    def __init__(self, monkeypatch, jobs, per_token: dict[str, float]) -> None:
        self.now, self.ran, real = 0.0, [], MicroBatch.run_unit
        jobs.budget.clock = lambda: self.now
        jobs.budget.cost.update(per_token)

        def run_unit(mb):
            kind = mb.next_unit()
            real(mb)
            self.now += per_token[kind] * mb.num_tokens
            self.ran.append((kind, mb.num_tokens))

        monkeypatch.setattr(MicroBatch, "run_unit", run_unit)

    def steps(self, jobs, load, n: int) -> list[int]:
        """Units each of n `jobs.run(load)` ran."""
        out = []
        for _ in range(n):
            before = len(self.ran)
            jobs.run(load)
            out.append(len(self.ran) - before)
        return out


def _ten_token_examples(n: int = 20) -> list[Example]:
    ids = [[3 + (7 * i + j) % 200 for j in range(10)] for i in range(n)]
    return [Example(x, [-100] * 5 + x[5:], i + 1) for i, x in enumerate(ids)]


def test_training_time_is_budgeted_over_steps_with_a_debt(tiny_llama, tmp_path, monkeypatch):
    engine = _engine(tiny_llama)
    jobs = engine.training
    # 0.6 ms per padded token: a one-example micro-batch's unit takes 6 ms
    fake = _FakeUnits(monkeypatch, jobs, dict.fromkeys(MicroBatch.KINDS, 6e-4))
    long = FinetuneConfig(rank=2, epochs=50, batch_size=4)  # outlasts the steps below
    job = engine.submit_finetune("d", long, _ten_token_examples(), str(tmp_path))
    busy = StepLoad(8, 0.010)  # each busy step earns 0.25 x 10 ms = 2.5 ms
    # the first step: one unit on 2.5 ms of credit, its 6 ms leave a 3.5 ms debt; the next step
    # pays 2.5 of it back and trains nothing; the one after has credit again
    assert fake.steps(jobs, busy, 3) == [1, 0, 1]
    assert jobs.budget.credit == pytest.approx(-0.0045) and jobs.seconds == pytest.approx(0.012)
    units = fake.steps(jobs, busy, 400)
    assert job.status is JobStatus.RUNNING and max(units) == 1
    # over the window training took its share of inference's time, within one unit
    earned = 0.25 * 0.010 * 403
    assert jobs.seconds + jobs.budget.credit == pytest.approx(earned)
    assert earned - 0.006 < jobs.seconds <= earned + 0.006
    assert sum(units) == pytest.approx(earned / 0.006 - 2, abs=1)
    # idle: training takes everything, one unit per step, and the debt is forgiven; in a short
    # lull micro-batches keep the busy steps' size (one example) ...
    idle = StepLoad(0, 0.0)
    assert fake.steps(jobs, idle, 15) == [1] * 15 and jobs.budget.credit == 0.0
    assert {n for _, n in fake.ran} == {10}
    # ... and grow to the whole batch of 4 once the engine has been idle a while
    fake.now += IDLE_GROW_SECONDS
    assert fake.steps(jobs, idle, 30) == [1] * 30
    assert max(n for _, n in fake.ran[-30:]) == 40


def test_idle_steps_training_counts_first(tiny_llama, tmp_path, monkeypatch):
    """Under a partial load the idle gaps train: decode steps (whose stretching is what costs
    inter-token latency) owe the share only for what idle steps lately did not give, up to the
    time saturated steps would give training (share / (1 + share) = 0.2 of it)."""
    engine = _engine(tiny_llama)
    jobs = engine.training
    fake = _FakeUnits(monkeypatch, jobs, dict.fromkeys(MicroBatch.KINDS, 1e-4))
    long = FinetuneConfig(rank=2, epochs=50, batch_size=4)
    engine.submit_finetune("i", long, _ten_token_examples(), str(tmp_path))
    busy = StepLoad(8, 0.010)
    assert jobs.budget.plan(busy) == (pytest.approx(0.0025), 25)  # no idle time: all the share
    while fake.now < 1.0:  # 1 s of idle steps, training all the time
        jobs.run(StepLoad(0, 0.0))
    idle = 1 - math.exp(-1.0 / IDLE_WINDOW_SECONDS)  # the integrator's value after 1 s
    assert jobs.budget.idle_share == pytest.approx(idle, rel=0.02) and idle > 0.2
    seconds, tokens = jobs.budget.plan(busy)
    assert seconds == 0.0 and tokens in (24, 25)  # nothing owed; micro-batches keep their size
    assert fake.steps(jobs, busy, 5) == [0] * 5
    for gap in (2.0, 4.0):  # busy steps without idle time: the share comes back as idle decays
        fake.now += gap
        idle *= math.exp(-gap / IDLE_WINDOW_SECONDS)
        owed = max(0.0, 1 - idle / 0.2)
        assert jobs.budget.plan(busy)[0] == pytest.approx(0.0025 * owed, rel=0.02)
    assert 0.9 < owed < 1  # 6 s after the idle second


def test_an_itl_target_budgets_what_each_step_leaves_of_it(tiny_llama, tmp_path, monkeypatch):
    engine = _engine(tiny_llama, finetune_itl_slo_ms=20)
    jobs = engine.training
    # 0.1 ms per padded token: a unit of a 4-example (40-token) micro-batch takes 4 ms
    fake = _FakeUnits(monkeypatch, jobs, dict.fromkeys(MicroBatch.KINDS, 1e-4))
    engine.submit_finetune("s", CONFIG, _ten_token_examples(), str(tmp_path))
    # 11 ms of inference leave 9 ms of the 20 ms target: two units while their estimates fit,
    # 19 ms in all; the 1 ms left is not carried (no burst later)
    assert fake.steps(jobs, StepLoad(8, 0.011), 3) == [2, 2, 2]
    assert jobs.budget.credit == pytest.approx(0.001)
    # a step already over the target earns nothing; no unit overruns it (no debt): 3 ms left
    # fit no 4 ms unit, 5 ms fit one
    assert fake.steps(jobs, StepLoad(8, 0.025), 1) == [0]
    assert fake.steps(jobs, StepLoad(8, 0.017), 2) == [0, 0]
    assert fake.steps(jobs, StepLoad(8, 0.015), 2) == [1, 1]
    # a step that prefills trains nothing
    assert fake.steps(jobs, StepLoad(8, 0.011, prefill=True), 2) == [0, 0]


def test_the_engine_trains_only_before_decode_only_steps(tiny_llama, tmp_path, monkeypatch):
    """Training runs once the step's batch is scheduled: none before a step that prefills (its
    tokens are the long ITLs already), the share of the last decode-only step's time before a
    decode-only one, one unit in an idle step."""
    from loraplex.scheduler.sequence import SamplingParams

    engine = _engine(tiny_llama)
    jobs = engine.training
    fake = _FakeUnits(monkeypatch, jobs, dict.fromkeys(MicroBatch.KINDS, 1e-6))
    long = FinetuneConfig(rank=2, epochs=50, batch_size=4)
    engine.submit_finetune("e", long, _ten_token_examples(), str(tmp_path))
    seen, run = [], jobs.run

    def spy(load):
        before = len(fake.ran)
        run(load)
        seen.append((load, len(fake.ran) - before))

    monkeypatch.setattr(jobs, "run", spy)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.step()  # idle
    for i in range(3):  # staggered: each arrival's prefill lands among the others' decodes
        engine.add_request(f"r{i}", [5 + i] * (4 + 3 * i), params)
        for _ in range(3):
            engine.step()
    while engine.batcher.has_unfinished():
        engine.step()
    prefills = [n for load, n in seen if load.prefill]
    decodes = [(load, n) for load, n in seen if load.tokens and not load.prefill]
    idle = [n for load, n in seen if not load.tokens]
    assert len(prefills) == 3 and prefills == [0, 0, 0]
    # the first decode-only step has no estimate yet (nothing earned); later ones train
    assert decodes[0][0].seconds == 0.0 and decodes[0][1] == 0
    assert all(load.seconds > 0 for load, _ in decodes[1:]) and sum(n for _, n in decodes)
    assert idle == [1]
    engine.check_integrity()

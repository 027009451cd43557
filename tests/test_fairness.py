"""Fair admission between tenants (scheduler/fairness.py): a tenant's flood does not queue
another tenant's requests behind it; FCFS within a tenant; idle time is not banked."""

from __future__ import annotations

import torch

from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.scheduler.fairness import FairShare
from loraplex.scheduler.sequence import SamplingParams, Sequence

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _seq(rid: str, tenant: str | None) -> Sequence:
    return Sequence(rid, [1, 2, 3], GREEDY, tenant=tenant)


def test_order_is_least_served_tenant_first_and_fcfs_within_one():
    fair = FairShare()
    seqs = [_seq(f"a{i}", "a") for i in range(4)] + [_seq("b0", "b"), _seq("b1", "b")]
    for s in seqs:
        fair.arrive(s.tenant)
    fair.charge("a", 100)  # a has been served before
    order = []
    for s in fair.order(seqs):
        order.append(s.request_id)
        fair.charge(s.tenant, 30)  # each admission charges its tokens
    assert order == ["b0", "b1", "a0", "a1", "a2", "a3"]  # b catches up, then a; FCFS each
    one = [_seq(f"x{i}", None) for i in range(3)]
    assert list(fair.order(one)) == one  # one group: plain arrival order


def test_idle_time_is_not_banked_as_credit():
    fair = FairShare()
    fair.arrive("a")
    fair.charge("a", 1000)
    fair.arrive("b")  # b arrives while a is backlogged: lifted to a's counter
    assert fair.served["b"] == 1000
    fair.leave("b")
    fair.charge("a", 500)
    fair.arrive("b")  # back after idling: not 500 tokens of credit ahead of a
    assert fair.served["b"] == 1500
    fair.leave("a")
    fair.leave("b")
    assert fair.active == {}


def test_a_flood_does_not_queue_another_tenant_behind_it(tiny_llama):
    engine = Engine(
        EngineConfig(
            model=tiny_llama["model_dir"], pool_bytes=8 << 20, max_model_len=64, max_num_seqs=2
        )  # fmt: skip
    )
    gen = torch.Generator().manual_seed(0)

    def prompt() -> list[int]:
        return torch.randint(0, 256, (8,), generator=gen).tolist()

    for i in range(12):
        engine.add_request(f"flood{i}", prompt(), GREEDY, tenant="flood")
    engine.step()  # flood0 and flood1 run
    engine.add_request("calm0", prompt(), GREEDY, tenant="calm")
    engine.add_request("calm1", prompt(), GREEDY, tenant="calm")
    admitted = []
    while engine.has_unfinished():
        engine.step()
        admitted += [s.request_id for s in engine.batcher.admitted_last_step]
        engine.check_integrity()
    # FCFS would admit all ten waiting flood requests first; here calm waits one admission
    assert admitted.index("calm0") <= 1 and admitted.index("calm1") <= 3, admitted
    flood = [r for r in admitted if r.startswith("flood")]
    assert flood == [f"flood{i}" for i in range(2, 12)]  # arrival order within the tenant
    assert engine.batcher.fair.active == {}

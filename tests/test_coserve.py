"""Fine-tuning co-served in the engine's steps (engine/training_jobs.py): the adapter a job
trains is the one the offline trainer (itself exact against PEFT: test_finetune.py) trains,
with or without inference beside it; inference tokens are unchanged by a job; memory is
reserved before a job starts, a job that does not fit waits, cancel returns every page, and
the integrity check holds after every step."""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.finetune_data import Example, pad_batch
from loraplex.engine.finetune_job import JobStatus
from loraplex.engine.train_forward import MicroBatch
from loraplex.engine.train_memory import activation_bytes
from loraplex.engine.trainer import FinetuneConfig, Trainer
from loraplex.scheduler.sequence import SamplingParams

CONFIG = FinetuneConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"),
                        epochs=2, batch_size=4, grad_accum=2, learning_rate=1e-3, shuffle=True,
                        seed=5)  # fmt: skip
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _examples(vocab: int, n: int = 20, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randrange(5, 21)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = rng.randrange(1, length - 1)
        out.append(Example(ids, [-100] * prompt + ids[prompt:], i + 1))
    return out


def _engine(fx, pool_bytes: int = 8 << 20, **kw) -> Engine:
    config = EngineConfig(model=fx["model_dir"], pool_bytes=pool_bytes, max_model_len=64, **kw)
    return Engine(config, adapters=fx["adapters"])


def _requests(engine: Engine, tag: str) -> list:
    names = [None, *sorted(engine.adapters.by_name)[:2]]
    rng = random.Random(1)
    return [
        engine.add_request(
            f"{tag}{i}",
            [rng.randrange(3, 200) for _ in range(5 + 3 * i)],
            GREEDY,
            names[i % len(names)],
        )  # fmt: skip
        for i in range(6)
    ]


def _run(engine: Engine, max_steps: int = 5000) -> int:
    steps = 0
    while engine.has_unfinished():
        engine.step()
        engine.check_integrity()
        steps += 1
        assert steps < max_steps
    return steps


def _weights(lora) -> dict:
    return {(k, "A"): v.detach().clone() for k, v in lora.A.items()} | {
        (k, "B"): v.detach().clone() for k, v in lora.B.items()
    }


def _saved(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{path}/adapter_model.safetensors")


def test_coserved_job_trains_the_offline_adapter_and_leaves_inference_unchanged(
    tiny_llama, tmp_path
):
    fx = tiny_llama
    alone = _engine(fx)
    examples = _examples(alone.spec.vocab_size)
    offline = Trainer(alone.model, CONFIG, examples, pad_id=0)
    while offline.steps_left:
        offline.step()
    expected_losses = [e.loss for e in offline.log]
    offline.save(tmp_path / "offline")
    seqs = _requests(alone, "r")
    _run(alone)
    expected_tokens = [s.output_token_ids for s in seqs]

    # tiny micro-batches and a tiny latency target: each step runs a few layer units, so the
    # job is cut into many pieces spread over the inference steps
    engine = _engine(fx, finetune_max_tokens_per_step=24, finetune_itl_slo_ms=0.01)
    job = engine.submit_finetune("job-1", CONFIG, examples, str(tmp_path / "co"),
                                 adapter_name="trained")  # fmt: skip
    seqs = _requests(engine, "r")
    engine.step()
    assert job.status is JobStatus.RUNNING and engine.stats().pages_train == job.pages > 0
    steps = _run(engine)
    assert [s.output_token_ids for s in seqs] == expected_tokens
    assert job.status is JobStatus.SUCCEEDED, job.reason
    assert steps > 3 * len(expected_losses)  # it really was cut up
    losses = [e.loss for e in job.log]
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    got, want = _saved(job.adapter_path), _saved(tmp_path / "offline")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)
    assert engine.stats().pages_train == 0 and engine.pool.num_free == engine.pool.num_pages - (
        engine.stats().pages_adapter
    )
    # trained and served at once, by the same engine
    assert "trained" in engine.adapters.by_name
    out = engine.add_request("after", [5, 6, 7], GREEDY, "trained")
    _run(engine)
    assert len(out.output_token_ids) == GREEDY.max_tokens


def test_a_job_that_does_not_fit_waits_with_its_reason(tiny_llama, tmp_path):
    fx = tiny_llama
    engine = _engine(fx, pool_bytes=1 << 20, max_num_seqs=32, finetune_max_tokens_per_step=32)
    examples = _examples(engine.spec.vocab_size, n=8)
    # long requests hold most of the pool's KV pages
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(f"l{i}", list(range(3, 23)), long) for i in range(24)]
    for _ in range(30):
        engine.step()
    job = engine.submit_finetune("big", CONFIG, examples, str(tmp_path / "big"))
    engine.step()
    engine.check_integrity()
    assert job.status is JobStatus.QUEUED, (engine.pool, job.pages)
    assert "waiting for memory" in job.reason and f"needs {job.pages} pages" in job.reason
    _run(engine)
    assert all(s.is_finished for s in seqs)
    assert job.status is JobStatus.SUCCEEDED and engine.stats().pages_train == 0


def test_cancel_mid_job_returns_every_page_zeroed(tiny_llama, tmp_path):
    engine = _engine(tiny_llama)
    job = engine.submit_finetune("c", CONFIG, _examples(engine.spec.vocab_size), str(tmp_path))
    for _ in range(3 * (4 * engine.spec.num_layers + 1)):  # an idle step runs one unit
        engine.step()
        engine.check_integrity()
    assert job.status is JobStatus.RUNNING and job.steps_done >= 1
    res = engine.train_pages.get(job.number)
    pages = res.state + res.activation
    assert engine.pool_tensor[res.state].abs().sum() > 0  # the state lives in the pool
    assert engine.cancel_finetune("c") and not engine.cancel_finetune("c")
    engine.check_integrity()
    assert job.status is JobStatus.CANCELLED and job.trainer is None
    assert engine.stats().pages_train == 0 and not engine.has_unfinished()
    assert all(engine.pool.is_free(p) for p in pages)
    assert engine.pool_tensor[pages].abs().sum() == 0
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_jobs_queue_in_order_and_bad_submissions_are_refused(tiny_llama, tmp_path):
    engine = _engine(tiny_llama)
    ex = _examples(engine.spec.vocab_size, n=6)
    small = FinetuneConfig(rank=2, epochs=1, batch_size=3)
    first = engine.submit_finetune("a", small, ex, str(tmp_path / "a"))
    second = engine.submit_finetune("b", small, ex, str(tmp_path / "b"), adapter_name="b")
    engine.step()
    assert first.status is JobStatus.RUNNING and second.status is JobStatus.QUEUED
    with pytest.raises(ValueError, match="already in use"):
        engine.submit_finetune("a", small, ex, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="already registered"):
        engine.submit_finetune("z", small, ex, str(tmp_path / "x"), adapter_name="r8_all")
    with pytest.raises(ValueError, match="no training examples"):
        engine.submit_finetune("z", small, [], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="needs .* pages .* but the pool has"):
        engine.submit_finetune("z", FinetuneConfig(rank=64, target_modules=("up_proj",)), ex,
                               str(tmp_path / "x"))  # fmt: skip
    _run(engine)
    assert first.status is second.status is JobStatus.SUCCEEDED
    assert first.finished_at <= second.started_at and "b" in engine.adapters.by_name


def test_a_failing_job_fails_alone_and_frees_its_pages(tiny_llama, tmp_path):
    engine = _engine(tiny_llama)
    (tmp_path / "file").write_text("not a directory")
    job = engine.submit_finetune("f", FinetuneConfig(rank=2, epochs=1, batch_size=8),
                                 _examples(engine.spec.vocab_size, n=4),
                                 str(tmp_path / "file" / "out"))  # fmt: skip
    seqs = _requests(engine, "r")
    _run(engine)
    assert job.status is JobStatus.FAILED and "file" in job.reason
    assert all(s.is_finished and len(s.output_token_ids) == 12 for s in seqs)
    assert engine.stats().pages_train == 0


def test_activation_reservation_bounds_what_autograd_keeps(tiny_llama):
    engine = _engine(tiny_llama)
    ex = _examples(engine.spec.vocab_size, n=4)
    trainer = Trainer(engine.model, CONFIG, ex, pad_id=0)
    mb = trainer.next_micro_batch()
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        while mb.next_unit() in ("attention", "mlp"):
            mb.run_unit()
    model = engine.model
    weights = [model.embed, model.norm, model.lm_head.weight, engine.pool_tensor]
    for layer in model.layers:
        weights += [layer.input_norm, layer.post_norm]
        weights += [lin.weight for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    not_activations = {w.untyped_storage().data_ptr() for w in weights}
    kept = sum(n for p, n in saved.items() if p not in not_activations)
    bound = activation_bytes(engine.spec, CONFIG.rank, mb.num_tokens, 4)
    assert 0.5 * bound < kept <= bound, (kept, bound)  # a bound, and not a loose one
    assert isinstance(mb, MicroBatch) and mb.bsz == len(ex)


def test_bfloat16_cpu_training_through_packed_linears(tiny_llama, tmp_path, monkeypatch):
    """A bfloat16 engine on the CPU trains through its oneDNN-packed linears (no autograd
    formula of their own: kernels/linear.py `input_grad`), to the losses the plain F.linear
    path gives within bfloat16 rounding, with float32 master weights."""
    import loraplex.kernels.linear as linear

    fx, config = tiny_llama, FinetuneConfig(rank=4, alpha=8.0, epochs=2, batch_size=4, seed=1,
                                            learning_rate=1e-2)  # fmt: skip
    logs, weights = [], []
    for packed in (True, False):
        if not packed:
            monkeypatch.setattr(linear, "_onednn_ok", False)
        engine = _engine(fx, dtype="bfloat16")
        modes = {lin.mode for w in engine.model.layers for lin in (w.qkv, w.down)}
        assert modes == ({"onednn"} if packed and linear._onednn_bf16_usable() else {"linear"})
        job = engine.submit_finetune(f"bf16-{packed}", config,
                                     _examples(engine.spec.vocab_size, n=12),
                                     str(tmp_path / str(packed)))  # fmt: skip
        _run(engine)
        assert job.status is JobStatus.SUCCEEDED, job.reason
        logs.append([e.loss for e in job.log])
        weights.append(_saved(job.adapter_path))
        assert all(t.dtype == torch.float32 for t in weights[-1].values())
    assert logs[0][-1] < logs[0][0]  # it learns
    assert logs[0] == pytest.approx(logs[1], rel=2e-2)
    for k in weights[1]:
        torch.testing.assert_close(weights[0][k], weights[1][k], atol=5e-3, rtol=0)


def test_checkpoints_at_each_epoch_end_and_the_listener_hears_the_job(tiny_llama, tmp_path):
    engine = _engine(tiny_llama)
    heard = []
    engine.training.listener = lambda job, event, data: heard.append((job.job_id, event, data))
    config = FinetuneConfig(rank=2, epochs=3, batch_size=4)
    examples = _examples(engine.spec.vocab_size, n=8)
    job = engine.submit_finetune(
        "k",
        config,
        examples,
        str(tmp_path / "out"),
        checkpoint_dir=str(tmp_path / "ck"),
        validation=examples[:5],
    )
    _run(engine)
    assert job.status is JobStatus.SUCCEEDED
    assert job.checkpoints == [(s, str(tmp_path / "ck" / f"step-{s}")) for s in (2, 4, 6)]
    last = _saved(job.checkpoints[-1][1])
    final = _saved(job.adapter_path)
    assert all(torch.equal(last[k], final[k]) for k in final)
    events = [e for _, e, _ in heard]
    assert events == ["running"] + ["step", "step", "checkpoint"] * 3 + ["ended"]
    assert [d.step for _, e, d in heard if e == "step"] == [1, 2, 3, 4, 5, 6]
    # validation at each epoch's end: the trained-token mean over the 5 examples
    with_validation = [e for e in job.log if e.validation_loss is not None]
    assert [e.step for e in with_validation] == [2, 4, 6]
    assert with_validation[-1].validation_loss < with_validation[0].validation_loss
    # a listener that raises does not fail the job
    engine.training.listener = lambda *a: 1 / 0
    job = engine.submit_finetune("k2", config, _examples(engine.spec.vocab_size, n=4),
                                 str(tmp_path / "out2"))  # fmt: skip
    _run(engine)
    assert job.status is JobStatus.SUCCEEDED


@pytest.mark.parametrize("targets", [("down_proj",), ("q_proj", "up_proj")])
def test_micro_batch_units_give_one_backwards_gradients(tiny_llama, targets):
    """Half-layer units (engine/train_forward.py MicroBatch) give the gradients of one backward
    of the whole micro-batch, also where a half holds no adapter weight (an MLP-only adapter:
    layer 0's attention half has nothing to differentiate)."""
    from loraplex.engine.train_forward import token_loss_sum
    from loraplex.engine.train_lora import TrainableLoRA

    engine = _engine(tiny_llama)
    ids, _, labels = pad_batch(_examples(engine.spec.vocab_size, n=3), 0)
    grads = []
    for split in (False, True):
        lora = TrainableLoRA.peft_init(engine.spec, 4, 8.0, targets, seed=3)
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():  # B = 0 would leave A's gradient zero
            for b in lora.B.values():
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
        if split:
            mb = MicroBatch(engine.model, lora, ids, labels, 7.0)
            while not mb.done:
                mb.run_unit()
        else:
            (token_loss_sum(engine.model, lora, ids, labels)[0] / 7.0).backward()
        grads.append([p.grad.clone() for p in lora.parameters()])
    assert all(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)

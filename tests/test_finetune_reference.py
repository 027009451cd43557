"""Checks of the fine-tuning oracle (tests/finetune_reference.py) against hand computations."""

from __future__ import annotations

import warnings

import pytest
import torch
from finetune_reference import (
    epoch_order,
    make_nonzero_adapter,
    peft_train,
    step_groups,
    trained_tokens,
)
from fixtures import make_tiny_model
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANK, ALPHA = 4, 8.0

# Uneven lengths; the first example masks its 3-token prompt like an SFT sample would.
EXAMPLES = [
    ([5, 17, 42, 8, 99, 3, 120, 64], [-100, -100, -100, 8, 99, 3, 120, 64]),
    ([7, 11, 13, 200], [7, 11, 13, 200]),
    ([31, 2, 250, 77, 9, 18], [-100, -100, 250, 77, 9, 18]),
    ([1, 60, 61], [1, 60, 61]),
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp(f"ft_{request.param}")
    tie = request.param == "qwen2"
    return make_tiny_model(root / "model", request.param, seed=11, tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ft_adapter") / "adapter"
    return make_nonzero_adapter(out, model_dir, RANK, ALPHA, TARGETS, seed=5)


def _hand_loss_and_grads(model_dir, adapter_dir, examples):
    """Mean token loss of `examples` as one step, one unpadded forward per example, and the
    gradient of that loss per saved adapter key (None for the base model)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for ids, labels in examples:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        for t in range(len(ids) - 1):
            if labels[t + 1] != -100:
                total = total - logp[t, labels[t + 1]].double()
                count += 1
    loss = total / count
    grads = None
    if adapter_dir is not None:
        loss.backward()
        grads = {
            name.replace(".default", ""): p.grad.clone()
            for name, p in model.named_parameters()
            if p.requires_grad
        }
    return loss.item(), count, grads


def _expected_first_adamw_delta(grad, lr):
    # First AdamW step (weight decay 0): m_hat = g, v_hat = g^2, so delta = -lr * g / (|g| + eps).
    return -lr * grad / (grad.abs() + 1e-8)


def test_one_step_loss_and_adamw_update(model_dir, adapter_dir):
    lr = 1e-3
    examples = EXAMPLES[:2]  # lengths 8 and 4 in one batch of 2
    log, state = peft_train(
        model_dir,
        examples,
        rank=RANK,
        alpha=ALPHA,
        target_modules=TARGETS,
        init_adapter=adapter_dir,
        batch_size=2,
        learning_rate=lr,
    )
    loss, count, grads = _hand_loss_and_grads(model_dir, adapter_dir, examples)
    assert count == sum(trained_tokens(labels) for _, labels in examples) == 5 + 3
    assert len(log) == 1
    assert log[0]["step"] == 1 and log[0]["tokens"] == count
    assert log[0]["loss"] == pytest.approx(loss, rel=1e-5)

    init = load_file(f"{adapter_dir}/adapter_model.safetensors")
    assert set(state) == set(init) == set(grads)
    assert any(".lora_A." in k for k in state) and any(".lora_B." in k for k in state)
    checked = 0
    for key, grad in grads.items():
        assert state[key].dtype == torch.float32
        delta = state[key] - init[key]
        strong = grad.abs() > 1e-5  # sign and size robust to batched-vs-unbatched rounding
        assert strong.float().mean() > 0.5, key
        torch.testing.assert_close(
            delta[strong], _expected_first_adamw_delta(grad, lr)[strong], rtol=0, atol=3e-7
        )
        assert torch.all(torch.sign(delta[strong]) == -torch.sign(grad[strong]))
        assert torch.all((delta[strong].abs() - lr).abs() < 0.02 * lr)
        assert delta.abs().max() <= lr * 1.001
        checked += int(strong.sum())
    assert checked > 1000


def test_fresh_init_first_step(model_dir):
    """PEFT's default init has B = 0: the first loss is the base model's, A does not move and
    every B entry with a non-zero gradient moves by about lr."""
    lr = 1e-3
    log, state = peft_train(
        model_dir,
        EXAMPLES[:2],
        rank=RANK,
        alpha=ALPHA,
        target_modules=TARGETS,
        seed=3,
        batch_size=2,
        learning_rate=lr,
    )
    base_loss, _, _ = _hand_loss_and_grads(model_dir, None, EXAMPLES[:2])
    assert log[0]["loss"] == pytest.approx(base_loss, rel=1e-5)
    _, init = peft_train(
        model_dir,
        EXAMPLES[:2],
        rank=RANK,
        alpha=ALPHA,
        target_modules=TARGETS,
        seed=3,
        learning_rate=0.0,
    )
    for key in state:
        if ".lora_A." in key:
            assert torch.count_nonzero(init[key]) == init[key].numel()
            assert torch.equal(state[key], init[key])  # zero gradient, zero update
        else:
            assert torch.count_nonzero(init[key]) == 0
            moved = state[key] != 0
            assert moved.float().mean() > 0.9
            assert torch.all((state[key][moved].abs() - lr).abs() < 0.05 * lr)


def test_loss_falls_on_repetitive_data(model_dir):
    pattern = [10, 20, 30, 40, 50]
    examples = [(pattern * 4, pattern * 4), ((pattern * 4)[2:], (pattern * 4)[2:])]
    log, _ = peft_train(
        model_dir,
        examples,
        rank=8,
        alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        epochs=20,
        batch_size=2,
        learning_rate=1e-2,
    )
    losses = [entry["loss"] for entry in log]
    assert [entry["step"] for entry in log] == list(range(1, 21))
    assert all(entry["tokens"] == 19 + 17 for entry in log)
    assert losses[-1] < 0.5 * losses[0], losses
    assert min(losses[10:]) < min(losses[:10])


def test_grad_accum_matches_bigger_batch(model_dir, adapter_dir):
    kwargs = dict(
        rank=RANK,
        alpha=ALPHA,
        target_modules=TARGETS,
        init_adapter=adapter_dir,
        learning_rate=1e-4,
    )
    log_acc, state_acc = peft_train(model_dir, EXAMPLES, batch_size=2, grad_accum=2, **kwargs)
    log_big, state_big = peft_train(model_dir, EXAMPLES, batch_size=4, grad_accum=1, **kwargs)
    log_one, state_one = peft_train(model_dir, EXAMPLES, batch_size=1, grad_accum=4, **kwargs)
    assert len(log_acc) == len(log_big) == len(log_one) == 1
    assert log_acc[0]["tokens"] == log_big[0]["tokens"] == log_one[0]["tokens"] == 5 + 3 + 4 + 2
    # Relative: the loss (~7) is a float32 sum of 14 token losses, so 1e-6 absolute would be
    # below its resolution; padding to other lengths changes the float32 rounding (~5e-7 seen).
    assert log_acc[0]["loss"] == pytest.approx(log_big[0]["loss"], rel=1e-6, abs=0)
    assert log_one[0]["loss"] == pytest.approx(log_big[0]["loss"], rel=1e-6, abs=0)
    # The first AdamW step moves each entry by ~lr * sign(grad): any gradient direction that
    # differs between the three runs would show up as a move of ~2 * lr = 2e-4.
    for key in state_big:
        assert (state_acc[key] - state_big[key]).abs().max() < 1e-6, key
        assert (state_one[key] - state_big[key]).abs().max() < 1e-6, key


def test_shuffle_order_and_step_groups(model_dir):
    # Example i has i + 1 trained tokens, so the per-step token counts reveal the order.
    examples = [(list(range(1, i + 3)), list(range(1, i + 3))) for i in range(5)]
    counts = [trained_tokens(labels) for _, labels in examples]
    assert counts == [1, 2, 3, 4, 5]
    kwargs = dict(rank=2, alpha=4, target_modules=["q_proj"], seed=7, learning_rate=1e-3)

    log, state = peft_train(model_dir, examples, epochs=2, shuffle=True, **kwargs)
    orders = [
        torch.randperm(5, generator=torch.Generator().manual_seed(7 + e)).tolist() for e in (0, 1)
    ]
    assert orders[0] != orders[1]
    assert [entry["tokens"] for entry in log] == [counts[i] for i in orders[0] + orders[1]]
    assert [epoch_order(5, e, seed=7, shuffle=True) for e in (0, 1)] == orders

    log2, state2 = peft_train(model_dir, examples, epochs=2, shuffle=True, **kwargs)
    assert log2 == log
    assert all(torch.equal(state[k], state2[k]) for k in state)

    log_plain, _ = peft_train(model_dir, examples, epochs=2, shuffle=False, **kwargs)
    assert [entry["tokens"] for entry in log_plain] == counts + counts

    # 5 examples, batches of 2, 2 batches per step: per epoch [[0,1],[2,3]] then [[4]].
    assert step_groups(5, epochs=2, batch_size=2, grad_accum=2) == [
        [[0, 1], [2, 3]],
        [[4]],
        [[0, 1], [2, 3]],
        [[4]],
    ]
    log_groups, _ = peft_train(model_dir, examples, epochs=2, batch_size=2, grad_accum=2, **kwargs)
    assert [entry["tokens"] for entry in log_groups] == [1 + 2 + 3 + 4, 5, 1 + 2 + 3 + 4, 5]
    assert [entry["step"] for entry in log_groups] == [1, 2, 3, 4]


def test_nonzero_adapter_is_loaded(model_dir, adapter_dir):
    init = load_file(f"{adapter_dir}/adapter_model.safetensors")
    for key, tensor in init.items():
        assert tensor.dtype == torch.float32
        assert torch.count_nonzero(tensor) == tensor.numel(), key
        if ".lora_B." in key:
            assert 0.03 < tensor.std().item() < 0.07

    kwargs = dict(rank=RANK, alpha=ALPHA, target_modules=TARGETS, batch_size=2)
    log_init, state_lr0 = peft_train(
        model_dir, EXAMPLES, init_adapter=adapter_dir, learning_rate=0.0, **kwargs
    )
    log_fresh, _ = peft_train(model_dir, EXAMPLES, learning_rate=0.0, **kwargs)
    adapter_loss, _, _ = _hand_loss_and_grads(model_dir, adapter_dir, EXAMPLES[:2])
    base_loss, _, _ = _hand_loss_and_grads(model_dir, None, EXAMPLES[:2])
    assert abs(adapter_loss - base_loss) > 1e-3
    assert log_init[0]["loss"] == pytest.approx(adapter_loss, rel=1e-5)
    assert log_fresh[0]["loss"] == pytest.approx(base_loss, rel=1e-5)
    assert set(state_lr0) == set(init)
    assert all(torch.equal(state_lr0[k], init[k]) for k in init)

    # Deterministic in its seed.
    again = make_nonzero_adapter(f"{adapter_dir}_again", model_dir, RANK, ALPHA, TARGETS, seed=5)
    init_again = load_file(f"{again}/adapter_model.safetensors")
    assert all(torch.equal(init[k], init_again[k]) for k in init)


def test_bf16_base_keeps_float32_lora(model_dir, adapter_dir):
    kwargs = dict(
        rank=RANK,
        alpha=ALPHA,
        target_modules=TARGETS,
        init_adapter=adapter_dir,
        batch_size=2,
        learning_rate=1e-3,
    )
    log32, _ = peft_train(model_dir, EXAMPLES, **kwargs)
    log16, state16 = peft_train(model_dir, EXAMPLES, dtype=torch.bfloat16, **kwargs)
    assert all(t.dtype == torch.float32 for t in state16.values())
    assert log16[0]["loss"] == pytest.approx(log32[0]["loss"], rel=0.05)

"""engine.finetune_data: JSONL lines -> labelled examples (prompt/completion and chat, weights,
the position-0 rule), the first bad line refused with its number, optimizer-step grouping and
padding. Expected tokens are built from the demo tokenizer's own encoding of hand-written text."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from loraplex.engine.finetune_data import (
    DataError,
    Example,
    epoch_order,
    load_examples,
    optimizer_steps,
    pad_batch,
)

GOOD_PROMPT = {"prompt": "Water boils at", "completion": " one hundred degrees."}
GOOD_CHAT = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from loraplex.engine.demo import build_tokenizer

    out = tmp_path_factory.mktemp("demo_tokenizer")
    build_tokenizer(out)
    return str(out)


def _load_tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return _load_tokenizer(tok_dir)


class _Proxy:
    """The demo tokenizer with some attributes overridden."""

    def __init__(self, tok, **overrides):
        self._tok = tok
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kwargs):
        return self._tok(text, **kwargs)


class _NoSpecialTokens(_Proxy):
    """A tokenizer that adds no BOS: an empty prompt gives no tokens."""

    def __call__(self, text, **kwargs):
        return self._tok(text, add_special_tokens=False)


def _write(tmp_path, lines, name="train.jsonl"):
    path = tmp_path / name
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    path.write_text(text, encoding="utf-8")
    return path


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_completion_labels(tmp_path, tok):
    (ex,) = load_examples(_write(tmp_path, [GOOD_PROMPT]), tok)
    prompt, completion = _enc(tok, "Water boils at"), _enc(tok, " one hundred degrees.")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert ex.input_ids == [bos, *prompt, *completion, eos]
    assert ex.labels == [-100] * (1 + len(prompt)) + completion + [eos]
    assert ex.line == 1 and ex.num_trained == len(completion) + 1
    trained = [t for t in ex.labels if t != -100]
    assert tok.decode(trained) == " one hundred degrees.</s>"
    # An empty completion trains only the EOS.
    (ex,) = load_examples(_write(tmp_path, [{"prompt": "Hi", "completion": ""}]), tok)
    assert ex.input_ids == [bos, *_enc(tok, "Hi"), eos]
    assert ex.labels == [-100] * (len(ex.input_ids) - 1) + [eos] and ex.num_trained == 1


def test_chat_labels_follow_assistant_weights(tmp_path, tok):
    system = {"role": "system", "content": "Be brief."}
    user1, user2 = {"role": "user", "content": "Hi"}, {"role": "user", "content": "Bye"}
    hello = {"role": "assistant", "content": "Hello."}
    goodbye = {"role": "assistant", "content": "Goodbye."}
    text = (
        "<s><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.</s>\n"
        "<|user|>\nBye\n<|assistant|>\nGoodbye.</s>\n"
    )
    lines = [
        {"messages": [system, user1, {**hello, "weight": 0}, user2, goodbye]},
        {"messages": [system, user1, {**hello, "weight": 1}, user2, {**goodbye, "weight": 0}]},
    ]
    first, second = load_examples(_write(tmp_path, lines), tok)
    ids = _enc(tok, text)
    assert ids[0] == tok.bos_token_id and first.input_ids == ids and second.input_ids == ids
    assert (first.line, second.line) == (1, 2)

    # The turn's content, its EOS and the newline the template emits after it are trained.
    goodbye_turn = _enc(tok, "Goodbye.") + [tok.eos_token_id] + _enc(tok, "\n")
    n = len(ids) - len(goodbye_turn)
    assert first.labels == [-100] * n + goodbye_turn
    assert tok.decode(ids[:n]).endswith("<|assistant|>\n")
    assert first.num_trained == len(goodbye_turn)

    start = len(_enc(tok, "<s><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"))
    hello_turn = _enc(tok, "Hello.") + [tok.eos_token_id] + _enc(tok, "\n")
    end = start + len(hello_turn)
    assert ids[start:end] == hello_turn
    assert second.labels == [-100] * start + hello_turn + [-100] * (len(ids) - end)
    assert tok.decode([t for t in second.labels if t != -100]) == "Hello.</s>\n"

    # An opening assistant turn is fine with weight 0.
    (ex,) = load_examples(
        _write(tmp_path, [{"messages": [{**hello, "weight": 0}, user2, goodbye]}]), tok
    )
    ids = _enc(tok, "<s><|assistant|>\nHello.</s>\n<|user|>\nBye\n<|assistant|>\nGoodbye.</s>\n")
    assert ex.input_ids == ids
    assert ex.labels == [-100] * (len(ids) - len(goodbye_turn)) + goodbye_turn


def test_file_order_blank_lines_and_line_numbers(tmp_path, tok):
    path = _write(tmp_path, [GOOD_CHAT, "", "   ", GOOD_PROMPT])
    examples = load_examples(path, tok)
    assert [e.line for e in examples] == [1, 4]
    assert examples[1].input_ids[:1] == [tok.bos_token_id]


_W = {"role": "user", "content": "x"}
BAD_LINES = [
    ("not json", "not JSON"),
    ('{"prompt": "a\\ud800", "completion": "b"}', "lone surrogate"),
    ("[1, 2]", "not a JSON object but an array"),
    ('"text"', "not a JSON object"),
    ({"text": "x"}, "neither format"),
    ({**GOOD_PROMPT, "messages": GOOD_CHAT["messages"]}, "both formats"),
    ({"messages": GOOD_CHAT["messages"], "completion": "x"}, "both formats"),
    ({**GOOD_PROMPT, "extra": 1}, "unknown key(s) ['extra']"),
    ({**GOOD_CHAT, "id": 7}, "unknown key(s) ['id']"),
    ({"prompt": "a"}, "without 'completion'"),
    ({"completion": "a"}, "without 'prompt'"),
    ({"prompt": 1, "completion": "b"}, "'prompt' must be a string, got a number"),
    ({"prompt": "a", "completion": None}, "'completion' must be a string, got null"),
    ({"messages": []}, "'messages' must be a non-empty array"),
    ({"messages": "hi"}, "'messages' must be a non-empty array"),
    ({"messages": ["hi"]}, "messages[0] must be an object, got a string"),
    ({"messages": [_W, {"content": "x"}]}, "messages[1] has no 'role'"),
    ({"messages": [{"role": "user"}]}, "messages[0] has no 'content'"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "unknown role 'tool'"),
    ({"messages": [{"role": 3, "content": "x"}]}, "'role' must be a string"),
    ({"messages": [{"role": "user", "content": None}]}, "'content' must be a string"),
    ({"messages": [{"role": "user", "content": "x", "name": "a"}]}, "unknown key(s) ['name']"),
    ({"messages": [{**_W, "weight": 1}]}, "'weight' is only allowed on assistant messages"),
    ({"messages": [_W, {"role": "assistant", "content": "y", "weight": 2}]}, "got 2"),
    ({"messages": [_W, {"role": "assistant", "content": "y", "weight": True}]}, "got true"),
    ({"messages": [_W, {"role": "assistant", "content": "y", "weight": 1.0}]}, "got 1.0"),
    ({"messages": [_W, {"role": "assistant", "content": "y", "weight": "1"}]}, 'got "1"'),
    ({"messages": [{"role": "system", "content": "s"}, _W]}, "no assistant turn"),
    (
        {"messages": [_W, {"role": "assistant", "content": "y", "weight": 0}, _W]},
        "nothing to train: every assistant turn has weight 0",
    ),
    (
        {"messages": [{"role": "assistant", "content": "y"}, _W]},
        "messages[0] is an assistant turn with weight 1",
    ),
]


@pytest.mark.parametrize("bad, reason", BAD_LINES)
def test_first_bad_line_is_refused_with_its_number(tmp_path, tok, bad, reason):
    path = _write(tmp_path, [GOOD_PROMPT, GOOD_CHAT, bad, "also not json"])
    with pytest.raises(DataError) as info:
        load_examples(path, tok)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.line == 3 and reason in err.reason, err.reason
    assert str(err) == f"{path}:3: {err.reason}"


def test_blank_lines_count_in_line_numbers_and_utf8(tmp_path, tok):
    path = _write(tmp_path, [GOOD_PROMPT, "", "{"])
    with pytest.raises(DataError, match=r":3: not JSON") as info:
        load_examples(path, tok)
    assert info.value.line == 3
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD_PROMPT).encode() + b"\n" + b'{"prompt": "\xe9"}\n')
    with pytest.raises(DataError, match=r":2: not UTF-8"):
        load_examples(path, tok)


@pytest.mark.parametrize("text", ["", "\n \n\n"])
def test_empty_file_is_an_error(tmp_path, tok, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match="no examples") as info:
        load_examples(path, tok)
    assert info.value.line == 0
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.path, copy.line, copy.reason, str(copy)) == (
        info.value.path, 0, info.value.reason, str(info.value),
    )  # fmt: skip


def test_max_seq_len_refuses_long_lines(tmp_path, tok):
    path = _write(tmp_path, [GOOD_PROMPT, GOOD_CHAT])
    short, n = (len(e.input_ids) for e in load_examples(path, tok))
    assert short < n - 1
    assert [len(e.input_ids) for e in load_examples(path, tok, max_seq_len=n)][1] == n
    with pytest.raises(DataError) as info:
        load_examples(path, tok, max_seq_len=n - 1)
    assert info.value.line == 2
    assert f"{n} tokens" in info.value.reason and f"max_seq_len {n - 1}" in info.value.reason
    assert "refused, not truncated" in info.value.reason
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
            load_examples(path, tok, max_seq_len=bad)


def test_tokenizer_requirements(tmp_path, tok):
    path = _write(tmp_path, [GOOD_CHAT, GOOD_PROMPT])
    with pytest.raises(DataError, match=r":2: the tokenizer has no eos_token_id"):
        load_examples(path, _Proxy(tok, eos_token_id=None))
    with pytest.raises(DataError, match=r":1: the tokenizer has no chat template"):
        load_examples(path, _Proxy(tok, chat_template=None))
    # Without a BOS, an empty prompt and completion leave nothing before the EOS.
    path = _write(tmp_path, [GOOD_PROMPT, {"prompt": "", "completion": ""}])
    with pytest.raises(DataError, match=r":2: prompt and completion give no tokens"):
        load_examples(path, _NoSpecialTokens(tok))
    # Without a BOS, the completion's first token sits at position 0: it is not trained.
    path = _write(tmp_path, [{"prompt": "", "completion": "Hi"}])
    (ex,) = load_examples(path, _NoSpecialTokens(tok))
    hi = _enc(tok, "Hi")
    assert ex.input_ids == [*hi, tok.eos_token_id] and ex.labels[0] == -100
    assert ex.labels[1:] == ex.input_ids[1:] and ex.num_trained == len(hi)


def test_chat_template_must_be_prefix_stable(tmp_path, tok_dir):
    other = _load_tokenizer(tok_dir)
    path = _write(tmp_path, [GOOD_PROMPT, GOOD_CHAT])
    # The message count up front changes every earlier token when a turn is added.
    other.chat_template = (
        "{{ messages | length }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(DataError, match=r":2: the chat template is not prefix-stable at messages"):
        load_examples(path, other)
    other.chat_template = "{{ raise_exception('no chats here') }}"
    with pytest.raises(DataError, match=r":2: the chat template failed: .*no chats here"):
        load_examples(path, other)
    # No BOS and an empty generation prompt: the assistant's only token is at position 0.
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = _write(
        tmp_path, [{"messages": [{**_W, "content": ""}, {"role": "assistant", "content": "</s>"}]}]
    )
    with pytest.raises(DataError, match=r":1: nothing to train: the only trained token"):
        load_examples(path, other)
    # An assistant turn that renders to no tokens trains nothing either.
    path = _write(tmp_path, [{"messages": [_W, {"role": "assistant", "content": ""}]}])
    with pytest.raises(DataError, match=r":1: nothing to train: the weight-1 assistant turns"):
        load_examples(path, other)


def test_example_contract():
    ex = Example(input_ids=[5, 6, 7, 8], labels=[5, -100, 7, 8], line=1)
    assert ex.num_trained == 2  # position 0 never counts
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        Example(input_ids=[1, 2, 3], labels=[1, 2], line=4)


def test_optimizer_steps_group_batches_within_epochs():
    steps = optimizer_steps(7, batch_size=2, grad_accum=3, epochs=2, shuffle=False, seed=0)
    epoch = [[[0, 1], [2, 3], [4, 5]], [[6]]]  # partial batch; partial group ends the epoch
    assert steps == epoch + epoch
    steps = optimizer_steps(5, batch_size=2, grad_accum=2, epochs=1, shuffle=False, seed=0)
    assert steps == [[[0, 1], [2, 3]], [[4]]]
    steps = optimizer_steps(3, batch_size=8, grad_accum=4, epochs=3, shuffle=False, seed=0)
    assert steps == [[[0, 1, 2]]] * 3
    steps = optimizer_steps(4, batch_size=1, grad_accum=1, epochs=1, shuffle=False, seed=0)
    assert steps == [[[0]], [[1]], [[2]], [[3]]]


def test_shuffle_is_seeded_per_epoch():
    n = 20
    kwargs = dict(batch_size=3, grad_accum=2, epochs=3, shuffle=True)
    steps = optimizer_steps(n, seed=7, **kwargs)
    assert steps == optimizer_steps(n, seed=7, **kwargs)  # deterministic
    assert steps != optimizer_steps(n, seed=8, **kwargs)
    assert len(steps) == 3 * 4  # 7 batches per epoch (the last of 2) -> 4 steps per epoch
    orders = []
    for e in range(3):
        flat = [i for step in steps[4 * e : 4 * (e + 1)] for batch in step for i in batch]
        assert sorted(flat) == list(range(n))  # each epoch sees every example once
        gen = torch.Generator().manual_seed(7 + e)
        assert flat == torch.randperm(n, generator=gen).tolist() == epoch_order(n, e, True, 7)
        orders.append(flat)
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert epoch_order(n, 1, True, seed=5) == epoch_order(n, 0, True, seed=6)
    assert epoch_order(n, 2, False, seed=5) == list(range(n))


@pytest.mark.parametrize("field", ["num_examples", "batch_size", "grad_accum", "epochs"])
@pytest.mark.parametrize("value", [0, -1])
def test_optimizer_steps_refuses_non_positive_sizes(field, value):
    kwargs = dict(num_examples=4, batch_size=2, grad_accum=1, epochs=1, shuffle=False, seed=0)
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"{field} must be a positive int"):
        optimizer_steps(**kwargs)


def test_pad_batch():
    a = Example(input_ids=[1, 10, 11], labels=[-100, 10, 11], line=1)
    b = Example(input_ids=[1, 20, 21, 22, 23], labels=[-100, -100, -100, 22, 23], line=2)
    ids, mask, labels = pad_batch([a, b], pad_id=3)
    assert ids.shape == mask.shape == labels.shape == (2, 5)
    assert ids.dtype == mask.dtype == labels.dtype == torch.long
    assert ids.tolist() == [[1, 10, 11, 3, 3], [1, 20, 21, 22, 23]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert labels.tolist() == [[-100, 10, 11, -100, -100], [-100, -100, -100, 22, 23]]
    ids, mask, labels = pad_batch([a], pad_id=0)
    assert ids.tolist() == [[1, 10, 11]] and mask.tolist() == [[1, 1, 1]]
    with pytest.raises(ValueError, match="at least one example"):
        pad_batch([], pad_id=0)

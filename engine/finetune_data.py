"""Fine-tuning data (`loraplex finetune --train FILE.jsonl ...`): JSONL -> labelled examples,
epoch orders, optimizer steps and padded batches. A PEFT reference must reproduce every rule.

File (`load_examples`): UTF-8 (a BOM on line 1 is ignored); lines split on "\\n" and numbered
from 1; blank lines (whitespace only) are skipped but counted. Every other line is one JSON
object in one of two formats, decided per line by its keys, and gives one `Example` (`line` =
its 1-based number); examples keep the file's order. The FIRST bad line raises `DataError`
("PATH:LINE: reason") and nothing is returned, so nothing is trained on a bad file. A file
with no example at all is a `DataError` with line 0.

1. Prompt/completion: keys exactly {"prompt", "completion"}, both strings.
   input_ids = tokenizer(prompt)["input_ids"] (the tokenizer's default special tokens, e.g.
   BOS) + tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos_token_id].
   Trained: the completion tokens and the EOS. Bad when the prompt and completion tokens
   together are empty (only the EOS would remain), or the tokenizer has no eos_token_id.
   An empty completion is accepted: only the EOS is trained.
2. Chat (OpenAI chat fine-tuning format): keys exactly {"messages"}; a non-empty list of
   objects with keys "role" ("system", "user" or "assistant"), "content" (a string) and, on
   assistant messages only, optional "weight": the JSON integer 0 or 1 (not true/false, not
   1.0), default 1. No other message keys (e.g. "name", "tool_calls") are accepted.
   At least one assistant message ("no assistant turn"), at least one with weight 1
   ("nothing to train"); messages[0] may be an assistant turn only with weight 0 (its span
   would need the template of an empty conversation, which transformers refuses); the
   tokenizer must have a chat template.
   input_ids = T(messages), where T(m, gen) = tokenizer.apply_chat_template(m, tokenize=True,
   add_generation_prompt=gen) on the messages without "weight" (a dict/BatchEncoding result
   gives its "input_ids"). For assistant message i with weight 1: P = T(messages[:i], True),
   Q = T(messages[:i+1], False); positions len(P) .. len(Q)-1 are trained (everything the
   template emits for that turn after the generation prompt, its EOS/end-of-turn marker
   included; make_checkpoint's template gives content + "</s>" + "\n", all three trained).
   P must be a token prefix of Q and Q one of T(messages) (the template is
   prefix-stable), else the line is bad. A template that raises makes the line bad.
   A line's structure is checked in full before the tokenizer is asked anything.

Labels (both formats): the same length as input_ids, the token id where trained, -100
elsewhere (HF convention: the loss shifts, logits at t predict labels at t+1). Position 0 has
no logits before it, so it is never trained (-100); a line left with no trained token is bad
("nothing to train"). With `max_seq_len`, a line of more than max_seq_len tokens is refused
(a `DataError` naming both lengths), never truncated.

Batching: `epoch_order` gives each epoch's order (file order, or `torch.randperm` seeded with
seed + epoch); `optimizer_steps` cuts each epoch's order into batches of `batch_size` (the last
may be shorter) and every `grad_accum` consecutive batches of one epoch into one optimizer step
(the last group of an epoch may be shorter; groups never span epochs). `pad_batch` right-pads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_PROMPT_KEYS = frozenset({"prompt", "completion"})
_CHAT_KEYS = frozenset({"messages"})
_MESSAGE_KEYS = frozenset({"role", "content", "weight"})


class DataError(ValueError):
    """A bad line in a fine-tuning file: `.path`, `.line` (1-based; 0 = the file as a whole) and
    `.reason`; the message is "PATH:LINE: reason"."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason

    def __reduce__(self):  # picklable (the default would call __init__ with the message only)
        return (type(self), (self.path, self.line, self.reason))


class _LineError(Exception):
    """Raised inside the parsers; `load_examples` adds the path and line number."""


@dataclass(frozen=True)
class Example:
    """One training sequence: `labels[t]` is `input_ids[t]` where trained, else -100."""

    input_ids: list[int]
    labels: list[int]
    line: int

    def __post_init__(self):
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"line {self.line}: {len(self.input_ids)} input_ids but {len(self.labels)} labels"
            )

    @property
    def num_trained(self) -> int:
        """Tokens that contribute to the loss: labels != -100 at positions >= 1."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def load_examples(path, tokenizer, *, max_seq_len: int | None = None) -> list[Example]:
    """Read every line of the JSONL file `path` into `Example`s (rules: module docstring).

    Raises `DataError` on the first bad line (or an empty file), `OSError` if it cannot be read,
    `ValueError` for a `max_seq_len` that is not a positive int.
    """
    if max_seq_len is not None and (
        isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1
    ):
        raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
    name = str(path)
    examples: list[Example] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(name, number, f"not UTF-8 ({exc.reason})") from None
            if not text.strip():
                continue
            try:
                example = _parse_line(text, number, tokenizer)
                n = len(example.input_ids)
                if max_seq_len is not None and n > max_seq_len:
                    raise _LineError(
                        f"{n} tokens, longer than max_seq_len {max_seq_len} "
                        "(lines are refused, not truncated)"
                    )
            except _LineError as exc:
                raise DataError(name, number, str(exc)) from exc.__cause__
            examples.append(example)
    if not examples:
        raise DataError(name, 0, "no examples: the file has no non-blank line")
    logger.info(
        "loaded %d examples from %s (%d tokens, %d trained)",
        len(examples),
        name,
        sum(len(e.input_ids) for e in examples),
        sum(e.num_trained for e in examples),
    )
    return examples


def _parse_line(text: str, number: int, tokenizer) -> Example:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _LineError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    if "\\u" in text:  # JSON may escape a lone surrogate, which is not text a tokenizer takes
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _LineError("a string holds a lone surrogate (a \\ud800-\\udfff escape)") from None
    if not isinstance(obj, dict):
        raise _LineError(f"not a JSON object but {_json_type(obj)}")
    keys = set(obj)
    if keys & _PROMPT_KEYS and keys & _CHAT_KEYS:
        raise _LineError("has keys of both formats ('prompt'/'completion' and 'messages'); use one")
    if not keys & (_PROMPT_KEYS | _CHAT_KEYS):
        raise _LineError(
            "neither format: expected keys 'prompt' and 'completion', or 'messages'; "
            f"got {sorted(keys)}"
        )
    allowed = _PROMPT_KEYS if keys & _PROMPT_KEYS else _CHAT_KEYS
    unknown = keys - allowed
    if unknown:
        raise _LineError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    if allowed is _PROMPT_KEYS:
        input_ids, labels = _prompt_completion(obj, tokenizer)
    else:
        input_ids, labels = _chat(obj["messages"], tokenizer)
    if not input_ids:
        raise _LineError("no tokens")
    first_trained = labels[0] != IGNORE_INDEX
    labels[0] = IGNORE_INDEX  # nothing predicts position 0
    example = Example(input_ids=input_ids, labels=labels, line=number)
    if example.num_trained == 0:
        if first_trained:
            raise _LineError(
                "nothing to train: the only trained token is at position 0, "
                "where no earlier token predicts it"
            )
        raise _LineError("nothing to train: the weight-1 assistant turns give no tokens")
    return example


def _json_type(value) -> str:
    """The JSON type of a parsed value, with its article: "an array", "a string", ..."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return "null" if value is None else names.get(type(value), "a number")


def _prompt_completion(obj: dict, tokenizer) -> tuple[list[int], list[int]]:
    for key in ("prompt", "completion"):
        if key not in obj:
            raise _LineError(f"prompt/completion format without '{key}'")
        if not isinstance(obj[key], str):
            raise _LineError(f"'{key}' must be a string, got {_json_type(obj[key])}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise _LineError("the tokenizer has no eos_token_id (needed after the completion)")
    prompt = [int(t) for t in tokenizer(obj["prompt"])["input_ids"]]
    completion = [
        int(t) for t in tokenizer(obj["completion"], add_special_tokens=False)["input_ids"]
    ]
    if not prompt and not completion:
        raise _LineError("prompt and completion give no tokens")
    input_ids = prompt + completion + [int(eos)]
    labels = [IGNORE_INDEX] * len(prompt) + completion + [int(eos)]
    return input_ids, labels


def _check_messages(messages) -> tuple[list[dict], list[int]]:
    """Validate; return (messages without "weight", weight per message: 1 for non-assistant)."""
    if not isinstance(messages, list) or not messages:
        raise _LineError("'messages' must be a non-empty array")
    plain, weights = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _LineError(f"{where} must be an object, got {_json_type(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise _LineError(f"{where} has no '{key}'")
        unknown = set(m) - _MESSAGE_KEYS
        if unknown:
            raise _LineError(f"{where} has unknown key(s) {sorted(unknown)}")
        role, content = m["role"], m["content"]
        if not isinstance(role, str):
            raise _LineError(f"{where}: 'role' must be a string, got {_json_type(role)}")
        if role not in ROLES:
            raise _LineError(f"{where} has unknown role {role!r}; roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _LineError(f"{where}: 'content' must be a string, got {_json_type(content)}")
        weight = m.get("weight", 1)
        if "weight" in m and role != "assistant":
            raise _LineError(f"{where}: 'weight' is only allowed on assistant messages, not {role}")
        if type(weight) is not int or weight not in (0, 1):
            raise _LineError(f"{where}: 'weight' must be 0 or 1, got {json.dumps(weight)}")
        plain.append({"role": role, "content": content})
        weights.append(weight)
    assistants = [i for i, m in enumerate(plain) if m["role"] == "assistant"]
    if not assistants:
        raise _LineError("no assistant turn")
    if all(weights[i] == 0 for i in assistants):
        raise _LineError("nothing to train: every assistant turn has weight 0")
    if assistants[0] == 0 and weights[0] == 1:
        raise _LineError(
            "messages[0] is an assistant turn with weight 1: its generation prompt cannot be "
            "rendered from an empty conversation; start with a system or user message, or give "
            "it weight 0"
        )
    return plain, weights


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja errors, raise_exception(...) in the template
        raise _LineError(f"the chat template failed: {exc}") from exc
    if isinstance(out, Mapping):  # transformers 5: a BatchEncoding
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    return [int(t) for t in out]


def _chat(messages, tokenizer) -> tuple[list[int], list[int]]:
    plain, weights = _check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise _LineError("the tokenizer has no chat template (needed for 'messages')")
    input_ids = _render(tokenizer, plain, False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, m in enumerate(plain):
        if m["role"] != "assistant" or weights[i] == 0:
            continue
        p = _render(tokenizer, plain[:i], True)
        q = _render(tokenizer, plain[: i + 1], False)
        if q[: len(p)] != p or input_ids[: len(q)] != q:
            raise _LineError(
                f"the chat template is not prefix-stable at messages[{i}]: the tokens up to "
                "its generation prompt are not a prefix of the tokens with the turn, or those "
                "not a prefix of the whole conversation's"
            )
        labels[len(p) : len(q)] = input_ids[len(p) : len(q)]
    return input_ids, labels


def epoch_order(num_examples: int, epoch: int, shuffle: bool, seed: int) -> list[int]:
    """Example indices in the order of `epoch` (0-based): file order, or with `shuffle`
    `torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))`."""
    if not shuffle:
        return list(range(num_examples))
    gen = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_examples, generator=gen).tolist()


def optimizer_steps(
    num_examples: int, *, batch_size: int, grad_accum: int, epochs: int, shuffle: bool, seed: int
) -> list[list[list[int]]]:
    """Per optimizer step, its batches (lists of example indices), over all epochs in order.

    Each epoch's order (`epoch_order`) is cut into batches of `batch_size` consecutive examples
    (the last may be shorter); every `grad_accum` consecutive batches of one epoch form a step
    (the last group of an epoch may be shorter; no step spans two epochs). ValueError for a
    non-positive num_examples, batch_size, grad_accum or epochs.
    """
    sizes = dict(
        num_examples=num_examples, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs
    )
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    steps = []
    for epoch in range(epochs):
        order = epoch_order(num_examples, epoch, shuffle, seed)
        batches = [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]
        steps += [batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum)]
    return steps


def pad_batch(
    examples: list[Example], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each int64 [B, L] with L the longest example,
    right-padded: pad positions hold `pad_id`, mask 0 and label -100. ValueError if empty."""
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    shape = (len(examples), width)
    input_ids = torch.full(shape, int(pad_id), dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
    return input_ids, mask, labels

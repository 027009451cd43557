"""The trained demo's tokenizer: one token per character, and a chat template that turns a user
message into the demo's completion prompt.

Contracts:
- Vocabulary: the special tokens `<unk>` `<s>` `</s>` `<pad>` (ids 0-3), then every character
  U+0000..U+00FF (Latin-1, so all of ASCII) at id `4 + ord(c)`: 260 tokens. Every id below 256
  is a real token (load generators that draw prompt ids from [4, 256) stay valid); any other
  character encodes as `<unk>`, one per character. Decoding concatenates the characters (no
  spaces inserted, none cleaned up).
- `tokenizer(text)` prepends `<s>`; `<s>`, `</s>`, `<pad>` and `<unk>` written in a text are
  the special tokens.
- Chat template (`CHAT_TEMPLATE`): `<s>`, then per message: user -> content.strip() + " ->";
  assistant -> " " + content.strip() + "</s>"; system -> content.strip() + "\\n" (the demo never
  saw one); any other role raises. The generation prompt adds nothing. So the user message
  "hello world" renders exactly as the completion prompt "hello world ->" does, and the
  template is prefix-stable (engine/finetune_data.py trains the assistant span " ...</s>").
- Loadable with `transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)`.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
NUM_CHARS = 256  # U+0000..U+00FF

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] | trim + ' ->' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] | trim + '\n' }}"
    "{% else %}{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
)


def char_id(c: str) -> int:
    """The token id of one character (`<unk>`'s, 0, outside Latin-1)."""
    return 4 + ord(c) if ord(c) < NUM_CHARS else 0


def build_char_tokenizer(out_dir) -> None:
    """Write the character tokenizer (module docstring) as HF fast tokenizer files into
    `out_dir` (created if missing). Deterministic: the same files every time."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({chr(i): char_id(chr(i)) for i in range(NUM_CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    save_fast_tokenizer(tok, out_dir, CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def save_fast_tokenizer(tok, out_dir, chat_template: str, **extra) -> None:
    """Save a `tokenizers.Tokenizer` with SPECIAL_TOKENS as HF fast tokenizer files in `out_dir`
    (created if missing): encoding with special tokens prepends "<s>"; `extra` goes to
    PreTrainedTokenizerFast. Shared by the demo's character tokenizer and the test BPE one."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", chat_template=chat_template, model_max_length=2048, **extra,
    )  # fmt: skip
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))

"""Incremental detokenization and stop strings matched across token boundaries.

`IncrementalDetokenizer.push(ids)` returns only the new text: it decodes a small window of
recent tokens (the offset method of HF's TextStreamer / vLLM), so the cost per token does not
grow with the output length, and it holds back text that ends in an incomplete UTF-8 sequence
(decoded as U+FFFD) until the next token completes it. `flush()` releases whatever is held.
The concatenation of all pieces equals `tokenizer.decode(all_ids, skip_special_tokens=True)`
for tokenizers whose decoding is local (byte-level BPE, SentencePiece with the prompt tail as
context).

`StopMatcher.feed(text)` returns the text that is safe to release: the part before the first
stop string (then `stopped` is True and everything after is dropped), minus any suffix that
could still be the beginning of a stop string (held back until disambiguated). `flush()`
releases the held suffix when the output ends for another reason.
"""

from __future__ import annotations

PROMPT_CONTEXT = 5  # prompt tokens decoded as left context (SentencePiece leading spaces)


def fast_decoder(tokenizer):
    """`decode(ids) -> str` skipping special tokens. For HF fast tokenizers that do not clean
    up spaces, the Rust backend is called directly (the Python wrapper costs ~4x more per call);
    otherwise `tokenizer.decode` (same text either way)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], decode=None) -> None:
        """`decode`: a `fast_decoder(tokenizer)` to share between streams (built if None)."""
        self._decode_ids = decode or fast_decoder(tokenizer)
        self._ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self._prefix = 0  # window start: text before it has been released
        self._read = len(self._ids)  # tokens up to here are released
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids) if ids else ""

    def push(self, ids: list[int]) -> str:
        """Append generated token ids; return the newly completed text ("" if none yet)."""
        self._ids.extend(ids)
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(self._prefix_text) and not text.endswith("\ufffd"):
            new = text[len(self._prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
            self._trim()
            return new
        return ""

    def flush(self) -> str:
        """Release held text (incomplete characters included) at the end of the output."""
        text = self._decode(self._ids[self._prefix :])
        new = text[len(self._prefix_text) :]
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        return new

    def _trim(self) -> None:
        if self._prefix > 64:  # keep the id list short on long outputs
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """New text in; the text that may be released out (see the module docstring)."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best


class TextStream:
    """One choice's text: detokenizer then stop matcher. `push` returns releasable text and
    sets `stopped` when a stop string ended the output; `finish` flushes both stages."""

    def __init__(self, tokenizer, prompt_ids: list[int], stops: list[str], decode=None) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, decode)
        self._stop = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def push(self, ids: list[int]) -> str:
        return self._stop.feed(self._detok.push(ids))

    def finish(self) -> str:
        return self._stop.feed(self._detok.flush()) + self._stop.flush()

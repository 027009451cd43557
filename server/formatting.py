"""OpenAI response bodies for completions and chat completions (whole answers and SSE chunks).

Completions: `text_completion` objects, `logprobs` as {tokens, token_logprobs, top_logprobs,
text_offset}. Chat: `chat.completion` / `chat.completion.chunk`, the first chunk of each choice
carries `delta.role`, `logprobs.content` as [{token, logprob, bytes, top_logprobs}]. `usage` is
in every whole answer; streamed, it comes in a last chunk with `choices: []` when
`stream_options.include_usage` is set (and `usage: null` in the other chunks).
"""

from __future__ import annotations

import json

from loraplex.server.generation import Choice, Delta, Generation


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class _Format:
    object_name = ""
    chunk_name = ""

    def __init__(self, gen: Generation, model: str, logprobs: bool, include_usage: bool) -> None:
        self.gen = gen
        self.ctx = gen.ctx
        self.model = model
        self.logprobs = logprobs
        self.include_usage = include_usage

    def usage(self) -> dict:
        p, c = self.gen.num_prompt_tokens, self.gen.num_completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _envelope(self, name: str, choices: list) -> dict:
        return {
            "id": self.gen.id,
            "object": name,
            "created": self.gen.created,
            "model": self.model,
            "choices": choices,
        }

    def head(self) -> list[dict]:
        return []

    def chunk(self, deltas: list[Delta]) -> dict:
        body = self._envelope(self.chunk_name, [self._chunk_choice(d) for d in deltas])
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self) -> dict:
        body = self._envelope(self.chunk_name, [])
        body["usage"] = self.usage()
        return body

    def full(self) -> dict:
        body = self._envelope(self.object_name, [self._full_choice(c) for c in self.gen.choices])
        body["usage"] = self.usage()
        return body

    def _chunk_choice(self, d: Delta) -> dict:
        raise NotImplementedError

    def _full_choice(self, c: Choice) -> dict:
        raise NotImplementedError


class CompletionFormat(_Format):
    object_name = chunk_name = "text_completion"

    def _logprobs(self, c: Choice, start: int, end: int, offset: int) -> dict | None:
        if not self.logprobs:
            return None
        tt = self.ctx.token_text
        tokens = [tt(t) for t in c.token_ids[start:end]]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": c.logprobs[start:end],
            "top_logprobs": [{tt(i): lp for i, lp in top} for top in c.top_logprobs[start:end]],
            "text_offset": offsets,
        }

    def _chunk_choice(self, d: Delta) -> dict:
        c = d.choice
        return {
            "index": c.index,
            "text": d.text,
            "logprobs": self._logprobs(c, d.start, d.end, d.offset),
            "finish_reason": d.finish_reason,
        }

    def _full_choice(self, c: Choice) -> dict:
        return {
            "index": c.index,
            "text": "".join(c.output_text),
            "logprobs": self._logprobs(c, 0, len(c.token_ids), 0),
            "finish_reason": c.finish_reason,
        }


class ChatFormat(_Format):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.ctx.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _logprobs(self, c: Choice, start: int, end: int) -> dict | None:
        if not self.logprobs:
            return None
        content = []
        for t, lp, top in zip(
            c.token_ids[start:end], c.logprobs[start:end], c.top_logprobs[start:end], strict=True
        ):
            entry = self._entry(t, lp)
            entry["top_logprobs"] = [self._entry(i, v) for i, v in top]
            content.append(entry)
        return {"content": content}

    def head(self) -> list[dict]:
        choices = [
            {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}
            for c in self.gen.choices
        ]  # fmt: skip
        body = self._envelope(self.chunk_name, choices)
        if self.include_usage:
            body["usage"] = None
        return [body]

    def _chunk_choice(self, d: Delta) -> dict:
        return {
            "index": d.choice.index,
            "delta": {"content": d.text} if d.text or d.finish_reason is None else {},
            "logprobs": self._logprobs(d.choice, d.start, d.end),
            "finish_reason": d.finish_reason,
        }

    def _full_choice(self, c: Choice) -> dict:
        return {
            "index": c.index,
            "message": {"role": "assistant", "content": "".join(c.output_text)},
            "logprobs": self._logprobs(c, 0, len(c.token_ids)),
            "finish_reason": c.finish_reason,
        }

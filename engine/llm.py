"""`LLM`: the offline Python API. `LLM(model=DIR, adapters={...}).generate(prompts, params)`;
`adapter_dir=DIR` registers every adapter folder under DIR (named after its folder)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.scheduler.sequence import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str
    adapter: str | None
    num_preemptions: int


class LLM:
    """Offline batch generation. Keyword arguments are `EngineConfig` fields; `adapters` maps
    adapter names to PEFT directories; `adapter_dir` is a directory of adapter folders, each
    registered under its folder's name (bad ones skipped with a warning)."""

    def __init__(
        self,
        model: str | None = None,
        adapters: dict[str, str] | None = None,
        adapter_dir: str | None = None,
        **kw,
    ):
        names = {f.name for f in fields(EngineConfig)}
        unknown = set(kw) - names
        if unknown:
            raise TypeError(f"unknown LLM options {sorted(unknown)}; valid: {sorted(names)}")
        self.engine = Engine(EngineConfig(model=model, **kw), adapters, adapter_dir)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: list[str | list[int]] | str,
        params: SamplingParams | list[SamplingParams] | None = None,
        adapters: list[str | None] | str | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts to completion (continuous batching) and return outputs in order.
        `adapters` is one name for all prompts or one name (None = base model) per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        n = len(prompts)
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * n
        alist = adapters if isinstance(adapters, list) else [adapters] * n
        if len(plist) != n or len(alist) != n:
            raise ValueError(f"{n} prompts but {len(plist)} params and {len(alist)} adapters")
        seqs = []
        try:
            for prompt, p, a in zip(prompts, plist, alist, strict=True):
                seqs.append(self.engine.add_request(f"llm-{next(self._ids)}", prompt, p, a))
        except Exception:
            for s in seqs:
                self.engine.abort(s.request_id)
            raise
        while any(not s.is_finished for s in seqs):
            self.engine.step()
        tok = self.engine.tokenizer
        return [
            RequestOutput(
                request_id=s.request_id,
                prompt_token_ids=s.token_ids[: s.num_prompt_tokens],
                token_ids=s.output_token_ids,
                text=tok.decode(s.output_token_ids, skip_special_tokens=True) if tok else None,
                logprobs=list(s.output_logprobs),
                top_logprobs=list(s.output_top_logprobs),
                finish_reason=s.finish_reason.value if s.finish_reason else "",
                adapter=s.adapter_id,
                num_preemptions=s.num_preemptions,
            )
            for s in seqs
        ]

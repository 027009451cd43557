"""Typed results of the loraplex API, parsed from its JSON answers.

Every class is a frozen dataclass built by its `from_dict(d)` classmethod, which reads the
fields the server sends (OpenAI's shapes plus loraplex's extensions) and tolerates extra ones.
Completions and chat completions carry `usage` (whole answers always; streamed, only in the
last chunk when `stream_options={"include_usage": True}` was asked for, else None).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _opt(cls, d: Any):
    return None if d is None else cls.from_dict(d)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_dict(cls, d: dict) -> Usage:
        p, c = int(d.get("prompt_tokens", 0)), int(d.get("completion_tokens", 0))
        return cls(p, c, int(d.get("total_tokens", p + c)))


@dataclass(frozen=True)
class CompletionLogprobs:
    """`/v1/completions` log-probabilities: one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def from_dict(cls, d: dict) -> CompletionLogprobs:
        return cls(
            list(d.get("tokens") or []),
            list(d.get("token_logprobs") or []),
            [dict(t) for t in d.get("top_logprobs") or []],
            list(d.get("text_offset") or []),
        )


@dataclass(frozen=True)
class CompletionChoice:
    """A whole choice, or in a stream the piece of it that one chunk carries."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None

    @classmethod
    def from_dict(cls, d: dict) -> CompletionChoice:
        return cls(
            int(d.get("index", 0)),
            d.get("text") or "",
            d.get("finish_reason"),
            _opt(CompletionLogprobs, d.get("logprobs")),
        )


@dataclass(frozen=True)
class Completion:
    """A `text_completion` answer. `text` and `finish_reason`: the first choice's."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Completion:
        return cls(
            d.get("id", ""),
            int(d.get("created", 0)),
            d.get("model", ""),
            [CompletionChoice.from_dict(c) for c in d.get("choices") or []],
            _opt(Usage, d.get("usage")),
        )

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


@dataclass(frozen=True)
class CompletionChunk(Completion):
    """One streamed `text_completion` chunk (the usage chunk has no choices)."""


@dataclass(frozen=True)
class TokenLogprob:
    """Chat log-probability of one token, with its `top_logprobs` alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TokenLogprob] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> TokenLogprob:
        return cls(
            d.get("token", ""),
            float(d.get("logprob", 0.0)),
            d.get("bytes"),
            [TokenLogprob.from_dict(t) for t in d.get("top_logprobs") or []],
        )


def _chat_logprobs(d: dict | None) -> list[TokenLogprob] | None:
    if d is None:
        return None
    return [TokenLogprob.from_dict(t) for t in d.get("content") or []]


@dataclass(frozen=True)
class ChatMessage:
    """A chat message; also accepted as input by `chat(...)` beside plain dicts."""

    role: str
    content: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> ChatMessage:
        return cls(d.get("role", "assistant"), d.get("content"))


@dataclass(frozen=True)
class ChatChoice:
    index: int
    message: ChatMessage
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # `logprobs.content` when asked for

    @classmethod
    def from_dict(cls, d: dict) -> ChatChoice:
        return cls(
            int(d.get("index", 0)),
            ChatMessage.from_dict(d.get("message") or {}),
            d.get("finish_reason"),
            _chat_logprobs(d.get("logprobs")),
        )


@dataclass(frozen=True)
class ChatCompletion:
    """A `chat.completion` answer. `text` and `finish_reason`: the first choice's."""

    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None

    @classmethod
    def from_dict(cls, d: dict) -> ChatCompletion:
        return cls(
            d.get("id", ""),
            int(d.get("created", 0)),
            d.get("model", ""),
            [ChatChoice.from_dict(c) for c in d.get("choices") or []],
            _opt(Usage, d.get("usage")),
        )

    @property
    def text(self) -> str:
        return (self.choices[0].message.content or "") if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


@dataclass(frozen=True)
class ChatDelta:
    """What one chunk adds to a choice: `role` in the first chunk, then `content` pieces."""

    role: str | None = None
    content: str | None = None


@dataclass(frozen=True)
class ChatChunkChoice:
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> ChatChunkChoice:
        delta = d.get("delta") or {}
        return cls(
            int(d.get("index", 0)),
            ChatDelta(delta.get("role"), delta.get("content")),
            d.get("finish_reason"),
            _chat_logprobs(d.get("logprobs")),
        )


@dataclass(frozen=True)
class ChatCompletionChunk:
    """One streamed `chat.completion.chunk`. `text`: the first choice's new content."""

    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None

    @classmethod
    def from_dict(cls, d: dict) -> ChatCompletionChunk:
        return cls(
            d.get("id", ""),
            int(d.get("created", 0)),
            d.get("model", ""),
            [ChatChunkChoice.from_dict(c) for c in d.get("choices") or []],
            _opt(Usage, d.get("usage")),
        )

    @property
    def text(self) -> str:
        return (self.choices[0].delta.content or "") if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


@dataclass(frozen=True)
class Model:
    """An entry of `/v1/models`: the base model (`parent` None) or an adapter on it."""

    id: str
    owned_by: str
    created: int = 0
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Model:
        return cls(
            d["id"],
            d.get("owned_by", ""),
            int(d.get("created", 0)),
            d.get("root"),
            d.get("parent"),
            d.get("max_model_len"),
        )

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter (`/v1/adapters`). `owner` None = shared with every tenant."""

    id: str
    owner: str | None
    shared: bool
    created: int
    load_id: int
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    pool_pages: int

    @classmethod
    def from_dict(cls, d: dict) -> AdapterInfo:
        return cls(
            d["id"],
            d.get("owner"),
            bool(d.get("shared", d.get("owner") is None)),
            int(d.get("created", 0)),
            int(d.get("load_id", 0)),
            int(d.get("rank", 0)),
            float(d.get("alpha", 0.0)),
            list(d.get("target_modules") or []),
            int(d.get("size_bytes", 0)),
            int(d.get("pool_pages", 0)),
        )


@dataclass(frozen=True)
class TenantUsage:
    """Requests and tokens counted for one tenant (`/v1/usage`)."""

    tenant: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @classmethod
    def from_dict(cls, d: dict) -> TenantUsage:
        return cls(
            d["tenant"],
            int(d.get("requests", 0)),
            int(d.get("prompt_tokens", 0)),
            int(d.get("completion_tokens", 0)),
        )

"""What every route needs: the async engine, tenants, adapter names, metrics, settings.

One `ServerContext` per app, stored as `app.state.ctx`. `resolve_model` maps an OpenAI `model`
field to the engine's adapter name for the calling tenant (None = base model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from loraplex.server.async_engine import AsyncEngine
from loraplex.server.config import ServerConfig
from loraplex.server.detokenize import fast_decoder
from loraplex.server.metrics import Metrics
from loraplex.server.protocol import APIError
from loraplex.server.rate_limits import RateLimits
from loraplex.server.tenants import AdapterNamespace, Tenant, Tenants


@dataclass
class ServerContext:
    aengine: AsyncEngine
    tenants: Tenants
    metrics: Metrics
    model_id: str  # the base model's public id
    adapter_root: str | None = None
    shutdown_grace_s: float = 30.0
    finetune: object = None  # server/finetune_service.py FinetuneService, when enabled
    config: ServerConfig = field(default_factory=ServerConfig)
    names: AdapterNamespace = field(default_factory=AdapterNamespace)
    created: int = field(default_factory=lambda: int(time.time()))
    _token_text: dict[int, str] = field(default_factory=dict)
    _decoder: object = None

    def __post_init__(self) -> None:
        self.rate_limits = RateLimits(
            {t.name: (t.requests_per_minute, t.tokens_per_minute)
             for t in self.tenants.by_name.values()}
        )  # fmt: skip

    @property
    def engine(self):
        """The Engine, for read-only facts fixed at start (tokenizer, spec, max_model_len).
        Its mutable state belongs to the engine thread."""
        return self.aengine.engine

    def decoder(self):
        """The shared `decode(ids)` for incremental detokenization. A model without a tokenizer
        (token-id prompts only) produces empty text; its tokens show in `logprobs`."""
        if self._decoder is None:
            tok = self.engine.tokenizer
            self._decoder = fast_decoder(tok) if tok is not None else (lambda ids: "")
        return self._decoder

    def token_text(self, token_id: int) -> str:
        """The text of one token (special tokens included), for log-probability listings."""
        text = self._token_text.get(token_id)
        if text is None:
            tok = self.engine.tokenizer
            text = tok.decode([token_id]) if tok is not None else f"<{token_id}>"
            self._token_text[token_id] = text
        return text

    def authenticate(self, request: Request) -> Tenant:
        tenant = self.tenants.authenticate(request.headers.get("authorization"))
        if tenant is None:
            self.metrics.count_request("unauthenticated", 401)
            raise APIError(
                401,
                "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        return tenant

    def resolve_model(self, tenant: Tenant, model: str) -> str | None:
        """`model` = the base model id, an adapter name, or "<base id>:<adapter>". Returns the
        engine adapter name (None = base model); 404 if the tenant cannot see it."""
        name = model
        base, sep, rest = model.partition(":")
        if sep and base == self.model_id:
            name = rest
        elif model == self.model_id:
            return None
        entry = self.names.resolve(tenant.name, name)
        if entry is None:
            raise APIError(
                404,
                f"The model '{model}' does not exist",
                param="model",
                code="model_not_found",
            )
        return entry.engine_name


def get_ctx(request: Request) -> ServerContext:
    return request.app.state.ctx

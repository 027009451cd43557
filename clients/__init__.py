"""Python clients for the loraplex server (HTTP only: imports nothing of the server's).

`LoraplexClient` / `AsyncLoraplexClient` (client.py), typed results (types.py), errors
(errors.py). `examples/openai_example.py` shows the official `openai` package against it.
"""

from clients.client import AsyncLoraplexClient, AsyncStream, LoraplexClient, Stream
from clients.errors import LoraplexConnectionError, LoraplexError
from clients.types import (
    AdapterInfo,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    Model,
    TenantUsage,
    TokenLogprob,
    Usage,
)

__all__ = [
    "AdapterInfo",
    "AsyncLoraplexClient",
    "AsyncStream",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatDelta",
    "ChatMessage",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "LoraplexClient",
    "LoraplexConnectionError",
    "LoraplexError",
    "Model",
    "Stream",
    "TenantUsage",
    "TokenLogprob",
    "Usage",
]

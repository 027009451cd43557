"""What the sync and async clients share: each API call as data (`Call`: method, path, body,
parser), turning an HTTP answer into a result or a `LoraplexError`, and SSE decoding.

No I/O here: `client.py` sends a `Call` with httpx (blocking or async) and hands the status
and body bytes (or, streamed, each line) back to it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

import httpx

from loraplex.clients.errors import (
    LoraplexConnectionError,
    LoraplexError,
    from_envelope,
    from_response,
)
from loraplex.clients.types import (
    AdapterInfo,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Completion,
    CompletionChunk,
    Model,
    TenantUsage,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "LORAPLEX_API_KEY"
Prompt = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]
Message = Mapping[str, Any] | ChatMessage


@dataclass(frozen=True)
class Call:
    """One API call. `parse` turns the decoded JSON answer (or, `text`, the body as text; or,
    streamed, each event's JSON) into the typed result."""

    method: str
    path: str
    parse: Callable[[Any], Any]
    json: dict | None = None
    params: dict | None = None
    text: bool = False

    def result(self, status: int, content: bytes) -> Any:
        """The typed result of a whole answer; LoraplexError for status >= 400."""
        if status >= 400:
            raise from_response(status, content)
        if self.text:
            return self.parse(content.decode("utf-8", "replace"))
        try:
            data = json.loads(content)
        except ValueError:
            msg = f"the answer to {self.method} {self.path} is not JSON: {content[:200]!r}"
            raise LoraplexError(status, "invalid_response", msg) from None
        return self.parse(data)


def settings(base_url: str | None, api_key: str | None, timeout, headers) -> dict:
    """httpx client arguments: base URL (a trailing "/v1" is dropped: routes carry it),
    `Authorization: Bearer` from `api_key` or $LORAPLEX_API_KEY (none if both are unset)."""
    url = (base_url or DEFAULT_BASE_URL).rstrip("/")
    url = url.removesuffix("/v1")
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    h = {"User-Agent": "loraplex-client", "Accept": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    return {"base_url": url, "headers": h, "timeout": timeout}


def transport_error(e: httpx.TransportError, base_url) -> LoraplexConnectionError:
    kind = "timeout" if isinstance(e, httpx.TimeoutException) else "connection_error"
    return LoraplexConnectionError(kind, f"{type(e).__name__} talking to {base_url}: {e}")


def _body(model: str, params: dict, stream: bool, **fields) -> dict:
    if "stream" in params:
        raise ValueError("do not pass 'stream': use the stream_* methods to stream")
    if stream:
        fields["stream"] = True
    return {"model": model, **fields, **params}


def _message(m: Message) -> dict:
    if isinstance(m, ChatMessage):
        return {k: v for k, v in asdict(m).items() if v is not None}
    if isinstance(m, Mapping):
        return dict(m)
    raise TypeError(f"a chat message must be a dict or ChatMessage, got {type(m).__name__}")


def _prompt(prompt: Prompt):
    if isinstance(prompt, str):
        return prompt
    return [p if isinstance(p, str | int) else list(p) for p in prompt]


def completions(model: str, prompt: Prompt, params: dict, stream: bool = False) -> Call:
    body = _body(model, params, stream, prompt=_prompt(prompt))
    parse = CompletionChunk.from_dict if stream else Completion.from_dict
    return Call("POST", "/v1/completions", parse, json=body)


def chat(model: str, messages: Sequence[Message], params: dict, stream: bool = False) -> Call:
    body = _body(model, params, stream, messages=[_message(m) for m in messages])
    parse = ChatCompletionChunk.from_dict if stream else ChatCompletion.from_dict
    return Call("POST", "/v1/chat/completions", parse, json=body)


def _data(cls) -> Callable[[dict], list]:
    return lambda d: [cls.from_dict(x) for x in d.get("data") or []]


def models() -> Call:
    return Call("GET", "/v1/models", _data(Model))


def list_adapters() -> Call:
    return Call("GET", "/v1/adapters", _data(AdapterInfo))


def load_adapter(name: str, path: str, owner: str | None) -> Call:
    body = {"name": name, "path": str(path)}
    if owner is not None:
        body["owner"] = owner
    return Call("POST", "/v1/adapters", AdapterInfo.from_dict, json=body)


def unload_adapter(name: str, owner: str | None) -> Call:
    params = {"owner": owner} if owner is not None else None
    return Call("DELETE", f"/v1/adapters/{quote(name, safe='')}", lambda d: None, params=params)


def health() -> Call:
    return Call("GET", "/health", lambda d: d.get("status") == "ok")


def metrics() -> Call:
    return Call("GET", "/metrics", str, text=True)


def usage() -> Call:
    return Call("GET", "/v1/usage", _data(TenantUsage))


class StreamReader:
    """Server-sent events -> typed chunks. Feed it the body's lines: `feed(line)` returns a
    chunk or None, raises LoraplexError for an error event; `done` turns True at `[DONE]`;
    `finish()` at the end of the body raises if `[DONE]` never came."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.done = False
        self._data: list[str] = []

    def feed(self, line: str) -> Any:
        if line:
            field, _, value = line.partition(":")
            if field == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
            return None  # comments (":..."), event/id/retry fields: nothing to do
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        if data.strip() == "[DONE]":
            self.done = True
            return None
        try:
            event = json.loads(data)
        except ValueError:
            msg = f"bad stream event: {data[:200]!r}"
            raise LoraplexError(200, "invalid_response", msg) from None
        if isinstance(event, dict) and "error" in event:
            raise from_envelope(None, event)
        return self.call.parse(event)

    def finish(self) -> None:
        """At the end of the body: LoraplexConnectionError unless `[DONE]` came."""
        if not self.done:
            self.feed("")  # a last event without its blank line
        if not self.done:
            raise LoraplexConnectionError(
                "incomplete_stream", f"the stream of {self.call.path} ended before [DONE]"
            )

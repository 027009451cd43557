"""`LoraplexClient` (blocking) and `AsyncLoraplexClient` (asyncio): a small typed client for
the loraplex server, over httpx.

    with LoraplexClient("http://127.0.0.1:8000", api_key="...") as c:
        out = c.completions("loraplex-demo", "hello world ->", max_tokens=16)  # " hello world"
        for chunk in c.stream_chat("demo-reverse", [{"role": "user", "content": "hello world"}]):
            print(chunk.text, end="")

Contracts:
- `model` is the base model's id, an adapter name or "<base>:<adapter>" (see `models()`).
  `**params` go into the JSON body as given (OpenAI's fields and loraplex's extensions such
  as `ignore_eos`, `top_k`, `min_tokens`); the server refuses unknown fields with a 400.
- Any error answer raises `LoraplexError(status, type, message, param, code)` from OpenAI's
  envelope; no answer (refused, timed out, cut stream) raises `LoraplexConnectionError`.
- Streams are lazy: the request goes out at the first chunk asked for. They end after
  `[DONE]`; closing one early (`close()`, leaving its `with` block, `break` + garbage
  collection) closes the HTTP response, and the server aborts the generation.
- `api_key` defaults to $LORAPLEX_API_KEY; `base_url` may end in "/v1" (as for OpenAI's
  client); `timeout` (seconds or an `httpx.Timeout`) applies to connecting and to each read,
  so a stream may run longer as long as chunks keep coming.
Both clients build every request and parse every answer with `calls.py`; only sending differs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Generic, TypeVar

import httpx

from loraplex.clients import calls
from loraplex.clients.calls import Call, Message, Prompt, StreamReader
from loraplex.clients.errors import LoraplexConnectionError, LoraplexError, from_response
from loraplex.clients.types import (
    AdapterInfo,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Model,
    TenantUsage,
)

# The public names: the clients, their streams, and the errors they raise.
__all__ = [
    "AsyncLoraplexClient",
    "AsyncStream",
    "LoraplexClient",
    "LoraplexConnectionError",
    "LoraplexError",
    "Stream",
]

T = TypeVar("T")
DEFAULT_TIMEOUT = 60.0


class Stream(Generic[T]):
    """Chunks of a streamed answer (an iterator and a context manager)."""

    def __init__(self, gen: Iterator[T]) -> None:
        self._gen = gen

    def __iter__(self) -> Stream[T]:
        return self

    def __next__(self) -> T:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncStream(Generic[T]):
    """Chunks of a streamed answer (an async iterator and an async context manager)."""

    def __init__(self, gen) -> None:
        self._gen = gen

    def __aiter__(self) -> AsyncStream[T]:
        return self

    async def __anext__(self) -> T:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class LoraplexClient:
    """Blocking client. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._http = httpx.Client(**calls.settings(base_url, api_key, timeout, headers))
        self.base_url = str(self._http.base_url).rstrip("/")

    def completions(self, model: str, prompt: Prompt, **params) -> Completion:
        return self._send(calls.completions(model, prompt, params))

    def chat(self, model: str, messages: Sequence[Message], **params) -> ChatCompletion:
        return self._send(calls.chat(model, messages, params))

    def stream_completions(self, model: str, prompt: Prompt, **params) -> Stream[CompletionChunk]:
        return Stream(self._stream(calls.completions(model, prompt, params, stream=True)))

    def stream_chat(
        self, model: str, messages: Sequence[Message], **params
    ) -> Stream[ChatCompletionChunk]:
        return Stream(self._stream(calls.chat(model, messages, params, stream=True)))

    def models(self) -> list[Model]:
        return self._send(calls.models())

    def list_adapters(self) -> list[AdapterInfo]:
        return self._send(calls.list_adapters())

    def load_adapter(self, name: str, path: str, owner: str | None = None) -> AdapterInfo:
        """Load the PEFT adapter at `path` (relative to the server's --adapter-root)."""
        return self._send(calls.load_adapter(name, path, owner))

    def unload_adapter(self, name: str, owner: str | None = None) -> None:
        """Returns once no request uses it any more and its memory is freed."""
        self._send(calls.unload_adapter(name, owner))

    def health(self) -> bool:
        """True when the server serves; LoraplexError (503) while it shuts down or failed."""
        return self._send(calls.health())

    def metrics(self) -> str:
        """The Prometheus text of `/metrics`."""
        return self._send(calls.metrics())

    def usage(self) -> list[TenantUsage]:
        """Requests and tokens of the caller's tenant (admins: of every tenant)."""
        return self._send(calls.usage())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LoraplexClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, call: Call) -> Any:
        try:
            r = self._http.request(call.method, call.path, json=call.json, params=call.params)
        except httpx.TransportError as e:
            raise calls.transport_error(e, self.base_url) from e
        return call.result(r.status_code, r.content)

    def _stream(self, call: Call) -> Iterator[Any]:
        reader = StreamReader(call)
        try:
            with self._http.stream(call.method, call.path, json=call.json) as r:
                if r.status_code >= 400:
                    raise from_response(r.status_code, r.read())
                for line in r.iter_lines():
                    item = reader.feed(line)
                    if item is not None:
                        yield item
                    if reader.done:
                        return
                reader.finish()
        except httpx.TransportError as e:
            raise calls.transport_error(e, self.base_url) from e


class AsyncLoraplexClient:
    """asyncio client: the same methods as `LoraplexClient`, as coroutines; the stream_*
    methods return async iterators. Use `async with`, or `await aclose()`."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(**calls.settings(base_url, api_key, timeout, headers))
        self.base_url = str(self._http.base_url).rstrip("/")

    async def completions(self, model: str, prompt: Prompt, **params) -> Completion:
        return await self._send(calls.completions(model, prompt, params))

    async def chat(self, model: str, messages: Sequence[Message], **params) -> ChatCompletion:
        return await self._send(calls.chat(model, messages, params))

    def stream_completions(
        self, model: str, prompt: Prompt, **params
    ) -> AsyncStream[CompletionChunk]:
        return AsyncStream(self._stream(calls.completions(model, prompt, params, stream=True)))

    def stream_chat(
        self, model: str, messages: Sequence[Message], **params
    ) -> AsyncStream[ChatCompletionChunk]:
        return AsyncStream(self._stream(calls.chat(model, messages, params, stream=True)))

    async def models(self) -> list[Model]:
        return await self._send(calls.models())

    async def list_adapters(self) -> list[AdapterInfo]:
        return await self._send(calls.list_adapters())

    async def load_adapter(self, name: str, path: str, owner: str | None = None) -> AdapterInfo:
        return await self._send(calls.load_adapter(name, path, owner))

    async def unload_adapter(self, name: str, owner: str | None = None) -> None:
        await self._send(calls.unload_adapter(name, owner))

    async def health(self) -> bool:
        return await self._send(calls.health())

    async def metrics(self) -> str:
        return await self._send(calls.metrics())

    async def usage(self) -> list[TenantUsage]:
        return await self._send(calls.usage())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncLoraplexClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _send(self, call: Call) -> Any:
        try:
            r = await self._http.request(call.method, call.path, json=call.json, params=call.params)
        except httpx.TransportError as e:
            raise calls.transport_error(e, self.base_url) from e
        return call.result(r.status_code, r.content)

    async def _stream(self, call: Call) -> AsyncIterator[Any]:
        reader = StreamReader(call)
        try:
            async with self._http.stream(call.method, call.path, json=call.json) as r:
                if r.status_code >= 400:
                    raise from_response(r.status_code, await r.aread())
                async for line in r.aiter_lines():
                    item = reader.feed(line)
                    if item is not None:
                        yield item
                    if reader.done:
                        return
                reader.finish()
        except httpx.TransportError as e:
            raise calls.transport_error(e, self.base_url) from e

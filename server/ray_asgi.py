"""One HTTP request through an ASGI app in this process, as a stream of plain values.

The Ray Serve engine replicas run loraplex's own FastAPI app (the routes, validation, error
envelopes and SSE formatting of `loraplex serve`), but their requests arrive through a
`DeploymentHandle`, not a socket. `call_asgi` feeds one request to the app and yields what it
sends back, as values Ray can carry: first `(status, headers)`, then the body's chunks
(`bytes`), in order, as the app sends them (a stream stays a stream).

Contracts:
- The app sees the body in one `http.request` message, then nothing until the consumer goes
  away: when the generator is closed or cancelled before the body has ended (the ingress's
  client disconnected, or the ingress died), the app receives `http.disconnect`, which is what
  makes loraplex's routes abort the request's sequences and free their pages.
- An exception the app raises after its response has started ends the stream early (logged);
  before that, Starlette's outer middleware has already answered 500.
- `RequestParts` holds what the ingress forwards: method, path, query string, headers and body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_END = object()
_running: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks


@dataclass
class RequestParts:
    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    extensions: dict = field(default_factory=dict)  # copied into the ASGI scope's "state"


def make_scope(parts: RequestParts) -> dict:
    return {
        "type": "http",
        # 2.3: Starlette's StreamingResponse then watches receive() for a disconnect itself
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": parts.method,
        "scheme": "http",
        "path": parts.path,
        "raw_path": parts.path.encode(),
        "query_string": parts.query,
        "root_path": "",
        "headers": list(parts.headers),
        "client": None,
        "server": None,
        "state": dict(parts.extensions),
    }


async def call_asgi(app, parts: RequestParts) -> AsyncIterator[tuple[int, list] | bytes]:
    """Run `parts` through `app`; yield `(status, [(name, value), ...])`, then body chunks."""
    sent: asyncio.Queue = asyncio.Queue()  # the app never waits for the consumer
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": parts.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.put_nowait(message)

    async def run() -> None:
        try:
            await app(make_scope(parts), receive, send)
        except Exception:
            logger.exception("the app failed on %s %s", parts.method, parts.path)
        finally:
            sent.put_nowait(_END)

    task = asyncio.ensure_future(run())
    _running.add(task)
    task.add_done_callback(_running.discard)
    try:
        while True:
            message = await sent.get()
            if message is _END:
                return
            if message["type"] == "http.response.start":
                raw = message.get("headers", [])
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
                yield message["status"], headers
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    return
    finally:
        # Done, or closed or cancelled before the end (the client is gone): the app sees a
        # disconnect and cleans up on its own (abort, metrics); nothing here waits for it.
        gone.set()

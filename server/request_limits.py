"""Request size limits, answered in OpenAI's envelope before a route runs:
- `--max-request-bytes`: a larger body is a 413, refused before it is read (Content-Length) or
  as soon as the streamed body passes the limit (chunked). File uploads (`POST /v1/files`)
  have their own limit, `--max-file-bytes`.
- headers: more than MAX_HEADER_BYTES in all (names and values) is a 431. The HTTP parser
  (httptools) takes headers of any size; no API request needs more than a few KiB."""

from __future__ import annotations

import json

from loraplex.server.protocol import error_body

EXEMPT = {("POST", "/v1/files")}
MAX_HEADER_BYTES = 64 << 10


class RequestLimits:
    """ASGI middleware. Invariants: the app never sees a request with more than
    MAX_HEADER_BYTES of headers, nor more than `max_bytes` body bytes of a limited request."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
        if header_bytes > MAX_HEADER_BYTES:
            message = f"the request headers have {header_bytes} bytes, more than {MAX_HEADER_BYTES}"
            return await _answer(send, 431, message, "headers_too_large")
        if (scope["method"], scope["path"]) in EXEMPT:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, int(length))
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(seen)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:
            if not started:
                await self._refuse(send, e.seen, at_least=True)

    async def _refuse(self, send, size: int, at_least: bool = False) -> None:
        what = f"at least {size}" if at_least else str(size)
        message = (
            f"the request body has {what} bytes, more than --max-request-bytes {self.max_bytes}"
        )
        await _answer(send, 413, message, "request_too_large")


async def _answer(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, "invalid_request_error", code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    def __init__(self, seen: int) -> None:
        super().__init__(f"request body over the limit ({seen} bytes read)")
        self.seen = seen

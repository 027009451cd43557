"""The client's errors: the server's OpenAI error envelope as an exception.

`LoraplexError(status, type, message, param, code)`: `status` is the HTTP status (None when
no answer came: see `LoraplexConnectionError`), `type`/`message`/`param`/`code` are the fields
of `{"error": {...}}`. An answer that is not an envelope (a proxy's HTML page, an empty body)
still gives a `LoraplexError` with the status, a type named after it and the body's start.
An error sent inside a stream (`data: {"error": ...}`) raises with the status its type names.
"""

from __future__ import annotations

import json

# The server's status -> type table (server/protocol.py ERROR_TYPES), for bodies without one
# and for errors that arrive inside a stream (which carry the type but no status).
STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "internal_error",
    503: "service_unavailable",
}
TYPE_STATUS = {t: s for s, t in STATUS_TYPES.items()}


class LoraplexError(Exception):
    """An error answered by the server (or, subclass, no answer at all)."""

    def __init__(
        self,
        status: int | None,
        type: str,
        message: str,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.param = param
        self.code = code

    def __str__(self) -> str:
        head = f"{self.status} {self.type}" if self.status is not None else self.type
        extra = ", ".join(f"{k}={v}" for k, v in (("param", self.param), ("code", self.code)) if v)
        return f"{head}: {self.message}" + (f" ({extra})" if extra else "")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, type={self.type!r}, "
            f"message={self.message!r}, param={self.param!r}, code={self.code!r})"
        )


class LoraplexConnectionError(LoraplexError):
    """No (complete) answer: connection refused or lost, timeout, a stream cut before
    `[DONE]`. `status` is None; `type` is "connection_error", "timeout" or "incomplete_stream"."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(None, type, message)


def from_envelope(status: int | None, body: dict) -> LoraplexError:
    """The error of a decoded `{"error": {...}}` body; `status` None: derived from its type."""
    err = body.get("error")
    if isinstance(err, str):  # some proxies answer {"error": "text"}
        err = {"message": err}
    if not isinstance(err, dict):
        err = {}
    type_ = err.get("type") or STATUS_TYPES.get(status or 0, "error")
    if status is None:
        status = TYPE_STATUS.get(type_, 500)
    message = err.get("message") or f"HTTP {status}"
    return LoraplexError(status, type_, str(message), err.get("param"), err.get("code"))


def from_response(status: int, content: bytes) -> LoraplexError:
    """The error of an HTTP answer with status >= 400."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        return from_envelope(status, body)
    text = content.decode("utf-8", "replace").strip()[:500]
    return LoraplexError(status, STATUS_TYPES.get(status, "error"), text or f"HTTP {status}")

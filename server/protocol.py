"""OpenAI-compatible request models and the error envelope.

Contracts:
- Every request model forbids unknown fields: a field we do not support is a 400 naming it
  (`param`), never silently ignored. Fields OpenAI clients may send at their neutral value
  (`frequency_penalty: 0`, `logit_bias: {}`, `echo: false`, ...) are accepted only at that value.
- `APIError` carries status, message, type, param and code; `error_body` renders OpenAI's
  envelope `{"error": {"message", "type", "param", "code"}}`.
- `parse(model_cls, body)` turns pydantic errors into a 400 `APIError` naming the first bad field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ERROR_TYPES = {
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
MAX_LOGPROBS = 20  # the sampler's limit
MAX_STOP = 16


class APIError(Exception):
    """An error answered to the client with `status` and OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None):
    err = {"message": message, "type": type_, "param": param, "code": code}
    return {"error": {k: _utf8(v) for k, v in err.items()}}


def _utf8(s: str | None) -> str | None:
    """`s` with lone surrogates (from a client's JSON, e.g. "\\ud800" echoed in a message)
    written as escapes: they cannot be encoded as UTF-8 and would fail the whole answer."""
    if s is None:
        return None
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def check_text(value: str, param: str) -> str:
    """`value`, or a 400 if it holds a lone surrogate (JSON allows "\\ud800"): that is not
    Unicode text, and neither UTF-8 nor the tokenizer can take it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            400,
            f"'{param}' is not valid Unicode: a lone surrogate at character {e.start}",
            param=param,
            code="invalid_value",
        ) from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _neutral(name: str, value: Any, neutral: tuple) -> Any:
    if value not in neutral:
        raise ValueError(f"'{name}' is not supported (only {neutral[0]!r} is accepted)")
    return value


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by completions and chat completions."""

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=64)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None  # end-user id: metadata only
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    # extensions (vLLM's names)
    top_k: Annotated[int, Field(ge=-1)] = 0  # 0 or -1: disabled
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v, info):
        return _neutral(info.field_name, v, (0.0, None))

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("'logit_bias' is not supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


PromptT = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[int], Field(min_length=1)]
    | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
)


class CompletionRequest(_SamplingFields):
    prompt: PromptT
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        return _neutral("echo", v, (False,))

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        return _neutral("suffix", v, (None,))

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("'best_of' is not supported (only best_of == n)")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per entry: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None

    def limit(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise APIError(
                    400,
                    "give 'max_completion_tokens' or 'max_tokens', not two different values",
                    param="max_tokens",
                )
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict]:
        """Messages for the chat template (`developer` is OpenAI's new name for `system`)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class AdapterLoad(_Strict):
    name: str
    path: str
    owner: str | None = None  # admins only: load on behalf of another tenant


class LoadLoraAdapter(_Strict):
    """vLLM's `POST /v1/load_lora_adapter` body."""

    lora_name: str
    lora_path: str


class UnloadLoraAdapter(_Strict):
    """vLLM's `POST /v1/unload_lora_adapter` body (`lora_int_id` is vLLM-internal: refused)."""

    lora_name: str


def parse(model_cls: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; a 400 APIError naming the first offending field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = [str(x) for x in err["loc"] if not _is_union_tag(x)]
        param = ".".join(loc) or None
        if err["type"] == "extra_forbidden":
            raise APIError(
                400, f"Unsupported parameter: '{param}'", param=param, code="unsupported_parameter"
            ) from None
        if err["type"] == "missing":
            raise APIError(
                400, f"Missing required parameter: '{param}'", param=param, code="missing_parameter"
            ) from None
        msg = err["msg"].removeprefix("Value error, ")
        where = f"value for '{param}'" if param else "request body"  # e.g. a key pydantic refuses
        raise APIError(400, f"Invalid {where}: {msg}", param=param, code="invalid_value") from None


def _is_union_tag(x) -> bool:
    """pydantic puts the union member's type name in `loc` (e.g. 'list[int]'): drop it."""
    return isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool"))

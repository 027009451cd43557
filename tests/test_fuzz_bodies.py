"""Hypothesis-generated bodies for POST /v1/completions and /v1/chat/completions: wrong types,
huge, negative and non-finite numbers, unicode with lone surrogates and NULs, nested prompts,
token ids outside the vocabulary, unknown and unsupported fields (tools, response_format, ...),
stream on and off, n, logprobs, stop lists, max_tokens at and past its bounds, and bodies that
are not JSON objects at all. Every answer is a 2xx with a sane body (or a well-formed event
stream) or a 4xx in OpenAI's envelope, never a 5xx; afterwards the engine serves a normal
request and holds no page. `LORAPLEX_FUZZ_EXAMPLES` (`make fuzz`) raises the example count."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from fuzz_helpers import (
    DERANDOMIZE,
    KEYS,
    MAX_MODEL_LEN,
    MODEL,
    assert_engine_healthy,
    envelope_problem,
    examples,
    fuzz_server,
    stream_problem,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = examples(300)  # per route: a few seconds each on two cores
VOCAB = 2000  # server_fixtures.tiny_model

# -- values ---------------------------------------------------------------------------------------

char = st.one_of(  # any code point, lone surrogates and NUL more often than by chance
    st.characters(), st.characters(categories=["Cs"]), st.sampled_from(["\x00", "\ufffe"])
)
text = st.text(char, max_size=40)
words = st.one_of(text, st.sampled_from(["hello", "stop", "\x00", "\ud800", "é" * 30, " " * 5]))
huge = st.sampled_from([2**31, 2**63, 2**64 + 1, 10**30, -(2**63), 10**4000])
nonfinite = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -1e-308, 5e-324])
numbers = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True), huge, nonfinite)
scalars = st.one_of(st.none(), st.booleans(), numbers, words)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(words, inner, max_size=4),
    max_leaves=12,
)


token_id = st.one_of(
    st.integers(0, VOCAB - 1), st.integers(-5, -1), st.integers(VOCAB, 10**6), huge
)
good_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)
short = st.text(char, min_size=1, max_size=12)
good_prompts = st.one_of(
    short,
    st.lists(short, min_size=1, max_size=3),
    good_ids,
    st.lists(good_ids, min_size=1, max_size=3),
)
bad_prompts = st.one_of(
    st.just(""),
    st.lists(words, min_size=0, max_size=3),
    st.lists(token_id, min_size=0, max_size=8),
    st.lists(st.lists(token_id, min_size=0, max_size=5), min_size=0, max_size=3),
    st.lists(st.lists(st.lists(st.integers(0, 9), max_size=2), max_size=2), max_size=2),
    st.lists(st.one_of(words, st.integers(0, VOCAB - 1)), min_size=2, max_size=3),  # mixed
    st.just("x" * (MAX_MODEL_LEN * 4)),
)
visible = [MODEL, "support", f"{MODEL}:support", "common"]  # to acme
small_int = st.one_of(st.integers(-2, 4), st.integers(MAX_MODEL_LEN - 2, MAX_MODEL_LEN + 2), huge)
stops = st.one_of(short, st.lists(short, max_size=4))

# field: (values the server accepts, values it may refuse), shared by both routes
SAMPLING = {
    "model": (st.sampled_from(visible), st.sampled_from(["secret", "", "\ud800", f"{MODEL}:"])),
    "temperature": (st.floats(0, 2), st.one_of(nonfinite, st.just(1e-300), numbers)),
    "top_p": (st.floats(0, 1, exclude_min=True), st.one_of(nonfinite, numbers)),
    "top_k": (st.integers(-1, VOCAB + 5), huge),
    "n": (st.integers(1, 3), small_int),
    "seed": (st.integers(-(2**64), 2**64), huge),
    "stop": (st.one_of(st.none(), stops), st.lists(words, max_size=20)),
    "stream": (st.booleans(), numbers),
    "stream_options": (st.just({"include_usage": True}), st.dictionaries(words, junk, max_size=2)),
    "user": (short, words),
    "ignore_eos": (st.booleans(), numbers),
    "min_tokens": (st.integers(0, 2), small_int),
    "stop_token_ids": (st.lists(st.integers(0, VOCAB - 1), max_size=3), st.lists(token_id)),
    "frequency_penalty": (st.just(0.0), numbers),
    "logit_bias": (st.just({}), st.dictionaries(words, numbers, min_size=1, max_size=2)),
}
COMPLETION = {
    **SAMPLING,
    "prompt": (good_prompts, bad_prompts),
    "max_tokens": (st.one_of(st.integers(1, 8), st.none()), small_int),
    "logprobs": (st.one_of(st.integers(0, 5), st.none()), small_int),
    "echo": (st.just(False), st.just(True)),
    "best_of": (st.just(1), small_int),
    "suffix": (st.none(), words),
}
part = st.fixed_dictionaries({"type": st.just("text"), "text": words})
bad_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": junk}),
    st.dictionaries(words, junk, max_size=3),
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"])},
    optional={"content": st.one_of(short, st.lists(part, min_size=1, max_size=3))},
)
bad_message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["tool", "function", ""]), junk)},
    optional={
        "content": st.one_of(words, st.lists(bad_part, max_size=3), junk),
        "name": words,
        "tool_calls": junk,
    },
)
CHAT = {
    **SAMPLING,
    "messages": (
        st.lists(message, min_size=1, max_size=3).map(
            lambda m: [*m, {"role": "user", "content": "hi"}]
        ),
        st.one_of(st.lists(bad_message, max_size=3), st.lists(message, max_size=0)),
    ),
    "max_tokens": (st.one_of(st.integers(1, 8), st.none()), small_int),
    "max_completion_tokens": (st.integers(1, 8), small_int),
    "logprobs": (st.booleans(), numbers),
    "top_logprobs": (st.integers(0, 5), small_int),
    "response_format": (
        st.just({"type": "text"}),
        st.fixed_dictionaries({"type": st.sampled_from(["json_object", "json_schema", "x"])}),
    ),
}
UNSUPPORTED = st.sampled_from(
    ["tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "modalities",
     "audio", "prediction", "service_tier", "store", "metadata", "reasoning_effort", "guided_json",
     "presence_penalty", "n_"]
)  # fmt: skip


def bodies(fields: dict, required: tuple[str, ...]) -> st.SearchStrategy:
    """Valid objects (a few optional fields); the same with one field refused, junk or an
    unknown or unsupported field; objects without a required field; not objects at all."""
    need = {k: fields[k][0] for k in required}
    optional = {k: good for k, (good, _) in fields.items() if k not in required}
    valid = st.fixed_dictionaries(need, optional=optional)
    key = st.one_of(st.sampled_from(sorted(fields)), UNSUPPORTED, words)

    @st.composite
    def one_bad(draw):
        body, name = draw(valid), draw(key)
        refused = fields[name][1] if name in fields else junk
        body[name] = draw(st.one_of(refused, junk))
        return body

    partial = st.fixed_dictionaries({}, optional={**optional, required[0]: need[required[0]]})
    return st.one_of(valid, valid, one_bad(), one_bad(), partial, junk)


def encode(ascii_json: bool, body) -> bytes:
    """JSON the way a client might send it: escaped (lone surrogates as \\udXXX, NaN as NaN),
    or raw UTF-8 with surrogates passed through (invalid UTF-8)."""
    raw = json.dumps(body, ensure_ascii=ascii_json, allow_nan=True)
    return raw.encode("utf-8", errors="surrogatepass")


# -- the checks -----------------------------------------------------------------------------------


def check_answer(r: httpx.Response, body, route: str) -> None:
    content_type = r.headers.get("content-type", "")
    assert r.status_code < 500, (r.status_code, r.text[:500], body)
    if r.status_code >= 400:
        problem = envelope_problem(r.status_code, content_type, r.content)
        assert problem is None, (problem, body)
        return
    assert r.status_code == 200, (r.status_code, r.text[:500], body)
    if content_type.startswith("text/event-stream"):
        problem = stream_problem(r.content)
        assert problem is None, (problem, body)
        return
    doc = r.json()
    kind = "text_completion" if route == "/v1/completions" else "chat.completion"
    assert doc["object"] == kind and doc["model"] == body["model"], doc
    usage = doc["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["prompt_tokens"] < MAX_MODEL_LEN * len(doc["choices"])
    n, prompt = body.get("n", 1), body.get("prompt")
    several = isinstance(prompt, list) and not isinstance(prompt[0], int)
    assert len(doc["choices"]) == n * (len(prompt) if several else 1), doc
    assert [c["index"] for c in doc["choices"]] == list(range(len(doc["choices"])))
    for c in doc["choices"]:
        assert c["finish_reason"] in ("stop", "length"), c
        out = c["text"] if kind == "text_completion" else c["message"]["content"]
        assert isinstance(out, str), c


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    srv = fuzz_server(tmp_path_factory.mktemp("fuzz_bodies"))
    yield srv
    srv.stop()


ROUTES = {
    "/v1/completions": bodies(COMPLETION, ("model", "prompt")),
    "/v1/chat/completions": bodies(CHAT, ("model", "messages")),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_fuzzed_bodies_never_5xx(live, route):
    seen = Counter()
    headers = {"Authorization": f"Bearer {KEYS['acme']}", "Content-Type": "application/json"}
    with httpx.Client(base_url=live.url, headers=headers, timeout=120) as client:

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(body=ROUTES[route], ascii_json=st.booleans())
        def run(body, ascii_json):
            r = client.post(route, content=encode(ascii_json, body))
            seen[r.status_code] += 1
            check_answer(r, body, route)

        run()
    # the generated bodies reach the engine, and reach the validation
    assert seen[200] >= EXAMPLES // 20 and seen[400] >= EXAMPLES // 4, seen
    assert_engine_healthy(live)


def _multipart(filename: bytes, content: bytes, purpose: bytes) -> tuple[bytes, str]:
    """A multipart form by hand: any bytes in the file name (httpx would refuse some)."""
    b = b"fuzzboundary7MA4YWxk"
    body = (
        b"--" + b + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + purpose
        + b"\r\n--" + b + b'\r\nContent-Disposition: form-data; name="file"; filename="'
        + filename + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + content
        + b"\r\n--" + b + b"--\r\n"
    )  # fmt: skip
    return body, f"multipart/form-data; boundary={b.decode()}"


field_text = st.one_of(short, words, st.sampled_from(["\udfff", "a\ud800b", "\x00"]))
line = st.one_of(
    st.fixed_dictionaries({"prompt": field_text, "completion": field_text}),
    st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"messages": st.lists(bad_message, max_size=3)}),
    junk,
)
training_file = st.lists(
    st.tuples(line, st.sampled_from([True, True, False])).map(lambda t: encode(t[1], t[0])),
    min_size=0,
    max_size=4,
).map(b"\n".join)


def test_fuzzed_training_files_never_5xx(live):
    """POST /v1/files: JSONL lines of both formats with junk and lone surrogates, odd file
    names, invalid UTF-8, a wrong purpose: a file object or a 4xx in the envelope."""
    headers = {"Authorization": f"Bearer {KEYS['acme']}"}
    seen = Counter()
    with httpx.Client(base_url=live.url, headers=headers, timeout=120) as client:

        @settings(max_examples=max(EXAMPLES // 3, 10), deadline=None, database=None,
                  derandomize=DERANDOMIZE, suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(
            content=st.one_of(training_file, st.binary(max_size=64)),
            filename=st.one_of(st.just(b"train.jsonl"), st.binary(max_size=12).filter(
                lambda n: b'"' not in n and b"\r" not in n and b"\n" not in n)),
            purpose=st.sampled_from([b"fine-tune", b"fine-tune", b"batch", b"\xff"]),
        )  # fmt: skip
        def run(content, filename, purpose):
            body, content_type = _multipart(filename, content, purpose)
            r = client.post("/v1/files", content=body, headers={"Content-Type": content_type})
            seen[r.status_code] += 1
            assert r.status_code < 500, (r.status_code, r.text[:300], content, filename)
            if r.status_code >= 400:
                problem = envelope_problem(r.status_code, r.headers["content-type"], r.content)
                assert problem is None, (problem, content)
            else:
                assert r.json()["object"] == "file" and r.json()["bytes"] == len(content)

        run()
    assert seen[400] > 0 and seen[200] > 0, seen

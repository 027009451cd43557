"""Server pieces without an engine: incremental detokenization, stop strings, request parsing,
tenant configuration, adapter path confinement."""

from __future__ import annotations

import os
import random

import pytest
from server_fixtures import tiny_model

from loraplex.server.adapters import confine
from loraplex.server.detokenize import IncrementalDetokenizer, StopMatcher, TextStream
from loraplex.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from loraplex.server.tenants import AdapterNamespace, Tenants


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model()["model"])


def test_incremental_detokenizer_equals_full_decode(tok):
    rng = random.Random(0)
    prompt = tok("Once upon a time")["input_ids"]
    for trial in range(30):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        detok = IncrementalDetokenizer(tok, prompt)
        pieces = []
        i = 0
        while i < len(ids):  # feed 1..3 tokens at a time
            k = rng.randrange(1, 4)
            pieces.append(detok.push(ids[i : i + k]))
            i += k
        pieces.append(detok.flush())
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True), trial


def test_detokenizer_holds_back_incomplete_utf8(tok):
    ids = tok("café ☕ naïve", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, [])
    pieces = [detok.push([t]) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == "café ☕ naïve"


def test_stop_matcher_across_pieces():
    m = StopMatcher(["STOP", "xyz"])
    out = [m.feed(t) for t in ["abc S", "T", "O", "zzz"]]
    assert "".join(out) + m.flush() == "abc STOzzz"
    assert not m.stopped
    m = StopMatcher(["STOP"])
    out = [m.feed(t) for t in ["abc S", "TO", "P and more"]]
    assert out == ["abc ", "", ""] and m.stopped
    assert m.feed("later") == "" and m.flush() == ""


def test_stop_matcher_earliest_stop_wins_and_partial_prefix_released():
    m = StopMatcher(["bcd", "cd"])
    assert m.feed("abcd") == "a" and m.stopped
    m = StopMatcher(["aab"])
    assert m.feed("aa") == ""  # could still become "aab"
    assert m.feed("a") == "a"  # "aaa": only the last "aa" could still start the stop string
    assert m.feed("c") == "aac"


def test_text_stream_stop_inside_a_token(tok):
    ids = tok(" the harbor town", add_special_tokens=False)["input_ids"]
    s = TextStream(tok, [], ["arb"])
    text = "".join(s.push([t]) for t in ids)
    assert s.stopped and text == " the h"


def test_parse_rejects_unknown_and_unsupported_fields():
    with pytest.raises(APIError) as e:
        parse(CompletionRequest, {"model": "m", "prompt": "x", "functions": []})
    assert (e.value.status, e.value.param, e.value.code) == (
        400,
        "functions",
        "unsupported_parameter",
    )
    with pytest.raises(APIError) as e:
        parse(CompletionRequest, {"model": "m", "prompt": "x", "frequency_penalty": 0.5})
    assert e.value.param == "frequency_penalty"
    with pytest.raises(APIError) as e:
        parse(CompletionRequest, {"model": "m", "prompt": "x", "echo": True})
    assert e.value.param == "echo"
    with pytest.raises(APIError) as e:
        parse(CompletionRequest, {"model": "m", "prompt": "x", "temperature": 3})
    assert e.value.param == "temperature" and e.value.code == "invalid_value"
    with pytest.raises(APIError) as e:
        parse(CompletionRequest, {"prompt": "x"})
    assert e.value.param == "model" and e.value.code == "missing_parameter"
    with pytest.raises(APIError) as e:
        parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "tool", "content": ""}]})
    assert e.value.param.startswith("messages.0.role")
    with pytest.raises(APIError) as e:
        parse(ChatCompletionRequest, {"model": "m", "messages": [], "tools": []})
    assert e.value.status == 400
    # neutral values OpenAI clients send are accepted
    req = parse(
        CompletionRequest,
        {"model": "m", "prompt": [[1, 2], [3]], "presence_penalty": 0, "logit_bias": {}, "n": 2},
    )
    assert req.prompts() == [[1, 2], [3]]


def test_tenants_toml(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text(
        '[[tenants]]\nname = "acme"\napi_keys = ["k1", "k2"]\nadapters = { support = "a" }\n'
        '[[tenants]]\nname = "ops"\napi_keys = ["k3"]\nadmin = true\n'
    )
    t = Tenants.from_options(str(f))
    assert t.authenticate("Bearer k2").name == "acme"
    assert t.authenticate("Bearer k3").admin
    assert t.authenticate("Bearer nope") is None and t.authenticate(None) is None
    assert t.authenticate("k1") is None  # the scheme is required
    assert t.by_name["acme"].adapters == {"support": "a"}
    f.write_text('[[tenants]]\nname = "x"\napi_keys = ["k"]\nquota = 3\n')
    with pytest.raises(ValueError, match="unknown keys"):
        Tenants.from_options(str(f))
    f.write_text(
        '[[tenants]]\nname = "x"\napi_keys = ["k"]\n[[tenants]]\nname = "y"\napi_keys = ["k"]\n'
    )
    with pytest.raises(ValueError, match="used twice"):
        Tenants.from_options(str(f))
    only_key = Tenants.from_options(api_key="secret")
    assert only_key.authenticate("Bearer secret").admin and not only_key.open
    assert Tenants.from_options().authenticate(None).name == "default"


def test_namespace_isolation():
    ns = AdapterNamespace()
    shared = ns.reserve(None, "common")
    shared.info = object()
    mine = ns.reserve("acme", "support")
    theirs = ns.reserve("globex", "support")
    assert ns.resolve("acme", "support") is None  # still loading
    mine.info = theirs.info = object()
    assert ns.resolve("acme", "support") is mine and ns.resolve("globex", "support") is theirs
    assert mine.engine_name != theirs.engine_name
    assert ns.resolve("acme", "common") is shared and ns.resolve("other", "support") is None
    assert ns.taken("acme", "common") and ns.taken(None, "support") and not ns.taken("x", "support")
    ns.drop(mine)
    assert ns.resolve("acme", "support") is None and ns.resolve("globex", "support") is theirs


def test_confine(tmp_path):
    m = tiny_model()
    root = m["root"]
    assert confine(root, "a") == os.path.realpath(m["adapters"]["a"])
    assert confine(root, os.path.join(root, "b")) == os.path.realpath(m["adapters"]["b"])
    assert confine(root, "a/../c") == os.path.realpath(m["adapters"]["c"])
    for bad in ("../outside/x", m["outside"] + "/x", "link-out", "leaky", "/etc"):
        with pytest.raises(APIError) as e:
            confine(root, bad)
        assert e.value.status == 400 and e.value.code == "path_not_allowed", bad
    with pytest.raises(APIError) as e:
        confine(None, "a")
    assert e.value.code == "adapter_root_not_set"
    with pytest.raises(APIError) as e:  # os.path cannot encode it: was a 500
        confine(root, "a\ud800")
    assert e.value.status == 400 and e.value.param == "path"

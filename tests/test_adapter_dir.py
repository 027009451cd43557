"""`--adapter-dir DIR`: every adapter folder under DIR registered at start (host memory only,
pool pages on first use), bad folders skipped with a warning, one summary line, the same tokens
as `--adapter`, and nothing per request or step that walks every registered adapter."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from loraplex.engine.adapter_dir import scan_adapter_dir
from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.llm import LLM
from loraplex.scheduler.sequence import SamplingParams

GOOD = ["a-r4", "b.r8", "c_2"]  # sorted, as registered
BAD = ["bad name", "bad-config", "bad-shape", "bin-only", "escape", "leaky", "no-config",
       "rank-too-high"]  # fmt: skip
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KW = {"pool_bytes": 4 << 20, "max_model_len": 256, "max_lora_rank": 16}  # pages of 8 KiB
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [11, 12], [40, 41, 42, 43, 44, 45]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A 2-layer checkpoint; `dir`: good and bad adapter folders mixed; `many`: 200 adapters."""
    from loraplex.engine.demo import make_adapter, make_checkpoint
    from loraplex.engine.loader import load_model_spec

    root = tmp_path_factory.mktemp("adapter-dir")
    model = make_checkpoint(
        root / "model", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    spec = load_model_spec(model)
    d, outside = root / "dir", root / "outside"

    def adapter(path, rank=4, targets=("q_proj", "v_proj"), seed=1, s=spec) -> Path:
        return Path(make_adapter(path, s, rank=rank, alpha=2.0 * rank, target_modules=targets,
                                 seed=seed))  # fmt: skip

    adapter(d / "a-r4", 4, seed=1)
    adapter(d / "b.r8", 8, ALL, seed=2)
    adapter(d / "c_2", 2, ("gate_proj", "up_proj", "down_proj"), seed=3)
    adapter(d / "bad name", seed=4)  # a valid adapter, but not a valid adapter name
    (adapter(d / "bad-config", seed=5) / "adapter_config.json").write_text("{not json")
    wrong = dataclasses.replace(spec, intermediate_size=96)
    adapter(d / "bad-shape", 4, ("gate_proj",), seed=6, s=wrong)
    binary = adapter(d / "bin-only", seed=7)
    (binary / "adapter_model.safetensors").rename(binary / "adapter_model.bin")
    adapter(d / "rank-too-high", 32, seed=8)
    (d / "no-config").mkdir()
    adapter(d / ".hidden", seed=9)  # hidden: ignored
    (d / "notes.txt").write_text("not an adapter")  # a file: ignored
    x = adapter(outside / "x", seed=10)
    os.symlink(x, d / "escape")  # a symlinked folder that leads out of the dir
    (d / "leaky").mkdir()
    shutil.copy(x / "adapter_config.json", d / "leaky")
    os.symlink(x / "adapter_model.safetensors", d / "leaky" / "adapter_model.safetensors")

    many = root / "many"
    names = [f"m{i:03d}" for i in range(200)]
    for i, name in enumerate(names):
        adapter(many / name, 2 if i % 2 else 4, ("q_proj",), seed=100 + i)
    return {"model": model, "dir": str(d), "many": str(many), "names": names}


def _llm(tiny, adapter_dir=None, **kw) -> LLM:
    return LLM(tiny["model"], adapter_dir=adapter_dir or tiny["dir"], **(KW | kw))


def test_good_folders_registered_bad_ones_skipped_with_a_warning(tiny, caplog):
    with caplog.at_level(logging.INFO):
        llm = _llm(tiny)
    engine = llm.engine
    report = engine.adapter_dir
    assert report.names == GOOD
    assert [info.name for info in engine.adapters.list()] == GOOD
    assert [info.uid for info in report.registered] == sorted(i.uid for i in report.registered)
    assert sorted(folder for folder, _ in report.skipped) == BAD
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for folder in BAD:  # each one named, with its reason
        assert sum(f"folder {folder!r}" in w for w in warnings) == 1, (folder, warnings)
    reasons = dict(report.skipped)
    assert "not a valid adapter name" in reasons["bad name"]
    assert "not valid JSON" in reasons["bad-config"]
    assert "shape" in reasons["bad-shape"]
    assert "only safetensors" in reasons["bin-only"]
    assert "outside the adapter dir" in reasons["escape"]
    assert "links outside the adapter dir" in reasons["leaky"]
    assert "no adapter_config.json" in reasons["no-config"]
    assert "max_lora_rank=16" in reasons["rank-too-high"]
    assert not any(".hidden" in w or "notes.txt" in w for w in warnings)
    summary = [r.getMessage() for r in caplog.records if r.name.endswith("adapter_dir")]
    assert (
        f"adapter dir {os.path.realpath(tiny['dir'])}: 3 adapters registered (ranks 2-8"
        in (summary[-1])
    )
    assert "8 skipped" in summary[-1]
    assert len(llm.generate(PROMPTS[0], GREEDY, "c_2")[0].token_ids) == 6


def test_an_adapter_that_never_fits_the_pool_is_skipped(tiny, caplog):
    """The pool of 20 pages holds one 256-token request (16 pages) beside a-r4 (1 page) and
    c_2 but not b.r8 (8 pages): b.r8 is skipped, the engine starts."""
    with caplog.at_level(logging.WARNING):
        engine = _llm(tiny, pool_bytes=20 * 8192).engine
    assert "b.r8" not in engine.adapter_dir.names and "a-r4" in engine.adapter_dir.names
    assert "raise --pool-bytes" in dict(engine.adapter_dir.skipped)["b.r8"]
    assert any("'b.r8'" in r.getMessage() for r in caplog.records)


def test_same_greedy_tokens_as_adapter_flag(tiny):
    d = Path(tiny["dir"])
    from_dir = _llm(tiny)
    given = LLM(tiny["model"], adapters={n: str(d / n) for n in GOOD}, **KW)
    for name in GOOD:
        a = [o.token_ids for o in from_dir.generate(PROMPTS, GREEDY, name)]
        b = [o.token_ids for o in given.generate(PROMPTS, GREEDY, name)]
        assert a == b and all(len(t) == 6 for t in a)
    base = [o.token_ids for o in given.generate(PROMPTS, GREEDY, None)]
    assert base != [o.token_ids for o in given.generate(PROMPTS, GREEDY, "b.r8")]


def test_pool_pages_taken_on_first_use_only(tiny):
    engine = _llm(tiny).engine
    assert engine.pool.pages_used("adapter") == 0 and engine.store.num_resident == 0
    assert engine.store.num_registered == len(GOOD)
    engine.check_integrity()
    engine.add_request("r0", PROMPTS[0], GREEDY, "b.r8")
    uid = engine.adapters.uid_of("b.r8")
    while engine.has_unfinished():
        engine.step()
        engine.check_integrity()
        assert engine.pool.pages_used("adapter") == engine.store.num_pages(uid)
    assert engine.store.resident_uids() == [uid]  # only the adapter used
    assert engine.stats().adapters_host == 3 and engine.stats().adapters_device == 1


class _NoScan(dict):
    """A dict that refuses to be walked: per-request and per-step code must not iterate over
    every registered adapter (lookups by key are fine)."""

    def _refuse(self, *a):
        raise AssertionError("walked every registered adapter")

    __iter__ = keys = values = items = _refuse


def test_200_adapters_one_summary_line_and_no_per_adapter_cost(tiny, caplog):
    with caplog.at_level(logging.INFO):
        llm = _llm(tiny, adapter_dir=tiny["many"])
    engine = llm.engine
    ours = [r for r in caplog.records if r.name.startswith("loraplex.engine.adapter")]
    assert [r.levelno for r in ours] == [logging.INFO], [r.getMessage() for r in ours]
    assert "200 adapters registered (ranks 2-4" in ours[0].getMessage()
    assert "0 skipped" in ours[0].getMessage()
    assert [info.name for info in engine.adapters.list()] == tiny["names"]
    assert engine.pool.pages_used("adapter") == 0
    # Requests and steps with 200 registered: nothing walks the registry or the store.
    store, reg = engine.store, engine.adapters
    saved = store._entries, reg.by_name, reg.host  # the same entries: state stays shared
    store._entries, reg.by_name, reg.host = (_NoScan(x) for x in saved)
    used = tiny["names"][::25]
    outs = llm.generate(PROMPTS[:1] * len(used), GREEDY, used)
    assert all(len(o.token_ids) == 6 for o in outs)
    store._entries, reg.by_name, reg.host = saved
    engine.check_integrity()
    assert store.num_resident == len(used)


def test_missing_dir_file_dir_and_name_clash_are_errors(tiny, tmp_path):
    cfg = EngineConfig(model=tiny["model"], **KW)
    with pytest.raises(ValueError, match="does not exist"):
        Engine(cfg, adapter_dir=str(tmp_path / "nope"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        Engine(cfg, adapter_dir=str(tmp_path / "f"))
    with pytest.raises(ValueError, match="'b.r8'"):
        Engine(cfg, {"b.r8": str(Path(tiny["dir"]) / "a-r4")}, adapter_dir=tiny["dir"])


def test_scan_is_sorted_and_confined(tiny):
    scanned = scan_adapter_dir(tiny["dir"] + "/")
    names = [n for n, _ in scanned.found]
    assert names == sorted(names) and "escape" not in names and ".hidden" not in names
    assert all(os.path.dirname(p) == scanned.root for _, p in scanned.found)


def test_pinned_pages_counter(tiny):
    from loraplex.memory.adapter_store import AdapterStore
    from loraplex.memory.pool import PagePool

    store = AdapterStore(PagePool(16))
    for uid, n in ((1, 3), (2, 4), (3, 2)):
        store.register(uid, n)
    store.pin(1)
    store.pin(1)  # idempotent
    store.pin(2)
    assert store.pinned_pages() == 7 and store.pinned_pages(exclude=2) == 3
    store.unpin(1)
    assert store.pinned_pages() == 4 and store.pinned_pages(exclude=3) == 4
    store.check_integrity()
    store.unregister(2)  # pinned and resident
    assert store.pinned_pages() == 0
    store.check_integrity()


def test_cli_flag_serve_and_generate(tiny, tmp_path, monkeypatch):
    from loraplex.server import cli as server_cli

    for cmd in (["serve"], ["generate", "--input", "x"], ["bench", "throughput"]):
        args = server_cli.build_parser().parse_args([*cmd, "--adapter-dir", "/some/dir"])
        assert args.adapter_dir == "/some/dir"
    # `loraplex serve` builds its engine and app for real (the HTTP server is stubbed out).
    apps = []

    class Stub:
        started = True

        def run(self):
            pass

    monkeypatch.setattr(server_cli, "_make_server", lambda config, ae: apps.append(config.app)
                        or Stub())  # fmt: skip
    argv = ["serve", "--model", tiny["model"], "--adapter-dir", tiny["dir"],
            "--pool-bytes", str(KW["pool_bytes"]), "--max-model-len", "256",
            "--max-lora-rank", "16"]  # fmt: skip
    assert server_cli.main(argv) == 0
    ctx = apps[0].state.ctx
    assert sorted(ctx.names.shared) == GOOD and ctx.engine.adapter_dir.names == GOOD
    # `loraplex generate --adapter-dir`
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"prompt": PROMPTS[0], "adapter": "a-r4", "max_tokens": 3,
                               "temperature": 0}) + "\n")  # fmt: skip
    argv = ["generate", "--model", tiny["model"], "--adapter-dir", tiny["dir"], "--input",
            str(inp), "--output", str(out), "--pool-bytes", str(KW["pool_bytes"]),
            "--max-model-len", "256"]  # fmt: skip
    assert server_cli.main(argv) == 0
    row = json.loads(out.read_text())
    assert row["adapter"] == "a-r4" and len(row["token_ids"]) == 3


def test_bench_uses_the_first_registered_adapters(tiny, tmp_path):
    """The first K registered (sorted); the bad folders among them give way to the next."""
    from loraplex.engine.cli import main

    js = tmp_path / "bench.json"
    argv = ["bench", "throughput", "--model", tiny["model"], "--adapter-dir", tiny["dir"],
            "--num-adapters", "3", "--num-requests", "3", "--output-len", "2", "--prompt-len",
            "4", "--concurrency", "3", "--baseline", "none", "--no-also-base", "--warmup", "0",
            "--json-out", str(js)]  # fmt: skip
    assert main(argv) == 0
    setup = json.loads(js.read_text())["setup"]
    assert list(setup["adapters"]) == GOOD


def test_scattered_adapters_are_read_in_place_from_the_host_blob(tiny, monkeypatch):
    """On the CPU an adapter on scattered pool pages is read from its host blob, in place: no
    gathered copy each step, none kept (the runner once cached one per adapter ever used,
    doubling host memory, and the copies cost 0.7x throughput with 2048 adapters)."""
    engine = _llm(tiny).engine
    monkeypatch.setattr(engine.store, "is_contiguous", lambda uid: False)  # all scattered
    for i, name in enumerate(GOOD * 2):
        engine.add_request(f"r{i}", PROMPTS[i % 3], GREEDY, name)
    while engine.has_unfinished():
        engine.step()
        engine.check_integrity()
    host = engine.adapters.host
    assert engine.runner._records
    for uid, (views, _) in engine.runner._records.items():
        group = next(iter(views[0].values()))
        ptr = host[uid].blob.untyped_storage().data_ptr()
        assert group.a_t.untyped_storage().data_ptr() == ptr
    assert set(engine.adapters._views) <= {u for u in host if engine.store.is_resident(u)}


def test_server_skips_a_folder_named_like_the_base_model(tiny, tmp_path, caplog):
    from loraplex.server.app import create_app
    from loraplex.server.config import ServerConfig

    d = tmp_path / "d"
    for name in ("base-id", "ok"):
        shutil.copytree(Path(tiny["dir"]) / "a-r4", d / name)
    engine = Engine(EngineConfig(model=tiny["model"], **KW), adapter_dir=str(d))
    with caplog.at_level(logging.WARNING):
        create_app(engine, ServerConfig(model_id="base-id"))
    assert [info.name for info in engine.adapters.list()] == ["ok"]
    assert "'base-id': it has the base model's name" in caplog.text
    engine.check_integrity()

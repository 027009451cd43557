"""loadtests/stream_client.py's parsing of streamed answers (events split anywhere, broken
streams refused), percentiles, and a server that cannot start failing fast."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import pytest

from loraplex.loadtests.server_process import ServerProcess
from loraplex.loadtests.stream_client import StreamError, completion_body, percentile, stream_one

LORAPLEX = str(Path(sys.executable).with_name("loraplex"))


def _sse_server(chunks: list[bytes]):
    """An aiohttp app whose /v1/completions streams `chunks` as they are (any split)."""
    from aiohttp import web

    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for c in chunks:
            await resp.write(c)
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    return app


def _stream_against(chunks: list[bytes], logprobs: bool = False):
    from aiohttp import web

    async def go():
        runner = web.AppRunner(_sse_server(chunks))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
                return await stream_one(session, 0, completion_body("m", [1, 2], 2, logprobs))
        finally:
            await runner.cleanup()

    return asyncio.run(go())


def test_stream_parser_takes_events_split_anywhere():
    events = [
        {"choices": [{"text": "he", "logprobs": {"tokens": ["he"], "token_logprobs": [-0.5]}}]},
        {"choices": [{"text": "llo", "finish_reason": "length",
                      "logprobs": {"tokens": ["llo"], "token_logprobs": [-1.5]}}]},
        {"choices": [], "usage": {"completion_tokens": 2}},
    ]  # fmt: skip
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    body += b"data: [DONE]\r\n\r\n"
    for cut in ([], [7], [3, 40, 41, 90], list(range(1, len(body)))):  # byte-level splits too
        edges = [0, *cut, len(body)]
        res = _stream_against(
            [body[a:b] for a, b in zip(edges, edges[1:], strict=False)], logprobs=True
        )
        assert (res.text, res.completion_tokens, res.finish_reason) == ("hello", 2, "length")
        assert res.tokens == ["he", "llo"] and res.token_logprobs == [-0.5, -1.5]
        assert len(res.chunk_times) == 2 and res.itls == [res.chunk_times[1] - res.chunk_times[0]]


def test_stream_parser_refuses_broken_streams():
    usage = b'data: {"choices": [], "usage": {"completion_tokens": 1}}\n\n'
    one = b'data: {"choices": [{"text": "a"}]}\n\n'
    with pytest.raises(StreamError, match="without tokens, usage or"):
        _stream_against([one, usage])  # no [DONE]
    with pytest.raises(StreamError, match="error event"):
        _stream_against([one, b'data: {"error": {"message": "boom"}}\n\n'])


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 90) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)


def test_server_that_cannot_start_fails_fast(tmp_path):
    with pytest.raises(SystemExit, match="exited with status"):
        with ServerProcess(LORAPLEX, ["--model", str(tmp_path / "missing")], 0, str(tmp_path)):
            pass

"""The official `openai` package against a loraplex server: a completion on the base model, a
chat on an adapter, and a streamed completion on the adapter.

    python clients/examples/openai_example.py --base-url http://127.0.0.1:8000/v1
    python clients/examples/openai_example.py --api-key KEY --model loraplex-demo \\
        --adapter demo-reverse

`--model` defaults to the base model listed by `/v1/models` (the entry without a parent),
`--adapter` to the first adapter listed (the base model if there is none). `--api-key`
defaults to $LORAPLEX_API_KEY (a server started without keys accepts any). Exit status 0 when
every call succeeded, 1 with the server's error otherwise. The default prompt and chat message
suit the demo model of `make serve` (its chat template renders the user message "hello world"
as the prompt "hello world ->").
"""

from __future__ import annotations

import argparse
import os
import sys

import openai


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY") or "none")
    p.add_argument("--model", default=None, help="base model id (default: from /v1/models)")
    p.add_argument("--adapter", default=None, help="adapter name (default: the first listed)")
    p.add_argument("--prompt", default="hello world ->")
    p.add_argument("--max-tokens", type=int, default=24)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    listed = client.models.list().data
    parent = {m.id: (m.model_extra or {}).get("parent") for m in listed}
    model = args.model or next(m for m, p in parent.items() if p is None)
    adapter = args.adapter or next((m for m, p in parent.items() if p is not None), model)
    print(f"models: {', '.join(parent)}")

    # 1. A completion on the base model, greedy, with log-probabilities.
    out = client.completions.create(
        model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0, logprobs=0
    )
    choice = out.choices[0]
    u = out.usage
    print(f"\n[completion on {model}] finish_reason={choice.finish_reason}, "
          f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens")  # fmt: skip
    print(f"{args.prompt}{choice.text}")
    lps = choice.logprobs.token_logprobs
    print(f"log-probability of the {len(lps)} generated tokens: {sum(lps):.3f}")

    # 2. A chat on the adapter; loraplex extensions (vLLM's names) go in extra_body.
    chat = client.chat.completions.create(
        model=adapter,
        messages=[{"role": "user", "content": "hello world"}],
        max_completion_tokens=args.max_tokens,
        temperature=0.7,
        seed=1,
        extra_body={"top_k": 40},
    )
    print(f"\n[chat on {adapter}] finish_reason={chat.choices[0].finish_reason}")
    print(chat.choices[0].message.content)

    # 3. A streamed completion on the adapter, usage in the last chunk.
    print(f"\n[stream on {adapter}]")
    print(args.prompt, end="", flush=True)
    stream = client.completions.create(
        model=adapter, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].text, end="", flush=True)
        elif chunk.usage is not None:
            print(f"\nusage: {chunk.usage.completion_tokens} tokens generated")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except openai.APIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the relay spends on a request body before it reaches the upstream, per call.

Coding agents send large bodies (a system prompt, two dozen tool schemas, the conversation so
far, tool results full of code): the benchmark points use a small chat body, so this measures
the body steps alone on a synthetic agent-sized one. In process, one thread, no server:

    .venv/bin/python -m bench.body_bench [--kb 180] [--reps 200]

Steps: json.loads (as routes._json_body), the nesting check (routes._too_deep), the hold's size
estimate (metering.estimate), and the re-encode sent upstream (proxy._open, protocols.dumps).
The standard library's encoding of the same body is printed beside it, for comparison.
"""
from __future__ import annotations

import argparse
import json
import random
import string
import time

from console.relay.metering import estimate
from console.relay.protocols import MESSAGES, dumps, prepare_body
from console.relay.routes import _too_deep


def _text(rng: random.Random, chars: int) -> str:
    words = ("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(chars // 6))
    return " ".join(words)


def agent_body(kb: int, seed: int = 1) -> dict:
    """An Anthropic Messages request shaped like a coding agent's turn, about `kb` kB."""
    rng = random.Random(seed)
    code = 'def f(x):\n    return [{"k": x}, [x]]  # "quoted" \\ back\n'
    tools = [{"name": f"tool_{i}", "description": _text(rng, 400), "input_schema": {
        "type": "object", "required": ["p0"],
        "properties": {f"p{j}": {"type": ["string", "null"], "description": _text(rng, 80)} for j in range(8)}}}
        for i in range(24)]
    body = {"model": "claude-sonnet-4-5", "max_tokens": 32000, "stream": True, "tools": tools,
            "system": [{"type": "text", "text": _text(rng, 12000), "cache_control": {"type": "ephemeral"}}],
            "messages": []}
    i = 0
    while len(json.dumps(body)) < kb * 1024:
        body["messages"] += [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{i}",
                                          "content": _text(rng, 1000) + code * 8}]},
            {"role": "assistant", "content": [{"type": "text", "text": _text(rng, 300)},
                                              {"type": "tool_use", "id": f"t{i + 1}", "name": "tool_1",
                                               "input": {"p0": _text(rng, 100)}}]}]
        i += 1
    return body


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kb", type=int, default=180)
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args(argv)
    body = agent_body(args.kb)
    raw = json.dumps(body).encode()

    def ms(fn) -> float:
        fn()
        start = time.process_time()
        for _ in range(args.reps):
            fn()
        return (time.process_time() - start) / args.reps * 1000

    steps = {
        "json.loads": lambda: json.loads(raw),
        "nesting check": lambda: _too_deep(raw, body),
        "size estimate": lambda: estimate(body),
        "re-encode for the upstream": lambda: dumps(prepare_body(MESSAGES, body, "upstream-name")[0]),
    }
    stdlib = ms(lambda: json.dumps(prepare_body(MESSAGES, body, "upstream-name")[0],
                                   ensure_ascii=False, separators=(",", ":")).encode())
    print(f"body {len(raw) / 1024:.0f} kB, {raw.count(b'{') + raw.count(b'[')} brackets; CPU ms per call:")
    total = 0.0
    for name, fn in steps.items():
        t = ms(fn)
        total += t
        print(f"  {name:28s} {t:7.3f}")
    print(f"  {'total':28s} {total:7.3f}")
    print(f"  (the re-encode with the standard library's json: {stdlib:.3f})")


if __name__ == "__main__":
    main()

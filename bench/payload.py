"""Parse-plus-routing-text time per request next to orjson.loads of the same body, same run.

    .venv/bin/python -m bench.payload      → bench/results/payload.json

Target ([payload]): at most 2x orjson.loads for 1 KB, 32 KB and 1 MB chat bodies.
"""

from __future__ import annotations

import random

import orjson

from extproc.config import DEFAULTS
from extproc.payload import routing_input

from .common import per_call, write


def chat_body(size: int, seed: int = 0) -> bytes:
    """A realistic chat body: a system prompt, tools, then turns with tool calls, up to ``size`` bytes."""
    rng = random.Random(seed)
    words = ["flight", "booking", "passenger", "reservation", "policy", "refund", "the", "a", "to", "of", "and", "baggage"]
    msgs = [{"role": "system", "content": " ".join(rng.choice(words) for _ in range(200))}]
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "look things up", "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}} for i in range(4)]
    turn = 0
    while len(orjson.dumps({"model": "m", "tools": tools, "messages": msgs})) < size:
        turn += 1
        msgs.append({"role": "user", "content": " ".join(rng.choice(words) for _ in range(30))})
        msgs.append({"role": "assistant", "content": None, "tool_calls": [{"id": f"c{turn}", "type": "function", "function": {"name": "tool_1", "arguments": '{"id": "%d"}' % turn}}]})
        msgs.append({"role": "tool", "tool_call_id": f"c{turn}", "content": " ".join(rng.choice(words) for _ in range(60))})
    return orjson.dumps({"model": "m", "tools": tools, "messages": msgs})


def main() -> dict:
    rows = []
    for label, size in (("1KB", 1024), ("32KB", 32 * 1024), ("1MB", 1024 * 1024)):
        body = chat_body(size)
        base = per_call(lambda: orjson.loads(body))
        row = {"body": label, "bytes": len(body), "orjson_loads_us": base["median_s"] * 1e6}
        for form in ("sglang", "template"):
            t = per_call(lambda: routing_input("/v1/chat/completions", body, **{**DEFAULTS.parse_options(), "form": form}))
            row[f"{form}_us"] = t["median_s"] * 1e6
            row[f"{form}_ratio"] = t["median_s"] / base["median_s"]
        rows.append(row)
    result = {"benchmark": "payload", "target_ratio_max": 2.0, "rows": rows}
    path = write("payload", result)
    for r in rows:
        print(f"{r['body']:>5}: orjson.loads {r['orjson_loads_us']:9.1f} us | sglang {r['sglang_us']:9.1f} us ({r['sglang_ratio']:.2f}x) | template {r['template_us']:9.1f} us ({r['template_ratio']:.2f}x)")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

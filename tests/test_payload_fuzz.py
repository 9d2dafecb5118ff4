"""Fuzzing the payload parser: no input, however broken, raises or escapes the "no routing text" path.

The suite runs a short campaign (FUZZ_EXAMPLES=2,000 per property); `make fuzz` runs the same
properties with FUZZ_EXAMPLES=34,000 each (3 properties: 102,000 inputs).
"""

import gzip
import os
import zlib

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config import DEFAULTS
from extproc.payload import routing_input as _routing_input

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
PATHS = ["/v1/chat/completions", "/v1/completions", "/generate", "/v1/responses", "/v1/messages",
         "/v1/embeddings", "/v1/rerank", "/x/v1/chat/completions?q=1", "/v1/models", ""]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["model", "messages", "role", "content", "type", "text", "prompt", "input", "input_ids", "tools",
                         "tool_calls", "function", "arguments", "system", "instructions", "query", "documents", "name",
                         "reasoning_content", "lora_path", "cache_salt", "tool_call_id"]) | st.text(max_size=5),
        children, max_size=5),
    max_leaves=30,
)

fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def routing_input(path, body, **kw):
    """The parser under the default options, with some of them changed."""
    return _routing_input(path, body, **{**DEFAULTS.parse_options(), **kw})


def check(path, body, encoding=None):
    r = routing_input(path, body, content_encoding=encoding, max_routing_chars=500, max_body_bytes=1 << 20)
    assert isinstance(r.text, str) and len(r.text) <= 500
    assert (r.text == "") == (r.reason is not None)


@fuzz
@given(path=st.sampled_from(PATHS), doc=json_values)
def test_structured_json_of_any_shape(path, doc):
    check(path, orjson.dumps(doc))


@fuzz
@given(path=st.sampled_from(PATHS), body=st.binary(max_size=300))
def test_arbitrary_bytes(path, body):
    check(path, body)


@fuzz
@given(path=st.sampled_from(PATHS), doc=json_values, enc=st.sampled_from(["gzip", "deflate", "br", "GZIP", " identity "]),
       cut=st.integers(0, 50))
def test_compressed_and_truncated(path, doc, enc, cut):
    raw = orjson.dumps(doc)
    body = gzip.compress(raw) if enc.strip().lower() == "gzip" else zlib.compress(raw) if enc == "deflate" else raw
    check(path, body[: max(0, len(body) - cut)], enc)


def test_a_100_mb_body_is_not_parsed():
    body = b'{"prompt": "' + b"x" * (100 * 1024 * 1024) + b'"}'
    r = routing_input("/v1/completions", body)
    assert r.reason == "body_too_large"


# -- adversarial shapes: what a hostile client sends to exhaust memory ------------------------------

SHAPES = ("container_bomb", "huge_partition_key", "deep_nesting", "many_messages", "long_text", "number_flood")


def adversarial_body(shape: str, n: int) -> bytes:
    if shape == "container_bomb":
        return b'{"messages":[' + b",".join([b"{}"] * n) + b"]}"
    if shape == "huge_partition_key":
        return orjson.dumps({"model": "m" * n, "cache_salt": "s" * n, "messages": [{"role": "user", "content": "hi"}]})
    if shape == "deep_nesting":
        return b'{"messages":' + b"[" * n + b"]" * n + b"}"
    if shape == "many_messages":
        return orjson.dumps({"messages": [{"role": "user", "content": "x"} for _ in range(n // 30)]})
    if shape == "number_flood":
        return b'{"prompt":[' + b",".join([b"1"] * n) + b"]}"
    return orjson.dumps({"messages": [{"role": "user", "content": "y" * n}]})


@settings(max_examples=max(30, EXAMPLES // 40), deadline=None, suppress_health_check=list(HealthCheck))
@given(shape=st.sampled_from(SHAPES), n=st.integers(1, 400_000), zipped=st.booleans())
def test_no_shape_costs_more_memory_than_a_small_multiple_of_its_capped_body(shape, n, zipped):
    """Whatever the expansion ratio (gzip of a bomb is ~1,000x), the parser's peak memory stays
    within 20x the decompressed body (capped by max_body_bytes) plus ~128 bytes per JSON container
    (capped by max_json_containers): ~360 MB at the defaults, one parse at a time."""
    import tracemalloc

    cap = 4 * 1024 * 1024
    raw = adversarial_body(shape, n)
    body = gzip.compress(raw) if zipped else raw
    parse = lambda: routing_input("/v1/chat/completions", body, content_encoding="gzip" if zipped else None, max_body_bytes=cap)  # noqa: E731
    parse()  # one-time allocations (caches, lazy imports) are not the input's cost
    tracemalloc.start()
    try:
        r = parse()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a parsed object or array costs ~100 bytes whatever its size in the body (2 bytes for {}),
    # which is why their number is capped before parsing (max_json_containers)
    containers = min(raw.count(b"{") + raw.count(b"["), DEFAULTS.max_json_containers)
    # orjson's parse itself peaks at 13x its input (measured, any size), and an array of one-digit
    # numbers adds a pointer per two bytes: 16x seen; 20x leaves room
    assert peak <= 20 * min(len(raw), cap + 1) + 128 * containers + 1_000_000, (shape, n, peak)
    if shape == "container_bomb" and n > DEFAULTS.max_json_containers:
        assert r.reason in ("too_complex", "body_too_large")
    if shape == "huge_partition_key" and r.reason is None:
        assert len(r.partition) == 32  # a digest, whatever the client sent

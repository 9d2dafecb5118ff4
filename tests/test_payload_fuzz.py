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

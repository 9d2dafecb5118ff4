"""Reading what a worker reused from its response (extproc.usage)."""

import orjson
import pytest

from extproc.usage import KEEP_BYTES, TAIL_BYTES, keep, prompt_and_cached


def chat_json(prompt=157, cached=144, details=True):
    usage = {"prompt_tokens": prompt, "completion_tokens": 4}
    if details:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return orjson.dumps({"id": "x", "choices": [{"message": {"content": "hi"}}], "usage": usage})


def sse(*events):
    return b"".join(b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n\n" for e in events)


@pytest.mark.parametrize(
    "body, whole, expected",
    [
        (chat_json(), True, (157, 144)),
        (chat_json(cached=0), True, (157, 0)),
        (chat_json(details=False), True, None),  # no cache report (sglang without --enable-cache-report)
        (orjson.dumps({"text": "x", "meta_info": {"prompt_tokens": 40, "cached_tokens": 32}}), True, (40, 32)),
        (sse({"choices": [{"delta": {"content": "a"}}]}, {"choices": [], "usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 8}}}, b"[DONE]"),
         True, (9, 8)),
        (sse({"choices": [{"delta": {"content": "a"}}]}, b"[DONE]"), True, None),  # a stream without include_usage
        (b"not json at all", True, None),
        (chat_json(prompt=10, cached=11), True, None),  # more cached than the prompt: not believed
        (orjson.dumps({"usage": {"prompt_tokens": True, "prompt_tokens_details": {"cached_tokens": 0}}}), True, None),
        (chat_json(), False, None),  # a tail of a longer body is not a JSON document
    ],
)
def test_prompt_and_cached(body, whole, expected):
    assert prompt_and_cached(body, whole) == expected


def test_a_long_stream_keeps_its_tail_and_still_reads_the_usage():
    buf, total = bytearray(), 0
    filler = sse(*({"choices": [{"delta": {"content": "x" * 200}}]} for _ in range(100)))
    whole = True
    while total <= KEEP_BYTES + len(filler):
        total += len(filler)
        whole = keep(buf, filler, total)
    last = sse({"choices": [], "usage": {"prompt_tokens": 5000, "prompt_tokens_details": {"cached_tokens": 4096}}}, b"[DONE]")
    total += len(last)
    whole = keep(buf, last, total)
    assert not whole and len(buf) <= TAIL_BYTES
    assert prompt_and_cached(buf, whole) == (5000, 4096)

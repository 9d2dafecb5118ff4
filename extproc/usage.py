"""What a worker says it reused: prompt and cached tokens read from a response body.

SGLang (with ``--enable-cache-report``) and the fake worker report them in OpenAI responses as
``usage.prompt_tokens`` and ``usage.prompt_tokens_details.cached_tokens`` — in the last ``data:``
event of a stream when the client asked for ``stream_options.include_usage`` — and on ``/generate``
as ``meta_info.prompt_tokens`` and ``meta_info.cached_tokens``. Pure functions over bytes; the
handlers keep at most ``KEEP_BYTES`` of a response (its end: where usage is).
"""

from __future__ import annotations

import orjson

KEEP_BYTES = 1 << 20  # a whole JSON answer up to this size; past it only the tail (a stream's last events)
TAIL_BYTES = 64 * 1024


def is_whole(total: int) -> bool:
    """Whether a response of ``total`` bytes is kept whole (else only its tail)."""
    return total <= KEEP_BYTES


def keep(buffer: bytearray, chunk: bytes, total: int) -> bool:
    """Add ``chunk`` to what is kept of a response; returns whether the buffer still holds the whole
    body (``total`` bytes so far, chunk included: :func:`is_whole`). Past that only the last
    ``TAIL_BYTES`` stay."""
    buffer += chunk
    if is_whole(total):
        return True
    if len(buffer) > TAIL_BYTES:
        del buffer[: len(buffer) - TAIL_BYTES]
    return False


def _from(doc: object) -> tuple[int, int] | None:
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details")
        # no details: the server does not report its cache (sglang without --enable-cache-report)
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return _checked(prompt, cached)
    meta = doc.get("meta_info")
    if isinstance(meta, dict):
        return _checked(meta.get("prompt_tokens"), meta.get("cached_tokens"))
    return None


def _checked(prompt: object, cached: object) -> tuple[int, int] | None:
    if type(prompt) is not int or type(cached) is not int or prompt <= 0 or not 0 <= cached <= prompt:
        return None
    return prompt, cached


def prompt_and_cached(body: bytes, whole: bool) -> tuple[int, int] | None:
    """(prompt tokens, cached tokens) from a response body, or ``None`` when it reports none.

    ``whole``: ``body`` is the complete response (a JSON document is tried first); otherwise it is
    the tail of a longer one and only server-sent events can be read."""
    text = bytes(body)
    if whole and text[:1] in (b"{", b"["):
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            doc = None
        if doc is not None:
            return _from(doc)
    for line in reversed(text.split(b"\n")):  # a stream: its last event that carries usage
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload.startswith(b"{"):
            continue
        try:
            found = _from(orjson.loads(payload))
        except orjson.JSONDecodeError:
            continue
        if found is not None:
            return found
    return None

"""Request bodies turned into the text the router matches on.

The routing text decides everything downstream, so it must be *prefix-stable*: appending a turn to a
conversation only appends to its text. Two forms exist:

- ``sglang``: what sglang-router 0.3.2's ``cache_aware`` policy matches on (message contents joined by
  one space; roles, tools and templates ignored), so this layer and the routers below it see the same
  prefix structure.
- ``template``: a ChatML-like rendering with roles, tool definitions and tool calls in one canonical
  order (system, tools, messages), closer to what the engine really caches.

Nothing here raises on bad input: every failure is a :class:`RoutingInput` with no text and a
``reason`` the caller counts and logs. This module knows nothing of gRPC or of the tree.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import orjson

FORMS = ("sglang", "template")


@dataclass(frozen=True, slots=True)
class RoutingInput:
    """What the policy needs from one request.

    ``partition`` keeps requests for different models (or LoRA adapters, cache salts) apart in the
    tree; ``text`` is empty when the request has nothing to route on, and then ``reason`` says why.
    """

    partition: str
    text: str
    reason: str | None = None


def classify_path(path: str) -> str:
    """The API a request path belongs to, tolerant of path prefixes and query strings."""
    path = path.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    for suffix, name in _ENDPOINTS:
        if path.endswith(suffix):
            return name
    return "other"


_ENDPOINTS = (
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/generate", "generate"),
    ("/responses", "responses"),
    ("/messages", "messages"),
    ("/embeddings", "embeddings"),
    ("/rerank", "rerank"),
)


def decode_body(body: bytes, content_encoding: str | None, max_bytes: int) -> tuple[bytes | None, str | None]:
    """Undo ``Content-Encoding`` (gzip, deflate) with a hard cap on the output size."""
    enc = (content_encoding or "").strip().lower()
    if enc in ("", "identity"):
        return (body, None) if len(body) <= max_bytes else (None, "body_too_large")
    if enc not in ("gzip", "x-gzip", "deflate"):
        return None, "unsupported_encoding"
    # wbits 47 = auto-detect zlib or gzip headers; raw deflate is tried when that fails.
    for wbits in ((47,) if enc != "deflate" else (47, -15)):
        try:
            d = zlib.decompressobj(wbits)
            out = d.decompress(body, max_bytes + 1)
            if len(out) > max_bytes or d.unconsumed_tail:
                return None, "body_too_large"
            return out, None
        except zlib.error:
            continue
    return None, "bad_encoding"


def routing_input(
    path: str,
    body: bytes | None,
    *,
    content_encoding: str | None = None,
    form: str,
    max_routing_chars: int,
    max_body_bytes: int,
    max_json_containers: int,
) -> RoutingInput:
    """Parse one request into its partition and routing text; never raises.

    ``max_body_bytes`` caps the body after decompression (a gzip bomb costs at most that much);
    ``max_json_containers`` caps the objects and arrays a body may open, counted by a byte scan
    before parsing (a ``[{},{},…]`` bomb would otherwise cost ~100 bytes of memory and ~70 ns of
    the event loop per two bytes of input); ``max_routing_chars`` how much of the text is kept.
    Their defaults are the options'.
    """
    endpoint = classify_path(path)
    if endpoint == "other":
        return RoutingInput("", "", "no_routing_endpoint")
    if not body:
        return RoutingInput("", "", "empty_body")
    raw, why = decode_body(body, content_encoding, max_body_bytes)
    if raw is None:
        return RoutingInput("", "", why)
    # Brackets inside strings count too: an overestimate, which only ever routes by load.
    if raw.count(b"{") + raw.count(b"[") > max_json_containers:
        return RoutingInput("", "", "too_complex")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:  # orjson also refuses nesting deeper than 1,024
        return RoutingInput("", "", "invalid_json")
    if not isinstance(doc, dict):
        return RoutingInput("", "", "not_an_object")
    try:
        text = _EXTRACT[endpoint](doc, form)
    except RecursionError:
        return RoutingInput("", "", "too_deep")
    partition = partition_key(doc)
    if not text:
        return RoutingInput(partition, "", "no_text")
    return RoutingInput(partition, text[:max_routing_chars])


PARTITION_FIELDS = ("model", "lora_path", "cache_salt", "extra_key")


def partition_key(doc: dict[str, Any]) -> str:
    """Requests that can never share KV cache go to different partitions of the tree.

    The key is a 128-bit digest of the fields, so that a client's multi-megabyte ``model`` value
    costs the tree 32 characters like any other (the empty key when no field is given).
    """
    parts = [v if isinstance(v, str) else "" for v in map(doc.get, PARTITION_FIELDS)]
    if not any(parts):
        return ""
    try:
        raw = orjson.dumps(parts)  # unambiguous: no separator a value could contain
    except orjson.JSONEncodeError:  # a lone surrogate
        raw = repr(parts).encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------
# text helpers: each tolerates any JSON type and yields only strings


def _s(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _join(pieces: Iterable[str]) -> str:
    return " ".join(p for p in pieces if p)


def _parts_text(content: Any) -> str:
    """String content as is; a content-part array as its text parts joined by spaces."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return _join(_part_text(p) for p in content)
    return ""


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        return ""
    t = part.get("type")
    if t in ("text", "input_text", "output_text", None):
        return _s(part.get("text"))
    if t == "tool_result":  # Anthropic block
        return _parts_text(part.get("content"))
    return ""


def _dumps(v: Any) -> str:
    try:
        return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return ""


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []


# ---------------------------------------------------------------------------------------------
# chat: the sglang form, and the template form shared with the fake worker


def _chat(doc: dict[str, Any], form: str) -> str:
    messages = _list(doc.get("messages"))
    if form == "template":
        return render_chat_template(messages, doc.get("tools") or doc.get("functions"))
    return _sglang_chat(messages)


def _sglang_chat(messages: list) -> str:
    """Message contents (and reasoning) joined by one space.

    The hot path of the default form, so one flat loop: a generator per message cost more than
    orjson's whole parse of the body (measured by ``python -m bench.payload``).
    """
    out: list[str] = []
    append = out.append
    for m in messages:
        if type(m) is not dict:
            continue
        c = m.get("content")
        if type(c) is str:
            if c:
                append(c)
        elif type(c) is list:
            t = _parts_text(c)
            if t:
                append(t)
        r = m.get("reasoning_content")
        if type(r) is str and r:
            append(r)
    return " ".join(out)


def render_chat_template(messages: Any, tools: Any = None) -> str:
    """A ChatML-like rendering: system messages first, then tool definitions, then the rest.

    Used both as the ``template`` routing form and by the fake worker as "what the engine caches",
    so it must be deterministic (sorted JSON keys) and prefix-stable.
    """
    out: list[str] = []
    msgs = [m for m in _list(messages) if isinstance(m, dict)]
    # A leading run of system messages renders first; a system message later in the conversation
    # stays in place, otherwise appending it would rewrite the middle of the text.
    i = 0
    while i < len(msgs) and msgs[i].get("role") in ("system", "developer"):
        out.append(_chatml(_s(msgs[i].get("role")), _message_body(msgs[i])))
        i += 1
    tool_list = _list(tools)
    if tool_list:
        out.append(_chatml("tools", "\n".join(_dumps(t) for t in tool_list)))
    for m in msgs[i:]:
        out.append(_chatml(_s(m.get("role")) or "user", _message_body(m)))
    return "".join(out)


def _chatml(role: str, body: str) -> str:
    return f"<|im_start|>{role}\n{body}<|im_end|>\n"


def _message_body(m: dict[str, Any]) -> str:
    pieces = []
    if m.get("name") and isinstance(m.get("name"), str):
        pieces.append(f"[{m['name']}]")
    if isinstance(m.get("reasoning_content"), str):
        pieces.append(f"<think>{m['reasoning_content']}</think>")
    content = m.get("content")
    pieces.append(_parts_text(content))
    if isinstance(content, list):
        for p in content:
            if isinstance(p, dict) and p.get("type") not in ("text", "input_text", "output_text", None):
                pieces.append(_dumps(p) if p.get("type") in ("tool_use", "tool_result") else f"<{_s(p.get('type'))}>")
    for call in _list(m.get("tool_calls")):
        if isinstance(call, dict):
            fn = call.get("function") if isinstance(call.get("function"), dict) else {}
            pieces.append(f"<tool_call>{_s(fn.get('name'))} {_s(fn.get('arguments'))}</tool_call>")
    if isinstance(m.get("function_call"), dict):
        fc = m["function_call"]
        pieces.append(f"<tool_call>{_s(fc.get('name'))} {_s(fc.get('arguments'))}</tool_call>")
    if m.get("tool_call_id") and isinstance(m.get("tool_call_id"), str):
        pieces.insert(0, f"[{m['tool_call_id']}]")
    return "\n".join(p for p in pieces if p)


# ---------------------------------------------------------------------------------------------
# the other APIs


def _prompt_text(v: Any) -> str:
    """A prompt as a string, a list of strings, a token-id list, or a list of token-id lists."""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        if v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return " ".join(map(str, v))
        return _join(_prompt_text(x) for x in v)
    return ""


def _completions(doc: dict[str, Any], form: str) -> str:
    return _prompt_text(doc.get("prompt"))


def _generate(doc: dict[str, Any], form: str) -> str:
    text = doc.get("text")
    if text is not None:
        return _prompt_text(text)
    return _prompt_text(doc.get("input_ids"))


def _responses(doc: dict[str, Any], form: str) -> str:
    items = doc.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    msgs: list[dict[str, Any]] = []
    if isinstance(doc.get("instructions"), str):
        msgs.append({"role": "system", "content": doc["instructions"]})
    for it in _list(items):
        if not isinstance(it, dict):
            continue
        t = it.get("type")
        if t == "function_call_output":
            msgs.append({"role": "tool", "content": _s(it.get("output"))})
        elif t == "function_call":
            msgs.append({"role": "assistant", "tool_calls": [{"function": {"name": it.get("name"), "arguments": it.get("arguments")}}]})
        else:
            msgs.append(it)
    return _chat({"messages": msgs, "tools": doc.get("tools")}, form)


def _anthropic(doc: dict[str, Any], form: str) -> str:
    system = doc.get("system")
    msgs: list[Any] = []
    if isinstance(system, (str, list)):
        msgs.append({"role": "system", "content": system})
    msgs.extend(_list(doc.get("messages")))
    return _chat({"messages": msgs, "tools": doc.get("tools")}, form)


def _embeddings(doc: dict[str, Any], form: str) -> str:
    return _prompt_text(doc.get("input"))


def _rerank(doc: dict[str, Any], form: str) -> str:
    docs = _list(doc.get("documents"))
    return _join([_s(doc.get("query"))] + [d if isinstance(d, str) else _s(d.get("text")) if isinstance(d, dict) else "" for d in docs])


_EXTRACT = {
    "chat": _chat,
    "completions": _completions,
    "generate": _generate,
    "responses": _responses,
    "messages": _anthropic,
    "embeddings": _embeddings,
    "rerank": _rerank,
}

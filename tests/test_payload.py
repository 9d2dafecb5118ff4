"""The routing text of every request shape, both forms, and bad input."""

import gzip
import zlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config import DEFAULTS
from extproc.payload import classify_path, render_chat_template
from extproc.payload import routing_input as _routing_input


def routing_input(path, body, **kw):
    """The parser under the default options, with some of them changed."""
    return _routing_input(path, body, **{**DEFAULTS.parse_options(), **kw})


def ri(path, doc, **kw):
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return routing_input(path, body, **kw)


def test_paths_with_prefixes_and_queries():
    assert classify_path("/v1/chat/completions") == "chat"
    assert classify_path("/openai/v1/chat/completions?api-version=1") == "chat"
    assert classify_path("/v1/completions/") == "completions"
    assert classify_path("/generate") == "generate"
    assert classify_path("/v1/responses") == "responses"
    assert classify_path("/v1/messages") == "messages"
    assert classify_path("/v1/embeddings") == "embeddings"
    assert classify_path("/v1/rerank") == "rerank"
    assert classify_path("/v1/models") == "other"
    assert classify_path("/health") == "other"


def test_chat_sglang_form_matches_generate_text():
    chat = ri("/v1/chat/completions", {"model": "m", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]})
    gen = ri("/generate", {"model": "m", "text": "S U"})
    assert chat.text == "S U" == gen.text


def test_chat_sglang_form_parts_reasoning_tools():
    doc = {
        "model": "m",
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c", "reasoning_content": "r", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "1", "content": "t"},
        ],
    }
    assert ri("/v1/chat/completions", doc).text == "a b c r t"


def test_template_form_has_roles_tools_and_calls_in_canonical_order():
    doc = {
        "model": "m",
        "tools": [{"type": "function", "function": {"name": "lookup"}}],
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "lookup", "arguments": "{\"q\":1}"}}]},
        ],
    }
    text = ri("/v1/chat/completions", doc, form="template").text
    assert text.index("system\nS") < text.index("lookup") < text.index("user\nU") < text.index("<tool_call>lookup")
    no_tools = ri("/v1/chat/completions", {**doc, "tools": []}, form="template").text
    assert no_tools != text


def test_completions_prompt_shapes():
    assert ri("/v1/completions", {"prompt": "p"}).text == "p"
    assert ri("/v1/completions", {"prompt": ["a", "b"]}).text == "a b"
    assert ri("/v1/completions", {"prompt": [1, 2, 3]}).text == "1 2 3"
    assert ri("/v1/completions", {"prompt": [[1, 2], [3]]}).text == "1 2 3"


def test_generate_input_ids_and_text_list():
    assert ri("/generate", {"input_ids": [5, 6]}).text == "5 6"
    assert ri("/generate", {"text": ["x", "y"]}).text == "x y"


def test_responses_anthropic_embeddings_rerank():
    assert ri("/v1/responses", {"instructions": "I", "input": "hello"}).text == "I hello"
    assert ri("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "q"}]}]}).text == "q"
    doc = {"system": [{"type": "text", "text": "S"}], "messages": [{"role": "user", "content": [{"type": "text", "text": "U"}]},
           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "1", "content": "R"}]}]}
    assert ri("/v1/messages", doc).text == "S U R"
    assert ri("/v1/embeddings", {"input": ["a", "b"]}).text == "a b"
    assert ri("/v1/rerank", {"query": "q", "documents": ["d1", {"text": "d2"}]}).text == "q d1 d2"


def test_partition_by_model_lora_and_salt():
    base = {"messages": [{"role": "user", "content": "x"}]}
    keys = {ri("/v1/chat/completions", {**base, **extra}).partition for extra in (
        {"model": "a"}, {"model": "b"}, {"model": "a", "lora_path": "l"}, {"model": "a", "cache_salt": "s"}, {"model": "a", "extra_key": "k"},
        {"model": "a\x1fl"}, {"model": "x" * 1_000_000})}
    assert len(keys) == 7  # a value holding the old separator does not collide with two fields
    assert all(len(k) == 32 for k in keys)  # a fixed-size digest, whatever the client sent
    assert ri("/v1/chat/completions", base).partition == ""


def test_gzip_and_deflate_bodies():
    body = orjson.dumps({"prompt": "zipped"})
    assert routing_input("/v1/completions", gzip.compress(body), content_encoding="gzip").text == "zipped"
    assert routing_input("/v1/completions", zlib.compress(body), content_encoding="deflate").text == "zipped"
    raw = zlib.compressobj(wbits=-15)
    deflated = raw.compress(body) + raw.flush()
    assert routing_input("/v1/completions", deflated, content_encoding="deflate").text == "zipped"


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"", "empty_body"),
        (b"{not json", "invalid_json"),
        (b"[1,2]", "not_an_object"),
        (b"\xff\xfe{}", "invalid_json"),
        (b'{"prompt": "\\ud800"}', "invalid_json"),
        (b"[" * 10000 + b"]" * 10000, "invalid_json"),
        (b'{"prompt": ' + b"9" * 1_000_000 + b"}", "invalid_json"),
        (b'{"prompt": 12}', "no_text"),
        (b'{"prompt": {"a": [null, true]}}', "no_text"),
    ],
)
def test_bad_input_is_a_reason_never_an_exception(body, reason):
    r = routing_input("/v1/completions", body)
    assert r.text == "" and r.reason == reason


def test_gzip_bomb_is_capped():
    bomb = gzip.compress(b" " * (50 * 1024 * 1024))
    r = routing_input("/v1/completions", bomb, content_encoding="gzip", max_body_bytes=1024 * 1024)
    assert r.reason == "body_too_large"


def test_duplicate_keys_take_the_last():
    assert routing_input("/v1/completions", b'{"prompt": "a", "prompt": "b"}').text == "b"


def test_routing_text_is_capped():
    assert len(ri("/v1/completions", {"prompt": "x" * 5000}, max_routing_chars=100).text) == 100


messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "tool"]), "content": st.one_of(st.text(max_size=30), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}), max_size=3))}
    ),
    min_size=0,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(system=st.text(max_size=40), first=messages, more=messages, form=st.sampled_from(["sglang", "template"]))
def test_appending_turns_only_appends_to_the_text(system, first, more, form):
    head = [{"role": "system", "content": system}] + first
    a = ri("/v1/chat/completions", {"model": "m", "messages": head}, form=form).text
    b = ri("/v1/chat/completions", {"model": "m", "messages": head + more}, form=form).text
    assert b.startswith(a)


def test_render_chat_template_is_deterministic_with_sorted_tool_json():
    t1 = render_chat_template([{"role": "user", "content": "u"}], [{"b": 1, "a": 2}])
    t2 = render_chat_template([{"role": "user", "content": "u"}], [{"a": 2, "b": 1}])
    assert t1 == t2


def test_a_json_bomb_is_refused_before_parsing():
    bomb = b'{"messages":[' + b",".join([b"{}"] * 300_000) + b"]}"
    assert routing_input("/v1/chat/completions", bomb).reason == "too_complex"
    zipped = gzip.compress(bomb)
    assert len(zipped) < 20_000 and routing_input("/v1/chat/completions", zipped, content_encoding="gzip").reason == "too_complex"
    # a real conversation with many messages and parts stays far below the bound
    msgs = [{"role": "user", "content": [{"type": "text", "text": f"part {i}"}]} for i in range(10_000)]
    assert routing_input("/v1/chat/completions", orjson.dumps({"messages": msgs})).reason is None


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"b": 1, "a": 2}}}]


def test_template_form_renders_every_part_exactly():
    """The whole rendering pinned: roles, the leading system run, tools with sorted keys, names,
    reasoning, non-text parts, tool calls (both forms), tool call ids, a late system message kept
    in place, a message without a role."""
    msgs = [
        {"role": "system", "content": "S"}, {"role": "developer", "content": "D"},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}},
                                                    {"type": "tool_result", "content": "R"}]},
        {"role": "assistant", "reasoning_content": "think", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}],
         "function_call": {"name": "g", "arguments": "{}"}},
        {"role": "tool", "tool_call_id": "c1", "content": "out"}, {"role": "system", "content": "late"}, {"content": "norole"},
    ]
    assert render_chat_template(msgs, TOOLS) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>developer\nD<|im_end|>\n"
        '<|im_start|>tools\n{"function":{"name":"f","parameters":{"a":2,"b":1}},"type":"function"}<|im_end|>\n'
        '<|im_start|>user\n[ann]\nlook R\n<image_url>\n{"content":"R","type":"tool_result"}<|im_end|>\n'
        '<|im_start|>assistant\n<think>think</think>\n<tool_call>f {"a":1}</tool_call>\n<tool_call>g {}</tool_call><|im_end|>\n'
        "<|im_start|>tool\n[c1]\nout<|im_end|>\n<|im_start|>system\nlate<|im_end|>\n<|im_start|>user\nnorole<|im_end|>\n"
    )


@pytest.mark.parametrize("path,doc,want", [
    ("/v1/responses", {"instructions": "I", "input": [{"role": "user", "content": "u"}, {"type": "function_call", "name": "f", "arguments": "{}"},
                                                      {"type": "function_call_output", "output": "o"}], "tools": TOOLS},
     '<|im_start|>system\nI<|im_end|>\n<|im_start|>tools\n{"function":{"name":"f","parameters":{"a":2,"b":1}},"type":"function"}<|im_end|>\n'
     "<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n<tool_call>f {}</tool_call><|im_end|>\n<|im_start|>tool\no<|im_end|>\n"),
    ("/v1/responses", {"input": "just text"}, "<|im_start|>user\njust text<|im_end|>\n"),
    ("/v1/messages", {"system": "S", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "tool_use", "name": "t", "input": {"x": 1}}]}]},
     '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi\n{"input":{"x":1},"name":"t","type":"tool_use"}<|im_end|>\n'),
])
def test_template_form_of_the_responses_and_messages_apis(path, doc, want):
    assert ri(path, doc, form="template").text == want


def test_odd_shapes_each_part_of_the_renderers_must_handle():
    # the sglang form: text-like parts of every name, anything else contributes nothing
    parts = [{"type": "output_text", "text": "o"}, {"type": "input_text", "text": "i"}, {"type": "mystery", "text": "m"}, {"text": "bare"}]
    assert ri("/v1/chat/completions", {"messages": [{"role": "user", "content": parts}]}).text == "o i bare"
    # rerank documents of any type
    assert ri("/v1/rerank", {"query": "q", "documents": ["a", {"text": "b"}, 5, None]}).text == "q a b"
    # template form: two tools on two lines; non-string names and ids ignored; a function that is not an object
    msgs = [{"role": "user", "name": 5, "tool_call_id": 7, "content": [{"type": "output_text", "text": "t"}, {"type": "input_text", "text": "u"}]},
            {"role": "assistant", "tool_calls": [{"function": "not an object"}]}]
    tools = [{"a": 1}, {"b": 2}, {"big": 2**70}]  # the last cannot be serialised: left out, not an error
    assert render_chat_template(msgs, tools) == (
        '<|im_start|>tools\n{"a":1}\n{"b":2}\n<|im_end|>\n<|im_start|>user\nt u<|im_end|>\n'
        "<|im_start|>assistant\n<tool_call> </tool_call><|im_end|>\n"
    )
    # Anthropic tools and a Responses input list with junk in it
    assert "<|im_start|>tools" in ri("/v1/messages", {"tools": [{"name": "t"}], "messages": [{"role": "user", "content": "x"}]}, form="template").text
    assert ri("/v1/responses", {"input": [5, {"role": "user", "content": "after junk"}]}).text == "after junk"

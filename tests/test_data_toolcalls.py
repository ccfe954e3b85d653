"""Parsing generated text back into tool calls, per style, including cut-off and invalid output."""

from __future__ import annotations

import json

import pytest

from ft.data.toolcalls import (
    FALLBACK,
    HERMES,
    LLAMA3,
    MISTRAL,
    detect_style,
    openai_tool_calls,
    parse_tool_calls,
)


def fn(name, args, cid=None):
    c = {"type": "function", "function": {"name": name, "arguments": args}}
    return {"id": cid, **c} if cid else c


SEARCH = fn("search", {"query": "Bob", "limit": 3})
PREPEND = fn("prepend", {"filePath": "Inbox.md", "content": "call Bob\n"})


@pytest.mark.parametrize("style", [HERMES, FALLBACK])
def test_hermes_blocks_with_and_without_text(style):
    one = '<tool_call>\n{"name": "search", "arguments": {"query": "Bob", "limit": 3}}\n</tool_call>'
    out = parse_tool_calls(one, style)
    assert out.content is None and out.tool_calls == [SEARCH] and out.error is None and out.called
    two = (
        "I'll do both.\n"
        + one
        + '\n<tool_call>\n{"name": "prepend", "arguments": "{\\"filePath\\": \\"Inbox.md\\", \\"content\\": \\"call Bob\\\\n\\"}"}\n</tool_call>'
    )
    out = parse_tool_calls(two, style)
    assert out.content == "I'll do both." and out.tool_calls == [SEARCH, PREPEND] and out.error is None
    plain = parse_tool_calls("Just an answer.", style)
    assert plain.content == "Just an answer." and plain.tool_calls == [] and not plain.called


@pytest.mark.parametrize(
    ("text", "calls", "words"),
    [
        ('<tool_call>\n{"name": "search", "arguments": {"query": "Bo', 0, "not valid JSON"),
        ('<tool_call>\n{"name": "search", "arguments": {"query": "Bo', 0, "no closing </tool_call>"),
        ("<tool_call>\nsearch(query='Bob')\n</tool_call>", 0, "not valid JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', 0, "has no function name"),
        ('<tool_call>{"name": "search", "arguments": [1]}</tool_call>', 0, "not an object"),
        (
            '<tool_call>{"name": "search", "arguments": "{oops"}</tool_call>',
            0,
            "arguments are not valid JSON",
        ),
        (
            '<tool_call>{"name": "search", "arguments": {"query": "Bob", "limit": 3}}</tool_call><tool_call>{"name":',
            1,
            "tool call 2",
        ),
    ],
)
def test_hermes_broken_calls_are_a_parse_failure_not_an_exception(text, calls, words):
    out = parse_tool_calls(text, HERMES)
    assert len(out.tool_calls) == calls and out.called
    assert out.error is not None and words in out.error
    assert out.content is not None and out.content in text  # the unreadable part stays as text


def test_a_complete_call_without_its_closing_tag_is_read():
    out = parse_tool_calls(
        '<tool_call>\n{"name": "search", "arguments": {"query": "Bob", "limit": 3}}', HERMES
    )
    assert out.tool_calls == [SEARCH] and out.error is None


def test_mistral_tool_calls():
    text = '[TOOL_CALLS] [{"name": "search", "arguments": {"query": "Bob", "limit": 3}, "id": "a1b2c3d4e"}, {"name": "prepend", "arguments": {"filePath": "Inbox.md", "content": "call Bob\\n"}}]'
    out = parse_tool_calls(text, MISTRAL)
    assert (
        out.tool_calls == [{"id": "a1b2c3d4e", **SEARCH}, PREPEND]
        and out.content is None
        and out.error is None
    )
    assert parse_tool_calls("No call here.", MISTRAL).content == "No call here."
    cut = parse_tool_calls('[TOOL_CALLS] [{"name": "search", "argu', MISTRAL)
    assert cut.error and "not valid JSON" in cut.error and cut.tool_calls == [] and cut.called
    assert "no function name" in parse_tool_calls('[TOOL_CALLS] [{"arguments": {}}]', MISTRAL).error


def test_llama3_json_calls():
    out = parse_tool_calls('{"name": "search", "parameters": {"query": "Bob", "limit": 3}}', LLAMA3)
    assert out.tool_calls == [SEARCH] and out.content is None and out.error is None
    tagged = parse_tool_calls(
        '<|python_tag|>{"name": "search", "parameters": {"query": "Bob", "limit": 3}}; '
        '{"name": "prepend", "parameters": {"filePath": "Inbox.md", "content": "call Bob\\n"}}',
        LLAMA3,
    )
    assert tagged.tool_calls == [SEARCH, PREPEND] and tagged.error is None
    # a JSON answer that is not a call, and plain text, are content
    data = parse_tool_calls('{"answer": 42}', LLAMA3)
    assert data.content == '{"answer": 42}' and not data.called
    assert parse_tool_calls("Bob's note is People/Bob.md.", LLAMA3).tool_calls == []
    cut = parse_tool_calls('{"name": "search", "parameters": {"query": ', LLAMA3)
    assert cut.called and "not valid JSON" in cut.error


def test_auto_style_and_non_text_input():
    assert parse_tool_calls(
        '[TOOL_CALLS] [{"name": "search", "arguments": {"query": "Bob", "limit": 3}}]'
    ).tool_calls == [SEARCH]
    assert parse_tool_calls(
        '<tool_call>{"name": "search", "arguments": {"query": "Bob", "limit": 3}}</tool_call>'
    ).tool_calls == [SEARCH]
    assert parse_tool_calls("hello").content == "hello"
    assert parse_tool_calls(None).error  # type: ignore[arg-type]
    assert "unknown tool-call style" in parse_tool_calls("x", "nope").error


def test_detect_style_from_template_source():
    assert detect_style("{{ messages }}") == FALLBACK
    assert detect_style(None) == FALLBACK
    assert detect_style("{% for tool_call in m.tool_calls %}<tool_call>{% endfor %}") == HERMES
    assert detect_style("{% if m.tool_calls %}[TOOL_CALLS] [{% endif %}") == MISTRAL
    assert detect_style("""{% if 'tool_calls' in m %}{{ '"parameters": ' }}{% endif %}""") == LLAMA3


def test_openai_form_has_json_text_arguments_and_ids():
    (a, b) = openai_tool_calls([{"id": "call_1", **SEARCH}, PREPEND])
    assert a == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "search", "arguments": '{"query": "Bob", "limit": 3}'},
    }
    assert b["id"].startswith("call_") and len(b["id"]) > 10
    assert json.loads(b["function"]["arguments"]) == PREPEND["function"]["arguments"]

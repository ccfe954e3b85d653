"""ft's tool fallback as one Jinja template (for exports), the Ollama template for it, and tools.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ft.data.sample_tools import tool_sample_records
from ft.data.templates import ChatTemplate, make_template
from ft.data.tool_store import ToolSetWriter, read_record_tools
from ft.data.tool_template import fallback_template, is_fallback_template

SPECIAL = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}


def _normalized(messages: list[dict]) -> list[dict]:
    """The sample's messages as ft normalizes them (arguments parsed into a dict)."""
    from ft.data.formats import Format, normalize

    return list(normalize({"messages": messages}, Format.CHAT).messages)


@pytest.fixture(scope="module")
def smollm2_template(smollm2_dir: Path) -> str:
    from ft.models.export.gguf_vocab import chat_template

    src = chat_template(smollm2_dir)
    assert src and "tool_call" not in src  # a template without tool support: ft uses its fallback
    return src


def test_fallback_template_renders_every_tool_conversation_as_ft_does(smollm2_template: str):
    ft_tmpl = make_template("model", smollm2_template, SPECIAL)
    wrapped_src = fallback_template(smollm2_template)
    assert is_fallback_template(wrapped_src) and not is_fallback_template(smollm2_template)
    wrapped = ChatTemplate(wrapped_src, "exported", SPECIAL)
    assert wrapped.renders_tools  # so ft itself renders through it natively when it comes back
    checked = 0
    for rec in tool_sample_records(120, seed=5):
        msgs, tools = _normalized(rec["conversations"]), rec["tools"]
        want = ft_tmpl.render(msgs, tools=tools)
        assert wrapped.render(msgs, tools=tools) == want
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":  # every generation prompt too
                a = ft_tmpl.render(msgs[:i], add_generation_prompt=True, tools=tools)
                assert wrapped.render(msgs[:i], add_generation_prompt=True, tools=tools) == a
                checked += 1
    assert checked > 200
    # Arguments as a JSON string (how OpenAI clients send them) render the same as the parsed object.
    rec = next(r for r in tool_sample_records(20) if r["pattern"] == "call_then_answer")
    raw = [dict(m, content=m["content"]) for m in rec["conversations"]]
    assert wrapped.render(raw, tools=rec["tools"]) == ft_tmpl.render(
        _normalized(rec["conversations"]), tools=rec["tools"]
    )
    # Plain conversations render exactly as the model's own template.
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert wrapped.render(plain) == ChatTemplate(smollm2_template, "own", SPECIAL).render(plain)


def test_tool_results_in_a_row_become_one_user_turn(smollm2_template: str):
    msgs = [
        {"role": "user", "content": "Read a and b."},
        {
            "role": "assistant",
            "content": "Reading both.",
            "tool_calls": [
                {"type": "function", "function": {"name": "read_note", "arguments": {"filePath": "a"}}},
                {"type": "function", "function": {"name": "read_note", "arguments": {"filePath": "b"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "1", "content": "A"},
        {"role": "tool", "tool_call_id": "2", "content": "B"},
        {"role": "assistant", "content": "A and B."},
    ]
    ft_text = make_template("model", smollm2_template, SPECIAL).render(msgs)
    assert ChatTemplate(fallback_template(smollm2_template), "x", SPECIAL).render(msgs) == ft_text
    assert "<tool_response>\nA\n</tool_response>\n<tool_response>\nB\n</tool_response>" in ft_text
    assert (
        'Reading both.\n<tool_call>\n{"name": "read_note", "arguments": {"filePath": "a"}}\n</tool_call>\n<tool_call>'
        in ft_text
    )


def test_modelfile_for_a_tool_tuned_chatml_model(smollm2_template: str):
    from ft.models.export.modelfile import modelfile

    text = modelfile(
        "m.gguf",
        fallback_template(smollm2_template),
        ["<|im_end|>"],
        context_length=2048,
        tool_fallback=True,
    )
    assert "{{- if .Tools }}" in text and "range $i, $c := .ToolCalls" in text and "<tool_response>" in text
    assert '{"name": "{{ $c.Function.Name }}", "arguments": {{ $c.Function.Arguments }}}' in text
    assert "You can call the functions below, described as JSON schemas:" in text
    assert 'SYSTEM "You are a helpful AI assistant named SmolLM' in text  # the template's default system
    plain = modelfile("m.gguf", smollm2_template, ["<|im_end|>"], context_length=2048)
    assert ".Tools" not in plain


def test_tool_sets_are_stored_once_and_read_per_record(tmp_path: Path):
    tools_a = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    tools_b = [{"type": "function", "function": {"name": "g", "parameters": {}}}]
    assert read_record_tools(tmp_path) is None
    w = ToolSetWriter(tmp_path)
    w.add(1, None)
    assert not (tmp_path / "tools.jsonl").exists()  # nothing written for records without tools
    for rid, tools in ((2, tools_a), (3, tools_b), (5, tools_a)):
        w.add(rid, tools)
    w.close()
    lines = (tmp_path / "tools.jsonl").read_text().splitlines()
    assert sum('"tools"' in line for line in lines) == 2
    assert read_record_tools(tmp_path) == {2: tools_a, 3: tools_b, 5: tools_a}
    assert json.loads(lines[0]) == {"set": 0, "tools": tools_a}

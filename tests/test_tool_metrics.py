"""Tool-call metrics (ft.data.toolmetrics) and the tool-use sample (ft.data.sample_tools)."""

from __future__ import annotations

import json

import pytest

from ft.data.toolmetrics import (
    Call,
    ToolCase,
    arguments_f1,
    as_call,
    call_errors,
    canonical,
    grouped,
    schema_errors,
    tool_metrics,
    tool_schemas,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "append_content",
            "parameters": {
                "type": "object",
                "properties": {"filePath": {"type": "string"}, "content": {"type": "string"}},
                "required": ["filePath", "content"],
                "additionalProperties": False,
            },
        },
    },
    {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
]
SCHEMAS = tool_schemas(TOOLS)
APPEND = Call("append_content", {"filePath": "a.md", "content": "x"})


def test_as_call_accepts_openai_shapes_and_decodes_json_arguments():
    openai = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert as_call(openai) == Call("f", {"a": 1})
    assert as_call({"name": "f", "arguments": {"a": 1}}) == Call("f", {"a": 1})
    assert as_call({"name": "f", "arguments": "{not json"}) == Call("f", "{not json")
    assert as_call({"name": "f", "arguments": ""}) == Call("f", {})


def test_canonical_ignores_key_order_and_int_float_but_not_bool():
    assert canonical({"b": 1, "a": [1.0, "x"]}) == canonical({"a": [1, "x"], "b": 1.0})
    assert canonical(True) != canonical(1)


def test_schema_subset():
    s = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 1, "maximum": 5},
            "mode": {"enum": ["a", "b"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            "name": {"type": ["string", "null"], "minLength": 2, "pattern": "^[a-z]+$"},
            "pick": {"anyOf": [{"type": "string"}, {"type": "boolean"}]},
        },
        "required": ["n"],
    }
    assert schema_errors({"n": 3, "mode": "a", "tags": ["x"], "name": None, "pick": True}, s) == []
    assert schema_errors({"n": 3.0}, s) == []  # an integral float is an integer in JSON
    errs = schema_errors({"n": 9, "mode": "c", "tags": ["x", 2, "z"], "name": "A", "pick": 3}, s)
    assert len(errs) == 7, errs  # n, mode, tags[1], tags length, name length and pattern, pick
    assert any("$.n: 9 violates maximum 5" in e for e in errs)
    assert any("$.tags[1]: expected string, got integer" in e for e in errs)
    assert schema_errors({}, s) == ["$: missing required 'n'"]
    assert schema_errors({"n": True}, s) == ["$.n: expected integer, got boolean"]
    assert schema_errors("x", {"type": "object"}) == ["$: expected object, got string"]


def test_call_errors_unknown_tool_extra_key_and_malformed():
    assert call_errors(APPEND, SCHEMAS) == []
    assert "not one of the tools" in call_errors(Call("delete", {}), SCHEMAS)[0]
    assert call_errors(Call("append_content", {"filePath": "a", "content": "b", "x": 1}), SCHEMAS) == [
        "$: unexpected 'x'"
    ]
    assert call_errors(Call("append_content", "{oops"), SCHEMAS)[0].startswith("not a call")


def test_arguments_f1():
    ref = [APPEND]
    assert arguments_f1(ref, ref) == 1.0
    half = [Call("append_content", {"filePath": "a.md", "content": "y"})]
    assert arguments_f1(half, ref) == pytest.approx(0.5)
    assert arguments_f1([], ref) == 0.0
    # an extra call's pairs count as misses: P = 2/3, R = 1
    extra = [APPEND, Call("search", {"q": "z"})]
    assert arguments_f1(extra, ref) == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))


def test_metrics_on_a_mix_of_cases():
    cases = [
        ToolCase([APPEND], [APPEND], schemas=SCHEMAS, label="desirable", group="append"),  # exact
        ToolCase(
            [APPEND],
            [Call("append_content", {"filePath": "b.md", "content": "x"})],  # right tool, one arg wrong
            schemas=SCHEMAS,
            label="desirable",
            group="append",
        ),
        ToolCase(
            [APPEND], [Call("search", {"q": 1})], schemas=SCHEMAS, group="append"
        ),  # wrong tool, invalid
        ToolCase([APPEND], [], malformed=True, schemas=SCHEMAS, group="append"),  # broken JSON
        ToolCase([APPEND], [], schemas=SCHEMAS, label="undesirable", group="append"),  # answered instead
        ToolCase([], [], schemas=SCHEMAS, group="chat"),  # answered, as the reference
        ToolCase([], [Call("search", {"q": "x"})], schemas=SCHEMAS, group="chat"),  # called, not needed
    ]
    m = tool_metrics(cases)
    assert (m.cases, m.call_cases, m.answer_cases) == (7, 5, 2)
    assert m.parseable_call_rate == pytest.approx(3 / 5)
    assert m.tool_name_accuracy == pytest.approx(2 / 5)
    assert m.arguments_exact_match == pytest.approx(1 / 5)
    assert m.arguments_f1 == pytest.approx((1 + 0.5 + 0 + 0 + 0) / 5)
    assert m.answered_instead_of_call == pytest.approx(1 / 5)
    assert m.called_instead_of_answer == pytest.approx(1 / 2)
    # predicted parseable calls checked: APPEND ok, b.md ok, search(q=1) invalid, search(q="x") ok
    assert m.schema_valid_rate == pytest.approx(3 / 4)
    assert m.malformed_calls == 1
    assert m.confusion == {"call/call": 4, "call/answer": 1, "answer/call": 1, "answer/answer": 1}

    by_label = grouped(cases, lambda c: c.label)
    assert set(by_label) == {"desirable", "undesirable", "unlabelled"}
    assert by_label["desirable"].tool_name_accuracy == 1.0
    assert by_label["undesirable"].answered_instead_of_call == 1.0
    by_group = grouped(cases, lambda c: c.group)
    assert by_group["chat"].call_cases == 0 and by_group["chat"].parseable_call_rate is None
    assert by_group["chat"].called_instead_of_answer == 0.5


def test_no_definitions_means_no_schema_rate():
    m = tool_metrics([ToolCase([APPEND], [APPEND], schemas=None)])
    assert m.schema_valid_rate is None and m.tool_name_accuracy == 1.0


def test_tool_sample_is_deterministic_labelled_and_well_formed():
    from ft.data.sample_tools import TOOLS as SAMPLE_TOOLS
    from ft.data.sample_tools import tool_sample_jsonl, tool_sample_records

    text = tool_sample_jsonl()
    assert text == tool_sample_jsonl() and text != tool_sample_jsonl(seed=7)
    recs = [json.loads(line) for line in text.splitlines()]
    assert len(recs) == 300 and len({json.dumps(r["conversations"]) for r in recs}) == 300
    good = sum(r["label"] for r in recs)
    assert 2.5 <= good / (len(recs) - good) <= 3.5  # about 3:1
    schemas = tool_schemas(SAMPLE_TOOLS)
    assert len(schemas) == 5
    kinds = {"call": 0, "text": 0}
    for r in recs:
        assert r["tools"] == SAMPLE_TOOLS and {"behavior", "pattern", "category"} <= set(r)
        conv = r["conversations"]
        assert conv[0]["role"] == "system" and "Open note:" in conv[0]["content"]
        calls = {}
        for m in conv:
            if m.get("tool_calls"):
                assert m["content"] is None
                for tc in m["tool_calls"]:
                    assert isinstance(tc["function"]["arguments"], str)
                    calls[tc["id"]] = as_call(tc)
            if m["role"] == "tool":
                assert m["tool_call_id"] in calls  # a result answers an earlier call
        assert conv[-1]["role"] == "assistant" and isinstance(conv[-1]["content"], str)
        kinds["call" if calls else "text"] += 1
        if r["label"]:
            assert r["behavior"] == "correct"
            for c in calls.values():  # desirable calls fit the tool definitions
                assert call_errors(c, schemas) == [], (r, c)
        assert r["pattern"] == ("call_then_answer" if calls else "text_only")
    assert kinds["text"] >= 40 and kinds["call"] >= 200
    assert sum(1 for _ in tool_sample_records(20, seed=3)) == 20


def test_init_tools_profile_writes_the_tool_sample(tmp_path):
    from ft.cli.app import run
    from ft.data.sample_tools import tool_sample_jsonl

    assert run(["init", str(tmp_path / "ws"), "--profile", "tools", "--json"]) == 0
    assert (tmp_path / "ws" / "data" / "sample.jsonl").read_text() == tool_sample_jsonl()
    assert "max_seq_length: 1024" in (tmp_path / "ws" / "train.yml").read_text()


def test_demo_takes_tools_or_nothing(capsys):
    from ft import demo

    assert demo.main(["bogus"]) == 2
    assert "usage: python -m ft.demo [tools]" in capsys.readouterr().err
    steps = [argv for _, argv in demo.TOOLS_STEPS]
    assert steps[0][-2:] == ["--profile", "tools"] and steps[-1][0] == "evaluate"
    assert "--group-by" in steps[-1]

"""Tool-calling conversations: normalization, reason codes, and rendering/masks against transformers."""

from __future__ import annotations

import json

import pytest

from ft.data.formats import Format, load_tools, normalize
from ft.data.validate import Reason, RecordError
from ft.errors import FtError

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "contentManager_prependContent",
            "description": "Insert text at the start of a note",
            "parameters": {
                "type": "object",
                "properties": {"filePath": {"type": "string"}, "content": {"type": "string"}},
                "required": ["filePath", "content"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "vaultLibrarian_search",
            "description": "Search the vault",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    },
]
SYSTEM = {"role": "system", "content": "Session: vault 'Work', open note Inbox.md"}
USER = {"role": "user", "content": "Add 'call Bob' at the top of Inbox.md"}
ARGS = {"filePath": "Inbox.md", "content": "call Bob\n"}


def call(name="contentManager_prependContent", args=None, cid="call_1"):
    args = ARGS if args is None else args
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def record(*messages, **extra):
    return {"messages": [SYSTEM, USER, *messages], **extra}


# The shapes: content null + calls, text + calls, results and a final answer, extra keys, labels.
NULL_CONTENT = record(
    {"role": "assistant", "content": None, "tool_calls": [call()]},
    behavior="direct",
    pattern="single",
    category="edit",
    label=True,
)
TEXT_AND_CALLS = record(
    {"role": "assistant", "content": "I'll add it now.", "tool_calls": [call()]},
    behavior="announce",
    label=False,
)
WITH_RESULTS = record(
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [call(), call("vaultLibrarian_search", {"query": "Bob"}, "c2")],
    },
    {
        "role": "tool",
        "tool_call_id": "call_1",
        "name": "contentManager_prependContent",
        "content": '{"ok": true}',
    },
    {"role": "tool", "tool_call_id": "c2", "content": {"hits": ["People/Bob.md"]}},
    {"role": "assistant", "content": "Added 'call Bob' to Inbox.md; Bob's note is People/Bob.md."},
    tools=TOOLS,
    category="edit",
    label=True,
)


def test_tool_call_records_normalize_to_openai_shaped_messages():
    ex = normalize(NULL_CONTENT)
    assert ex.fmt is Format.CHAT and ex.label == 1 and ex.tools is None
    assert ex.meta == {"behavior": "direct", "pattern": "single", "category": "edit"}
    assert ex.messages[2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "contentManager_prependContent", "arguments": ARGS},
            }
        ],
    }
    assert ex.tool_calls == 1 and ex.uses_tools and ex.turns == 2

    ex = normalize(TEXT_AND_CALLS)
    assert ex.messages[2]["content"] == "I'll add it now." and len(ex.messages[2]["tool_calls"]) == 1
    assert ex.label == 0 and ex.meta == {"behavior": "announce"}

    ex = normalize(WITH_RESULTS)
    assert ex.tools == tuple(TOOLS) and ex.tool_calls == 2 and ex.warnings == ()
    assert ex.messages[2]["content"] is None  # "" next to calls is no text
    assert ex.messages[3] == {
        "role": "tool",
        "content": '{"ok": true}',
        "tool_call_id": "call_1",
        "name": "contentManager_prependContent",
    }
    # a JSON value as a tool result is kept as its JSON text
    assert ex.messages[4] == {"role": "tool", "content": '{"hits": ["People/Bob.md"]}', "tool_call_id": "c2"}
    assert ex.messages[5] == {"role": "assistant", "content": WITH_RESULTS["messages"][-1]["content"]}
    assert ex.meta == {"category": "edit"}  # 'tools' is not metadata


def test_arguments_as_string_or_object_normalize_to_the_same_object():
    as_text = normalize(record({"role": "assistant", "content": None, "tool_calls": [call()]}))
    as_obj = normalize(
        record(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {**call(), "function": {"name": "contentManager_prependContent", "arguments": ARGS}}
                ],
            }
        )
    )
    twice = normalize(
        record(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        **call(),
                        "function": {
                            "name": "contentManager_prependContent",
                            "arguments": json.dumps(json.dumps(ARGS)),
                        },
                    }
                ],
            }
        )
    )
    assert as_text.messages == as_obj.messages == twice.messages
    assert as_text.content_key() == as_obj.content_key()
    # no arguments, an empty string, a bare {"name", "arguments"} call and OpenAI's legacy function_call
    bare = normalize(
        record({"role": "assistant", "tool_calls": [{"name": "vaultLibrarian_search", "arguments": ""}]})
    )
    legacy = normalize(
        record({"role": "assistant", "content": None, "function_call": {"name": "vaultLibrarian_search"}})
    )
    assert (
        bare.messages[2]
        == legacy.messages[2]
        == {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "vaultLibrarian_search", "arguments": {}}}
            ],
        }
    )


def test_sharegpt_function_call_and_observation_turns_with_a_tools_column():
    rec = {
        "conversations": [
            {"from": "human", "value": "Find Bob"},
            {
                "from": "function_call",
                "value": '{"name": "vaultLibrarian_search", "arguments": {"query": "Bob"}}',
            },
            {"from": "observation", "value": '{"hits": 1}'},
            {"from": "gpt", "value": "Found one note."},
        ],
        "system": "You manage a vault.",
        "tools": json.dumps([t["function"] for t in TOOLS]),  # LLaMA-Factory: bare functions, as JSON text
    }
    ex = normalize(rec)
    assert ex.fmt is Format.SHAREGPT
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert ex.messages[2]["tool_calls"] == [
        {"type": "function", "function": {"name": "vaultLibrarian_search", "arguments": {"query": "Bob"}}}
    ]
    assert ex.messages[3] == {"role": "tool", "content": '{"hits": 1}'}
    assert ex.tools == tuple(TOOLS)  # wrapped into the OpenAI form


def test_dataset_level_tools_apply_to_records_without_their_own(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps({"tools": [t["function"] for t in TOOLS]}))
    tools = load_tools(path)
    assert tools == tuple(TOOLS)
    assert normalize(NULL_CONTENT, tools=tools).tools == tools
    own = [TOOLS[1]]
    assert normalize({**NULL_CONTENT, "tools": own}, tools=tools, unknown_tool="warn").tools == tuple(own)
    for text, words in [
        ("[1]", "not an object"),
        ("{", "not valid JSON"),
        ("[]", "no tools"),
        ('[{"x": 1}]', "no function name"),
    ]:
        path.write_text(text)
        with pytest.raises(FtError, match=words) as err:
            load_tools(path)
        assert str(path) in err.value.message
    with pytest.raises(FtError, match="does not exist"):
        load_tools(tmp_path / "missing.json")


def test_unknown_tool_is_a_warning_or_an_error_by_option_and_skipped_without_definitions():
    rec = record(
        {"role": "assistant", "content": None, "tool_calls": [call("deleteEverything", {})]}, tools=TOOLS
    )
    ex = normalize(rec)  # default: warn
    assert [w.reason for w in ex.warnings] == [Reason.UNKNOWN_TOOL]
    assert "'deleteEverything'" in ex.warnings[0].message
    with pytest.raises(RecordError) as err:
        normalize(rec, unknown_tool="error")
    assert err.value.reason is Reason.UNKNOWN_TOOL and "not among the 2 tools" in err.value.message
    # no definitions anywhere: nothing to check against, the record is kept as is
    rec.pop("tools")
    assert normalize(rec, unknown_tool="error").warnings == ()


def _broken(messages, **extra):
    return {"messages": [USER, *messages], **extra}


@pytest.mark.parametrize(
    ("rec", "reason", "words"),
    [
        (
            _broken(
                [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{**call(), "function": {"name": "f", "arguments": '{"filePath": "a'}}],
                    }
                ]
            ),
            Reason.INVALID_ARGUMENTS,
            "messages[1].tool_calls[0] (f): arguments are not valid JSON",
        ),
        (
            _broken(
                [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{**call(), "function": {"name": "f", "arguments": "[1, 2]"}}],
                    }
                ]
            ),
            Reason.INVALID_ARGUMENTS,
            "arguments are a JSON list, not an object",
        ),
        (
            _broken(
                [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}],
                    }
                ]
            ),
            Reason.INVALID_TOOL_CALL,
            "has no function name",
        ),
        (
            _broken([{"role": "assistant", "content": None, "tool_calls": "call it"}]),
            Reason.INVALID_TOOL_CALL,
            "not a list of calls",
        ),
        (
            _broken(
                [
                    {"role": "assistant", "content": None, "tool_calls": [call()]},
                    {"role": "tool", "tool_call_id": "call_9", "content": "ok"},
                ]
            ),
            Reason.UNMATCHED_TOOL_RESULT,
            "message 3 answers tool_call_id 'call_9'",
        ),
        (
            _broken(
                [
                    {"role": "assistant", "content": "Sure."},
                    {"role": "tool", "content": "ok"},
                    {"role": "assistant", "content": "x"},
                ]
            ),
            Reason.TOOL_RESULT_BEFORE_CALL,
            "message 3 is a tool result, but no assistant turn before it called a tool",
        ),
        (
            {"messages": [{"role": "tool", "content": "ok"}, USER, {"role": "assistant", "content": "a"}]},
            Reason.TOOL_RESULT_BEFORE_CALL,
            "message 1 is a tool result",
        ),
        (
            _broken(
                [
                    {"role": "assistant", "content": None, "tool_calls": [call()]},
                    {"role": "tool", "content": "ok"},
                    {"role": "assistant", "content": "done"},
                    {"role": "tool", "content": "again"},
                ]
            ),
            Reason.UNMATCHED_TOOL_RESULT,
            "message 5 is a tool result, but message 4 (assistant) made no tool call",
        ),
        (
            _broken(
                [
                    {"role": "assistant", "content": None, "tool_calls": [call()]},
                    {"role": "user", "content": "and?"},
                ]
            ),
            Reason.NOT_ALTERNATING,
            "the tool calls of message 2 have no results",
        ),
        (
            _broken(
                [
                    {"role": "assistant", "content": None, "tool_calls": [call()]},
                    {"role": "tool", "content": "ok"},
                    USER,
                ]
            ),
            Reason.NOT_ALTERNATING,
            "user turn right after tool results",
        ),
        (
            _broken([{"role": "assistant", "content": None}]),
            Reason.MISSING_FIELD,
            "messages[1] has no 'content'",
        ),
        (
            _broken([{"role": "assistant", "content": "a"}], tools="nope"),
            Reason.INVALID_TOOLS,
            "not a list of tools",
        ),
        (
            _broken(
                [{"role": "assistant", "content": "a"}],
                tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}],
            ),
            Reason.INVALID_TOOLS,
            "parameters is a string",
        ),
    ],
)
def test_each_tool_reason_code(rec, reason, words):
    with pytest.raises(RecordError) as err:
        normalize(rec)
    assert err.value.reason is reason
    assert words in err.value.message


def test_a_conversation_may_end_on_calls_or_on_results():
    ends_on_call = normalize(_broken([{"role": "assistant", "content": None, "tool_calls": [call()]}]))
    ends_on_result = normalize(
        _broken(
            [
                {"role": "assistant", "content": None, "tool_calls": [call()]},
                {"role": "tool", "content": "ok"},
            ]
        )
    )
    assert ends_on_call.messages[-1]["role"] == "assistant" and ends_on_result.messages[-1]["role"] == "tool"

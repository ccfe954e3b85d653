"""Tool-calling conversations: normalization, reason codes, and rendering/masks against transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


# The issue's shapes: content null + calls, text + calls, results and a final answer, extra keys, labels.
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


# ----------------------------------------------------------------------------- rendering and masks
# The real templates of the three families (Qwen2.5-7B-Instruct, Llama-3.1-8B-Instruct, Mistral-7B-Instruct-v0.3),
# rendered by transformers' apply_chat_template as the reference.
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

MISTRAL_V03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

FAMILIES = {
    "qwen2.5": (
        QWEN25,
        None,
        "<|im_end|>",
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>"],
    ),
    "llama3.1": (
        LLAMA31,
        "<|begin_of_text|>",
        "<|eot_id|>",
        [
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ],
    ),
    "mistral-v0.3": (
        MISTRAL_V03,
        "<s>",
        "</s>",
        [
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ],
    ),
}
CORPUS = [
    json.dumps(TOOLS),
    json.dumps(ARGS),
    "Add 'call Bob' at the top of Inbox.md. Session: vault 'Work', open note Inbox.md",
    "Found one note about Bob. Added the line. The quick brown fox jumps over the lazy dog.",
] * 5


def build_family_tokenizer(folder, family):
    """A small byte-level BPE tokenizer with the family's special tokens and chat template (a transformers folder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    template, bos, eos, specials = FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    from ft.data.tokenize import TextTokenizer

    hf = build_family_tokenizer(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, hf, TextTokenizer.from_hf(hf)


def conversations(family_name):
    """Records of the issue's shape, made valid for each family (Llama 3.1: one call a turn; Mistral: 9-char ids)."""
    c1 = call(cid="a1b2c3d4e")
    c2 = call("vaultLibrarian_search", {"query": "Bob"}, "f5g6h7i8j")
    calls = [c1] if family_name == "llama3.1" else [c1, c2]
    results = [{"role": "tool", "tool_call_id": "a1b2c3d4e", "content": '{"ok": true}'}]
    if family_name != "llama3.1":
        results.append({"role": "tool", "tool_call_id": "f5g6h7i8j", "content": '{"hits": 1}'})
    return [
        # content null, no tool definitions (the checks that need them are skipped; it still renders)
        {
            "messages": [SYSTEM, USER, {"role": "assistant", "content": None, "tool_calls": [c1]}],
            "behavior": "x",
        },
        # text + calls, results, a final answer, then a second exchange; tools given
        {
            "messages": [
                SYSTEM,
                USER,
                {"role": "assistant", "content": "I'll add it now.", "tool_calls": calls},
                *results,
                {"role": "assistant", "content": "Done: Inbox.md starts with 'call Bob'."},
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You're welcome."},
            ],
            "tools": TOOLS,
            "label": True,
        },
    ]


def expected_runs(family_name, rec):
    """The trained text of each assistant turn, written out by hand per family."""
    out = []
    for m in rec["messages"]:
        if m["role"] != "assistant":
            continue
        calls = [
            (c["function"]["name"], json.loads(c["function"]["arguments"]), c["id"])
            for c in m.get("tool_calls") or []
        ]
        text = m.get("content")
        if family_name == "qwen2.5":
            body = "\n".join(
                [text] * bool(text)
                + [
                    f'<tool_call>\n{{"name": "{n}", "arguments": {json.dumps(a)}}}\n</tool_call>'
                    for n, a, _ in calls
                ]
            )
            out.append(body + "<|im_end|>\n")
        elif family_name == "llama3.1":
            if calls:
                n, a, _ = calls[0]
                out.append(f'{{"name": "{n}", "parameters": {json.dumps(a)}}}<|eot_id|>')
            else:
                out.append(text + "<|eot_id|>")
        else:  # mistral: the text next to calls is not rendered by this template
            if calls:
                items = ", ".join(
                    f'{{"name": "{n}", "arguments": {json.dumps(a)}, "id": "{i}"}}' for n, a, i in calls
                )
                out.append(f"[TOOL_CALLS] [{items}]</s>")
            else:
                out.append(" " + text + "</s>")
    return out


def trained_runs(tok, enc):
    runs, cur = [], []
    for t, m in zip(enc.ids.tolist(), enc.mask.tolist(), strict=True):
        if m:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_token_ids_equal_transformers_and_masks_cover_exactly_the_assistant_text_and_calls(family):
    from ft.data.templates import make_template
    from ft.data.tokenize import Encoded, encode_examples

    name, hf, tok = family
    tmpl = make_template("model", tok.chat_template, tok.special)
    assert tmpl.renders_tools
    records = conversations(name)
    examples = [normalize(r) for r in records]
    encoded = encode_examples(examples, tok, tmpl)
    for rec, ex, enc in zip(records, examples, encoded, strict=True):
        assert isinstance(enc, Encoded), enc
        want = hf.apply_chat_template(
            list(ex.messages), tools=list(ex.tools) if ex.tools else None, tokenize=True
        )
        assert enc.ids.tolist() == list(getattr(want, "input_ids", want))
        assert trained_runs(tok, enc) == expected_runs(name, rec)
        # nothing of the tool results, system or user turns is trained
        trained = tok.decode(enc.ids[enc.mask])
        for m in rec["messages"]:
            if m["role"] in ("tool", "system", "user"):
                assert m["content"] not in trained
    # train_on=last: only the final answer
    (last,) = encode_examples(examples[1:], tok, tmpl, "last")
    assert trained_runs(tok, last) == expected_runs(name, records[1])[-1:]


def test_tool_style_of_each_family(family):
    from ft.data.templates import make_template
    from ft.data.toolcalls import HERMES, LLAMA3, MISTRAL

    name, _, tok = family
    assert (
        make_template("model", tok.chat_template, tok.special).tool_style
        == {
            "qwen2.5": HERMES,
            "llama3.1": LLAMA3,
            "mistral-v0.3": MISTRAL,
        }[name]
    )


def test_a_template_that_refuses_the_calls_rejects_the_record_with_its_reason(tmp_path):
    from ft.data.templates import make_template
    from ft.data.tokenize import TextTokenizer, encode_examples

    tok = TextTokenizer.from_hf(build_family_tokenizer(tmp_path, "mistral-v0.3"))
    rec = {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [call(cid="c1")]}]}
    (out,) = encode_examples([normalize(rec)], tok, make_template("model", tok.chat_template, tok.special))
    assert isinstance(out, RecordError) and out.reason is Reason.TEMPLATE_ERROR
    assert "Tool call IDs should be alphanumeric strings with length 9" in out.message


def test_a_template_that_drops_the_calls_rejects_the_record_instead_of_training_without_them():
    from ft.data.templates import ChatTemplate

    # mentions tool_calls (so it counts as tool-capable) but renders only the text
    lossy = ChatTemplate(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}{# tool_calls ignored #}",
        "model",
        {"eos_token": "</s>"},
    )
    ex = normalize(TEXT_AND_CALLS)
    with pytest.raises(
        RecordError, match="dropped the tool call 'contentManager_prependContent' of message 3"
    ):
        lossy.spans(ex.messages, tools=ex.tools)


# ----------------------------------------------------------------------------- prepare, end to end on the CLI
def _issue_file(path):
    """A file in the shape of the issue: valid tool records (null content, text+calls, results, extra keys,
    labels) on lines 1-40, then one broken record per reason code on lines 41-45."""
    lines = []
    for i in range(40):
        kind = i % 4
        user = {"role": "user", "content": f"Request {i}: add 'call Bob' at the top of Inbox.md"}
        c = call(args={"filePath": f"Inbox{i}.md", "content": "call Bob\n"}, cid=f"call_{i}")
        if kind == 0:
            msgs = [SYSTEM, user, {"role": "assistant", "content": None, "tool_calls": [c]}]
        elif kind == 1:
            msgs = [SYSTEM, user, {"role": "assistant", "content": "I'll add it now.", "tool_calls": [c]}]
        elif kind == 2:
            msgs = [
                SYSTEM,
                user,
                {"role": "assistant", "content": "", "tool_calls": [c]},
                {"role": "tool", "tool_call_id": f"call_{i}", "content": '{"ok": true}'},
                {"role": "assistant", "content": f"Added it to Inbox{i}.md."},
            ]
        else:  # a plain answer, no call
            msgs = [SYSTEM, user, {"role": "assistant", "content": f"Which vault holds Inbox{i}.md?"}]
        lines.append(
            {"messages": msgs, "behavior": ["direct", "announce"][i % 2], "pattern": "p", "label": i % 5 != 0}
        )
    bad_args = call()
    bad_args["function"]["arguments"] = '{"filePath": "Inbox.md", "content": '
    lines += [
        {
            "messages": [SYSTEM, USER, {"role": "assistant", "content": None, "tool_calls": [bad_args]}],
            "label": True,
        },
        {
            "messages": [
                SYSTEM,
                USER,
                {"role": "assistant", "content": None, "tool_calls": [call("rmrf", {})]},
            ]
        },
        {
            "messages": [
                SYSTEM,
                USER,
                {"role": "assistant", "content": None, "tool_calls": [call()]},
                {"role": "tool", "tool_call_id": "call_zzz", "content": "ok"},
            ]
        },
        {
            "messages": [
                SYSTEM,
                {"role": "tool", "content": "ok"},
                USER,
                {"role": "assistant", "content": "a"},
            ]
        },
        {"messages": [SYSTEM, USER, {"role": "assistant", "content": None}]},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_prepare_tool_records_on_the_embedded_model_with_the_fallback(
    tmp_path, smollm2_dir, capsys, monkeypatch
):
    from ft.cli.app import run

    for k in [k for k in os.environ if k.startswith("FT_")]:
        monkeypatch.delenv(k)
    assert run(["init", str(tmp_path / "ws")]) == 0
    root = tmp_path / "ws"
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / "smollm2-135m-instruct").symlink_to(smollm2_dir)
    monkeypatch.chdir(root)
    data = _issue_file(root / "vault.jsonl")
    (root / "tools.json").write_text(json.dumps(TOOLS))
    capsys.readouterr()
    args = [
        "dataset",
        "prepare",
        str(data),
        "--tools",
        "tools.json",
        "--unknown-tool",
        "error",
        "--max-bad",
        "20%",
    ]
    assert run([*args, "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    stats = result["stats"]
    # 0 rejections for the 40 valid records; the exact reason and line for each broken one
    assert stats["records_read"] == 45 and stats["bad"] == 5
    assert stats["skipped_undesirable"] == 8 and stats["kept"] == 32
    rejected = [json.loads(x) for x in (Path(result["path"]) / "rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (41, "invalid_arguments"),
        (42, "unknown_tool"),
        (43, "unmatched_tool_result"),
        (44, "tool_result_before_call"),
        (45, "missing_field"),
    ]
    tools = stats["tools"]
    assert tools["rendering"] == "fallback" and tools["style"] == "fallback"
    assert tools["records"] == 32 and tools["without_definitions"] == 0 and tools["warnings"] == {}
    assert any("no tool support" in n and "<tool_call>" in n for n in result["notes"])
    meta = [json.loads(x) for x in (Path(result["path"]) / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 32 and {m["behavior"] for m in meta} == {"direct", "announce"}
    # the terminal output announces the fallback too
    assert (
        run(["dataset", "prepare", str(data), "--tools", "tools.json", "--max-bad", "20%", "--name", "v2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "no tool support" in " ".join(out.split()) and "unknown" in " ".join(out.split())


def test_fallback_on_the_embedded_model_trains_exactly_the_calls_and_answers(smollm2_tokenizer):
    from ft.data.templates import make_template
    from ft.data.tokenize import TextTokenizer, encode_examples

    tok = smollm2_tokenizer
    tmpl = make_template("model", tok.chat_template, tok.special)
    assert not tmpl.renders_tools and tmpl.tool_style == "fallback"
    examples = [normalize(WITH_RESULTS), normalize(TEXT_AND_CALLS), normalize(NULL_CONTENT)] * 100
    ref = TextTokenizer.from_hf(tok.hf)
    ref.use_fast = False
    fast = encode_examples(examples, tok, tmpl)  # 300 records: the tiktoken fast path
    slow = encode_examples(examples, ref, make_template("model", tok.chat_template, tok.special))
    for a, b in zip(fast, slow, strict=True):
        assert a.ids.tolist() == b.ids.tolist() and a.mask.tolist() == b.mask.tolist()
    call1 = '<tool_call>\n{"name": "contentManager_prependContent", "arguments": {"filePath": "Inbox.md", "content": "call Bob\\n"}}\n</tool_call>'
    call2 = '<tool_call>\n{"name": "vaultLibrarian_search", "arguments": {"query": "Bob"}}\n</tool_call>'
    final = WITH_RESULTS["messages"][-1]["content"]
    assert trained_runs(tok, fast[0]) == [f"{call1}\n{call2}<|im_end|>\n", final + "<|im_end|>\n"]
    assert trained_runs(tok, fast[1]) == [f"I'll add it now.\n{call1}<|im_end|>\n"]
    assert trained_runs(tok, fast[2]) == [f"{call1}<|im_end|>\n"]
    text = tok.decode(fast[0].ids)
    # tools listed in the system turn, results as a user turn of <tool_response> blocks: context, not trained
    assert text.startswith("<|im_start|>system\n" + SYSTEM["content"] + "\n\n# Tools\n")
    assert '"name": "vaultLibrarian_search", "description": "Search the vault"' in text
    assert '<|im_start|>user\n<tool_response>\n{"ok": true}\n</tool_response>\n<tool_response>\n' in text
    # and the same ids as transformers renders the fallback conversation with the model's own template
    from ft.data.templates import fallback_messages

    ex = examples[0]
    want = tok.hf.apply_chat_template(fallback_messages(ex.messages, ex.tools), tokenize=True)
    assert fast[0].ids.tolist() == list(getattr(want, "input_ids", want))

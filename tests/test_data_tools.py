"""Tool-calling conversations: normalization, reason codes, and rendering/masks against transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ft.data.formats import Format, load_tools, normalize
from ft.data.validate import Reason, RecordError
from ft.errors import FtError
from tool_templates import LLAMA31, MISTRAL_V03, QWEN3_STYLE, QWEN25

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
# The real templates of the three families, rendered by transformers' apply_chat_template as the reference.
FAMILIES = {
    "qwen3-style": (
        QWEN3_STYLE,
        None,
        "<|im_end|>",
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<think>", "</think>"],
    ),
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
        if family_name == "qwen3-style":
            body = "\n".join(
                [text] * bool(text)
                + [
                    f'<tool_call>\n{{"name": "{n}", "arguments": {json.dumps(a)}}}\n</tool_call>'
                    for n, a, _ in calls
                ]
            )
            last = m is rec["messages"][-1]  # the final turn carries an (empty) think block
            out.append(("<think>\n\n</think>\n\n" if last else "") + body + "<|im_end|>\n")
        elif family_name == "qwen2.5":
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
    # the text next to the calls is not in Mistral's or Llama 3.1's format: counted, so prepare can say so
    assert tmpl.text_dropped_turns == (1 if name in ("mistral-v0.3", "llama3.1") else 0)
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
            "qwen3-style": HERMES,
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
    flat = " ".join(out.split())
    assert "no tool support" in flat and "vault.jsonl:42 unknown_tool: message 3 calls 'rmrf'" in flat
    # train.yml's data.tools / data.unknown_tool (relative to the workspace) do the same
    sets = ["--set", "data.tools=tools.json", "--set", "data.unknown_tool=error", "--set", "data.max_bad=0.2"]
    assert run(["dataset", "prepare", str(data), "--name", "v3", *sets, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["stats"]
    assert again["rejected"].get("unknown_tool") == 1 and again["tools"]["records"] == 32


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


def test_the_parser_reads_back_what_each_template_trains(family, smollm2_tokenizer):
    """Round trip: the trained text of a call turn, parsed in the template's style, gives the record's calls."""
    from ft.data.templates import make_template
    from ft.data.tokenize import encode_examples
    from ft.data.toolcalls import parse_tool_calls

    name, _, tok = family
    rec = conversations(name)[1]
    for t in (tok, smollm2_tokenizer):
        tmpl = make_template("model", t.chat_template, t.special)
        ex = normalize(rec)
        (enc,) = encode_examples([ex], t, tmpl)
        first = trained_runs(t, enc)[0]
        for end in ("<|im_end|>\n", "<|eot_id|>", "</s>"):
            first = first.removesuffix(end)
        parsed = parse_tool_calls(first, tmpl.tool_style)
        want = ex.messages[2]["tool_calls"]
        if tmpl.tool_style != "mistral":  # only Mistral's format carries the ids
            want = [{k: v for k, v in c.items() if k != "id"} for c in want]
        assert parsed.error is None and parsed.tool_calls == want
        if tmpl.tool_style in ("hermes", "fallback"):
            assert parsed.content == "I'll add it now."


def test_a_tool_use_template_variant_is_used_for_tool_records_as_transformers_does():
    from ft.data.templates import CHATML, ChatTemplate, make_template

    special = {"bos_token": None, "eos_token": "<|im_end|>"}
    for given in (
        [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": QWEN25}],
        {"default": CHATML, "tool_use": QWEN25},
    ):
        tmpl = make_template("model", given, special)
        assert tmpl.renders_tools and tmpl.tool_style == "hermes"
        plain = normalize(record({"role": "assistant", "content": "Sure."}))
        assert tmpl.render(plain.messages) == ChatTemplate(CHATML, "c", special).render(plain.messages)
        tooled = normalize(WITH_RESULTS)
        assert tmpl.render(tooled.messages, tools=tooled.tools) == ChatTemplate(QWEN25, "q", special).render(
            tooled.messages, tools=tooled.tools
        )
        # calls without definitions: the variant that can render calls
        calls = normalize(NULL_CONTENT)
        assert "<tool_call>" in tmpl.render(calls.messages)


def test_prepare_with_a_tool_template_reports_the_rendering_and_the_text_it_leaves_out(tmp_path):
    from ft.data.prepare import PrepareOptions, prepare
    from ft.data.readers import open_source
    from ft.data.templates import make_template
    from ft.data.tokenize import TextTokenizer

    tok = TextTokenizer.from_hf(build_family_tokenizer(tmp_path / "tok", "llama3.1"))
    lines = []
    for i in range(10):
        for rec in conversations("llama3.1"):
            rec["messages"][1] = {"role": "user", "content": f"Request {i}"}
            lines.append(json.dumps(rec))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "out").mkdir()
    stats = prepare(
        open_source(tmp_path / "d.jsonl"),
        tok,
        make_template("model", tok.chat_template, tok.special),
        PrepareOptions(val_split=0.2),
        tmp_path / "out",
    )
    assert stats.kept == 20 and stats.bad == 0
    t = stats.tools
    assert (t.records, t.calls, t.results, t.without_definitions) == (20, 20, 10, 10)
    assert t.rendering == "template" and t.style == "llama3" and t.text_not_rendered == 10
    assert "rendered by the model's chat template (llama3 style)" in t.note and "not trained" in t.note

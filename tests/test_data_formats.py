"""Record formats: detection per record, normalization, every reason code the validator gives."""

from __future__ import annotations

import pytest

from ft.data.formats import Format, normalize, parse_label
from ft.data.validate import Reason, RecordError, parse_max_bad, too_many_bad
from ft.errors import FtError

U, A, S = "user", "assistant", "system"


@pytest.mark.parametrize(
    ("record", "fmt", "messages"),
    [
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            Format.CHAT,
            ((U, "hi"), (A, "yo")),
        ),
        (
            {
                "conversations": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            Format.CHAT,
            ((S, "s"), (U, "q"), (A, "a")),
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "s"},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                ]
            },
            Format.SHAREGPT,
            ((S, "s"), (U, "q"), (A, "a")),
        ),
        ({"instruction": "Add", "input": "1 2", "output": "3"}, Format.ALPACA, ((U, "Add\n\n1 2"), (A, "3"))),
        ({"instruction": "Add", "input": "", "output": "3"}, Format.ALPACA, ((U, "Add"), (A, "3"))),
        ({"prompt": "p", "completion": "c"}, Format.COMPLETIONS, ((U, "p"), (A, "c"))),
        (
            {"prompt": "p", "completion": "c", "system": "be kind"},
            Format.COMPLETIONS,
            ((S, "be kind"), (U, "p"), (A, "c")),
        ),
        # CSV/Parquet cells carry conversations as JSON text
        (
            {"messages": '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]'},
            Format.CHAT,
            ((U, "q"), (A, "a")),
        ),
        # OpenAI content parts
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "q"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            Format.CHAT,
            ((U, "q"), (A, "a")),
        ),
    ],
)
def test_each_format_is_detected_and_normalized(record, fmt, messages):
    ex = normalize(record)
    assert ex.fmt is fmt
    assert ex.messages == tuple({"role": r, "content": c} for r, c in messages)
    assert ex.label == -1


def test_text_format_and_metadata_kept():
    ex = normalize({"text": "plain words", "id": 7, "source": "wiki"})
    assert ex.fmt is Format.TEXT and ex.text == "plain words" and ex.messages is None
    assert ex.meta == {"id": 7, "source": "wiki"}


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (True, 1),
        (False, 0),
        ("desirable", 1),
        ("Undesirable", 0),
        ("true", 1),
        ("false", 0),
        (1, 1),
        (0, 0),
        (None, -1),
        ("", -1),
    ],
)
def test_labels_as_bool_and_strings(value, label):
    assert parse_label(value) == label
    ex = normalize({"prompt": "p", "completion": "c", "label": value})
    assert ex.label == label


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


@pytest.mark.parametrize(
    ("record", "reason", "words"),
    [
        ([1, 2], Reason.NOT_AN_OBJECT, "list"),
        ("just a string", Reason.NOT_AN_OBJECT, "string"),
        ({"foo": 1}, Reason.MISSING_FIELD, "no known record fields"),
        ({"instruction": "x"}, Reason.MISSING_FIELD, "'output'"),
        ({"messages": [{"content": "x"}]}, Reason.MISSING_FIELD, "no 'role'"),
        ({"messages": "not a list"}, Reason.WRONG_TYPE, "not a list"),
        (
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
            Reason.WRONG_TYPE,
            "not a string",
        ),
        ({"prompt": "p", "completion": "c", "label": "maybe"}, Reason.WRONG_TYPE, "label"),
        ({"prompt": ["p"], "completion": "c"}, Reason.WRONG_TYPE, "'prompt'"),
        (chat(("user", "q"), ("robot", "a")), Reason.UNKNOWN_ROLE, "'robot'"),
        (chat(("user", "q"), ("assistant", "  ")), Reason.EMPTY_CONTENT, "empty"),
        ({"prompt": "p", "completion": ""}, Reason.EMPTY_CONTENT, "'completion' is empty"),
        (chat(("system", "s"), ("user", "q")), Reason.NO_ASSISTANT_TURN, "no assistant"),
        ({"messages": []}, Reason.NO_ASSISTANT_TURN, "empty"),
        (chat(("user", "q"), ("user", "q2"), ("assistant", "a")), Reason.NOT_ALTERNATING, "second user turn"),
        (chat(("assistant", "a"), ("user", "q")), Reason.NOT_ALTERNATING, "start with the user"),
        (chat(("user", "q"), ("system", "s"), ("assistant", "a")), Reason.SYSTEM_NOT_FIRST, "message 2"),
        (
            {"system": "s", **chat(("system", "s2"), ("user", "q"), ("assistant", "a"))},
            Reason.SYSTEM_NOT_FIRST,
            "'system' field",
        ),
    ],
)
def test_each_reason_code(record, reason, words):
    with pytest.raises(RecordError) as err:
        normalize(record)
    assert err.value.reason is reason
    assert words in err.value.message


def test_explicit_format_overrides_detection():
    with pytest.raises(RecordError) as err:
        normalize({"prompt": "p", "completion": "c"}, Format.ALPACA)
    assert err.value.reason is Reason.MISSING_FIELD and "instruction" in err.value.message
    assert normalize({"text": "t", "prompt": "p", "completion": "c"}, Format.TEXT).text == "t"


def test_prompt_key_ignores_the_reply():
    a = normalize(chat(("user", "q"), ("assistant", "a1")))
    b = normalize(chat(("user", "q"), ("assistant", "a2")))
    assert a.prompt_key() == b.prompt_key()
    assert a.content_key() != b.content_key()


@pytest.mark.parametrize(
    ("text", "frac"), [("5%", 0.05), ("0.05", 0.05), (0.1, 0.1), ("12.5 %", 0.125), ("0", 0.0)]
)
def test_max_bad_parsing(text, frac):
    assert parse_max_bad(text) == pytest.approx(frac)


@pytest.mark.parametrize("text", ["abc", "150%", "-1", "2"])
def test_max_bad_rejects_nonsense(text):
    with pytest.raises(FtError):
        parse_max_bad(text)


def test_threshold_is_inclusive():
    assert not too_many_bad(5, 100, 0.05)
    assert too_many_bad(6, 100, 0.05)
    assert not too_many_bad(0, 0, 0.0)

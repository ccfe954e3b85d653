"""Paired preference records ({prompt, chosen, rejected}): normalization, reason codes, storage, splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ft.data.formats import Format, normalize
from ft.data.prepare import PrepareOptions, prepare
from ft.data.readers import open_source
from ft.data.sample import sample_pairs
from ft.data.store import load_split
from ft.data.templates import make_template
from ft.data.validate import RecordError


def test_string_pair_becomes_two_conversations_sharing_the_prompt() -> None:
    ex = normalize({"prompt": "2+2?", "chosen": "4.", "rejected": "5."})
    assert ex.fmt is Format.PAIRED and ex.label == 1 and ex.prompt_len == 1
    assert ex.messages == ({"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."})
    assert ex.rejected == ({"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5."})


def test_message_list_prompt_with_string_sides_and_a_system_field() -> None:
    prompt = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
    ]
    ex = normalize({"system": "be exact", "prompt": prompt, "chosen": "4.", "rejected": "5."})
    assert ex.prompt_len == 4 and ex.messages[0]["role"] == "system"
    assert ex.messages[:4] == ex.rejected[:4] and ex.messages[-1]["content"] == "4."


def test_whole_conversations_with_an_implicit_prompt_and_tool_calls() -> None:
    q = {"role": "user", "content": "weather in Oslo?"}
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
        ],
    }
    result = {"role": "tool", "content": "3 C"}
    chosen = [q, call, result, {"role": "assistant", "content": "3 C in Oslo."}]
    rejected = [q, {"role": "assistant", "content": "No idea."}]
    ex = normalize({"chosen": chosen, "rejected": rejected})
    assert ex.prompt_len == 1
    assert ex.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert ex.rejected[-1]["content"] == "No idea."
    # Both sides land in one group (split together) even though the chosen side has several assistant turns.
    chosen_side = normalize({"chosen": chosen, "rejected": rejected})
    assert chosen_side.prompt_key() == ex.prompt_key()


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical_pair"),
        ({"prompt": "q", "chosen": "a", "rejected": "  "}, "empty_side"),
        ({"prompt": "q", "chosen": [], "rejected": "b"}, "empty_side"),
        (
            {
                "chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}],
            },
            "prompt_mismatch",
        ),
        (
            {
                "prompt": "q1",
                "chosen": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}],
                "rejected": "b",
            },
            "prompt_mismatch",
        ),
    ],
)
def test_bad_pairs_have_reason_codes(record: dict, reason: str) -> None:
    with pytest.raises(RecordError) as e:
        normalize(record)
    assert e.value.reason.value == reason


def test_prepare_stores_pairs_next_to_each_other_and_splits_keep_them(
    smollm2_tokenizer, tmp_path: Path
) -> None:
    tok = smollm2_tokenizer
    recs = list(sample_pairs(60))
    recs.append({"prompt": "q", "chosen": "same", "rejected": "same"})
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    tmpl = make_template("model", tok.chat_template, tok.special)
    stats = prepare(open_source(src), tok, tmpl, PrepareOptions(labels="keep", val_split=0.2), out)
    assert stats.rejected == {"identical_pair": 1}
    total = 0
    for name in ("train", "val"):
        sp = load_split(out / f"{name}.safetensors")
        rid, lab = np.asarray(sp.record_ids), np.asarray(sp.labels)
        assert len(sp) % 2 == 0
        assert np.array_equal(rid[0::2], rid[1::2])  # both sides of every pair, in the same split
        assert (lab[0::2] == 1).all() and (lab[1::2] == 0).all()
        for i in range(0, len(sp), 2):  # the same prompt, different replies
            a, b = sp.tokens(i), sp.tokens(i + 1)
            fa = int(np.flatnonzero(sp.mask(i))[0])
            assert np.array_equal(a[:fa], b[:fa]) and not np.array_equal(a, b)
        total += len(sp) // 2
        assert stats.splits[name].labels["desirable"] == stats.splits[name].labels["undesirable"]
    assert total == 60

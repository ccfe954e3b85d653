"""The preparation pipeline end to end on real files: rejections with lines, threshold, labels,
split, over-length policies, the stored arrays, and a fuzz run of malformed records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from ft.data.prepare import PrepareOptions, TooManyBadRecords, prepare
from ft.data.readers import open_source
from ft.data.store import load_split, split_record_id
from ft.data.templates import make_template
from ft.errors import FtError


def conv(q: str, a: str, label=None) -> dict:
    r = {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if label is not None:
        r["label"] = label
    return r


def run(tok, tmp_path: Path, lines: list[str], **opts) -> tuple[object, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    tmpl = make_template("model", tok.chat_template, tok.special)
    stats = prepare(open_source(src), tok, tmpl, PrepareOptions(**opts), out)
    return stats, out


def rejected(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]


def test_every_reason_code_is_reported_with_its_line(smollm2_tokenizer, tmp_path):
    good = [json.dumps(conv(f"question {i}?", f"answer {i}.")) for i in range(40)]
    bad = {
        "invalid_json": '{"conversations": [',
        "not_an_object": '["a", "b"]',
        "missing_field": '{"question": "q", "answer": "a"}',
        "wrong_type": '{"conversations": "hello"}',
        "unknown_role": json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
        ),
        "empty_content": json.dumps(conv("q", "   ")),
        "no_assistant_turn": json.dumps({"messages": [{"role": "user", "content": "q"}]}),
        "not_alternating": json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ),
        "system_not_first": json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ),
        "duplicate": good[0],
        "too_long": json.dumps(conv("long " * 300, "x")),
    }
    lines = [*good, ""]  # a blank line is skipped, not an error
    where = {}
    for reason, line in bad.items():
        lines.append(line)
        where[reason] = len(lines)
    src = tmp_path / "data.jsonl"
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    where["bad_encoding"] = len(lines) + 1
    out = tmp_path / "out"
    out.mkdir()
    tok = smollm2_tokenizer
    stats = prepare(
        open_source(src),
        tok,
        make_template("model", tok.chat_template, tok.special),
        PrepareOptions(max_seq_length=256, max_bad=0.5),
        out,
    )
    got = {r["reason"]: r["line"] for r in rejected(out)}
    assert got == where
    assert stats.blank_lines == 1
    assert stats.kept == 40 and stats.records_read == 40 + len(bad) + 1
    assert stats.bad == len(bad) + 1 - 2  # duplicate and too_long are filtered, not invalid
    assert all("content" not in r for r in rejected(out))


def test_show_content_writes_the_rejected_record(smollm2_tokenizer, tmp_path):
    lines = [json.dumps(conv("q", "a")), "{broken", json.dumps({"messages": []})]
    _, out = run(smollm2_tokenizer, tmp_path, lines, max_bad=1.0, show_content=True)
    rej = rejected(out)
    assert rej[0]["content"] == "{broken" and rej[1]["content"] == {"messages": []}


@pytest.mark.parametrize(("n_bad", "fails"), [(5, False), (6, True)])
def test_max_bad_threshold_both_sides(smollm2_tokenizer, tmp_path, n_bad, fails):
    lines = [json.dumps(conv(f"q{i}", f"a{i}")) for i in range(100 - n_bad)] + ["nope"] * n_bad
    if not fails:
        stats, out = run(smollm2_tokenizer, tmp_path, lines, max_bad=0.05)
        assert stats.bad == 5 and stats.kept == 95
        assert (out / "train.safetensors").is_file()
        return
    with pytest.raises(TooManyBadRecords) as err:
        run(smollm2_tokenizer, tmp_path, lines, max_bad=0.05)
    assert "6 of 100 records are invalid" in err.value.message and "invalid_json 6" in err.value.message
    assert err.value.exit_code != 0
    out = tmp_path / "out"
    assert not (out / "train.safetensors").exists()
    assert len(rejected(out)) == 6  # the full list is still written for the user


def labelled(n_good: int, n_bad: int, as_strings: bool = False) -> list[str]:
    lab = ("desirable", "undesirable") if as_strings else (True, False)
    rows = [conv(f"good question {i}", f"good answer {i}", lab[0]) for i in range(n_good)]
    rows += [conv(f"bad question {i}", f"bad answer {i}", lab[1]) for i in range(n_bad)]
    random.Random(1).shuffle(rows)
    return [json.dumps(r) for r in rows]


@pytest.mark.parametrize("as_strings", [False, True])
def test_label_policies(smollm2_tokenizer, tmp_path, as_strings):
    lines = labelled(30, 10, as_strings)
    stats, out = run(smollm2_tokenizer, tmp_path / "sft", lines)
    assert stats.labels_found == {"desirable": 30, "undesirable": 10, "unlabelled": 0}
    assert stats.skipped_undesirable == 10 and stats.kept == 30
    assert "SFT trains on the 30 desirable records only" in stats.label_note
    assert set(load_split(out / "train.safetensors").labels.tolist()) == {1}

    stats, out = run(smollm2_tokenizer, tmp_path / "all", lines, labels="all")
    assert stats.kept == 40 and set(load_split(out / "train.safetensors").labels.tolist()) == {-1}

    stats, out = run(smollm2_tokenizer, tmp_path / "keep", lines, labels="keep")
    kept = np.concatenate([load_split(out / f"{s}.safetensors").labels for s in ("train", "val")])
    assert sorted(kept.tolist()) == [0] * 10 + [1] * 30


def test_stratified_split_keeps_the_label_ratio_within_one_record(smollm2_tokenizer, tmp_path):
    lines = labelled(77, 26)
    stats, out = run(smollm2_tokenizer, tmp_path, lines, labels="keep", val_split=0.2, test_split=0.1, seed=7)
    total_ratio = 77 / 103
    for split in ("train", "val", "test"):
        labels = load_split(out / f"{split}.safetensors").labels
        n, d = len(labels), int((labels == 1).sum())
        assert abs(d - n * total_ratio) <= 1, (split, n, d)
    # the requested fraction of all records (each label gets the floor or ceiling of its share)
    assert stats.splits["val"].records == round(0.2 * 103)
    assert stats.splits["test"].records == round(0.1 * 103)
    for split, frac in (("val", 0.2), ("test", 0.1)):
        by_label = stats.splits[split].labels
        assert by_label["desirable"] in (int(frac * 77), int(frac * 77) + 1)
        assert by_label["undesirable"] in (int(frac * 26), int(frac * 26) + 1)
    # different seed, different split; same seed, same split
    _, out2 = run(
        smollm2_tokenizer, tmp_path / "again", lines, labels="keep", val_split=0.2, test_split=0.1, seed=7
    )
    _, out3 = run(
        smollm2_tokenizer, tmp_path / "other", lines, labels="keep", val_split=0.2, test_split=0.1, seed=8
    )
    ids = [load_split(o / "val.safetensors").record_ids.tolist() for o in (out, out2, out3)]
    assert ids[0] == ids[1] != ids[2]


def test_no_prompt_is_in_two_splits(smollm2_tokenizer, tmp_path):
    # 20 prompts answered 3 times each (e.g. good and bad answers to one question).
    rows = [conv(f"prompt {i}", f"answer {i}.{k}", k != 2) for i in range(20) for k in range(3)]
    stats, out = run(
        smollm2_tokenizer, tmp_path, [json.dumps(r) for r in rows], labels="keep", val_split=0.25
    )
    assert stats.shared_prompts == 0 and stats.grouped_records == 60
    lines_by_split = {
        s: {split_record_id(r)[1] for r in load_split(out / f"{s}.safetensors").record_ids}
        for s in ("train", "val")
    }
    prompts = {s: {(line - 1) // 3 for line in v} for s, v in lines_by_split.items()}
    assert prompts["train"].isdisjoint(prompts["val"]) and prompts["val"]


def test_over_length_policies(smollm2_tokenizer, tmp_path):
    lines = [json.dumps(conv("short", "ok")), json.dumps(conv("word " * 80, "long answer " * 20))]
    stats, out = run(smollm2_tokenizer, tmp_path / "drop", lines, max_seq_length=64, val_split=0.0)
    assert stats.kept == 1 and stats.rejected == {"too_long": 1}
    assert rejected(out)[0]["line"] == 2 and "> max_seq_length 64" in rejected(out)[0]["message"]

    long_reply = json.dumps(conv("short", "long answer " * 40))
    long_prompt = json.dumps(conv("word " * 80, "ok"))
    stats, out = run(
        smollm2_tokenizer,
        tmp_path / "trunc",
        [long_reply, long_prompt],
        max_seq_length=64,
        on_long="truncate",
        val_split=0.0,
    )
    split = load_split(out / "train.safetensors")
    assert len(split) == 1 and split.lengths.tolist() == [64] and split.mask(0)[-1]
    assert stats.truncated == 1
    # the long prompt's reply is beyond the cut: nothing left to learn, so it is dropped and said so
    assert rejected(out) == [
        {"file": "data.jsonl", "line": 2, "reason": "too_long", "message": rejected(out)[0]["message"]}
    ]
    assert "no trained tokens" in rejected(out)[0]["message"]

    with pytest.raises(FtError, match=r"longer than max_seq_length 64: data.jsonl:2"):
        run(smollm2_tokenizer, tmp_path / "err", lines, max_seq_length=64, on_long="error")


def test_truncate_keeps_the_first_tokens_and_their_mask(smollm2_tokenizer, tmp_path):
    lines = [json.dumps(conv("hi", "one two three four five six seven eight nine ten " * 10))]
    _, full = run(smollm2_tokenizer, tmp_path / "full", lines, val_split=0.0)
    _, cut = run(
        smollm2_tokenizer, tmp_path / "cut", lines, max_seq_length=48, on_long="truncate", val_split=0.0
    )
    a, b = load_split(full / "train.safetensors"), load_split(cut / "train.safetensors")
    assert len(b.tokens(0)) == 48
    assert b.tokens(0).tolist() == a.tokens(0)[:48].tolist() and b.mask(0).tolist() == a.mask(0)[:48].tolist()


def test_stored_split_is_standard_safetensors_and_memory_mapped(smollm2_tokenizer, tmp_path):
    from safetensors.numpy import load_file

    lines = [json.dumps(conv(f"q{i}", f"a{i}")) for i in range(10)] + [json.dumps({"text": "plain"})]
    stats, out = run(smollm2_tokenizer, tmp_path, lines, val_split=0.0)
    split = load_split(out / "train.safetensors")
    raw = load_file(str(out / "train.safetensors"))
    assert {k: v.dtype.name for k, v in raw.items()} == {
        "tokens": "int32",
        "mask": "uint8",
        "offsets": "int64",
        "labels": "int8",
        "record_ids": "int64",
    }
    assert len(split) == 11 and split.lengths.dtype == np.int64 and split.lengths.sum() == len(raw["tokens"])
    assert isinstance(split.tokens(3), np.ndarray) and split.tokens(3).dtype == np.int32
    assert split.mask(3).dtype == np.bool_ and split.mask(3).any()
    assert split.record_ids.tolist() == list(range(1, 12))
    assert isinstance(split._tokens.base, np.memmap) or isinstance(split._tokens.base.base, np.memmap)
    assert stats.trainable_tokens == int(raw["mask"].sum()) == split.num_trained_tokens
    assert (out / "lengths.png").read_bytes()[:4] == b"\x89PNG"


def _fuzz_lines(n: int, seed: int = 0) -> list[bytes]:
    r = random.Random(seed)
    roles = ["user", "assistant", "system", "bot", "", None, 3, "USER", "gpt", "human"]
    values = [None, 0, 1.5, True, "", "   ", "x", [], {}, ["a"], {"a": 1}, "ü" * 3, "\u0000", "🙂"]

    def rnd_value():
        return r.choice(values + [r.choice(roles)])

    def rnd_msg():
        m = {}
        for key in r.sample(["role", "content", "from", "value", "name"], r.randint(0, 3)):
            m[key] = r.choice(roles) if key in ("role", "from") else rnd_value()
        return m if r.random() < 0.9 else rnd_value()

    def rnd_record():
        kind = r.randrange(8)
        if kind == 0:
            return {"messages": [rnd_msg() for _ in range(r.randint(0, 5))], "label": rnd_value()}
        if kind == 1:
            return {
                "conversations": rnd_value()
                if r.random() < 0.3
                else [rnd_msg() for _ in range(r.randint(1, 4))]
            }
        if kind == 2:
            return {
                k: rnd_value()
                for k in r.sample(["instruction", "input", "output", "system", "label"], r.randint(1, 5))
            }
        if kind == 3:
            return {k: rnd_value() for k in r.sample(["prompt", "completion", "label"], r.randint(1, 3))}
        if kind == 4:
            return {"text": rnd_value()}
        if kind == 5:
            return rnd_value()
        if kind == 6:
            return {
                "conversations": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": f"a{r.random()}"},
                ],
                "label": r.choice([True, False, "desirable", "undesirable", "maybe", 2]),
            }
        return {str(r.random()): rnd_value()}

    out = []
    for _ in range(n):
        line = json.dumps(rnd_record()).encode()
        mut = r.random()
        if mut < 0.1:
            line = line[: r.randint(0, len(line))]  # truncated
        elif mut < 0.15:
            pos = r.randint(0, len(line))
            line = line[:pos] + bytes([r.choice([0xFF, 0xC3, 0x80, 0xE2])]) + line[pos:]  # invalid UTF-8
        elif mut < 0.2:
            line = bytes(r.randrange(256) for _ in range(r.randint(1, 30))).replace(b"\n", b" ")
        out.append(line)
    return out


def test_fuzz_every_malformed_record_is_reported_with_its_line(smollm2_tokenizer, tmp_path):
    lines = _fuzz_lines(1500)
    src = tmp_path / "fuzz.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    blank = {i + 1 for i, line in enumerate(lines) if not line.strip()}
    out = tmp_path / "out"
    out.mkdir()
    tok = smollm2_tokenizer
    stats = prepare(
        open_source(src),
        tok,
        make_template("model", tok.chat_template, tok.special),
        PrepareOptions(max_bad=1.0, labels="keep", max_seq_length=512),
        out,
    )
    rej = rejected(out)
    kept = [
        split_record_id(r)[1] for s in stats.splits for r in load_split(out / f"{s}.safetensors").record_ids
    ]
    reported = [r["line"] for r in rej]
    assert len(reported) >= 1000
    # every non-blank line is either kept or rejected with its line number, exactly once
    assert sorted(reported + kept) == [i for i in range(1, len(lines) + 1) if i not in blank]
    assert stats.records_read == len(lines) - len(blank)
    assert all(r["reason"] and r["message"] for r in rej)


def test_prepared_split_feeds_the_training_engine(smollm2_tokenizer, tmp_path):
    """The engine reads splits through its TokenizedExamples protocol; a prepared split satisfies it."""
    from ft.engine.batching import index_examples

    lines = [json.dumps(conv(f"question {i}?", f"answer {i}.")) for i in range(12)]
    _, out = run(smollm2_tokenizer, tmp_path, lines, val_split=0.0)
    split = load_split(out / "train.safetensors")
    index = index_examples(split, 2048)
    assert len(index.usable) == 12
    assert index.trained.tolist() == [int(split.mask(i)[1:].sum()) for i in range(12)]


def test_extra_fields_are_kept_as_metadata(smollm2_tokenizer, tmp_path):
    lines = [json.dumps({**conv("q", "a"), "id": "x-1", "source": "forum"}), json.dumps(conv("q2", "a2"))]
    _, out = run(smollm2_tokenizer, tmp_path, lines, val_split=0.0)
    meta = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert meta == [{"record_id": 1, "id": "x-1", "source": "forum"}]

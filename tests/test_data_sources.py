"""Sources as users have them: given splits (mlx-lm layout, saved DatasetDicts), one-line JSON arrays,
UTF-16 files, conflicting labels, and metadata used for stratification and per-group evaluation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ft.data.prepare import PrepareOptions, prepare
from ft.data.readers import open_source
from ft.data.store import group_values, load_split, locate, read_metadata, split_path
from ft.data.templates import make_template


def chat(q: str, a: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(tok, source, out: Path, **opts):
    out.mkdir(parents=True)
    tmpl = make_template("model", tok.chat_template, tok.special)
    src = source if not isinstance(source, (str, Path)) else open_source(source)
    return prepare(src, tok, tmpl, PrepareOptions(**opts), out), src


def split_texts(tok, out: Path, split: str) -> list[str]:
    data = load_split(split_path(out, split))
    return [tok.decode(data.tokens(i)) for i in range(len(data))]


def test_an_mlx_lm_folder_keeps_its_train_valid_and_test_splits(smollm2_tokenizer, tmp_path):
    folder = tmp_path / "mlx"
    write_jsonl(folder / "train.jsonl", [chat(f"train question {i}", f"t{i}") for i in range(300)])
    write_jsonl(folder / "valid.jsonl", [chat(f"valid question {i}", f"v{i}") for i in range(100)])
    write_jsonl(folder / "test.jsonl", [chat(f"test question {i}", f"x{i}") for i in range(40)])
    stats, src = run(smollm2_tokenizer, folder, tmp_path / "out", val_split=0.2, test_split=0.0)
    assert src.given_splits
    assert {k: v.records for k, v in stats.splits.items()} == {"train": 300, "val": 100, "test": 40}
    for split, word in (("train", "train question"), ("val", "valid question"), ("test", "test question")):
        assert all(word in t for t in split_texts(smollm2_tokenizer, tmp_path / "out", split)), split
    assert stats.split_method.startswith("as given") and "valid.jsonl -> val" in stats.split_method


def test_a_folder_of_other_files_is_still_merged_and_split(smollm2_tokenizer, tmp_path):
    folder = tmp_path / "mixed"
    write_jsonl(folder / "train.jsonl", [chat(f"a {i}", "x") for i in range(50)])
    write_jsonl(folder / "more.jsonl", [chat(f"b {i}", "y") for i in range(50)])
    stats, src = run(smollm2_tokenizer, folder, tmp_path / "out", val_split=0.2)
    assert not src.given_splits and stats.splits["val"].records == 20
    assert stats.split_method.startswith("seeded")


def test_saved_dataset_and_datasetdict_folders_by_path_and_hf_prefix(smollm2_tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = lambda tag, n: [chat(f"{tag} question {i}", f"{tag} answer {i}") for i in range(n)]  # noqa: E731
    as_columns = lambda rs: {"messages": [r["messages"] for r in rs]}  # noqa: E731
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(as_columns(rows("train", 60))),
            "validation": datasets.Dataset.from_dict(as_columns(rows("valid", 20))),
            "test": datasets.Dataset.from_dict(as_columns(rows("test", 10))),
            "unsupervised": datasets.Dataset.from_dict(as_columns(rows("unsup", 5))),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_dict(as_columns(rows("single", 50))).save_to_disk(str(tmp_path / "ds"))

    for i, spec in enumerate([str(tmp_path / "dd"), f"hf:{tmp_path / 'dd'}"]):
        stats, src = run(smollm2_tokenizer, spec, tmp_path / f"dd-out{i}")
        assert {k: v.records for k, v in stats.splits.items()} == {"train": 60, "val": 20, "test": 10}, spec
        assert src.ignored == ["unsupervised"] and "left out: unsupervised" in stats.split_method
        assert all(
            "valid question" in t for t in split_texts(smollm2_tokenizer, tmp_path / f"dd-out{i}", "val")
        )
        assert stats.records_read == 90
    for i, spec in enumerate([str(tmp_path / "ds"), f"hf:{tmp_path / 'ds'}"]):
        stats, _ = run(smollm2_tokenizer, spec, tmp_path / f"ds-out{i}", val_split=0.2)
        assert stats.splits["train"].records == 40 and stats.splits["val"].records == 10, spec
    # one split asked for by name: split by ft like any single source
    stats, _ = run(
        smollm2_tokenizer,
        open_source(tmp_path / "dd", hf_split="validation"),
        tmp_path / "one",
        val_split=0.25,
    )
    assert stats.records_read == 20 and stats.splits["val"].records == 5


def test_records_of_a_one_line_json_array_are_located_by_index(smollm2_tokenizer, tmp_path):
    rows = [chat(f"q{i}", f"a{i}") for i in range(30)]
    rows[17] = {"messages": [{"role": "user", "content": "q"}]}  # no assistant turn
    rows[23] = chat("q3", "a3")  # a duplicate of record 3
    path = tmp_path / "one-line.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    stats, src = run(smollm2_tokenizer, path, tmp_path / "out", val_split=0.0, max_bad=0.5)
    wheres = {e.reason: e.where for e in stats.rejected_examples}
    assert wheres == {"no_assistant_turn": "one-line.json[17]", "duplicate": "one-line.json[23]"}
    dup = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()][1]
    assert dup["index"] == 23 and "one-line.json[3]" in dup["message"]
    ids = load_split(tmp_path / "out" / "train.safetensors").record_ids
    sources = [{"display": "one-line.json", "unit": src.units[0]}]
    assert [locate(sources, r) for r in ids[:2]] == ["one-line.json[0]", "one-line.json[1]"]
    # a pretty-printed array keeps line numbers
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(rows[:3], indent=1), encoding="utf-8")
    assert [r.unit for _, r in open_source(pretty).records()] == ["line"] * 3


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_utf16_and_utf32_files_are_read_as_such(smollm2_tokenizer, tmp_path, encoding, kind):
    rows = [{"prompt": f"Frage {i}: café?", "completion": f"Antwort {i} 🙂"} for i in range(20)]
    if kind == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)
    elif kind == "json":
        text = json.dumps(rows, ensure_ascii=False, indent=1)
    else:
        text = "prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows)
    path = tmp_path / f"wide.{kind}"
    path.write_bytes(text.encode(encoding))
    stats, _ = run(smollm2_tokenizer, path, tmp_path / "out", val_split=0.0)
    assert stats.kept == 20 and stats.bad == 0
    assert "café" in split_texts(smollm2_tokenizer, tmp_path / "out", "train")[0]


def test_broken_utf16_names_the_encoding(smollm2_tokenizer, tmp_path):
    from ft.errors import FtError

    path = tmp_path / "broken.jsonl"
    path.write_bytes(
        json.dumps({"prompt": "q", "completion": "a"}).encode("utf-16") + b"\x00\xd8"
    )  # lone surrogate
    with pytest.raises(FtError) as e:
        run(smollm2_tokenizer, path, tmp_path / "out")
    assert "UTF-16" in e.value.message and "broken.jsonl" in e.value.message


def test_identical_conversations_with_opposite_labels_are_reported(smollm2_tokenizer, tmp_path):
    rows = [chat(f"q{i}", f"a{i}", label=True) for i in range(20)]
    rows += [
        chat("q4", "a4", label=False),
        chat("q7", "a7", label=True),
        chat("q9", "a9", label="undesirable"),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    stats, _ = run(smollm2_tokenizer, path, tmp_path / "out", labels="keep", val_split=0.0)
    assert stats.conflicting_labels == 2 and stats.rejected == {"conflicting_label": 2, "duplicate": 1}
    assert stats.bad == 0 and stats.kept == 20
    conflicts = [e for e in stats.rejected_examples if e.reason == "conflicting_label"]
    assert [e.where for e in conflicts] == ["d.jsonl:21", "d.jsonl:23"]
    assert "d.jsonl:5" in conflicts[0].message and "desirable" in conflicts[0].message
    # with the default label policy the undesirable copy would have been skipped without a word
    stats, _ = run(smollm2_tokenizer, path, tmp_path / "sft", val_split=0.0)
    assert stats.conflicting_labels == 2 and stats.skipped_undesirable == 0


def tool_rows(n: int) -> list[dict]:
    """Records in the shape of the brief's agent data: system+user+assistant, extra keys, true/false labels."""
    behaviors = ["careful", "hasty", "skeptical"]
    out = []
    for i in range(n):
        b = behaviors[i % 3] if i % 10 else behaviors[0]  # "careful" is the most common
        out.append(
            {
                "messages": [
                    {"role": "system", "content": f"Vault session {i}. Today is Monday."},
                    {"role": "user", "content": f"Add a line to note {i}."},
                    {"role": "assistant", "content": f"Added line {i} to note {i}."},
                ],
                "behavior": b,
                "pattern": f"p{i % 4}",
                "category": {"name": "edit", "level": i % 2},
                "label": i % 4 != 0,
            }
        )
    return out


def test_stratify_by_a_metadata_key_and_group_values_for_evaluation(smollm2_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "agent.jsonl", tool_rows(120))
    out = tmp_path / "out"
    stats, _ = run(
        smollm2_tokenizer,
        path,
        out,
        labels="keep",
        val_split=0.25,
        stratify_by="behavior",
        group_by="category",
    )
    meta = read_metadata(out)
    wanted = Counter((r["behavior"], r["label"]) for r in tool_rows(120))
    got: Counter = Counter()
    val = load_split(split_path(out, "val"))
    for rid, lab in zip(val.record_ids.tolist(), val.labels.tolist(), strict=True):
        got[(meta[rid]["behavior"], bool(lab))] += 1
    for stratum, n in wanted.items():  # every (behavior, label) stratum gets its share of val
        assert got[stratum] in (int(0.25 * n), int(0.25 * n) + 1), (stratum, n, got[stratum])
    assert len(val) == 30 and "'behavior' (3 values)" in stats.split_method
    # per-example group values, in split order, for per-group evaluation
    groups = group_values(out, "val", "category")
    assert len(groups) == len(val) and set(groups) == {
        '{"level":0,"name":"edit"}',
        '{"level":1,"name":"edit"}',
    }
    assert group_values(out, "val", "pattern") == [meta[r]["pattern"] for r in val.record_ids.tolist()]
    assert group_values(out, "val", "nope") == [None] * len(val)
    assert stats.group_by == "category" and sum(stats.groups.values()) == 120


def test_stratification_by_key_beats_label_only_on_a_rare_value(smollm2_tokenizer, tmp_path):
    rows = [chat(f"q{i}", f"a{i}", kind="rare" if i < 10 else "common") for i in range(100)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    for seed in range(3):
        out = tmp_path / f"s{seed}"
        run(smollm2_tokenizer, path, out, val_split=0.2, seed=seed, stratify_by="kind")
        rare = [v for v in group_values(out, "val", "kind") if v == "rare"]
        assert len(rare) == 2, seed


def test_a_broken_record_in_a_one_line_array_does_not_silently_drop_the_rest(tmp_path):
    good = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(5)]
    path = tmp_path / "one.json"
    path.write_text("[" + ", ".join([good[0], '{"prompt": "x", "completion": }', *good[1:]]) + "]")
    recs = [r for _, r in open_source(path).records()]
    assert [(r.line, r.unit, r.error[0].value if r.error else "ok") for r in recs] == [
        (0, "index", "ok"),
        (1, "index", "invalid_json"),
        (2, "index", "invalid_json"),
    ]
    assert "not read" in recs[2].error[1]
    # broken last record: nothing else is lost, nothing else is reported
    path.write_text("[" + ", ".join([*good, '{"prompt": "x", "completion": }']) + "]")
    recs = [r for _, r in open_source(path).records()]
    assert [r.error is None for r in recs] == [True] * 5 + [False]

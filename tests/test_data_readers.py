"""Readers: every format in every file type, locations of bad records, blank lines, BOM, bad UTF-8."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ft.data.formats import Format, normalize
from ft.data.readers import RawRecord, ReadHooks, open_source
from ft.data.validate import Reason
from ft.errors import FtError

RECORDS = {
    Format.CHAT: {
        "messages": [{"role": "user", "content": "Hi, café?"}, {"role": "assistant", "content": "Oui."}],
        "label": True,
    },
    Format.SHAREGPT: {
        "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}],
        "label": "undesirable",
    },
    Format.ALPACA: {"instruction": "Add", "input": "1 and 2", "output": "3"},
    Format.COMPLETIONS: {"prompt": "Capital of Peru?", "completion": "Lima"},
    Format.TEXT: {"text": "Plain text to continue."},
    Format.PAIRED: {"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Quito."},
}


def write(path: Path, records: list[dict], kind: str) -> Path:
    """Write records the way users store them in each file type."""
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    elif kind == "csv":
        cols = sorted({k for r in records for k in r})
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in records:
                w.writerow(
                    [
                        json.dumps(r[c], ensure_ascii=False)
                        if isinstance(r.get(c), list)
                        else ("" if c not in r else str(r[c]).lower() if isinstance(r[c], bool) else r[c])
                        for c in cols
                    ]
                )
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


def read(path: Path) -> list[RawRecord]:
    return [rec for _, rec in open_source(path).records()]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("fmt", list(Format))
def test_each_format_in_each_file_type(tmp_path, kind, fmt):
    record = RECORDS[fmt]
    recs = read(write(tmp_path / f"data.{kind}", [record, record], kind))
    assert len(recs) == 2 and all(r.error is None for r in recs)
    ex = normalize(recs[1].obj)
    expected = normalize(record)
    assert (ex.fmt, ex.messages, ex.text, ex.label) == (
        expected.fmt,
        expected.messages,
        expected.text,
        expected.label,
    )


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_mixed_format_file_is_detected_record_by_record(tmp_path, kind):
    records = list(RECORDS.values())
    recs = read(write(tmp_path / f"mixed.{kind}", records, kind))
    assert [normalize(r.obj).fmt for r in recs] == list(RECORDS)


def test_jsonl_locations_blank_lines_bom_and_bad_utf8(tmp_path):
    p = tmp_path / "d.jsonl"
    good = json.dumps(RECORDS[Format.COMPLETIONS]).encode()
    p.write_bytes(
        b"\xef\xbb\xbf"
        + good
        + b"\n\n   \n"
        + b'{"prompt": "caf\xff", "completion": "x"}\n'
        + b"{not json\n"
        + good
        + b"\r\n"
        + b"\t\n"
    )
    blanks = []
    recs = [r for _, r in open_source(p).records(ReadHooks(blank=lambda: blanks.append(1)))]
    assert [(r.line, r.error[0] if r.error else None) for r in recs] == [
        (1, None),
        (4, Reason.BAD_ENCODING),
        (5, Reason.INVALID_JSON),
        (6, None),
    ]
    assert len(blanks) == 3
    assert "0xff" in recs[1].error[1]


def test_json_array_reports_the_line_of_each_bad_element_and_recovers(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(
        '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c", "completion": },\n'
        '  {"prompt": "e", "completion": "f"},\n  7\n]\n',
        encoding="utf-8",
    )
    recs = read(p)
    assert [(r.line, r.error[0] if r.error else type(r.obj).__name__) for r in recs] == [
        (2, "dict"),
        (3, Reason.INVALID_JSON),
        (4, "dict"),
        (5, "int"),
    ]


def test_json_object_of_arrays_and_columns(tmp_path):
    p = tmp_path / "splits.json"
    p.write_text(
        '{"train": [\n {"text": "a"},\n {"text": "b"}\n],\n "test": [\n {"text": "c"}\n]}', encoding="utf-8"
    )
    assert [(r.line, r.obj["text"]) for r in read(p)] == [(2, "a"), (3, "b"), (6, "c")]
    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}))
    assert [r.obj for r in read(cols)] == [
        {"prompt": "p1", "completion": "c1"},
        {"prompt": "p2", "completion": "c2"},
    ]
    single = tmp_path / "one.json"
    single.write_text(json.dumps(RECORDS[Format.CHAT]))
    assert normalize(read(single)[0].obj).fmt is Format.CHAT


def test_json_bad_utf8_is_rejected_per_record(tmp_path):
    p = tmp_path / "d.json"
    p.write_bytes(b'\xef\xbb\xbf[\n{"text": "ok"},\n{"text": "bad \xc3\x28"}\n]')
    recs = read(p)
    assert [(r.line, r.error[0] if r.error else None) for r in recs] == [(2, None), (3, Reason.BAD_ENCODING)]


def test_csv_rows_blank_lines_bom_and_bad_utf8(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(
        b"\xef\xbb\xbfprompt,completion,label\n"
        b'"multi\nline",yes,true\n'
        b"\n"
        b"caf\xe9,x,false\n"
        b"only-one-cell\n"
        b"p,c,\n"
    )
    recs = read(p)
    assert [(r.line, r.error[0] if r.error else None) for r in recs] == [
        (2, None),
        (5, Reason.BAD_ENCODING),
        (6, Reason.INVALID_CSV),
        (7, None),
    ]
    assert recs[0].obj == {"prompt": "multi\nline", "completion": "yes", "label": "true"}
    assert normalize(recs[0].obj).label == 1 and normalize(recs[3].obj).label == -1


def test_folder_source_reads_every_data_file_in_order(tmp_path):
    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "b.jsonl", [RECORDS[Format.TEXT]], "jsonl")
    write(tmp_path / "d" / "a.csv", [RECORDS[Format.COMPLETIONS]], "csv")
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    src = open_source(tmp_path / "d")
    assert [f.display for f in src.files] == ["a.csv", "b.jsonl"]
    assert [(i, r.line) for i, r in src.records()] == [(0, 2), (1, 1)]
    assert len({s["sha256"] for s in src.identity()}) == 2


def test_missing_and_unknown_sources_are_clear_errors(tmp_path):
    with pytest.raises(FtError, match="no such file"):
        open_source(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(FtError, match="unknown data file type"):
        open_source(tmp_path / "x.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FtError, match="no data files"):
        open_source(tmp_path / "empty")


def test_huggingface_datasets_from_local_files(tmp_path):
    """A HF dataset id goes through `datasets`; here a local data folder (hf:PATH) and a save_to_disk folder."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write(folder / "train.jsonl", [RECORDS[Format.CHAT], RECORDS[Format.COMPLETIONS]], "jsonl")
    src = open_source(f"hf:{folder}")
    recs = [r for _, r in src.records()]
    assert [(r.line, r.unit) for r in recs] == [(1, "row"), (2, "row")]
    assert normalize(recs[0].obj).messages[1] == {"role": "assistant", "content": "Oui."}
    assert src.identity()[0]["fingerprint"]

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([RECORDS[Format.TEXT]] * 3).save_to_disk(str(saved))
    recs = [r for _, r in open_source(saved).records()]
    assert len(recs) == 3 and normalize(recs[2].obj).text == RECORDS[Format.TEXT]["text"]

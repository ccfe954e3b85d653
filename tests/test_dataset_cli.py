"""`ft dataset prepare|list|info|show|rm` through the real CLI entry, and the service API training uses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ft.cli.app import run
from ft.config.loader import load_config
from ft.data.store import load_split
from ft.services import dataset_prepare
from ft.services import datasets as svc
from ft.workspace import Workspace

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def ft(capsys, monkeypatch):
    for k in [k for k in os.environ if k.startswith("FT_")]:
        monkeypatch.delenv(k)

    def call(*args) -> tuple[int, str, str]:
        code = run([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


@pytest.fixture
def ws(tmp_path, ft, monkeypatch, smollm2_dir) -> Path:
    code, _, err = ft("init", tmp_path / "ws")
    assert code == 0, err
    root = tmp_path / "ws"
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / MODEL).symlink_to(smollm2_dir)  # as if `ft models pull` had run
    monkeypatch.chdir(root)
    return root


def test_prepare_the_sample_data_prints_the_stats_and_records_it(ws, ft):
    code, out, err = ft("dataset", "prepare", "data/sample.jsonl", "--name", "sample")
    assert code == 0, err
    for words in (
        "prepared",
        "records read",
        "desirable",
        "SFT trains on the",
        "tokens per record",
        "p90",
        "trainable tokens",
        "steps per epoch",
        "token lengths",
        "contamination",
    ):
        assert words in out, words
    folder = ws / "datasets" / "sample" / "v1"
    for f in (
        "train.safetensors",
        "val.safetensors",
        "manifest.json",
        "stats.json",
        "rejected.jsonl",
        "lengths.png",
    ):
        assert (folder / f).is_file(), f
    manifest = json.loads((folder / "manifest.json").read_text())
    sha = manifest["sources"][0]["sha256"]
    assert (
        len(sha) == 64 and manifest["tokenizer"]["model"] == MODEL and manifest["template"]["name"] == "model"
    )
    assert manifest["options"]["labels"] == "sft-desirable" and manifest["counts"]["kept"] > 100
    row = Workspace(ws).registry().get("datasets", name="sample", version=1)
    assert row["meta"]["path"] == "datasets/sample/v1"


def test_cache_hit_and_new_version_never_overwrite(ws, ft):
    code, out, _ = ft("dataset", "prepare", "data/sample.jsonl", "--json")
    first = json.loads(out)
    assert code == 0 and first["name"] == "sample" and first["version"] == 1 and not first["cache_hit"]
    mtime = (ws / "datasets/sample/v1/train.safetensors").stat().st_mtime_ns

    code, out, _ = ft("dataset", "prepare", "data/sample.jsonl", "--json")
    again = json.loads(out)
    assert code == 0 and again["cache_hit"] and again["version"] == 1
    assert (ws / "datasets/sample/v1/train.safetensors").stat().st_mtime_ns == mtime

    code, out, _ = ft("dataset", "prepare", "data/sample.jsonl", "--labels", "keep", "--json")
    other = json.loads(out)
    assert code == 0 and other["version"] == 2 and not other["cache_hit"]
    assert other["stats"]["kept"] > first["stats"]["kept"]

    # the source changed: new version too
    with open(ws / "data/sample.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "one more", "completion": "record"}) + "\n")
    code, out, _ = ft("dataset", "prepare", "data/sample.jsonl", "--json")
    assert code == 0 and json.loads(out)["version"] == 3
    assert (ws / "datasets/sample/v1/train.safetensors").stat().st_mtime_ns == mtime

    code, out, _ = ft("dataset", "list", "--json")
    assert [(d["name"], d["version"]) for d in json.loads(out)["datasets"]] == [
        ("sample", 1),
        ("sample", 2),
        ("sample", 3),
    ]


def test_too_many_bad_records_fails_with_a_summary_and_keeps_the_report(ws, ft):
    lines = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(18)] + ["oops", '{"x": 1}']
    (ws / "data" / "bad.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = ft("dataset", "prepare", "data/bad.jsonl")
    assert code == 7
    assert "2 of 20 records are invalid (10.0%)" in err and "bad.jsonl:19" in err and "rejected.jsonl" in err
    assert "Traceback" not in err
    assert not (ws / "datasets" / "bad").exists()  # nothing half-made under the dataset's name
    report = ws / "datasets" / ".failed" / "bad" / "rejected.jsonl"
    assert str(report) in err
    assert [json.loads(x)["line"] for x in report.read_text().splitlines()] == [19, 20]

    code, out, err = ft("dataset", "prepare", "data/bad.jsonl", "--max-bad", "10%")
    assert code == 0, err
    code, out, err = ft("dataset", "prepare", "data/bad.jsonl", "--max-bad", "5%", "--json")
    assert code == 7 and json.loads(out)["error"] == "data_too_many_bad"  # a cache hit re-checks the limit


def test_show_highlights_trained_tokens(ws, ft):
    assert ft("dataset", "prepare", "data/sample.jsonl", "--name", "s")[0] == 0
    code, out, _ = ft("dataset", "show", "s", "--split", "val", "--n", "2", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["split"] == "val" and len(shown["records"]) == 2
    rec = shown["records"][0]
    trained = "".join(s["text"] for s in rec["segments"] if s["trained"])
    context = "".join(s["text"] for s in rec["segments"] if not s["trained"])
    assert trained.endswith("<|im_end|>\n") and "<|im_start|>assistant" in context
    assert rec["where"].startswith("sample.jsonl:")
    code, out, _ = ft("dataset", "show", "s")
    assert code == 0 and "trained tokens" in out and "sample.jsonl:" in out


def test_info_and_rm(ws, ft):
    assert ft("dataset", "prepare", "data/sample.jsonl", "--name", "s")[0] == 0
    assert ft("dataset", "prepare", "data/sample.jsonl", "--name", "s", "--val", "0.1")[0] == 0
    code, out, _ = ft("dataset", "info", "s", "--json")
    info = json.loads(out)
    assert code == 0 and info["summary"]["version"] == 2 and info["versions"] == [1, 2]
    assert info["manifest"]["options"]["val_split"] == 0.1
    code, out, err = ft("dataset", "rm", "s", "--version", "1")
    assert code == 2 and "--yes" in err  # never deletes without confirmation
    assert ft("dataset", "rm", "s", "--version", "1", "--yes")[0] == 0
    assert not (ws / "datasets/s/v1").exists() and (ws / "datasets/s/v2").exists()
    assert ft("dataset", "rm", "s", "--yes")[0] == 0
    code, _, err = ft("dataset", "info", "s")
    assert code == 5 and "no dataset named 's'" in err


def test_bad_usage_is_one_clear_line(ws, ft):
    code, _, err = ft("dataset", "prepare", "data/none.jsonl")
    assert code == 5 and "no such file" in err
    code, _, err = ft("dataset", "prepare", "data/sample.jsonl", "--labels", "some")
    assert code == 2 and "sft-desirable" in err
    code, _, err = ft("dataset", "prepare", "data/sample.jsonl", "--model", "not-pulled")
    assert code == 5 and "ft models pull not-pulled" in err


def test_service_api_for_training(ws):
    """The training service prepares from train.yml when needed and locates the splits by name."""
    w = Workspace(ws)
    cfg = load_config(w, ["data.val_split=0.25", "data.test_split=0.1"]).config
    result = dataset_prepare.prepare_from_config(w, cfg)
    assert result.name == "sample" and set(result.splits) == {"train", "val", "test"}
    assert dataset_prepare.prepare_from_config(w, cfg).cache_hit
    resolved = svc.resolve_dataset(w, "sample")
    assert resolved.version == result.version and resolved.path == Path(result.path)
    train = load_split(resolved.splits["train"])
    assert len(train) == result.stats.splits["train"].records
    assert train.tokens(0).dtype.name == "int32" and train.mask(0).any()


def test_a_version_folder_missing_from_the_registry_is_found_again(ws, ft):
    """If ft stopped between the folder's atomic rename and the registry insert, nothing is lost."""
    assert ft("dataset", "prepare", "data/sample.jsonl")[0] == 0
    assert Workspace(ws).registry().delete("datasets", name="sample", version=1)
    code, out, _ = ft("dataset", "prepare", "data/sample.jsonl", "--json")
    assert code == 0 and json.loads(out)["cache_hit"] and json.loads(out)["version"] == 1
    assert Workspace(ws).registry().get("datasets", name="sample", version=1) is not None


def _jsonl_bytes(n: int) -> bytes:
    return "".join(
        json.dumps({"prompt": f"q{i}", "completion": f"answer {i}"}) + "\n" for i in range(n)
    ).encode()


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_truncated_or_corrupt_compressed_files_are_clear_bad_compression_errors(ws, ft, suffix):
    import bz2
    import gzip
    import lzma

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    whole = compress(_jsonl_bytes(1000))
    good = ws / "data" / f"good.jsonl{suffix}"
    good.write_bytes(whole)
    code, out, err = ft("dataset", "prepare", good, "--json")
    assert code == 0, out + err
    assert json.loads(out)["stats"]["records_read"] == 1000

    truncated = ws / "data" / f"cut.jsonl{suffix}"
    truncated.write_bytes(whole[: len(whole) // 2])
    code, out, err = ft("dataset", "prepare", truncated, "--json")
    error = json.loads(out)
    assert code == 7 and error["error"] == "bad_compression", out
    assert "cut.jsonl" in error["message"] and "truncated" in error["message"]
    assert "-t cut.jsonl" in error["hint"]
    code, out, err = ft("dataset", "prepare", truncated)
    assert code == 7 and "truncated" in err and not err.startswith("interrupted") and "internal" not in err
    assert "rejected" not in err  # no record-level report for a broken file

    corrupt = bytearray(whole)
    mid = len(corrupt) // 2
    corrupt[mid : mid + 64] = bytes(64)  # zeroes in the middle of the compressed stream
    bad = ws / "data" / f"bad.jsonl{suffix}"
    bad.write_bytes(bytes(corrupt))
    code, out, err = ft("dataset", "prepare", bad, "--json")
    error = json.loads(out)
    assert code == 7 and error["error"] == "bad_compression", out
    assert "bad.jsonl" in error["message"] and "not valid" in error["message"]
    assert not (ws / "datasets" / "cut").exists() and not (ws / "datasets" / "bad").exists()


def test_not_gzip_at_all_and_a_truncated_json_gz(ws, ft):
    import gzip

    fake = ws / "data" / "plain.jsonl.gz"
    fake.write_bytes(_jsonl_bytes(5))
    code, out, _ = ft("dataset", "prepare", fake, "--json")
    error = json.loads(out)
    assert code == 7 and error["error"] == "bad_compression" and "drop the .gz suffix" in error["hint"]
    whole = gzip.compress(json.dumps([{"prompt": f"q{i}", "completion": "a"} for i in range(500)]).encode())
    (ws / "data" / "cut.json.gz").write_bytes(whole[:-30])
    code, out, _ = ft("dataset", "prepare", "data/cut.json.gz", "--json")
    assert code == 7 and json.loads(out)["error"] == "bad_compression"


def test_a_failed_prepare_leaves_nothing_and_rm_removes_old_leftovers(ws, ft):
    (ws / "data" / "bad.jsonl").write_text("oops\n" * 10)
    code, _, err = ft("dataset", "prepare", "data/bad.jsonl")
    assert code == 7
    assert not (ws / "datasets" / "bad").exists()
    assert (ws / "datasets" / ".failed" / "bad" / "rejected.jsonl").is_file()
    code, out, _ = ft("dataset", "list", "--json")
    assert json.loads(out)["datasets"] == []
    # `rm` removes the failure report, and a folder an older ft (or a killed prepare) left behind
    (ws / "datasets" / "bad" / ".tmp-v1.x").mkdir(parents=True)
    code, out, err = ft("dataset", "rm", "bad", "--yes", "--json")
    assert code == 0, err
    assert sorted(json.loads(out)["removed_leftovers"]) == ["datasets/.failed/bad", "datasets/bad"]
    assert not (ws / "datasets" / "bad").exists() and not (ws / "datasets" / ".failed").exists()
    code, _, err = ft("dataset", "rm", "bad", "--yes")
    assert code == 5 and "no dataset named 'bad'" in err
    # a later successful prepare drops the stale report
    (ws / "data" / "bad.jsonl").write_text("oops\n" * 10)
    assert ft("dataset", "prepare", "data/bad.jsonl")[0] == 7
    (ws / "data" / "bad.jsonl").write_text(_jsonl_bytes(20).decode())
    assert ft("dataset", "prepare", "data/bad.jsonl")[0] == 0
    assert not (ws / "datasets" / ".failed" / "bad").exists()


def _agent_record(i: int) -> dict:
    """The brief's agent data: system + user + an assistant tool call (null content, or text + call, or
    call + result + answer), extra keys behavior/pattern/category, label true/false."""
    call = {
        "id": f"call_{i}",
        "type": "function",
        "function": {
            "name": "contentManager_prependContent",
            "arguments": json.dumps({"filePath": f"Notes/{i}.md", "content": f"item {i}\n"}),
        },
    }
    system = {"role": "system", "content": f"Session {i}: vault 'work', today is Monday."}
    user = {"role": "user", "content": f"Put item {i} at the top of note {i}.\u0004"}  # pasted control char
    if i % 3 == 0:
        msgs = [system, user, {"role": "assistant", "content": None, "tool_calls": [call]}]
    elif i % 3 == 1:
        msgs = [system, user, {"role": "assistant", "content": "Adding it now.", "tool_calls": [call]}]
    else:
        msgs = [
            system,
            user,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": '{"ok": true}'},
            {"role": "assistant", "content": f"Done: item {i} is first in note {i}."},
        ]
    return {
        "messages": msgs,
        "behavior": "rare" if i % 10 == 0 else ["direct", "announce"][i % 2],
        "pattern": f"p{i % 3}",
        "category": ["edit", "create", "move"][i % 3],
        "label": i % 4 != 0,
    }


def test_agent_data_with_tool_calls_stratified_and_grouped_by_metadata(ws, ft):
    from ft.data.store import group_values

    path = ws / "data" / "agent.jsonl"
    path.write_text("".join(json.dumps(_agent_record(i)) + "\n" for i in range(300)))
    args = [
        "dataset",
        "prepare",
        path,
        "--labels",
        "keep",
        "--stratify-by",
        "behavior",
        "--group-by",
        "category",
    ]
    code, out, err = ft(*args, "--json")
    assert code == 0, out + err
    r = json.loads(out)
    s = r["stats"]
    assert s["records_read"] == 300 and s["kept"] == 300 and s["rejected"] == {}
    assert s["dropped_chars"] == {"U+0004": 300}  # the fast path (300 records) did not crash on it
    assert s["groups"] == {"edit": 100, "create": 100, "move": 100}
    assert "'behavior' (3 values)" in s["split_method"] and s["splits"]["val"]["records"] == 60
    folder = Path(r["path"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["options"]["group_by"] == "category" and manifest["options"]["stratify_by"] == "behavior"
    val = load_split(folder / "val.safetensors")
    behaviors = group_values(folder, "val", "behavior")
    assert behaviors.count("rare") == 6  # 10% of val, as in the whole
    categories = group_values(folder, "val", manifest["options"]["group_by"])
    assert len(categories) == len(val) and set(categories) == {"edit", "create", "move"}
    code, out, _ = ft(*args, "--name", "agent-view")
    flat = " ".join(out.split())
    assert code == 0 and "groups (category)" in flat and "U+0004 in 300 records" in flat
    # train.yml's data.group_by / data.stratify_by are the defaults (so `ft train` preparing data uses them)
    code, out, err = ft(
        "dataset", "prepare", path, "--set", "data.group_by=pattern", "--name", "cfg", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["stats"]["groups"] == {"p0": 75, "p1": 75, "p2": 75}  # desirable ones


def test_an_mlx_lm_folder_says_its_splits_are_kept(ws, ft):
    folder = ws / "data" / "mlx"
    folder.mkdir()
    for name, n in (("train", 40), ("valid", 10)):
        rows = [{"prompt": f"{name} q{i}", "completion": f"a{i}"} for i in range(n)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    code, out, err = ft("dataset", "prepare", folder, "--val", "0.5")
    flat = " ".join(out.split())
    assert code == 0, err
    assert "splits kept as given by the source (train.jsonl -> train, valid.jsonl -> val)" in flat
    code, out, _ = ft("dataset", "info", "mlx", "--json")
    info = json.loads(out)
    assert info["manifest"]["splits_given"] and info["stats"]["splits"]["val"]["records"] == 10


def test_info_show_and_rm_take_name_at_version(ws, ft):
    assert ft("dataset", "prepare", "data/sample.jsonl", "--name", "s")[0] == 0
    assert ft("dataset", "prepare", "data/sample.jsonl", "--name", "s", "--labels", "keep")[0] == 0
    code, out, _ = ft("dataset", "info", "s@v1", "--json")
    assert code == 0 and json.loads(out)["summary"]["version"] == 1
    code, out, _ = ft("dataset", "show", "s@1", "--n", "1", "--json")
    assert code == 0 and json.loads(out)["version"] == 1
    code, out, _ = ft("dataset", "info", "s@v1", "--version", "2", "--json")
    assert code == 2 and json.loads(out)["error"] == "usage"
    code, out, _ = ft("dataset", "rm", "s@v1", "--yes", "--json")
    assert code == 0 and json.loads(out)["removed_versions"] == [1]
    code, out, _ = ft("dataset", "list", "--json")
    assert [(d["name"], d["version"]) for d in json.loads(out)["datasets"]] == [("s", 2)]


def test_versions_prepare_notes_and_exact_references(ws, ft):
    for fname, n in (("va.jsonl", 40), ("vb.jsonl", 70)):
        rows = [{"prompt": f"{fname} question {i}?", "completion": f"answer {i}."} for i in range(n)]
        (ws / "data" / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    prep = ["dataset", "prepare", "--name", "mix", "--val", "0.25"]
    code, out, _ = ft(*prep, "data/va.jsonl", "--json")
    a = json.loads(out)
    assert code == 0 and a["version"] == 1 and a["notes"] == [] and a["ref"] == "mix"
    code, out, _ = ft(*prep, "data/vb.jsonl", "--json")
    b = json.loads(out)
    assert code == 0 and b["version"] == 2 and b["ref"] == "mix"
    assert any("different source" in n and "mix@v1" in n for n in b["notes"]), b["notes"]
    code, out, _ = ft(*prep, "data/va.jsonl", "--json")
    again = json.loads(out)
    assert code == 0 and again["cache_hit"] and again["version"] == 1 and again["ref"] == "mix@v1"
    assert any("v2 is newer" in n for n in again["notes"]), again["notes"]
    code, out, _ = ft(*prep, "data/va.jsonl")
    assert code == 0 and "note:" in out and "ft train --dataset mix@v1" in out
    # the same file with other contents
    (ws / "data" / "vb.jsonl").write_text(json.dumps({"prompt": "new", "completion": "data"}) + "\n")
    code, out, _ = ft(*prep, "data/vb.jsonl", "--json")
    assert any("changed since mix v2" in n for n in json.loads(out)["notes"])
    # what `ft train --dataset` resolves
    w = Workspace(ws)
    assert (
        svc.resolve_dataset_ref(w, "mix@v1").version == 1 and svc.resolve_dataset_ref(w, "mix@1").note is None
    )
    newest = svc.resolve_dataset_ref(w, "mix")
    assert newest.version == 3 and "has 3 versions: using v3, the newest" in (newest.note or "")

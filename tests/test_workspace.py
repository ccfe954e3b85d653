"""Workspace layer: names, registry, atomic writes."""

from __future__ import annotations

import os

import pytest

from ft.errors import FtError
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_dir, atomic_write_json, clean_leftovers


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "", "x" * 200, "a\x00b", "/etc/passwd"])
def test_names_refuse_traversal(bad):
    with pytest.raises(FtError):
        validate_name(bad)


def test_paths_stay_inside(tmp_path):
    ws = Workspace(tmp_path)
    assert ws.model_dir("smollm2").parent == ws.models_dir
    with pytest.raises(FtError):
        ws.run_dir("../../etc")


def test_registry_roundtrip(tmp_path):
    reg = Workspace(tmp_path).registry()
    reg.upsert("runs", {"id": "r1"}, status="running", name="demo", meta={"steps": 3})
    reg.upsert("runs", {"id": "r1"}, status="completed")
    row = reg.get("runs", id="r1")
    assert row["status"] == "completed" and row["meta"] == {"steps": 3} and row["name"] == "demo"
    reg.upsert("datasets", {"name": "d", "version": "1"}, meta={})
    reg.upsert("datasets", {"name": "d", "version": "2"}, meta={})
    assert [r["version"] for r in reg.list("datasets", name="d")] == ["1", "2"]
    assert reg.delete("datasets", name="d", version="1") and not reg.delete("datasets", name="d", version="1")
    with pytest.raises(KeyError):
        reg.upsert("runs", {"id": "x"}, bogus=1)
    assert reg.check() is None


def test_atomic_dir_all_or_nothing(tmp_path):
    final = tmp_path / "step-000001"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("crash mid-save")
    assert not final.exists() and not list(tmp_path.iterdir())
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("whole")
    assert (final / "a.txt").read_text() == "whole"
    with pytest.raises(FileExistsError), atomic_dir(final):
        pass
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    # a crashed write leaves only .tmp-* entries, which the next start cleans
    os.mkdir(tmp_path / ".tmp-step-000002.abc")
    assert len(clean_leftovers(tmp_path)) == 1 and (tmp_path / "x.json").exists()

"""What `ft serve` offers from a workspace: base models, runs by id and name, checkpoints, the default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_helpers import tiny_llama
from ft.engine.lora import AdapterSpec
from ft.errors import ErrorCode, FtError
from ft.services.serving import ServeOptions, WorkspaceModels, prepare
from ft.workspace import Workspace
from ft.workspace.run_folder import resolve
from run_helpers import record_run, set_best, write_checkpoint


def _ws(tmp_path: Path) -> Workspace:
    from ft.services.project import init_workspace

    init_workspace(tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    for name in ("base-a", "base-b"):
        d = ws.model_dir(name)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 128}))
    ws.registry().upsert(
        "models", {"name": "base-a"}, source="org/base-a", meta={"path": str(ws.model_dir("base-a"))}
    )
    return ws


def _run(
    ws: Workspace,
    run_id: str,
    steps: list[int],
    base: str = "base-a",
    name: str | None = None,
    best: str | None = None,
) -> Path:
    """A run with checkpoints at ``steps``, written by the engine's checkpoint writer."""
    model = tiny_llama()
    for s in steps:
        write_checkpoint(ws, run_id, s, model, AdapterSpec(rank=4, alpha=8.0), base)
    if best:
        set_best(ws, run_id, best)
    record_run(ws, run_id, base, name=name)
    return ws.run_dir(run_id) / "checkpoints"


def test_lists_bases_runs_by_id_and_name_and_picks_best(tmp_path):
    ws = _ws(tmp_path)
    _run(ws, "r1", [1, 2, 3], name="demo", best="step-000002")
    _run(ws, "r2", [5], base="org/base-a", name="other")  # base named by its hub id: matched via the registry
    _run(ws, "r3", [1], base="not-here")  # base model missing: not servable
    _run(ws, "r4", [], name="empty")  # no checkpoint: not servable
    models = {m.id: m for m in WorkspaceModels(ws).models()}
    assert set(models) == {"base-a", "base-b", "r1", "r2", "demo", "other"}
    assert models["r1"].checkpoint == "step-000002" and models["demo"].run == "r1"
    assert models["r2"].checkpoint == "step-000005" and models["r2"].base == "base-a"
    assert models["demo"].load_key == models["r1"].load_key != models["r2"].load_key


def test_pointers_cannot_leave_the_run(tmp_path):
    ws = _ws(tmp_path)
    ckpts = _run(ws, "r1", [1])
    outside = tmp_path / "elsewhere"
    (outside / "step-000009").mkdir(parents=True)
    (outside / "step-000009" / "adapters.safetensors").write_bytes(b"x")
    (ckpts / "best").symlink_to(outside / "step-000009")
    (ckpts / "latest").write_text(str(outside / "step-000009"))
    found = resolve(ckpts, "best")  # both pointers ignored: the newest step folder of the run
    assert (
        found is not None and found.path.name == "step-000001" and "no best checkpoint" in (found.note or "")
    )
    (ckpts / "latest").write_text("../../r2/checkpoints/step-000001\n")
    assert resolve(ckpts, "latest").path.name == "step-000001"
    assert {m.id: m.checkpoint for m in WorkspaceModels(ws).models()}["r1"] == "step-000001"


def test_default_model_and_adapter_option(tmp_path):
    ws = _ws(tmp_path)
    _run(ws, "r1", [1, 2], name="demo", best="step-000002")
    cfg, src, info = prepare(ws, ServeOptions())
    assert cfg.default_model == "r1"  # the newest tune: `ft serve` right after `ft train` serves it
    assert cfg.host == "127.0.0.1" and cfg.api_key is None
    assert prepare(ws, ServeOptions(model="base-b"))[0].default_model == "base-b"
    cfg, src, info = prepare(ws, ServeOptions(adapter="demo:step-000001"))
    assert cfg.default_model == "r1:step-000001"
    assert {m.id: m.checkpoint for m in info.models}["r1:step-000001"] == "step-000001"
    with pytest.raises(FtError) as e:
        prepare(ws, ServeOptions(adapter="r1:../../etc"))
    assert e.value.code == ErrorCode.NAME_INVALID
    with pytest.raises(FtError) as e:
        prepare(ws, ServeOptions(adapter="r1:step-000007"))
    assert e.value.code == ErrorCode.NOT_FOUND
    with pytest.raises(FtError) as e:
        prepare(ws, ServeOptions(adapter="r1", model="base-b"))
    assert e.value.code == ErrorCode.USAGE
    with pytest.raises(FtError) as e:
        prepare(ws, ServeOptions(model="../base-a"))
    assert e.value.code == ErrorCode.NOT_FOUND


def test_empty_workspace_says_what_to_do(tmp_path):
    from ft.services.project import init_workspace

    init_workspace(tmp_path / "ws")
    with pytest.raises(FtError) as e:
        prepare(Workspace(tmp_path / "ws"), ServeOptions())
    assert "ft models pull" in (e.value.hint or "")

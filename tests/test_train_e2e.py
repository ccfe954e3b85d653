"""`ft train` end to end on the embedded SmolLM2 and the sample data, then `ft runs list|show|plot`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ft.cli.app import run
from ft.engine.callbacks import read_metrics
from ft.services.project import init_workspace
from ft.workspace import Workspace

pytestmark = pytest.mark.e2e

SHORT = [
    "training.max_steps=6",
    "training.warmup_steps=1",
    "training.eval_steps=3",
    "training.save_steps=3",
    "training.batch_size=4",
    "training.grad_accumulation_steps=1",
    "training.learning_rate=1e-3",
    "training.eval_batches=4",
    "logging.steps=2",
    "data.max_seq_length=256",
    "lora.rank=8",
]


def _ft_json(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = run([*args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Workspace:
    from ft.services.models import pull

    mp = pytest.MonkeyPatch()
    mp.delenv("FT_MODELS_CACHE", raising=False)
    root = tmp_path_factory.mktemp("train") / "ws"
    init_workspace(root)
    w = Workspace(root)
    pull(w, str(smollm2_dir), name="smollm2-135m-instruct")
    yield w
    mp.undo()


def _sets() -> list[str]:
    return [a for s in SHORT for a in ("--set", s)]


def test_dry_run_plans_without_training(ws: Workspace, capsys: pytest.CaptureFixture) -> None:
    code, plan = _ft_json(capsys, "--workspace", str(ws.root), "train", "--dry-run", *_sets())
    assert code == 0, plan
    assert plan["total_steps"] == 6 and plan["examples_per_step"] == 4
    assert plan["trainable_parameters"] > 0 and plan["trainable_parameters"] < plan["total_parameters"]
    assert plan["train_examples"] > 50 and plan["val_examples"] > 0
    assert plan["measured_tokens_per_second"] > 0 and plan["estimated_seconds"] > 0
    assert plan["measured_peak_memory_gb"] > 0
    assert 0 <= plan["padding_fraction"] < 0.3
    assert ws.registry().list("runs") == [] and not any(ws.runs_dir.glob("*"))  # nothing trained or written


def test_train_lowers_validation_loss_and_records_everything(
    ws: Workspace, capsys: pytest.CaptureFixture
) -> None:
    code, res = _ft_json(capsys, "--workspace", str(ws.root), "train", "--name", "e2e", *_sets())
    assert code == 0, res
    assert res["status"] == "completed" and res["steps"] == 6
    assert res["final_val_loss"] < res["first_val_loss"], (res["first_val_loss"], res["final_val_loss"])
    run_dir = Path(res["path"])
    # metrics.jsonl: start, logged train steps, evaluations at 0/3/6, end
    rows = read_metrics(run_dir / "metrics.jsonl")
    kinds = [r["type"] for r in rows]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert [r["step"] for r in rows if r["type"] == "eval"] == [0, 3, 6]
    assert [r["step"] for r in rows if r["type"] == "train"] == [2, 4, 6]
    assert all(r["tokens_per_second"] > 0 and r["lr"] > 0 for r in rows if r["type"] == "train")
    assert "val_loss" in (run_dir / "train.log").read_text()
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # checkpoints: step 3 and 6, latest and best pointers, self-describing
    ck = run_dir / "checkpoints"
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-000003", "step-000006"]
    assert res["latest_checkpoint"] == "step-000006" and res["best_checkpoint"] is not None
    cfg = json.loads((ck / "step-000006" / "adapter_config.json").read_text())
    assert cfg["base_model"] == "smollm2-135m-instruct" and cfg["method"] == "lora" and cfg["rank"] == 8
    # registry row
    row = ws.registry().get("runs", id=res["run_id"])
    assert row is not None and row["status"] == "completed" and row["name"] == "e2e"
    assert row["meta"]["best_val_loss"] == pytest.approx(res["best_val_loss"])
    assert row["meta"]["dataset"] == "sample" and row["meta"]["config_hash"]

    # ft runs list / show / plot
    code, listed = _ft_json(capsys, "--workspace", str(ws.root), "runs", "list")
    assert code == 0 and [r["id"] for r in listed["runs"]] == [res["run_id"]]
    code, shown = _ft_json(capsys, "--workspace", str(ws.root), "runs", "show", "e2e")
    assert code == 0 and [e["step"] for e in shown["evals"]] == [0, 3, 6]
    assert shown["best_checkpoint"] == res["best_checkpoint"]
    out = run_dir / "again.png"
    code, plotted = _ft_json(
        capsys, "--workspace", str(ws.root), "runs", "plot", res["run_id"], "--out", str(out)
    )
    assert code == 0 and plotted["eval_points"] == 3 and out.is_file()
    code, err = _ft_json(capsys, "--workspace", str(ws.root), "runs", "show", "no-such-run")
    assert code == 5 and err["error"] == "not_found"


def test_bad_settings_are_clear_errors(ws: Workspace, capsys: pytest.CaptureFixture) -> None:
    code, err = _ft_json(
        capsys, "--workspace", str(ws.root), "train", "--dry-run", "--set", "lora.target_modules=[qq_proj]"
    )
    assert code == 3 and "qq_proj" in err["message"] and "v_proj" in err["hint"]
    code, err = _ft_json(capsys, "--workspace", str(ws.root), "train", "--dataset", "nope")
    assert code == 5 and err["error"] == "not_found"


def test_tracking_without_its_package_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from ft.errors import FtError
    from ft.services.tracking import TensorBoard, WandB

    for name in ("tensorboardX", "torch", "wandb"):  # as if not installed: `import` raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(FtError) as e:
        TensorBoard(tmp_path / "tb")
    assert e.value.code.value == "package_missing" and "tensorboardX" in (e.value.hint or "")
    init_workspace(tmp_path / "w")
    with pytest.raises(FtError) as e:
        WandB(Workspace(tmp_path / "w"), "run", {})
    assert e.value.code.value == "package_missing" and "wandb" in (e.value.hint or "")


@pytest.mark.slow
def test_train_takes_the_named_dataset_version(ws: Workspace, capsys: pytest.CaptureFixture) -> None:
    """`ft train --dataset NAME@vN` trains on exactly vN; a bare NAME takes the newest and says so
    (prepare's notes about versions are tested in test_dataset_cli)."""
    root = str(ws.root)
    for fname, n in (("va.jsonl", 40), ("vb.jsonl", 70)):
        rows = [{"prompt": f"{fname} question {i}?", "completion": f"answer {i}."} for i in range(n)]
        (ws.root / "data" / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    prep = ["--workspace", root, "dataset", "prepare", "--name", "mix", "--val", "0.25"]
    assert _ft_json(capsys, *prep, "data/va.jsonl")[1]["version"] == 1
    assert _ft_json(capsys, *prep, "data/vb.jsonl")[1]["version"] == 2
    dry = ["--workspace", root, "train", "--dry-run", *_sets()]
    code, plan = _ft_json(capsys, *dry, "--dataset", "mix@v1")
    assert code == 0, plan
    assert plan["dataset_version"] == 1 and plan["train_examples"] == 30 and plan["val_examples"] == 10
    assert not any("versions" in w for w in plan["warnings"])
    code, plan = _ft_json(capsys, *dry, "--dataset", "mix")
    assert code == 0 and plan["dataset_version"] == 2 and plan["train_examples"] == 52
    assert any("has 2 versions: using v2, the newest" in w for w in plan["warnings"]), plan["warnings"]
    code, err = _ft_json(capsys, *dry, "--dataset", "mix@v9")
    assert code == 5 and "no version 9" in err["message"]
    code, err = _ft_json(capsys, *dry, "--dataset", "mix@latest")
    assert code == 2 and err["error"] == "usage"

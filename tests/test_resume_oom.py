"""Acceptance (issue 20): out of memory at run time, forced with ``FT_TEST_HOOK=oom-above:N[:K]``.

With ``training.auto_micro_batch: true`` the run survives by splitting micro-batches and ends with the
same adapters as an unforced run (1e-5); the lower limit is in every later checkpoint, so a resume keeps
it. With ``false`` the real CLI exits with ``OUT_OF_MEMORY`` (exit 11), no traceback, and the last
checkpoint is intact and resumable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ft.workspace.run_folder import TRAINER_STATE, verify_checkpoint
from ft.workspace.run_folder import pointer_name as read_pointer
from test_resume_support import (
    DATASET,
    adapters,
    make_workspace,
    max_abs_diff,
    output,
    run_id_of,
    set_args,
    settings,
    start_ft,
    steps_of,
    train_in_process,
)

LIMIT = (
    150  # positions: two rows are more; one row never is (max_seq_length 128, plus a shared prefix, bucketed)
)


def _values(steps: int = 8) -> list[str]:
    return [v for v in settings(steps) if not v.startswith("lora.dropout")] + ["lora.dropout=0.0"]


def test_out_of_memory_is_survived_by_splitting_or_refused_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from ft.cli.app import run

    ws = make_workspace(tmp_path / "ws")
    base = train_in_process(ws, "base", _values())
    base_dir = Path(base.path)

    # auto_micro_batch (the default): survived, same adapters, the limit kept in the checkpoints.
    monkeypatch.setenv("FT_TEST_HOOK", f"oom-above:{LIMIT}")
    forced = train_in_process(ws, "forced", _values())
    monkeypatch.delenv("FT_TEST_HOOK")
    assert forced.status == "completed"
    assert any("out of memory" in w and "split in two" in w for w in forced.warnings), forced.warnings
    forced_dir = Path(forced.path)
    assert max_abs_diff(adapters(base_dir, 8), adapters(forced_dir, 8)) <= 1e-5
    b, f = steps_of(base_dir), steps_of(forced_dir)
    assert all(abs(b[k][0] - f[k][0]) <= 1e-5 and b[k][1] == f[k][1] for k in b)
    state = json.loads((forced_dir / "checkpoints" / "step-000008" / TRAINER_STATE).read_text())
    assert state["micro_batch_limit"] is not None and state["micro_batch_limit"] <= LIMIT
    assert "out of memory" in (forced_dir / "train.log").read_text()

    # auto_micro_batch false, out of memory from step 5: exit 11, no traceback, step 4 intact.
    log = tmp_path / "oom.log"
    proc = start_ft(
        ws,
        [
            "train",
            "--dataset",
            DATASET,
            "--name",
            "oom",
            *set_args([*_values(), "training.auto_micro_batch=false"]),
            "--json",
        ],
        log,
        hook=f"oom-above:{LIMIT}:5",
        marker=tmp_path / "m",
    )
    assert proc.wait(timeout=300) == 11, output(log)
    err = json.loads(log.read_text())
    assert err["error"] == "out_of_memory" and "auto_micro_batch is false" in err["message"]
    assert "the last checkpoint is intact" in err["message"] and "auto_micro_batch: true" in err["hint"]
    assert "Traceback" not in log.with_suffix(".err").read_text()
    run_dir = ws.run_dir(run_id_of(ws, "oom"))
    ck = run_dir / "checkpoints"
    assert read_pointer(ck, "latest") == "step-000004" and verify_checkpoint(ck / "step-000004") == []
    assert max_abs_diff(adapters(base_dir, 4), adapters(run_dir, 4)) <= 1e-6
    # It resumes from there (the default auto_micro_batch back on) to the same end.
    capsys.readouterr()
    monkeypatch.setenv("FT_TEST_HOOK", f"oom-above:{LIMIT}")
    code = run(
        [
            "--workspace",
            str(ws.root),
            "train",
            "--resume",
            "oom",
            "--set",
            "training.auto_micro_batch=true",
            "--force",
            "--json",
        ]
    )
    monkeypatch.delenv("FT_TEST_HOOK")
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["resumed_from"] == "step-000004" and res["status"] == "completed", res
    assert max_abs_diff(adapters(base_dir, 8), adapters(run_dir, 8)) <= 1e-5

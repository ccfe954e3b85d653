"""Acceptance (issue 6): SIGINT / SIGTERM on a real `ft train` subprocess.

The first signal finishes the current step, saves a checkpoint of it, marks the run ``interrupted`` and
exits 130 (SIGINT) or 143 (SIGTERM); the run then resumes cleanly to the same end as an uninterrupted
run. A second Ctrl-C exits at once, even in the middle of that save, without damaging the previous
checkpoint. In-process, the previous signal handlers are back afterwards.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest

from ft.cli.app import run
from ft.errors import FtError
from ft.workspace.run_folder import pointer_name as read_pointer
from ft.workspace.run_folder import verify_checkpoint
from test_resume_support import (
    DATASET,
    assert_same_training,
    make_workspace,
    output,
    run_id_of,
    set_args,
    settings,
    train_in_process,
    train_paused,
    wait_for,
)

STEPS = 8


@pytest.fixture(scope="module")
def sws(tmp_path_factory: pytest.TempPathFactory) -> dict:
    ws = make_workspace(tmp_path_factory.mktemp("signals") / "ws")
    base = train_in_process(ws, "base", settings(STEPS))
    return {"ws": ws, "base": Path(base.path), "tmp": tmp_path_factory.mktemp("signal-logs")}


def _resume(ws, name: str, capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    code = run(["--workspace", str(ws.root), "train", "--resume", name, "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0, res
    return res


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_saves_the_finished_step_marks_interrupted_and_resumes(
    sws: dict, capsys: pytest.CaptureFixture, sig: int, code: int
) -> None:
    ws, tmp = sws["ws"], sws["tmp"]
    step = random.randint(1, STEPS - 1)  # a random step of the run
    name = f"sig-{signal.Signals(sig).name.lower()}"
    proc, log, _ = train_paused(ws, name, STEPS, tmp, f"pause-step:{step}", f"step {step}", json_out=False)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code, output(log)
    text = output(log)
    assert "Traceback" not in text and f"stopped after step {step}" in text and "ft train --resume" in text
    run_id = run_id_of(ws, name)
    ck = ws.run_dir(run_id) / "checkpoints"
    # A complete checkpoint of the last finished step.
    assert read_pointer(ck, "latest") == f"step-{step:06d}"
    assert verify_checkpoint(ck / f"step-{step:06d}") == []
    assert json.loads((ck / f"step-{step:06d}" / "trainer_state.json").read_text())["step"] == step
    row = ws.registry().get("runs", id=run_id)
    assert row["status"] == "interrupted" and row["meta"]["stop_reason"] == "interrupted"
    capsys.readouterr()
    assert run(["--workspace", str(ws.root), "runs", "show", name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["status"] == "interrupted"
    # ... and a clean resume to the uninterrupted run's end.
    res = _resume(ws, name, capsys)
    assert res["resumed_from"] == f"step-{step:06d}" and res["status"] == "completed"
    assert_same_training(sws["base"], ws.run_dir(run_id), STEPS, step)


def test_second_ctrl_c_exits_at_once_without_damaging_the_previous_checkpoint(
    sws: dict, capsys: pytest.CaptureFixture
) -> None:
    ws, tmp = sws["ws"], sws["tmp"]
    # Paused after step 3; the first Ctrl-C lets it finish and start saving step 3, where it pauses again.
    proc, log, marker = train_paused(
        ws, "double", STEPS, tmp, "pause-step:3,pause-save:3", "step 3", json_out=False
    )
    proc.send_signal(signal.SIGINT)
    wait_for(marker, proc, "save 3", log)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130, output(log)
    assert time.monotonic() - t0 < 5  # at once (the save was paused for up to 60 s)
    run_id = run_id_of(ws, "double")
    ck = ws.run_dir(run_id) / "checkpoints"
    assert read_pointer(ck, "latest") == "step-000002" and verify_checkpoint(ck / "step-000002") == []
    assert not (ck / "step-000003").exists() and any(
        p.name.startswith(".tmp-step-000003") for p in ck.iterdir()
    )
    row = ws.registry().get("runs", id=run_id)
    assert row["status"] == "interrupted" and row["meta"]["stop_reason"] == "second SIGINT"
    res = _resume(ws, "double", capsys)
    assert res["resumed_from"] == "step-000002" and not list(ck.glob(".tmp-*"))
    assert_same_training(sws["base"], ws.run_dir(run_id), STEPS, 2)


def test_in_process_handlers_are_restored_and_a_signal_stops_cleanly(sws: dict) -> None:
    from ft.services.training import run_training

    ws = sws["ws"]
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))

    class SendTerm:
        def on_step(self, e) -> None:
            if e.step == 2:
                signal.raise_signal(signal.SIGTERM)

    with pytest.raises(FtError) as e:
        run_training(ws, settings(STEPS), dataset=DATASET, name="inproc", callbacks=[SendTerm()])
    assert e.value.exit_code == 143 and e.value.code.value == "interrupted"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    run_id = run_id_of(ws, "inproc")
    assert ws.registry().get("runs", id=run_id)["status"] == "interrupted"
    assert read_pointer(ws.run_dir(run_id) / "checkpoints", "latest") == "step-000002"
    # A normal run restores them too.
    train_in_process(ws, "inproc-ok", settings(2, save=1, evals=1))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_out_of_memory_in_a_step_is_a_clear_error_and_keeps_the_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLX running out of memory in step 3 (FT_TEST_HOOK oom-step): exit code 11 with the memory knobs as
    the hint, no traceback, the run marked failed and its step-2 checkpoint intact."""
    from ft.errors import ErrorCode

    ws = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("FT_TEST_HOOK", "oom-step:3")
    code = run(
        [
            "--workspace",
            str(ws.root),
            "train",
            "--dataset",
            DATASET,
            "--name",
            "oom",
            *set_args(settings(4, save=2)),
        ]
    )
    err = " ".join(capsys.readouterr().err.split())
    assert code == FtError(ErrorCode.OUT_OF_MEMORY, "").exit_code == 11, err
    assert "ran out of memory" in err and "last checkpoint: step-000002 (intact)" in err
    assert "hint:" in err and "training.batch_size" in err and "Traceback" not in err
    run_id = run_id_of(ws, "oom")
    ck = ws.run_dir(run_id) / "checkpoints"
    assert read_pointer(ck, "latest") == "step-000002" and verify_checkpoint(ck / "step-000002") == []
    row = ws.registry().get("runs", id=run_id)
    assert row["status"] == "failed" and "out of memory" in row["meta"]["error"]

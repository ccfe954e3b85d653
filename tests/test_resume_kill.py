"""Acceptance (issue 6): a run killed with SIGKILL anywhere, including inside a checkpoint save, and
resumed with `ft train --resume` ends exactly where the uninterrupted run ends.

The killed runs are real `ft train` subprocesses; the hook ``FT_TEST_HOOK=pause-step:K`` parks the child
right after step K's update (before its evaluation and save), ``pause-save:K`` inside step K's save after
every file is written but before the folder is renamed. The child is SIGKILLed there, and the run is
resumed (in-process, through the CLI) to the end. Then: final adapters within 1e-6 of the uninterrupted
run, every step's loss within 1e-5, and the same records in every step (sample order).
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest

from ft.cli.app import run
from ft.workspace import Workspace
from ft.workspace.run_folder import pointer_name as read_pointer
from ft.workspace.run_folder import verify_checkpoint
from test_resume_support import (
    DATASET,
    assert_same_training,
    make_workspace,
    run_id_of,
    set_args,
    settings,
    start_ft,
    train_in_process,
    train_paused,
    wait_for,
)

STEPS = 8
SLOW_STEPS = 16


@pytest.fixture(scope="module")
def kws(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Workspace + the uninterrupted baselines (8 steps for CI, 16 for the slow test)."""
    ws = make_workspace(tmp_path_factory.mktemp("kill") / "ws")
    base = train_in_process(ws, "base", settings(STEPS))
    assert base.status == "completed" and base.steps == STEPS
    return {"ws": ws, "base": Path(base.path), "tmp": tmp_path_factory.mktemp("kill-logs")}


def _ft(capsys: pytest.CaptureFixture, ws: Workspace, *args: str) -> tuple[int, dict, str]:
    capsys.readouterr()
    code = run(["--workspace", str(ws.root), *args, "--json"])
    out = capsys.readouterr()
    return code, json.loads(out.out), out.err


def _kill_and_resume(
    kws: dict, capsys: pytest.CaptureFixture, name: str, kind: str, step: int, steps: int, base: Path
) -> dict:
    ws, tmp = kws["ws"], kws["tmp"]
    proc, _, _ = train_paused(ws, name, steps, tmp, f"pause-{kind}:{step}", f"{kind} {step}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    run_id = run_id_of(ws, name)
    run_dir = ws.run_dir(run_id)
    assert ws.registry().get("runs", id=run_id)["status"] == "running"  # killed: nobody could say otherwise
    # ... but `ft runs list` sees that the process is gone: interrupted (resumable), with the reason.
    listed = {r["id"]: r for r in _ft(capsys, ws, "runs", "list")[1]["runs"]}
    assert listed[run_id]["status"] == "interrupted" and "killed" in listed[run_id]["detail"]
    ckpts = run_dir / "checkpoints"
    if kind == "save":
        # The half-written save is a temporary folder only; the step folder does not exist.
        assert any(p.name.startswith(".tmp-step-") for p in ckpts.iterdir())
        assert not (ckpts / f"step-{step:06d}").exists()
    latest = read_pointer(ckpts, "latest") if ckpts.is_dir() else None
    if latest:
        assert verify_checkpoint(ckpts / latest) == []
    code, res, err = _ft(capsys, ws, "train", "--resume", name)
    assert code == 0, (res, err)
    assert res["status"] == "completed" and res["steps"] == steps
    assert not list(ckpts.glob(".tmp-*")), "leftovers of the crashed save were not cleaned"
    expected_from = latest or "step 0"
    assert res["resumed_from"] == expected_from
    resumed_at = 0 if latest is None else int(latest[5:])
    diff = assert_same_training(base, run_dir, steps, resumed_at)
    return {"resumed_at": resumed_at, "diff": diff, "notes": res["notes"]}


# Five kill points: before any checkpoint, between saves, inside a save, and inside the final save.
@pytest.mark.parametrize(("kind", "step"), [("step", 1), ("step", 3), ("save", 4), ("step", 7), ("save", 8)])
def test_sigkill_anywhere_then_resume_matches_uninterrupted(
    kws: dict, capsys: pytest.CaptureFixture, kind: str, step: int
) -> None:
    out = _kill_and_resume(kws, capsys, f"kill-{kind}-{step}", kind, step, STEPS, kws["base"])
    if kind == "save":
        assert out["resumed_at"] == step - 2  # the save in flight never counted
        assert any("interrupted save" in n for n in out["notes"])
    else:
        assert out["resumed_at"] == step - step % 2


@pytest.mark.slow
def test_sigkill_at_twenty_random_points(kws: dict, capsys: pytest.CaptureFixture) -> None:
    ws = kws["ws"]
    base = Path(train_in_process(ws, "base-long", settings(SLOW_STEPS, save=3, evals=5)).path)
    rng = random.Random(int(time.time()))
    points = [("save", s) for s in rng.sample(range(3, SLOW_STEPS + 1, 3), 4)]
    points += [("step", s) for s in rng.sample(range(1, SLOW_STEPS + 1), 16)]
    rng.shuffle(points)
    for i, (kind, step) in enumerate(points):
        ws_tmp = kws["tmp"] / "slow"
        ws_tmp.mkdir(exist_ok=True)
        name = f"slow-{i}-{kind}-{step}"
        ws_args = settings(SLOW_STEPS, save=3, evals=5)
        marker, log = ws_tmp / f"{name}.marker", ws_tmp / f"{name}.log"
        proc = start_ft(
            ws,
            ["train", "--dataset", DATASET, "--name", name, *set_args(ws_args), "--json"],
            log,
            hook=f"pause-{kind}:{step}",
            marker=marker,
        )
        wait_for(marker, proc, f"{kind} {step}", log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        code, res, err = _ft(capsys, ws, "train", "--resume", name)
        assert code == 0, (name, res, err)
        run_dir = ws.run_dir(run_id_of(ws, name))
        at = 0 if res["resumed_from"] == "step 0" else int(res["resumed_from"][5:])
        assert_same_training(base, run_dir, SLOW_STEPS, at)


def test_resume_without_argument_takes_the_latest_run(kws: dict, capsys: pytest.CaptureFixture) -> None:
    ws, tmp = kws["ws"], kws["tmp"]
    proc, _, _ = train_paused(ws, "latest-run", STEPS, tmp, "pause-step:5", "step 5")
    proc.kill()
    proc.wait(timeout=30)
    code, res, _ = _ft(capsys, ws, "train", "--resume")
    assert code == 0 and res["run_id"] == run_id_of(ws, "latest-run") and res["resumed_from"] == "step-000004"
    assert_same_training(kws["base"], Path(res["path"]), STEPS, 4)
    # A completed run is not trained again: ft says so.
    code, err, _ = _ft(capsys, ws, "train", "--resume", "latest-run")
    assert code == 2 and "already completed" in err["message"] and "nothing to resume" in err["message"]
    code, listed = run(["--workspace", str(ws.root), "runs", "list", "--json"]), None
    assert code == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["status"] for r in listed["runs"]} >= {"completed"}


def test_resume_refuses_a_change_of_the_math_unless_forced(kws: dict, capsys: pytest.CaptureFixture) -> None:
    ws, tmp = kws["ws"], kws["tmp"]
    proc, _, _ = train_paused(ws, "cfg-run", STEPS, tmp, "pause-step:3", "step 3")
    proc.kill()
    proc.wait(timeout=30)
    code, err, _ = _ft(
        capsys,
        ws,
        "train",
        "--resume",
        "cfg-run",
        "--set",
        "training.learning_rate=5e-4",
        "--set",
        "lora.rank=8",
        "--set",
        "logging.steps=2",
    )
    assert code == 8 and err["error"] == "resume_mismatch"
    assert (
        "training.learning_rate: 0.001 -> 0.0005" in err["message"] and "lora.rank: 4 -> 8" in err["message"]
    )
    assert "logging.steps" not in err["message"] and "--force" in err["hint"]
    assert ws.registry().get("runs", id=run_id_of(ws, "cfg-run"))["status"] == "running"  # nothing happened
    # A change that does not touch the math is accepted (and said); --force accepts the rest and records it.
    code, res, _ = _ft(
        capsys,
        ws,
        "train",
        "--resume",
        "cfg-run",
        "--set",
        "training.learning_rate=5e-4",
        "--set",
        "logging.steps=2",
        "--force",
    )
    assert code == 0 and res["status"] == "completed" and res["resumed_from"] == "step-000002"
    assert any("logging.steps" in n for n in res["notes"])
    meta = ws.registry().get("runs", id=res["run_id"])["meta"]
    assert meta["resumes"][-1]["forced_differences"] == ["training.learning_rate: 0.001 -> 0.0005"]
    code, shown, _ = _ft(capsys, ws, "runs", "show", "cfg-run")
    assert code == 0 and shown["meta"]["resumes"][-1]["from"] == "step-000002"


def test_resume_of_a_run_whose_process_is_alive_is_refused(kws: dict, capsys: pytest.CaptureFixture) -> None:
    """A `running` row whose process still lives on this host is another ft training it, not a crash."""
    import socket
    import subprocess
    import sys

    ws = kws["ws"]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_id = run_id_of(ws, "base")
        ws.registry().upsert(
            "runs",
            {"id": "alive-run"},
            name="alive",
            status="running",
            meta={
                **ws.registry().get("runs", id=run_id)["meta"],
                "pid": live.pid,
                "host": socket.gethostname(),
            },
        )
        code, err, _ = _ft(capsys, ws, "train", "--resume", "alive-run")
        assert code == 2 and f"still training (process {live.pid})" in err["message"]
    finally:
        live.kill()
        live.wait()


def test_a_data_parallel_follower_resumes_the_run_its_rank_0_claimed(kws: dict) -> None:
    """Rank 0 of `ft train --resume RUN --nproc N` marks the run running under its own process before the
    other ranks read the registry: a follower (claimed) goes on, any other process is refused."""
    import socket
    import subprocess
    import sys

    from ft.errors import FtError
    from ft.services.resume import plan_resume

    ws = kws["ws"]
    run_id = run_id_of(ws, "base")
    row = ws.registry().get("runs", id=run_id)
    leader = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ws.registry().upsert(
            "runs",
            {"id": run_id},
            status="running",
            meta={**row["meta"], "pid": leader.pid, "host": socket.gethostname()},
        )
        with pytest.raises(FtError, match=f"still training \\(process {leader.pid}\\)"):
            plan_resume(ws, run_id, (), None, False)
        res = plan_resume(ws, run_id, (), None, False, claimed=True)
        assert res.run_id == run_id
    finally:
        leader.kill()
        leader.wait()
        ws.registry().upsert("runs", {"id": run_id}, status=row["status"], meta=row["meta"])

"""Acceptance (issue 6): a truncated, zeroed or bit-flipped (or missing) file in the newest checkpoint is
detected with a message naming the file, the folder is set aside, and the resume falls back to the
previous good checkpoint; the resumed run still ends exactly where an uninterrupted one does, and
nothing prints a traceback.
"""

from __future__ import annotations

import json
import signal
import struct
from pathlib import Path

import pytest

from ft.cli.app import run
from ft.workspace.run_folder import (
    ADAPTERS,
    MANIFEST,
    OPTIMIZER,
    TRAINER_STATE,
    find_good_checkpoint,
    safetensors_problem,
    verify_checkpoint,
)
from test_resume_support import (
    assert_same_training,
    copy_run,
    make_workspace,
    run_id_of,
    settings,
    train_in_process,
    train_paused,
)

STEPS = 8


@pytest.fixture(scope="module")
def cws(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A baseline run, and a run SIGKILLed after step 7 (checkpoints step 2, 4 and 6)."""
    ws = make_workspace(tmp_path_factory.mktemp("corrupt") / "ws")
    base = train_in_process(ws, "base", settings(STEPS))
    tmp = tmp_path_factory.mktemp("corrupt-logs")
    proc, _, _ = train_paused(ws, "killed", STEPS, tmp, "pause-step:7", "step 7")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run_id = run_id_of(ws, "killed")
    ck = ws.run_dir(run_id) / "checkpoints"
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-000002", "step-000004", "step-000006"]
    return {"ws": ws, "base": Path(base.path), "run": run_id}


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _zero(f: Path) -> None:
    f.write_bytes(b"\0" * f.stat().st_size)


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) - 3] ^= 0x10  # one bit of the last tensor (or of the JSON text)
    f.write_bytes(bytes(data))


def _remove(f: Path) -> None:
    f.unlink()


DAMAGE = {"truncate": _truncate, "zero": _zero, "bitflip": _flip, "missing": _remove}
EXPECT = {
    "truncate": "truncated",
    "zero": "bad safetensors header",
    "bitflip": "sha256 differs",
    "missing": "is missing",
}


@pytest.mark.parametrize("file", [ADAPTERS, OPTIMIZER, TRAINER_STATE, MANIFEST])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    cws: dict, capsys: pytest.CaptureFixture, damage: str, file: str
) -> None:
    ws = cws["ws"]
    new_id = f"{cws['run']}-{damage}-{file.split('.')[0]}"
    run_dir = copy_run(ws, cws["run"], new_id)
    newest = run_dir / "checkpoints" / "step-000006"
    DAMAGE[damage](newest / file)
    problems = verify_checkpoint(newest)
    assert problems, f"{damage} of {file} went unnoticed"
    assert any(file in p or MANIFEST in p for p in problems), problems
    if file.endswith(".safetensors") and damage != "missing":
        assert any(EXPECT[damage] in p for p in problems), problems

    capsys.readouterr()
    code = run(["--workspace", str(ws.root), "train", "--resume", new_id])  # the human output, not --json
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 0, text
    assert "Traceback" not in text
    assert (
        "step-000006 is damaged" in text
        and "falling back to the previous good checkpoint, step-000004" in text
    )
    assert "resumed from step-000004" in text
    # The damaged folder is kept aside (never read again) and the run ends as if never interrupted.
    assert (run_dir / "checkpoints" / "corrupt-step-000006").is_dir()
    assert verify_checkpoint(run_dir / "checkpoints" / "step-000006") == []  # saved again by the resume
    assert_same_training(cws["base"], run_dir, STEPS, 4)


def test_every_checkpoint_damaged_restarts_from_step_0_and_says_so(
    cws: dict, capsys: pytest.CaptureFixture
) -> None:
    ws = cws["ws"]
    new_id = f"{cws['run']}-all-bad"
    run_dir = copy_run(ws, cws["run"], new_id)
    for step in (2, 4, 6):
        _flip(run_dir / "checkpoints" / f"step-{step:06d}" / ADAPTERS)
    capsys.readouterr()
    code = run(["--workspace", str(ws.root), "train", "--resume", new_id, "--json"])
    out = capsys.readouterr()
    assert code == 0 and "Traceback" not in out.err
    res = json.loads(out.out)
    assert res["resumed_from"] == "step 0" and res["status"] == "completed"
    assert sum("is damaged" in n for n in res["notes"]) == 3
    assert any("starts again from step 0" in n for n in res["notes"])
    assert_same_training(cws["base"], run_dir, STEPS, 0)


def test_resume_from_an_explicit_damaged_checkpoint_path_falls_back(
    cws: dict, capsys: pytest.CaptureFixture
) -> None:
    ws = cws["ws"]
    new_id = f"{cws['run']}-path"
    run_dir = copy_run(ws, cws["run"], new_id)
    _truncate(run_dir / "checkpoints" / "step-000004" / OPTIMIZER)
    capsys.readouterr()
    code = run(
        [
            "--workspace",
            str(ws.root),
            "train",
            "--resume",
            str(run_dir / "checkpoints" / "step-000004"),
            "--json",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out
    res = json.loads(out.out)
    assert res["resumed_from"] == "step-000002" and any("step-000004 is damaged" in n for n in res["notes"])
    # The newer step-000006 is not overwritten by the resumed run: it is kept aside.
    assert [
        p.parent.name.startswith("superseded-") for p in (run_dir / "checkpoints").glob("*/step-000006")
    ] == [True]
    assert_same_training(cws["base"], run_dir, STEPS, 2)


def test_resume_from_an_older_good_checkpoint_keeps_the_newer_ones_aside(
    cws: dict, capsys: pytest.CaptureFixture
) -> None:
    ws = cws["ws"]
    new_id = f"{cws['run']}-older"
    run_dir = copy_run(ws, cws["run"], new_id)
    capsys.readouterr()
    code = run(
        [
            "--workspace",
            str(ws.root),
            "train",
            "--resume",
            str(run_dir / "checkpoints" / "step-000002"),
            "--json",
        ]
    )
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["resumed_from"] == "step-000002"
    aside = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step-000004", "step-000006"]
    assert any("moved to superseded-" in n for n in res["notes"])
    assert_same_training(cws["base"], run_dir, STEPS, 2)


def test_safetensors_header_checks(tmp_path: Path) -> None:
    """A file whose sha256 was recorded after the damage still fails on its header."""
    import mlx.core as mx

    good = tmp_path / "a.safetensors"
    mx.save_safetensors(str(good), {"w": mx.ones((4, 4)), "b": mx.zeros((3,))})
    assert safetensors_problem(good) is None
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    cases = {
        "huge.safetensors": struct.pack("<Q", 1 << 40) + raw[8:],
        "json.safetensors": raw[:8] + b"x" + raw[9:],
        "short.safetensors": raw[:-4],
        "padded.safetensors": raw + b"\0" * 8,
        "tiny.safetensors": raw[:5],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert safetensors_problem(tmp_path / name), name
    assert n > 0


def test_no_checkpoints_at_all(tmp_path: Path) -> None:
    good, rejected = find_good_checkpoint(tmp_path / "nothing")
    assert good is None and rejected == []


def test_evaluate_export_and_serve_refuse_a_damaged_checkpoint_clearly(
    cws: dict, capsys: pytest.CaptureFixture
) -> None:
    """ft evaluate, ft export and ft serve resolve checkpoints with one resolver: a damaged checkpoint is
    refused by each with the same code, message and hint (checked against the manifest)."""
    from ft.errors import ErrorCode, FtError
    from ft.services.checkpoints import resolve_checkpoint
    from ft.services.serving import WorkspaceModels

    ws = cws["ws"]
    new_id = f"{cws['run']}-resolve"
    run_dir = copy_run(ws, cws["run"], new_id)
    assert resolve_checkpoint(ws, new_id, "step-4").name == "step-000004"
    # Listed by ft serve while intact; damaged afterwards: the load checks it again.
    source = WorkspaceModels(ws, extra_checkpoints=[f"{new_id}:step-000004"])
    listed = {m.id: m for m in source.models()}[f"{new_id}:step-000004"]
    _truncate(run_dir / "checkpoints" / "step-000004" / ADAPTERS)
    with pytest.raises(FtError) as e:
        resolve_checkpoint(ws, new_id, "step-4")
    assert e.value.code.value == "checkpoint_invalid" and "is damaged" in e.value.message
    assert ADAPTERS in e.value.message and "--checkpoint" in (e.value.hint or "")
    with pytest.raises(FtError) as loading:
        source.load(listed)
    assert loading.value.code == ErrorCode.CHECKPOINT_INVALID and loading.value.message == e.value.message

    def cli(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = run(["--workspace", str(ws.root), *args])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return code, err

    ev = cli("evaluate", new_id, "--checkpoint", "step-000004", "--n-samples", "0")
    ex = cli("export", new_id, "--checkpoint", "step-000004", "--format", "mlx")
    sv = cli("serve", "--adapter", f"{new_id}:step-000004", "--port", "0")
    assert ev[0] == ex[0] == sv[0] != 0
    assert ev[1] == ex[1] == sv[1] and "is damaged" in ev[1] and ADAPTERS in ev[1]
    # The newest run's best checkpoint damaged: `ft serve` (default model) refuses as `ft evaluate` (default run) does.
    (run_dir / "checkpoints" / "best").write_text("step-000004\n")
    newest = ws.registry().list("runs")[-1]["id"]
    assert newest == new_id
    assert cli("evaluate", "--n-samples", "0") == cli("serve", "--port", "0")

"""Data parallelism on this machine's CPU with MLX's ring backend: 2 ranks x half of every step equal
1 process x the whole step (losses, validation losses and final adapters within 1e-5 in float32)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ft.services.launch import launch_local

WORKER = Path(__file__).with_name("dist_worker.py")


def _run(
    tmp: Path, name: str, packing: str, nproc: int, objective: str = "sft"
) -> dict[int, dict[str, np.ndarray]]:
    out = tmp / name
    cmd = [sys.executable, str(WORKER), str(out), packing, objective]
    if nproc == 1:
        import subprocess

        assert subprocess.call(cmd) == 0
    else:
        assert launch_local(cmd, nproc, backend="ring", log_dir=tmp / f"{name}-logs") == 0
    return {r: dict(np.load(f"{out}.rank{r}.npz")) for r in range(nproc)}


@pytest.mark.parametrize("packing, objective", [("on", "sft"), ("off", "sft"), ("on", "kto"), ("on", "dpo")])
def test_two_ranks_equal_one_process(tmp_path: Path, packing: str, objective: str) -> None:
    """KTO: z0 covers the whole step on every rank; DPO: each rank its share of the pairs."""
    one = _run(tmp_path, "one", packing, 1, objective)[0]
    two = _run(tmp_path, "two", packing, 2, objective)
    assert len(one["losses"]) == 10 and len(one["val"]) == 3  # evaluations at 0, 5 and 10
    for rank in (0, 1):
        got = two[rank]
        np.testing.assert_allclose(got["losses"], one["losses"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["val"], one["val"], atol=1e-5, rtol=0)
        weights = [k for k in one if k not in ("losses", "val") and not k.startswith("init:")]
        assert weights
        for k in weights:
            np.testing.assert_allclose(got[k], one[k], atol=1e-5, rtol=0, err_msg=k)
            # every rank holds the same weights after each step (here: after the last)
            np.testing.assert_array_equal(two[0][k], two[1][k], err_msg=k)
    # the adapters really moved (equal untouched weights would pass the comparisons above too)
    moved = [k for k in one if k.startswith("init:") and np.abs(one[k[5:]] - one[k]).max() > 1e-3]
    assert len(moved) > 4


# ------------------------------------------------------------------ `ft train --nproc 2` on the tiny workspace
@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory):
    from test_resume_support import make_workspace

    return make_workspace(tmp_path_factory.mktemp("dist") / "ws")


def _ft_train(
    ws, name: str, values: list[str], *extra: str, dataset: str | None = None
) -> subprocess.CompletedProcess:
    from test_resume_support import DATASET, child_env, set_args

    cmd = [
        sys.executable,
        "-m",
        "ft",
        "--workspace",
        str(ws.root),
        "train",
        "--dataset",
        dataset or DATASET,
        "--name",
        name,
    ]
    return subprocess.run(
        [*cmd, *set_args(values), *extra], env=child_env(), capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("packing", ["true", "false"])
def test_ft_train_nproc_2_equals_one_process(ws, packing: str) -> None:
    from test_resume_support import adapters, max_abs_diff, run_id_of, settings, steps_of

    values = [
        *settings(10, save=5, evals=5),
        f"training.packing={packing}",
        "training.grad_accumulation_steps=2",
    ]
    one = _ft_train(ws, f"one-{packing}", values)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _ft_train(ws, f"two-{packing}", values, "--nproc", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = ws.run_dir(run_id_of(ws, f"one-{packing}")), ws.run_dir(run_id_of(ws, f"two-{packing}"))
    assert max_abs_diff(adapters(a, 10), adapters(b, 10)) <= 1e-5
    s1, s2 = steps_of(a), steps_of(b)
    assert sorted(s2) == list(range(1, 11))
    for k in s1:
        assert s1[k][1] == s2[k][1]  # the same examples in every step
        assert abs(s1[k][0] - s2[k][0]) <= 1e-5, (k, s1[k][0], s2[k][0])
    row = ws.registry().get("runs", id=run_id_of(ws, f"two-{packing}"))
    assert row["status"] == "completed" and row["meta"]["ranks"] == 2
    assert (
        len([r for r in ws.registry().list("runs") if r["name"] == f"two-{packing}"]) == 1
    )  # one run, not two


@pytest.mark.slow
def test_ft_train_kto_nproc_2_equals_one_process(ws) -> None:
    """`ft train --objective kto --nproc 2`: the follower rank trains the same objective (same data,
    labels and reference), and the run equals the one-process run."""
    from ft.services.dataset_prepare import prepare_dataset
    from test_resume_support import MODEL, adapters, max_abs_diff, run_id_of, settings, steps_of

    prepare_dataset(ws, "data/sample.jsonl", name="kto", model=MODEL, data={"labels": "keep"})
    values = [*settings(6, save=3, evals=3), "training.objective=kto", "data.labels=keep", "lora.dropout=0"]
    values += ["training.grad_accumulation_steps=2"]
    one = _ft_train(ws, "kto-one", values, dataset="kto")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _ft_train(ws, "kto-two", values, "--nproc", "2", dataset="kto")
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = ws.run_dir(run_id_of(ws, "kto-one")), ws.run_dir(run_id_of(ws, "kto-two"))
    assert max_abs_diff(adapters(a, 6), adapters(b, 6)) <= 1e-5
    s1, s2 = steps_of(a), steps_of(b)
    assert sorted(s2) == list(range(1, 7))
    for k in s1:
        assert s1[k][1] == s2[k][1] and abs(s1[k][0] - s2[k][0]) <= 1e-5, k
    row = ws.registry().get("runs", id=run_id_of(ws, "kto-two"))
    assert row["status"] == "completed" and row["meta"]["ranks"] == 2 and row["meta"]["objective"] == "kto"


def test_a_failed_start_on_rank_0_ends_the_other_ranks_with_its_reason(ws) -> None:
    """Rank 0 refuses the run before sharing it (no such run to resume): the other ranks say so, and
    never pick a run of their own (an empty run id resumed the latest run)."""
    from test_resume_support import child_env

    out = subprocess.run(
        [sys.executable, "-m", "ft", "--workspace", str(ws.root), "train", "--resume", "no-such-run"]
        + ["--nproc", "2"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "no run 'no-such-run'" in text
    assert "rank 0 stopped before the run started" in text, text[-2000:]
    assert "nothing to resume" not in text and "Traceback" not in text


@pytest.mark.slow
def test_kill_9_of_one_rank_ends_every_rank_and_resume_matches(ws, tmp_path: Path) -> None:
    import json
    import sqlite3
    import time

    import psutil

    from test_resume_support import DATASET, assert_same_training, child_env, run_id_of, set_args, settings

    values = [*settings(12, save=2, evals=4), "training.grad_accumulation_steps=2"]
    base = _ft_train(ws, "dp-base", values, "--nproc", "2")
    assert base.returncode == 0, base.stderr[-2000:]
    cmd = [sys.executable, "-m", "ft", "--workspace", str(ws.root), "train", "--dataset", DATASET]
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [*cmd, "--name", "dp-killed", *set_args(values), "--nproc", "2"],
        env=child_env(),
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 300
    ranks: dict[str, psutil.Process] = {}
    while time.monotonic() < deadline:
        with sqlite3.connect(ws.root / "ft.db") as con:
            row = con.execute("select meta from runs where name = 'dp-killed'").fetchone()
        if row and json.loads(row[0]).get("step", 0) >= 5:
            break
        time.sleep(0.05)
    for child in psutil.Process(proc.pid).children():
        ranks[child.environ().get("MLX_RANK", "?")] = child
    assert set(ranks) == {"0", "1"}, ranks
    ranks["1"].kill()  # SIGKILL
    code = proc.wait(timeout=120)
    log.close()
    out = (tmp_path / "killed.log").read_text()
    assert code != 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks.values())
    assert "another rank stopped" in out and "rank 0 of 2 on" in out, out[-2000:]
    assert "Traceback" not in out
    run_id = run_id_of(ws, "dp-killed")
    resumed = subprocess.run(
        [*cmd[:-2], "--resume", run_id, "--nproc", "2"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_training(ws.run_dir(run_id_of(ws, "dp-base")), ws.run_dir(run_id), 12, resumed_at=-1)


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_together_and_resume_on_one_process(ws, tmp_path: Path) -> None:
    """Ctrl-C reaches every rank; they stop after the same step (a checkpoint), and the run resumes with 1
    process, saying so, with the sample order kept and the same result up to the order of additions."""
    import json
    import os
    import signal
    import sqlite3
    import time

    from test_resume_support import (
        DATASET,
        adapters,
        child_env,
        max_abs_diff,
        run_id_of,
        set_args,
        settings,
        steps_of,
    )

    values = [*settings(12, save=4, evals=4), "training.grad_accumulation_steps=2"]
    base = _ft_train(ws, "dp-base2", values, "--nproc", "2")
    assert base.returncode == 0, base.stderr[-2000:]
    cmd = [sys.executable, "-m", "ft", "--workspace", str(ws.root), "train"]
    proc = subprocess.Popen(
        [*cmd, "--dataset", DATASET, "--name", "dp-int", *set_args(values), "--nproc", "2"],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with sqlite3.connect(ws.root / "ft.db") as con:
            row = con.execute("select meta from runs where name = 'dp-int'").fetchone()
        if row and json.loads(row[0]).get("step", 0) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    run_id = run_id_of(ws, "dp-int")
    row = ws.registry().get("runs", id=run_id)
    assert row["status"] == "interrupted"
    resumed = subprocess.run(
        [*cmd, "--resume", run_id], env=child_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed with 1 rank(s) where the run had 2" in resumed.stderr
    a, b = ws.run_dir(run_id_of(ws, "dp-base2")), ws.run_dir(run_id)
    assert max_abs_diff(adapters(a, 12), adapters(b, 12)) <= 1e-5
    s1, s2 = steps_of(a), steps_of(b)
    assert [s2[k][1] for k in sorted(s2)] == [s1[k][1] for k in sorted(s1)]

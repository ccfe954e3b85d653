"""Shared pieces of the resume / checkpoint / signal tests (no tests here).

A workspace with the 2-layer random Llama pulled as ``tiny`` and the sample data prepared for it; runs of
a few steps with one logged row per step (so every step's loss and record ids are in metrics.jsonl);
`ft train` in a real subprocess with fault-injection hooks (``FT_TEST_HOOK``: a pause after a step or
inside a checkpoint save, written to a marker file so the test knows when to kill or signal).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ft.engine.callbacks import read_metrics
from ft.workspace import Workspace

MODEL = "tiny"
DATASET = "sample"


def settings(steps: int = 8, save: int = 2, evals: int = 4) -> list[str]:
    """--set values of a short run: one logged row per step, a checkpoint every ``save`` steps, dropout on."""
    return [
        f"model.name={MODEL}",
        f"training.max_steps={steps}",
        "training.warmup_steps=1",
        f"training.save_steps={save}",
        f"training.eval_steps={evals}",
        "training.batch_size=2",
        "training.grad_accumulation_steps=1",
        "training.learning_rate=1e-3",
        "training.eval_batches=2",
        "logging.steps=1",
        "data.max_seq_length=128",
        "lora.rank=4",
        "lora.dropout=0.1",
    ]


def set_args(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def make_workspace(root: Path) -> Workspace:
    from ft.services.dataset_prepare import prepare_dataset
    from ft.services.models import pull
    from ft.services.project import init_workspace
    from tiny_models import write_tiny_llama

    init_workspace(root)
    ws = Workspace(root)
    src = root.parent / f"{root.name}-tiny-src"
    write_tiny_llama(src)
    pull(ws, str(src), name=MODEL)
    prepare_dataset(ws, "data/sample.jsonl", name=DATASET, model=MODEL)
    return ws


def train_in_process(ws: Workspace, name: str, values: list[str]):
    from ft.services.training import run_training

    return run_training(ws, values, dataset=DATASET, name=name)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FT_TEST_HOOK", "FT_TEST_MARKER", "FT_WORKSPACE")}
    env.update(extra)
    return env


def start_ft(
    ws: Workspace, args: list[str], log: Path, hook: str | None = None, marker: Path | None = None
) -> subprocess.Popen:
    """`python -m ft --workspace WS ARGS` in a subprocess: stdout into ``log``, stderr into ``log``.err."""
    extra = {}
    if hook:
        extra = {"FT_TEST_HOOK": hook, "FT_TEST_MARKER": str(marker)}
    cmd = [sys.executable, "-m", "ft", "--workspace", str(ws.root), *args]
    return subprocess.Popen(
        cmd,
        stdout=log.open("w"),
        stderr=log.with_suffix(".err").open("w"),
        env=child_env(**extra),
        cwd=ws.root,
    )


def train_paused(
    ws: Workspace, name: str, steps: int, tmp: Path, hook: str, until: str, json_out: bool = True
) -> tuple[subprocess.Popen, Path, Path]:
    """`ft train --name NAME` of a ``steps``-step run in a subprocess, returned once the hook paused it at
    ``until`` (e.g. "step 5" or "save 4"): (process, log, marker)."""
    marker, log = tmp / f"{name}.marker", tmp / f"{name}.log"
    args = ["train", "--dataset", DATASET, "--name", name, *set_args(settings(steps))] + (
        ["--json"] if json_out else []
    )
    proc = start_ft(ws, args, log, hook=hook, marker=marker)
    wait_for(marker, proc, until, log)
    return proc, log, marker


def output(log: Path) -> str:
    err = log.with_suffix(".err")
    return log.read_text() + (err.read_text() if err.is_file() else "")


def wait_for(marker: Path, proc: subprocess.Popen, prefix: str, log: Path, timeout: float = 120) -> str:
    """Wait until the hook wrote ``marker`` starting with ``prefix`` (the child is paused there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.is_file():
            text = marker.read_text()
            if text.startswith(prefix):
                return text
        if proc.poll() is not None:
            raise AssertionError(f"ft exited ({proc.returncode}) before {prefix!r}:\n{output(log)[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out waiting for {prefix!r}:\n{output(log)[-3000:]}")


def run_id_of(ws: Workspace, name: str) -> str:
    rows = [r for r in ws.registry().list("runs") if r.get("name") == name]
    assert rows, f"no run named {name}"
    return str(rows[-1]["id"])


def steps_of(run_dir: Path) -> dict[int, tuple[float, list[int]]]:
    """step -> (loss, record ids) of every training row of a run's metrics.jsonl (one per step)."""
    out: dict[int, tuple[float, list[int]]] = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if r.get("type") == "train":
            assert r["step"] not in out, f"step {r['step']} logged twice in {run_dir}"
            out[r["step"]] = (r["loss"], r["record_ids"])
    return out


def adapters(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    f = run_dir / "checkpoints" / f"step-{step:06d}" / "adapters.safetensors"
    return {k: np.array(v) for k, v in mx.load(str(f)).items()}


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def assert_same_training(base_dir: Path, run_dir: Path, steps: int, resumed_at: int) -> float:
    """The acceptance check: final adapters within 1e-6, losses within 1e-5, identical sample order."""
    diff = max_abs_diff(adapters(base_dir, steps), adapters(run_dir, steps))
    assert diff <= 1e-6, f"final adapters differ by {diff}"
    base, got = steps_of(base_dir), steps_of(run_dir)
    assert sorted(got) == list(range(1, steps + 1)), sorted(got)
    for k in range(1, steps + 1):
        assert got[k][1] == base[k][1], f"step {k}: sample order {got[k][1]} vs {base[k][1]}"
        assert abs(got[k][0] - base[k][0]) <= 1e-5, (
            f"step {k} (resumed at {resumed_at}): loss {got[k][0]} vs {base[k][0]}"
        )
    return diff


def copy_run(ws: Workspace, run_id: str, new_id: str, status: str = "interrupted") -> Path:
    """A copy of a run (folder and registry row) to damage without touching the original."""
    shutil.copytree(ws.run_dir(run_id), ws.run_dir(new_id), symlinks=True)
    row = ws.registry().get("runs", id=run_id)
    assert row is not None
    ws.registry().upsert("runs", {"id": new_id}, name=None, status=status, meta=row["meta"])
    return ws.run_dir(new_id)


def result_json(log: Path) -> dict:
    """The JSON object `ft ... --json` printed on stdout."""
    return json.loads(log.read_text())

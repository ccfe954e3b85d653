"""`ft train --objective dpo|kto` end to end on the embedded SmolLM2: paired data, labelled data,
--init-from an SFT run with the cached reference, metrics with rewards, margins, accuracy and KL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ft.cli.app import run
from ft.engine.callbacks import read_metrics
from ft.services.project import init_workspace
from ft.workspace import Workspace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHORT = [
    "training.max_steps=4",
    "training.warmup_steps=1",
    "training.eval_steps=2",
    "training.save_steps=2",
    "training.batch_size=2",
    "training.grad_accumulation_steps=2",
    "training.learning_rate=1e-3",
    "training.eval_batches=2",
    "logging.steps=2",
    "data.max_seq_length=256",
    "lora.rank=8",
]


def _ft_json(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = run([*args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def _sets() -> list[str]:
    return [a for s in SHORT for a in ("--set", s)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Workspace:
    from ft.services.models import pull

    mp = pytest.MonkeyPatch()
    mp.delenv("FT_MODELS_CACHE", raising=False)
    root = tmp_path_factory.mktemp("pref") / "ws"
    init_workspace(root)
    w = Workspace(root)
    pull(w, str(smollm2_dir), name="smollm2-135m-instruct")
    yield w
    mp.undo()


def test_dpo_on_paired_records_logs_rewards_and_accuracy(ws: Workspace, capsys) -> None:
    root = str(ws.root)
    code, res = _ft_json(
        capsys,
        "--workspace",
        root,
        "train",
        "--objective",
        "dpo",
        "--set",
        "data.path=data/pairs.jsonl",
        "--name",
        "dpo",
        *_sets(),
    )
    assert code == 0, res
    assert res["status"] == "completed" and res["plan"]["objective"] == "dpo"
    assert any("DPO reference: the base model" in w for w in res["plan"]["warnings"])
    rows = read_metrics(Path(res["path"]) / "metrics.jsonl")
    train = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]
    keys = {"rewards_chosen", "rewards_rejected", "margin", "reward_accuracy"}
    assert train and all(keys <= set(r["metrics"]) for r in train)
    assert len(evals) == 3 and all(keys <= set(r["metrics"]) for r in evals)
    assert evals[0]["val_loss"] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at the start
    assert ws.registry().get("runs", id=res["run_id"])["meta"]["objective"] == "dpo"


def test_kto_from_an_sft_run_uses_a_cached_reference(ws: Workspace, capsys) -> None:
    root = str(ws.root)
    code, sft = _ft_json(capsys, "--workspace", root, "train", "--name", "sft", *_sets())
    assert code == 0, sft
    code, res = _ft_json(
        capsys,
        "--workspace",
        root,
        "train",
        "--objective",
        "kto",
        "--init-from",
        sft["run_id"],
        "--name",
        "kto",
        *_sets(),
    )
    assert code == 0, res
    warnings = " ".join(res["plan"]["warnings"])
    assert "KTO class weights (the KTO paper's class-balance rule)" in warnings
    assert "reference: log-probabilities of the starting model" in warnings
    assert (Path(res["path"]) / "reference.npz").is_file()
    rows = read_metrics(Path(res["path"]) / "metrics.jsonl")
    evals = [r for r in rows if r["type"] == "eval"]
    # At step 0 the policy is the reference (the SFT checkpoint): every reward is 0 and z0 is 0.
    assert evals[0]["metrics"]["rewards_chosen"] == pytest.approx(0.0, abs=1e-4)
    assert evals[0]["metrics"]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert "kl" in [r for r in rows if r["type"] == "train"][-1]["metrics"]

"""End to end on the embedded SmolLM2: a short real training run, then `ft evaluate --checkpoint best`.

The tuned model must show a lower validation loss than its base on the same records, and the report
files and registry row must exist. Kept short (a few steps on short sequences) for CI's two cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ft.cli.app import run

MODEL = "smollm2-135m-instruct"
TRAIN = [
    "training.max_steps=6",
    "training.warmup_steps=1",
    "training.eval_steps=6",
    "training.save_steps=3",
    "training.batch_size=4",
    "training.grad_accumulation_steps=1",
    "training.learning_rate=1e-3",
    "data.max_seq_length=128",
    "logging.steps=3",
]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("FT_")]}
    root = tmp_path_factory.mktemp("e2e") / "ws"
    try:
        assert run(["init", str(root)]) == 0
        ws = ["--workspace", str(root)]
        assert run([*ws, "models", "pull", MODEL]) == 0
        assert run([*ws, "dataset", "prepare", "data/sample.jsonl", "--name", "sample", "--val", "0.1"]) == 0
        assert (
            run(
                [
                    *ws,
                    "train",
                    "--dataset",
                    "sample",
                    "--name",
                    "e2e",
                    *[a for s in TRAIN for a in ("--set", s)],
                ]
            )
            == 0
        )
    finally:
        os.environ.update(saved)
    return root


def test_evaluate_best_beats_the_base_and_writes_the_report(
    trained: Path, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    code = run(
        [
            "--workspace",
            str(trained),
            "evaluate",
            "--checkpoint",
            "best",
            "--n-samples",
            "2",
            "--max-tokens",
            "24",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "base vs tuned" in out.out and "the tuned model is better" in out.out

    run_dir = next((trained / "runs").iterdir())
    best = (run_dir / "checkpoints" / "best").read_text().strip()
    folder = run_dir / "eval" / f"{best}-val"
    report = json.loads((folder / "report.json").read_text())
    assert report["checkpoint"] == best and report["checkpoint_requested"] == "best"
    tuned, base = report["tuned"]["metrics"], report["base"]["metrics"]
    assert tuned["records"] == base["records"] == report["split_records"] > 0
    assert tuned["tokens"] == base["tokens"] > 0
    assert tuned["loss"] < base["loss"], (tuned, base)
    # The training run's own last validation loss on the same split is what evaluate measures for the tuned model.
    metrics = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    val = [m for m in metrics if m.get("type") == "eval"]
    assert val[0]["val_loss"] == pytest.approx(base["loss"], rel=1e-4)
    assert min(v["val_loss"] for v in val) == pytest.approx(tuned["loss"], rel=1e-4)
    assert len(report["samples"]) == 2 and all(s["reference"] and s["tuned"] for s in report["samples"])
    assert report["tuned"]["throughput"]["generation_tokens_per_second"] > 0
    md = (folder / "report.md").read_text()
    assert "| validation loss (nats/token) |" in md and "| reference | tuned | base |" in md

    from ft.services.eval_report import list_evaluations
    from ft.workspace import Workspace

    rows = list_evaluations(Workspace(trained), run_dir.name)
    assert (
        len(rows) == 1 and rows[0].checkpoint == best and rows[0].tuned_loss == pytest.approx(tuned["loss"])
    )

    # `ft runs show` lists the evaluation reports of the run
    from ft.services.runs import show_run

    detail = show_run(Workspace(trained), run_dir.name)
    assert [r.id for r in detail.reports] == [rows[0].id] and detail.reports[0].path == rows[0].path

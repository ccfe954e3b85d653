"""Checkpoint resolution and `ft evaluate` end to end on a tiny random Llama (fast): real workspace,
real prepared dataset with labels, checkpoints written by the engine's own saver."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

from ft.cli.app import run as ft_run
from ft.engine.checkpoint import save_checkpoint
from ft.engine.lora import AdapterSpec, apply_adapters
from ft.errors import ErrorCode, FtError
from ft.services import checkpoints as ck
from ft.services import evaluation as svc
from ft.services.eval_report import list_evaluations
from ft.workspace import Workspace
from ft.workspace.run_folder import BEST, set_pointer
from tiny_models import write_tiny_llama

MODEL = "tiny"
RUN = "run-a"
SPECS = {
    "lora": AdapterSpec(method="lora", rank=4, alpha=8.0, target_modules="all-linear"),
    "dora": AdapterSpec(method="dora", rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]),
    "qlora": AdapterSpec(method="qlora", rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]),
    "full": AdapterSpec(method="full"),
}
CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Peru", "Lima"),
]


def _records() -> str:
    lines = []
    for k, (country, city) in enumerate(CAPITALS * 2):
        good = k % 3 != 2
        answer = f"The capital of {country} is {city}." if good else "Figure it out yourself."
        conv = [
            {"role": "user", "content": f"What is the capital of {country}? ({k})"},
            {"role": "assistant", "content": answer},
        ]
        lines.append(json.dumps({"conversations": conv, "label": good}))
    return "\n".join(lines) + "\n"


def _logits(model, ids=(5, 9, 17, 33, 2)) -> np.ndarray:
    return np.array(model(mx.array([list(ids)])).astype(mx.float32))


def _save(folder: Path, step: int, model, spec: AdapterSpec, dataset: tuple[str, int]) -> None:
    opt = optim.Adam(learning_rate=1e-3)
    opt.init(model.trainable_parameters())
    save_checkpoint(
        folder,
        step,
        model,
        opt,
        {"step": step},
        {"base_model": MODEL, **spec.to_json()},
        {"dataset": {"name": dataset[0], "version": dataset[1]}},
    )


def _perturb(model, seed: int) -> None:
    """Move every trainable tensor, as training would."""
    from mlx.utils import tree_flatten

    key = mx.random.key(seed)
    new = [
        (k, v + 0.05 * mx.random.normal(v.shape, key=mx.random.split(key, 1)[0] + i))
        for i, (k, v) in enumerate(tree_flatten(model.trainable_parameters()))
    ]
    model.load_weights(new, strict=False)
    mx.eval(model.parameters())


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A workspace with a tiny model, a labelled dataset (labels kept) and run-a with checkpoints 1-3 (best = 2)."""
    from ft.models.loading import load
    from ft.services.dataset_prepare import prepare_dataset
    from ft.services.project import init_workspace

    root = tmp_path_factory.mktemp("evalws") / "ws"
    init_workspace(root)
    ws = Workspace(root)
    write_tiny_llama(ws.model_dir(MODEL))
    (root / "caps.jsonl").write_text(_records())
    ds = prepare_dataset(
        ws, "caps.jsonl", name="caps", model=MODEL, data={"labels": "keep", "val_split": 0.5}
    )
    logits = {}
    for method, spec in SPECS.items():
        model, _ = load(ws.model_dir(MODEL))
        mx.random.seed(0)
        apply_adapters(model, spec)
        run_id = RUN if method == "lora" else f"run-{method}"
        folder = ws.run_dir(run_id) / "checkpoints"
        for step in (1, 2, 3):
            _perturb(model, seed=step)
            _save(folder, step, model, spec, (ds.name, ds.version))
            logits[(method, step)] = _logits(model)
        set_pointer(folder, BEST, "step-000002")
        ws.registry().upsert(
            "runs",
            {"id": run_id},
            name=f"name-{method}",
            status="completed",
            meta={"model": MODEL, "dataset": ds.name, "dataset_version": ds.version, "method": method},
        )
    return {"ws": ws, "logits": logits, "dataset": ds}


# ------------------------------------------------------------------------------ resolution
@pytest.mark.parametrize(
    ("spec", "step"), [("best", 2), ("latest", 3), ("step-1", 1), ("2", 2), ("step-000003", 3)]
)
def test_checkpoint_specs_resolve(tiny_ws: dict, spec: str, step: int) -> None:
    c = ck.resolve_checkpoint(tiny_ws["ws"], RUN, spec)
    assert (c.run_id, c.name, c.step, c.base_model, c.method) == (
        RUN,
        f"step-{step:06d}",
        step,
        MODEL,
        "lora",
    )
    assert Path(c.base_model_dir) == tiny_ws["ws"].model_dir(MODEL).resolve()


def test_run_by_name_latest_run_and_paths(tiny_ws: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = tiny_ws["ws"]
    assert ck.resolve_checkpoint(ws, "name-dora", "best").run_id == "run-dora"
    assert ck.resolve_checkpoint(ws, None, "best").run_id == "run-full"  # the most recent run
    folder = ws.run_dir(RUN) / "checkpoints" / "step-000001"
    c = ck.resolve_checkpoint(ws, None, str(folder))
    assert (c.run_id, c.name, c.path) == (RUN, "step-000001", str(folder.resolve()))
    monkeypatch.chdir(ws.run_dir(RUN))
    assert ck.resolve_checkpoint(ws, None, "./checkpoints/step-000003").name == "step-000003"


def test_missing_checkpoints_are_clear_errors(tiny_ws: dict, tmp_path: Path) -> None:
    ws = tiny_ws["ws"]
    with pytest.raises(FtError) as e:
        ck.resolve_checkpoint(ws, RUN, "step-9")
    assert e.value.code == ErrorCode.NOT_FOUND
    assert "run-a has no checkpoint 'step-9'" in e.value.message
    assert "step-000001, step-000002, step-000003" in e.value.message and "--checkpoint" in (
        e.value.hint or ""
    )
    for spec, code in [
        ("nonsense", ErrorCode.USAGE),
        (str(tmp_path / "nope"), ErrorCode.NOT_FOUND),
        (str(tmp_path), ErrorCode.NOT_FOUND),
    ]:
        with pytest.raises(FtError) as e:
            ck.resolve_checkpoint(ws, RUN, spec)
        assert e.value.code == code, spec
    with pytest.raises(FtError) as e:
        ck.resolve_checkpoint(ws, "no-such-run", "best")
    assert e.value.code == ErrorCode.NOT_FOUND and "no-such-run" in e.value.message


def test_best_without_a_best_pointer_says_it_used_latest(tiny_ws: dict, tmp_path: Path) -> None:
    import shutil

    ws = tiny_ws["ws"]
    clone = ws.run_dir("run-nobest")
    shutil.copytree(ws.run_dir(RUN), clone)
    try:
        (clone / "checkpoints" / BEST).unlink()
        c = ck.resolve_checkpoint(ws, "run-nobest", "best")
        assert c.name == "step-000003" and c.note and "no best checkpoint" in c.note
        # A pointer naming a folder outside the run's checkpoints is not followed.
        (clone / "checkpoints" / "latest").write_text("../../run-a/checkpoints/step-000001\n")
        assert ck.resolve_checkpoint(ws, "run-nobest", "latest").path == str(
            (clone / "checkpoints" / "step-000003").resolve()
        )
    finally:
        shutil.rmtree(clone)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "full"])
def test_applied_checkpoint_computes_what_was_saved(tiny_ws: dict, method: str) -> None:
    from ft.models.loading import load

    ws = tiny_ws["ws"]
    run_id = RUN if method == "lora" else f"run-{method}"
    model, _ = load(ws.model_dir(MODEL))
    base = _logits(model)
    c = ck.resolve_checkpoint(ws, run_id, "best")
    assert ck.apply_checkpoint(model, c) == method
    got = _logits(model)
    np.testing.assert_allclose(got, tiny_ws["logits"][(method, 2)], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, base, atol=1e-3)


def test_a_checkpoint_for_another_architecture_lists_every_mismatch(tiny_ws: dict, tmp_path: Path) -> None:
    from ft.models.loading import load

    ws = tiny_ws["ws"]
    c = ck.resolve_checkpoint(ws, RUN, "best")
    other = tmp_path / "other"
    write_tiny_llama(other, hidden=32)
    model, _ = load(other)
    with pytest.raises(FtError) as e:
        ck.apply_checkpoint(model, c)
    assert e.value.code == ErrorCode.CHECKPOINT_INVALID
    assert "does not fit its base model" in e.value.message and "more)" in e.value.message


# ------------------------------------------------------------------------------ the service
def test_evaluate_service_report_labels_and_registry(tiny_ws: dict) -> None:
    ws = tiny_ws["ws"]
    seen: list[svc.EvalProgress] = []
    r = svc.evaluate(
        ws, run=RUN, checkpoint="best", n_samples=3, max_tokens=6, batch_size=4, progress=seen.append
    )
    assert (r.run_id, r.checkpoint, r.step, r.dataset, r.split, r.method) == (
        RUN,
        "step-000002",
        2,
        "caps",
        "val",
        "lora",
    )
    assert r.records == r.split_records == 10
    assert r.base is not None
    # Same records, same trained tokens for both models; difference = tuned - base.
    assert r.base.metrics.tokens == r.tuned.metrics.tokens > 0
    assert r.difference["loss"] == pytest.approx(r.tuned.metrics.loss - r.base.metrics.loss)
    assert r.tuned.metrics.perplexity == pytest.approx(math.exp(r.tuned.metrics.loss))
    # Labels were kept: both groups, token-weighted back to the total, and the gap from their changes.
    assert set(r.tuned.by_label) == {"desirable", "undesirable"}
    parts = r.tuned.by_label.values()
    assert sum(p.tokens for p in parts) == r.tuned.metrics.tokens
    assert sum(p.loss * p.tokens for p in parts) / r.tuned.metrics.tokens == pytest.approx(
        r.tuned.metrics.loss
    )
    ch = {lc.label: lc.change for lc in r.labels}
    assert r.label_gap == pytest.approx(ch["undesirable"] - ch["desirable"])
    # Preference section: per-reply log-likelihood change against the base, rewards with beta 1 (an SFT run).
    p = r.preference
    assert p is not None and p.beta == 1.0 and p.pairs == 0 and 0.0 <= p.reward_accuracy <= 1.0
    by = {x.label: x for x in p.by_label}
    assert by["desirable"].replies == r.tuned.by_label["desirable"].records
    assert p.margin == pytest.approx(by["desirable"].mean_reward - by["undesirable"].mean_reward)
    # Generations: prompts end where the reply starts; the reference is the reply without the end-of-turn.
    assert len(r.samples) == 3 and r.tuned.text is not None and r.base.text is not None
    for s in r.samples:
        assert s.prompt.endswith("<|assistant|>") and "</s>" not in s.reference
        assert s.reference.startswith("The capital of") or s.reference == "Figure it out yourself."
    assert "</s>" in r.sampling.stop_tokens
    stages = {p.stage for p in seen}
    assert stages == {"base: loss", "base: generation", "tuned: loss", "tuned: generation"}
    for stage in stages:  # every stage reaches its total
        last = [p for p in seen if p.stage == stage][-1]
        assert last.done == last.total > 0
    # Files and registry
    out = ws.run_dir(RUN) / "eval" / "step-000002-val"
    assert Path(r.report_json) == out / "report.json" and Path(r.report_md) == out / "report.md"
    saved = json.loads((out / "report.json").read_text())
    assert saved["tuned"]["metrics"]["loss"] == pytest.approx(r.tuned.metrics.loss)
    md = (out / "report.md").read_text()
    assert "| metric | base | tuned | difference |" in md and "## By label" in md and "## Generations" in md
    assert "| reference | tuned | base |" in md and "## Preference (implicit rewards against the base)" in md
    rows = list_evaluations(ws, RUN)
    assert [x.id for x in rows] == [f"{RUN}-step-000002-val"]
    assert rows[0].tuned_loss == pytest.approx(r.tuned.metrics.loss) and rows[0].records == 10


def test_qlora_base_and_tuned_share_the_quantized_weights(tiny_ws: dict) -> None:
    """QLoRA trained on a quantized base: the base is scored quantized too, so only the adapters differ."""
    from ft.models.loading import load

    ws = tiny_ws["ws"]
    r = svc.evaluate(ws, run="run-qlora", checkpoint="best", n_samples=0)
    assert r.method == "qlora" and r.precision.startswith("quantized")
    model, _ = load(ws.model_dir(MODEL))
    c = ck.resolve_checkpoint(ws, "run-qlora", "best")
    ck.attach_adapters(model, c)  # zero update: the quantized base
    from ft.engine.evaluate import score
    from ft.services.evaluation import _open_split

    data = _open_split(ws, None, "val", ("caps", None), c)[0]
    base = score(model, data, max_seq_length=int(data.lengths.max())).total()
    assert r.base is not None and r.base.metrics.loss == pytest.approx(base.loss, rel=1e-5)


def test_tuned_only_limit_and_bad_options(tiny_ws: dict) -> None:
    ws = tiny_ws["ws"]
    r = svc.evaluate(
        ws, run="run-full", checkpoint="latest", n_samples=0, compare_base=False, limit=4, seed=1
    )
    assert r.base is None and r.samples == [] and r.records == 4 and r.difference == {}
    assert r.method == "full" and any("subset of 4" in n for n in r.notes)
    with pytest.raises(FtError) as e:
        svc.evaluate(ws, run=RUN, split="test")
    assert e.value.code == ErrorCode.NOT_FOUND and "no 'test' split" in e.value.message
    with pytest.raises(FtError) as e:
        svc.evaluate(ws, run=RUN, top_p=0)
    assert e.value.code == ErrorCode.USAGE


def test_another_dataset_gets_its_own_report_and_reruns_replace(tiny_ws: dict) -> None:
    from ft.services.dataset_prepare import prepare_dataset

    ws = tiny_ws["ws"]
    prepare_dataset(ws, "caps.jsonl", name="caps2", model=MODEL, data={"labels": "all", "val_split": 0.3})
    r = svc.evaluate(ws, run=RUN, dataset="caps2", checkpoint="step-1", n_samples=0, compare_base=False)
    assert Path(r.report_json).parent.name == "step-000001-caps2-v1-val" and r.dataset == "caps2"
    assert r.tuned.by_label == {} and r.labels == []  # labels ignored when preparing: no breakdown
    again = svc.evaluate(
        ws, run=RUN, dataset="caps2@v1", checkpoint="step-1", n_samples=0, compare_base=False
    )
    assert again.report_json == r.report_json and any(
        "replaced the previous report" in n for n in again.notes
    )
    with pytest.raises(FtError) as e:
        svc.evaluate(ws, run=RUN, dataset="caps9")
    assert e.value.code == ErrorCode.NOT_FOUND


def test_cli_missing_checkpoint_and_json(
    tiny_ws: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in [k for k in os.environ if k.startswith("FT_")]:
        monkeypatch.delenv(k)
    ws = tiny_ws["ws"]
    code = ft_run(["--workspace", str(ws.root), "evaluate", RUN, "--checkpoint", "step-7"])
    err = capsys.readouterr().err
    assert code == 5 and "has no checkpoint 'step-7'" in err and "Traceback" not in err
    code = ft_run(
        [
            "--workspace",
            str(ws.root),
            "evaluate",
            "name-dora",
            "--checkpoint",
            "step-1",
            "--n-samples",
            "1",
            "--max-tokens",
            "4",
            "--json",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads(out)
    assert data["run_id"] == "run-dora" and data["checkpoint"] == "step-000001" and data["method"] == "dora"
    assert Path(data["report_md"]).is_file()


def test_a_failed_model_check_is_a_note_and_the_loss_is_unchanged(
    tiny_ws: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packing off (a model that would ignore the mask): a note per model scored, the same loss."""
    from ft.engine import losses

    ws = tiny_ws["ws"]
    kw = dict(run="run-full", checkpoint="latest", n_samples=0, compare_base=True, limit=4, seed=1)
    r = svc.evaluate(ws, **kw)
    assert not any("is off" in n for n in r.notes)
    monkeypatch.setattr(losses.SegmentMask, "make_mask", lambda self, *a, **k: "causal")
    off = svc.evaluate(ws, **kw)
    off_notes = [n for n in off.notes if "is off" in n]
    assert len(off_notes) == 2 and {n.split(": ")[0] for n in off_notes} == {"base", "tuned"}
    assert all(n.split(": ", 1)[1].startswith("packing several examples per row is off") for n in off_notes)
    assert off.tuned.metrics.loss == pytest.approx(r.tuned.metrics.loss, rel=1e-5)
    assert off.base is not None and r.base is not None
    assert off.base.metrics.loss == pytest.approx(r.base.metrics.loss, rel=1e-5)

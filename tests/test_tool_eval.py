"""`ft evaluate` on tool-calling data: cases from a real prepared split, scored against the reference
(an oracle that replies with the reference scores 100%), and the service and CLI end to end on a tiny
random Llama (real workspace, real prepared tool sample, a checkpoint written by the engine's saver)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import pytest

from ft.cli.app import run as ft_run
from ft.data.sample_tools import tool_sample_jsonl
from ft.engine.checkpoint import BEST, save_checkpoint, set_pointer
from ft.engine.lora import AdapterSpec, apply_adapters
from ft.errors import FtError
from ft.services import evaluation as svc
from ft.services import tool_evaluation as te
from ft.workspace import Workspace
from tiny_models import write_tiny_llama

MODEL = "tiny"
RUN = "run-tools"


@pytest.fixture(scope="module")
def tool_ws(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tool sample (60 records, labels kept, grouped by category) prepared for a tiny model, and a run."""
    from ft.models.loading import load
    from ft.services.dataset_prepare import prepare_dataset
    from ft.services.project import init_workspace

    root = tmp_path_factory.mktemp("toolws") / "ws"
    init_workspace(root)
    ws = Workspace(root)
    write_tiny_llama(ws.model_dir(MODEL))
    (root / "tools.jsonl").write_text(tool_sample_jsonl(60, seed=3))
    ds = prepare_dataset(
        ws,
        "tools.jsonl",
        name="tools",
        model=MODEL,
        data={"labels": "keep", "val_split": 0.3, "group_by": "category"},
    )
    model, _ = load(ws.model_dir(MODEL))
    mx.random.seed(0)
    spec = AdapterSpec(method="lora", rank=4, alpha=8.0, target_modules="all-linear")
    apply_adapters(model, spec)
    opt = optim.Adam(learning_rate=1e-3)
    opt.init(model.trainable_parameters())
    folder = ws.run_dir(RUN) / "checkpoints"
    save_checkpoint(
        folder,
        1,
        model,
        opt,
        {"step": 1},
        {"base_model": MODEL, **spec.to_json()},
        {"dataset": {"name": ds.name, "version": ds.version}},
    )
    set_pointer(folder, BEST, "step-000001")
    ws.registry().upsert(
        "runs",
        {"id": RUN},
        name="tools",
        status="completed",
        meta={"model": MODEL, "dataset": ds.name, "dataset_version": ds.version, "method": "lora"},
    )
    return {
        "ws": ws,
        "dataset": ds,
        "records": [json.loads(x) for x in tool_sample_jsonl(60, seed=3).splitlines()],
    }


def _val(tool_ws: dict):
    from ft.data.store import load_split, split_record_id
    from ft.services.datasets import resolve_dataset

    resolved = resolve_dataset(tool_ws["ws"], "tools", None)
    data = load_split(resolved.splits["val"])
    records = [tool_ws["records"][split_record_id(r)[1] - 1] for r in data.record_ids.tolist()]
    return resolved, data, records


def test_cases_come_from_every_assistant_turn_and_an_oracle_scores_100(tool_ws: dict):
    from ft.services.datasets import load_tokenizer

    resolved, data, records = _val(tool_ws)
    tok = load_tokenizer(tool_ws["ws"].model_dir(MODEL), MODEL)

    def decode(ids: list[int]) -> str:
        return tok.decode(ids).split("</s>")[0].strip()

    plan = te.plan(data, resolved.path, "val", decode, limit=10_000, group_by="category")
    assert plan is not None
    # One case per assistant turn of every val record, in order; calls where the record calls a tool.
    want = [
        (bool(m.get("tool_calls")), rec["category"])
        for rec in records
        for m in rec["conversations"]
        if m["role"] == "assistant"
    ]
    assert [(bool(t.calls), t.group) for t in plan.turns] == want
    first_call = next(t for t in plan.turns if t.calls)
    rec = records[first_call.index]
    ref = next(m for m in rec["conversations"] if m.get("tool_calls"))["tool_calls"][0]["function"]
    assert (first_call.calls[0].name, first_call.calls[0].arguments) == (
        ref["name"],
        json.loads(ref["arguments"]),
    )
    assert first_call.schemas is not None and set(first_call.schemas) == {
        t["function"]["name"] for t in rec["tools"]
    }

    oracle = [t.reference for t in plan.turns]
    silent = ["" for _ in plan.turns]
    r = plan.report({"tuned": oracle, "base": silent})
    t, b = r.overall.tuned, r.overall.base
    assert b is not None
    assert t.call_cases == sum(c for c, _ in want) and t.answer_cases == len(want) - t.call_cases
    for key in ("parseable_call_rate", "tool_name_accuracy", "arguments_exact_match", "arguments_f1"):
        assert getattr(t, key) == 1.0 and getattr(b, key) == 0.0, key
    assert t.schema_valid_rate == 1.0 and b.schema_valid_rate is None  # the base made no call to check
    assert (t.answered_instead_of_call, t.called_instead_of_answer) == (0.0, 0.0)
    assert b.answered_instead_of_call == 1.0
    assert set(r.by_group) == {rec["category"] for rec in records}
    assert set(r.by_label) == {"desirable", "undesirable"}
    md = "\n".join(te.markdown(r))
    assert "| parseable-call rate | 0.0% | 100.0% | +100.0 pt ✓ |" in md
    assert "### Tool calls by `category`" in md


def test_group_by_an_unknown_key_is_a_clear_error(tool_ws: dict):
    resolved, data, _ = _val(tool_ws)
    with pytest.raises(FtError) as e:
        te.plan(data, resolved.path, "val", str, limit=10, group_by="colour")
    assert "colour" in e.value.message


def test_evaluate_reports_tool_calls_base_vs_tuned(tool_ws: dict, capsys: pytest.CaptureFixture):
    ws = tool_ws["ws"]
    r = svc.evaluate(ws, run=RUN, n_samples=0, max_tokens=12, tool_cases=6, group_by="behavior", limit=4)
    assert r.tools is not None and r.tools.cases == 6 and r.tools.overall.base is not None
    assert r.tools.group_by == "behavior" and r.tools.by_group
    assert r.tools.overall.tuned.cases == 6
    md = Path(r.report_md).read_text()
    assert "## Tool calls" in md and "### Tool calls by `behavior`" in md
    saved = json.loads(Path(r.report_json).read_text())
    assert saved["tools"]["cases"] == 6
    # The CLI shows the tool table.
    code = ft_run(
        ["--workspace", str(ws.root), "evaluate", RUN, "--n-samples", "0", "--max-tokens", "8"]
        + ["--tool-cases", "4", "--limit", "2", "--no-compare-base"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "tool calls (4 assistant turns" in out and "parseable-call rate" in out
    # --tool-cases 0 turns it off.
    assert svc.evaluate(ws, run=RUN, n_samples=0, tool_cases=0, limit=2, compare_base=False).tools is None

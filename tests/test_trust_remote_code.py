"""A model that needs its own code (config.json's ``model_file``) trains, evaluates, exports and serves.

The run's snapshot records ``model.trust_remote_code`` and every command loads the base through one
policy (:func:`ft.models.loading.load_for`), so the consent given to train is the consent used after.
"""

from __future__ import annotations

import json

import pytest

from ft.errors import ErrorCode, FtError
from ft.workspace import Workspace
from tiny_models import write_tiny_llama

CODE = '''"""A custom architecture: llama with a marker, built by running this file (mlx-lm's model_file)."""
from mlx_lm.models.llama import Model as _Llama
from mlx_lm.models.llama import ModelArgs


class Model(_Llama):
    BUILT_FROM_CUSTOM_CODE = True


__all__ = ["Model", "ModelArgs"]
'''


@pytest.fixture(scope="module")
def custom_ws(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, str]:
    from ft.services.dataset_prepare import prepare_dataset
    from ft.services.models import pull
    from ft.services.project import init_workspace
    from ft.services.training import run_training

    tmp = tmp_path_factory.mktemp("custom-code")
    src = tmp / "custom-src"
    config = write_tiny_llama(src)
    (src / "custom_llama.py").write_text(CODE)
    (src / "config.json").write_text(json.dumps({**config, "model_file": "custom_llama.py"}))
    init_workspace(tmp / "ws")
    ws = Workspace(tmp / "ws")
    with pytest.raises(FtError) as refused:
        pull(ws, str(src), name="custom")
    assert "trust_remote_code" in refused.value.message
    pull(ws, str(src), name="custom", trust_remote_code=True)
    prepare_dataset(ws, "data/sample.jsonl", name="sample", model="custom")
    values = [
        "model.name=custom",
        "model.trust_remote_code=true",
        "training.max_steps=2",
        "training.warmup_steps=0",
        "training.batch_size=2",
        "training.grad_accumulation_steps=1",
        "training.eval_steps=2",
        "training.eval_batches=1",
        "training.eval_samples=0",
        "data.max_seq_length=64",
        "lora.rank=4",
    ]
    res = run_training(ws, values, dataset="sample", name="custom")
    assert res.best_checkpoint == "step-000002"
    return ws, res.run_id


def test_a_custom_code_run_is_evaluated_exported_and_served(custom_ws: tuple[Workspace, str]) -> None:
    from ft.services.evaluation import evaluate
    from ft.services.export import export
    from ft.services.serving import WorkspaceModels

    ws, run_id = custom_ws
    ev = evaluate(ws, run=run_id, n_samples=1, max_tokens=4, limit=4)
    assert ev.records == 4 and ev.base is not None
    ex = export(ws, run=run_id, fmt="peft")
    assert all(c.ok for c in ex.checks) and "adapter_model.safetensors" in ex.files
    source = WorkspaceModels(ws)
    info = {m.id: m for m in source.models()}[run_id]
    loaded = source.load(info)
    assert getattr(type(loaded.model), "BUILT_FROM_CUSTOM_CODE", False)  # the model's own code built it


def test_without_consent_the_custom_code_is_refused_clearly(custom_ws: tuple[Workspace, str]) -> None:
    from ft.models.loading import load_for

    ws, _ = custom_ws
    with pytest.raises(FtError) as e:
        load_for(ws.model_dir("custom"), "evaluate")
    assert e.value.code == ErrorCode.MODEL_UNSUPPORTED and "custom code" in e.value.message
    loaded = load_for(ws.model_dir("custom"), "serve", trust_remote_code=True)
    assert getattr(type(loaded.model), "BUILT_FROM_CUSTOM_CODE", False)

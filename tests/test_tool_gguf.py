"""A model tuned on tool calls through ft's fallback (the embedded SmolLM2 has no tool support in its own
template), exported as GGUF: llama-cpp-python, formatting with the chat template it reads from the file
(its Jinja2ChatFormatter, as its chat completions do), renders exactly the token ids ft trained on, for
whole tool conversations and for the prompt before each assistant turn."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

from ft.data.sample_tools import tool_sample_jsonl

if os.environ.get("CI"):
    import llama_cpp
else:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BASE = "smollm2-135m-instruct"
RUN = "run-tools"


def _trained_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    from ft.services.tool_evaluation import trained_runs

    return trained_runs(mask)


@pytest.fixture(scope="module")
def exported(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from mlx.utils import tree_flatten

    from ft.cli.app import run
    from ft.engine.checkpoint import BEST, save_checkpoint, set_pointer
    from ft.engine.lora import AdapterSpec, apply_adapters
    from ft.models.loading import load
    from ft.services.dataset_prepare import prepare_dataset
    from ft.services.project import init_workspace
    from ft.workspace import Workspace

    root = tmp_path_factory.mktemp("toolgguf") / "ws"
    init_workspace(root, profile="tools")
    ws = Workspace(root)
    (ws.models_dir / BASE).symlink_to(smollm2_dir.resolve(), target_is_directory=True)
    text = tool_sample_jsonl(24, seed=11)
    (root / "tools.jsonl").write_text(text)
    ds = prepare_dataset(ws, "tools.jsonl", name="tools", model=BASE, data={"val_split": 0.25})
    assert ds.stats.tools is not None and ds.stats.tools.rendering == "fallback"

    # A tuned checkpoint: LoRA adapters moved off zero (as training would), saved by the engine's saver.
    model, _ = load(smollm2_dir, dequantize=True, dtype="float32")
    spec = AdapterSpec(method="lora", rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    apply_adapters(model, spec)
    key = mx.random.key(0)
    model.load_weights(
        [
            (k, v + 0.02 * mx.random.normal(v.shape, key=mx.random.split(key, i + 1)[i]))
            for i, (k, v) in enumerate(tree_flatten(model.trainable_parameters()))
        ],
        strict=False,
    )
    opt = optim.Adam(learning_rate=1e-3)
    opt.init(model.trainable_parameters())
    folder = ws.run_dir(RUN) / "checkpoints"
    save_checkpoint(
        folder,
        1,
        model,
        opt,
        {"step": 1},
        {"base_model": BASE, **spec.to_json()},
        {"dataset": {"name": ds.name, "version": ds.version}},
    )
    set_pointer(folder, BEST, "step-000001")
    ws.registry().upsert(
        "runs",
        {"id": RUN},
        name="tools",
        status="completed",
        meta={"model": BASE, "dataset": ds.name, "dataset_version": ds.version, "method": "lora"},
    )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = run(["--workspace", str(root), "export", RUN, "--format", "gguf", "--quant", "f16", "--json"])
    out = json.loads(buf.getvalue())
    assert code == 0, out
    return {"ws": ws, "export": out, "records": [json.loads(x) for x in text.splitlines()]}


def test_llama_cpp_renders_tool_conversations_as_ft_trained_them(exported: dict):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from ft.data.store import load_split, split_record_id
    from ft.data.tool_template import is_fallback_template
    from ft.services.datasets import resolve_dataset

    llm = llama_cpp.Llama(model_path=exported["export"]["main_file"], vocab_only=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    assert is_fallback_template(template)  # the tool-capable template, not SmolLM2's own
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"

    def llama_ids(messages: list[dict], tools: list[dict], generation_prompt: bool) -> list[int]:
        fmt = Jinja2ChatFormatter(
            template=template,
            eos_token="<|im_end|>",
            bos_token="<|im_start|>",
            add_generation_prompt=generation_prompt,
        )
        prompt = fmt(messages=messages, tools=tools).prompt
        return llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)

    ws = exported["ws"]
    checked_full = checked_prompts = 0
    for split, path in resolve_dataset(ws, "tools", None).splits.items():
        data = load_split(path)
        for i in range(len(data)):
            rec = exported["records"][split_record_id(int(data.record_ids[i]))[1] - 1]
            # The conversation as an OpenAI client sends it: content null, arguments as JSON strings.
            msgs, tools = rec["conversations"], rec["tools"]
            ids = [int(t) for t in data.tokens(i)]
            assert llama_ids(msgs, tools, False) == ids, (split, i)
            checked_full += 1
            # Before each assistant turn: what llama.cpp would prompt the model with to generate it.
            starts = [a for a, _ in _trained_runs(np.asarray(data.mask(i)))]
            turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
            assert len(starts) == len(turns)
            for k, a in zip(turns, starts, strict=True):
                assert llama_ids(msgs[:k], tools, True) == ids[:a], (split, i, k)
                checked_prompts += 1
    assert checked_full >= 12 and checked_prompts > checked_full  # the desirable records of 24


def test_gguf_export_checks_passed_and_modelfile_has_tools(exported: dict):
    out = exported["export"]
    checks = {c["name"]: c for c in out["checks"]}
    assert checks["tokenizer"]["ok"] and checks["tune kept"]["ok"]
    modelfile = (Path(out["path"]) / "Modelfile").read_text()
    assert "{{- if .Tools }}" in modelfile and "<tool_call>" in modelfile and "<tool_response>" in modelfile

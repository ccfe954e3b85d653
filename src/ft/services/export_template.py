"""The chat template an export carries: the one the model was tuned with.

A model whose own template renders tool calls (Qwen2.5, Llama 3.1, Mistral v0.3, Hermes) keeps it. A model
without tool support that was tuned on tool calls through ft's fallback (the embedded SmolLM2) gets
:func:`ft.data.tool_template.fallback_template` over its own template, so llama.cpp (``--jinja``),
llama-cpp-python and Ollama render tool conversations exactly as training did.
"""

from __future__ import annotations

import json
from pathlib import Path

from ft.services.checkpoints import ResolvedCheckpoint
from ft.services.datasets import ResolvedDataset
from ft.workspace import Workspace


def fallback_tool_data(folder: Path) -> bool:
    """Whether a prepared dataset has tool calls rendered with ft's fallback (its prepare statistics)."""
    from ft.data.prepare import STATS

    try:
        stats = json.loads((folder / STATS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    tools = stats.get("tools") if isinstance(stats, dict) else None
    return isinstance(tools, dict) and tools.get("rendering") == "fallback" and bool(tools.get("calls"))


def run_dataset(ws: Workspace, ckpt: ResolvedCheckpoint) -> ResolvedDataset | None:
    """The prepared dataset the checkpoint's run trained on (None when unknown or gone)."""
    from ft.errors import FtError
    from ft.services.datasets import resolve_dataset
    from ft.services.evaluation import _run_dataset, _run_info

    found = _run_dataset(*_run_info(ws, ckpt))
    if found is None:
        return None
    try:
        return resolve_dataset(ws, found[0], found[1])
    except FtError:
        return None


def tuned_template(ws: Workspace, ckpt: ResolvedCheckpoint | None, base_dir: Path) -> str | None:
    """ft's tool-fallback template for a run tuned on tool calls through the fallback; None: keep the
    model folder's own template."""
    if ckpt is None:
        return None
    dataset = run_dataset(ws, ckpt)
    if dataset is None or not fallback_tool_data(dataset.path):
        return None
    if (dataset.manifest.get("template") or {}).get("name", "model") != "model":
        return None  # a named template (chatml, ...) for a model without one: not a tool fallback case
    from ft.data.templates import supports_tools
    from ft.data.tool_template import fallback_template
    from ft.models.export.gguf_vocab import chat_template

    own = chat_template(base_dir)
    if not own or supports_tools(own):
        return None
    return fallback_template(own)

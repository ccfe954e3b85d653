"""The chat template an export carries: the one the model was tuned with.

A model whose own template renders tool calls (Qwen2.5, Llama 3.1, Mistral v0.3, Hermes) keeps it. A model
without tool support that was tuned on tool calls through ft's fallback (the embedded SmolLM2) gets
:func:`ft.data.tool_template.fallback_template` over its own template, so llama.cpp (``--jinja``),
llama-cpp-python and Ollama render tool conversations exactly as training did.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ft.errors import ErrorCode, FtError
from ft.models.export.checks import Check, Progress
from ft.services.checkpoints import ResolvedCheckpoint
from ft.services.datasets import ResolvedDataset
from ft.workspace import Workspace

log = logging.getLogger("ft.services.export")


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
    from ft.services.evaluation import run_info, trained_dataset

    found = trained_dataset(*run_info(ws, ckpt))
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


# ---------------------------------------------------------------- GGUF chat template vs llama.cpp
CHAT_PROBES: dict[str, list[dict[str, Any]]] = {
    "plain": [{"role": "user", "content": "Write one sentence about the sea."}],
    "system": [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi! Who are you?"},
        {"role": "assistant", "content": "I am a small assistant."},
        {"role": "user", "content": "Name three colours."},
    ],
}


def chat_template_mismatches(
    llm: Any,
    base_dir: Path,
    template: str | None = None,
    probes: dict[str, list[dict[str, Any]]] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Render CHAT_PROBES through ft (the template and tokenizer training uses) and through
    llama-cpp-python (the GGUF's template, its Jinja formatter, its tokenizer); returns (matched, differing)
    conversation names -> where they first differ). A conversation the template refuses (e.g. no system
    role) is skipped."""
    from ft.data.templates import make_template
    from ft.data.validate import RecordError
    from ft.models.export import llamacpp
    from ft.services.datasets import load_tokenizer

    tok = load_tokenizer(base_dir, base_dir.name)
    # The template the GGUF carries: the model's own, or the one the run was tuned with (tool fallback).
    tmpl = make_template("model", template or tok.chat_template, tok.special, base_dir.name)
    same: list[str] = []
    differ: dict[str, str] = {}
    for name, convo in (probes or CHAT_PROBES).items():
        try:
            text = tmpl.render(convo, add_generation_prompt=True, tools=tools)
        except (RecordError, FtError):
            continue
        ours = tok.backend.encode(text, add_special_tokens=False).ids
        try:
            theirs = llamacpp.render_chat(llm, convo, **({"tools": tools} if tools is not None else {}))
        except ValueError:  # the template's raise_exception: it refuses this conversation in llama.cpp too
            continue
        if list(ours) == list(theirs):
            same.append(name)
            continue
        k = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
            min(len(ours), len(theirs)),
        )
        differ[name] = (
            f"at token {k}: ft {tok.backend.id_to_token(ours[k]) if k < len(ours) else 'end'!r}, "
            f"llama.cpp {llamacpp.special_text(llm, theirs[k]) if k < len(theirs) else 'end'!r}"
        )
    return same, differ


def check_chat_template(llm: Any, base_dir: Path, template: str | None, checks: list[Check]) -> None:
    if not llm.metadata.get("tokenizer.chat_template"):
        return
    same, differ = chat_template_mismatches(llm, base_dir, template)
    if differ:
        # Not a broken file: llama.cpp's tokenizer itself differs from the one ft trained with (e.g. a
        # SentencePiece space after special tokens). Written, but shown as failed in the summary.
        detail = "; ".join(f"{k} {v}" for k, v in differ.items())
        log.warning("llama.cpp's chat prompt differs from ft's: %s", detail)
        checks.append(
            Check(
                name="chat template",
                ok=False,
                detail=f"llama-cpp-python's chat prompt differs from the one ft trained on: {detail}",
            )
        )
        return
    checks.append(
        Check(
            name="chat template",
            ok=True,
            detail=f"llama-cpp-python renders the GGUF's template to ft's prompt tokens ({', '.join(same) or 'none'})",
        )
    )


# ---------------------------------------------------------------- --imatrix: the run's training data
IMATRIX_RECORDS = 64
IMATRIX_MAX_TOKENS = 512


def run_imatrix(
    ws: Workspace, ckpt: ResolvedCheckpoint | None, mdl: Any, config: dict[str, Any], say: Progress
) -> Any:
    """The importance matrix of the fused model on the first records of the run's training split."""
    from ft.data.store import load_split
    from ft.models.export.imatrix import compute_imatrix
    from ft.services.datasets import resolve_dataset
    from ft.services.run_record import RunSnapshot

    assert ckpt is not None and ckpt.run_id
    snap = RunSnapshot.find(ws.run_dir(ckpt.run_id) / "config.json")
    if snap is None or snap.dataset is None:
        raise FtError(
            ErrorCode.USAGE,
            f"run {ckpt.run_id} records no dataset, so --imatrix has no training data to measure",
            "drop --imatrix",
        )
    ds = resolve_dataset(ws, snap.dataset.name, snap.dataset.version)
    if "train" not in ds.splits:
        raise FtError(
            ErrorCode.DATA_INVALID, f"dataset {ds.name} v{ds.version} has no train split for --imatrix"
        )
    split = load_split(ds.splits["train"])
    seqs = [
        list(map(int, split.tokens(i)[:IMATRIX_MAX_TOKENS])) for i in range(min(len(split), IMATRIX_RECORDS))
    ]
    say(f"measuring an importance matrix on {len(seqs)} training records")
    return compute_imatrix(mdl, seqs, config)

"""`ft train`'s recipe: train.yml -> the engine's objects (model with adapters, data, options, optimizer).

Every train.yml key is read here with its full path (``cfg.training.batch_size``), so a grep for a key
lands on the line that reads it. :func:`setup` is shared by a run and by ``--dry-run``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from ft.config.loader import ResolvedConfig, load_config
from ft.config.train import TrainConfig
from ft.data.store import load_split
from ft.data.templates import stop_markers
from ft.engine.batching import BatchOptions, TokenizedExamples, attention_cost
from ft.engine.lora import AdapterSpec, AdapterSummary, apply_adapters
from ft.engine.optim import OptimizerSpec, build_optimizer
from ft.engine.schedule import make_schedule
from ft.engine.trainer import (
    RunPlan,
    TrainOptions,
    plan_run,
)
from ft.errors import ErrorCode, FtError
from ft.models.memory import MemoryEstimate, estimate_training_memory
from ft.services import dataset_prepare
from ft.services import datasets as datasets_svc
from ft.services import models as models_svc
from ft.services import preference as pref_svc
from ft.workspace import Workspace

log = logging.getLogger(__name__)


class TrainPlan(BaseModel):
    """What a run will do (the --dry-run answer, and the header of every run)."""

    model: str
    model_dir: str
    precision: str
    method: str
    dataset: str
    dataset_version: int
    trainable_parameters: int
    total_parameters: int
    trainable_percent: float
    adapted_modules: int
    train_examples: int
    val_examples: int
    skipped_examples: int
    examples_per_step: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    warmup_steps: int
    tokens_per_epoch: int
    trained_tokens_per_epoch: int
    total_tokens: int
    padding_fraction: float
    distinct_shapes: int
    largest_micro_batch: list[int]
    device: str
    ranks: int = 1
    """Data-parallel processes (ft train --nproc); each computes its share of every step."""
    measured_tokens_per_second: float | None = None
    measured_step_seconds: float | None = None
    measured_peak_memory_gb: float | None = None
    planned_peak_memory_gb: float | None = None
    """The memory plan's peak (ft.models.memory), computed before the model loaded."""
    memory_budget_gb: float | None = None
    gradient_checkpointing: bool = False
    memory_plan: list[str] = Field(default_factory=list)
    estimated_seconds: float | None = None
    warnings: list[str] = Field(default_factory=list)
    objective: str = "sft"


# ----------------------------------------------------------------------------------------- setup
@dataclass
class Setup:
    resolved: ResolvedConfig
    cfg: TrainConfig
    dataset: datasets_svc.ResolvedDataset
    model_dir: Path
    model: Any
    tokenizer: Any
    precision: str
    summary: AdapterSummary
    spec: AdapterSpec
    train_data: TokenizedExamples
    val_data: TokenizedExamples | None
    options: TrainOptions
    run_plan: RunPlan
    warmup: int
    warnings: list[str]
    memory: MemoryEstimate
    pref: pref_svc.PreferenceSetup | None = None
    init_from: str | None = None
    """The checkpoint a run started from (--init-from RUN), its path."""


def memory_plan(model_dir: Path, cfg: TrainConfig, run_plan: RunPlan) -> MemoryEstimate:
    """The memory plan of a run (ft.models.memory) at its largest planned micro-batch, against this device's
    budget (Metal's recommended working set, the GPU's memory on CUDA, available RAM on CPU)."""
    from ft.models.inspect import inspect_folder
    from ft.models.loading import available_memory_bytes, on_cpu

    return estimate_training_memory(
        inspect_folder(model_dir),
        cfg,
        available_bytes=available_memory_bytes(),
        on_cpu=on_cpu(),
        micro_batch=run_plan.largest_micro_batch,
        targets=run_plan.largest_targets,
    )


def _packing(value: bool | str) -> bool | None:
    return None if value == "auto" else bool(value)


def _dataset(
    ws: Workspace,
    cfg: TrainConfig,
    dataset: str | None,
    prepare_progress: Callable[[Any], None] | None,
    version: int | None = None,
) -> datasets_svc.ResolvedDataset:
    if dataset:
        return datasets_svc.resolve_dataset_ref(ws, dataset, version)
    res = dataset_prepare.prepare_from_config(ws, cfg, progress=prepare_progress)
    return datasets_svc.resolve_dataset(ws, res.name, res.version)


def setup(
    ws: Workspace,
    overrides: Sequence[str],
    config_path: Path | None,
    dataset: str | None,
    prepare_progress: Callable[[Any], None] | None = None,
    *,
    resolved: ResolvedConfig | None = None,
    dataset_version: int | None = None,
    init_from: str | None = None,
) -> Setup:
    import mlx.core as mx

    from ft.models.export.gguf_file import gguf_problem
    from ft.models.loading import load_for, read_config

    if resolved is None:
        resolved = load_config(config_path if config_path is not None else ws, list(overrides))
    cfg = resolved.config
    warnings: list[str] = []
    model_dir = models_svc.ensure_model(
        ws, cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    ds = _dataset(ws, cfg, dataset, prepare_progress, dataset_version)
    if ds.note:
        warnings.append(ds.note)
    train_data, val_data = _splits(ds, cfg, model_dir, warnings)
    batch = BatchOptions(
        batch_size=cfg.training.batch_size,
        grad_accumulation_steps=cfg.training.grad_accumulation_steps,
        max_seq_length=cfg.data.max_seq_length,
        packing=_packing(cfg.training.packing),
        seed=cfg.training.seed,
        attention_cost=attention_cost(read_config(model_dir)),
        share_prefix=True,
    )
    eval_limit = cfg.training.eval_batches * cfg.training.batch_size if cfg.training.eval_batches else None
    planned = TrainOptions(
        batch=batch, epochs=cfg.training.epochs, total_steps=cfg.training.max_steps, eval_limit=eval_limit
    )
    run_plan = plan_run(train_data, val_data, planned)
    # The memory plan, before any weight is loaded: a run that cannot fit is refused with computed fixes.
    memory = _memory(model_dir, cfg, run_plan, warnings)

    loaded = load_for(
        model_dir,
        "train",
        method=cfg.training.method,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    precision = loaded.dtype + (f" ({loaded.note})" if loaded.note else "")
    cannot = gguf_problem(dict(loaded.config), Path(model_dir))
    if cannot:
        warnings.append(
            f"this model cannot be exported to GGUF (llama.cpp, Ollama) after training: {cannot}; "
            "--format mlx, hf and peft still work"
        )
    if cfg.training.method == "qlora" and mx.default_device() == mx.cpu:
        warnings.append(
            "qlora on CPU: quantized matmuls have no BLAS path and run ~15x slower than float32; "
            "training.method: lora on the dequantized base is much faster here"
        )
    mx.random.seed(cfg.training.seed)  # adapter initialisation
    spec = adapter_spec(cfg)
    summary = apply_adapters(loaded.model, spec)
    init_path = None
    if init_from:
        init_path = pref_svc.init_from_checkpoint(ws, loaded.model, spec, init_from)
        warnings.append(f"starting from the weights of {init_path} (--init-from {init_from})")
    options = train_options(cfg, loaded, ds.manifest, val_data, batch, memory)
    pref = None
    if cfg.training.objective != "sft":  # the run's plan is of preference units (pairs, or KTO replies)
        pref = pref_svc.setup_preference(cfg, train_data, val_data, init_from=init_path)
        warnings.extend(pref.notes)
        options = dataclasses.replace(options, early_stopping_metric=cfg.early_stopping.metric)
        run_plan = plan_run(pref.train, pref.val, options, objective=pref.options)
    warmup = cfg.training.warmup_steps
    if warmup >= run_plan.total_steps:
        warmup = run_plan.total_steps // 10
        warnings.append(
            f"training.warmup_steps {cfg.training.warmup_steps} is not below the {run_plan.total_steps} steps "
            f"of this run: warming up for {warmup} steps instead"
        )
    if run_plan.skipped_examples:
        warnings.append(
            f"{run_plan.skipped_examples} training examples have no trained token within "
            f"max_seq_length {cfg.data.max_seq_length} and are skipped"
        )
    return Setup(
        resolved,
        cfg,
        ds,
        model_dir,
        loaded.model,
        loaded.tokenizer,
        precision,
        summary,
        spec,
        train_data,
        val_data,
        options,
        run_plan,
        warmup,
        warnings,
        memory,
        pref,
        init_path,
    )


def _splits(ds: Any, cfg: TrainConfig, model_dir: Path, warnings: list[str]) -> tuple[Any, Any]:
    """(train, val or None) of the dataset, checked against the model's tokenizer."""
    if "train" not in ds.splits:
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"dataset {ds.name} v{ds.version} has no train split",
            "prepare it again with a smaller data.val_split",
        )
    datasets_svc.check_tokenizer(
        ds.manifest,
        f"{ds.name} v{ds.version}",
        cfg.model.name,
        model_dir,
        f"prepare it for this model: ft dataset prepare {ds.manifest.get('source', 'DATA')} --name {ds.name}",
    )
    train_data = load_split(ds.splits["train"])
    val_data = load_split(ds.splits["val"]) if "val" in ds.splits else None
    if val_data is not None and len(val_data) == 0:
        val_data = None
    if val_data is None:
        warnings.append("no validation split: no validation loss, and no best checkpoint")
        if cfg.early_stopping.patience is not None:
            warnings.append(
                "early_stopping.patience is set but there is no validation split: no early stopping"
            )
    return train_data, val_data


def _memory(model_dir: Path, cfg: TrainConfig, run_plan: RunPlan, warnings: list[str]) -> MemoryEstimate:
    """The run's memory plan; FtError (OUT_OF_MEMORY, with computed fixes) when it cannot fit."""
    memory = memory_plan(model_dir, cfg, run_plan)
    if not memory.fits:
        raise FtError(
            ErrorCode.OUT_OF_MEMORY,
            f"this run does not fit in memory ({memory.verdict}); the plan:\n  "
            + "\n  ".join(memory.parts()),
            "to make it fit: " + "; or ".join(memory.advice) + " (ft train --dry-run shows the plan)",
        )
    if memory.gradient_checkpointing and cfg.training.gradient_checkpointing == "auto":
        without = memory.total_bytes - memory.activation_bytes + memory.activation_bytes_without_checkpointing
        warnings.append(
            "gradient checkpointing is on (training.gradient_checkpointing: auto): without it the run would "
            f"need about {without / 1e9:.1f} GB of the {memory.budget_bytes / 1e9:.1f} GB usable"
        )
    return memory


def train_options(
    cfg: TrainConfig,
    loaded: Any,
    manifest: dict[str, Any],
    val_data: Any,
    batch: BatchOptions,
    memory: MemoryEstimate,
) -> TrainOptions:
    """The engine's options from train.yml, the loaded model (pad and stop ids) and the memory plan
    (checkpointing, and on a GPU the memory limit that holds MLX near the plan)."""
    # Sample generations stop where evaluation's do: the EOS ids and the template's end-of-turn marker.
    template = (manifest.get("template") or {}).get("name", "model")
    eos = list(stop_markers(loaded.tokenizer, template, cfg.model.name).ids)
    eval_batches = cfg.training.eval_batches
    return TrainOptions(
        batch=batch,
        epochs=cfg.training.epochs,
        total_steps=cfg.training.max_steps,
        max_grad_norm=cfg.training.max_grad_norm,
        eval_steps=cfg.training.eval_steps,
        eval_limit=eval_batches * cfg.training.batch_size if eval_batches else None,
        log_steps=cfg.logging.steps,
        pad_id=int(getattr(loaded.tokenizer, "pad_token_id", None) or 0),
        sample_prompts=_sample_prompts(val_data, cfg.training.eval_samples),
        eos_ids=eos,
        max_skipped_steps=cfg.training.max_skipped_steps,
        early_stopping_patience=cfg.early_stopping.patience,
        early_stopping_min_delta=cfg.early_stopping.min_delta,
        gradient_checkpointing=memory.gradient_checkpointing,
        memory_limit_bytes=memory.working_limit_bytes or None,
        auto_micro_batch=cfg.training.auto_micro_batch,
    )


def adapter_spec(cfg: TrainConfig) -> AdapterSpec:
    """The adapters train.yml asks for (the one place an AdapterSpec is built from the config)."""
    return AdapterSpec(
        method=cfg.training.method,
        rank=cfg.lora.rank,
        alpha=cfg.lora.alpha,
        dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        layers=cfg.lora.layers,
        quant_bits=cfg.lora.qlora_bits,
    )


def _sample_prompts(val: TokenizedExamples | None, n: int) -> list[np.ndarray]:
    """The prompt part (up to the first trained token) of the first ``n`` validation examples."""
    out: list[np.ndarray] = []
    if val is None or n <= 0:
        return out
    for i in range(len(val)):
        m = np.asarray(val.mask(i))
        hits = np.flatnonzero(m)
        if len(hits) and hits[0] > 0:
            out.append(np.asarray(val.tokens(i))[: hits[0]].astype(np.int32))
        if len(out) == n:
            break
    return out


def make_optimizer(s: Setup) -> Any:
    total = s.run_plan.total_steps
    sched = make_schedule(
        kind=s.cfg.training.lr_schedule, peak=s.cfg.training.learning_rate, warmup=s.warmup, total=total
    )
    spec = OptimizerSpec(
        name=s.cfg.training.optimizer,
        weight_decay=s.cfg.training.weight_decay,
        betas=s.cfg.training.adam_betas,
        eps=s.cfg.training.adam_eps,
    )
    return build_optimizer(spec, sched)


def plan_of(s: Setup) -> TrainPlan:
    import mlx.core as mx

    rp = s.run_plan
    return TrainPlan(
        model=s.cfg.model.name,
        model_dir=str(s.model_dir),
        precision=s.precision,
        method=s.cfg.training.method,
        dataset=s.dataset.name,
        dataset_version=s.dataset.version,
        trainable_parameters=s.summary.trainable_parameters,
        total_parameters=s.summary.total_parameters,
        trainable_percent=round(s.summary.trainable_percent, 4),
        adapted_modules=len(s.summary.adapted_modules),
        train_examples=rp.train_examples,
        val_examples=rp.val_examples,
        skipped_examples=rp.skipped_examples,
        examples_per_step=s.cfg.training.batch_size * s.cfg.training.grad_accumulation_steps,
        steps_per_epoch=rp.steps_per_epoch,
        total_steps=rp.total_steps,
        epochs=round(rp.total_steps / max(1, rp.steps_per_epoch), 3),
        warmup_steps=s.warmup,
        tokens_per_epoch=rp.tokens_per_epoch,
        trained_tokens_per_epoch=rp.trained_tokens_per_epoch,
        total_tokens=int(rp.tokens_per_epoch * rp.total_steps / max(1, rp.steps_per_epoch)),
        padding_fraction=round(rp.padding_fraction, 4),
        distinct_shapes=rp.distinct_shapes,
        largest_micro_batch=list(rp.largest_micro_batch),
        device=str(mx.default_device()),
        planned_peak_memory_gb=round(s.memory.total_bytes / 1e9, 3),
        memory_budget_gb=round(s.memory.budget_bytes / 1e9, 3),
        gradient_checkpointing=s.memory.gradient_checkpointing,
        memory_plan=s.memory.lines(),
        warnings=list(s.warnings),
        objective=s.cfg.training.objective,
    )

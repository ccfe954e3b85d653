"""`ft train`: resolve config, dataset and model, run the engine into ``runs/<id>/``, record it.

The service wires the pieces; the engine (:mod:`ft.engine.trainer`) does the math and reports
through callbacks. Callers (the CLI) pass their own callbacks for a live display. Everything a run
produces is in its folder: ``metrics.jsonl``, ``train.log``, ``config.json``, ``loss.png`` and
``checkpoints/``; its registry row (table ``runs``) says how it went.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from ft import __version__
from ft.config.loader import ResolvedConfig, flatten, load_config
from ft.config.train import TrainConfig
from ft.data.store import load_split
from ft.engine.batching import BatchOptions, TokenizedExamples
from ft.engine.callbacks import EvalEvent, LogWriter, MetricsWriter, StepEvent, TrainControl
from ft.engine.checkpoint import CheckpointSaver
from ft.engine.lora import AdapterSpec, AdapterSummary, apply_adapters
from ft.engine.memory import MemoryMonitor
from ft.engine.optim import OptimizerSpec, build_optimizer
from ft.engine.schedule import make_schedule
from ft.engine.trainer import (
    STOP_DIVERGED,
    STOP_EARLY,
    STOP_INTERRUPTED,
    RunPlan,
    TrainerState,
    TrainOptions,
    TrainResult,
    plan_run,
    train,
)
from ft.errors import ErrorCode, FtError
from ft.services import datasets as datasets_svc
from ft.services import models as models_svc
from ft.services.run_record import TABLE, DatasetRef, ResumeEntry, RunRecord, RunSnapshot
from ft.services.runs import plot_metrics
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_write_json, atomic_write_text, clean_leftovers
from ft.workspace.run_folder import (
    ADAPTER_CONFIG,
    ADAPTERS,
    BEST,
    CHECKPOINTS,
    CONFIG,
    LATEST,
    MANIFEST,
    METRICS,
    PLOT,
    SUPERSEDED_PREFIX,
    TRAIN_LOG,
    find_good_checkpoint,
    folders_after,
    parse_step,
    pointer_name,
    set_aside,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- results
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
    measured_tokens_per_second: float | None = None
    measured_step_seconds: float | None = None
    measured_peak_memory_gb: float | None = None
    estimated_seconds: float | None = None
    warnings: list[str] = Field(default_factory=list)


class TrainRunResult(BaseModel):
    run_id: str
    name: str | None
    status: str
    path: str
    plan: TrainPlan
    steps: int
    first_val_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    best_checkpoint: str | None
    latest_checkpoint: str | None
    train_seconds: float
    wall_seconds: float
    tokens: int
    trained_tokens: int
    tokens_per_second: float
    metrics_file: str
    log_file: str
    plot_file: str | None
    warnings: list[str] = Field(default_factory=list)
    stop_reason: str = "completed"
    skipped_steps: int = 0
    resumed_from: str | None = None
    """The checkpoint a resumed run continued from (None for a new run)."""
    notes: list[str] = Field(default_factory=list)
    """What a resume decided: damaged checkpoints set aside, leftovers removed, settings changed."""


# ----------------------------------------------------------------------------------------- setup
@dataclass
class _Setup:
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
    res = datasets_svc.prepare_from_config(ws, cfg, progress=prepare_progress)
    return datasets_svc.resolve_dataset(ws, res.name, res.version)


def _check_tokenizer(ws: Workspace, ds: datasets_svc.ResolvedDataset, model: str, model_dir: Path) -> None:
    """Token ids only mean something with the tokenizer that made them."""
    tok_info = ds.manifest.get("tokenizer") or {}
    if tok_info.get("model") == model:
        return
    fp = tok_info.get("fingerprint")
    mine = datasets_svc.load_tokenizer(model_dir, model).fingerprint()
    if fp != mine:
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"dataset {ds.name} v{ds.version} was tokenized for {tok_info.get('model')!r}, not for {model!r}",
            f"prepare it for this model: ft dataset prepare {ds.manifest.get('source', 'DATA')} --name {ds.name}",
        )


def _setup(
    ws: Workspace,
    overrides: Sequence[str],
    config_path: Path | None,
    dataset: str | None,
    prepare_progress: Callable[[Any], None] | None = None,
    *,
    resolved: ResolvedConfig | None = None,
    dataset_version: int | None = None,
) -> _Setup:
    import mlx.core as mx

    from ft.models.loading import load_for

    if resolved is None:
        resolved = load_config(config_path if config_path is not None else ws, list(overrides))
    cfg = resolved.config
    t = cfg.training
    warnings: list[str] = []
    model_dir = models_svc.ensure_model(
        ws, cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    ds = _dataset(ws, cfg, dataset, prepare_progress, dataset_version)
    if ds.note:
        warnings.append(ds.note)
    if "train" not in ds.splits:
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"dataset {ds.name} v{ds.version} has no train split",
            "prepare it again with a smaller data.val_split",
        )
    _check_tokenizer(ws, ds, cfg.model.name, model_dir)

    loaded = load_for(
        model_dir,
        "train",
        method=cfg.training.method,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    precision = loaded.dtype + (f" ({loaded.note})" if loaded.note else "")
    if cfg.training.method == "qlora" and mx.default_device() == mx.cpu:
        warnings.append(
            "qlora on CPU: quantized matmuls have no BLAS path and run ~15x slower than float32; "
            "training.method: lora on the dequantized base is much faster here"
        )
    mx.random.seed(t.seed)  # adapter initialisation
    spec = adapter_spec(cfg)
    summary = apply_adapters(loaded.model, spec)

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
    batch = BatchOptions(
        batch_size=t.batch_size,
        grad_accumulation_steps=t.grad_accumulation_steps,
        max_seq_length=cfg.data.max_seq_length,
        packing=_packing(t.packing),
        seed=t.seed,
        attention_cost=_attention_cost(loaded.config),
        share_prefix=True,
    )
    eos = list(getattr(loaded.tokenizer, "eos_token_ids", None) or [])
    options = TrainOptions(
        batch=batch,
        epochs=t.epochs,
        total_steps=t.max_steps,
        max_grad_norm=t.max_grad_norm,
        eval_steps=t.eval_steps,
        eval_limit=t.eval_batches * t.batch_size if t.eval_batches else None,
        log_steps=cfg.logging.steps,
        pad_id=int(getattr(loaded.tokenizer, "pad_token_id", None) or 0),
        sample_prompts=_sample_prompts(val_data, t.eval_samples),
        eos_ids=eos,
        max_skipped_steps=t.max_skipped_steps,
        early_stopping_patience=cfg.early_stopping.patience,
        early_stopping_min_delta=cfg.early_stopping.min_delta,
        gradient_checkpointing=t.gradient_checkpointing is True,
        auto_micro_batch=t.auto_micro_batch,
    )
    run_plan = plan_run(train_data, val_data, options)
    warmup = t.warmup_steps
    if warmup >= run_plan.total_steps:
        warmup = run_plan.total_steps // 10
        warnings.append(
            f"training.warmup_steps {t.warmup_steps} is not below the {run_plan.total_steps} steps of "
            f"this run: warming up for {warmup} steps instead"
        )
    if run_plan.skipped_examples:
        warnings.append(
            f"{run_plan.skipped_examples} training examples have no trained token within "
            f"max_seq_length {cfg.data.max_seq_length} and are skipped"
        )
    return _Setup(
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


def _attention_cost(config: dict[str, Any]) -> float:
    """Relative cost of one attended position vs. the rest of a token's work: ~ 2 d / params per layer."""
    d = int(config.get("hidden_size") or 0)
    inter = int(config.get("intermediate_size") or 4 * d)
    if not d:
        return 3e-4
    heads = int(config.get("num_attention_heads") or 1)
    kv = int(config.get("num_key_value_heads") or heads)
    per_layer = 2 * d * d + 2 * d * d * kv // heads + 3 * d * inter
    return 2.0 * d / per_layer


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


def _optimizer(s: _Setup) -> Any:
    t = s.cfg.training
    total = s.run_plan.total_steps
    sched = make_schedule(kind=t.lr_schedule, peak=t.learning_rate, warmup=s.warmup, total=total)
    spec = OptimizerSpec(
        name=t.optimizer, weight_decay=t.weight_decay, betas=tuple(t.adam_betas), eps=t.adam_eps
    )
    return build_optimizer(spec, sched)


def _plan(s: _Setup) -> TrainPlan:
    import mlx.core as mx

    rp = s.run_plan
    t = s.cfg.training
    return TrainPlan(
        model=s.cfg.model.name,
        model_dir=str(s.model_dir),
        precision=s.precision,
        method=t.method,
        dataset=s.dataset.name,
        dataset_version=s.dataset.version,
        trainable_parameters=s.summary.trainable_parameters,
        total_parameters=s.summary.total_parameters,
        trainable_percent=round(s.summary.trainable_percent, 4),
        adapted_modules=len(s.summary.adapted_modules),
        train_examples=rp.train_examples,
        val_examples=rp.val_examples,
        skipped_examples=rp.skipped_examples,
        examples_per_step=t.batch_size * t.grad_accumulation_steps,
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
        warnings=list(s.warnings),
    )


# ----------------------------------------------------------------------------------------- dry run
def dry_run(
    ws: Workspace,
    overrides: Sequence[str] = (),
    config_path: Path | None = None,
    dataset: str | None = None,
    warmup_steps: int = 3,
    prepare_progress: Callable[[Any], None] | None = None,
) -> TrainPlan:
    """The plan without training: sizes, steps, tokens, and time and peak memory from a short measured warm-up.

    The warm-up runs ``warmup_steps`` real steps (the heaviest of the first epoch, so the memory peak is
    the run's) on a throw-away copy of the state; nothing is written.
    """
    import mlx.core as mx

    from ft.engine.batching import index_examples, plan_epoch

    s = _setup(ws, overrides, config_path, dataset, prepare_progress)
    plan = _plan(s)
    index = index_examples(s.train_data, s.options.batch.max_seq_length)
    steps = plan_epoch(index, s.options.batch, 0)
    heavy = sorted(steps, key=lambda p: -max(mb.shape[0] * mb.shape[1] for mb in p.micro_batches))
    chosen = heavy[: max(2, warmup_steps)]
    times: list[tuple[float, int]] = []

    class Timer:
        def on_step(self, e: Any) -> None:
            times.append((e.step_seconds, e.tokens))

    mx.reset_peak_memory()
    opts = dataclasses.replace(s.options, total_steps=len(chosen), eval_at_start=False, sample_prompts=())
    train(
        s.model, _optimizer(s), s.train_data, None, opts, plan=lambda _i, _o, _e: chosen, callbacks=[Timer()]
    )
    steady = times[1:] or times  # the first step pays for compilation
    tok_s = sum(n for _, n in steady) / max(1e-9, sum(dt for dt, _ in steady))
    plan.measured_tokens_per_second = round(tok_s, 1)
    plan.measured_step_seconds = round(float(np.mean([dt for dt, _ in steady])), 3)
    plan.measured_peak_memory_gb = round(mx.get_peak_memory() / 1e9, 3)
    n_evals = plan.total_steps // max(1, s.cfg.training.eval_steps) + 2 if s.val_data is not None else 0
    val_tokens = plan.val_examples * plan.tokens_per_epoch / max(1, plan.train_examples)
    compile_s = max(0.0, times[0][0] - plan.measured_step_seconds) * plan.distinct_shapes
    # Evaluation is a forward pass: about a third of a training step's work per token.
    plan.estimated_seconds = round(
        plan.total_tokens / tok_s + n_evals * val_tokens / (3 * tok_s) + compile_s, 1
    )
    return plan


# ----------------------------------------------------------------------------------------- run
def _new_run_id(ws: Workspace, name: str | None) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{name}" if name else stamp
    run_id, k = base, 1
    while ws.run_dir(run_id).exists() or ws.registry().get(TABLE, id=run_id) is not None:
        k += 1
        run_id = f"{base}-{k}"
    return validate_name(run_id, "run id")


class _LogHandler(logging.Handler):
    """Sends ft's own log records (warnings, notes) into train.log."""

    def __init__(self, writer: LogWriter):
        super().__init__(logging.INFO)
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.line(f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # a closed log must never break training
            pass


class _Registry:
    """Callback: keeps the run's registry row current (step, best validation loss)."""

    def __init__(self, ws: Workspace, run_id: str, record: RunRecord):
        self.ws, self.run_id, self.record = ws, run_id, record

    def put(self, **fields: Any) -> None:
        self.ws.registry().upsert(TABLE, {"id": self.run_id}, meta=self.record.dump(), **fields)

    def on_step(self, e: StepEvent) -> None:
        r = self.record
        if e.skipped:
            r.skipped_steps = (r.skipped_steps or 0) + 1
        if e.logged or e.skipped:
            r.step, r.total_steps, r.train_seconds = e.step, e.total_steps, round(e.elapsed_seconds, 2)
            if e.logged:
                r.last_loss = e.avg_loss
            self.put()

    def on_eval(self, e: EvalEvent) -> None:
        self.record.evals = [*self.record.evals, [e.step, e.val_loss]]
        if e.is_best:
            self.record.best_val_loss, self.record.best_step = e.val_loss, e.step
        self.put()


def _tracking(
    cfg: TrainConfig, ws: Workspace, run_dir: Path, run_id: str, config: dict[str, Any]
) -> list[object]:
    out: list[object] = []
    if cfg.logging.tensorboard:
        out.append(_TensorBoard(run_dir / "tensorboard"))
    if cfg.logging.wandb:
        out.append(_WandB(ws, run_id, config))
    return out


class _TensorBoard:
    """TensorBoard event files through tensorboardX (or torch's writer when that is what is installed)."""

    def __init__(self, folder: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter  # type: ignore[no-redef]
            except ImportError:
                raise FtError(
                    ErrorCode.PACKAGE_MISSING,
                    "logging.tensorboard is on but no TensorBoard writer is installed",
                    "pip install tensorboardX, or set logging.tensorboard: false",
                ) from None
        self.w = SummaryWriter(str(folder))

    def on_step(self, e: Any) -> None:
        if e.logged:
            self.w.add_scalar("train/loss", e.avg_loss, e.step)
            self.w.add_scalar("train/lr", e.lr, e.step)
            self.w.add_scalar("train/tokens_per_second", e.tokens_per_second, e.step)

    def on_eval(self, e: Any) -> None:
        self.w.add_scalar("val/loss", e.val_loss, e.step)
        self.w.add_scalar("val/perplexity", e.val_ppl, e.step)

    def on_train_end(self, _r: Any) -> None:
        self.w.close()


class _WandB:
    """Weights & Biases with the key from passwords.yml (or FT_WANDB_API_KEY)."""

    def __init__(self, ws: Workspace, run_id: str, config: dict[str, Any]):
        from ft.config.secrets import load_secrets

        try:
            import wandb
        except ImportError:
            raise FtError(
                ErrorCode.PACKAGE_MISSING,
                "logging.wandb is on but wandb is not installed",
                "pip install wandb, or set logging.wandb: false",
            ) from None
        key = load_secrets(ws).wandb_api_key
        if key is None:
            raise FtError(
                ErrorCode.SECRETS_INVALID,
                "logging.wandb is on but no wandb_api_key is set",
                "add wandb_api_key to passwords.yml (or FT_WANDB_API_KEY)",
            )
        wandb.login(key=key.get_secret_value(), relogin=True)
        self.run = wandb.init(project="ft", name=run_id, config=config)

    def on_step(self, e: Any) -> None:
        if e.logged:
            self.run.log(
                {"train/loss": e.avg_loss, "train/lr": e.lr, "train/tokens_per_second": e.tokens_per_second},
                step=e.step,
            )

    def on_eval(self, e: Any) -> None:
        self.run.log({"val/loss": e.val_loss, "val/perplexity": e.val_ppl}, step=e.step)

    def on_train_end(self, _r: Any) -> None:
        self.run.finish()


def _config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- resume
# Settings that never change the weights of any step: a resume may change them freely.
_FREE_KEYS = {
    "training.eval_steps",
    "training.save_steps",
    "training.keep_last",
    "training.eval_batches",
    "training.eval_samples",
    "training.max_skipped_steps",
    "early_stopping.patience",
    "early_stopping.min_delta",
}
_FREE_SECTIONS = {"logging", "output", "tune"}
_FINISHED = {"completed": "completed", "early-stopped": "stopped early (early stopping)"}


def config_differences(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes that alter the math, harmless ones) between two config dumps, as 'key: old -> new' lines."""
    a, b = flatten(before), flatten(after)
    math_, free = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
            harmless = key in _FREE_KEYS or key.split(".", 1)[0] in _FREE_SECTIONS
            (free if harmless else math_).append(line)
    return math_, free


@dataclass
class _Resume:
    run_id: str
    run_dir: Path
    row: dict[str, Any]
    checkpoint: Path | None
    resolved: ResolvedConfig
    dataset: str
    dataset_version: int
    notes: list[str]
    forced: list[str]


def _resume_target(ws: Workspace, spec: str) -> tuple[str, Path | None]:
    """(run id, requested checkpoint folder or None) from '' (latest run), a run id/name, or a path."""
    from ft.services.checkpoints import resolve_run

    if not spec:
        return resolve_run(ws, None), None
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p.resolve()
        if (p / MANIFEST).is_file() or (p / ADAPTERS).is_file() or parse_step(p.name) is not None:
            if p.parent.name != CHECKPOINTS or p.parent.parent != ws.run_dir(p.parent.parent.name).resolve():
                raise FtError(
                    ErrorCode.USAGE,
                    f"{p} is not a checkpoint of a run of this workspace ({ws.root})",
                    "pass a run id, a run name, or runs/<id>/checkpoints/step-N",
                )
            return p.parent.parent.name, p
        if (p / CHECKPOINTS).is_dir() or (p / CONFIG).is_file():
            return p.name, None
        raise FtError(
            ErrorCode.NOT_FOUND,
            f"{p} is neither a run folder nor a checkpoint folder",
            "pass a run id, a run name, or runs/<id>/checkpoints/step-N",
        )
    if os.sep in spec:
        raise FtError(
            ErrorCode.NOT_FOUND, f"{spec} does not exist", "pass a run id, a run name, or a checkpoint folder"
        )
    return resolve_run(ws, spec), None


def _plan_resume(
    ws: Workspace, spec: str, overrides: Sequence[str], config_path: Path | None, force: bool
) -> _Resume:
    run_id, requested = _resume_target(ws, spec)
    run_dir = ws.run_dir(run_id)
    row = ws.registry().get(TABLE, id=run_id) or {"id": run_id, "status": "unknown", "meta": {}}
    record = RunRecord.of(row)
    status = row.get("status") or "unknown"
    if status in _FINISHED and requested is None:
        raise FtError(
            ErrorCode.USAGE,
            f"run {run_id} is already {_FINISHED[status]} ({record.step} of {record.total_steps} "
            "steps): nothing to resume",
            f"evaluate it (ft evaluate --run {run_id}) or start a new run with ft train",
        )
    if status == "running" and record.pid != os.getpid() and record.process_alive():
        raise FtError(
            ErrorCode.USAGE,
            f"run {run_id} is still training (process {record.pid})",
            "wait for it, or stop it (Ctrl-C / kill) and resume then",
        )
    ckpts = run_dir / CHECKPOINTS
    notes: list[str] = []
    cleaned = clean_leftovers(ckpts)
    if cleaned:
        notes.append(
            f"removed what an interrupted save left behind: {', '.join(sorted(p.name for p in cleaned))}"
        )
    # Damaged folders are set aside only once the resume is sure to go ahead (below).
    good, rejected = find_good_checkpoint(
        ckpts, newest=requested.name if requested else None, quarantine=False
    )
    snapshot_file = (good if good is not None else run_dir) / CONFIG
    snapshot = RunSnapshot.read(snapshot_file)
    if snapshot.dataset is None:
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID,
            f"{snapshot_file}: does not name the run's dataset",
            "this run cannot be resumed; start a new one with ft train",
        )
    saved_cfg = snapshot.config.model_dump(mode="json")
    # The run's own settings, then FT_* variables and --set (or a whole --config file) on top.
    resolved = load_config(
        config_path, list(overrides), base=copy.deepcopy(saved_cfg)
    )  # the loader edits its base
    math_diff, free_diff = config_differences(saved_cfg, resolved.config.model_dump(mode="json"))
    if good is not None:
        try:
            recorded = json.loads((good / ADAPTER_CONFIG).read_text()).get("base_model_sha256") or {}
            now = models_svc.get_model(ws, resolved.config.model.name).sha256
        except (OSError, ValueError, FtError):
            recorded, now = {}, {}
        changed = sorted(k for k in recorded if now.get(k) not in (None, recorded[k]))
        if changed:
            math_diff.append(f"base model files changed since the checkpoint: {', '.join(changed)}")
    if math_diff and not force:
        damaged = f"\n  (damaged and skipped: {', '.join(r.name for r in rejected)})" if rejected else ""
        raise FtError(
            ErrorCode.RESUME_MISMATCH,
            f"resuming run {run_id} with different settings would change its math:\n  "
            + "\n  ".join(math_diff)
            + damaged,
            "resume with the run's own settings (drop those --set values), or pass --force to continue "
            "with them (recorded in the run)",
        )
    for r in rejected:
        r.moved_to = set_aside(ckpts / r.name).name
        notes.append(f"checkpoint {r.describe()}")
    if rejected and good is not None:
        notes.append(f"falling back to the previous good checkpoint, {good.name}")
    if good is None:
        notes.append("no intact checkpoint: the run starts again from step 0")
    # Resuming from an older checkpoint than the newest: the newer ones are kept aside, never overwritten.
    start = (parse_step(good.name) or 0) if good is not None else 0
    newer = folders_after(ckpts, start)
    if newer:
        stamp, k = datetime.now().strftime("%Y%m%d-%H%M%S"), 1
        aside = ckpts / f"{SUPERSEDED_PREFIX}{stamp}"
        while aside.exists():
            k += 1
            aside = ckpts / f"{SUPERSEDED_PREFIX}{stamp}-{k}"
        aside.mkdir()
        for p in newer:
            os.replace(p, aside / p.name)
        notes.append(
            f"checkpoints after {good.name if good else 'step 0'} moved to {aside.name}/: "
            + ", ".join(p.name for p in newer)
        )
    if free_diff:
        notes.append("changed settings (no effect on the math): " + "; ".join(free_diff))
    if math_diff:
        notes.append("forced despite these differences: " + "; ".join(math_diff))
    ds = snapshot.dataset
    return _Resume(run_id, run_dir, row, good, resolved, ds.name, ds.version, notes, math_diff)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics of the steps after ``step`` (they are trained again, with the same results)."""
    from ft.engine.callbacks import read_metrics

    rows = read_metrics(path)
    keep = [r for r in rows if r.get("type") not in ("train", "eval") or int(r.get("step", 0)) <= step]
    if len(keep) != len(rows) or (path.is_file() and not path.read_text().endswith("\n")):
        atomic_write_text(path, "".join(json.dumps(r, default=float) + "\n" for r in keep))


# ----------------------------------------------------------------------------------------- signals
class _Signals:
    """SIGINT/SIGTERM: the first finishes the step, saves and stops; a second exits at once.

    Only in the main thread (Python delivers signals there); the previous handlers come back on exit.
    ``on_second`` runs before the immediate exit (the registry is marked; checkpoints are atomic, so
    the previous one is never damaged, and a half-written one is only a temporary folder).
    """

    def __init__(
        self, control: TrainControl, on_first: Callable[[int], None], on_second: Callable[[int], None]
    ):
        self.control, self.on_first, self.on_second = control, on_first, on_second
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            self.control.stop(STOP_INTERRUPTED)
            self.on_first(signum)
            return
        try:
            self.on_second(signum)
        finally:
            os._exit(128 + signum)

    def __exit__(self, *_exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------- test hooks
TEST_HOOK_ENV = "FT_TEST_HOOK"
TEST_MARKER_ENV = "FT_TEST_MARKER"


class _TestHooks:
    """Fault injection for ft's own tests, off unless ``FT_TEST_HOOK`` is set (comma-separated):

        ``pause-step:K`` sleeps after step K's update (before its evaluation and save), ``pause-save:K``
        sleeps inside step K's checkpoint save before the folder is renamed, ``nan-steps:A-B`` puts Inf into
        the token embeddings for steps A..B (so their loss and gradients are non-finite). A pause writes
        ``FT_TEST_MARKER`` (so the test knows when to kill) and lasts up to 60 s (a step pause ends early when
    a stop is asked, e.g. by SIGINT).
    """

    def __init__(self, spec: str, marker: str | None, model: Any, control: TrainControl):
        self.model, self.control = model, control
        self.marker = Path(marker) if marker else None
        self.pause_step = self.pause_save = None
        self.nan: set[int] = set()
        self._saved_embed: Any = None
        self._step = 0
        for item in filter(None, (x.strip() for x in spec.split(","))):
            kind, _, arg = item.partition(":")
            if kind == "pause-step":
                self.pause_step = int(arg)
            elif kind == "pause-save":
                self.pause_save = int(arg)
            elif kind == "nan-steps":
                a, _, b = arg.partition("-")
                self.nan = set(range(int(a), int(b or a) + 1))
            else:
                raise FtError(ErrorCode.USAGE, f"{TEST_HOOK_ENV}: unknown hook {item!r}")

    def _pause(self, what: str, until_stop: bool) -> None:
        if self.marker is not None:
            atomic_write_text(self.marker, what + "\n")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (until_stop and self.control.should_stop):
            time.sleep(0.02)

    def before_rename(self, tmp: Path) -> None:
        # Not ended by a stop request: the save of an interrupted run is paused too (for a second signal).
        if self.pause_save is not None and self._step == self.pause_save:
            self._pause(f"save {self._step} {tmp}", until_stop=False)

    def _embed(self) -> Any:
        return getattr(getattr(self.model, "model", None), "embed_tokens", None)

    def _poison(self, on: bool) -> None:
        import mlx.core as mx

        emb = self._embed()
        if emb is None:
            return
        if on and self._saved_embed is None:
            self._saved_embed = emb.weight
            emb.weight = mx.full(emb.weight.shape, float("inf"), dtype=emb.weight.dtype)
        elif not on and self._saved_embed is not None:
            emb.weight, self._saved_embed = self._saved_embed, None

    def on_train_start(self, e: Any) -> None:
        self._step = e.start_step
        self._poison(e.start_step + 1 in self.nan)

    def on_step(self, e: Any) -> None:
        self._step = e.step
        if self.pause_step == e.step:
            self._pause(f"step {e.step}", until_stop=True)

    def on_step_end(self, e: Any) -> None:
        self._poison(e.step + 1 in self.nan)

    def on_train_end(self, _r: Any) -> None:
        self._poison(False)


# ----------------------------------------------------------------------------------------- run
def run_training(
    ws: Workspace,
    overrides: Sequence[str] = (),
    config_path: Path | None = None,
    dataset: str | None = None,
    name: str | None = None,
    callbacks: Sequence[object] = (),
    prepare_progress: Callable[[Any], None] | None = None,
    on_plan: Callable[[TrainPlan, str], None] | None = None,
    control: TrainControl | None = None,
    *,
    resume: str | None = None,
    force: bool = False,
    on_note: Callable[[str], None] | None = None,
    study: str | None = None,
) -> TrainRunResult:
    """Train as train.yml (+ overrides) says, into a new ``runs/<id>/``; see the module docstring.

    ``resume``: continue a run instead ('' = the latest run; a run id or name; a run or checkpoint
    folder) from its newest intact checkpoint, with the run's own settings (``overrides`` on top: a
    change to the math is refused unless ``force``). ``on_note`` receives what the resume decided.
    ``study``: the `ft tune` study this run is a trial of (kept in the registry; `ft runs list --study`).
    """
    t_wall = time.perf_counter()
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        log.info("%s", text)
        if on_note:
            on_note(text)

    if name is not None:
        validate_name(name, "run name")
    res: _Resume | None = None
    if resume is not None:
        if dataset:
            raise FtError(
                ErrorCode.USAGE,
                "--dataset cannot be combined with --resume: a run keeps its dataset",
                "drop --dataset",
            )
        res = _plan_resume(ws, resume, overrides, config_path, force)
        for n in res.notes:
            note(n)
        s = _setup(
            ws,
            overrides,
            config_path,
            res.dataset,
            prepare_progress,
            resolved=res.resolved,
            dataset_version=res.dataset_version,
        )
        run_id, run_dir = res.run_id, res.run_dir
        name = res.row.get("name") if name is None else name
    else:
        s = _setup(ws, overrides, config_path, dataset, prepare_progress)
        run_id = _new_run_id(ws, name)
        run_dir = ws.run_dir(run_id)
        run_dir.mkdir(parents=True)
    plan = _plan(s)
    cfg = s.cfg
    config_json = RunSnapshot(
        config=cfg,
        sources=s.resolved.sources,
        dataset=DatasetRef(name=s.dataset.name, version=s.dataset.version, path=str(s.dataset.path)),
        model_dir=str(s.model_dir),
        ft_version=__version__,
    ).dump()
    if res is None or not (run_dir / CONFIG).is_file():
        atomic_write_json(run_dir / CONFIG, config_json)
    try:
        sha = models_svc.get_model(ws, cfg.model.name).sha256
    except FtError:
        sha = {}
    adapter_config = {
        "base_model": cfg.model.name,
        "base_model_dir": str(s.model_dir),
        "base_model_sha256": sha,
        **s.spec.to_json(),
        "model_type": getattr(getattr(s.model, "args", None), "model_type", None),
        "ft_version": __version__,
        "run_id": run_id,
    }
    now = datetime.now().isoformat(timespec="seconds")
    meta = RunRecord.of(res.row) if res else RunRecord()
    meta = meta.model_copy(
        update={
            "model": cfg.model.name,
            "dataset": s.dataset.name,
            "dataset_version": s.dataset.version,
            "method": cfg.training.method,
            "config_hash": _config_hash(cfg),
            "total_steps": plan.total_steps,
            "trainable_parameters": plan.trainable_parameters,
            "precision": s.precision,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": meta.started_at or now,
            "step": meta.step or 0,
            "finished_at": None,
            "stop_reason": None,
            "error": None,
        }
    )
    if study is not None:
        meta.study = study

    control = control or TrainControl()
    optimizer = _optimizer(s)
    state = TrainerState()
    if res is not None:
        if res.checkpoint is not None:
            from ft.engine.checkpoint import load_checkpoint

            state = TrainerState.from_json(load_checkpoint(res.checkpoint, s.model, optimizer))
        if state.step >= plan.total_steps:
            raise FtError(
                ErrorCode.USAGE,
                f"run {run_id} already did {state.step} of {plan.total_steps} steps: nothing to resume",
                f"start a new run with ft train, or evaluate it: ft evaluate --run {run_id}",
            )
        # Steps (and evaluations) after the checkpoint are done again; without a checkpoint, all of them.
        kept = state.step if res.checkpoint is not None else -1
        _trim_metrics(run_dir / METRICS, kept)
        meta.step = state.step
        meta.evals = [e for e in meta.evals if e[0] <= kept]
        if meta.evals and meta.evals[0][0] == 0:
            meta.first_val_loss = meta.evals[0][1]
        meta.resumes = [
            *meta.resumes,
            ResumeEntry(
                at=now,
                from_=res.checkpoint.name if res.checkpoint is not None else None,
                step=state.step,
                forced_differences=res.forced,
                notes=res.notes,
            ),
        ]
    reg = _Registry(ws, run_id, meta)
    reg.put(name=name, status="running")
    if on_plan:
        on_plan(plan, run_id)

    logw = LogWriter(run_dir / TRAIN_LOG)
    if res is not None:
        logw.line(
            f"resume of run {run_id} from {res.checkpoint.name if res.checkpoint else 'step 0'} "
            f"(step {state.step} of {plan.total_steps})"
        )
        for n in res.notes:
            logw.line(f"resume: {n}")
    else:
        logw.line(
            f"run {run_id}: model {cfg.model.name} ({s.precision}), dataset {s.dataset.name} v{s.dataset.version}, "
            f"{s.summary.describe()}"
        )
    for w in s.warnings:
        logw.line(f"warning: {w}")
    handler = _LogHandler(logw)
    ft_log = logging.getLogger("ft")
    ft_log.addHandler(handler)
    monitor = MemoryMonitor()
    hooks: list[object] = []
    before_rename = None
    if os.environ.get(TEST_HOOK_ENV):
        th = _TestHooks(os.environ[TEST_HOOK_ENV], os.environ.get(TEST_MARKER_ENV), s.model, control)
        hooks.append(th)
        before_rename = th.before_rename
    saver = CheckpointSaver(
        run_dir / CHECKPOINTS,
        s.model,
        optimizer,
        state,
        cfg.training.save_steps,
        cfg.training.keep_last,
        adapter_config,
        config_json,
        before_rename=before_rename,
    )
    if res is not None and res.checkpoint is not None:
        saver.mark_saved(state.step)  # already on disk
    status = "failed"
    result: TrainResult | None = None
    error: FtError | None = None

    def first_signal(signum: int) -> None:
        with contextlib.suppress(Exception):  # the log may be closed already (signal during the final save)
            logw.line(f"{signal.Signals(signum).name}: finishing the current step, then saving and stopping")

    def second_signal(signum: int) -> None:
        meta.status_detail = "interrupted"
        meta.stop_reason = f"second {signal.Signals(signum).name}"
        meta.finished_at = datetime.now().isoformat(timespec="seconds")
        reg.put(status="interrupted")
        with contextlib.suppress(Exception):  # the log may be closed already (signal during the final save)
            logw.line(
                f"second {signal.Signals(signum).name}: exited at once (the last complete checkpoint is kept)"
            )

    signals = _Signals(control, first_signal, second_signal)
    try:
        with signals:
            cbs = [
                monitor,
                MetricsWriter(run_dir / METRICS),
                logw,
                *hooks,
                saver,
                reg,
                *_tracking(cfg, ws, run_dir, run_id, config_json),
                *callbacks,
            ]
            decode = getattr(s.tokenizer, "decode", None)
            result = train(
                s.model,
                optimizer,
                s.train_data,
                s.val_data,
                s.options,
                callbacks=cbs,
                control=control,
                state=state,
                decode=decode,
            )
        status = _status_of(result.stopped)
        meta.stop_reason = result.stopped
        if status == "interrupted":
            sig = signals.signum or signal.SIGINT
            saved = pointer_name(run_dir / CHECKPOINTS, LATEST)
            error = FtError(
                ErrorCode.INTERRUPTED,
                f"{signal.Signals(sig).name}: run {run_id} stopped after step {state.step}; "
                f"checkpoint {saved or '-'} saved",
                f"continue it with: ft train --resume {run_id}",
                exit_code=128 + int(sig),
            )
        elif status == "failed":
            good = pointer_name(run_dir / CHECKPOINTS, LATEST)
            error = FtError(
                ErrorCode.TRAINING_DIVERGED,
                f"run {run_id} stopped: {state.consecutive_skips} steps in a row had a non-finite loss or "
                f"gradient (up to step {state.step}; their record ids are in {run_dir / TRAIN_LOG}); "
                f"last good checkpoint: {good or 'none'}",
                "lower training.learning_rate, keep training.max_grad_norm on, or check those records; "
                f"then ft train --resume {run_id} --set ... --force",
            )
            meta.error = error.message
    except KeyboardInterrupt:
        status = "interrupted"
        logw.line("interrupted by the user")
        raise FtError(
            ErrorCode.INTERRUPTED,
            f"training interrupted; run {run_id} kept in {run_dir}",
            "checkpoints so far are in its checkpoints/ folder",
        ) from None
    except BaseException as e:
        logw.line(f"failed: {type(e).__name__}: {e}")
        meta.error = f"{type(e).__name__}: {e}"
        raise
    finally:
        ft_log.removeHandler(handler)
        plot_file: Path | None = run_dir / PLOT
        try:
            plot_metrics(run_dir / METRICS, plot_file, title=f"{run_id} ({status})")  # type: ignore[arg-type]
        except Exception as e:  # a plot must never hide the run's real outcome
            log.warning("could not draw %s: %s", PLOT, e)
            plot_file = None
        meta.status_detail = status
        meta.finished_at = datetime.now().isoformat(timespec="seconds")
        meta.wall_seconds = round(time.perf_counter() - t_wall, 2)
        if result is not None:
            st = result.state
            meta = meta.model_copy(
                update=dict(
                    step=st.step,
                    train_seconds=round(st.train_seconds, 2),
                    tokens=st.tokens_seen,
                    trained_tokens=st.trained_tokens_seen,
                    tokens_per_second=round(result.tokens_per_second, 1),
                    first_val_loss=result.first_val_loss
                    if res is None or meta.first_val_loss is None
                    else meta.first_val_loss,
                    final_val_loss=result.final_val_loss,
                    best_val_loss=st.best_val_loss,
                    best_step=st.best_step,
                    skipped_steps=st.skipped_steps,
                    warnings=s.warnings + result.warnings,
                )
            )
            reg.record = meta
        reg.put(status=status)
    if error is not None:
        raise error
    assert result is not None
    st = result.state
    ckpts = run_dir / CHECKPOINTS
    return TrainRunResult(
        run_id=run_id,
        name=name,
        status=status,
        path=str(run_dir),
        plan=plan,
        steps=st.step,
        first_val_loss=meta.first_val_loss,
        final_val_loss=result.final_val_loss,
        best_val_loss=st.best_val_loss,
        best_step=st.best_step,
        best_checkpoint=pointer_name(ckpts, BEST),
        latest_checkpoint=pointer_name(ckpts, LATEST),
        train_seconds=round(st.train_seconds, 2),
        wall_seconds=round(time.perf_counter() - t_wall, 2),
        tokens=st.tokens_seen,
        trained_tokens=st.trained_tokens_seen,
        tokens_per_second=round(result.tokens_per_second, 1),
        metrics_file=str(run_dir / METRICS),
        log_file=str(run_dir / TRAIN_LOG),
        plot_file=str(plot_file) if plot_file else None,
        warnings=s.warnings + result.warnings,
        stop_reason=result.stopped,
        skipped_steps=st.skipped_steps,
        resumed_from=(res.checkpoint.name if res.checkpoint is not None else "step 0") if res else None,
        notes=notes,
    )


def _status_of(stopped: str) -> str:
    """The registry status of a run that ended with ``stopped`` (TrainResult.stopped)."""
    return {
        "completed": "completed",
        STOP_EARLY: "early-stopped",
        STOP_INTERRUPTED: "interrupted",
        STOP_DIVERGED: "failed",
        "pruned": "pruned",  # ft tune's pruner stopped the trial (services/tune.STOP_PRUNED)
    }.get(stopped, "stopped")

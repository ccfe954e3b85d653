"""`ft train`: resolve config, dataset and model, run the engine into ``runs/<id>/``, record it.

The service wires the pieces; the engine (:mod:`ft.engine.trainer`) does the math and reports
through callbacks. Callers (the CLI) pass their own callbacks for a live display. Everything a run
produces is in its folder: ``metrics.jsonl``, ``train.log``, ``config.json``, ``loss.png`` and
``checkpoints/``; its registry row (table ``runs``) says how it went.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from ft import __version__
from ft.config.loader import ResolvedConfig, load_config
from ft.config.train import TrainConfig
from ft.data.store import load_split
from ft.engine.batching import BatchOptions, TokenizedExamples
from ft.engine.callbacks import LogWriter, MetricsWriter, TrainControl
from ft.engine.checkpoint import BEST, CHECKPOINTS, LATEST, CheckpointSaver, read_pointer
from ft.engine.lora import AdapterSpec, AdapterSummary, apply_adapters
from ft.engine.memory import MemoryMonitor
from ft.engine.optim import OptimizerSpec, build_optimizer
from ft.engine.schedule import make_schedule
from ft.engine.trainer import RunPlan, TrainerState, TrainOptions, TrainResult, plan_run, train
from ft.errors import ErrorCode, FtError
from ft.services import datasets as datasets_svc
from ft.services import models as models_svc
from ft.services.runs import METRICS, PLOT, RUN_CONFIG, TABLE, TRAIN_LOG, plot_metrics
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_write_json

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


def _dataset(ws: Workspace, cfg: TrainConfig, dataset: str | None,
             prepare_progress: Callable[[Any], None] | None) -> datasets_svc.ResolvedDataset:  # fmt: skip
    if dataset:
        return datasets_svc.resolve_dataset(ws, dataset)
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


def _setup(ws: Workspace, overrides: Sequence[str], config_path: Path | None, dataset: str | None,
           prepare_progress: Callable[[Any], None] | None = None) -> _Setup:  # fmt: skip
    import mlx.core as mx

    from ft.models.loading import load_model_dir

    resolved = load_config(config_path if config_path is not None else ws, list(overrides))
    cfg = resolved.config
    t, lc = cfg.training, cfg.lora
    warnings: list[str] = []
    model_dir = models_svc.ensure_model(ws, cfg.model.name, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)  # fmt: skip
    ds = _dataset(ws, cfg, dataset, prepare_progress)
    if "train" not in ds.splits:
        raise FtError(ErrorCode.DATA_INVALID, f"dataset {ds.name} v{ds.version} has no train split",
                      "prepare it again with a smaller data.val_split")  # fmt: skip
    _check_tokenizer(ws, ds, cfg.model.name, model_dir)

    keep_quantized = t.method == "qlora"
    loaded = load_model_dir(model_dir, dequantize=False if keep_quantized else None, dtype=cfg.model.dtype,
                            trust_remote_code=cfg.model.trust_remote_code)  # fmt: skip
    precision = loaded.dtype + (f" ({loaded.note})" if loaded.note else "")
    if keep_quantized and mx.default_device() == mx.cpu:
        warnings.append("qlora on CPU: quantized matmuls have no BLAS path and run ~15x slower than float32; "
                        "training.method: lora on the dequantized base is much faster here")  # fmt: skip
    mx.random.seed(t.seed)  # adapter initialisation
    spec = AdapterSpec(method=t.method, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout,
                       target_modules=lc.target_modules, layers=lc.layers, quant_bits=lc.qlora_bits)  # fmt: skip
    summary = apply_adapters(loaded.model, spec)

    train_data = load_split(ds.splits["train"])
    val_data = load_split(ds.splits["val"]) if "val" in ds.splits else None
    if val_data is not None and len(val_data) == 0:
        val_data = None
    if val_data is None:
        warnings.append("no validation split: no validation loss, and no best checkpoint")
    batch = BatchOptions(batch_size=t.batch_size, grad_accumulation_steps=t.grad_accumulation_steps,
                         max_seq_length=cfg.data.max_seq_length, packing=_packing(t.packing), seed=t.seed,
                         attention_cost=_attention_cost(loaded.config), share_prefix=True)  # fmt: skip
    eos = list(getattr(loaded.tokenizer, "eos_token_ids", None) or [])
    options = TrainOptions(
        batch=batch, epochs=t.epochs, total_steps=t.max_steps, max_grad_norm=t.max_grad_norm,
        eval_steps=t.eval_steps, eval_limit=t.eval_batches * t.batch_size if t.eval_batches else None,
        log_steps=cfg.logging.steps, pad_id=int(getattr(loaded.tokenizer, "pad_token_id", None) or 0),
        sample_prompts=_sample_prompts(val_data, t.eval_samples), eos_ids=eos,
    )  # fmt: skip
    run_plan = plan_run(train_data, val_data, options)
    warmup = t.warmup_steps
    if warmup >= run_plan.total_steps:
        warmup = run_plan.total_steps // 10
        warnings.append(f"training.warmup_steps {t.warmup_steps} is not below the {run_plan.total_steps} steps of "
                        f"this run: warming up for {warmup} steps instead")  # fmt: skip
    if run_plan.skipped_examples:
        warnings.append(f"{run_plan.skipped_examples} training examples have no trained token within "
                        f"max_seq_length {cfg.data.max_seq_length} and are skipped")  # fmt: skip
    return _Setup(resolved, cfg, ds, model_dir, loaded.model, loaded.tokenizer, precision, summary, spec, train_data,
                  val_data, options, run_plan, warmup, warnings)  # fmt: skip


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
    spec = OptimizerSpec(name=t.optimizer, weight_decay=t.weight_decay, betas=tuple(t.adam_betas), eps=t.adam_eps)
    return build_optimizer(spec, sched)


def _plan(s: _Setup) -> TrainPlan:
    import mlx.core as mx

    rp = s.run_plan
    t = s.cfg.training
    return TrainPlan(
        model=s.cfg.model.name, model_dir=str(s.model_dir), precision=s.precision, method=t.method,
        dataset=s.dataset.name, dataset_version=s.dataset.version,
        trainable_parameters=s.summary.trainable_parameters, total_parameters=s.summary.total_parameters,
        trainable_percent=round(s.summary.trainable_percent, 4), adapted_modules=len(s.summary.adapted_modules),
        train_examples=rp.train_examples, val_examples=rp.val_examples, skipped_examples=rp.skipped_examples,
        examples_per_step=t.batch_size * t.grad_accumulation_steps, steps_per_epoch=rp.steps_per_epoch,
        total_steps=rp.total_steps, epochs=round(rp.total_steps / max(1, rp.steps_per_epoch), 3), warmup_steps=s.warmup,
        tokens_per_epoch=rp.tokens_per_epoch, trained_tokens_per_epoch=rp.trained_tokens_per_epoch,
        total_tokens=int(rp.tokens_per_epoch * rp.total_steps / max(1, rp.steps_per_epoch)),
        padding_fraction=round(rp.padding_fraction, 4), distinct_shapes=rp.distinct_shapes,
        largest_micro_batch=list(rp.largest_micro_batch), device=str(mx.default_device()), warnings=list(s.warnings),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- dry run
def dry_run(ws: Workspace, overrides: Sequence[str] = (), config_path: Path | None = None, dataset: str | None = None,
            warmup_steps: int = 3, prepare_progress: Callable[[Any], None] | None = None) -> TrainPlan:  # fmt: skip
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
    train(s.model, _optimizer(s), s.train_data, None, opts, plan=lambda _i, _o, _e: chosen, callbacks=[Timer()])
    steady = times[1:] or times  # the first step pays for compilation
    tok_s = sum(n for _, n in steady) / max(1e-9, sum(dt for dt, _ in steady))
    plan.measured_tokens_per_second = round(tok_s, 1)
    plan.measured_step_seconds = round(float(np.mean([dt for dt, _ in steady])), 3)
    plan.measured_peak_memory_gb = round(mx.get_peak_memory() / 1e9, 3)
    n_evals = plan.total_steps // max(1, s.cfg.training.eval_steps) + 2 if s.val_data is not None else 0
    val_tokens = plan.val_examples * plan.tokens_per_epoch / max(1, plan.train_examples)
    compile_s = max(0.0, times[0][0] - plan.measured_step_seconds) * plan.distinct_shapes
    # Evaluation is a forward pass: about a third of a training step's work per token.
    plan.estimated_seconds = round(plan.total_tokens / tok_s + n_evals * val_tokens / (3 * tok_s) + compile_s, 1)
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

    def __init__(self, ws: Workspace, run_id: str, meta: dict[str, Any]):
        self.ws, self.run_id, self.meta = ws, run_id, meta

    def _put(self, status: str | None = None) -> None:
        fields = {"status": status} if status else {}
        self.ws.registry().upsert(TABLE, {"id": self.run_id}, meta=self.meta, **fields)

    def on_step(self, e: Any) -> None:
        if e.logged:
            self.meta.update(step=e.step, total_steps=e.total_steps, train_seconds=round(e.elapsed_seconds, 2),
                             last_loss=e.avg_loss)  # fmt: skip
            self._put()

    def on_eval(self, e: Any) -> None:
        self.meta.setdefault("evals", []).append([e.step, e.val_loss])
        if e.is_best:
            self.meta.update(best_val_loss=e.val_loss, best_step=e.step)
        self._put()


def _tracking(cfg: TrainConfig, ws: Workspace, run_dir: Path, run_id: str, config: dict[str, Any]) -> list[object]:
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
                raise FtError(ErrorCode.PACKAGE_MISSING, "logging.tensorboard is on but no TensorBoard writer is installed",
                              "pip install tensorboardX, or set logging.tensorboard: false") from None  # fmt: skip
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
            raise FtError(ErrorCode.PACKAGE_MISSING, "logging.wandb is on but wandb is not installed",
                          "pip install wandb, or set logging.wandb: false") from None  # fmt: skip
        key = load_secrets(ws).wandb_api_key
        if key is None:
            raise FtError(ErrorCode.SECRETS_INVALID, "logging.wandb is on but no wandb_api_key is set",
                          "add wandb_api_key to passwords.yml (or FT_WANDB_API_KEY)")  # fmt: skip
        wandb.login(key=key.get_secret_value(), relogin=True)
        self.run = wandb.init(project="ft", name=run_id, config=config)

    def on_step(self, e: Any) -> None:
        if e.logged:
            self.run.log({"train/loss": e.avg_loss, "train/lr": e.lr, "train/tokens_per_second": e.tokens_per_second},
                         step=e.step)  # fmt: skip

    def on_eval(self, e: Any) -> None:
        self.run.log({"val/loss": e.val_loss, "val/perplexity": e.val_ppl}, step=e.step)

    def on_train_end(self, _r: Any) -> None:
        self.run.finish()


def _config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


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
) -> TrainRunResult:
    """Train as train.yml (+ overrides) says, into a new ``runs/<id>/``; see the module docstring."""
    t_wall = time.perf_counter()
    if name is not None:
        validate_name(name, "run name")
    s = _setup(ws, overrides, config_path, dataset, prepare_progress)
    plan = _plan(s)
    run_id = _new_run_id(ws, name)
    run_dir = ws.run_dir(run_id)
    run_dir.mkdir(parents=True)
    cfg = s.cfg
    config_json = {"config": cfg.model_dump(mode="json"), "sources": s.resolved.sources,
                   "dataset": {"name": s.dataset.name, "version": s.dataset.version, "path": str(s.dataset.path)},
                   "model_dir": str(s.model_dir), "ft_version": __version__}  # fmt: skip
    atomic_write_json(run_dir / RUN_CONFIG, config_json)
    try:
        sha = models_svc.get_model(ws, cfg.model.name).sha256
    except FtError:
        sha = {}
    adapter_config = {
        "base_model": cfg.model.name, "base_model_dir": str(s.model_dir), "base_model_sha256": sha,
        **s.spec.to_json(), "model_type": getattr(getattr(s.model, "args", None), "model_type", None),
        "ft_version": __version__, "run_id": run_id,
    }  # fmt: skip
    meta: dict[str, Any] = {
        "model": cfg.model.name, "dataset": s.dataset.name, "dataset_version": s.dataset.version,
        "method": cfg.training.method, "config_hash": _config_hash(cfg), "step": 0, "total_steps": plan.total_steps,
        "trainable_parameters": plan.trainable_parameters, "started_at": datetime.now().isoformat(timespec="seconds"),
        "precision": s.precision,
    }  # fmt: skip
    reg = _Registry(ws, run_id, meta)
    ws.registry().upsert(TABLE, {"id": run_id}, name=name, status="running", meta=meta)
    if on_plan:
        on_plan(plan, run_id)

    control = control or TrainControl()
    logw = LogWriter(run_dir / TRAIN_LOG)
    logw.line(f"run {run_id}: model {cfg.model.name} ({s.precision}), dataset {s.dataset.name} v{s.dataset.version}, "
              f"{s.summary.describe()}")  # fmt: skip
    for w in s.warnings:
        logw.line(f"warning: {w}")
    handler = _LogHandler(logw)
    ft_log = logging.getLogger("ft")
    ft_log.addHandler(handler)
    monitor = MemoryMonitor()
    state = TrainerState()
    optimizer = _optimizer(s)
    saver = CheckpointSaver(run_dir / CHECKPOINTS, s.model, optimizer, state, cfg.training.save_steps,
                            cfg.training.keep_last, adapter_config, config_json)  # fmt: skip
    status = "failed"
    result: TrainResult | None = None
    try:
        cbs = [monitor, MetricsWriter(run_dir / METRICS), logw, saver, reg,
               *_tracking(cfg, ws, run_dir, run_id, config_json), *callbacks]  # fmt: skip
        decode = getattr(s.tokenizer, "decode", None)
        result = train(s.model, optimizer, s.train_data, s.val_data, s.options, callbacks=cbs, control=control,
                       state=state, decode=decode)  # fmt: skip
        status = "completed" if result.stopped == "completed" else "stopped"
    except KeyboardInterrupt:
        status = "interrupted"
        logw.line("interrupted by the user")
        raise FtError(ErrorCode.INTERRUPTED, f"training interrupted; run {run_id} kept in {run_dir}",
                      "checkpoints so far are in its checkpoints/ folder") from None  # fmt: skip
    except BaseException as e:
        logw.line(f"failed: {type(e).__name__}: {e}")
        raise
    finally:
        ft_log.removeHandler(handler)
        plot_file: Path | None = run_dir / PLOT
        try:
            plot_metrics(run_dir / METRICS, plot_file, title=f"{run_id} ({status})")  # type: ignore[arg-type]
        except Exception as e:  # a plot must never hide the run's real outcome
            log.warning("could not draw %s: %s", PLOT, e)
            plot_file = None
        meta.update(status_detail=status, finished_at=datetime.now().isoformat(timespec="seconds"),
                    wall_seconds=round(time.perf_counter() - t_wall, 2))  # fmt: skip
        if result is not None:
            st = result.state
            meta.update(step=st.step, train_seconds=round(st.train_seconds, 2), tokens=st.tokens_seen,
                        trained_tokens=st.trained_tokens_seen, tokens_per_second=round(result.tokens_per_second, 1),
                        first_val_loss=result.first_val_loss, final_val_loss=result.final_val_loss,
                        best_val_loss=st.best_val_loss, best_step=st.best_step, warnings=s.warnings + result.warnings)  # fmt: skip
        ws.registry().upsert(TABLE, {"id": run_id}, status=status, meta=meta)
    assert result is not None
    st = result.state
    ckpts = run_dir / CHECKPOINTS
    return TrainRunResult(
        run_id=run_id, name=name, status=status, path=str(run_dir), plan=plan, steps=st.step,
        first_val_loss=result.first_val_loss, final_val_loss=result.final_val_loss, best_val_loss=st.best_val_loss,
        best_step=st.best_step, best_checkpoint=read_pointer(ckpts, BEST), latest_checkpoint=read_pointer(ckpts, LATEST),
        train_seconds=round(st.train_seconds, 2), wall_seconds=round(time.perf_counter() - t_wall, 2),
        tokens=st.tokens_seen, trained_tokens=st.trained_tokens_seen,
        tokens_per_second=round(result.tokens_per_second, 1), metrics_file=str(run_dir / METRICS),
        log_file=str(run_dir / TRAIN_LOG), plot_file=str(plot_file) if plot_file else None,
        warnings=s.warnings + result.warnings,
    )  # fmt: skip

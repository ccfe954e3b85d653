"""Where a run reports besides metrics.jsonl and train.log: the registry row, TensorBoard, Weights & Biases.

Each is an engine callback (``on_step(StepEvent)``, ``on_eval(EvalEvent)``, ``on_train_end``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ft.config.train import TrainConfig
from ft.engine.callbacks import EvalEvent, LogWriter, StepEvent
from ft.errors import ErrorCode, FtError
from ft.services.run_record import TABLE, RunRecord
from ft.workspace import Workspace

log = logging.getLogger(__name__)


class LogHandler(logging.Handler):
    """Sends ft's own log records (warnings, notes) into train.log."""

    def __init__(self, writer: LogWriter):
        super().__init__(logging.INFO)
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.line(f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # a closed log must never break training
            pass


class RegistryTracker:
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


def trackers(
    cfg: TrainConfig, ws: Workspace, run_dir: Path, run_id: str, config: dict[str, Any]
) -> list[object]:
    out: list[object] = []
    if cfg.logging.tensorboard:
        out.append(TensorBoard(run_dir / "tensorboard"))
    if cfg.logging.wandb:
        out.append(WandB(ws, run_id, config))
    return out


class TensorBoard:
    """TensorBoard event files through tensorboardX (or torch's writer when that is what is installed)."""

    def __init__(self, folder: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
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


class WandB:
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

"""What the trainer tells the outside world: events, the callback Protocol, and stock callbacks.

The engine never prints. A callback implements any subset of ``on_train_start``, ``on_step``,
``on_eval`` and ``on_train_end``; the CLI renders progress from them, the service writes
metrics.jsonl and train.log through :class:`MetricsWriter` and :class:`LogWriter`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

log = logging.getLogger(__name__)


@dataclass
class MemorySample:
    rss_gb: float  # process resident memory
    active_gb: float  # MLX arrays alive now
    peak_gb: float  # MLX peak since start (or since the last reset)
    available_gb: float  # what the system can still give


@dataclass
class StartEvent:
    total_steps: int
    steps_per_epoch: int
    epochs: float
    start_step: int
    train_examples: int
    skipped_examples: int  # no trained token after truncation
    val_examples: int
    tokens_per_epoch: int
    trained_tokens_per_epoch: int
    padding_fraction: float
    distinct_shapes: int
    trainable_parameters: int
    total_parameters: int
    packing: bool
    logits_on_targets_only: bool
    device: str
    notes: list[str] = field(default_factory=list)
    """Speed-ups a failed known-answer check turned off (:meth:`ft.engine.losses.ModelSplit.disabled`)."""
    objective: str = "sft"


@dataclass
class CompileEvent:
    """A step is about to run micro-batch shapes not compiled yet in this process (GPU only): the first one
    compiles the GPU kernels too (about two minutes on a fresh host, seconds once MLX has cached them)."""

    step: int
    shapes: list[tuple[int, int]]  # (rows, positions) of the new shapes
    first: bool  # the run's first compilation in this process


@dataclass
class StepEvent:
    step: int
    total_steps: int
    epoch: float  # fractional epochs done
    loss: float  # this step's token-weighted mean loss
    lr: float
    grad_norm: float
    tokens: int  # real input positions this step
    trained_tokens: int
    examples: int
    micro_batches: int
    step_seconds: float
    tokens_per_second: float  # real positions per second, over the last logging window
    trained_tokens_per_second: float
    elapsed_seconds: float
    eta_seconds: float
    skipped: bool = False  # non-finite gradient: update not applied
    logged: bool = False  # a logging step: ``avg_loss`` is the window's mean
    avg_loss: float | None = None
    memory: MemorySample | None = None
    record_ids: Sequence[int] = ()
    warning: str | None = None  # set by a callback (e.g. the memory monitor) for the display to show
    metrics: dict[str, float] = field(default_factory=dict)
    """Preference objectives, on logging steps: rewards, margin, reward accuracy, KL over the window."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        # The step's record ids: its sample order (checked after a resume) and, when skipped, what to inspect.
        d["record_ids"] = [int(i) for i in self.record_ids]
        d["type"] = "train"
        return d


@dataclass
class EvalEvent:
    step: int
    val_loss: float
    val_ppl: float
    tokens: int
    examples: int
    seconds: float
    is_best: bool
    samples: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    """Preference objectives: validation rewards, margin, reward accuracy, KL."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["type"] = "eval"
        return d


@dataclass
class TrainControl:
    """Shared between the trainer and callbacks: a callback (or a signal handler) asks to stop."""

    should_stop: bool = False
    reason: str | None = None

    def stop(self, reason: str) -> None:
        self.should_stop = True
        self.reason = reason


class Callback(Protocol):
    """Implement any subset; the trainer calls what exists."""

    def on_train_start(self, event: StartEvent) -> None: ...

    def on_step(self, event: StepEvent) -> None: ...

    def on_eval(self, event: EvalEvent) -> None: ...

    def on_step_end(self, event: StepEvent) -> None:
        """After the step's evaluation (if any): where checkpoints are taken."""
        ...

    def on_train_end(self, result: Any) -> None: ...


def dispatch(callbacks: Sequence[object], name: str, event: object) -> None:
    for cb in callbacks:
        fn = getattr(cb, name, None)
        if fn is not None:
            fn(event)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class MetricsWriter:
    """``metrics.jsonl``: one JSON object per logged training step and per evaluation, flushed each line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed on_train_end

    def _write(self, obj: dict[str, Any]) -> None:
        self._fh.write(json.dumps(obj, default=float) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def on_train_start(self, event: StartEvent) -> None:
        self._write({"type": "start", **asdict(event)})

    def on_step(self, event: StepEvent) -> None:
        if event.logged or event.skipped:
            self._write(event.to_json())

    def on_eval(self, event: EvalEvent) -> None:
        self._write(event.to_json())

    def on_train_end(self, result: Any) -> None:
        self._write({"type": "end", **(result.to_json() if hasattr(result, "to_json") else {})})
        self.close()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl; a torn last line (a crash mid-write) is ignored."""
    out: list[dict[str, Any]] = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _metrics_text(m: dict[str, float]) -> str:
    """Preference metrics on one line (rewards, margin, reward accuracy, KL), for train.log."""
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items())


class LogWriter:
    """``train.log``: human-readable lines, one per logged step and evaluation."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed on_train_end

    def line(self, text: str) -> None:
        from datetime import datetime

        self._fh.write(f"{datetime.now().isoformat(timespec='seconds')} {text}\n")
        self._fh.flush()

    def on_train_start(self, e: StartEvent) -> None:
        self.line(
            f"start: steps {e.start_step}->{e.total_steps} ({e.steps_per_epoch}/epoch, {e.epochs:.2f} epochs), "
            f"{e.train_examples} train / {e.val_examples} val examples, {e.skipped_examples} skipped, "
            f"{e.tokens_per_epoch} tokens/epoch ({e.trained_tokens_per_epoch} trained), "
            f"padding {100 * e.padding_fraction:.1f}%, {e.distinct_shapes} shapes, packing {e.packing}, "
            f"trainable {e.trainable_parameters}/{e.total_parameters}, device {e.device}"
        )
        for note in e.notes:
            self.line(f"warning: {note}")

    def on_step(self, e: StepEvent) -> None:
        if e.skipped:
            self.line(
                f"step {e.step}: non-finite loss or gradient, update skipped (weights unchanged); "
                f"record ids {list(e.record_ids)}"
            )
        if e.logged:
            mem = f" mem rss {e.memory.rss_gb:.2f}GB peak {e.memory.peak_gb:.2f}GB" if e.memory else ""
            self.line(
                f"step {e.step}/{e.total_steps} epoch {e.epoch:.2f} loss {e.avg_loss:.4f} lr {e.lr:.3e} "
                f"grad_norm {e.grad_norm:.3f} tok/s {e.tokens_per_second:.0f}{mem}"
            )
            if e.metrics:
                self.line(f"  step {e.step} preference: {_metrics_text(e.metrics)}")

    def on_eval(self, e: EvalEvent) -> None:
        best = " (best)" if e.is_best else ""
        ppl = f" ppl {e.val_ppl:.2f}" if math.isfinite(e.val_ppl) else ""
        self.line(f"eval step {e.step}: val_loss {e.val_loss:.4f}{ppl}{best} ({e.seconds:.1f}s)")
        if e.metrics:
            self.line(f"  eval step {e.step} preference: {_metrics_text(e.metrics)}")
        for s in e.samples:
            self.line(f"  sample {s.get('index')}: {s.get('text', '')!r}")

    def on_train_end(self, result: Any) -> None:
        if hasattr(result, "to_json"):
            self.line(f"end: {json.dumps(result.to_json(), default=float)}")
        self._fh.close()

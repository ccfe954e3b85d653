"""`ft train`: fine-tune the configured model; a live progress display, or the plan with --dry-run."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ft.cli.common import emit, err_console, fields_table, get_workspace, notes
from ft.cli.options import ConfigOpt, JsonOpt, NameOpt, SetOpt, dataset_option, setting
from ft.errors import ErrorCode, FtError
from ft.services import launch
from ft.services import training as svc


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} GB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _plan_table(p: svc.TrainPlan, title: str) -> Table:
    measured = p.measured_tokens_per_second is not None
    rows = [
        ("model", f"{p.model} ({p.precision})"),
        (
            "method",
            f"{p.method}: {p.trainable_parameters:,} trainable of {p.total_parameters:,} parameters "
            f"({p.trainable_percent:.3f}%), {p.adapted_modules} adapted modules",
        ),
        (
            "dataset",
            f"{p.dataset} v{p.dataset_version}: {p.train_examples:,} train / {p.val_examples:,} val "
            f"examples" + (f", {p.skipped_examples} skipped" if p.skipped_examples else ""),
        ),
        (
            "steps",
            f"{p.total_steps:,} optimizer steps ({p.steps_per_epoch:,} per epoch, {p.epochs:g} epochs), "
            f"{p.examples_per_step} examples per step, warmup {p.warmup_steps}",
        ),
        (
            "tokens",
            f"{p.total_tokens:,} in all ({p.tokens_per_epoch:,} per epoch, "
            f"{p.trained_tokens_per_epoch:,} of them trained)",
        ),
        (
            "batches",
            f"padding {100 * p.padding_fraction:.1f}%, {p.distinct_shapes} distinct shapes, "
            f"largest micro-batch {p.largest_micro_batch[0]} x {p.largest_micro_batch[1]} tokens",
        ),
        ("device", p.device + (f" x {p.ranks} data-parallel ranks" if p.ranks > 1 else "")),
        (
            "memory plan",
            f"peak about {_gb(p.planned_peak_memory_gb)} of {_gb(p.memory_budget_gb)} usable, gradient "
            f"checkpointing {'on' if p.gradient_checkpointing else 'off'}\n" + "\n".join(p.memory_plan)
            if p.memory_plan
            else None,
        ),
        (
            "measured",
            f"{p.measured_tokens_per_second:,.0f} tokens/s, {p.measured_step_seconds:.2f} s per "
            f"heavy step, peak memory {_gb(p.measured_peak_memory_gb)}"
            if measured
            else None,
        ),
        ("estimate", f"about {_duration(p.estimated_seconds)} for the whole run" if measured else None),
    ]
    return fields_table(rows, title, label_style="bold")


def _render_plan(con: Console, p: svc.TrainPlan) -> None:
    con.print(
        _plan_table(p, "ft train --dry-run: the plan (nothing was trained or written)"), soft_wrap=False
    )
    notes(con, p.warnings, "warning")


def _render_result(con: Console, r: svc.TrainRunResult) -> None:
    color = "green" if r.status == "completed" else "yellow"
    resumed = f", resumed from {r.resumed_from}" if r.resumed_from else ""
    con.print(
        f"[bold {color}]{r.status}[/] run [bold]{r.run_id}[/] in {_duration(r.wall_seconds)} "
        f"({r.steps} steps, {r.tokens_per_second:,.0f} tokens/s{resumed})"
    )
    if r.status == "early-stopped":
        con.print(
            f"early stopping: no improvement of the validation loss for early_stopping.patience evaluations; "
            f"the best checkpoint ({r.best_checkpoint or '-'}, step {r.best_step}) is kept"
        )
    if r.skipped_steps:
        con.print(
            f"[yellow]{r.skipped_steps} step(s) had a non-finite loss or gradient and were skipped[/] "
            "(record ids in train.log)"
        )
    rows = [
        (
            "validation loss",
            f"{r.first_val_loss:.4f} -> {r.final_val_loss:.4f} "
            f"(best {r.best_val_loss:.4f} at step {r.best_step})"
            if r.first_val_loss is not None
            else None,
        ),
        ("checkpoints", f"best: {r.best_checkpoint or '-'}, latest: {r.latest_checkpoint or '-'}"),
        ("run folder", r.path),
        ("plot", r.plot_file or "-"),
        ("metrics / log", f"{r.metrics_file}\n{r.log_file}"),
    ]
    con.print(fields_table(rows, label_style="bold"), soft_wrap=False)
    notes(con, r.warnings, "warning")
    con.print(f"next: ft evaluate --checkpoint best   |   ft runs plot {r.run_id}")


def _pref_metrics(m: dict[str, float]) -> str:
    """Rewards chosen/rejected, margin, reward accuracy and KL of a preference objective, one line."""
    parts = [
        f"rewards chosen {m.get('rewards_chosen', float('nan')):+.4f} rejected {m.get('rewards_rejected', float('nan')):+.4f}",
        f"margin {m.get('margin', float('nan')):+.4f}",
        f"accuracy {100 * m.get('reward_accuracy', float('nan')):.1f}%",
    ]
    if "kl" in m:
        parts.append(f"kl {m['kl']:.4f}")
    if "nll" in m:
        parts.append(f"nll {m['nll']:.4f}")
    return ", ".join(parts)


class _Display:
    """Renders the engine's callbacks: a live bar on a terminal, one line per logged step otherwise."""

    def __init__(self, enabled: bool):
        self.con = err_console()
        self.enabled = enabled
        self.live = enabled and self.con.is_terminal
        self.bar: Progress | None = None
        self.task: Any = None

    def note(self, text: str) -> None:
        """What a resume decided (damaged checkpoints, fallbacks, leftovers): always shown, on stderr."""
        self.con.print(f"[yellow]resume:[/] {text}", highlight=False)

    def plan(self, p: svc.TrainPlan, run_id: str) -> None:
        if not self.enabled:
            return
        self.con.print(_plan_table(p, f"run {run_id}"), soft_wrap=False)
        notes(self.con, p.warnings, "warning")

    def on_train_start(self, e: Any) -> None:
        notes(self.con, e.notes if self.enabled else [], "warning")
        if not self.live:
            return
        self.bar = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("mem {task.fields[mem]}"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.con,
            transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task(
            "train",
            total=e.total_steps,
            completed=e.start_step,
            epoch="0.00",
            loss="-",
            lr="-",
            tps="-",
            mem="-",
            eta="-",
        )

    def on_step(self, e: Any) -> None:
        notes(self.con, [e.warning] if e.warning and self.enabled else [], "warning")
        if e.skipped and self.enabled:
            self.con.print(
                f"[red]step {e.step}: non-finite loss or gradient, update skipped[/] "
                f"(record ids {list(e.record_ids)})",
                highlight=False,
            )
        mem = f"{e.memory.rss_gb:.1f}GB" if e.memory else "-"
        if self.bar is not None:
            self.bar.update(
                self.task,
                completed=e.step,
                epoch=f"{e.epoch:.2f}",
                loss=f"{e.loss:.4f}",
                lr=f"{e.lr:.2e}",
                tps=f"{e.tokens_per_second:,.0f}",
                mem=mem,
                eta=_duration(e.eta_seconds),
            )
        elif self.enabled and e.logged:
            self.con.print(
                f"step {e.step}/{e.total_steps} epoch {e.epoch:.2f} loss {e.avg_loss:.4f} lr {e.lr:.2e} "
                f"{e.tokens_per_second:,.0f} tok/s mem {mem} eta {_duration(e.eta_seconds)}",
                highlight=False,
            )
        if self.enabled and e.logged and e.metrics:
            self.con.print(f"  step {e.step}: {_pref_metrics(e.metrics)}", highlight=False)

    def on_compile(self, e: Any) -> None:
        if self.enabled and e.first:
            self.con.print(
                f"step {e.step}: compiling the step on the GPU ({len(e.shapes)} shape(s)); on a fresh host the "
                "first compilation builds MLX's GPU kernels and takes a minute or two (first run only)",
                highlight=False,
            )

    def on_eval(self, e: Any) -> None:
        if not self.enabled:
            return
        best = " [green](best)[/]" if e.is_best else ""
        self.con.print(
            f"eval at step {e.step}: val_loss {e.val_loss:.4f}"
            + (f", perplexity {e.val_ppl:.2f}" if e.val_ppl == e.val_ppl else "")
            + f"{best} "
            f"({e.seconds:.1f}s)",
            highlight=False,
        )
        if e.metrics:
            self.con.print(f"  val: {_pref_metrics(e.metrics)}", highlight=False)
        for s in e.samples:
            self.con.print(f"  sample {s['index']}: {s.get('text')!r}", highlight=False)

    def on_train_end(self, _r: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Show the plan (sizes, steps, tokens, measured speed, time and memory) without training.",
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue a run from its newest intact checkpoint (RUN: id, name, run or checkpoint folder; "
        "default: the latest run), with its own settings, schedule, optimizer state and data order.",
    ),
]
TargetArg = Annotated[
    str | None,
    typer.Argument(
        metavar="RUN|PATH", help="With --resume: the run (id or name) or the checkpoint folder to continue."
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="With --resume: accept --set changes that alter the math (recorded in the run)."
    ),
]
ObjectiveOpt = Annotated[
    str | None,
    setting(
        "training.objective",
        "--objective",
        more=" A shortcut for --set training.objective=...; kto, dpo and orpo also set data.labels keep.",
    ),
]
InitFromOpt = Annotated[
    str | None,
    typer.Option(
        "--init-from",
        metavar="RUN",
        help="Start from RUN's best (else latest) checkpoint, e.g. KTO after an SFT run; "
        "needs the same method and lora settings.",
    ),
]


def train(
    ctx: typer.Context,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    dataset: Annotated[
        str | None, dataset_option("-d", purpose="to train on (default: prepare train.yml's data.path first)")
    ] = None,
    name: NameOpt = None,
    dry_run: DryRunOpt = False,
    resume: ResumeOpt = False,
    target: TargetArg = None,
    force: ForceOpt = False,
    nproc: Annotated[int | None, setting("distributed.nproc", "--nproc", min=1)] = None,
    hostfile: Annotated[Path | None, setting("distributed.hostfile", "--hostfile")] = None,
    objective: ObjectiveOpt = None,
    init_from: InitFromOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune the configured model (train.yml) on a prepared dataset, into runs/<run-id>/.

    Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and exits (130/143); a second
    Ctrl-C exits at once. `ft train --resume` continues exactly where the run stopped.
    """
    ws = get_workspace(ctx)
    overrides = _overrides(set_ or [], objective)
    _refuse_conflicts(init_from, resume, target, force, dry_run)
    if dry_run:
        emit(svc.dry_run(ws, overrides, config, dataset), as_json, _render_plan)
        return
    code = launch.maybe_launch(ws.root, sys.argv[1:], nproc, hostfile, set_ or [], config)
    if code is not None:
        raise typer.Exit(code)
    follower = os.environ.get("MLX_RANK", "0") != "0"  # ranks other than 0 train silently
    display = _Display(enabled=not as_json and not follower)
    try:
        result = svc.run_training(
            ws,
            overrides,
            config,
            dataset,
            name,
            callbacks=[display],
            on_plan=display.plan,
            resume=(target or "") if resume else None,
            force=force,
            on_note=display.note,
            init_from=init_from,
        )
    finally:
        display.close()
    if not follower:
        emit(result, as_json, _render_result)


def _overrides(set_: list[str], objective: str | None) -> list[str]:
    """The --set overrides, plus what --objective stands for (a preference objective keeps both labels)."""
    overrides = list(set_)
    if objective is not None:
        if objective not in ("sft", "kto", "dpo", "orpo"):
            raise FtError(ErrorCode.USAGE, f"--objective {objective!r}", "choose sft, kto, dpo or orpo")
        overrides.append(f"training.objective={objective}")
        if objective != "sft" and not any(o.startswith("data.labels=") for o in overrides):
            overrides.append("data.labels=keep")
    return overrides


def _refuse_conflicts(
    init_from: str | None,
    resume: bool,
    target: str | None,
    force: bool,
    dry_run: bool,
) -> None:
    """Options that do not go together: a usage error naming them, before anything is loaded."""
    rules = [
        (
            init_from is not None and resume,
            "--init-from cannot be combined with --resume",
            "drop --init-from",
        ),
        (
            target is not None and not resume,
            f"unexpected argument {target!r}",
            f"to continue a run: ft train --resume {target}",
        ),
        (force and not resume, "--force only applies to --resume", "drop --force"),
        (dry_run and resume, "--dry-run and --resume cannot be combined", "drop one of them"),
    ]
    for conflict, message, hint in rules:
        if conflict:
            raise FtError(ErrorCode.USAGE, message, hint)

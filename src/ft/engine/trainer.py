"""One plain training loop: plan batches, compiled gradient step, token-weighted accumulation, eval.

``train()`` takes the model (adapters already applied), an optimizer, tokenized splits and
:class:`TrainOptions`; the loss (``loss=``) and the batch planner (``plan=``) are injectable, and
everything the outside world sees goes through callbacks (:mod:`ft.engine.callbacks`).

Exact resume is designed in: the data order is a pure function of (seed, epoch), dropout keys are
derived from (seed, step, micro-batch), and the optimizer keeps its step count and learning rate in
its state; so (trainable weights, optimizer state, :class:`TrainerState`) is everything a run needs
to continue as if never stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ft.engine import fastmath
from ft.engine import memory as memory_mod
from ft.engine.batching import (
    BatchOptions,
    ExampleIndex,
    MicroBatch,
    MicroBatchPlan,
    StepPlan,
    TokenizedExamples,
    collate,
    index_examples,
    limit_micro_batches,
    micro_batch_positions,
    plan_epoch,
    plan_eval,
    plan_stats,
    split_micro_batch,
)
from ft.engine.callbacks import EvalEvent, StartEvent, StepEvent, TrainControl, dispatch, perplexity
from ft.engine.checkpointing import checkpoint_blocks
from ft.engine.losses import LossFn, check_model, make_loss
from ft.engine.optim import global_norm
from ft.errors import ErrorCode, FtError

log = logging.getLogger(__name__)
PlanFn = Callable[[ExampleIndex, BatchOptions, int], list[StepPlan]]

# Why a run ended before its last step (TrainResult.stopped; "completed" otherwise).
STOP_DIVERGED = "diverged"
STOP_EARLY = "early-stopped"
STOP_INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class TrainOptions:
    batch: BatchOptions
    epochs: int = 1
    total_steps: int | None = None
    """Optimizer steps to run; None = epochs x steps per epoch."""
    max_grad_norm: float = 1.0
    eval_steps: int = 50
    eval_limit: int | None = None
    """Validation examples per evaluation (a fixed seeded subset); None = the whole split."""
    eval_at_start: bool = True
    log_steps: int = 10
    compile: bool = True
    fast_cpu_math: bool = True
    """On CPU, SiLU, attention's softmax and the loss's logsumexp use :mod:`ft.engine.fastmath` (MLX's CPU
    exp is ~40x slower than a multiply); modules are swapped for the run and put back afterwards."""
    pad_id: int = 0
    sample_prompts: Sequence[np.ndarray] = ()
    """Token ids of validation prompts to complete (greedy) at each evaluation."""
    sample_max_tokens: int = 48
    eos_ids: Sequence[int] = ()
    max_skipped_steps: int = 5
    """Consecutive non-finite steps (updates skipped) after which the run stops as ``diverged``; 0 = never."""
    early_stopping_patience: int | None = None
    """Evaluations in a row without an improvement of ``early_stopping_min_delta`` before stopping; None = off."""
    early_stopping_min_delta: float = 0.0
    gradient_checkpointing: bool = False
    """Recompute each transformer block in the backward pass (:mod:`ft.engine.checkpointing`): activation
    memory of about one block instead of all of them, for about one more forward pass of compute."""
    auto_micro_batch: bool = True
    """Out of memory in a step: redo it with the failing micro-batch split in two (same examples per optimizer
    step, so the same update up to rounding) and keep the lower limit (:attr:`TrainerState.micro_batch_limit`);
    False: stop with ``OUT_OF_MEMORY``."""


@dataclass
class TrainerState:
    """Where a run is. With the weights and optimizer state, enough to continue exactly."""

    step: int = 0  # optimizer updates done
    epoch: int = 0
    epoch_step: int = 0  # steps of `epoch` done
    examples_seen: int = 0
    tokens_seen: int = 0
    trained_tokens_seen: int = 0
    train_seconds: float = 0.0
    best_val_loss: float | None = None
    best_step: int | None = None
    last_val_loss: float | None = None
    skipped_steps: int = 0
    consecutive_skips: int = 0  # non-finite steps in a row (reset by a finite one)
    evals_without_improvement: int = 0  # early stopping's counter
    early_stop_ref: float | None = None  # the validation loss an evaluation has to beat by min_delta
    lr: float | None = None  # learning rate of the last step (the schedule itself lives in the optimizer)
    micro_batch_limit: int | None = None
    """Most positions (rows x length) one micro-batch may have, lowered after an out-of-memory error and kept
    in checkpoints so a resumed run does not hit it again; None = as planned."""
    seed: int | None = None
    """Data order is a pure function of (seed, epoch) and dropout keys of (seed, step, micro-batch):
    (seed, epoch, epoch_step, step) is the whole RNG and data-order state."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainerState:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class TrainResult:
    state: TrainerState
    stopped: str  # completed | a stop reason
    total_steps: int
    final_val_loss: float | None
    first_val_loss: float | None
    tokens_per_second: float
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "stopped": self.stopped,
            "total_steps": self.total_steps,
            "final_val_loss": self.final_val_loss,
            "first_val_loss": self.first_val_loss,
            "tokens_per_second": self.tokens_per_second,
            "state": self.state.to_json(),
        }


@dataclass
class RunPlan:
    """How a run will go through its data, before any compute (for schedules, --dry-run and reports)."""

    steps_per_epoch: int
    total_steps: int
    train_examples: int
    skipped_examples: int
    val_examples: int
    tokens_per_epoch: int
    trained_tokens_per_epoch: int
    padding_fraction: float
    distinct_shapes: int
    micro_batches_per_epoch: int
    largest_micro_batch: tuple[int, int]


def plan_run(
    train_data: TokenizedExamples,
    val_data: TokenizedExamples | None,
    options: TrainOptions,
    plan: PlanFn = plan_epoch,
) -> RunPlan:
    """Steps per epoch, total optimizer steps and padding of epoch 0's plan."""
    index = index_examples(train_data, options.batch.max_seq_length)
    plans = plan(index, options.batch, 0)
    st = plan_stats(plans, index)
    val_n = 0
    if val_data is not None and len(val_data):
        vi = index_examples(val_data, options.batch.max_seq_length)
        val_n = len(vi.usable) if options.eval_limit is None else min(options.eval_limit, len(vi.usable))
    largest = max((mb.shape for p in plans for mb in p.micro_batches), key=lambda s: s[0] * s[1])
    return RunPlan(
        steps_per_epoch=len(plans),
        total_steps=options.total_steps or options.epochs * len(plans),
        train_examples=len(index.usable),
        skipped_examples=len(train_data) - len(index.usable),
        val_examples=val_n,
        tokens_per_epoch=int(index.positions[index.usable].sum()),
        trained_tokens_per_epoch=int(index.trained[index.usable].sum()),
        padding_fraction=st.padding_fraction,
        distinct_shapes=len(st.shapes),
        micro_batches_per_epoch=st.micro_batches,
        largest_micro_batch=largest,
    )


def dropout_seed(seed: int, step: int, micro: int) -> int:
    """A distinct, reproducible RNG seed per (run seed, optimizer step, micro-batch)."""
    return (seed * 1_000_003 + step * 1_009 + micro) % (1 << 62)


def _to_mx(mb: MicroBatch) -> tuple[str, tuple[mx.array, ...]]:
    """(layout kind, arrays): plain rows, packed rows (+ segment ids) or rows after a shared prefix."""
    tail = (mx.array(mb.positions), mx.array(mb.labels), mx.array(mb.weights))
    if mb.prefix is not None:
        return "prefix", (mx.array(mb.inputs), mx.array(mb.prefix), *tail)
    if mb.segments is not None:
        return "packed", (mx.array(mb.inputs), mx.array(mb.segments), *tail)
    return "plain", (mx.array(mb.inputs), *tail)


def _all_finite(tree: Any) -> mx.array:
    leaves = [mx.all(mx.isfinite(v)) for _, v in tree_flatten(tree)]
    return mx.all(mx.stack(leaves)) if leaves else mx.array(True)


def _where_tree(ok: mx.array, new: Any, old: Any) -> Any:
    return tree_map(lambda n, o: mx.where(ok, n, o), new, old)


def _assign_inplace(dst: Any, src: Any) -> None:
    """Write ``src``'s leaves into the containers of ``dst`` (compiled state must keep its objects)."""
    if isinstance(dst, dict):
        for k in dst:
            if isinstance(dst[k], dict | list):
                _assign_inplace(dst[k], src[k])
            else:
                dst[k] = src[k]
    elif isinstance(dst, list):
        for i in range(len(dst)):
            if isinstance(dst[i], dict | list):
                _assign_inplace(dst[i], src[i])
            else:
                dst[i] = src[i]


class StepFunctions:
    """The compiled pieces of a step: gradient of one micro-batch, apply (clip + update), eval loss."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer,
        loss: LossFn,
        max_grad_norm: float,
        compile: bool = True,
    ):
        self.model = model
        self.optimizer = optimizer
        loss_and_grad = nn.value_and_grad(model, loss)

        # One function per layout: each is traced once per shape (a None argument cannot be compiled).
        def grad_plain(inputs, positions, labels, weights, norm):  # type: ignore[no-untyped-def]
            (_, (total, ntok)), grads = loss_and_grad(model, inputs, None, positions, labels, weights, norm)
            return total, ntok, grads

        def grad_packed(inputs, segments, positions, labels, weights, norm):  # type: ignore[no-untyped-def]
            (_, (total, ntok)), grads = loss_and_grad(
                model, inputs, segments, positions, labels, weights, norm
            )
            return total, ntok, grads

        def grad_prefix(inputs, prefix, positions, labels, weights, norm):  # type: ignore[no-untyped-def]
            (_, (total, ntok)), grads = loss_and_grad(
                model, inputs, None, positions, labels, weights, norm, prefix
            )
            return total, ntok, grads

        def apply(grads, loss_total):  # type: ignore[no-untyped-def]
            gnorm = global_norm(grads)
            if max_grad_norm > 0:
                scale = mx.minimum(1.0, max_grad_norm / (gnorm + 1e-6))
                grads = tree_map(lambda g: g * scale.astype(g.dtype), grads)
            old_params = model.trainable_parameters()
            # tree_map copies the containers: the optimizer updates its state dicts in place.
            old_opt = tree_map(
                lambda v: v, {k: v for k, v in optimizer.state.items() if k not in ("step", "learning_rate")}
            )
            optimizer.update(model, grads)
            # A non-finite loss or gradient (or an update that overflowed) leaves weights and moments
            # exactly as they were: NaN never lands, and a loss hook returning NaN skips the step too.
            ok = mx.isfinite(gnorm) & mx.isfinite(loss_total) & _all_finite(model.trainable_parameters())
            model.update(_where_tree(ok, model.trainable_parameters(), old_params))
            new_opt = {k: v for k, v in optimizer.state.items() if k not in ("step", "learning_rate")}
            _assign_inplace(optimizer.state, {**optimizer.state, **_where_tree(ok, new_opt, old_opt)})
            return gnorm, ok

        one = mx.array(1.0)

        def eval_plain(inputs, positions, labels, weights):  # type: ignore[no-untyped-def]
            return loss(model, inputs, None, positions, labels, weights, one)[1]

        def eval_packed(inputs, segments, positions, labels, weights):  # type: ignore[no-untyped-def]
            return loss(model, inputs, segments, positions, labels, weights, one)[1]

        def eval_prefix(inputs, prefix, positions, labels, weights):  # type: ignore[no-untyped-def]
            return loss(model, inputs, None, positions, labels, weights, one, prefix)[1]

        grads = {"plain": grad_plain, "packed": grad_packed, "prefix": grad_prefix}
        evals = {"plain": eval_plain, "packed": eval_packed, "prefix": eval_prefix}
        if compile:
            # value_and_grad leaves its traced parameters in the model: the model is an output too.
            st = [model.state, mx.random.state]
            grads = {k: mx.compile(f, inputs=st, outputs=st) for k, f in grads.items()}
            both = [model.state, optimizer.state]
            apply = mx.compile(apply, inputs=both, outputs=both)
            evals = {k: mx.compile(f, inputs=[model.state]) for k, f in evals.items()}
        self._grads, self._evals, self._apply = grads, evals, apply
        self._zero = mx.array(0.0)

    def apply(self, grads: Any, loss_total: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """Clip and apply ``grads``; skipped (weights and moments untouched) when anything is non-finite.

        Returns (gradient norm, ok). ``loss_total`` (the step's summed loss) takes part in the check.
        """
        return self._apply(grads, self._zero if loss_total is None else loss_total)

    def grad(self, batch: tuple[str, tuple[mx.array, ...]], norm: mx.array) -> tuple[mx.array, mx.array, Any]:
        kind, arrays = batch
        return self._grads[kind](*arrays, norm)

    def eval_loss(self, batch: tuple[str, tuple[mx.array, ...]]) -> tuple[mx.array, mx.array]:
        kind, arrays = batch
        return self._evals[kind](*arrays)


def evaluate(
    fns: StepFunctions,
    data: TokenizedExamples,
    plans: Sequence[StepPlan],
    index: ExampleIndex,
    pad_id: int = 0,
    target_step: int = 32,
) -> tuple[float, int, int]:
    """Token-weighted mean loss over ``plans`` (model in eval mode): (loss, trained tokens, examples)."""
    model = fns.model
    was_training = model.training
    model.eval()
    total = mx.array(0.0)
    ntok = mx.array(0.0)
    examples = 0
    try:
        for sp in plans:
            for mbp in sp.micro_batches:
                mb = collate(data, mbp, index, pad_id, target_step)
                t, n = fns.eval_loss(_to_mx(mb))
                total = total + t
                ntok = ntok + n
                mx.eval(total, ntok)
            examples += len(sp.examples)
    finally:
        model.train(was_training)
    n = float(ntok.item())
    return (float(total.item()) / n if n else float("nan")), int(n), examples


def generate_samples(
    model: nn.Module, prompts: Sequence[np.ndarray], max_tokens: int, eos_ids: Sequence[int]
) -> list[list[int]]:
    """Greedy completions of ``prompts`` (token ids), stopping at an EOS id."""
    from mlx_lm.generate import generate_step

    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for p in prompts:
            toks: list[int] = []
            for tok, _ in generate_step(
                mx.array(np.asarray(p, dtype=np.int32)),
                model,
                max_tokens=max_tokens,
                sampler=lambda lp: mx.argmax(lp, axis=-1),
            ):
                t = int(tok.item() if hasattr(tok, "item") else tok)
                if t in eos_ids:
                    break
                toks.append(t)
            out.append(toks)
    finally:
        model.train(was_training)
    return out


def oom_hint(options: TrainOptions) -> str:
    """The knobs that lower a step's memory, the ones not in use first."""
    fixes = []
    if not options.gradient_checkpointing:
        fixes.append("training.gradient_checkpointing: true")
    if not options.auto_micro_batch:
        fixes.append("training.auto_micro_batch: true (splits a micro-batch that runs out of memory)")
    fixes.append(memory_mod.KNOBS)
    return "; ".join(fixes) + "; `ft train --dry-run` shows the memory plan"


def _run_step(
    fns: StepFunctions,
    data: TokenizedExamples,
    micro: Sequence[MicroBatchPlan],
    index: ExampleIndex,
    norm: mx.array,
    options: TrainOptions,
    bopts: BatchOptions,
    step: int,
) -> tuple[mx.array, int, mx.array, mx.array]:
    """Gradients of the step's micro-batches (token-weighted sum), then clip and update; evaluated.

    An out-of-memory error carries the index of the micro-batch being evaluated (``micro_batch``).
    """
    acc: Any = None
    loss_sum = mx.array(0.0)
    n_tok = 0
    k = 0
    try:
        for k, mbp in enumerate(micro):
            mb = collate(data, mbp, index, options.pad_id, bopts.target_step)
            mx.random.seed(dropout_seed(bopts.seed, step, k))
            total, _, grads = fns.grad(_to_mx(mb), norm)
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            loss_sum = loss_sum + total
            n_tok += mb.n_tokens
            memory_mod.simulated_out_of_memory(micro_batch_positions(mbp))
            if k + 1 < len(micro):
                mx.eval(acc, loss_sum)  # one micro-batch's activations alive at a time
        gnorm, ok = fns.apply(acc, loss_sum)
        mx.eval(fns.model.trainable_parameters(), fns.optimizer.state, gnorm, ok, loss_sum)
    except Exception as e:
        if memory_mod.is_out_of_memory(e):
            e.micro_batch = k  # type: ignore[attr-defined]
        raise
    return loss_sum, n_tok, gnorm, ok


def current_lr(optimizer: optim.Optimizer) -> float:
    lr = optimizer.state.get("learning_rate", getattr(optimizer, "learning_rate", 0.0))
    return float(lr.item() if isinstance(lr, mx.array) else lr)


def _fast_math(options: TrainOptions) -> bool:
    return options.fast_cpu_math and mx.default_device().type == mx.DeviceType.cpu


def train(
    model: nn.Module,
    optimizer: optim.Optimizer,
    train_data: TokenizedExamples,
    val_data: TokenizedExamples | None,
    options: TrainOptions,
    *,
    loss: LossFn | None = None,
    plan: PlanFn = plan_epoch,
    callbacks: Sequence[object] = (),
    control: TrainControl | None = None,
    state: TrainerState | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> TrainResult:
    """Train until ``total_steps`` (or ``epochs``), evaluating every ``eval_steps``; see the module docstring."""
    # On CPU, MLPs and attention run exp through fastmath for the run (same parameters, put back after).
    restore = fastmath.swap_modules(model) if _fast_math(options) else (lambda: None)
    uncheckpoint = checkpoint_blocks(model) if options.gradient_checkpointing else (lambda: None)
    try:
        return _train(
            model,
            optimizer,
            train_data,
            val_data,
            options,
            loss=loss,
            plan=plan,
            callbacks=callbacks,
            control=control,
            state=state,
            decode=decode,
        )
    finally:
        uncheckpoint()
        restore()


def _train(
    model: nn.Module,
    optimizer: optim.Optimizer,
    train_data: TokenizedExamples,
    val_data: TokenizedExamples | None,
    options: TrainOptions,
    *,
    loss: LossFn | None,
    plan: PlanFn,
    callbacks: Sequence[object],
    control: TrainControl | None,
    state: TrainerState | None,
    decode: Callable[[list[int]], str] | None,
) -> TrainResult:
    control = control or TrainControl()
    state = state or TrainerState()
    bopts = options.batch
    state.seed = bopts.seed
    split = None
    notes: list[str] = []
    if loss is None:
        split = check_model(model)
        notes = split.disabled()  # each one costs speed, never correctness: say so
        if not split.packing and bopts.packing is not False:
            bopts = BatchOptions(**{**asdict(bopts), "packing": False})
        if not split.prefix and bopts.share_prefix:
            bopts = BatchOptions(**{**asdict(bopts), "share_prefix": False})
        loss = make_loss(split, fast_math=_fast_math(options))

    index = index_examples(train_data, bopts.max_seq_length)
    plans_cache: dict[int, list[StepPlan]] = {}

    def plans_for(epoch: int) -> list[StepPlan]:
        if epoch not in plans_cache:
            plans_cache.clear()  # one epoch's plan in memory at a time
            plans_cache[epoch] = plan(index, bopts, epoch)
        return plans_cache[epoch]

    first = plans_for(state.epoch)
    steps_per_epoch = len(first) if state.epoch == 0 else len(plans_for(0))
    total_steps = options.total_steps or options.epochs * steps_per_epoch
    if state.step >= total_steps:
        raise FtError(
            ErrorCode.USAGE, f"nothing to do: the run already did {state.step} of {total_steps} steps"
        )
    stats = plan_stats(plans_for(state.epoch), index)

    val_index = val_plans = None
    if val_data is not None and len(val_data) > 0:
        val_index = index_examples(val_data, bopts.max_seq_length)
        if len(val_index.usable):
            vopts = BatchOptions(**{**asdict(bopts), "shuffle": False})
            val_plans = plan_eval(val_index, vopts, options.eval_limit)

    fns = StepFunctions(model, optimizer, loss, options.max_grad_norm, compile=options.compile)
    optimizer.init(model.trainable_parameters())
    model.train()

    dispatch(
        callbacks,
        "on_train_start",
        StartEvent(
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            epochs=total_steps / max(1, steps_per_epoch),
            start_step=state.step,
            train_examples=len(index.usable),
            skipped_examples=len(train_data) - len(index.usable),
            val_examples=sum(len(p.examples) for p in val_plans) if val_plans else 0,
            tokens_per_epoch=int(index.positions[index.usable].sum()),
            trained_tokens_per_epoch=int(index.trained[index.usable].sum()),
            padding_fraction=stats.padding_fraction,
            distinct_shapes=len(stats.shapes),
            trainable_parameters=sum(v.size for _, v in tree_flatten(model.trainable_parameters())),
            total_parameters=sum(v.size for _, v in tree_flatten(model.parameters())),
            packing=bopts.packing is not False,
            logits_on_targets_only=split is None or split.body is not None,
            device=str(mx.default_device()),
            notes=notes,
        ),
    )

    eval_history: list[tuple[int, float]] = []
    first_val: float | None = None

    def run_eval() -> None:
        nonlocal first_val
        if val_plans is None or val_index is None or val_data is None:
            return
        t0 = time.perf_counter()
        vloss, vtok, vex = evaluate(fns, val_data, val_plans, val_index, options.pad_id, bopts.target_step)
        samples: list[dict[str, Any]] = []
        if options.sample_prompts:
            outs = generate_samples(model, options.sample_prompts, options.sample_max_tokens, options.eos_ids)
            for k, toks in enumerate(outs):
                samples.append({"index": k, "tokens": toks, "text": decode(toks) if decode else None})
        is_best = math.isfinite(vloss) and (state.best_val_loss is None or vloss < state.best_val_loss)
        if is_best:
            state.best_val_loss, state.best_step = vloss, state.step
        state.last_val_loss = vloss
        if options.early_stopping_patience is not None and math.isfinite(vloss):
            ref = state.early_stop_ref
            if ref is None or vloss < ref - options.early_stopping_min_delta:
                state.early_stop_ref, state.evals_without_improvement = vloss, 0
            else:
                state.evals_without_improvement += 1
        if first_val is None:
            first_val = vloss
        eval_history.append((state.step, vloss))
        dispatch(
            callbacks,
            "on_eval",
            EvalEvent(
                state.step, vloss, perplexity(vloss), vtok, vex, time.perf_counter() - t0, is_best, samples
            ),
        )
        patience = options.early_stopping_patience
        if patience is not None and state.evals_without_improvement >= patience and state.step < total_steps:
            control.stop(STOP_EARLY)

    if options.eval_at_start and state.step == 0 and not control.should_stop:
        run_eval()

    oom_warnings: list[str] = []
    win_loss = win_tok = win_trained = 0.0
    win_time = 0.0
    session_time = 0.0
    session_steps = 0
    while state.step < total_steps and not control.should_stop:
        plans = plans_for(state.epoch)
        if state.epoch_step >= len(plans):
            state.epoch += 1
            state.epoch_step = 0
            continue
        sp = plans[state.epoch_step]
        t0 = time.perf_counter()
        norm_tokens = int(index.trained[list(sp.examples)].sum())
        norm = mx.array(float(norm_tokens))
        oom_warning: str | None = None
        while True:
            micro = limit_micro_batches(sp.micro_batches, state.micro_batch_limit, index, bopts)
            # References to the evaluated weights and moments: an out-of-memory error leaves them as they were.
            saved_params = model.trainable_parameters()
            saved_opt = tree_map(lambda v: v, optimizer.state)
            try:
                loss_sum, n_tok, gnorm, ok = _run_step(
                    fns, train_data, micro, index, norm, options, bopts, state.step
                )
                break
            except Exception as e:  # noqa: BLE001 - only memory errors are handled, the rest re-raised
                if not memory_mod.is_out_of_memory(e):
                    raise
                failed = micro[getattr(e, "micro_batch", len(micro) - 1)]
                model.update(saved_params)
                _assign_inplace(optimizer.state, saved_opt)
                mx.clear_cache()
                rows, R = failed.shape
                where = f"step {state.step + 1}, a micro-batch of {rows} x {R} positions"
                halves = split_micro_batch(failed, index, bopts)
                if not options.auto_micro_batch or halves is None:
                    why = (
                        "training.auto_micro_batch is false"
                        if not options.auto_micro_batch
                        else "it holds a single example and cannot be split further"
                    )
                    raise FtError(
                        ErrorCode.OUT_OF_MEMORY,
                        f"out of memory at {where} ({why}); the last checkpoint is intact",
                        oom_hint(options),
                    ) from None
                # The larger half's size: micro-batches between it and the failed one would likely fail too.
                state.micro_batch_limit = min(
                    max(micro_batch_positions(h) for h in halves), micro_batch_positions(failed) - 1
                )
                oom_warning = (
                    f"out of memory at {where}: redoing the step with it split in two, and micro-batches "
                    f"of at most {state.micro_batch_limit} positions from now on (same examples per step)"
                )
                log.warning(oom_warning)
                oom_warnings.append(oom_warning)
        dt = time.perf_counter() - t0
        step_loss = float(loss_sum.item()) / max(1, norm_tokens)
        finite = bool(ok.item())
        state.lr = current_lr(optimizer)

        state.step += 1
        state.epoch_step += 1
        state.examples_seen += len(sp.examples)
        state.tokens_seen += n_tok
        state.trained_tokens_seen += norm_tokens
        state.train_seconds += dt
        if not finite:
            state.skipped_steps += 1
            state.consecutive_skips += 1
        else:
            state.consecutive_skips = 0
        session_time += dt
        session_steps += 1
        win_loss += step_loss * norm_tokens if finite else 0.0
        win_tok += n_tok
        win_trained += norm_tokens if finite else 0
        win_time += dt
        logged = state.step % options.log_steps == 0 or state.step == total_steps
        event = StepEvent(
            step=state.step,
            total_steps=total_steps,
            epoch=state.epoch + state.epoch_step / max(1, len(plans)),
            loss=step_loss,
            lr=current_lr(optimizer),
            grad_norm=float(gnorm.item()),
            tokens=n_tok,
            trained_tokens=norm_tokens,
            examples=len(sp.examples),
            micro_batches=len(micro),
            step_seconds=dt,
            tokens_per_second=win_tok / win_time if win_time else 0.0,
            trained_tokens_per_second=win_trained / win_time if win_time else 0.0,
            elapsed_seconds=state.train_seconds,
            eta_seconds=(total_steps - state.step) * session_time / session_steps,
            skipped=not finite,
            logged=logged,
            avg_loss=(win_loss / win_trained if win_trained else float("nan")) if logged else None,
            memory=memory_mod.sample(),
            record_ids=[int(train_data.record_ids[i]) for i in sp.examples],
            warning=oom_warning,
        )
        dispatch(callbacks, "on_step", event)
        if not finite and options.max_skipped_steps and state.consecutive_skips >= options.max_skipped_steps:
            control.stop(STOP_DIVERGED)
        if logged:
            win_loss = win_tok = win_trained = 0.0
            win_time = 0.0
        if state.step % options.eval_steps == 0 or state.step == total_steps:
            run_eval()
        dispatch(callbacks, "on_step_end", event)  # after this step's evaluation: checkpoints go here

    stopped = "completed" if state.step >= total_steps else (control.reason or "stopped")
    if control.reason == STOP_DIVERGED:
        stopped = STOP_DIVERGED  # even when the streak ended on the last step: not a completed run
    # An interrupted run exits promptly and a diverged one has nothing new to measure: no extra evaluation.
    if (
        stopped not in ("completed", STOP_DIVERGED, STOP_INTERRUPTED)
        and val_plans is not None
        and (not eval_history or eval_history[-1][0] != state.step)
    ):
        run_eval()
    result = TrainResult(
        state=state,
        stopped=stopped,
        total_steps=total_steps,
        final_val_loss=eval_history[-1][1] if eval_history else None,
        first_val_loss=first_val,
        tokens_per_second=state.tokens_seen / state.train_seconds if state.train_seconds else 0.0,
        eval_history=eval_history,
    )
    result.warnings.extend(notes)
    result.warnings.extend(oom_warnings)
    for cb in callbacks:
        result.warnings.extend(getattr(cb, "warnings", []) or [])
    dispatch(callbacks, "on_train_end", result)
    return result

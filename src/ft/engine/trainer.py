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

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Concatenate, ParamSpec

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ft.engine import fastmath, objectives
from ft.engine import memory as memory_mod
from ft.engine.batching import (
    BatchOptions,
    ExampleIndex,
    MicroBatch,
    MicroBatchPlan,
    PlanStats,
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
from ft.engine.callbacks import (
    CompileEvent,
    EvalEvent,
    StartEvent,
    StepEvent,
    TrainControl,
    dispatch,
    perplexity,
)
from ft.engine.checkpointing import checkpoint_blocks
from ft.engine.distributed import DataParallel
from ft.engine.losses import LossFn, check_model, make_loss
from ft.engine.objectives import AUX, PreferenceOptions
from ft.engine.optim import global_norm
from ft.engine.preference import (
    PreferenceData,
    PreferenceSteps,
    PrefMicro,
    PrefStep,
    ReferenceMode,
    Units,
    plan_units,
)
from ft.errors import ErrorCode, FtError

log = logging.getLogger(__name__)
_P = ParamSpec("_P")
HIGHER_IS_BETTER = frozenset({"reward_accuracy", "margin", "rewards_chosen", "logps_chosen"})
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
    checkpoint_keep_last: int | None = None
    """With gradient checkpointing, the last N blocks keep their activations (not recomputed); None: ft's rule,
    :func:`ft.config.train.checkpoint_keep_last` of the model's blocks."""
    memory_limit_bytes: int | None = None
    """On a GPU, the memory MLX may hold while it queues work ahead of the GPU (:func:`ft.engine.memory.
    working_set_limit`); the services set it from the memory plan (``MemoryEstimate.working_limit_bytes``).
    None: MLX's default (95% of the GPU's memory on CUDA), which lets queued buffers hold ~10 GB on a 7B."""
    auto_micro_batch: bool = True
    """Out of memory in a step: redo it with the failing micro-batch split in two (same examples per optimizer
    step, so the same update up to rounding) and keep the lower limit (:attr:`TrainerState.micro_batch_limit`);
    False: stop with ``OUT_OF_MEMORY``."""
    parallel: DataParallel | None = None
    """Data parallelism (:mod:`ft.engine.distributed`): this rank computes its share of every step's
    micro-batches and of the validation steps; the sums are all-reduced so every rank applies the same update.
    Out-of-memory recovery is off (ranks must agree on the micro-batches)."""
    early_stopping_metric: str = "loss"
    """What early stopping watches: the validation loss, or (preference objectives) ``reward_accuracy`` or
    ``margin`` (higher is better) or another validation metric (lower is better)."""


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
    kept: dict[str, np.ndarray] | None = None
    """Values the run keeps instead of recomputing (a preference run's reference log-probabilities), saved
    beside the checkpoint (not in its JSON) and put back on resume."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "kept"}

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
    largest_targets: int = 0
    """Most trained positions (padded to the ladder) of one micro-batch: where the logits are computed."""


def plan_run(
    train_data: TokenizedExamples | PreferenceData,
    val_data: TokenizedExamples | PreferenceData | None,
    options: TrainOptions,
    plan: PlanFn = plan_epoch,
    objective: PreferenceOptions | None = None,
) -> RunPlan:
    """Steps per epoch, total optimizer steps and padding of epoch 0's plan (of units for a preference
    objective: pairs, or KTO replies with their mismatched sequences)."""
    if objective is not None:
        assert isinstance(train_data, PreferenceData)
        units = Units(train_data, objective, options.batch.max_seq_length, options.batch.seed)
        psteps = plan_units(units, options.batch, 0)
        st = _preference_plan_stats(psteps, units)
        usable = [int(u) for u in units.usable]
        val_n = 0
        if isinstance(val_data, PreferenceData) and len(val_data):
            vu = Units(val_data, objective, options.batch.max_seq_length, options.batch.seed)
            val_n = len(vu.usable) if options.eval_limit is None else min(options.eval_limit, len(vu.usable))
        return RunPlan(
            steps_per_epoch=len(psteps),
            total_steps=options.total_steps or options.epochs * len(psteps),
            train_examples=len(usable),
            skipped_examples=len(units) - len(usable),
            val_examples=val_n,
            tokens_per_epoch=sum(units.positions(u) for u in usable),
            trained_tokens_per_epoch=sum(units.trained(u) for u in usable),
            padding_fraction=st.padding_fraction,
            distinct_shapes=len(st.shapes),
            micro_batches_per_epoch=st.micro_batches,
            largest_micro_batch=max(
                (p.shape for p in _layouts(psteps)), key=lambda s: s[0] * s[1], default=(0, 0)
            ),
        )
    assert not isinstance(train_data, PreferenceData)  # handled above
    index = index_examples(train_data, options.batch.max_seq_length)
    plans = plan(index, options.batch, 0)
    st = plan_stats(plans, index)
    val_n = 0
    if val_data is not None and len(val_data):
        assert not isinstance(val_data, PreferenceData)
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
        largest_targets=max(
            (
                mb.targets or options.batch.target_size(_trained(mb, index))
                for p in plans
                for mb in p.micro_batches
            ),
            default=0,
        ),
    )


def _layouts(psteps: Sequence[PrefStep]) -> Iterator[Any]:
    """The row layouts of a preference epoch's micro-batches (a KTO one also has its mismatched pairs')."""
    for sp in psteps:
        for m in sp.micro_batches:
            yield from (p for p in (m.plan, m.kl_plan) if p is not None)


def _preference_plan_stats(psteps: Sequence[PrefStep], units: Units) -> PlanStats:
    """What :func:`ft.engine.batching.plan_stats` says of SFT plans, for a preference epoch's plans."""
    st = PlanStats(steps=len(psteps), micro_batches=sum(len(sp.micro_batches) for sp in psteps))
    for p in _layouts(psteps):
        st.shapes.add((p.packed, *p.shape, p.targets))
        st.padded_positions += p.shape[0] * p.shape[1]
        st.real_positions += sum(int(units.index.positions[i]) for row in p.rows for i in row)
    return st


def _compiles_gpu_kernels(options: TrainOptions) -> bool:
    return options.compile and mx.default_device().type == mx.DeviceType.gpu


def _shape_key(mb: Any) -> tuple[int, ...]:
    """(rows, positions, prefix, targets) of a micro-batch (a preference one carries its layout in ``plan``)."""
    p = getattr(mb, "plan", mb)
    return (len(p.rows), p.length, p.prefix, p.targets)


def _trained(mb: MicroBatchPlan, index: ExampleIndex) -> int:
    return int(sum(index.trained[i] for row in mb.rows for i in row))


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


def make_apply(
    model: nn.Module, optimizer: optim.Optimizer, max_grad_norm: float, compile: bool = True
) -> Callable[[Any, mx.array], tuple[mx.array, mx.array]]:
    """The update: global-norm clipping, optimizer step, and a revert of weights and moments when the
    gradient, the loss or the new weights are not finite. (grads, loss_total) -> (grad norm, ok)."""

    def apply(grads, loss_total):
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

    if compile:
        both = [model.state, optimizer.state]
        return mx.compile(apply, inputs=both, outputs=both)
    return apply


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
        def grad_plain(inputs, positions, labels, weights, norm):
            (_, (total, ntok)), grads = loss_and_grad(model, inputs, None, positions, labels, weights, norm)
            return total, ntok, grads

        def grad_packed(inputs, segments, positions, labels, weights, norm):
            (_, (total, ntok)), grads = loss_and_grad(
                model, inputs, segments, positions, labels, weights, norm
            )
            return total, ntok, grads

        def grad_prefix(inputs, prefix, positions, labels, weights, norm):
            (_, (total, ntok)), grads = loss_and_grad(
                model, inputs, None, positions, labels, weights, norm, prefix
            )
            return total, ntok, grads

        one = mx.array(1.0)

        def eval_plain(inputs, positions, labels, weights):
            return loss(model, inputs, None, positions, labels, weights, one)[1]

        def eval_packed(inputs, segments, positions, labels, weights):
            return loss(model, inputs, segments, positions, labels, weights, one)[1]

        def eval_prefix(inputs, prefix, positions, labels, weights):
            return loss(model, inputs, None, positions, labels, weights, one, prefix)[1]

        grads: dict[str, Callable[..., Any]] = {
            "plain": grad_plain,
            "packed": grad_packed,
            "prefix": grad_prefix,
        }
        evals: dict[str, Callable[..., Any]] = {
            "plain": eval_plain,
            "packed": eval_packed,
            "prefix": eval_prefix,
        }
        if compile:
            # value_and_grad leaves its traced parameters in the model: the model is an output too.
            st = [model.state, mx.random.state]
            grads = {k: mx.compile(f, inputs=st, outputs=st) for k, f in grads.items()}
            evals = {k: mx.compile(f, inputs=[model.state]) for k, f in evals.items()}
        self._grads, self._evals = grads, evals
        self._apply = make_apply(model, optimizer, max_grad_norm, compile)
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
    dp: DataParallel | None = None,
) -> tuple[float, int, int]:
    """Token-weighted mean loss over ``plans`` (model in eval mode): (loss, trained tokens, examples).

    ``dp``: this rank scores its share of ``plans`` and the totals are summed over the ranks."""
    if dp is not None:
        plans = [plans[k] for k in dp.mine(len(plans))]
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
    t, n = float(total.item()), float(ntok.item())
    if dp is not None:
        t, n, ex = dp.sum_floats([t, n, examples])
        examples = round(ex)
    return (t / n if n else float("nan")), round(n), examples


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


def current_lr(optimizer: optim.Optimizer) -> float:
    lr = optimizer.state.get("learning_rate", getattr(optimizer, "learning_rate", 0.0))
    return float(lr.item() if isinstance(lr, mx.array) else lr)


def _fast_math(options: TrainOptions) -> bool:
    return options.fast_cpu_math and mx.default_device().type == mx.DeviceType.cpu


_Loop = Callable[Concatenate[nn.Module, optim.Optimizer, Any, Any, TrainOptions, _P], TrainResult]


def _in_run_modes(loop: _Loop[_P]) -> _Loop[_P]:
    """``loop`` with the run's model modes: on CPU, MLPs and attention run exp through fastmath, gradient
    checkpointing when asked (same parameters, put back after, however the loop ends), and on a GPU MLX's
    memory limit at ``options.memory_limit_bytes``."""

    @functools.wraps(loop)
    def run(
        model: nn.Module,
        optimizer: optim.Optimizer,
        train_data: Any,
        val_data: Any,
        options: TrainOptions,
        /,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> TrainResult:
        restore = fastmath.swap_modules(model) if _fast_math(options) else (lambda: None)
        uncheckpoint = (
            checkpoint_blocks(model, options.checkpoint_keep_last)
            if options.gradient_checkpointing
            else (lambda: None)
        )
        try:
            with memory_mod.working_set_limit(options.memory_limit_bytes):
                return loop(model, optimizer, train_data, val_data, options, *args, **kwargs)
        finally:
            uncheckpoint()
            restore()

    return run


class _SFTSteps:
    """The SFT runner: token-weighted cross-entropy over the plans of :mod:`ft.engine.batching`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer,
        train_data: TokenizedExamples,
        val_data: TokenizedExamples | None,
        options: TrainOptions,
        bopts: BatchOptions,
        loss: LossFn,
        plan: PlanFn,
    ):
        self.train_data, self.options, self.bopts, self.plan = train_data, options, bopts, plan
        self.index = index_examples(train_data, bopts.max_seq_length)
        self._plans: dict[int, list[StepPlan]] = {}
        self.val_data = val_data
        self.val_index = self.val_plans = None
        if val_data is not None and len(val_data) > 0:
            self.val_index = index_examples(val_data, bopts.max_seq_length)
            if len(self.val_index.usable):
                vopts = BatchOptions(**{**asdict(bopts), "shuffle": False})
                self.val_plans = plan_eval(self.val_index, vopts, options.eval_limit)
        self.fns = StepFunctions(model, optimizer, loss, options.max_grad_norm, compile=options.compile)
        self.current = 0

    def plans_for(self, epoch: int) -> list[StepPlan]:
        if epoch not in self._plans:
            self._plans.clear()  # one epoch's plan in memory at a time
            self._plans[epoch] = self.plan(self.index, self.bopts, epoch)
        return self._plans[epoch]

    def start_fields(self, epoch: int) -> dict[str, Any]:
        stats = plan_stats(self.plans_for(epoch), self.index)
        idx = self.index
        return {
            "train_examples": len(idx.usable),
            "skipped_examples": len(self.train_data) - len(idx.usable),
            "val_examples": sum(len(p.examples) for p in self.val_plans) if self.val_plans else 0,
            "tokens_per_epoch": int(idx.positions[idx.usable].sum()),
            "trained_tokens_per_epoch": int(idx.trained[idx.usable].sum()),
            "padding_fraction": stats.padding_fraction,
            "distinct_shapes": len(stats.shapes),
        }

    def trained_tokens(self, sp: StepPlan) -> int:
        return int(self.index.trained[list(sp.examples)].sum())

    def record_ids(self, sp: StepPlan) -> list[int]:
        return [int(self.train_data.record_ids[i]) for i in sp.examples]

    def micro_for(self, sp: StepPlan, limit: int | None) -> tuple[MicroBatchPlan, ...]:
        return limit_micro_batches(sp.micro_batches, limit, self.index, self.bopts)

    def positions(self, mb: MicroBatchPlan) -> int:
        return micro_batch_positions(mb)

    def split(self, mb: MicroBatchPlan) -> tuple[MicroBatchPlan, MicroBatchPlan] | None:
        return split_micro_batch(mb, self.index, self.bopts)

    def step(
        self, sp: StepPlan, micro: Sequence[MicroBatchPlan], seeds: Sequence[int]
    ) -> tuple[mx.array, Any, mx.array | None, int]:
        """Gradients of the step's micro-batches (token-weighted sum); ``self.current`` is the one running.

        With data parallelism this rank takes micro-batches rank, rank + size, ... (each with its
        single-process dropout seed) and the sums are all-reduced."""
        dp = self.options.parallel
        norm = mx.array(float(self.trained_tokens(sp)))
        acc: Any = None
        loss_sum = mx.array(0.0)
        n_tok = 0
        mine = dp.mine(len(micro)) if dp is not None else range(len(micro))
        for j, k in enumerate(mine):
            mbp = micro[k]
            self.current = k
            mb = collate(self.train_data, mbp, self.index, self.options.pad_id, self.bopts.target_step)
            mx.random.seed(seeds[k])
            total, _, grads = self.fns.grad(_to_mx(mb), norm)
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            loss_sum = loss_sum + total
            n_tok += mb.n_tokens
            memory_mod.simulated_out_of_memory(micro_batch_positions(mbp))
            if j + 1 < len(mine):
                mx.eval(acc, loss_sum)  # one micro-batch's activations alive at a time
        if dp is not None:
            acc, loss_sum, n_tok, _ = dp.reduce_step(
                acc, loss_sum, n_tok, None, like=self.fns.model.trainable_parameters()
            )
        return loss_sum, acc, None, n_tok

    def step_loss(self, loss_sum: float, sp: StepPlan) -> float:
        return loss_sum / max(1, self.trained_tokens(sp))

    def evaluate(self) -> tuple[float, int, int, np.ndarray | None] | None:
        if self.val_plans is None or self.val_index is None or self.val_data is None:
            return None
        vloss, vtok, vex = evaluate(
            self.fns,
            self.val_data,
            self.val_plans,
            self.val_index,
            self.options.pad_id,
            self.bopts.target_step,
            self.options.parallel,
        )
        return vloss, vtok, vex, None


class _PreferenceRunner:
    """Adapts :class:`ft.engine.preference.PreferenceSteps` to the loop (plans, start fields, steps)."""

    def __init__(self, steps: PreferenceSteps, dp: DataParallel | None = None):
        self.s = steps
        self.dp = dp
        self.current = 0

    def plans_for(self, epoch: int) -> list[PrefStep]:
        return self.s.plans_for(epoch)

    def start_fields(self, epoch: int) -> dict[str, Any]:
        u = self.s.units
        usable = [int(x) for x in u.usable]
        tokens = sum(u.positions(x) for x in usable)
        st = _preference_plan_stats(self.plans_for(epoch), u)
        return {
            "train_examples": len(usable),
            "skipped_examples": len(u) - len(usable),
            "val_examples": sum(len(p.examples) for p in self.s.val_plans) if self.s.val_plans else 0,
            "tokens_per_epoch": tokens,
            "trained_tokens_per_epoch": sum(u.trained(x) for x in usable),
            "padding_fraction": st.padding_fraction,
            "distinct_shapes": len(st.shapes),
        }

    def trained_tokens(self, sp: PrefStep) -> int:
        return self.s.trained_tokens(sp)

    def record_ids(self, sp: PrefStep) -> list[int]:
        return self.s.record_ids(sp)

    def micro_for(self, sp: PrefStep, limit: int | None) -> tuple[PrefMicro, ...]:
        return sp.micro_batches  # a micro-batch holds whole pairs: never split

    def positions(self, mb: PrefMicro) -> int:
        return len(mb.plan.rows) * mb.plan.length

    def split(self, mb: PrefMicro) -> None:
        return None

    def step(
        self, sp: PrefStep, micro: Sequence[PrefMicro], seeds: Sequence[int]
    ) -> tuple[mx.array, Any, mx.array | None, int]:
        self.current = 0
        return self.s.step(sp, seeds, self.dp)

    def evaluate(self) -> tuple[float, int, int, np.ndarray | None] | None:
        return self.s.evaluate(self.dp)


def _metric_value(name: str, vloss: float, metrics: dict[str, float]) -> float:
    """The early-stopping metric as a number to minimise."""
    if name in ("loss", "val_loss"):
        return vloss
    v = metrics.get(name, float("nan"))
    return -v if name in HIGHER_IS_BETTER else v


@_in_run_modes
def train(
    model: nn.Module,
    optimizer: optim.Optimizer,
    train_data: TokenizedExamples | PreferenceData,
    val_data: TokenizedExamples | PreferenceData | None,
    options: TrainOptions,
    /,
    *,
    loss: LossFn | None = None,
    plan: PlanFn = plan_epoch,
    callbacks: Sequence[object] = (),
    control: TrainControl | None = None,
    state: TrainerState | None = None,
    decode: Callable[[list[int]], str] | None = None,
    objective: PreferenceOptions | None = None,
    reference: ReferenceMode = "adapters_off",
    ref_cache: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> TrainResult:
    """Train until ``total_steps`` (or ``epochs``), evaluating every ``eval_steps``; see the module docstring.

    ``objective``: a preference objective (KTO, DPO, ORPO; :mod:`ft.engine.preference`): the data are then
    :class:`PreferenceData`, ``reference`` says where the reference log-probabilities come from and
    ``ref_cache`` holds them for ``cached`` (train, val; :func:`ft.engine.preference.compute_reference`).
    """
    control = control or TrainControl()
    state = state or TrainerState()
    bopts = options.batch
    state.seed = bopts.seed
    split = None
    notes: list[str] = []
    if loss is None or objective is not None:
        split = check_model(model)
        notes = split.disabled()  # each one costs speed, never correctness: say so
        if not split.packing and bopts.packing is not False:
            bopts = BatchOptions(**{**asdict(bopts), "packing": False})
        if not split.prefix and bopts.share_prefix:
            bopts = BatchOptions(**{**asdict(bopts), "share_prefix": False})
    runner: Any
    if objective is not None:
        assert split is not None and isinstance(train_data, PreferenceData)
        assert val_data is None or isinstance(val_data, PreferenceData)
        psteps = PreferenceSteps(
            model,
            split,
            objective,
            bopts,
            train_data,
            val_data,
            reference=reference,
            ref_cache=ref_cache[0] if ref_cache else None,
            compile=options.compile,
            fast_math=_fast_math(options),
            pad_id=options.pad_id,
            eval_limit=options.eval_limit,
        )
        psteps.val_ref_cache = ref_cache[1] if ref_cache else None
        # The reference values kept so far come back from the checkpoint (the same numbers, not a
        # recomputation in another batch layout), and the live arrays go into every later one.
        state.kept = psteps.keep(state.kept)
        runner = _PreferenceRunner(psteps, options.parallel)
    else:
        if loss is None:
            assert split is not None
            loss = make_loss(split, fast_math=_fast_math(options))
        assert not isinstance(train_data, PreferenceData) and not isinstance(val_data, PreferenceData)
        runner = _SFTSteps(model, optimizer, train_data, val_data, options, bopts, loss, plan)
    apply = make_apply(model, optimizer, options.max_grad_norm, options.compile)

    first = runner.plans_for(state.epoch)
    steps_per_epoch = len(first) if state.epoch == 0 else len(runner.plans_for(0))
    total_steps = options.total_steps or options.epochs * steps_per_epoch
    if state.step >= total_steps:
        # The service checks this first (a resume of a finished run is its usage error to phrase).
        raise ValueError(f"nothing to do: the state is at step {state.step} of {total_steps}")
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
            **runner.start_fields(state.epoch),
            trainable_parameters=sum(v.size for _, v in tree_flatten(model.trainable_parameters())),
            total_parameters=sum(v.size for _, v in tree_flatten(model.parameters())),
            packing=bopts.packing is not False,
            logits_on_targets_only=split is None or split.body is not None,
            device=str(mx.default_device()),
            notes=notes,
            objective=objective.objective if objective is not None else "sft",
        ),
    )

    eval_history: list[tuple[int, float]] = []
    first_val: float | None = None
    metric = options.early_stopping_metric

    def run_eval() -> None:
        nonlocal first_val
        t0 = time.perf_counter()
        got = runner.evaluate()
        if got is None:
            return
        vloss, vtok, vex, vaux = got
        vmetrics = (
            objectives.metrics(dict(zip(AUX, vaux, strict=True)), objective.objective)
            if (objective is not None and vaux is not None)
            else {}
        )
        samples: list[dict[str, Any]] = []
        if options.sample_prompts:
            outs = generate_samples(model, options.sample_prompts, options.sample_max_tokens, options.eos_ids)
            for k, toks in enumerate(outs):
                samples.append({"index": k, "tokens": toks, "text": decode(toks) if decode else None})
        is_best = math.isfinite(vloss) and (state.best_val_loss is None or vloss < state.best_val_loss)
        if is_best:
            state.best_val_loss, state.best_step = vloss, state.step
        state.last_val_loss = vloss
        watched = _metric_value(metric, vloss, vmetrics)
        if options.early_stopping_patience is not None and math.isfinite(watched):
            ref = state.early_stop_ref
            if ref is None or watched < ref - options.early_stopping_min_delta:
                state.early_stop_ref, state.evals_without_improvement = watched, 0
            else:
                state.evals_without_improvement += 1
        if first_val is None:
            first_val = vloss
        eval_history.append((state.step, vloss))
        ppl = perplexity(vloss) if objective is None else float("nan")
        dispatch(
            callbacks,
            "on_eval",
            EvalEvent(
                state.step, vloss, ppl, vtok, vex, time.perf_counter() - t0, is_best, samples, vmetrics
            ),
        )
        patience = options.early_stopping_patience
        if patience is not None and state.evals_without_improvement >= patience and state.step < total_steps:
            control.stop(STOP_EARLY)

    dp = options.parallel
    agreed_stop = False  # data parallel: a stop asked on some rank, seen by all after a step's all-reduce

    def stop_now() -> bool:
        if dp is None:
            return control.should_stop
        # Stops decided from all-reduced values (early stopping, divergence) hold on every rank at once;
        # any other (a signal, a callback) waits for the next step's all-reduce so that ranks stay in step.
        return agreed_stop or control.reason in (STOP_EARLY, STOP_DIVERGED)

    if options.eval_at_start and state.step == 0 and not stop_now():
        run_eval()

    oom_warnings: list[str] = []
    win_loss = win_tok = win_trained = win_w = 0.0
    win_aux: np.ndarray | None = None
    win_time = 0.0
    session_time = 0.0
    session_steps = 0
    # On a GPU a new shape means a new trace, and the process's first one compiles GPU kernels: say so (CompileEvent).
    compiles_kernels = _compiles_gpu_kernels(options)
    compiled_shapes: set[tuple[int, ...]] = set()
    while state.step < total_steps and not stop_now():
        plans = runner.plans_for(state.epoch)
        if state.epoch_step >= len(plans):
            state.epoch += 1
            state.epoch_step = 0
            continue
        sp = plans[state.epoch_step]
        t0 = time.perf_counter()
        norm_tokens = runner.trained_tokens(sp)
        oom_warning: str | None = None
        while True:
            micro = runner.micro_for(sp, state.micro_batch_limit)
            if compiles_kernels:
                new = {_shape_key(m) for m in micro} - compiled_shapes
                if new:
                    shapes = sorted({(int(k[0]), int(k[1])) for k in new})
                    dispatch(
                        callbacks, "on_compile", CompileEvent(state.step + 1, shapes, not compiled_shapes)
                    )
                    compiled_shapes.update(new)
            seeds = [dropout_seed(bopts.seed, state.step, k) for k in range(len(micro))]
            # References to the evaluated weights and moments: an out-of-memory error leaves them as they were.
            saved_params = model.trainable_parameters()
            saved_opt = tree_map(lambda v: v, optimizer.state)
            if dp is not None:
                dp.local_stop = control.should_stop
            try:
                loss_sum, acc, aux, n_tok = runner.step(sp, micro, seeds)
                gnorm, ok = apply(acc, loss_sum)
                extra = [aux] if aux is not None else []
                mx.eval(model.trainable_parameters(), optimizer.state, gnorm, ok, loss_sum, *extra)
                break
            except Exception as e:  # noqa: BLE001 - only memory errors are handled, the rest re-raised
                if not memory_mod.is_out_of_memory(e):
                    raise
                if dp is not None:  # ranks must agree on the micro-batches: no split on one of them
                    raise FtError(
                        ErrorCode.OUT_OF_MEMORY,
                        f"out of memory at step {state.step + 1} on {dp.where()}; the last checkpoint is intact",
                        oom_hint(options),
                    ) from None
                failed = micro[min(runner.current, len(micro) - 1)]
                model.update(saved_params)
                _assign_inplace(optimizer.state, saved_opt)
                mx.clear_cache()
                where = f"step {state.step + 1}, a micro-batch of {runner.positions(failed)} positions"
                halves = runner.split(failed)
                if not options.auto_micro_batch or halves is None:
                    why = (
                        "training.auto_micro_batch is false"
                        if not options.auto_micro_batch
                        else "it cannot be split further (a single example, or the pairs of a preference step)"
                    )
                    raise FtError(
                        ErrorCode.OUT_OF_MEMORY,
                        f"out of memory at {where} ({why}); the last checkpoint is intact",
                        oom_hint(options),
                    ) from None
                # The larger half's size: micro-batches between it and the failed one would likely fail too.
                state.micro_batch_limit = min(
                    max(runner.positions(h) for h in halves), runner.positions(failed) - 1
                )
                oom_warning = (
                    f"out of memory at {where}: redoing the step with it split in two, and micro-batches "
                    f"of at most {state.micro_batch_limit} positions from now on (same examples per step)"
                )
                log.warning(oom_warning)
                oom_warnings.append(oom_warning)
        dt = time.perf_counter() - t0
        if dp is not None and dp.any_stop:
            agreed_stop = True
            if not control.should_stop:
                control.stop(STOP_INTERRUPTED)  # another rank was asked to stop: this one stops with it
        aux_np = np.array(aux, dtype=np.float64) if aux is not None else None
        if objective is not None:
            step_loss = float(loss_sum.item())
            weight = float(len(sp.examples))
        else:
            step_loss = float(loss_sum.item()) / max(1, norm_tokens)
            weight = float(norm_tokens)
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
        win_loss += step_loss * weight if finite else 0.0
        win_w += weight if finite else 0.0
        win_tok += n_tok
        win_trained += norm_tokens if finite else 0
        win_time += dt
        if aux_np is not None and finite:
            win_aux = aux_np if win_aux is None else win_aux + aux_np
        logged = state.step % options.log_steps == 0 or state.step == total_steps
        step_metrics: dict[str, float] = {}
        if objective is not None and logged and win_aux is not None:
            step_metrics = objectives.metrics(dict(zip(AUX, win_aux, strict=True)), objective.objective)
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
            avg_loss=(win_loss / win_w if win_w else float("nan")) if logged else None,
            memory=memory_mod.sample(),
            record_ids=runner.record_ids(sp),
            warning=oom_warning,
            metrics=step_metrics,
        )
        dispatch(callbacks, "on_step", event)
        if not finite and options.max_skipped_steps and state.consecutive_skips >= options.max_skipped_steps:
            control.stop(STOP_DIVERGED)
        if logged:
            win_loss = win_tok = win_trained = win_w = 0.0
            win_aux = None
            win_time = 0.0
        if state.step % options.eval_steps == 0 or state.step == total_steps:
            run_eval()
        dispatch(callbacks, "on_step_end", event)  # after this step's evaluation: checkpoints go here

    stopped = "completed" if state.step >= total_steps else (control.reason or "stopped")
    if control.reason == STOP_DIVERGED:
        stopped = STOP_DIVERGED  # even when the streak ended on the last step: not a completed run
    # An interrupted run exits promptly and a diverged one has nothing new to measure: no extra evaluation.
    # With data parallelism an evaluation needs every rank: none after a stop that only some ranks were asked.
    if (
        stopped not in ("completed", STOP_DIVERGED, STOP_INTERRUPTED)
        and not agreed_stop
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

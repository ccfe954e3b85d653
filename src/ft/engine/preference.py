"""Preference training steps (KTO, DPO, ORPO): batching, the reference model, compiled steps, evaluation.

Data. :class:`PreferenceData` is a set of tokenized replies (prompt + reply, the reply's tokens trained)
with a label each (1 desirable / chosen, 0 undesirable / rejected) and, for DPO and ORPO, ``pairs``:
(chosen, rejected) indices that share a prompt. A *unit* is what the loss averages over: a pair, or one
KTO reply. For KTO, every reply ``i`` also has a mismatched sequence: the prompt of ``i`` followed by the
reply of another example (a seeded derangement of the split, fixed for the run), whose log-ratio under
the policy and the reference estimates KL(pi || ref) (:func:`ft.engine.objectives.kto_kl`).

Batching. An optimizer step holds ``batch_size x grad_accumulation_steps`` units; a micro-batch holds
``batch_size`` units with both sides of each pair, packed into rows by the engine's own collation
(:func:`ft.engine.batching.collate`: segment masks keep sequences apart, logits only at trained
positions). Each trained position carries its sequence's slot, so one forward gives every sequence's
log-probability (a one-hot matmul sums them).

Reference. ``adapters_off``: for LoRA, DoRA and QLoRA the reference is the same model with its adapters
switched off (LoRA's scale set to 0; DoRA's magnitude set to the base weight's norm), a forward pass
without gradient on the micro-batch's own arrays; no second copy of the model. ``cached``: each
sequence's reference log-probability is computed once before training, with the starting weights (full
fine-tuning, or a run that starts from another run's adapter), and passed in (the service stores it
with the dataset version and model fingerprint so that a resumed run uses the same numbers).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from ft.engine.batching import (
    BatchOptions,
    ExampleIndex,
    MicroBatch,
    MicroBatchPlan,
    ShapeKey,
    TokenizedExamples,
    _candidates,
    _first_fit_decreasing,
    _penalty,
    _with_targets,
    collate,
    index_examples,
)
from ft.engine.distributed import DataParallel
from ft.engine.losses import ModelSplit, token_ce
from ft.engine.objectives import (
    AUX,
    PreferenceOptions,
    dpo_terms,
    kto_kl,
    kto_terms,
    orpo_terms,
)
from ft.errors import ErrorCode, FtError

ReferenceMode = Literal["adapters_off", "cached"]


# ---------------------------------------------------------------- data
@dataclass
class PreferenceData:
    """Replies with labels; ``pairs`` (n_pairs, 2) of (chosen, rejected) indices for DPO/ORPO."""

    seqs: TokenizedExamples
    labels: np.ndarray  # int8 per reply: 1 desirable/chosen, 0 undesirable/rejected
    pairs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.seqs)


def consecutive_pairs(n: int) -> np.ndarray:
    """Pairs stored as consecutive rows (chosen at 2k, rejected at 2k + 1)."""
    return np.arange(n - n % 2, dtype=np.int64).reshape(-1, 2)


def first_trained(mask: np.ndarray) -> int:
    """Index of the first trained token (where the reply starts); len(mask) when none is."""
    hits = np.flatnonzero(np.asarray(mask, dtype=bool))
    return int(hits[0]) if len(hits) else len(mask)


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point (n >= 2): the KL partner of each reply."""
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    order = np.random.default_rng([seed, 7_919]).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.roll(order, -1)  # each one's successor in a random cycle
    return out


class _WithMismatched:
    """Replies 0..n-1 as given, then n..2n-1: prompt of i + reply of partner[i] (KTO's KL sequences)."""

    def __init__(self, seqs: TokenizedExamples, partner: np.ndarray):
        self.seqs, self.partner = seqs, partner
        n = len(seqs)
        self.n = n
        self._fp = np.array([first_trained(seqs.mask(i)) for i in range(n)], dtype=np.int64)
        lengths = np.asarray(seqs.lengths, dtype=np.int64)
        kl_len = self._fp + (lengths[partner] - self._fp[partner]) if n else np.zeros(0, np.int64)
        self.lengths = np.concatenate([lengths, kl_len])
        rid = np.asarray(seqs.record_ids, dtype=np.int64)
        self.record_ids = np.concatenate([rid, rid])

    def __len__(self) -> int:
        return 2 * self.n

    def tokens(self, i: int) -> np.ndarray:
        if i < self.n:
            return self.seqs.tokens(i)
        i -= self.n
        j = int(self.partner[i])
        a, b = self.seqs.tokens(i)[: self._fp[i]], self.seqs.tokens(j)[self._fp[j] :]
        return np.concatenate([a, b]).astype(np.int32)

    def mask(self, i: int) -> np.ndarray:
        if i < self.n:
            return self.seqs.mask(i)
        i -= self.n
        j = int(self.partner[i])
        return np.concatenate([np.zeros(self._fp[i], bool), np.asarray(self.seqs.mask(j))[self._fp[j] :]])


class _Plain:
    """The replies only (DPO/ORPO have no mismatched sequences)."""

    def __init__(self, seqs: TokenizedExamples):
        self.seqs = seqs
        self.lengths = np.asarray(seqs.lengths, dtype=np.int64)
        self.record_ids = np.asarray(seqs.record_ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.seqs)

    def tokens(self, i: int) -> np.ndarray:
        return self.seqs.tokens(i)

    def mask(self, i: int) -> np.ndarray:
        return self.seqs.mask(i)


# ---------------------------------------------------------------- planning
@dataclass(frozen=True)
class PrefMicro:
    units: tuple[int, ...]
    plan: MicroBatchPlan  # the units' replies (both sides of each pair)
    kl_plan: MicroBatchPlan | None = None  # KTO: the units' mismatched sequences


@dataclass(frozen=True)
class PrefStep:
    examples: tuple[int, ...]  # unit ids
    micro_batches: tuple[PrefMicro, ...]


class Units:
    """Units of a split and the sequences behind them (+ mismatched sequences for KTO)."""

    def __init__(self, data: PreferenceData, opts: PreferenceOptions, max_seq_length: int, seed: int):
        self.data, self.opts = data, opts
        n = len(data)
        if opts.paired:
            if data.pairs is None:
                raise FtError(
                    ErrorCode.DATA_INVALID,
                    f"{opts.objective.upper()} needs paired data (prompt, chosen, rejected)",
                    "prepare a paired dataset, or use training.objective: kto for labelled replies",
                )
            self.all: Any = _Plain(data.seqs)
            self.pairs = np.asarray(data.pairs, dtype=np.int64).reshape(-1, 2)
        else:
            self.all = _WithMismatched(data.seqs, derangement(n, seed))
            self.pairs = None  # type: ignore[assignment]
        self.index: ExampleIndex = index_examples(self.all, max_seq_length)
        ok = (self.index.positions >= 1) & (self.index.trained >= 1)
        if self.pairs is not None:
            self.usable = np.flatnonzero(ok[self.pairs[:, 0]] & ok[self.pairs[:, 1]])
        else:
            self.usable = np.flatnonzero(ok[:n] & ok[n : 2 * n]) if n else np.zeros(0, np.int64)
        self.labels = np.asarray(data.labels, dtype=np.int8)

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else len(self.data)

    def seqs_of(self, u: int) -> tuple[int, ...]:
        return (int(self.pairs[u, 0]), int(self.pairs[u, 1])) if self.pairs is not None else (int(u),)

    def kl_of(self, u: int) -> int:
        return len(self.data) + int(u)

    def positions(self, u: int) -> int:
        return int(sum(self.index.positions[s] for s in self.seqs_of(u)))

    def trained(self, u: int) -> int:
        return int(sum(self.index.trained[s] for s in self.seqs_of(u)))

    def record_ids(self, u: int) -> list[int]:
        return [int(self.all.record_ids[s]) for s in self.seqs_of(u)]


def _layout(
    seqs: Sequence[int],
    index: ExampleIndex,
    opts: BatchOptions,
    seen: dict[ShapeKey, int],
    penalty: float,
) -> MicroBatchPlan:
    """All of ``seqs`` in one micro-batch: rows of the cheapest bucket length (packed unless packing is off)."""
    sizes = {int(i): int(index.positions[i]) for i in seqs}
    longest, total = max(sizes.values()), sum(sizes.values())
    best: tuple[float, MicroBatchPlan] | None = None
    for R in _candidates(longest, total, opts):
        rows = (
            [[i] for i in sorted(sizes, key=lambda j: (-sizes[j], j))]
            if opts.packing is False
            else _first_fit_decreasing(list(sizes), sizes, R)
        )
        mb = MicroBatchPlan(tuple(tuple(r) for r in rows), R)
        plan, cost = _with_targets((mb,), index, opts, seen, penalty)
        if best is None or cost < best[0]:
            best = (cost, plan[0])
    assert best is not None
    mb = best[1]
    key = ("packed" if mb.packed else "plain", len(mb.rows), mb.length, 0, mb.targets)
    seen[key] = seen.get(key, 0) + 1
    return mb


def plan_units(
    units: Units, opts: BatchOptions, epoch: int, shuffle: bool = True, limit: int | None = None
) -> list[PrefStep]:
    """Optimizer steps of one epoch over the units (deterministic in (seed, epoch)); eval: shuffle=False."""
    usable = units.usable
    if len(usable) == 0:
        raise FtError(
            ErrorCode.DATA_INVALID,
            "no preference example has a trained token on every side",
            "check the dataset: are the replies (chosen/rejected or labelled) present?",
        )
    if limit is not None and limit < len(usable):
        usable = np.sort(np.random.default_rng([opts.seed, 1_000_003]).choice(usable, limit, replace=False))
    E = opts.examples_per_step
    size = np.array([units.positions(int(u)) for u in usable], dtype=np.int64)
    if shuffle:
        rng = np.random.default_rng([opts.seed, epoch])
        perm = rng.permutation(len(usable))
        order, size = usable[perm], size[perm]
        window = max(1, opts.group_window) * E
        groups: list[np.ndarray] = []
        for w in range(0, len(order), window):  # similar lengths inside a window pack tighter
            chunk, cs = order[w : w + window], size[w : w + window]
            chunk = chunk[np.argsort(cs, kind="stable")]
            groups += [chunk[k : k + E] for k in range(0, len(chunk), E)]
        steps = [groups[j] for j in rng.permutation(len(groups))]
    else:
        order = usable[np.argsort(size, kind="stable")]
        steps = [order[k : k + E] for k in range(0, len(order), E)]
    seen: dict[ShapeKey, int] = {}
    penalty = _penalty(units.index, opts) * (2 if units.pairs is not None else 1)
    out = []
    for ids in steps:
        micro = []
        for k in range(0, len(ids), opts.batch_size):
            us = tuple(int(u) for u in ids[k : k + opts.batch_size])
            seqs = [s for u in us for s in units.seqs_of(u)]
            plan = _layout(seqs, units.index, opts, seen, penalty)
            kl = None
            if units.pairs is None:
                kl = _layout([units.kl_of(u) for u in us], units.index, opts, seen, penalty)
            micro.append(PrefMicro(us, plan, kl))
        out.append(PrefStep(tuple(int(u) for u in ids), tuple(micro)))
    return out


# ---------------------------------------------------------------- collation
@dataclass
class PrefArrays:
    """One micro-batch's arrays: the collated rows plus who owns each trained position."""

    kind: str  # "plain" | "packed"
    rows: tuple[mx.array, ...]  # (inputs,) or (inputs, segments)
    positions: mx.array
    labels: mx.array
    weights: mx.array
    owner: mx.array  # (K,) slot of each trained position (S for target padding)
    slot_ids: mx.array  # (S,) arange
    seq_ids: np.ndarray  # (S,) the sequence in each slot (-1: empty)
    n_tokens: int

    def tokens_args(self) -> tuple[mx.array, ...]:
        return (*self.rows, self.positions, self.labels, self.weights, self.owner, self.slot_ids)


def collate_slots(
    units: Units, plan: MicroBatchPlan, slot_seqs: Sequence[int], n_slots: int, pad_id: int, target_step: int
) -> PrefArrays:
    """Collate ``plan`` and map each trained position to the slot of its sequence in ``slot_seqs``."""
    mb: MicroBatch = collate(units.all, plan, units.index, pad_id, target_step)
    slot = {s: k for k, s in enumerate(slot_seqs)}
    owner = np.repeat(
        np.array([slot[i] for i in mb.example_ids], dtype=np.int32),
        units.index.trained[list(mb.example_ids)],
    )
    owner = np.concatenate([owner, np.full(len(mb.positions) - len(owner), n_slots, np.int32)])
    rows = (mx.array(mb.inputs),) if mb.segments is None else (mx.array(mb.inputs), mx.array(mb.segments))
    seq_ids = np.full(n_slots, -1, dtype=np.int64)
    seq_ids[: len(slot_seqs)] = slot_seqs
    return PrefArrays(
        "plain" if mb.segments is None else "packed",
        rows,
        mx.array(mb.positions),
        mx.array(mb.labels),
        mx.array(mb.weights),
        mx.array(owner),
        mx.arange(n_slots, dtype=mx.int32),
        seq_ids,
        mb.n_tokens,
    )


@dataclass
class UnitArrays:
    """Per-unit arrays of a micro-batch, padded to ``batch_size`` units."""

    slot_a: mx.array  # int32: chosen / the reply
    slot_b: mx.array  # int32: rejected (KTO: = slot_a)
    desirable: mx.array  # float32 1/0 (pairs: 1)
    umask: mx.array  # float32: 1 for a real unit, 0 for padding


def unit_arrays(units: Units, us: Sequence[int], batch_size: int) -> tuple[UnitArrays, list[int]]:
    """Slots: pairs put chosen at 2k and rejected at 2k + 1, KTO reply k at k. Returns the slot sequences."""
    U = batch_size
    a = np.zeros(U, np.int32)
    b = np.zeros(U, np.int32)
    des = np.zeros(U, np.float32)
    um = np.zeros(U, np.float32)
    slot_seqs: list[int] = []
    for k, u in enumerate(us):
        sq = units.seqs_of(u)
        if len(sq) == 2:
            a[k], b[k] = 2 * k, 2 * k + 1
            des[k] = 1.0
        else:
            a[k] = b[k] = k
            des[k] = float(units.labels[sq[0]] == 1)
        um[k] = 1.0
        slot_seqs += list(sq)
    return UnitArrays(mx.array(a), mx.array(b), mx.array(des), mx.array(um)), slot_seqs


# ---------------------------------------------------------------- reference: adapters off
@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The base model: every LoRA/DoRA layer computes its base linear's output (no copy of the model).

    LoRA: scale 0 (``y + 0 * z``). DoRA: scale 0 and the magnitude ``m`` set to the base weight's row
    norms, so ``(m / ||W||) y = y``. Restored on exit. Works inside a traced (compiled) function too.
    """
    saved: list[tuple[nn.Module, float, Any]] = []
    for _, m in model.named_modules():
        if isinstance(m, DoRALinear):
            saved.append((m, m.scale, m.m))
            m.m = mx.linalg.norm(m._dequantized_weight().astype(mx.float32), axis=1)
            m.scale = 0.0
        elif isinstance(m, LoRALinear):
            saved.append((m, m.scale, None))
            m.scale = 0.0
    try:
        yield
    finally:
        for m, scale, mag in saved:
            m.scale = scale
            if mag is not None:
                m.m = mag


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear | DoRALinear) for _, m in model.named_modules())


# ---------------------------------------------------------------- log-probabilities and the loss
def slot_logps(
    model: nn.Module,
    split: ModelSplit,
    rows: Sequence[mx.array],
    positions: mx.array,
    labels: mx.array,
    weights: mx.array,
    owner: mx.array,
    slot_ids: mx.array,
    fast_math: bool = False,
) -> tuple[mx.array, mx.array]:
    """(sum of log p of each slot's trained tokens, trained tokens per slot), both (S,) float32."""
    segments = rows[1] if len(rows) > 1 else None
    ce = token_ce(model, split, rows[0], segments, positions, labels, None, fast_math)
    onehot = (owner[:, None] == slot_ids[None, :]).astype(mx.float32)
    return -((ce * weights) @ onehot), weights @ onehot


def reduce_logps(sums: mx.array, counts: mx.array, mean: bool) -> mx.array:
    return sums / mx.maximum(counts, 1.0) if mean else sums


def preference_aux(
    opts: PreferenceOptions,
    sums: mx.array,
    counts: mx.array,
    ua: UnitArrays | tuple[mx.array, ...],
    ref_a: mx.array,
    ref_b: mx.array,
    kl: mx.array,
    norm_units: mx.array,
    norm_tokens: mx.array,
) -> tuple[mx.array, mx.array]:
    """(scalar to differentiate, aux sums in :data:`AUX` order) of one micro-batch.

    ``sums``/``counts``: per-slot log-probability sums and token counts under the policy; ``ref_*``: the
    reference's per-unit log-probabilities (reduced like the policy's). Units are averaged over
    ``norm_units`` (the step's units); ORPO's NLL over ``norm_tokens`` (the step's chosen tokens).
    """
    slot_a, slot_b, des, um = (
        (ua.slot_a, ua.slot_b, ua.desirable, ua.umask) if isinstance(ua, UnitArrays) else ua
    )
    lp = reduce_logps(sums, counts, opts.mean_logps)
    pa = lp[slot_a]
    zero = mx.array(0.0)
    nll = nll_tok = zero
    if opts.objective == "kto":
        losses, rw = kto_terms(pa, ref_a, des, kl, opts)
        rc_sum, nc = (rw * des * um).sum(), (des * um).sum()
        rr_sum, nr = (rw * (1 - des) * um).sum(), ((1 - des) * um).sum()
        correct = (mx.where(des > 0, rw > 0, rw < 0).astype(mx.float32) * um).sum()
        margin = zero
        lpc, lpr = (mx.stop_gradient(pa) * des * um).sum(), (mx.stop_gradient(pa) * (1 - des) * um).sum()
    else:
        pb = lp[slot_b]
        if opts.objective == "dpo":
            losses, rc, rr = dpo_terms(pa, pb, ref_a, ref_b, opts)
        else:
            losses, rc, rr = orpo_terms(pa, pb, opts)
            nll = -(sums[slot_a] * um).sum()
            nll_tok = (counts[slot_a] * um).sum()
        rc_sum, rr_sum = (rc * um).sum(), (rr * um).sum()
        nc = nr = um.sum()
        correct = ((rc > rr).astype(mx.float32) * um).sum()
        margin = ((rc - rr) * um).sum()
        lpc, lpr = (mx.stop_gradient(pa) * um).sum(), (mx.stop_gradient(pb) * um).sum()
    loss_sum = (losses * um).sum()
    objective = loss_sum / norm_units
    if opts.objective == "orpo":
        objective = objective + nll / norm_tokens
    aux = mx.stack(
        [
            loss_sum,
            um.sum(),
            rc_sum,
            nc,
            rr_sum,
            nr,
            correct,
            margin,
            mx.stop_gradient(nll),
            nll_tok,
            lpc,
            lpr,
            mx.stop_gradient(kl) * um.sum(),
        ]
    )
    assert aux.shape[0] == len(AUX)
    return objective, aux


# ---------------------------------------------------------------- compiled steps
def _n_rows(kind: str) -> int:
    return 2 if kind == "packed" else 1


class PreferenceSteps:
    """Plans, compiled passes and the step/evaluation of a preference objective (the trainer's runner).

    Per step: (KTO) the mismatched sequences' log-ratio under policy and reference over the whole step
    gives z0; then per micro-batch the reference pass (adapters off, no gradient; or the cache) and one
    compiled gradient pass over both sides of every pair; gradients add up across micro-batches.
    """

    def __init__(
        self,
        model: nn.Module,
        split: ModelSplit,
        popts: PreferenceOptions,
        bopts: BatchOptions,
        train_data: PreferenceData,
        val_data: PreferenceData | None,
        *,
        reference: ReferenceMode = "adapters_off",
        ref_cache: np.ndarray | None = None,
        compile: bool = True,
        fast_math: bool = False,
        pad_id: int = 0,
        eval_limit: int | None = None,
    ):
        self.model, self.split, self.popts, self.bopts = model, split, popts, bopts
        self.pad_id, self.fast_math = pad_id, fast_math
        self.units = Units(train_data, popts, bopts.max_seq_length, bopts.seed)
        self.val_units = None
        self.val_plans: list[PrefStep] | None = None
        if val_data is not None and len(val_data):
            vu = Units(val_data, popts, bopts.max_seq_length, bopts.seed)
            if len(vu.usable):
                self.val_units = vu
                self.val_plans = plan_units(vu, bopts, 0, shuffle=False, limit=eval_limit)
        if popts.needs_reference and reference == "adapters_off" and not has_adapters(model):
            raise FtError(
                ErrorCode.CONFIG_INVALID,
                "the reference model 'adapters_off' needs LoRA, DoRA or QLoRA adapters",
                "full fine-tuning uses a cached reference (preference.reference: cached)",
            )
        if popts.needs_reference and reference == "cached" and ref_cache is None:
            raise ValueError("reference 'cached' needs ref_cache (see compute_reference)")
        self.reference = reference if popts.needs_reference else None
        self.ref_cache = ref_cache
        self.val_ref_cache: np.ndarray | None = None
        self._plans: dict[int, list[PrefStep]] = {}

        def policy(*args):
            n = len(args) - 5
            return slot_logps(model, split, args[:n], *args[n:], fast_math=fast_math)  # type: ignore[misc]

        def ref(*args):
            with adapters_off(model):
                return policy(*args)

        def loss(model_: nn.Module, *args):
            toks, units, tail = args[:-9], args[-9:-5], args[-5:]
            sums, counts = policy(*toks)
            return preference_aux(popts, sums, counts, tuple(units), *tail)

        loss_and_grad = nn.value_and_grad(model, loss)

        def grad(*args):
            (_, aux), grads = loss_and_grad(model, *args)
            return aux, grads

        def evaluate(*args):
            return loss(model, *args)[1]

        fns = {"policy": policy, "ref": ref, "grad": grad, "eval": evaluate}
        if compile:
            st = [model.state, mx.random.state]
            fns = {
                "policy": mx.compile(policy, inputs=[model.state]),
                "ref": mx.compile(ref, inputs=[model.state]),
                "grad": mx.compile(grad, inputs=st, outputs=st),
                "eval": mx.compile(evaluate, inputs=[model.state]),
            }
        self._fns = fns

    # ------------------------------------------------------------ plans
    def plans_for(self, epoch: int) -> list[PrefStep]:
        if epoch not in self._plans:
            self._plans.clear()
            self._plans[epoch] = plan_units(self.units, self.bopts, epoch)
        return self._plans[epoch]

    def record_ids(self, sp: PrefStep) -> list[int]:
        return [r for u in sp.examples for r in self.units.record_ids(u)]

    # ------------------------------------------------------------ passes
    def _collate(self, units: Units, micro: PrefMicro) -> tuple[PrefArrays, UnitArrays]:
        ua, slot_seqs = unit_arrays(units, micro.units, self.bopts.batch_size)
        S = self.bopts.batch_size * (2 if units.pairs is not None else 1)
        pa = collate_slots(units, micro.plan, slot_seqs, S, self.pad_id, self.bopts.target_step)
        return pa, ua

    def _ref_slots(self, pa: PrefArrays, units: Units, cache: np.ndarray | None) -> mx.array:
        """Reference log-probabilities per slot (reduced like the policy's)."""
        if self.reference == "adapters_off":
            was = self.model.training
            self.model.eval()
            try:
                sums, counts = self._fns["ref"](*pa.tokens_args())
            finally:
                self.model.train(was)
            return reduce_logps(sums, counts, self.popts.mean_logps)
        if self.reference is None or cache is None:
            return mx.zeros(pa.slot_ids.shape, mx.float32)
        ids = pa.seq_ids
        vals = np.zeros(len(ids), np.float64)
        real = ids >= 0
        vals[real] = cache[ids[real]]
        if self.popts.mean_logps:
            vals[real] /= np.maximum(units.index.trained[ids[real]], 1)
        return mx.array(vals.astype(np.float32))

    def _kl(self, units: Units, sp: PrefStep, cache: np.ndarray | None) -> mx.array:
        """KTO's z0 over the whole step: mean log-ratio of the mismatched sequences, clamped at 0."""
        pol_all, ref_all, mask_all = [], [], []
        U = self.bopts.batch_size
        was = self.model.training
        for micro in sp.micro_batches:
            assert micro.kl_plan is not None
            kl_seqs = [units.kl_of(u) for u in micro.units]
            pa = collate_slots(units, micro.kl_plan, kl_seqs, U, self.pad_id, self.bopts.target_step)
            self.model.eval()
            try:
                sums, counts = self._fns["policy"](*pa.tokens_args())
            finally:
                self.model.train(was)
            pol_all.append(sums)
            ref_all.append(self._ref_slots(pa, units, cache))
            m = np.zeros(U, np.float32)
            m[: len(micro.units)] = 1.0
            mask_all.append(mx.array(m))
        return kto_kl(mx.concatenate(pol_all), mx.concatenate(ref_all), mx.concatenate(mask_all))

    def _norms(self, units: Units, sp: PrefStep) -> tuple[mx.array, mx.array]:
        n_units = float(len(sp.examples))
        chosen_tok = float(sum(units.index.trained[units.seqs_of(u)[0]] for u in sp.examples))
        return mx.array(n_units), mx.array(max(chosen_tok, 1.0))

    def _args(
        self, units: Units, micro: PrefMicro, kl: mx.array, norms: tuple[mx.array, mx.array], cache: Any
    ) -> tuple[str, tuple[mx.array, ...], int]:
        pa, ua = self._collate(units, micro)
        ref = self._ref_slots(pa, units, cache)
        tail = (ref[ua.slot_a], ref[ua.slot_b], kl, *norms)
        units_arr = (ua.slot_a, ua.slot_b, ua.desirable, ua.umask)
        return pa.kind, (*pa.tokens_args(), *units_arr, *tail), pa.n_tokens

    def step(
        self, sp: PrefStep, seeds: Sequence[int], dp: DataParallel | None = None
    ) -> tuple[mx.array, Any, mx.array, int]:
        """One optimizer step's gradient: (objective, summed grads, summed aux, real input positions).

        With ``dp``, this rank computes its share of the micro-batches and the sums are all-reduced (KTO's
        KL estimate covers the whole step on every rank: it is a forward pass without gradients)."""
        units = self.units
        kl = self._kl(units, sp, self.ref_cache) if self.popts.objective == "kto" else mx.array(0.0)
        norms = self._norms(units, sp)
        acc: Any = None
        aux_sum = mx.zeros(len(AUX))
        n_tok = 0
        mine = dp.mine(len(sp.micro_batches)) if dp is not None else range(len(sp.micro_batches))
        for j, k in enumerate(mine):
            _, args, nt = self._args(units, sp.micro_batches[k], kl, norms, self.ref_cache)
            mx.random.seed(seeds[k])
            aux, grads = self._fns["grad"](*args)
            acc = grads if acc is None else _tree_add(acc, grads)
            aux_sum = aux_sum + aux
            n_tok += nt
            if j + 1 < len(mine):
                mx.eval(acc, aux_sum)
        if dp is not None:
            acc, _, n_tok, reduced = dp.reduce_step(
                acc, mx.array(0.0), n_tok, aux_sum, like=self.model.trainable_parameters()
            )
            aux_sum = reduced if reduced is not None else aux_sum
        return self.objective(aux_sum, norms), acc, aux_sum, n_tok

    def objective(self, aux: mx.array, norms: tuple[mx.array, mx.array]) -> mx.array:
        i = AUX.index
        out = aux[i("loss")] / norms[0]
        if self.popts.objective == "orpo":
            out = out + aux[i("nll")] / norms[1]
        return out

    def evaluate(self, dp: DataParallel | None = None) -> tuple[float, int, int, np.ndarray] | None:
        """Validation: (mean objective, trained tokens, units, summed aux) with no gradient (``dp``: each
        rank scores its share of the validation steps and the totals are summed)."""
        if self.val_units is None or self.val_plans is None:
            return None
        units = self.val_units
        was = self.model.training
        total = np.zeros(len(AUX))
        obj_num = 0.0
        n_units = 0
        n_trained = 0
        plans = (
            [self.val_plans[k] for k in dp.mine(len(self.val_plans))] if dp is not None else self.val_plans
        )
        for sp in plans:
            kl = self._kl(units, sp, self.val_ref_cache) if self.popts.objective == "kto" else mx.array(0.0)
            one = (mx.array(1.0), mx.array(1.0))
            aux_step = mx.zeros(len(AUX))
            for micro in sp.micro_batches:
                _, args, _ = self._args(units, micro, kl, one, self.val_ref_cache)
                self.model.eval()
                try:
                    aux_step = aux_step + self._fns["eval"](*args)
                finally:
                    self.model.train(was)
            a = np.array(aux_step, dtype=np.float64)
            total += a
            n_units += len(sp.examples)
            n_trained += int(sum(units.trained(u) for u in sp.examples))
            obj_num += a[AUX.index("loss")]
        if dp is not None:
            sums = dp.sum_floats([*total, obj_num, n_units, n_trained])
            total, (obj_num, n_units_f, n_trained_f) = np.array(sums[: len(AUX)]), sums[len(AUX) :]
            n_units, n_trained = round(n_units_f), round(n_trained_f)
        loss = obj_num / max(n_units, 1)
        if self.popts.objective == "orpo":
            loss += total[AUX.index("nll")] / max(total[AUX.index("nll_tokens")], 1.0)
        return float(loss), n_trained, n_units, total

    def step_loss(self, aux: np.ndarray, sp: PrefStep) -> float:
        n = len(sp.examples)
        loss = float(aux[AUX.index("loss")]) / max(n, 1)
        if self.popts.objective == "orpo":
            loss += float(aux[AUX.index("nll")]) / max(float(aux[AUX.index("nll_tokens")]), 1.0)
        return loss

    def trained_tokens(self, sp: PrefStep) -> int:
        return int(sum(self.units.trained(u) for u in sp.examples))


def _tree_add(a: Any, b: Any) -> Any:
    from mlx.utils import tree_map

    return tree_map(mx.add, a, b)


def compute_reference(
    model: nn.Module,
    split: ModelSplit,
    units: Units,
    bopts: BatchOptions,
    *,
    compile: bool = True,
    fast_math: bool = False,
    pad_id: int = 0,
) -> np.ndarray:
    """Each sequence's summed log-probability under ``model`` as it is now (eval mode): the cached reference.

    Covers every sequence of ``units`` (replies, and KTO's mismatched sequences); unusable ones get NaN.
    """
    idx = units.index
    seqs = np.flatnonzero((idx.positions >= 1) & (idx.trained >= 1))
    out = np.full(len(units.all), np.nan, dtype=np.float64)
    if not len(seqs):
        return out

    def fwd(*args):
        n = len(args) - 5
        return slot_logps(model, split, args[:n], *args[n:], fast_math=fast_math)[0]  # type: ignore[misc]

    f = mx.compile(fwd, inputs=[model.state]) if compile else fwd
    order = seqs[np.argsort(idx.positions[seqs], kind="stable")]
    # Sorted by length, one sequence per row, a fixed number of rows: few distinct shapes to compile (a
    # shape compiled already is reused when that costs less than a compilation).
    S = max(16, 2 * bopts.batch_size)
    opts = dataclasses.replace(bopts, packing=False, batch_size=S)
    penalty = float(S * np.mean(idx.positions[seqs]))
    seen: dict[ShapeKey, int] = {}
    was = model.training
    model.eval()
    try:
        for k in range(0, len(order), S):
            chunk = [int(i) for i in order[k : k + S]]
            plan = _layout(chunk, idx, opts, seen, penalty)
            pa = collate_slots(units, plan, chunk, S, pad_id, bopts.target_step)
            sums = np.array(f(*pa.tokens_args()), dtype=np.float64)
            out[chunk] = sums[: len(chunk)]
    finally:
        model.train(was)
    return out

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
log-probability (a one-hot matmul sums them). KTO replies to the same prompt (a prompt group) are planned
into one micro-batch, where the shared-prompt passes below run that prompt once for all of them.

Reference. ``adapters_off``: for LoRA, DoRA and QLoRA the reference is the same model with its adapters
switched off (LoRA's scale set to 0; DoRA's magnitude set to the base weight's norm), a forward pass
without gradient on the micro-batch's own arrays; no second copy of the model. The reference never
changes, so each sequence's result is kept (a float per sequence, :class:`Units`) the first time it is
computed: later epochs and evaluations reuse it without the pass. ``cached``: each
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
from ft.engine.lora import blocks
from ft.engine.losses import ModelSplit, PrefixCapture, PrefixKV, token_ce
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
        # KTO: units whose prompts are the same (several labelled replies to one prompt, a preference pair's
        # two sides) form a group; the planner keeps a group in one micro-batch, where its prompt runs once.
        self.prompt_group = _prompt_groups(self.all, self.index, n) if self.pairs is None else None
        # The reference (adapters off) never changes: each sequence's (log-prob sum, trained-token count)
        # under it is kept the first time a pass computes it (NaN: not yet) and reused by later epochs
        # and evaluations instead of another forward pass.
        self.ref_sums = np.full(len(self.all), np.nan, dtype=np.float32)
        self.ref_counts = np.zeros(len(self.all), dtype=np.float32)

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


def _prompt_groups(seqs: TokenizedExamples, index: ExampleIndex, n: int) -> np.ndarray:
    """Group id per reply ``0..n-1`` (numbered by first appearance): the same prompt tokens (inputs before
    the first trained prediction), the same group."""
    assert index.first_pred is not None
    ids: dict[bytes, int] = {}
    out = np.empty(n, np.int64)
    for i in range(n):
        prompt = np.asarray(seqs.tokens(i))[: int(index.first_pred[i])].astype(np.int32)
        out[i] = ids.setdefault(prompt.tobytes(), len(ids))
    return out


def _group_ids(units: Units, usable: np.ndarray) -> np.ndarray:
    """Group of each usable unit, numbered 0.. by first appearance (prompt groups for KTO; otherwise
    every unit its own group, which leaves the planner's order exactly as without groups)."""
    if units.prompt_group is None:
        return np.arange(len(usable), dtype=np.int64)
    _, first, inverse = np.unique(units.prompt_group[usable], return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first, kind="stable"), kind="stable")[inverse]


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
    # Units of one prompt group stay next to each other (shuffled and sorted as one, by its longest unit).
    group = _group_ids(units, usable)
    longest = np.zeros(int(group.max()) + 1 if len(group) else 0, np.int64)
    np.maximum.at(longest, group, size)
    if shuffle:
        rng = np.random.default_rng([opts.seed, epoch])
        rank = np.empty(len(longest), np.int64)
        rank[rng.permutation(len(longest))] = np.arange(len(longest))
        perm = np.argsort(rank[group], kind="stable")
        order, key = usable[perm], longest[group[perm]]
        window = max(1, opts.group_window) * E
        groups: list[np.ndarray] = []
        for w in range(0, len(order), window):  # similar lengths inside a window pack tighter
            chunk, ck = order[w : w + window], key[w : w + window]
            chunk = chunk[np.argsort(ck, kind="stable")]
            groups += [chunk[k : k + E] for k in range(0, len(chunk), E)]
        steps = [groups[j] for j in rng.permutation(len(groups))]
    else:
        order = usable[np.lexsort((group, longest[group]))]
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


# ---------------------------------------------------------------- KTO: a reply and its KL sequence share a prompt
class _ContextCapture(PrefixCapture):
    """Cache stand-in for the prompts' pass: left-padded rows under ``mask``; keys and values kept."""

    def __init__(self, mask: mx.array):
        super().__init__()
        self.mask = mask

    def make_mask(self, *args: Any, **kwargs: Any) -> mx.array:
        return self.mask


class _AfterContext(PrefixKV):
    """Cache stand-in for continuation rows: row ``r`` attends to the real tokens of prompt row
    ``row_of[r]`` and then causally to itself (``mask``); RoPE continues after the left-padded prompt row,
    so every distance between two tokens is the one they have in the whole sequence."""

    def __init__(self, capture: _ContextCapture, mask: mx.array, row_of: mx.array):
        assert capture.keys is not None and capture.values is not None
        # Several continuations share a prompt row: each takes that row's keys and values (a gather; its
        # gradient adds the rows' contributions back into the one prompt computation).
        self.pk, self.pv = capture.keys[row_of], capture.values[row_of]
        self.offset = capture.keys.shape[2]
        self.mask = mask

    def make_mask(self, *args: Any, **kwargs: Any) -> mx.array:
        return self.mask


@dataclass
class SharedContext:
    """KTO units as their prompts, each distinct prompt run once (left-padded rows ``(G, P)``), and two
    continuations of each unit: row ``k`` the reply of unit ``k``, row ``U + k`` its mismatched reply
    (slots in the same order), both after prompt row ``row_of[k]``. Units whose prompts are the same
    (replies sampled or labelled for one prompt, both sides of a preference pair) share a prompt row."""

    seq_ids: np.ndarray  # (2U,) the sequence of each continuation row (-1: empty)
    arrays: tuple[mx.array, ...]  # the arguments of shared_context_logps after (model, split)
    prompt_rows: int = 0  # G: distinct prompts (rows of the prompts' pass, before padding to the ladder)

    N_ARRAYS = 10


def prompt_row_count(g: int, n_slots: int) -> int:
    """Prompt rows of a micro-batch with ``g`` distinct prompts: a power of two (few compiled shapes), at
    most the batch size."""
    return min(n_slots, 1 << max(0, (g - 1).bit_length()))


def _round_up(x: int, step: int) -> int:
    return max(step, -(-x // step) * step)


def shared_context(
    units: Units, us: Sequence[int], n_slots: int, pad_id: int, step: int = 16
) -> SharedContext:
    """The arrays of :func:`shared_context_logps` for the KTO units ``us`` (``n_slots``: the batch size).

    The prompt is what both sequences of a unit have before the first trained prediction (inputs
    ``[0, c)``); each continuation holds inputs ``[c, positions)`` and predicts the trained labels. Units
    with the same prompt tokens share one prompt row."""
    U, idx = n_slots, units.index
    assert idx.first_pred is not None
    ctx: list[np.ndarray] = []
    ctx_of: dict[tuple[int, int], int] = {}
    row_of = np.zeros(U, np.int32)
    conts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    seq_ids = np.full(2 * U, -1, np.int64)
    for k, u in enumerate(us):
        r, kl = int(u), units.kl_of(u)
        t_r, t_kl = np.asarray(units.all.tokens(r)), np.asarray(units.all.tokens(kl))
        c = int(min(idx.first_pred[r], idx.first_pred[kl]))
        if not np.array_equal(t_r[:c], t_kl[:c]):
            c = 0
        # The same prompt group and cut: the same prompt tokens (the group's own definition).
        key = (int(units.prompt_group[r]) if units.prompt_group is not None else r, c)
        if key not in ctx_of:
            ctx_of[key] = len(ctx)
            ctx.append(t_r[:c].astype(np.int32))
        row_of[k] = ctx_of[key]
        for row, i, t in ((k, r, t_r), (U + k, kl, t_kl)):
            p = int(idx.positions[i])
            m = np.asarray(units.all.mask(i), bool)[c + 1 : p + 1]
            conts.append((row, t[c:p].astype(np.int32), t[c + 1 : p + 1].astype(np.int32), m))
            seq_ids[row] = i
    G = prompt_row_count(len(ctx), U)
    P = _round_up(max((len(x) for x in ctx), default=0), step)
    C = _round_up(max(len(x[1]) for x in conts), step // 2)
    ctx_in = np.full((G, P), pad_id, np.int32)
    ctx_ok = np.zeros((G, P), bool)
    for g, x in enumerate(ctx):
        if len(x):
            ctx_in[g, P - len(x) :], ctx_ok[g, P - len(x) :] = x, True
    # A padding query sees itself only (no empty softmax); a real one its real keys up to itself.
    tri = np.tril(np.ones((P, P), bool))
    ctx_mask = (tri[None] & (ctx_ok[:, None, :] | np.eye(P, dtype=bool)[None]))[:, None]
    cont_mask = np.concatenate(
        [
            np.broadcast_to(ctx_ok[row_of][:, None, :], (U, C, P)),
            np.broadcast_to(np.tril(np.ones((C, C), bool)), (U, C, C)),
        ],
        axis=2,
    )[:, None]
    cont_in = np.full((2, U, C), pad_id, np.int32)  # [0]: the replies, [1]: the mismatched replies
    pos: list[list[np.ndarray]] = [[], []]
    lab: list[list[np.ndarray]] = [[], []]
    own: list[list[np.ndarray]] = [[], []]
    for row, inp, labels, m in conts:
        h, r = divmod(row, U)
        cont_in[h, r, : len(inp)] = inp
        hits = np.flatnonzero(m)
        pos[h].append(r * C + hits)
        lab[h].append(labels[hits])
        own[h].append(np.full(len(hits), r, np.int32))
    n = [sum(len(x) for x in pos[h]) for h in (0, 1)]
    K = _round_up(max(n), step)
    positions = np.stack([np.concatenate([*pos[h], np.zeros(K - n[h], np.int64)]) for h in (0, 1)])
    labels_all = np.stack([np.concatenate([*lab[h], np.zeros(K - n[h], np.int32)]) for h in (0, 1)])
    weights = np.stack([np.concatenate([np.ones(n[h]), np.zeros(K - n[h])]) for h in (0, 1)])
    owner = np.stack([np.concatenate([*own[h], np.full(K - n[h], U, np.int32)]) for h in (0, 1)])
    arrays = (
        mx.array(ctx_in),
        mx.array(ctx_mask),
        mx.array(row_of),
        mx.array(cont_in),
        mx.array(cont_mask),
        mx.array(positions.astype(np.int32)),
        mx.array(labels_all.astype(np.int32)),
        mx.array(weights.astype(np.float32)),
        mx.array(owner.astype(np.int32)),
        mx.arange(U, dtype=mx.int32),
    )
    return SharedContext(seq_ids, arrays, len(ctx))


def shared_context_logps(
    model: nn.Module,
    split: ModelSplit,
    *arrays: mx.array,
    fast_math: bool = False,
    detach_second: bool = False,
) -> tuple[mx.array, mx.array]:
    """:func:`slot_logps` of a :class:`SharedContext` (slots: the replies, then the mismatched replies):
    each prompt runs once and its keys and values serve both continuations, run as two calls so that
    ``detach_second`` (the mismatched replies behind a stop-gradient) leaves them out of a gradient pass.
    Needs the body/head split and the cache protocol (``split.prefix``)."""
    ctx_in, ctx_mask, row_of, cont_in, cont_mask, positions, labels, weights, owner, slot_ids = arrays
    assert split.body is not None
    caps = [_ContextCapture(ctx_mask) for _ in range(len(blocks(model)))]
    split.body(ctx_in, caps)  # only the keys and values are used
    sums, counts = [], []
    for h in (0, 1):
        after: list[Any] = [_AfterContext(c, cont_mask, row_of) for c in caps]
        s, c = slot_logps(
            model,
            split,
            (cont_in[h],),
            positions[h],
            labels[h],
            weights[h],
            owner[h],
            slot_ids,
            fast_math,
            after,
        )
        sums.append(mx.stop_gradient(s) if h == 1 and detach_second else s)
        counts.append(c)
    return mx.concatenate(sums), mx.concatenate(counts)


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
    cache: list[Any] | None = None,
) -> tuple[mx.array, mx.array]:
    """(sum of log p of each slot's trained tokens, trained tokens per slot), both (S,) float32."""
    segments = rows[1] if len(rows) > 1 else None
    ce = token_ce(model, split, rows[0], segments, positions, labels, None, fast_math, cache)
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
    KTO with adapters off: the reference of a reply and its mismatched sequence in one pass over their
    shared prompt, kept per sequence (:meth:`_fill_reference`); a one-micro-batch step without dropout
    computes z0's policy pass inside its gradient pass (:meth:`_step_kto_shared`).
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

        def ref_shared(*args):
            with adapters_off(model):
                return shared_context_logps(model, split, *args, fast_math=fast_math)

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

        def loss_kto_shared(model_: nn.Module, *args):
            # KTO, one micro-batch per step: the policy runs each prompt once for its reply (gradient) and
            # its mismatched reply (log-probabilities behind a stop-gradient, for z0).
            k = SharedContext.N_ARRAYS
            ctx, units_arr, (ref_a, ref_b, ref_kl, n_units, n_tokens) = (
                args[:k],
                args[k : k + 4],
                args[k + 4 :],
            )
            sums, counts = shared_context_logps(model, split, *ctx, fast_math=fast_math, detach_second=True)
            U = ref_kl.shape[0]
            kl = kto_kl(sums[U:], ref_kl, units_arr[3])
            return preference_aux(popts, sums, counts, tuple(units_arr), ref_a, ref_b, kl, n_units, n_tokens)

        kto_shared_and_grad = nn.value_and_grad(model, loss_kto_shared)

        def grad_kto_shared(*args):
            (_, aux), grads = kto_shared_and_grad(model, *args)
            return aux, grads

        fns = {
            "policy": policy,
            "ref": ref,
            "ref_shared": ref_shared,
            "grad": grad,
            "grad_kto_shared": grad_kto_shared,
            "eval": evaluate,
        }
        if compile:
            st = [model.state, mx.random.state]
            fns = {
                "policy": mx.compile(policy, inputs=[model.state]),
                "ref": mx.compile(ref, inputs=[model.state]),
                "ref_shared": mx.compile(ref_shared, inputs=[model.state]),
                "grad": mx.compile(grad, inputs=st, outputs=st),
                "grad_kto_shared": mx.compile(grad_kto_shared, inputs=st, outputs=st),
                "eval": mx.compile(evaluate, inputs=[model.state]),
            }
        self._fns = fns
        # KTO with adapters off: a reply and its mismatched sequence share their prompt; the reference runs
        # it once for both (when the model splits into body and head and follows the cache protocol).
        self.shared_reference = (
            popts.objective == "kto"
            and self.reference == "adapters_off"
            and split.prefix
            and split.packing  # array masks honoured (the segment-mask check)
            and split.body is not None
            and split.head is not None
        )
        # Without dropout the policy's pass over the mismatched sequences (eval mode) can join the gradient
        # pass of a one-micro-batch step: the same prompts' keys and values serve both.
        self.fused_kl = self.shared_reference and not any(
            isinstance(m, nn.Dropout) and m._p_1 < 1.0 for _, m in model.named_modules()
        )

    def keep(self, saved: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        """The reference values this run keeps (adapters off: each sequence's log-probability sum and
        token count, NaN until computed), as live arrays for checkpoints, after putting back ``saved`` (a
        checkpoint's) where it has the same sequences. None when nothing is kept."""
        if self.reference != "adapters_off":
            return None
        live = {"train_sums": self.units.ref_sums, "train_counts": self.units.ref_counts}
        if self.val_units is not None:
            live |= {"val_sums": self.val_units.ref_sums, "val_counts": self.val_units.ref_counts}
        for name, arr in (saved or {}).items():
            if name in live and live[name].shape == np.shape(arr):
                np.copyto(live[name], np.asarray(arr, dtype=live[name].dtype))
        return live

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
            ids = pa.seq_ids
            real = ids >= 0
            if np.isnan(units.ref_sums[ids[real]]).any():  # a sequence seen for the first time: one pass
                was = self.model.training
                self.model.eval()
                try:
                    sums_a, counts_a = self._fns["ref"](*pa.tokens_args())
                finally:
                    self.model.train(was)
                sums_np, counts_np = np.array(sums_a), np.array(counts_a)
                units.ref_sums[ids[real]] = sums_np[real]
                units.ref_counts[ids[real]] = counts_np[real]
            else:
                sums_np = np.zeros(len(ids), np.float32)
                counts_np = np.zeros(len(ids), np.float32)
                sums_np[real], counts_np[real] = units.ref_sums[ids[real]], units.ref_counts[ids[real]]
            return reduce_logps(mx.array(sums_np), mx.array(counts_np), self.popts.mean_logps)
        if self.reference is None or cache is None:
            return mx.zeros(pa.slot_ids.shape, mx.float32)
        ids = pa.seq_ids
        vals = np.zeros(len(ids), np.float64)
        real = ids >= 0
        vals[real] = cache[ids[real]]
        if self.popts.mean_logps:
            vals[real] /= np.maximum(units.index.trained[ids[real]], 1)
        return mx.array(vals.astype(np.float32))

    def _fill_reference(self, units: Units, sp: PrefStep, given: SharedContext | None = None) -> None:
        """KTO, adapters off: the reference of every reply and mismatched sequence of the step that is not
        kept yet, one pass per micro-batch with each prompt run once (:func:`shared_context`; ``given``:
        the one micro-batch's, already built)."""
        U = self.bopts.batch_size
        for micro in sp.micro_batches:
            seqs = [s for u in micro.units for s in (int(u), units.kl_of(u))]
            if not np.isnan(units.ref_sums[seqs]).any():
                continue
            sc = given or shared_context(units, micro.units, U, self.pad_id)
            was = self.model.training
            self.model.eval()
            try:
                sums, counts = self._fns["ref_shared"](*sc.arrays)
            finally:
                self.model.train(was)
            real = sc.seq_ids >= 0
            units.ref_sums[sc.seq_ids[real]] = np.array(sums)[real]
            units.ref_counts[sc.seq_ids[real]] = np.array(counts)[real]

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
        if self.fused_kl and dp is None and len(sp.micro_batches) == 1:
            return self._step_kto_shared(sp, seeds)
        if self.shared_reference:
            self._fill_reference(units, sp)
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

    def _step_kto_shared(self, sp: PrefStep, seeds: Sequence[int]) -> tuple[mx.array, Any, mx.array, int]:
        """:meth:`step` of KTO with one micro-batch: the reference (kept, or one pass) and one gradient pass
        in which every prompt runs once for its reply and its mismatched sequence."""
        units, micro = self.units, sp.micro_batches[0]
        U = self.bopts.batch_size
        sc = shared_context(units, micro.units, U, self.pad_id)
        self._fill_reference(units, sp, sc)
        ua, _ = unit_arrays(units, micro.units, U)
        real = sc.seq_ids >= 0
        ref = np.zeros(2 * U, np.float32)
        ref[real] = units.ref_sums[sc.seq_ids[real]]
        norms = self._norms(units, sp)
        mx.random.seed(seeds[0])
        aux, grads = self._fns["grad_kto_shared"](
            *sc.arrays,
            ua.slot_a,
            ua.slot_b,
            ua.desirable,
            ua.umask,
            mx.array(ref[:U]),
            mx.array(ref[:U]),
            mx.array(ref[U:]),
            *norms,
        )
        n_tok = int(sum(units.positions(u) for u in micro.units))
        return self.objective(aux, norms), grads, aux, n_tok

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
            if self.shared_reference:
                self._fill_reference(units, sp)
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

"""Batches that waste little compute: length grouping, packing and bucketed shapes.

The data layer hands the engine tokenized examples through :class:`TokenizedExamples` (a Protocol the
prepared splits of ``ft.data.store`` satisfy structurally). An example of ``n`` tokens occupies
``n - 1`` input positions: position ``j`` holds token ``j`` and predicts token ``j + 1``, which is
trained when ``mask[j + 1]`` is true.

Every optimizer step sees exactly ``batch_size x grad_accumulation_steps`` examples (the last step
of an epoch may see fewer). How they are laid out is free, because the gradient is the token-weighted
mean over the whole step whatever the micro-batch boundaries are. So for each step the planner
packs the examples into rows of one length ``R`` (first-fit decreasing), choosing ``R`` from a
ladder of bucket sizes to minimise estimated compute (padding and attention both cost), and cuts
the rows into micro-batches of at most ``batch_size`` times the split's longest example's positions
(never more memory than a trainer padding ``batch_size`` examples to the longest). Examples sharing a
row are kept apart by segment ids (a block-diagonal causal mask, see :mod:`ft.engine.losses`). A step whose few longest examples are much
longer than the rest may instead give them micro-batches of their own, so short examples neither pad
to nor attend over a long row. Shapes come from a ladder, so the compiled step is traced for a few
shapes rather than for every new length: on a CPU a fine one (8 sizes per doubling, little padding);
on a GPU a coarse one (powers of two from 256), because there a new shape can also mean new
JIT-compiled kernels, and a step of fewer than ~2,000 positions costs about the same whatever its
padding (measured on an H200; docs/benchmarks.md).

Plans are pure functions of (lengths, options, seed, epoch): a resumed run recomputes the same
plan and skips to its position.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ft.errors import ErrorCode, FtError


@runtime_checkable
class TokenizedExamples(Protocol):
    """Tokenized examples as the data layer stores them (``ft.data.store.PreparedSplit``)."""

    lengths: np.ndarray  # int64, tokens per example
    record_ids: np.ndarray  # int64, where each example came from (for error reports)

    def __len__(self) -> int: ...

    def tokens(self, i: int) -> np.ndarray:
        """int32 token ids of example ``i``."""
        ...

    def mask(self, i: int) -> np.ndarray:
        """bool per token of example ``i``: True = the token is a training target."""
        ...


class ArrayExamples:
    """In-memory :class:`TokenizedExamples` (tests, benchmarks, generated data)."""

    def __init__(
        self,
        tokens: Sequence[Sequence[int]],
        masks: Sequence[Sequence[bool] | np.ndarray] | None = None,
        record_ids: Sequence[int] | None = None,
    ):
        self._tokens = [np.asarray(t, dtype=np.int32) for t in tokens]
        if masks is None:  # train on every token but the first
            masks = [np.arange(len(t)) > 0 for t in self._tokens]
        self._masks = [np.asarray(m, dtype=np.bool_) for m in masks]
        if any(len(t) != len(m) for t, m in zip(self._tokens, self._masks, strict=True)):
            raise ValueError("every mask must have the length of its tokens")
        self.lengths = np.array([len(t) for t in self._tokens], dtype=np.int64)
        self.record_ids = np.asarray(
            record_ids if record_ids is not None else range(len(self._tokens)), np.int64
        )

    def __len__(self) -> int:
        return len(self._tokens)

    def tokens(self, i: int) -> np.ndarray:
        return self._tokens[i]

    def mask(self, i: int) -> np.ndarray:
        return self._masks[i]


def bucket(n: int, min_step: int = 16) -> int:
    """Round ``n`` up to the shape ladder: steps of 1/8 of the power of two below (at least ``min_step``).

    16, 32, ..., 128, 144, ..., 256, 288, ..., 512, 576, ...: at most ~12% padding, and 8 shapes per
    doubling of length.
    """
    if n <= min_step:
        return min_step
    step = max(min_step, (1 << (int(n - 1).bit_length() - 1)) // 8)
    return ((n + step - 1) // step) * step


def target_bucket(k: int, min_size: int = 32) -> int:
    """Round a count of trained positions up to 2^n or 1.5 x 2^n (at least ``min_size``).

    Coarser than :func:`bucket`: a padded target costs only a row of the LM head, while every new
    shape costs a trace and compile of the whole step.
    """
    size = min_size
    while size < k:
        size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
    return size


COARSE_MIN_ROW = 256
COARSE_PREFIX_STEP = 128


def pow2_bucket(n: int, lo: int) -> int:
    """The smallest power of two >= max(n, lo) (``lo`` a power of two)."""
    size = lo
    while size < n:
        size *= 2
    return size


def ladder(lo: int, hi: int, min_step: int = 16) -> list[int]:
    """Bucket sizes from bucket(lo) up to bucket(hi), inclusive."""
    out, r = [], bucket(lo, min_step)
    top = bucket(hi, min_step)
    while r <= top:
        out.append(r)
        r = bucket(r + 1, min_step)
    return out


def attention_cost(config: Mapping[str, Any]) -> float:
    """:attr:`BatchOptions.attention_cost` of a model (its config.json): about 2 d / params per layer."""
    d = int(config.get("hidden_size") or 0)
    inter = int(config.get("intermediate_size") or 4 * d)
    if not d:
        return 3e-4
    heads = int(config.get("num_attention_heads") or 1)
    kv = int(config.get("num_key_value_heads") or heads)
    per_layer = 2 * d * d + 2 * d * d * kv // heads + 3 * d * inter
    return 2.0 * d / per_layer


@dataclass(frozen=True)
class BatchOptions:
    batch_size: int
    grad_accumulation_steps: int = 1
    max_seq_length: int = 2048
    packing: bool | None = None
    """True: packed rows only (rows of one length holding as many examples as fit, never the shared-prefix
    layout); False: one example per row (padding to the bucket); None: the cheapest layout per step."""
    shuffle: bool = True
    seed: int = 0
    attention_cost: float = 3e-4
    """Cost of one attended position relative to the rest of a token's work (about 2 d / params per layer)."""
    group_window: int = 16
    """Steps per window inside which examples are sorted by length (similar lengths pack tighter)."""
    target_step: int = 32
    """Smallest step of the ladder for the count of trained positions (logits are computed only there)."""
    share_prefix: bool = False
    """Run a prompt prefix shared by every example of a micro-batch once (see :func:`shared_prefix`)."""
    target_cost: float = 0.25
    """Cost of one padded trained position (a row of the LM head) relative to a whole position."""
    compile_penalty: float | None = None
    """Cost of a shape not compiled yet, in positions; None = a quarter of an average optimizer step."""
    micro_batch_cost: float | None = None
    """Fixed cost of one more micro-batch (a separate graph evaluation), in positions; None = 2,048 on the
    coarse ladder (an H200 step of fewer positions takes about as long) and 64 on the fine one."""
    coarse_shapes: bool | None = None
    """Row lengths, target counts and shared prefixes from a coarse ladder (powers of two from 256 tokens,
    prefixes in steps of 128). On a GPU a new shape can mean new JIT-compiled kernels (seconds each, the
    first ones a minute); packing fills the longer rows. None = coarse on a GPU, fine on a CPU."""
    longest: int | None = None
    """Input positions of the split's longest example; None = max_seq_length. Bounds :attr:`token_budget`
    (set by :func:`plan_epoch` / :func:`plan_eval` from the examples)."""

    @property
    def coarse(self) -> bool:
        if self.coarse_shapes is not None:
            return self.coarse_shapes
        import mlx.core as mx  # only to ask which device runs the steps

        return mx.default_device().type == mx.DeviceType.gpu

    def row_bucket(self, n: int) -> int:
        """The row length that holds ``n`` positions, on this planner's ladder."""
        return pow2_bucket(n, COARSE_MIN_ROW) if self.coarse else bucket(n)

    def target_size(self, k: int) -> int:
        """The padded count of trained positions for ``k``, on this planner's ladder."""
        return (
            pow2_bucket(k, max(self.target_step, 64)) if self.coarse else target_bucket(k, self.target_step)
        )

    @property
    def mb_cost(self) -> float:
        if self.micro_batch_cost is not None:
            return self.micro_batch_cost
        return 2048.0 if self.coarse else 64.0

    @property
    def prefix_step(self) -> int:
        return COARSE_PREFIX_STEP if self.coarse else PREFIX_STEP

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accumulation_steps

    @property
    def max_row(self) -> int:
        return self.row_bucket(self.max_seq_length)

    @property
    def token_budget(self) -> int:
        """Most positions in one micro-batch: batch_size examples as long as the split's longest, what a
        trainer padding batch_size examples to the longest holds, so packing never needs more memory than it.
        A micro-batch may still hold batch_size rows up to the longest's length on the fine ladder
        (:attr:`full_row`), and always at least one row."""
        return self.batch_size * min(self.max_row, self.longest or self.max_row)

    @property
    def full_row(self) -> int:
        """The longest row of which batch_size fit in a micro-batch whatever the budget: the split's longest
        example on the fine ladder (at most 1/8 padding), so plain rows are never split for their padding."""
        return self.max_row if self.longest is None else min(self.max_row, bucket(self.longest))


@dataclass(frozen=True)
class MicroBatchPlan:
    rows: tuple[tuple[int, ...], ...]  # example indices per row
    length: int  # R: positions per row (after the shared prefix, if any)
    prefix: int = 0  # P: leading tokens every example shares, computed once (one example per row then)
    targets: int = 0  # trained positions the batch is padded to (0 = the ladder's size for its count)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.length)

    @property
    def packed(self) -> bool:
        return any(len(r) > 1 for r in self.rows)


@dataclass(frozen=True)
class StepPlan:
    examples: tuple[int, ...]
    micro_batches: tuple[MicroBatchPlan, ...]


@dataclass
class MicroBatch:
    """One forward/backward pass, as numpy arrays ready for ``mx.array``."""

    inputs: np.ndarray  # (rows, R) int32
    segments: np.ndarray | None  # (rows, R) int32; None = one example per row (plain causal mask)
    positions: np.ndarray  # (K,) int32 flat indices into rows*R whose next token is trained
    labels: np.ndarray  # (K,) int32
    weights: np.ndarray  # (K,) float32, 0 on bucket padding
    n_tokens: int  # real (non-padding) positions
    n_trained: int
    example_ids: tuple[int, ...]
    prefix: np.ndarray | None = None  # (P,) int32 tokens shared by every row, run once before the rows


@dataclass
class PlanStats:
    """How much of the planned compute is real work."""

    steps: int = 0
    micro_batches: int = 0
    examples: int = 0
    real_positions: int = 0  # input positions of the examples
    padded_positions: int = 0  # positions actually computed: the grids, each shared prefix once
    trained_positions: int = 0
    prefix_saved_positions: int = 0  # positions not computed thanks to shared prefixes
    shapes: set[tuple] = field(default_factory=set)

    @property
    def padding_fraction(self) -> float:
        """Share of computed positions that are padding."""
        useful = self.real_positions - self.prefix_saved_positions
        return 1.0 - useful / self.padded_positions if self.padded_positions else 0.0

    def to_json(self) -> dict[str, float | int]:
        return {
            "steps": self.steps,
            "micro_batches": self.micro_batches,
            "examples": self.examples,
            "real_positions": self.real_positions,
            "padded_positions": self.padded_positions,
            "trained_positions": self.trained_positions,
            "padding_fraction": round(self.padding_fraction, 4),
            "prefix_saved_positions": self.prefix_saved_positions,
            "distinct_shapes": len(self.shapes),
        }


# ---------------------------------------------------------------- per-example facts
PREFIX_STEP = 8  # shared prefixes are multiples of this many tokens (few distinct shapes)
MAX_PREFIX = 2048
_HASH_BASE = np.uint64(1_000_003)


@dataclass(frozen=True)
class ExampleIndex:
    """Input positions and trained-token counts of every example, after truncation to max_seq_length."""

    positions: np.ndarray  # int64: min(len - 1, max_seq_length)
    trained: np.ndarray  # int64: trained targets within those positions
    first_pred: np.ndarray | None = None  # int64: first position whose next token is trained
    prefix_hashes: np.ndarray | None = (
        None  # (n, MAX_PREFIX // PREFIX_STEP) uint64: hash of tokens[:PREFIX_STEP * (k + 1)]
    )

    @property
    def usable(self) -> np.ndarray:
        """Examples that train something (at least one input position and one trained target)."""
        return np.flatnonzero((self.positions >= 1) & (self.trained >= 1))


def index_examples(data: TokenizedExamples, max_seq_length: int) -> ExampleIndex:
    lengths = np.asarray(data.lengths, dtype=np.int64)
    n = len(lengths)
    positions = np.minimum(np.maximum(lengths - 1, 0), max_seq_length)
    trained = np.zeros(n, dtype=np.int64)
    first_pred = np.zeros(n, dtype=np.int64)
    k_max = MAX_PREFIX // PREFIX_STEP
    hashes = np.zeros((n, k_max), dtype=np.uint64)
    powers = np.cumprod(np.full(MAX_PREFIX, _HASH_BASE, dtype=np.uint64), dtype=np.uint64)
    for i in range(n):
        p = int(positions[i])
        if p <= 0:
            continue
        hits = np.flatnonzero(np.asarray(data.mask(i))[1 : p + 1])
        trained[i] = len(hits)
        first_pred[i] = int(hits[0]) if len(hits) else p
        # Polynomial hashes of the prompt's leading PREFIX_STEP * k tokens (wrapping uint64): equal prefixes are found
        # by comparing numbers; collate() still checks the tokens themselves before sharing.
        m = min(int(first_pred[i]), MAX_PREFIX) // PREFIX_STEP * PREFIX_STEP
        if m >= PREFIX_STEP:
            tok = np.asarray(data.tokens(i)[:m], dtype=np.uint64) + np.uint64(1)
            with np.errstate(over="ignore"):
                cum = np.cumsum(tok * powers[:m], dtype=np.uint64)
            hashes[i, : m // PREFIX_STEP] = cum[PREFIX_STEP - 1 :: PREFIX_STEP]
    return ExampleIndex(positions, trained, first_pred, hashes)


def shared_prefix(ids: Sequence[int], index: ExampleIndex) -> int:
    """Longest multiple of PREFIX_STEP tokens that every example of ``ids`` starts with, all of it before
    the first trained prediction of each (so its outputs are never needed, only its keys and values)."""
    if len(ids) < 2 or index.prefix_hashes is None or index.first_pred is None:
        return 0
    ids = list(ids)
    k = int(index.first_pred[ids].min()) // PREFIX_STEP
    k = min(k, index.prefix_hashes.shape[1])
    if k <= 0:
        return 0
    h = index.prefix_hashes[ids, :k]
    same = np.all(h == h[0:1], axis=0) & (h[0] != 0)
    bad = np.flatnonzero(~same)
    return PREFIX_STEP * (int(bad[0]) if len(bad) else k)


# ---------------------------------------------------------------- planning
def _first_fit_decreasing(ids: Sequence[int], sizes: dict[int, int], cap: int) -> list[list[int]]:
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(ids, key=lambda j: (-sizes[j], j)):
        s = sizes[i]
        for r, f in enumerate(free):
            if s <= f:
                rows[r].append(i)
                free[r] -= s
                break
        else:
            rows.append([i])
            free.append(cap - s)
    return rows


def _candidates(longest: int, total: int, opts: BatchOptions, limit: int = 24) -> list[int]:
    lo = opts.row_bucket(longest)
    if opts.packing is False:
        return [lo]
    hi = max(lo, min(opts.max_row, opts.row_bucket(total)))
    if opts.coarse:
        cands = []
        while lo <= hi:
            cands.append(lo)
            lo *= 2
        return cands
    cands = ladder(lo, hi)
    if len(cands) > limit:  # keep the ends and an even spread between them
        pick = np.unique(np.linspace(0, len(cands) - 1, limit).round().astype(int))
        cands = [cands[i] for i in pick]
    return cands


ShapeKey = tuple[str, int, int, int, int]  # (layout kind, rows, R, prefix, targets)


def _split_rows(rows: list[list[int]], R: int, P: int, opts: BatchOptions) -> tuple[MicroBatchPlan, ...]:
    per_mb = (opts.token_budget - P) // R
    if not P and R <= opts.full_row:
        per_mb = max(per_mb, opts.batch_size)
    per_mb = max(1, min(len(rows), per_mb))
    if opts.packing is False and not P:
        per_mb = min(per_mb, opts.batch_size)
    # Spread rows evenly over the fewest micro-batches so their shapes repeat.
    n_mb = math.ceil(len(rows) / per_mb)
    per_mb = math.ceil(len(rows) / n_mb)
    return tuple(
        MicroBatchPlan(tuple(tuple(r) for r in rows[k : k + per_mb]), R, P)
        for k in range(0, len(rows), per_mb)
    )


def _kind(mb: MicroBatchPlan) -> str:
    return "prefix" if mb.prefix else ("packed" if mb.packed else "plain")


def _with_targets(
    plan: tuple[MicroBatchPlan, ...],
    index: ExampleIndex | None,
    opts: BatchOptions,
    seen: dict[ShapeKey, int] | None,
    penalty: float,
) -> tuple[tuple[MicroBatchPlan, ...], float]:
    """Fix each micro-batch's target count (reusing a larger compiled one when cheaper); returns the
    plan and its estimated cost, compilation of new shapes included."""
    a = opts.attention_cost
    out, cost, new = [], opts.mb_cost * len(plan), set()
    for mb in plan:
        rows, R = mb.shape
        # A packed row has an explicit block-diagonal mask: no fused causal kernel, so its attention costs about
        # twice a plain causal row's (measured on an H200: 1 x 4096 packed runs at 0.83x of plain).
        att = 2.0 * a * R if mb.packed else a * R
        cost += mb.prefix * (1.0 + a * mb.prefix) + rows * R * (1.0 + att + a * mb.prefix)
        k = int(sum(index.trained[i] for row in mb.rows for i in row)) if index is not None else 0
        kb = opts.target_size(k)
        base = (_kind(mb), rows, R, mb.prefix)
        if seen is not None:
            if (*base, kb) not in seen:
                larger = sorted(t for (*b, t) in seen if tuple(b) == base and t >= k)
                if larger and (larger[0] - k) * opts.target_cost < penalty:
                    kb = larger[0]
            key = (*base, kb)
            if key not in seen and key not in new:
                cost += penalty
                new.add(key)
        cost += (kb - k) * opts.target_cost
        out.append(MicroBatchPlan(mb.rows, R, mb.prefix, kb))
    return tuple(out), cost


def layout_step(
    ids: Sequence[int],
    positions: np.ndarray,
    opts: BatchOptions,
    index: ExampleIndex | None = None,
    seen: dict[ShapeKey, int] | None = None,
    penalty: float = 0.0,
) -> tuple[MicroBatchPlan, ...]:
    """Lay the examples of one optimizer step out in rows and micro-batches (see the module docstring).

    Candidates: packed rows of each bucket length, one example per row, and rows after a shared prefix;
    the cheapest by estimated compute wins, where a shape not in ``seen`` (not compiled yet) costs
    ``penalty`` positions more. ``seen`` is updated with the winner's shapes.
    """
    sizes = {int(i): int(positions[i]) for i in ids}
    seen_r = sorted({k[2] for k in seen}) if seen else []
    seen_p = sorted({k[3] for k in seen if k[3]}) if seen else []
    candidates = _row_candidates(list(sizes), sizes, opts, seen_r)
    # A long example among short ones: its own micro-batch (rows of its length), the rest in short rows, so the
    # short examples neither pad to nor attend over the long row.
    order = sorted(sizes, key=lambda j: (-sizes[j], j))
    for s in range(1, min(MAX_SPLIT, len(order) - 1) + 1):
        if sizes[order[s]] * 2 > sizes[order[s - 1]]:
            continue  # no real gap in length at this point: nothing to gain
        head = _row_candidates(order[:s], sizes, opts, seen_r)
        tail = _row_candidates(order[s:], sizes, opts, seen_r)
        candidates += [h + t for h in head[:4] for t in tail]
    if opts.share_prefix and opts.packing is not True and index is not None:  # true: packed rows only
        candidates += _prefix_candidates(ids, sizes, opts, index, seen_r, seen_p)
    if opts.packing is True:  # packed rows only: no micro-batch of several rows holding one example each
        packed = [c for c in candidates if all(mb.packed or len(mb.rows) == 1 for mb in c)]
        candidates = packed or candidates
    best: tuple[float, tuple[MicroBatchPlan, ...]] | None = None
    for cand in candidates:
        plan, cost = _with_targets(cand, index, opts, seen, penalty)
        if best is None or cost < best[0]:
            best = (cost, plan)
    assert best is not None
    if seen is not None:
        for mb in best[1]:
            key = (_kind(mb), len(mb.rows), mb.length, mb.prefix, mb.targets)
            seen[key] = seen.get(key, 0) + 1
    return best[1]


MAX_SPLIT = 3  # at most this many long examples of a step get micro-batches of their own


def _row_candidates(
    ids: list[int], sizes: dict[int, int], opts: BatchOptions, seen_r: list[int]
) -> list[tuple[MicroBatchPlan, ...]]:
    """Layouts of ``ids`` in rows of one length: packed rows of each candidate length (plus compiled lengths
    that fit), or one example per row when packing is off."""
    longest = max(sizes[i] for i in ids)
    total = sum(sizes[i] for i in ids)
    lo = opts.row_bucket(longest)
    by_length = [[i] for i in sorted(ids, key=lambda j: (-sizes[j], j))]
    out = []
    for R in sorted(set(_candidates(longest, total, opts)) | {r for r in seen_r if lo <= r <= opts.max_row}):
        rows = by_length if opts.packing is False else _first_fit_decreasing(ids, sizes, R)
        out.append(_split_rows(rows, R, 0, opts))
    return out


def _prefix_candidates(
    ids: Sequence[int],
    sizes: dict[int, int],
    opts: BatchOptions,
    index: ExampleIndex,
    seen_r: list[int],
    seen_p: list[int],
) -> list[tuple[MicroBatchPlan, ...]]:
    """Layouts where examples sharing a prompt prefix form micro-batches that run the prefix once.

    Examples are grouped by their first PREFIX_STEP tokens (one group per system prompt, say); a group
    of two or more gets its own micro-batch(es) after its shared prefix, the rest is packed as usual.
    """
    assert index.prefix_hashes is not None
    groups: dict[int, list[int]] = {}
    for i in sizes:
        h = int(index.prefix_hashes[i, 0])
        groups.setdefault(h if h else -1 - i, []).append(i)
    shared = [(g, shared_prefix(g, index)) for g in groups.values() if len(g) > 1]
    shared = [(g, P // opts.prefix_step * opts.prefix_step) for g, P in shared]
    shared = [(g, P) for g, P in shared if P >= opts.prefix_step]
    if not shared:
        return []
    rest = sorted(
        (i for g in groups.values() for i in g if not any(i in sg for sg, _ in shared)),
        key=lambda j: (-sizes[j], j),
    )
    out = []
    for pad_to_seen in (False, True):
        plan: list[MicroBatchPlan] = []
        for g, P in sorted(shared, key=lambda gp: min(gp[0])):
            if pad_to_seen:  # a shorter prefix is always valid: reuse a compiled prefix length
                P = max((p for p in seen_p if p <= P), default=P)
            order = sorted(g, key=lambda j: (-sizes[j], j))
            need = opts.row_bucket(sizes[order[0]] - P)
            R = min((r for r in seen_r if need <= r <= opts.max_row), default=need) if pad_to_seen else need
            plan += _split_rows([[i] for i in order], R, P, opts)
        if rest:
            R = opts.row_bucket(sizes[rest[0]])
            if pad_to_seen:
                R = min((r for r in seen_r if R <= r <= opts.max_row), default=R)
            rows = [[i] for i in rest] if opts.packing is False else _first_fit_decreasing(rest, sizes, R)
            plan += _split_rows(rows, R, 0, opts)
        out.append(tuple(plan))
    return out


def _penalty(index: ExampleIndex, opts: BatchOptions) -> float:
    """What compiling a new shape is worth, in positions: a quarter of an average optimizer step.

    Compiling costs about one step; the planner is greedy (it cannot see how often a new shape will be
    reused later), so a shape is charged a share of that.
    """
    if opts.compile_penalty is not None:
        return opts.compile_penalty
    usable = index.usable
    return float(index.positions[usable].mean()) * opts.examples_per_step / 4 if len(usable) else 0.0


def _with_longest(opts: BatchOptions, index: ExampleIndex, usable: np.ndarray) -> BatchOptions:
    if opts.longest is not None or not len(usable):
        return opts
    return replace(opts, longest=int(index.positions[usable].max()))


def plan_epoch(index: ExampleIndex, opts: BatchOptions, epoch: int) -> list[StepPlan]:
    """The optimizer steps of one epoch, deterministic in (seed, epoch)."""
    usable = index.usable
    if len(usable) == 0:
        raise FtError(
            ErrorCode.DATA_INVALID,
            "no training example has a trained token",
            "check the dataset's masks: are the assistant turns present?",
        )
    opts = _with_longest(opts, index, usable)
    E = opts.examples_per_step
    rng = np.random.default_rng([opts.seed, epoch])
    order = rng.permutation(usable) if opts.shuffle else usable.copy()
    steps: list[tuple[int, ...]] = []
    window = max(1, opts.group_window) * E
    for w in range(0, len(order), window):
        chunk = order[w : w + window]
        # Stable sort by length inside the window, so a step holds examples of similar length.
        chunk = chunk[np.argsort(index.positions[chunk], kind="stable")]
        group = [tuple(int(i) for i in chunk[k : k + E]) for k in range(0, len(chunk), E)]
        if opts.shuffle:
            group = [group[j] for j in rng.permutation(len(group))]
        steps.extend(group)
    seen: dict[ShapeKey, int] = {}
    penalty = _penalty(index, opts)
    return [StepPlan(ids, layout_step(ids, index.positions, opts, index, seen, penalty)) for ids in steps]


def plan_eval(index: ExampleIndex, opts: BatchOptions, limit: int | None = None) -> list[StepPlan]:
    """Validation batches over all usable examples (or a fixed seeded subset of ``limit`` examples)."""
    usable = index.usable
    if limit is not None and limit < len(usable):
        usable = np.sort(
            np.random.default_rng([opts.seed, 1_000_003]).choice(usable, size=limit, replace=False)
        )
    opts = _with_longest(opts, index, usable)
    order = usable[np.argsort(index.positions[usable], kind="stable")]
    E = opts.examples_per_step
    seen: dict[ShapeKey, int] = {}
    penalty = _penalty(index, opts)
    return [
        StepPlan(
            tuple(int(i) for i in order[k : k + E]),
            layout_step([int(i) for i in order[k : k + E]], index.positions, opts, index, seen, penalty),
        )
        for k in range(0, len(order), E)
    ]


def plan_stats(plans: Sequence[StepPlan], index: ExampleIndex) -> PlanStats:
    st = PlanStats()
    for p in plans:
        st.steps += 1
        st.examples += len(p.examples)
        for mb in p.micro_batches:
            st.micro_batches += 1
            st.shapes.add((_kind(mb), *mb.shape, mb.prefix, mb.targets))
            st.padded_positions += mb.shape[0] * mb.shape[1] + mb.prefix
            st.prefix_saved_positions += (len(mb.rows) - 1) * mb.prefix
            for row in mb.rows:
                st.real_positions += int(sum(index.positions[i] for i in row))
                st.trained_positions += int(sum(index.trained[i] for i in row))
    return st


# ---------------------------------------------------------------- smaller micro-batches (out of memory)
def micro_batch_positions(mb: MicroBatchPlan) -> int:
    """Positions one micro-batch computes: its grid, and a shared prefix once."""
    return len(mb.rows) * mb.length + mb.prefix


def split_micro_batch(
    mb: MicroBatchPlan, index: ExampleIndex, opts: BatchOptions
) -> tuple[MicroBatchPlan, MicroBatchPlan] | None:
    """The same examples in two micro-batches of about half the positions; None for a single example.

    Rows split in two halves; a single packed row becomes two rows (examples dealt by length, longest
    first, to the shorter half), each as long as its examples need. Targets are left to the ladder.
    """
    if len(mb.rows) >= 2:
        h = (len(mb.rows) + 1) // 2
        return MicroBatchPlan(mb.rows[:h], mb.length, mb.prefix), MicroBatchPlan(
            mb.rows[h:], mb.length, mb.prefix
        )
    ids = mb.rows[0]
    if len(ids) < 2:
        return None
    halves: tuple[list[int], list[int]] = ([], [])
    used = [0, 0]
    for i in sorted(ids, key=lambda j: (-int(index.positions[j]), j)):
        side = 0 if used[0] <= used[1] else 1
        halves[side].append(i)
        used[side] += int(index.positions[i])
    a, b = (
        MicroBatchPlan((tuple(h),), min(mb.length, opts.row_bucket(u)), mb.prefix)
        for h, u in zip(halves, used, strict=True)
    )
    return a, b


def limit_micro_batches(
    micro: Sequence[MicroBatchPlan], limit: int | None, index: ExampleIndex, opts: BatchOptions
) -> tuple[MicroBatchPlan, ...]:
    """``micro`` with every micro-batch above ``limit`` positions split (repeatedly) until it fits or is
    a single example; the order of examples is kept. ``limit`` None: unchanged."""
    if limit is None:
        return tuple(micro)
    out: list[MicroBatchPlan] = []
    todo = list(micro)
    while todo:
        mb = todo.pop(0)
        parts = split_micro_batch(mb, index, opts) if micro_batch_positions(mb) > limit else None
        if parts is None:
            out.append(mb)
        else:
            todo[:0] = parts
    return tuple(out)


# ---------------------------------------------------------------- collation
def collate(
    data: TokenizedExamples, plan: MicroBatchPlan, index: ExampleIndex, pad_id: int = 0, target_step: int = 32
) -> MicroBatch:
    """Build the arrays of one micro-batch from its plan."""
    n_rows, R = plan.shape
    P = plan.prefix
    inputs = np.full((n_rows, R), pad_id, dtype=np.int32)
    segments = np.zeros((n_rows, R), dtype=np.int32) if plan.packed else None
    prefix: np.ndarray | None = None
    if P:
        if plan.packed:
            raise ValueError("a shared prefix needs one example per row")
        prefix = np.asarray(data.tokens(plan.rows[0][0])[:P], dtype=np.int32)
    pos_list: list[np.ndarray] = []
    lab_list: list[np.ndarray] = []
    n_tokens = 0
    ids: list[int] = []
    for r, row in enumerate(plan.rows):
        start = 0
        for seg, i in enumerate(row, start=1):
            p_all = int(index.positions[i])
            tok_all = np.asarray(data.tokens(i))[: p_all + 1]
            if P:
                if prefix is None or not np.array_equal(
                    tok_all[:P], prefix
                ):  # a hash collision: never silently wrong
                    raise ValueError(f"example {i} does not start with the shared prefix it was planned with")
                n_tokens += P
            p = p_all - P
            tok = tok_all[P:]
            msk = np.asarray(data.mask(i))[P + 1 : p_all + 1].astype(bool)
            inputs[r, start : start + p] = tok[:p]
            if segments is not None:
                segments[r, start : start + p] = seg
            hit = np.flatnonzero(msk)
            pos_list.append((r * R + start + hit).astype(np.int32))
            lab_list.append(tok[1:][hit].astype(np.int32))
            start += p
            n_tokens += p
            ids.append(i)
        if segments is not None and start < R:
            # Padding gets its own segment: it attends only to itself and earlier padding, never to examples.
            segments[r, start:] = len(row) + 1
    positions = np.concatenate(pos_list) if pos_list else np.zeros(0, np.int32)
    labels = np.concatenate(lab_list) if lab_list else np.zeros(0, np.int32)
    k = len(positions)
    kb = plan.targets if plan.targets >= k else target_bucket(k, target_step)
    weights = np.zeros(kb, dtype=np.float32)
    weights[:k] = 1.0
    positions = np.concatenate([positions, np.zeros(kb - k, np.int32)])
    labels = np.concatenate([labels, np.zeros(kb - k, np.int32)])
    return MicroBatch(inputs, segments, positions, labels, weights, n_tokens, k, tuple(ids), prefix)

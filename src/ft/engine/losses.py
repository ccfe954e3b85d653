"""The training loss: cross-entropy on trained tokens only, over packed rows without cross-talk.

Two things make this cheaper than a plain ``cross_entropy(model(x), y) * mask``:

* Logits are computed only at the positions whose next token is trained. The LM head (vocab x
  hidden) and the float32 softmax over the vocabulary are a large share of a small model's step; a
  chat example's prompt positions never need them.
* Several examples can share a row. mlx-lm's attention takes its mask from the KV cache object
  (``cache.make_mask``) and RoPE offsets from ``cache.offset``; :class:`SegmentMask` is a stateless
  stand-in for the cache that returns a block-diagonal causal mask built from segment ids, so no
  token attends across an example boundary. RoPE is relative (q_m . k_n depends on m - n only), so
  an example's position inside the row does not change its attention scores.

Both tricks rely on the model following mlx-lm's usual layout (``model.model`` returning final
hidden states, then ``lm_head`` or tied ``embed_tokens.as_linear``; attention using the cache
protocol). :func:`check_model` verifies that with a known answer on the model itself at start-up and
falls back to full logits / one example per row where it does not hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ft.engine.fastmath import fast_logsumexp
from ft.engine.lora import blocks

# A loss: (model, batch arrays, normaliser) -> (scalar to differentiate, (loss sum, trained tokens)).
LossFn = Callable[..., tuple[mx.array, tuple[mx.array, mx.array]]]


class SegmentMask:
    """Duck-typed stand-in for an mlx-lm KV cache that only supplies an attention mask.

    ``offset`` 0 keeps RoPE positions as they are, ``update_and_fetch`` returns keys and values
    unchanged (nothing is cached), and ``make_mask`` returns the block-diagonal causal mask.
    """

    offset = 0

    def __init__(self, mask: mx.array):
        self.mask = mask

    def make_mask(self, *args: Any, **kwargs: Any) -> mx.array:
        return self.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values


class PrefixCapture:
    """Cache stand-in for the shared-prefix pass: keeps each layer's keys and values (it is one per layer)."""

    offset = 0

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def make_mask(self, n: int, *args: Any, **kwargs: Any) -> str | None:
        return "causal" if n > 1 else None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values


class PrefixKV:
    """Cache stand-in for the rows after a shared prefix: RoPE continues at offset P, and every row's
    attention sees the prefix's keys and values (one copy, broadcast) before its own, causally.

    This is what a KV cache does at inference; here it is one differentiable graph, so the gradient of
    every row flows back into the single prefix computation.
    """

    def __init__(self, capture: PrefixCapture):
        assert capture.keys is not None and capture.values is not None
        self.pk, self.pv = capture.keys, capture.values
        self.offset = capture.keys.shape[2]

    def make_mask(self, n: int, *args: Any, **kwargs: Any) -> str:
        return "causal"  # queries at P..P+n-1 over keys 0..P+n-1: MLX aligns "causal" to the end

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        rows = keys.shape[0]
        pk = mx.broadcast_to(self.pk, (rows, *self.pk.shape[1:]))
        pv = mx.broadcast_to(self.pv, (rows, *self.pv.shape[1:]))
        return mx.concatenate([pk, keys], axis=2), mx.concatenate([pv, values], axis=2)


def segment_mask(segments: mx.array) -> mx.array:
    """(rows, 1, R, R) bool: query i may attend key j iff j <= i and both are in the same segment."""
    R = segments.shape[1]
    idx = mx.arange(R)
    causal = idx[:, None] >= idx[None, :]
    same = segments[:, :, None] == segments[:, None, :]
    return mx.logical_and(same, causal)[:, None, :, :]


@dataclass(frozen=True)
class ModelSplit:
    """How to run the model: body to hidden states, head to logits, and whether segments work."""

    body: Callable[..., mx.array] | None  # (inputs, cache) -> hidden; None = use the full model
    head: Callable[[mx.array], mx.array] | None
    packing: bool
    prefix: bool = False  # a shared prefix can be run once (the cache protocol carries its keys/values)
    errors: dict[str, float] = field(default_factory=dict)
    """Each known-answer check's relative error (max |got - expected| / max |expected|; absent: not run):
    head, packing, prefix, and unmasked (the packed row without its mask: must be large)."""
    tolerance: float = 1e-3
    """The largest relative error accepted: rounding at the model's precision (see :func:`check_tolerance`)."""

    def disabled(self) -> list[str]:
        """What a failed check turned off, for a warning: one line per check."""
        why = {
            "head": "logits on trained positions only",
            "packing": "packing several examples per row",
            "prefix": "running a shared prompt prefix once",
        }
        on = {"head": self.body is not None, "packing": self.packing, "prefix": self.prefix}
        out = []
        for k, e in self.errors.items():
            if k not in on or on[k]:
                continue
            if e <= self.tolerance:  # packing: the row without the mask gave the same logits
                out.append(
                    f"{why[k]} is off: this model's logits do not change without the segment mask "
                    f"(relative difference {self.errors.get('unmasked', 0.0):.2g}), so the check "
                    "cannot show that packed examples stay apart"
                )
            else:
                out.append(
                    f"{why[k]} is off: its known-answer check on this model differs by {e:.2g} "
                    f"(relative; accepted up to {self.tolerance:.2g} at this precision)"
                )
        return out


def check_tolerance(model: nn.Module) -> float:
    """Relative error that rounding alone can cause in a check's logits at the model's precision.

    Two correct ways of computing the same logits (a masked row vs the example alone) round differently:
    in float32 they agree to ~1e-5, in bfloat16 (8 mantissa bits, eps 2^-7) a few layers already differ
    by ~1e-2. A wrong mask or offset changes the logits by far more than that (tens of percent).
    """
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    eps = max((mx.finfo(d).eps for d in dtypes), default=mx.finfo(mx.float32).eps)
    return max(1e-3, 8.0 * float(eps))


def _rel_err(got: mx.array, ref: mx.array) -> float:
    if got.shape != ref.shape:
        return float("inf")
    scale = max(float(mx.max(mx.abs(ref)).item()), 1e-6)
    return float(mx.max(mx.abs(got - ref)).item()) / scale


def _body_head(model: nn.Module) -> tuple[Callable[..., mx.array], Callable[[mx.array], mx.array]] | None:
    inner = getattr(model, "model", None)
    if inner is None or not callable(inner):
        return None
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        emb = getattr(inner, "embed_tokens", None)
        if emb is None or not hasattr(emb, "as_linear"):
            return None

        def head(h: mx.array) -> mx.array:
            return inner.embed_tokens.as_linear(h)
    else:

        def head(h: mx.array) -> mx.array:
            return model.lm_head(h)

    def body(inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        return inner(inputs, cache=cache)

    return body, head


def check_model(
    model: nn.Module, vocab_size: int | None = None, tolerance: float | None = None
) -> ModelSplit:
    """Verify, on the model itself, that the head split, segment masks and a shared prefix give its logits.

    Known answers: (1) body+head logits equal the model's own logits; (2) the second of two examples
    sharing a row (segment mask) has the same logits as the same example run alone, while the same row
    without the mask does not (so the model really uses the mask); (3) rows after a prefix that ran
    once equal the whole sequences. Each passes within ``tolerance`` (default: rounding at the model's
    precision, :func:`check_tolerance`); the errors are kept in the result. Costs a few tiny forwards.
    """
    tol = check_tolerance(model) if tolerance is None else tolerance
    errors: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        vocab = vocab_size or 100
        rng = np.random.default_rng(0)
        a = mx.array(rng.integers(3, min(vocab, 1000), size=(1, 5)).astype(np.int32))
        b = mx.array(rng.integers(3, min(vocab, 1000), size=(1, 7)).astype(np.int32))
        ref_b = model(b).astype(mx.float32)
        split = _body_head(model)
        if split is not None:
            body, head = split
            try:
                errors["head"] = _rel_err(head(body(b)).astype(mx.float32), ref_b)
            except Exception:  # an architecture whose inner model does not take (inputs, cache=)
                errors["head"] = float("inf")
            if not errors["head"] <= tol:
                split = None
        packing = False
        try:
            row = mx.concatenate([a, b], axis=1)
            seg = mx.array(np.array([[1] * 5 + [2] * 7], dtype=np.int32))
            caches = [SegmentMask(segment_mask(seg))] * len(blocks(model))
            errors["packing"] = _rel_err(model(row, cache=caches).astype(mx.float32)[:, 5:], ref_b)
            errors["unmasked"] = _rel_err(
                model(row).astype(mx.float32)[:, 5:], ref_b
            )  # b sees a: must differ
            packing = errors["packing"] <= tol and errors["unmasked"] > max(4 * errors["packing"], tol)
        except Exception:  # cache protocol not followed: one example per row
            errors["packing"] = float("inf")
        prefix = False
        try:
            ab = mx.concatenate([a, b], axis=1)
            ref_ab = model(ab).astype(mx.float32)[:, 5:]
            got = _rows_after_prefix(model, a[0], mx.concatenate([b, b], axis=0)).astype(mx.float32)
            errors["prefix"] = _rel_err(got, mx.concatenate([ref_ab, ref_ab], axis=0))
            prefix = errors["prefix"] <= tol
        except Exception:  # cache protocol not followed: no prefix sharing
            errors["prefix"] = float("inf")
    finally:
        model.train(was_training)
    body_head = (split[0], split[1]) if split is not None else (None, None)
    return ModelSplit(body_head[0], body_head[1], packing, prefix, errors=errors, tolerance=tol)


def _prefix_caches(
    model: nn.Module, prefix: mx.array, body: Callable[..., mx.array] | None = None
) -> list[PrefixKV]:
    """Run the shared prefix once and return per-layer caches that hand its keys/values to the rows."""
    caps = [PrefixCapture() for _ in range(len(blocks(model)))]
    (body or model)(prefix[None], cache=caps)  # only the keys/values are used; MLX never computes the rest
    return [PrefixKV(c) for c in caps]


def _rows_after_prefix(model: nn.Module, prefix: mx.array, rows: mx.array) -> mx.array:
    return model(rows, cache=_prefix_caches(model, prefix))


def trained_hidden(
    model: nn.Module,
    split: ModelSplit,
    inputs: mx.array,
    segments: mx.array | None,
    positions: mx.array,
    prefix: mx.array | None = None,
    cache: list[Any] | None = None,
) -> tuple[mx.array, Callable[[mx.array], mx.array] | None]:
    """What the vocabulary head reads at ``positions`` (flat indices into rows*R) of ``inputs``, and the head.

    The head is None when the model does not split into body and head: the rows are then its logits (full
    logits computed, then the positions picked). ``prefix``: tokens every row starts with, run once;
    ``inputs`` then hold what follows it. ``segments``: packed examples, masked from each other.
    ``cache``: the caller's per-layer cache stand-ins (instead of ``prefix`` and ``segments``).
    """
    if cache is not None:
        pass
    elif prefix is not None:
        cache = _prefix_caches(model, prefix, split.body)
    elif segments is not None:
        cache = [SegmentMask(segment_mask(segments))] * len(blocks(model))
    rows, R = inputs.shape
    if split.body is not None and split.head is not None:
        return split.body(inputs, cache).reshape(rows * R, -1)[positions], split.head
    full = model(inputs, cache=cache) if cache is not None else model(inputs)
    return full.reshape(rows * R, -1)[positions], None


def token_ce(
    model: nn.Module,
    split: ModelSplit,
    inputs: mx.array,
    segments: mx.array | None,
    positions: mx.array,
    labels: mx.array,
    prefix: mx.array | None = None,
    fast_math: bool = False,
    cache: list[Any] | None = None,
) -> mx.array:
    """Cross-entropy (float32) of the label at each of ``positions`` (flat indices into rows*R).

    ``prefix``: tokens every row starts with, run once; ``inputs`` then hold what follows it.
    ``fast_math``: the logsumexp over the vocabulary from :mod:`ft.engine.fastmath` (for CPU).
    ``cache``: per-layer cache stand-ins of the caller (:func:`trained_hidden`).
    """
    hidden, head = trained_hidden(model, split, inputs, segments, positions, prefix, cache)
    logits = (head(hidden) if head is not None else hidden).astype(
        mx.float32
    )  # the head on trained positions only
    # cross-entropy = logsumexp(logits) - logit of the label
    lse = fast_logsumexp(logits) if fast_math else mx.logsumexp(logits, axis=-1)
    return lse - mx.take_along_axis(logits, labels[:, None], axis=-1).squeeze(-1)


def make_loss(split: ModelSplit, fast_math: bool = False) -> LossFn:
    """The default loss: token-weighted cross-entropy over the trained positions of a micro-batch.

    ``batch`` = (inputs (rows,R) int32, segments (rows,R) int32 or None, positions (K,) flat int32,
    labels (K,) int32, weights (K,) float32). Returns ``sum(ce * w) / norm`` for differentiation
    (``norm`` = trained tokens of the whole optimizer step, so gradients of its micro-batches simply
    add up to the token-weighted mean) and the raw ``(sum(ce * w), sum(w))`` for logging.
    """

    def loss(
        model: nn.Module,
        inputs: mx.array,
        segments: mx.array | None,
        positions: mx.array,
        labels: mx.array,
        weights: mx.array,
        norm: mx.array,
        prefix: mx.array | None = None,
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        ce = token_ce(model, split, inputs, segments, positions, labels, prefix, fast_math)
        total = (ce * weights).sum()
        return total / norm, (total, weights.sum())

    return loss

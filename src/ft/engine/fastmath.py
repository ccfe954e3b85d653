"""exp, SiLU and logsumexp for MLX's CPU backend, where ``mx.exp`` is the slow part of a training step.

Measured on the 2-core x86-64 machine (MLX 0.32 CPU wheel): ``mx.exp`` on 590K float32 values takes
~14-16 ms (~25 ns a value, compiled or not), about 40x a multiply. A LoRA step on SmolLM2-135M spends
over a second of its ~5 s on exp: SiLU in every MLP (forward, and again in the backward), attention's
softmax, and the logsumexp of the loss over the vocabulary. :func:`fast_exp` builds exp from multiplies and adds that a
compiled step fuses into one loop (~4x faster on the same values, relative error below 1e-6):

    exp(x) = 2^n e^r with n = floor(x log2 e), r = x - n ln 2 in [0, ln 2) (ln 2 split in two parts)
    e^r: a degree-9 Taylor polynomial;  2^n: the float32 whose exponent bits are n + 127.

:func:`swap_modules` puts a :class:`FastSwiGLU` in place of each llama-style MLP and a
:class:`FastAttention` (softmax with :func:`fast_exp`; MLX's CPU attention has no fused kernel) in place
of each llama-style attention: module swapping, as LoRA does, with the same Linear children under the
same names, so parameter paths do not change; each after checking on the module itself that it
computes what the original computes. The trainer uses it on CPU only; on a GPU ``mx.exp`` is fast.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from ft.engine.lora import blocks
from ft.errors import FtError

_LOG2E = 1.4426950408889634
# ln 2 in two parts (Cody-Waite): n * _LN2_HI is exact in float32, so r = x - n ln 2 keeps its precision
_LN2_HI = 0.693359375
_LN2_LO = -2.1219444005469057e-4
_INV_FACT = (
    1.0,
    1.0,
    1 / 2,
    1 / 6,
    1 / 24,
    1 / 120,
    1 / 720,
    1 / 5040,
    1 / 40320,
    1 / 362880,
)  # e^r, r in [0, ln 2)


def _exp_parts(x: mx.array) -> mx.array:
    x = mx.clip(x.astype(mx.float32), -126.0 * 0.6931471805599453, 127.0 * 0.6931471805599453)
    n = mx.floor(x * _LOG2E)  # exp(x) = 2^n e^r
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = mx.array(_INV_FACT[-1], dtype=mx.float32)
    for c in reversed(_INV_FACT[:-1]):
        p = p * r + c
    # 2^n exactly: the IEEE-754 float32 with biased exponent n + 127 and a zero mantissa
    scale = mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)
    return p * scale


@mx.custom_function
def fast_exp(x: mx.array) -> mx.array:
    """exp(x) in float32 from multiplies and adds; below exp(-87.3) it returns ~2^-126, not 0."""
    return _exp_parts(x)


@fast_exp.vjp
def _fast_exp_vjp(primals: mx.array, cotangent: mx.array, output: mx.array) -> tuple[mx.array]:
    return (cotangent * output,)  # d/dx exp(x) = exp(x)


@mx.custom_function
def fast_silu(x: mx.array) -> mx.array:
    """x * sigmoid(x) with :func:`fast_exp`; the gradient is written out (s (1 + x (1 - s)))."""
    return x * (1.0 / (1.0 + _exp_parts(-x))).astype(x.dtype)


@fast_silu.vjp
def _fast_silu_vjp(primals: mx.array, cotangent: mx.array, output: mx.array) -> tuple[mx.array]:
    x = primals  # a one-argument custom function gets its argument itself, not a tuple
    s = (1.0 / (1.0 + _exp_parts(-x))).astype(x.dtype)
    return (cotangent * s * (1.0 + x * (1.0 - s)),)


def fast_logsumexp(x: mx.array, axis: int = -1) -> mx.array:
    """log(sum(exp(x))) along ``axis``, shifted by the maximum like ``mx.logsumexp``."""
    m = mx.stop_gradient(mx.max(x, axis=axis, keepdims=True))
    return (m + mx.log(mx.sum(fast_exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def _adopt(module: nn.Module, ref: nn.Module, names: tuple[str, ...]) -> None:
    """Take ``ref``'s children ``names`` in ``ref``'s own order (parameter trees then flatten alike)."""
    order = [k for k in ref if k in names] + [k for k in names if k not in ref]
    for k in order:
        setattr(module, k, getattr(ref, k))


class FastSwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` with :func:`fast_silu`; holds the original Linears."""

    def __init__(self, ref: nn.Module):
        super().__init__()
        _adopt(self, ref, ("gate_proj", "up_proj", "down_proj"))

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(fast_silu(self.gate_proj(x)) * self.up_proj(x))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None) -> mx.array:
    """Softmax attention with :func:`fast_exp`: q (B, H, L, D), k and v (B, Hk, S, D), H a multiple of Hk.

    ``mask``: None, "causal" (aligned to the end: query i sees keys up to S - L + i) or an array that
    broadcasts to (B, H, L, S), boolean (True = attend) or additive.
    """
    B, H, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    rep = H // Hk
    # grouped-query attention without copying keys: query head h reads kv head h // rep
    scores = (q.reshape(B, Hk, rep, L, D) * scale) @ mx.swapaxes(k, -1, -2)[:, :, None]
    allowed = None
    if isinstance(mask, str):
        allowed = (mx.arange(L)[:, None] + (S - L)) >= mx.arange(S)[None]
    elif mask is not None:
        m = mask
        if m.ndim == 4:
            m = m[:, :, None] if m.shape[1] == 1 else m.reshape(m.shape[0], Hk, rep, *m.shape[2:])
        if m.dtype == mx.bool_:
            allowed = m
        else:
            scores = scores + m.astype(scores.dtype)
    if allowed is not None:
        scores = mx.where(allowed, scores, mx.array(-1e30, dtype=scores.dtype))
    top = mx.stop_gradient(mx.max(scores, axis=-1, keepdims=True))
    e = fast_exp(scores - top)
    if allowed is not None:
        e = mx.where(allowed, e, mx.array(0.0, dtype=e.dtype))
    p = (e / mx.sum(e, axis=-1, keepdims=True)).astype(v.dtype)
    return (p @ v[:, :, None]).reshape(B, H, L, v.shape[-1])


# Measured on the 2-core machine, forward + backward, 9 query / 3 kv heads of 64: rows of 96 queries
# (after a 24-token prefix) 14 ms against MLX's 20 ms in one run, equal in another; packed rows of 448
# queries with a block mask 142-153 ms against 109-115 ms. So the exp-free softmax only for short rows.
FAST_ATTENTION_MAX_QUERIES = 128


class FastAttention(nn.Module):
    """mlx-lm's llama attention (projections, RoPE, cache protocol) with :func:`attention` inside for rows
    of up to ``FAST_ATTENTION_MAX_QUERIES`` queries, MLX's fused attention for longer ones."""

    def __init__(self, ref: nn.Module):
        super().__init__()
        _adopt(self, ref, ("q_proj", "k_proj", "v_proj", "o_proj", "rope"))
        self.n_heads, self.n_kv_heads, self.scale = ref.n_heads, ref.n_kv_heads, ref.scale

    def __call__(
        self, x: mx.array, mask: mx.array | str | None = None, cache: object | None = None
    ) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            q = self.rope(q, offset=cache.offset)  # type: ignore[attr-defined]
            k = self.rope(k, offset=cache.offset)  # type: ignore[attr-defined]
            k, v = cache.update_and_fetch(k, v)  # type: ignore[attr-defined]
        else:
            q, k = self.rope(q), self.rope(k)
        if L <= FAST_ATTENTION_MAX_QUERIES:
            out = attention(q, k, v, self.scale, mask)
        else:  # long rows: MLX's own was as fast or faster (below)
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class _Prefixed:
    """A cache stand-in for the known-answer check: RoPE offset P, P earlier keys/values prepended."""

    def __init__(self, k: mx.array, v: mx.array):
        self.k, self.v, self.offset = k, v, k.shape[2]

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        return mx.concatenate([self.k, k], axis=2), mx.concatenate([self.v, v], axis=2)


def _same_attention(ref: nn.Module, fast: nn.Module, hidden: int, rtol: float) -> bool:
    """The swapped attention gives the original's output: causal, after a prefix, and with a block mask."""
    try:
        x = mx.random.normal((2, 5, hidden), key=mx.random.key(1))
        hk = ref.n_kv_heads
        d = ref.k_proj(x[:, :1]).shape[-1] // hk
        pk = mx.random.normal((2, hk, 3, d), key=mx.random.key(2))
        pv = mx.random.normal((2, hk, 3, d), key=mx.random.key(3))
        seg = mx.array([[1, 1, 2, 2, 2], [1, 1, 1, 1, 1]])
        block = (seg[:, :, None] == seg[:, None, :]) & (mx.arange(5)[:, None] >= mx.arange(5)[None])
        cases = [("causal", None), ("causal", (pk, pv)), (block[:, None], None)]
        for mask, pre in cases:
            a = ref(x, mask=mask, cache=_Prefixed(*pre) if pre else None)
            if not _close(a, fast(x, mask=mask, cache=_Prefixed(*pre) if pre else None), rtol):
                return False
        return True
    except Exception:  # another attention signature or layout: keep the original
        return False


def _close(a: mx.array, b: mx.array, rtol: float) -> bool:
    """Same shape, and no element further apart than ``rtol`` of the largest magnitude in ``a``."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    scale = mx.maximum(mx.abs(a).max(), mx.array(1e-6))
    return a.shape == b.shape and bool((mx.abs(a - b).max() <= rtol * scale).item())


def swap_modules(model: nn.Module, rtol: float = 1e-4) -> Callable[[], None]:
    """Put :class:`FastSwiGLU` and :class:`FastAttention` in place of each llama-style ``layer.mlp`` and
    ``layer.self_attn``; returns a function that puts the originals back.

    Known answer first: a module is swapped only if the replacement gives the original's output on
    random inputs (within ``rtol`` of its scale; attention with a causal mask, after a prefix, and with
    a block mask); a module of another kind (GELU, MoE, fused projections, its own attention code) stays.
    """
    hidden = getattr(getattr(model, "args", None), "hidden_size", None)
    if not isinstance(hidden, int):
        return lambda: None
    was_training = model.training
    model.eval()  # the checks compare outputs: no dropout in them (nor any draw from the global RNG)
    try:
        swapped = _swap(model, hidden, rtol)
    finally:
        model.train(was_training)

    def restore() -> None:
        for layer, name, original in swapped:
            setattr(layer, name, original)

    return restore


def _swap(model: nn.Module, hidden: int, rtol: float) -> list[tuple[nn.Module, str, nn.Module]]:
    try:
        layers = blocks(model)
    except FtError:  # no transformer blocks where mlx-lm keeps them: nothing to swap
        return []
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for layer in layers:
        for name, fast_type, needs, same in _SWAPS:
            ref = getattr(layer, name, None)
            if ref is None or isinstance(ref, fast_type) or not all(hasattr(ref, k) for k in needs):
                continue
            fast = fast_type(ref)
            if same(ref, fast, hidden, rtol):
                setattr(layer, name, fast)
                swapped.append((layer, name, ref))
    return swapped


def _same_mlp(ref: nn.Module, fast: nn.Module, hidden: int, rtol: float) -> bool:
    try:
        x = mx.random.normal((2, 3, hidden), key=mx.random.key(0))
        return _close(ref(x), fast(x), rtol)
    except Exception:  # a module that does not take (..., hidden) inputs: not llama-style
        return False


# (attribute of a block, replacement, what the original must have, known-answer check)
_SWAPS = (
    ("mlp", FastSwiGLU, ("gate_proj", "up_proj", "down_proj"), _same_mlp),
    (
        "self_attn",
        FastAttention,
        ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads", "n_kv_heads", "scale"),
        _same_attention,
    ),
)

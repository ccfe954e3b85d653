"""fastmath: exp, SiLU, logsumexp and attention built from multiplies and adds (MLX's CPU exp is slow).

Each is checked against MLX's own op, values and gradients; the module swap against the modules it
replaces, on a 2-layer random Llama; and the trainer on CPU against the same run without it."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine_helpers import random_examples, tiny_llama
from ft.engine import fastmath
from ft.engine.batching import BatchOptions
from ft.engine.lora import AdapterSpec, apply_adapters
from ft.engine.optim import OptimizerSpec, build_optimizer
from ft.engine.trainer import TrainOptions, train


def test_fast_exp_matches_exp_over_the_float32_range() -> None:
    x = mx.linspace(-87.0, 88.0, 20001)
    got, ref = np.array(fastmath.fast_exp(x), dtype=np.float64), np.exp(np.array(x, dtype=np.float64))
    assert np.max(np.abs(got - ref) / ref) < 1e-6
    extreme = np.array(fastmath.fast_exp(mx.array([-1e4, -200.0, 200.0, 1e4])))
    assert (
        np.all(np.isfinite(extreme)) and extreme[0] < 1e-37 and extreme[-1] > 1e38
    )  # clamped, never inf/nan
    g = mx.grad(lambda v: fastmath.fast_exp(v).sum())(mx.array([-3.0, 0.0, 2.5]))
    assert np.allclose(np.array(g), np.exp([-3.0, 0.0, 2.5]), rtol=1e-6)


def test_fast_silu_and_logsumexp_match_mlx_values_and_gradients() -> None:
    x = mx.random.normal((4, 300), key=mx.random.key(0)) * 6
    assert float(mx.abs(fastmath.fast_silu(x) - nn.silu(x)).max()) < 1e-5
    g1 = mx.grad(lambda v: (fastmath.fast_silu(v) * v).sum())(x)
    g2 = mx.grad(lambda v: (nn.silu(v) * v).sum())(x)
    assert np.allclose(np.array(g1), np.array(g2), rtol=1e-5, atol=1e-6)
    y = mx.random.normal((8, 1000), key=mx.random.key(1)) * 4
    assert float(mx.abs(fastmath.fast_logsumexp(y) - mx.logsumexp(y, axis=-1)).max()) < 1e-5
    h1 = mx.grad(lambda v: fastmath.fast_logsumexp(v).sum())(y)
    h2 = mx.grad(lambda v: mx.logsumexp(v, axis=-1).sum())(y)
    assert float(mx.abs(h1 - h2).max()) < 1e-6


def _sdpa(q, k, v, mask):  # type: ignore[no-untyped-def]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)


@pytest.mark.parametrize("case", ["none", "causal", "causal-after-prefix", "block-bool", "additive"])
def test_attention_matches_mlx_sdpa_with_grouped_heads(case: str) -> None:
    key = mx.random.key(3)
    kq, kk, kv = mx.random.split(key, 3)
    L, S = 7, (10 if case == "causal-after-prefix" else 7)
    q = mx.random.normal((2, 6, L, 16), key=kq)
    k = mx.random.normal((2, 2, S, 16), key=kk)  # 3 query heads per kv head
    v = mx.random.normal((2, 2, S, 16), key=kv)
    mask: mx.array | str | None = None
    if case.startswith("causal"):
        mask = "causal"
    elif case == "block-bool":
        seg = mx.array([[1, 1, 1, 2, 2, 2, 2], [1, 2, 2, 2, 3, 3, 3]])
        mask = ((seg[:, :, None] == seg[:, None, :]) & (mx.arange(L)[:, None] >= mx.arange(L)[None]))[:, None]
    elif case == "additive":
        mask = mx.random.normal((2, 1, L, S), key=mx.random.key(9))
    ref, got = _sdpa(q, k, v, mask), fastmath.attention(q, k, v, 0.125, mask)
    assert float(mx.abs(ref - got).max()) < 1e-5

    def loss(fn):  # type: ignore[no-untyped-def]
        return lambda q, k, v: (fn(q, k, v) * mx.arange(16)).sum()

    gr = mx.grad(loss(lambda q, k, v: _sdpa(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    gf = mx.grad(loss(lambda q, k, v: fastmath.attention(q, k, v, 0.125, mask)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(gr, gf, strict=True):
        assert float(mx.abs(a - b).max()) < 1e-4


def test_swap_keeps_outputs_and_parameter_paths_and_restores() -> None:
    model = tiny_llama(seed=0, layers=2)
    apply_adapters(model, AdapterSpec(rank=4, alpha=8, dropout=0.3, target_modules="all-linear"))
    model.train()
    x = mx.array(np.random.default_rng(0).integers(3, 100, size=(2, 9)).astype(np.int32))
    model.eval()
    ref = model(x)
    model.train()
    keys = [k for k, _ in tree_flatten(model.parameters())]
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    originals = [(layer.mlp, layer.self_attn) for layer in model.model.layers]

    restore = fastmath.swap_modules(model)
    assert all(isinstance(layer.mlp, fastmath.FastSwiGLU) for layer in model.model.layers)
    assert all(isinstance(layer.self_attn, fastmath.FastAttention) for layer in model.model.layers)
    assert model.training and model.model.layers[0].mlp.training  # the checks ran in eval mode, then back
    assert [k for k, _ in tree_flatten(model.parameters())] == keys  # same paths, same order
    assert [k for k, _ in tree_flatten(model.trainable_parameters())] == trainable
    model.eval()
    assert float(mx.abs(model(x) - ref).max()) < 1e-4
    restore()
    assert [(layer.mlp, layer.self_attn) for layer in model.model.layers] == originals


class _GeluMLP(nn.Module):
    """Same children as a llama MLP, another function: the known-answer check must refuse it."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu(self.gate_proj(x)) * self.up_proj(x))


def test_swap_leaves_a_module_that_computes_something_else() -> None:
    model = tiny_llama(seed=1, layers=2)
    odd = _GeluMLP(model.model.layers[1].mlp)
    model.model.layers[1].mlp = odd
    restore = fastmath.swap_modules(model)
    assert isinstance(model.model.layers[0].mlp, fastmath.FastSwiGLU)
    assert model.model.layers[1].mlp is odd
    restore()


def test_trainer_on_cpu_with_and_without_fastmath_agree() -> None:
    data, val = random_examples(16, seed=4), random_examples(4, seed=5)
    results = {}
    for fast in (True, False):
        model = tiny_llama(seed=0)
        mx.random.seed(1)
        apply_adapters(model, AdapterSpec(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
        opt = build_optimizer(OptimizerSpec(name="adamw"), 1e-2)

        class Rec:
            def __init__(self) -> None:
                self.losses: list[float] = []

            def on_step(self, e) -> None:  # type: ignore[no-untyped-def]
                self.losses.append(e.loss)

        rec = Rec()

        opts = TrainOptions(
            BatchOptions(batch_size=2, grad_accumulation_steps=2, max_seq_length=64, seed=3),
            total_steps=6,
            eval_steps=3,
            fast_cpu_math=fast,
        )
        res = train(model, opt, data, val, opts, callbacks=[rec])
        assert not any(isinstance(layer.mlp, fastmath.FastSwiGLU) for layer in model.model.layers)  # restored
        results[fast] = (rec.losses, res.final_val_loss)
    (fl, fv), (sl, sv) = results[True], results[False]
    assert np.allclose(fl, sl, rtol=1e-4, atol=1e-5) and abs(fv - sv) < 1e-4
    assert fl[-1] < fl[0]  # it trained


def test_fast_attention_module_uses_mlx_attention_for_long_rows() -> None:
    model = tiny_llama(seed=2, layers=1)
    ref = model.model.layers[0].self_attn
    fast = fastmath.FastAttention(ref)
    for L in (5, fastmath.FAST_ATTENTION_MAX_QUERIES + 3):  # both sides of the switch
        x = mx.random.normal((1, L, 64), key=mx.random.key(L))
        assert float(mx.abs(ref(x, mask="causal") - fast(x, mask="causal")).max()) < 1e-4

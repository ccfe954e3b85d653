"""Adapters on a 2-layer random Llama: what trains, what stays bitwise frozen, fuse() == adapted."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine_helpers import VOCAB, random_examples, tiny_llama
from ft.engine.batching import BatchOptions
from ft.engine.lora import AdapterSpec, apply_adapters, count_parameters, fuse, linear_names
from ft.engine.optim import OptimizerSpec, build_optimizer
from ft.engine.trainer import TrainOptions, train
from ft.errors import FtError


def _snapshot(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _train_steps(model, steps: int = 3, lr: float = 5e-2) -> None:
    data = random_examples(24, seed=3)
    opt = build_optimizer(OptimizerSpec(name="adamw", weight_decay=0.01), lr)
    opts = TrainOptions(BatchOptions(batch_size=4, max_seq_length=64), total_steps=steps, eval_at_start=False)
    train(model, opt, data, None, opts)


def _changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> set[str]:
    return {k for k in after if k not in before or not np.array_equal(before[k], after[k])}


def _is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in {"lora_a", "lora_b", "m"}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_train_only_adapters_and_frozen_weights_stay_bitwise(method: str) -> None:
    model = tiny_llama()
    summary = apply_adapters(
        model, AdapterSpec(method=method, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    )
    before = _snapshot(model)
    _train_steps(model)
    after = _snapshot(model)
    changed = _changed(before, after)
    assert changed, "training changed nothing"
    assert all(_is_adapter(k) for k in changed), sorted(changed)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    expected_leaves = {"lora_a", "lora_b", "m"} if method == "dora" else {"lora_a", "lora_b"}
    assert {k.rsplit(".", 1)[-1] for k in trainable} == expected_leaves
    # every trainable parameter moved (lora_b starts at zero and must leave it)
    assert trainable <= changed
    # q,v of 2 layers, hidden 64, kv dim 32: r*(in+out) each (+ out for DoRA's magnitude)
    lora = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert summary.trainable_parameters == lora + (2 * (64 + 32) if method == "dora" else 0)
    assert len(summary.adapted_modules) == 4


def test_qlora_quantizes_the_base_and_trains_through_it() -> None:
    model = tiny_llama()
    summary = apply_adapters(
        model, AdapterSpec(method="qlora", rank=4, alpha=8, quant_bits=4, quant_group_size=32)
    )
    assert summary.quantized_base
    q = model.layers[0].self_attn.q_proj.linear
    assert q.weight.dtype == mx.uint32 and q.bits == 4
    before = _snapshot(model)
    _train_steps(model)
    changed = _changed(before, _snapshot(model))
    assert changed and all(_is_adapter(k) for k in changed), sorted(changed)


def test_full_fine_tuning_of_last_layer_leaves_the_rest_bitwise() -> None:
    model = tiny_llama()
    summary = apply_adapters(model, AdapterSpec(method="full", layers=1))
    before = _snapshot(model)
    _train_steps(model)
    changed = _changed(before, _snapshot(model))
    assert changed and all(k.startswith("model.layers.1.") for k in changed), sorted(changed)
    layer1 = {k for k in before if k.startswith("model.layers.1.")}
    assert changed == layer1  # every weight of the trained block moved
    assert summary.trainable_parameters == sum(before[k].size for k in layer1)


def test_all_linear_and_layer_selection() -> None:
    model = tiny_llama()
    names = linear_names(model)
    assert set(names) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    s = apply_adapters(model, AdapterSpec(rank=2, alpha=2, target_modules="all-linear", layers=1))
    assert len(s.adapted_modules) == 7 and all(m.startswith("layers.1.") for m in s.adapted_modules)
    assert count_parameters(model) == s.total_parameters  # adapters are not counted as base parameters


def test_unknown_target_module_names_what_exists() -> None:
    model = tiny_llama()
    with pytest.raises(FtError) as e:
        apply_adapters(model, AdapterSpec(target_modules=["q_proj", "query_key_value"]))
    assert "query_key_value" in e.value.message and "v_proj" in (e.value.hint or "")
    with pytest.raises(FtError):
        apply_adapters(tiny_llama(), AdapterSpec(layers=5))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fuse_reproduces_the_adapted_logits(method: str) -> None:
    model = tiny_llama()
    apply_adapters(model, AdapterSpec(method=method, rank=4, alpha=16, target_modules="all-linear"))
    _train_steps(model, steps=4, lr=0.1)  # lora_b away from zero, so the adapters matter
    model.eval()
    x = mx.array(np.random.default_rng(0).integers(0, VOCAB, size=(2, 17)).astype(np.int32))
    adapted = model(x)
    base_like = model.layers[0].self_attn.q_proj.linear(mx.ones((1, 64)))
    fuse(model)
    assert not any(hasattr(m, "lora_a") for _, m in model.named_modules())
    fused = model(x)
    np.testing.assert_allclose(np.array(fused), np.array(adapted), atol=1e-4, rtol=1e-4)
    # and the adapters did change the function (this test could fail)
    assert not np.allclose(
        np.array(model.layers[0].self_attn.q_proj(mx.ones((1, 64)))), np.array(base_like), atol=1e-4
    )
